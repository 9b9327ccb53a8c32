#!/usr/bin/env python3
"""Tests of dev/convert.py against the C programs: for a vanilla MoE, a UniPool
model with the NormRouter, top-2 grouped pools (L 4, G 2) and a top-2 vanilla
MoE with the sigmoid router and its expert bias, each trained for a few steps
by ./train_unipool,
  - `convert.py check` passes (PyTorch float64/float32 vs ./infer_unipool),
  - ckpt -> pt -> ckpt is byte-identical,
  - the parameters of the torch file give the same PyTorch loss as the checkpoint,
  - a parameters-only checkpoint made from the torch file is accepted by
    ./infer_unipool with the same loss and round-trips byte-identically,
  - the torch file holds the data paths the run trained with (version 2),
  - the same state written as version 1 (no path block) loads in ./infer_unipool
    with the same loss and round-trips byte-identically as version 1,
  - truncated checkpoints and foreign files get one line 'error: ...' naming
    the file and exit status 1 (the same message as the C reader's for a
    truncated checkpoint, and for damaged header fields);
and, without the C programs, for sigmoid-router checkpoints written here in
the documented format (parameters-only and with the training state): the
expert bias and bias_rate reach the torch file and the model, the round trip
is byte-identical, and a file without its bias section or a torch file with
the bias on the wrong router gets a one-line error. A ./train_unipool without
-R sigmoid fails the test with a message saying so.

    /usr/bin/python3 dev/test_convert.py      (from anywhere, after make)

Needs torch and numpy, the built programs and data/sotu (make data).
"""
import contextlib
import glob
import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "train_unipool")
INFER = os.path.join(ROOT, "infer_unipool")
CONVERT = os.path.join(HERE, "convert.py")
TRAIN_SHARDS = os.path.join(ROOT, "data", "sotu", "sotu_train_*.bin")
VAL_SHARD = os.path.join(ROOT, "data", "sotu", "sotu_val_000000.bin")

for prog in (TRAIN, INFER):
    if not os.access(prog, os.X_OK):
        print("error: %s is not built; run make in %s first" % (prog, ROOT), file=sys.stderr)
        sys.exit(1)
if not os.path.exists(VAL_SHARD) or not glob.glob(TRAIN_SHARDS):
    print("error: the default corpus (%s) is missing; run make data" % os.path.dirname(VAL_SHARD), file=sys.stderr)
    sys.exit(1)

sys.path.insert(0, HERE)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import convert  # noqa: E402
import model as M  # noqa: E402

# Tiny models. Trained long enough that most tensors have moved clearly from their init (a
# misplaced tensor then moves the loss far beyond check's tolerance), but not so long that the
# NormRouter under the pool loss drives every score to 0 (it does within ~20 steps at lr 3e-3
# at this size), which would leave the routers and experts out of the comparison.
COMMON = ["-C", "32", "-NH", "2", "-NKV", "1", "-F", "32", "-t", "32", "-b", "2", "-w", "2", "-v", "0",
          "-S", "0", "-K", "0", "-T", "1", "-i", TRAIN_SHARDS, "-j", VAL_SHARD]
CASES = [  # name, flags, steps
    ("vanilla", ["-L", "2", "-o", "layer", "-e", "4", "-l", "1e-2"], 30),
    ("unipool-norm", ["-L", "2", "-o", "pool", "-R", "norm", "-e", "8", "-l", "1e-3"], 10),
    ("grouped-top2", ["-L", "4", "-g", "2", "-k", "2", "-e", "4", "-l", "1e-3"], 8),
    # a bias rate of 1e-2 moves choices within the few steps
    ("sigmoid-top2", ["-L", "2", "-o", "layer", "-R", "sigmoid", "-br", "1e-2", "-k", "2", "-e", "4",
                      "-l", "1e-2"], 12),
]
SIGMOID = "sigmoid-top2"
PY = sys.executable
JOBS = max(2, os.cpu_count() or 2)
failures = []


def check(name, ok, detail=""):
    print(("OK     " if ok else "NOT OK ") + name + ("" if ok else ": " + detail), flush=True)
    if not ok:
        failures.append(name)


def run_all(cmds):
    """Runs commands, JOBS at a time; returns their CompletedProcess in order."""
    with ThreadPoolExecutor(JOBS) as ex:
        return list(ex.map(lambda c: subprocess.run(c, capture_output=True, text=True, timeout=300), cmds))


def one_line_error(r, path):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return (r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0],
            "exit %d, stderr %r" % (r.returncode, r.stderr[-400:]))


def eval_loss(r):
    m = re.search(r"loss (\S+), perplexity", r.stdout)
    return m.group(1) if r.returncode == 0 and m else "exit %d: %s" % (r.returncode, r.stderr.strip()[-300:])


def infer_cmd(ckpt):
    return [INFER, "eval", "-c", ckpt, "-i", VAL_SHARD, "-b", "2", "-t", "32", "-n", "1"]


def cli(argv):
    """convert.py ARGV run in this process (torch loads once): a CompletedProcess with its exit status
    and output. The CLI section at the end runs a few of the same as real processes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert.main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def quiet(argv):
    return cli(argv).returncode


class Case:
    def __init__(self, tmp, idx, name, flags, steps):
        self.idx, self.name, self.steps = idx, name, steps
        self.dir = os.path.join(tmp, name)
        self.train_cmd = [TRAIN] + COMMON + flags + ["-n", str(steps), "-O", self.dir]

    def path(self, name):
        return os.path.join(self.dir, name)

    def prepare(self, r_train):
        """After training: the checkpoint, a truncated copy (a different cut per case), a junk file."""
        found = sorted(glob.glob(self.path("ckpt_*.bin")))
        if r_train.returncode != 0 or not found:
            print("error: %s failed: %s" % (" ".join(self.train_cmd), r_train.stderr.strip()[-400:]), file=sys.stderr)
            sys.exit(1)
        self.ckpt = found[-1]
        with open(self.ckpt, "rb") as f:
            self.orig = f.read()
        self.ck = convert.read_checkpoint(self.ckpt)
        # the last case cuts into its expert bias, just before the training state; the second into
        # version 2's path block
        self.cut_at = [len(self.orig) - 1, convert.HEADER_BYTES + convert.PATHS_BYTES // 2,
                       convert.checkpoint_size(self.ck["config"], False, True),
                       convert.checkpoint_size(self.ck["config"], False, True) - 2][self.idx]
        self.cut = self.path("cut.bin")
        with open(self.cut, "wb") as f:
            f.write(self.orig[:self.cut_at])
        self.junk = self.path("junk.pt")
        with open(self.junk, "wb") as f:
            f.write(os.urandom(3000))
        self.foreign_ckpt = [VAL_SHARD, self.junk, CONVERT, self.junk][self.idx]   # not checkpoints
        self.foreign_pt = [self.ckpt, self.junk, VAL_SHARD, CONVERT][self.idx]     # not torch files

    def run(self):
        name = self.name
        r_check = cli(["check", self.ckpt, VAL_SHARD])
        r_pt = cli(["to-torch", self.ckpt, self.path("a.pt")])
        r_tt = cli(["to-torch", self.cut, self.path("x.pt")])
        r_chk = cli(["check", self.cut, VAL_SHARD])
        r_ft = cli(["to-torch", self.foreign_ckpt, self.path("y.pt")])
        r_fc = cli(["to-ckpt", self.foreign_pt, self.path("z.bin")])
        r_c, r_eval = run_all([[INFER, "eval", "-c", self.cut, "-i", VAL_SHARD], infer_cmd(self.ckpt)])
        rel = re.findall(r"PyTorch (float\d\d) +loss (\S+) +relative difference (\S+)", r_check.stdout)
        c_line = re.search(r"\(C, float32\) +loss (\S+)", r_check.stdout)
        check(name + ": check passes", r_check.returncode == 0 and len(rel) == 2, r_check.stdout + r_check.stderr)
        for dt, loss, rd in rel:
            print("         C %s, PyTorch %s %s, relative difference %s"
                  % (c_line.group(1) if c_line else "?", dt, loss, rd))
        check(name + ": to-torch", r_pt.returncode == 0, r_pt.stderr)
        pt, back = self.path("a.pt"), self.path("back.bin")
        rc = quiet(["to-ckpt", pt, back])
        same = rc == 0 and open(back, "rb").read() == self.orig
        check(name + ": ckpt -> pt -> ckpt is byte-identical", same)

        # the torch file's parameters against the checkpoint's, through the PyTorch model
        ck = self.ck
        d = torch.load(pt)
        x, y = convert.read_batch(VAL_SHARD, 2, 32, ck["config"]["V"])
        for dtype in (torch.float64, torch.float32):
            a = convert.torch_loss(convert.build_model(ck, dtype), x, y)
            b = convert.torch_loss(convert.model_from_torch(d, dtype), x, y)
            check("%s: the torch file's parameters give the checkpoint's PyTorch loss (%s)" % (name, dtype),
                  a == b, "%r vs %r" % (a, b))
        L, E = ck["config"]["L"], ck["config"]["E"]
        check(name + ": the torch file holds the training state",
              d["step"] == self.steps and d["adam_t"] == self.steps and d["adam_m"].shape == (len(ck["params"]),)
              and d["adam_v"].dtype == torch.float32 and d["prev_f"] is not None and d["prev_f"].shape == (L, E)
              and d["train"]["T"] == 32 and d["train"]["row"] == ck["train"]["row"]
              and torch.equal(d["prev_f"], torch.from_numpy(ck["prev_f"])),
              str({k: d[k] for k in ("step", "adam_t")}))
        if ck["config"]["router"] == 2:
            bias = d.get("expert_bias")
            check(name + ": the torch file holds the moved expert bias and bias_rate",
                  bias is not None and bias.dtype == torch.float32 and bias.shape == (L, E) and
                  torch.equal(bias, torch.from_numpy(ck["expert_bias"])) and bool(bias.abs().max() > 0) and
                  d["config"]["bias_rate"] == float(np.float32(1e-2)), repr(bias))
            unbiased = convert.build_model(ck, torch.float64)
            unbiased.expert_bias.zero_()
            a, b = convert.torch_loss(convert.build_model(ck, torch.float64), x, y), convert.torch_loss(unbiased, x, y)
            check(name + ": the bias moves choices in the batch check compares", a != b, "%r vs %r" % (a, b))

        check(name + ": the torch file holds the data paths the run trained with",
              d.get("paths", {}).get("train") == TRAIN_SHARDS and d["paths"]["val"] == VAL_SHARD, str(d.get("paths")))
        if self.idx == 0:
            self.version1(r_eval)
            self.damaged()

        # a parameters-only checkpoint from the torch file: the C program reads it, same loss; round trip
        po_pt, po_ckpt, po_pt2, po_back = (self.path(n) for n in ("po.pt", "po.bin", "po2.pt", "po2.bin"))
        torch.save({"config": d["config"], "state_dict": d["state_dict"],
                    "train": {k: d["train"][k] for k in convert.TRAIN_CONFIG_KEYS},
                    **({"expert_bias": d["expert_bias"]} if "expert_bias" in d else {})}, po_pt)
        rc = quiet(["to-ckpt", po_pt, po_ckpt])
        check(name + ": parameters-only checkpoint has the parameters-only size",
              rc == 0 and os.path.getsize(po_ckpt) == convert.checkpoint_size(ck["config"], False))
        l_orig, l_po = eval_loss(r_eval), eval_loss(subprocess.run(infer_cmd(po_ckpt), capture_output=True, text=True))
        check(name + ": infer_unipool gives the same loss on the parameters-only checkpoint", l_orig == l_po,
              "%s vs %s" % (l_orig, l_po))
        rc = quiet(["to-torch", po_ckpt, po_pt2]) or quiet(["to-ckpt", po_pt2, po_back])
        check(name + ": parameters-only round trip is byte-identical",
              rc == 0 and open(po_back, "rb").read() == open(po_ckpt, "rb").read())

        # the stale statistic not yet valid (a run saved before its first micro-batch; the C writer
        # leaves it zero): prev_f None, and back
        if self.idx == 0:
            nv, nv_pt, nv_back = self.path("nv.bin"), self.path("nv.pt"), self.path("nv2.bin")
            LE4 = 4 * L * E
            raw = bytearray(self.orig[:len(self.orig) - LE4] + bytes(LE4))
            raw[4 * convert.I32_PREV_VALID:4 * convert.I32_PREV_VALID + 4] = bytes(4)
            with open(nv, "wb") as f:
                f.write(raw)
            rc = quiet(["to-torch", nv, nv_pt]) or quiet(["to-ckpt", nv_pt, nv_back])
            check(name + ": invalid stale statistic: prev_f None, round trip byte-identical",
                  rc == 0 and torch.load(nv_pt)["prev_f"] is None and open(nv_back, "rb").read() == raw)

        # truncated checkpoints and foreign files
        check(name + ": truncated checkpoint (%d of %d bytes), to-torch: one-line error"
              % (self.cut_at, len(self.orig)), *one_line_error(r_tt, self.cut))
        check(name + ": truncated checkpoint, check: one-line error", *one_line_error(r_chk, self.cut))
        check(name + ": truncated checkpoint: the C reader's message", r_tt.stderr == r_c.stderr,
              "%r vs %r" % (r_tt.stderr, r_c.stderr))
        check(name + ": foreign file %s, to-torch: one-line error" % os.path.basename(self.foreign_ckpt),
              *one_line_error(r_ft, self.foreign_ckpt))
        check(name + ": foreign file %s, to-ckpt: one-line error" % os.path.basename(self.foreign_pt),
              *one_line_error(r_fc, self.foreign_pt))
        check(name + ": no output left behind by failed conversions",
              not any(os.path.exists(self.path(n)) for n in ("x.pt", "y.pt", "z.bin", "z.bin.tmp")))


    def version1(self, r_eval):
        """The same state in version 1 (no path block, no fingerprint): the C program reads it with
        the same loss, and it round-trips byte-identically as version 1."""
        head = bytearray(self.orig[:convert.HEADER_BYTES])
        struct.pack_into("<i", head, 4, convert.magic("CKPT_VERSION_1"))
        struct.pack_into("<Q", head, convert.N_I32 * 4 + convert.N_F32 * 4 + 8 * 5, 0)
        v1 = bytes(head) + self.orig[convert.HEADER_BYTES + convert.PATHS_BYTES:]
        path, pt, back = self.path("v1.bin"), self.path("v1.pt"), self.path("v1.back.bin")
        with open(path, "wb") as f:
            f.write(v1)
        rc = quiet(["to-torch", path, pt]) or quiet(["to-ckpt", pt, back])
        check(self.name + ": version 1: ckpt -> pt (no paths) -> ckpt is byte-identical",
              rc == 0 and "paths" not in torch.load(pt) and open(back, "rb").read() == v1)
        l_v1 = eval_loss(subprocess.run(infer_cmd(path), capture_output=True, text=True))
        check(self.name + ": version 1: infer_unipool gives the version 2 file's loss", l_v1 == eval_loss(r_eval),
              "%s vs %s" % (l_v1, eval_loss(r_eval)))

    def damaged(self):
        """Damaged header fields: to-torch refuses them with the C reader's one-line message."""
        f32, u64 = convert.N_I32 * 4, convert.N_I32 * 4 + convert.N_F32 * 4
        for what, fmt, offset, value in (("state flag 7", "<i", 8, 7), ("alpha -163.84", "<f", f32, -163.84),
                                         ("B 2^24 + 2", "<i", 16 * 4, 2 + (1 << 24)), ("step -5", "<i", 27 * 4, -5),
                                         ("a non-zero unused word", "<Q", u64 + 8 * 20, 1),
                                         ("epoch 2^40", "<Q", u64 + 8, 1 << 40),
                                         ("a path without its NUL", "<1024s", convert.HEADER_BYTES, b"x" * 1024)):
            raw = bytearray(self.orig)
            struct.pack_into(fmt, raw, offset, value)
            path = self.path("damaged.bin")
            with open(path, "wb") as f:
                f.write(raw)
            r_py, r_c = cli(["to-torch", path, self.path("damaged.pt")]), subprocess.run(
                [INFER, "eval", "-c", path, "-i", VAL_SHARD], capture_output=True, text=True)
            ok, detail = one_line_error(r_py, path)
            check("%s: damaged header (%s): to-torch gives the C reader's one-line message" % (self.name, what),
                  ok and "damaged" in r_py.stderr and r_py.stderr == r_c.stderr,
                  detail + " vs C %r" % r_c.stderr)


def cli_section(cases):
    """The command line as a user runs it, in real processes: check, the round trip, and the
    one-line errors with exit status 1."""
    a, b = cases[0], cases[1]
    pt, back = a.path("cli.pt"), a.path("cli.bin")
    r_check, r_pt, r_cut, r_foreign = run_all([
        [PY, CONVERT, "check", b.ckpt, VAL_SHARD, "-b", "3", "-t", "24"],
        [PY, CONVERT, "to-torch", a.ckpt, pt],
        [PY, CONVERT, "to-torch", b.cut, a.path("cli_x.pt")],
        [PY, CONVERT, "to-ckpt", VAL_SHARD, a.path("cli_z.bin")]])
    check("cli: check -b 3 -t 24 exits 0", r_check.returncode == 0 and "OK (tolerance" in r_check.stdout,
          r_check.stdout + r_check.stderr)
    r_back = subprocess.run([PY, CONVERT, "to-ckpt", pt, back], capture_output=True, text=True)
    check("cli: to-torch, to-ckpt: byte-identical", r_pt.returncode == 0 and r_back.returncode == 0 and
          open(back, "rb").read() == a.orig, r_pt.stderr + r_back.stderr)
    check("cli: truncated checkpoint: one line, exit 1", *one_line_error(r_cut, b.cut))
    check("cli: foreign file to to-ckpt: one line, exit 1", *one_line_error(r_foreign, VAL_SHARD))
    other = a.path("v8192_val.bin")  # the val shard, its header naming a vocabulary of 8192
    blob = bytearray(open(VAL_SHARD, "rb").read())
    struct.pack_into("<i", blob, 12, 8192)
    open(other, "wb").write(blob)
    r_vocab = subprocess.run([PY, CONVERT, "check", b.ckpt, other, "-b", "3", "-t", "24"], capture_output=True,
                             text=True)
    ok, detail = one_line_error(r_vocab, other)
    check("cli: check on shards of another vocabulary: one line naming both, exit 1",
          ok and "8192" in r_vocab.stderr and "50257" in r_vocab.stderr, detail + r_vocab.stderr)


HANDMADE_PATHS = [b"/data/t_train_*.bin", b"/data/t_val_*.bin", b""]


def sigmoid_checkpoint(cfg, seed, has_state):
    """A sigmoid-router checkpoint (bytes) written field by field as train_unipool.c documents the
    format, independently of convert.py: header (hp[12] the bias rate), parameters, the (L, E)
    expert bias, and with the state AdamW m, v and a valid stale statistic. With the state it is
    version 2 (the path block after the header), without it version 1. Returns (bytes,
    parameters, bias)."""
    rng = np.random.RandomState(seed)
    P, LE = M.num_params(cfg), cfg.L * cfg.E
    params = (rng.standard_normal(P) / np.sqrt(cfg.C)).astype("<f4")
    bias = (0.5 * rng.standard_normal(LE)).astype("<f4")   # large enough to move choices
    h, hp, h64 = [0] * 256, [0.0] * 64, [0] * 32
    h[0:3] = [convert.magic("CKPT_MAGIC"), convert.magic("CKPT_VERSION" if has_state else "CKPT_VERSION_1"),
              int(has_state)]
    h[3:16] = [cfg.V, cfg.Vp, cfg.maxT, cfg.L, cfg.C, cfg.NH, cfg.NKV, cfg.F, cfg.G, cfg.E, cfg.K, cfg.router,
               cfg.aux]
    h[16:27] = [2, 8, 1, 5, 1, 0, 1, 0, 1, 5, 1]   # B T n_micro steps warmup ... keep
    hp[0:5] = [cfg.alpha, cfg.norm_eps, cfg.rope_theta, cfg.router_c, cfg.router_eps]
    hp[5:12] = [1e-2, 0.9, 0.95, 1e-8, 0.1, 1.0, 0.1]   # lr b1 b2 eps wd clip lr_floor
    hp[12] = cfg.bias_rate
    h64[0] = 1337
    body = [params, bias]
    if has_state:
        h[27:30] = [5, 5, 1]
        h64[1:6] = [0, 1, 7, 12345, 0x0123456789abcdef]   # epoch shard row sampler fingerprint
        body += [rng.standard_normal(P).astype("<f4"), rng.random_sample(P).astype("<f4"),
                 rng.random_sample(LE).astype("<f4")]
    head = struct.pack("<256i", *h) + struct.pack("<64f", *hp) + struct.pack("<32Q", *h64)
    if has_state:
        head += b"".join(p.ljust(1024, b"\0") for p in HANDMADE_PATHS)
    return head + b"".join(x.tobytes() for x in body), params, bias.reshape(cfg.L, cfg.E)


def handmade_section(tmp):
    """Sigmoid-router checkpoints written here: the bias and bias_rate reach the torch file and the
    model, ckpt -> pt -> ckpt is byte-identical, and bad files get one-line errors."""
    cfg = M.Config(V=61, Vp=64, maxT=16, L=2, C=16, NH=2, NKV=1, F=12, G=2, E=4, K=2, router=2, aux=0,
                   bias_rate=float(np.float32(1e-3)))
    x = torch.randint(0, cfg.V, (2, 8), generator=torch.Generator().manual_seed(0))
    for has_state in (False, True):
        name = "handmade sigmoid checkpoint, %s" % ("with training state" if has_state else "parameters only")
        raw, params, bias = sigmoid_checkpoint(cfg, 1 + has_state, has_state)
        path, pt, back = (os.path.join(tmp, "hm%d%s" % (has_state, ext)) for ext in (".bin", ".pt", ".back.bin"))
        with open(path, "wb") as f:
            f.write(raw)
        check(name + ": the documented size", len(raw) == convert.checkpoint_size(
            {k: getattr(cfg, k) for k in convert.CONFIG_KEYS}, has_state, has_state), "%d bytes" % len(raw))
        rc = quiet(["to-torch", path, pt]) or quiet(["to-ckpt", pt, back])
        check(name + ": ckpt -> pt -> ckpt is byte-identical", rc == 0 and open(back, "rb").read() == raw)
        d = torch.load(pt)
        bias_pt = d.get("expert_bias")
        check(name + ": the torch file holds the expert bias and bias_rate",
              bias_pt is not None and torch.equal(bias_pt, torch.from_numpy(bias)) and bias_pt.dtype == torch.float32
              and d["config"]["bias_rate"] == cfg.bias_rate and d["config"]["router"] == 2
              and np.array_equal(torch.cat([p.reshape(-1) for p in d["state_dict"].values()]).numpy(), params))
        ck = convert.read_checkpoint(path)
        with torch.no_grad():
            biased = convert.build_model(ck, torch.float64)
            routed = [r.chosen for r in biased(x).routing]
            from_pt = convert.model_from_torch(d, torch.float64)
            unbiased = convert.model_from_torch(d, torch.float64)
            unbiased.expert_bias.zero_()
            same = all(torch.equal(a, r.chosen) for a, r in zip(routed, from_pt(x).routing))
            moved = any(not torch.equal(a, r.chosen) for a, r in zip(routed, unbiased(x).routing))
        check(name + ": the model routes with the bias, from the checkpoint and from the torch file",
              same and moved, "same %s, moved %s" % (same, moved))

    # the bias section missing: a router-2 file of a parameters-only file's size without it
    cut = os.path.join(tmp, "hm_nobias.bin")
    raw, _, _ = sigmoid_checkpoint(cfg, 1, False)
    with open(cut, "wb") as f:
        f.write(raw[:len(raw) - 4 * cfg.L * cfg.E])
    check("handmade sigmoid checkpoint without its bias: one-line error",
          *one_line_error(cli(["to-torch", cut, os.path.join(tmp, "hm_x.pt")]), cut))
    # the bias on the wrong router, and missing where it belongs
    d = torch.load(os.path.join(tmp, "hm0.pt"))
    wrong, lacking = os.path.join(tmp, "hm_wrong.pt"), os.path.join(tmp, "hm_lacking.pt")
    torch.save({**d, "config": {**d["config"], "router": 0}}, wrong)
    torch.save({k: v for k, v in d.items() if k != "expert_bias"}, lacking)
    for what, f in (("expert_bias with router 0", wrong), ("router 2 without expert_bias", lacking)):
        check("torch file with %s: one-line error" % what,
              *one_line_error(cli(["to-ckpt", f, os.path.join(tmp, "hm_z.bin")]), f))


def sigmoid_supported():
    """Whether ./train_unipool -h offers -R sigmoid."""
    r = subprocess.run([TRAIN, "-h"], capture_output=True, text=True)
    return bool(re.search(r"-R .*sigmoid", r.stdout + r.stderr))


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        handmade_section(tmp)
        specs = CASES
        if not sigmoid_supported():
            check(SIGMOID + ": ./train_unipool trains the sigmoid router", False,
                  "%s -h does not offer -R sigmoid; build the sigmoid router into the C programs, this case "
                  "stays a failure until then" % TRAIN)
            specs = [c for c in CASES if c[0] != SIGMOID]
        cases = [Case(tmp, i, *c) for i, c in enumerate(specs)]
        for case, r in zip(cases, run_all([c.train_cmd for c in cases])):
            case.prepare(r)
        for case in cases:
            case.run()
        cli_section(cases)
    print("%s (%.0f s)" % ("FAILED: %d" % len(failures) if failures else "all passed", time.time() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
