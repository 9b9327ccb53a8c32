#!/usr/bin/env python3
"""Convert unipool.c checkpoints to and from PyTorch, and check a checkpoint
against the PyTorch reference model (dev/model.py).

    dev/convert.py to-torch CKPT OUT.pt
    dev/convert.py to-ckpt  IN.pt OUT.bin
    dev/convert.py check    CKPT SHARD [-b B] [-t T]

to-torch writes a torch file holding
    "config":      the model Config (dev/model.py) as a dict, bias_rate included
    "state_dict":  the float32 model's state_dict()
    "expert_bias": with the sigmoid router (router 2) only, its (L, E) float32
                   expert bias
    "train":       the training configuration of the header (B T n_micro steps
                   warmup val_every val_batches sample_every gen_tokens
                   ckpt_every keep seed lr b1 b2 eps wd clip lr_floor), and with
                   the training state also the loader position (epoch shard
                   row), the sampler state and the fingerprint of the train
                   shards (0: unknown)
    "paths":       version 2 only: the data paths the run trained with, a dict
                   of "train", "val" and "tokenizer" (-i -j -z)
and, when the checkpoint holds the training state,
    "adam_m", "adam_v": flat float32 tensors in parameter-buffer order
    "adam_t", "step":   AdamW steps and steps done
    "prev_f":           the stale pool statistic (L, E) float32, None if its
                        valid flag is 0.
to-ckpt is the reverse: a parameters-only checkpoint when IN.pt has no
"adam_m", else one with the training state; version 2 when it has "paths",
else version 1 (which the C programs still read). ckpt -> pt -> ckpt is
byte-identical for every file the C programs write and every version 1 file.

check loads CKPT into the PyTorch model in float64 and float32, computes the
cross-entropy of the first batch of SHARD (B rows of T+1 tokens in file
order, row r = tokens [r*T, r*T+T+1)) in evaluation mode, runs
`./infer_unipool eval ... -n 1` on the same batch, and compares.

The checkpoint format is the one documented in train_unipool.c (comment
"Checkpoints. Little-endian, in this order:"); the reader checks the header
and the expert bias and stale statistic exactly as checkpoint_header() and
checkpoint_read_body() there do. Magic numbers come from
train_unipool.c through dev/magic.py. Bad input ends with one line
"error: ..." on stderr and exit status 1. Standard library, numpy and torch.
"""
import argparse
import dataclasses
import glob
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from magic import magic  # noqa: E402
sys.path.insert(0, os.path.dirname(HERE))
from prepro_pile import UserError, write_file  # noqa: E402

import torch  # noqa: E402
import model as M  # noqa: E402

INFER = os.path.join(ROOT, "infer_unipool")

# ---- the header layout (train_unipool.c, checkpoint_save / checkpoint_header) -------------
N_I32, N_F32, N_U64 = 256, 64, 32
HEADER_BYTES = N_I32 * 4 + N_F32 * 4 + N_U64 * 8           # CKPT_HEADER_BYTES
PATH_KEYS, PATH_BYTES = ["train", "val", "tokenizer"], 1024   # version 2: the -i -j -z paths (CKPT_PATH_BYTES each)
PATHS_BYTES = len(PATH_KEYS) * PATH_BYTES
I32_CONFIG = ["V", "Vp", "maxT", "L", "C", "NH", "NKV", "F", "G", "E", "K", "router", "aux"]   # h[3..15]
I32_TRAIN = ["B", "T", "n_micro", "steps", "warmup", "val_every", "val_batches", "sample_every",
             "gen_tokens", "ckpt_every", "keep"]                                               # h[16..26]
I32_STEP, I32_ADAM_T, I32_PREV_VALID = 27, 28, 29                                              # state only
F32_CONFIG = ["alpha", "norm_eps", "rope_theta", "router_c", "router_eps"]                     # hp[0..4]
F32_TRAIN = ["lr", "b1", "b2", "eps", "wd", "clip", "lr_floor"]                                # hp[5..11]
F32_BIAS_RATE = 12                                                                             # hp[12]
CONFIG_KEYS = I32_CONFIG + F32_CONFIG + ["bias_rate"]
U64_SEED = 0                                                                                   # h64[0]
U64_STATE = ["epoch", "shard", "row", "sampler", "fingerprint"]                                # h64[1..5], state only
TRAIN_CONFIG_KEYS = I32_TRAIN + ["seed"] + F32_TRAIN
assert [f.name for f in dataclasses.fields(M.Config)] == CONFIG_KEYS, \
    "dev/model.py's Config fields no longer match the checkpoint header"

# check: largest accepted |C loss - PyTorch loss|, relative to the PyTorch loss. The C model
# computes in float32 with its own summation orders (16 partial sums, blocked GEMMs) and a
# polynomial exp within 2 ulp; a few layers of such rounding move the mean CE by ~1e-7..1e-6
# relative, and the printed loss (%.6f) adds at most 5e-7 absolute. 1e-5 leaves ~10x headroom
# over that noise, while a real disagreement (a tensor read in the wrong order or transposed, a
# wrong RoPE pairing, GQA mapping, router or expert choice) moves the loss far more. PRINT_ABS
# allows the %.6f rounding on its own, which matters only for losses below 0.05.
REL_TOL = 1e-5
PRINT_ABS = 5e-7


# Bad input: the CLI prints it as one line 'error: ...' and exits 1 (prepro_pile's UserError).
ConvertError = UserError


# ---- checks mirrored from train_unipool.c -----------------------------------------------------

def config_error(c):
    """train_unipool.c's config_error(): None if the configuration is usable, else what is wrong."""
    if (c["Vp"] > (1 << 24) or c["L"] > 1024 or c["C"] > (1 << 16) or c["F"] > (1 << 20) or
            c["maxT"] > (1 << 16) or c["G"] > 1024 or c["E"] > (1 << 16)):
        return ("a size is beyond this program's bounds (Vp 2^24, L 1024, C 2^16, F 2^20, maxT 2^16, "
                "G 1024, E 2^16)")
    if c["V"] < 1 or c["Vp"] < c["V"]:
        return "need 1 <= V <= Vp"
    if c["L"] < 1 or c["C"] < 1 or c["F"] < 1 or c["maxT"] < 1:
        return "L, C, F and maxT must be positive"
    if c["NH"] < 1 or c["NKV"] < 1 or c["NH"] % c["NKV"]:
        return "NH must be a multiple of NKV"
    hd = c["C"] // c["NH"]
    if c["C"] % c["NH"] or hd % 2 or hd > 1024:
        return "C / NH (the head size) must be an even whole number <= 1024"
    if c["G"] < 1 or c["L"] % c["G"]:
        return "the number of pools G must divide L"
    if c["E"] < 1 or c["K"] < 1 or c["K"] > c["E"]:
        return "need 1 <= K <= E"
    if c["router"] not in (0, 1, 2):
        return "router must be 0, 1 or 2"
    if c["aux"] < 0 or c["aux"] > 3:
        return "aux must be 0..3"
    if c["router"] == 2 and c["aux"] != 0:
        return "the sigmoid router balances with its expert bias, not an aux loss (aux must be none)"
    if not (0.0 <= c["bias_rate"] <= 1.0):
        return "the expert bias rate must be in [0, 1]"
    if (not (c["norm_eps"] > 0) or not (c["rope_theta"] > 0) or not (c["router_eps"] >= 0) or
            not (c["router_c"] > 0) or not math.isfinite(c["norm_eps"] + c["rope_theta"] + c["router_eps"] + c["router_c"])):
        return "norm_eps, rope_theta and router_c must be > 0, router_eps >= 0, all finite"
    if not (0.0 <= c["alpha"] <= 1e3):
        return "the aux coefficient alpha must be in [0, 1000]"
    return None


def _f32(x):
    return float(np.float32(x))


def train_config_error(t):
    """train_unipool.c's train_config_error(): None if the flags could have set the training
    configuration, else what is wrong."""
    if not (1 <= t["B"] <= 1 << 20 and 1 <= t["T"] <= 1 << 20 and 1 <= t["n_micro"] <= 1 << 20):
        return "B, T and the micro-batches per step must be in [1, 2^20]"
    if t["B"] * t["T"] > 1 << 24:
        return "B * T must be at most 2^24 tokens"
    if (t["steps"] < 1 or t["warmup"] < 0 or t["val_every"] < 0 or t["val_batches"] < 1 or t["sample_every"] < 0 or
            not 1 <= t["gen_tokens"] <= 1 << 20 or t["ckpt_every"] < -1 or not 1 <= t["keep"] <= 1 << 20):
        return ("need steps, val batches, sample tokens (<= 2^20) and checkpoints kept (<= 2^20) >= 1, the intervals "
                "and warmup >= 0")
    if t["seed"] > 2**31 - 1:
        return "the seed must be in [0, 2^31 - 1]"
    if not (0 <= t["lr"] <= 10 and 0 <= t["b1"] <= _f32(0.999999) and 0 <= t["b2"] <= _f32(0.999999) and
            _f32(1e-30) <= t["eps"] <= 1 and 0 <= t["wd"] <= 10 and 0 <= t["clip"] <= 1e9 and 0 <= t["lr_floor"] <= 1):
        return ("the optimizer settings must be in the flags' ranges (lr [0, 10], betas [0, 0.999999], eps [1e-30, 1], "
                "wd [0, 10], clip [0, 1e9], lr floor [0, 1])")
    return None


def damaged(path, why):
    return ConvertError("checkpoint '%s' is damaged: %s; use an earlier checkpoint" % (path, why))


def header_error(h, h64, raw, has_state, cfg, train):
    """The field checks of train_unipool.c's checkpoint_header() after the configuration's: None, or
    what is damaged."""
    err = train_config_error(train)
    if err:
        return "a bad training configuration (%s)" % err
    if train["T"] > cfg["maxT"]:
        return "its T %d exceeds its maxT %d" % (train["T"], cfg["maxT"])
    step, adam_t, valid = h[I32_STEP], h[I32_ADAM_T], h[I32_PREV_VALID]
    if has_state:
        if not 0 <= step <= train["steps"]:
            return "its step %d is outside [0, %d], the steps of its run" % (step, train["steps"])
        if not 0 <= adam_t <= step:
            return "its AdamW step count %d is outside [0, %d], the steps done" % (adam_t, step)
        if valid not in (0, 1):
            return "its stale-statistic flag is %d, not 0 or 1" % valid
        rows = float(step) * train["B"] * train["n_micro"]
        if h64[1] > rows:
            return "its loader epoch %d is more than the %.0f rows its %d steps read" % (h64[1], rows, step)
    o32, o64 = N_I32 * 4, N_I32 * 4 + N_F32 * 4
    zero = [(30 * 4, o32), (o32 + 4 * (F32_BIAS_RATE + 1), o64), (o64 + 8 * (1 + len(U64_STATE)), HEADER_BYTES)]
    if not has_state:
        zero += [(4 * I32_STEP, 4 * (I32_PREV_VALID + 1)), (o64 + 8, o64 + 8 * (1 + len(U64_STATE)))]
    for a, b in zero:
        nz = [i for i in range(a, b) if raw[i]]
        if nz:
            return ("byte %d of its header, in words it leaves 0 (or in the state words of a file without the training "
                    "state), is not 0" % nz[0])
    for i in range(len(PATH_KEYS) if len(raw) > HEADER_BYTES else 0):
        field = raw[HEADER_BYTES + i * PATH_BYTES:HEADER_BYTES + (i + 1) * PATH_BYTES]
        n = field.find(b"\0")
        if n < 0 or any(field[n:]):
            return "data path %d of its path block is not a NUL-terminated, zero-padded string" % i
    return None


def make_config(cfg_dict):
    return M.Config(**cfg_dict)


def checkpoint_size(cfg_dict, has_state, paths=False):
    """Bytes of a checkpoint: header (with paths, version 2's path block), parameters, the (L, E)
    expert bias with the sigmoid router, and with the state m, v and the (L, E) statistic."""
    P = M.num_params(make_config(cfg_dict))
    LE = cfg_dict["L"] * cfg_dict["E"]
    return (HEADER_BYTES + (PATHS_BYTES if paths else 0) + 4 * P * (3 if has_state else 1) + (4 * LE if cfg_dict["router"] == 2 else 0) +
            (4 * LE if has_state else 0))


# ---- reading ------------------------------------------------------------------------------------

def read_checkpoint(path, warn=True):
    """Reads and checks a checkpoint as train_unipool.c's checkpoint_header() and
    checkpoint_read_body() do. Returns a dict: version, config, train, has_state, params (float32
    numpy, buffer order), with version 2 paths ({"train", "val", "tokenizer"}: str), with the
    sigmoid router expert_bias ((L, E)), and with the state step, adam_t, prev_valid, adam_m,
    adam_v, prev_f ((L, E))."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            short = ConvertError("checkpoint '%s' is shorter than its header; it is truncated, use an earlier "
                                 "checkpoint" % path)
            if len(raw) != HEADER_BYTES:
                raise short
            h = struct.unpack_from("<%di" % N_I32, raw, 0)
            hp = struct.unpack_from("<%df" % N_F32, raw, N_I32 * 4)
            h64 = struct.unpack_from("<%dQ" % N_U64, raw, N_I32 * 4 + N_F32 * 4)
            if h[0] != magic("CKPT_MAGIC"):
                raise ConvertError("'%s' is not a unipool checkpoint (magic %d, want %d)"
                                   % (path, h[0], magic("CKPT_MAGIC")))
            version = h[1]
            if version not in (magic("CKPT_VERSION"), magic("CKPT_VERSION_1")):
                raise ConvertError("checkpoint '%s' has version %d; this program reads versions %d and %d"
                                   % (path, version, magic("CKPT_VERSION_1"), magic("CKPT_VERSION")))
            if version == magic("CKPT_VERSION"):
                raw += f.read(PATHS_BYTES)
                if len(raw) != HEADER_BYTES + PATHS_BYTES:
                    raise short
            if h[2] not in (0, 1):
                raise damaged(path, "its training-state flag is %d, not 0 or 1" % h[2])
            has_state = h[2] == 1
            cfg = dict(zip(I32_CONFIG, h[3:3 + len(I32_CONFIG)]))
            cfg.update(zip(F32_CONFIG, hp[0:len(F32_CONFIG)]))
            cfg["bias_rate"] = hp[F32_BIAS_RATE]
            err = config_error(cfg)
            if err:
                raise damaged(path, "a bad model configuration (%s)" % err)
            train = dict(zip(I32_TRAIN, h[16:16 + len(I32_TRAIN)]))
            train["seed"] = h64[U64_SEED]
            train.update(zip(F32_TRAIN, hp[5:5 + len(F32_TRAIN)]))
            err = header_error(h, h64, raw, has_state, cfg, train)
            if err:
                raise damaged(path, err)
            want = checkpoint_size(cfg, has_state, version == magic("CKPT_VERSION"))
            if size != want:
                raise ConvertError("checkpoint '%s' is %d bytes, its header implies %d; it is truncated or "
                                   "damaged, use an earlier one" % (path, size, want))
            P = M.num_params(make_config(cfg))
            LE = cfg["L"] * cfg["E"]
            ck = {"version": version, "config": cfg, "train": train, "has_state": has_state,
                  "params": np.frombuffer(f.read(4 * P), dtype="<f4").astype(np.float32)}
            if version == magic("CKPT_VERSION"):
                ck["paths"] = {k: raw[HEADER_BYTES + i * PATH_BYTES:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                               for i, k in enumerate(PATH_KEYS)}
            if cfg["router"] == 2:
                ck["expert_bias"] = np.frombuffer(f.read(4 * LE), dtype="<f4").astype(np.float32).reshape(
                    cfg["L"], cfg["E"])
            if has_state:
                train.update(zip(U64_STATE, h64[1:1 + len(U64_STATE)]))
                ck["step"], ck["adam_t"], ck["prev_valid"] = h[I32_STEP], h[I32_ADAM_T], h[I32_PREV_VALID]
                ck["adam_m"] = np.frombuffer(f.read(4 * P), dtype="<f4").astype(np.float32)
                ck["adam_v"] = np.frombuffer(f.read(4 * P), dtype="<f4").astype(np.float32)
                ck["prev_f"] = np.frombuffer(f.read(4 * LE), dtype="<f4").astype(np.float32).reshape(
                    cfg["L"], cfg["E"])
    except OSError as e:
        raise ConvertError("cannot read checkpoint '%s': %s" % (path, e.strerror or e))
    E = cfg["E"]
    bad = np.flatnonzero(~np.isfinite(ck.get("expert_bias", np.zeros(1))))
    if bad.size:
        raise damaged(path, "its expert bias at layer %d, expert %d is %g"
                      % (bad[0] // E, bad[0] % E, ck["expert_bias"].flat[bad[0]]))
    bad = np.flatnonzero(~((ck.get("prev_f", np.zeros(1)) >= 0) & (ck.get("prev_f", np.zeros(1)) <= 1)))
    if bad.size:
        raise damaged(path, "its stale pool statistic at layer %d, expert %d is %g, not a fraction in [0, 1]"
                      % (bad[0] // E, bad[0] % E, ck["prev_f"].flat[bad[0]]))
    if warn and has_state and ck["prev_valid"] == 0 and ck["prev_f"].any():
        # the C reader takes it (and ignores it); it does not survive a conversion
        print("warning: checkpoint '%s' holds a non-zero stale statistic marked invalid; it is not converted"
              % path, file=sys.stderr)
    return ck


def build_model(ck, dtype):
    """The dev/model.py model of a checkpoint, its parameters and expert bias loaded, prev_f set from the
    stale statistic."""
    m = M.UniPool(make_config(ck["config"]), dtype=dtype)
    M.load_params(m, torch.from_numpy(ck["params"]))
    if "expert_bias" in ck:
        m.expert_bias = torch.from_numpy(ck["expert_bias"].copy())
    if ck["has_state"] and ck["prev_valid"]:
        m.prev_f = torch.from_numpy(ck["prev_f"]).to(dtype)
    return m


# ---- to-torch -----------------------------------------------------------------------------------

def to_torch(ck):
    """The torch-file dict of a checkpoint read by read_checkpoint()."""
    model = build_model(ck, torch.float32)
    out = {"config": dict(ck["config"]), "state_dict": model.state_dict(), "train": dict(ck["train"])}
    if "paths" in ck:
        out["paths"] = dict(ck["paths"])
    if "expert_bias" in ck:
        out["expert_bias"] = model.expert_bias
    if ck["has_state"]:
        out["adam_m"] = torch.from_numpy(ck["adam_m"].copy())
        out["adam_v"] = torch.from_numpy(ck["adam_v"].copy())
        out["adam_t"] = int(ck["adam_t"])
        out["step"] = int(ck["step"])
        out["prev_f"] = torch.from_numpy(ck["prev_f"].copy()) if ck["prev_valid"] else None
    return out


# ---- to-ckpt ------------------------------------------------------------------------------------

def _float_tensor(x, what, shape, path):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConvertError("'%s': %s is not a float tensor" % (path, what))
    if tuple(x.shape) != tuple(shape):
        raise ConvertError("'%s': %s has shape %s, the config implies %s" % (path, what, tuple(x.shape), tuple(shape)))
    return x.detach().to("cpu", torch.float32).contiguous()


def checkpoint_bytes(d, path="IN.pt"):
    """A checkpoint (bytes) from a torch-file dict as to_torch() makes it."""
    if not isinstance(d, dict) or "config" not in d or "state_dict" not in d:
        raise ConvertError("'%s' is not a torch file written by convert.py to-torch (no config / state_dict)" % path)
    cfg = d["config"]
    if not isinstance(cfg, dict) or set(cfg) != set(CONFIG_KEYS):
        raise ConvertError("'%s': config must hold exactly the fields %s" % (path, " ".join(CONFIG_KEYS)))
    err = config_error(cfg)
    if err:
        raise ConvertError("'%s' holds a bad configuration (%s)" % (path, err))
    shapes = M.param_shapes(make_config(cfg))
    sd = d["state_dict"]
    extra = sorted(set(sd) - {name for name, _ in shapes})
    if extra:
        raise ConvertError("'%s': state_dict has tensors the model does not: %s" % (path, ", ".join(extra)))
    for name, _ in shapes:
        if name not in sd:
            raise ConvertError("'%s': state_dict lacks %s" % (path, name))
    params = torch.cat([_float_tensor(sd[name], name, shape, path).reshape(-1) for name, shape in shapes])
    P = params.numel()
    L, E = cfg["L"], cfg["E"]
    if ("expert_bias" in d) != (cfg["router"] == 2):
        raise ConvertError("'%s': expert_bias goes with the sigmoid router (router 2) and only with it; router is %d"
                           % (path, cfg["router"]))
    has_state = "adam_m" in d
    train = dict(d.get("train") or {})
    missing = [k for k in TRAIN_CONFIG_KEYS if k not in train]
    if missing:
        # B and T as check and infer_unipool take them without -b/-t; for the rest values the
        # reader accepts (the training program's defaults, one step, no schedule)
        defaults = dict(B=2, T=min(64, cfg["maxT"]), n_micro=1, steps=1, warmup=0, val_every=0, val_batches=1,
                        sample_every=0, gen_tokens=1, ckpt_every=0, keep=1, seed=0, lr=0.0, b1=0.9, b2=0.999,
                        eps=1e-8, wd=0.0, clip=1.0, lr_floor=0.1)
        train = {**defaults, **train}
        print("warning: '%s' lacks the training configuration field(s) %s; they are written as %s"
              % (path, " ".join(missing), ", ".join("%s %s" % (k, defaults[k]) for k in missing)), file=sys.stderr)
    if has_state:
        for key in ["adam_v", "adam_t", "step", "prev_f"]:
            if key not in d:
                raise ConvertError("'%s' has adam_m but no %s" % (path, key))
        for key in U64_STATE:
            if key not in train:
                raise ConvertError("'%s' has optimizer state but train lacks %s" % (path, key))
    unknown = sorted(set(train) - set(TRAIN_CONFIG_KEYS + U64_STATE))
    if unknown:
        raise ConvertError("'%s': train has unknown fields %s" % (path, ", ".join(unknown)))

    paths = d.get("paths")
    if paths is not None:
        if not isinstance(paths, dict) or set(paths) != set(PATH_KEYS) or not all(isinstance(v, str) for v in paths.values()):
            raise ConvertError("'%s': paths must map exactly %s to strings" % (path, " ".join(PATH_KEYS)))
        block = [paths[k].encode("utf-8", "surrogateescape") for k in PATH_KEYS]
        if any(len(b) >= PATH_BYTES or b"\0" in b for b in block):
            raise ConvertError("'%s': a path is longer than %d bytes or holds a NUL" % (path, PATH_BYTES - 1))
    h, hp, h64 = [0] * N_I32, [0.0] * N_F32, [0] * N_U64
    h[0], h[2] = magic("CKPT_MAGIC"), int(has_state)
    h[1] = magic("CKPT_VERSION") if paths is not None else magic("CKPT_VERSION_1")  # no paths: version 1
    h[3:3 + len(I32_CONFIG)] = [cfg[k] for k in I32_CONFIG]
    hp[0:len(F32_CONFIG)] = [cfg[k] for k in F32_CONFIG]
    h[16:16 + len(I32_TRAIN)] = [train.get(k, 0) for k in I32_TRAIN]
    hp[5:5 + len(F32_TRAIN)] = [train.get(k, 0.0) for k in F32_TRAIN]
    hp[F32_BIAS_RATE] = cfg["bias_rate"]
    h64[U64_SEED] = train.get("seed", 0)
    body = [params]
    if "expert_bias" in d:
        body.append(_float_tensor(d["expert_bias"], "expert_bias", (L, E), path).reshape(-1))
    if has_state:
        h[I32_STEP], h[I32_ADAM_T] = d["step"], d["adam_t"]
        h[I32_PREV_VALID] = int(d["prev_f"] is not None)
        h64[1:1 + len(U64_STATE)] = [train[k] for k in U64_STATE]
        prev = (torch.zeros(L, E) if d["prev_f"] is None else _float_tensor(d["prev_f"], "prev_f", (L, E), path))
        body += [_float_tensor(d["adam_m"], "adam_m", (P,), path), _float_tensor(d["adam_v"], "adam_v", (P,), path),
                 prev.reshape(-1)]
    try:
        head = (struct.pack("<%di" % N_I32, *h) + struct.pack("<%df" % N_F32, *hp) +
                struct.pack("<%dQ" % N_U64, *h64))
        if paths is not None:
            head += b"".join(b.ljust(PATH_BYTES, b"\0") for b in block)
    except (struct.error, TypeError) as e:
        raise ConvertError("'%s': a header field does not fit its type (%s)" % (path, e))
    # what the C reader would refuse is not written: its checks on the values as stored
    hp32 = struct.unpack_from("<%df" % N_F32, head, N_I32 * 4)
    stored = dict(zip(I32_TRAIN, h[16:16 + len(I32_TRAIN)]), seed=h64[U64_SEED])
    stored.update(zip(F32_TRAIN, hp32[5:5 + len(F32_TRAIN)]))
    err = header_error(h, h64, head, has_state, cfg, stored)
    if err:
        raise ConvertError("'%s' would make a damaged checkpoint: %s" % (path, err))
    return [head] + [t.numpy().astype("<f4").tobytes() for t in body]


def load_torch_file(path):
    try:
        return torch.load(path, map_location="cpu")
    except OSError as e:
        raise ConvertError("cannot read '%s': %s" % (path, e.strerror or e))
    except Exception as e:  # torch raises many kinds on a foreign file
        raise ConvertError("'%s' is not a torch file (%s)" % (path, str(e).splitlines()[0] if str(e) else type(e).__name__))


def model_from_torch(d, dtype, path="IN.pt"):
    """The dev/model.py model of a to-torch dict (parameters and expert bias), in dtype."""
    m = M.UniPool(make_config(d["config"]), dtype=dtype)
    with torch.no_grad():
        for name, p in m.ordered_params():
            p.copy_(d["state_dict"][name])
    if "expert_bias" in d:
        m.expert_bias = d["expert_bias"].to(torch.float32).clone()
    return m


# ---- check --------------------------------------------------------------------------------------

def read_batch(pattern, B, T, V):
    """The first B rows of T+1 tokens of the shards matching pattern, in file order, as
    infer_unipool reads them (train_unipool.c: shard_header, loader_init, loader_next).
    Returns inputs, targets (B, T) int64."""
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else ([pattern] if os.path.exists(pattern) else [])
    if not files:
        raise ConvertError("no files match '%s'" % pattern)
    shards = []
    for path in files:
        try:
            with open(path, "rb") as f:
                raw = f.read(1024)
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise ConvertError("cannot read shard '%s': %s" % (path, e.strerror or e))
        if len(raw) != 1024:
            raise ConvertError("shard '%s' is shorter than its 1024-byte header" % path)
        h = struct.unpack("<256i", raw)
        if h[0] != magic("SHARD_MAGIC"):
            raise ConvertError("'%s' is not a token shard (magic %d, want %d)" % (path, h[0], magic("SHARD_MAGIC")))
        if h[1] not in (magic("SHARD_VERSION_U16"), magic("SHARD_VERSION_U32")):
            raise ConvertError("shard '%s' has version %d" % (path, h[1]))
        if h[2] < 0:
            raise ConvertError("shard '%s' has a negative token count" % path)
        width = 2 if h[1] == magic("SHARD_VERSION_U16") else 4
        if size != 1024 + h[2] * width:
            raise ConvertError("shard '%s' is %d bytes, its header says %d" % (path, size, 1024 + h[2] * width))
        vocab = h[3] or magic("GPT2_VOCAB")  # slot 3: the shard's vocabulary size, 0 for GPT-2's
        if vocab != V:
            raise ConvertError("shard '%s' has a vocabulary of %d tokens, the checkpoint one of %d; pass shards made "
                               "with the same prepro_pile.py --vocab" % (path, vocab, V))
        if h[2] < T + 1:
            raise ConvertError("shard '%s' holds %d tokens, fewer than one row of T+1 = %d" % (path, h[2], T + 1))
        shards.append((path, h[2], width))
    if sum((count - 1) // T for _, count, _ in shards) < B:
        raise ConvertError("the shards hold fewer than one batch of %d rows of T+1 = %d tokens" % (B, T + 1))
    rows = []
    for path, count, width in shards:
        tok = np.fromfile(path, dtype="<u2" if width == 2 else "<u4", offset=1024).astype(np.int64)
        if (tok >= V).any():
            raise ConvertError("shard '%s': token %d is >= the vocabulary size %d" % (path, tok.max(), V))
        for r in range((count - 1) // T):
            if len(rows) == B:
                break
            rows.append(tok[r * T:r * T + T + 1])
    rows = torch.from_numpy(np.stack(rows))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def torch_loss(model, inputs, targets):
    """Mean CE of one batch, evaluation mode; the stale statistic must come back untouched."""
    before = model.prev_f
    with torch.no_grad():
        ce = float(model(inputs, targets, train=False).ce)
    assert model.prev_f is before, "an evaluation pass changed the stale statistic"
    return ce


def c_loss(ckpt, shard, B, T):
    if not os.access(INFER, os.X_OK):
        raise ConvertError("%s is not built; run make in %s" % (INFER, ROOT))
    cmd = [INFER, "eval", "-c", ckpt, "-i", shard, "-b", str(B), "-t", str(T), "-n", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.startswith("error")]
    if r.returncode != 0:
        raise ConvertError("infer_unipool failed (exit %d): %s" % (r.returncode, lines[-1] if lines else r.stderr.strip()[-300:]))
    m = re.search(r"loss (\S+), perplexity", r.stdout)
    if not m:
        raise ConvertError("cannot find the loss in infer_unipool's output: %r" % r.stdout[-300:])
    return float(m.group(1))


def check(ckpt, shard, B=2, T=None, out=None):
    """Compares the PyTorch losses (float64, float32) of the first batch with infer_unipool's.
    Returns (ok, {"c": loss, "float64": loss, "float32": loss, "rel64": ..., "rel32": ...})."""
    out = out or sys.stdout
    ck = read_checkpoint(ckpt)
    cfg = ck["config"]
    if T is None:
        T = ck["train"]["T"] if ck["train"]["T"] > 0 else 64
    if B < 1 or T < 1:
        raise ConvertError("-b and -t must be positive")
    if T > cfg["maxT"]:
        raise ConvertError("-t %d exceeds the model's maxT %d" % (T, cfg["maxT"]))
    inputs, targets = read_batch(shard, B, T, cfg["V"])
    res = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        res[name] = torch_loss(build_model(ck, dtype), inputs, targets)
    res["c"] = c_loss(ckpt, shard, B, T)
    ok = True
    print("check %s on %s: first batch of %d x %d tokens" % (ckpt, shard, B, T), file=out)
    print("  infer_unipool (C, float32)  loss %.6f" % res["c"], file=out)
    for name in ("float64", "float32"):
        ref = res[name]
        rel = abs(res["c"] - ref) / abs(ref) if ref != 0 else (0.0 if res["c"] == 0 else math.inf)
        good = abs(res["c"] - ref) <= REL_TOL * abs(ref) + PRINT_ABS  # False for NaN
        res["rel" + name[-2:]] = rel
        ok = ok and good
        print("  PyTorch %s             loss %.9f  relative difference %.2e  %s"
              % (name, ref, rel, "ok" if good else "TOO LARGE"), file=out)
    print("%s (tolerance %g relative)" % ("OK" if ok else "FAIL", REL_TOL), file=out)
    return ok, res


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="dev/convert.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("to-torch", help="checkpoint -> torch file")
    p.add_argument("ckpt")
    p.add_argument("out")
    p = sub.add_parser("to-ckpt", help="torch file -> checkpoint")
    p.add_argument("pt")
    p.add_argument("out")
    p = sub.add_parser("check", help="PyTorch loss vs infer_unipool's on the first batch")
    p.add_argument("ckpt")
    p.add_argument("shard")
    p.add_argument("-b", type=int, default=2, help="rows [2]")
    p.add_argument("-t", type=int, default=None, help="sequence length [the checkpoint's T, or 64]")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "to-torch":
            ck = read_checkpoint(a.ckpt)
            d = to_torch(ck)
            try:
                torch.save(d, a.out)
            except OSError as e:
                raise ConvertError("cannot write '%s': %s" % (a.out, e.strerror or e))
            print("%s -> %s (%s)" % (a.ckpt, a.out, "with training state" if ck["has_state"] else "parameters only"))
        elif a.cmd == "to-ckpt":
            d = load_torch_file(a.pt)
            write_file(a.out, checkpoint_bytes(d, a.pt))
            print("%s -> %s (%s)" % (a.pt, a.out, "with training state" if "adam_m" in d else "parameters only"))
        else:
            ok, _ = check(a.ckpt, a.shard, a.b, a.t)
            return 0 if ok else 1
    except ConvertError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
