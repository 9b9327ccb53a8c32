#!/usr/bin/env python3
"""Tests of the training program as a user runs it: resume is bit-exact (from
any folder, with the data paths the checkpoint names, from a version 1 file),
a kill at any moment leaves no temporary and a log with each step once, and
bad input (missing, empty, truncated or foreign files, token ids out of range,
wrong or damaged checkpoints, a loader position outside the shards, bad
flags, NaN, a full disk) gets a one-line error naming the file or flag and a
non-zero exit, never a crash; mistakes are reported before the model is built.
Also infer_unipool: eval, util (its SVG), probe, gen from any folder.

    python3 dev/test_train.py        (after make)

Standard library only; tiny synthetic shards in a temporary folder. gen with a
prompt needs the encoder files of `make data` (data/sotu, data/cache/gpt2).
"""
import glob
import json
import math
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from magic import magic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_unipool")
INFER = os.path.join(ROOT, "infer_unipool")
CKPT_HEADER, CKPT_PATH_BLOCK = 1024 + 256 + 256, 3 * 1024  # the header blocks; version 2's data paths
TINY = ["-L", "2", "-C", "32", "-NH", "2", "-NKV", "1", "-F", "32", "-e", "4", "-t", "16", "-b", "2",
        "-v", "2", "-V", "2", "-S", "0", "-T", "1"]
failures = []


def check(name, ok, detail=""):
    print(("OK     " if ok else "NOT OK ") + name + ("" if ok else ": " + detail))
    if not ok:
        failures.append(name)


def write_shard(path, tokens, version=None, count=None, width=None, vocab=0):
    version = magic("SHARD_VERSION_U16") if version is None else version
    width = width or (2 if version == magic("SHARD_VERSION_U16") else 4)
    header = [0] * 256
    header[0], header[1], header[2] = magic("SHARD_MAGIC"), version, len(tokens) if count is None else count
    header[3] = vocab  # the vocabulary size; 0 stands for GPT-2's
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack("<%d%s" % (len(tokens), "H" if width == 2 else "I"), *tokens))


def tokens(n, seed):
    x, out = seed, []
    for _ in range(n):  # a small LCG: deterministic, with structure to learn
        x = (x * 1103515245 + 12345) % 2**31
        out.append((out[-1] * 7 + (x >> 16) % 5) % 1000 if out else 1)
    return out


def run(args, limit_fsize=None, killed_by_limit=False, prog=TRAIN, **kw):
    """prog with args. With limit_fsize, a write past that file size fails with EFBIG, or with
    killed_by_limit kills the process (SIGXFSZ, as a kill at that moment would)."""
    def pre():
        if limit_fsize is not None:
            if not killed_by_limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    return subprocess.run([prog] + args, capture_output=True, text=True, timeout=kw.pop("timeout", 300),
                          preexec_fn=pre, **kw)


def losses(stdout):
    """The deterministic part of the log: step, loss, aux, lr, norm; and val lines."""
    keep = []
    for line in stdout.splitlines():
        if line.startswith("step "):
            keep.append(" | ".join(line.split(" | ")[:5]))
        elif line.startswith("val step"):
            keep.append(line)
    return keep


def expect_error(name, args, mentions, code=None, **kw):
    try:
        r = run(args, **kw)
    except subprocess.TimeoutExpired as e:
        check(name, False, "still running after %s s" % e.timeout)
        return None
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = (r.returncode != 0 and 0 < r.returncode < 128 and (code is None or r.returncode == code)
          and len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0])
    check(name, ok, "exit %d, stderr %r" % (r.returncode, r.stderr[-400:]))
    return r


H32, HF32, H64 = 0, 1024, 1280  # byte offsets of the header's int32, float32 and uint64 blocks


def patched(blob, fmt, offset, value):
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def version1(blob):
    """The same checkpoint in version 1: no path block, no fingerprint of the train shards."""
    head = patched(patched(blob[:CKPT_HEADER], "<i", H32 + 4, magic("CKPT_VERSION_1")), "<Q", H64 + 5 * 8, 0)
    return head + blob[CKPT_HEADER + CKPT_PATH_BLOCK:]


def log_steps(path):
    """The steps of a log.jsonl's training records and of its validation records, in file order."""
    steps, vals = [], []
    for line in open(path).read().splitlines():
        rec = json.loads(line)
        (vals if "val_loss" in rec else steps).append(rec["step"])
    return steps, vals


def write(path, blob):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    return path


def resume_anywhere(tmp, d, uninterrupted):
    """-r restores the data paths it trained on, from any folder; a version 1 checkpoint resumes too."""
    tail = [l for l in losses(uninterrupted.stdout) if re.match(r"step +[5-8]/|val step [468]", l)]
    rel = os.path.join(tmp, "rel")
    r = run(["-i", "data/t_train_*.bin", "-j", "data/t_val_*.bin"] + TINY + ["-n", "8", "-K", "4", "-O", rel], cwd=tmp)
    check("relative data paths: the run of absolute ones", losses(r.stdout) == losses(uninterrupted.stdout),
          r.stdout[-400:] + r.stderr)
    os.remove(os.path.join(rel, "ckpt_00000008.bin"))
    r = run(["-r", "latest", "-O", ".", "-T", "1"], cwd=rel)
    check("resume from another folder without -i -j -z: the checkpoint's data, steps 5-8 bit for bit",
          r.returncode == 0 and losses(r.stdout) == tail and "from the checkpoint: -i -j -z" in r.stdout,
          "\n".join(tail + ["resumed:"] + losses(r.stdout) + [r.stdout[-600:], r.stderr]))
    check("resume: log.jsonl has each step and each validation once",
          log_steps(os.path.join(rel, "log.jsonl")) == (list(range(1, 9)), [0, 2, 4, 6, 8]),
          str(log_steps(os.path.join(rel, "log.jsonl"))))
    blob4 = open(os.path.join(tmp, "part", "ckpt_00000004.bin"), "rb").read()
    v1 = write(os.path.join(tmp, "v1", "ckpt_00000004.bin"), version1(blob4))
    r = run(["-r", v1, "-O", os.path.dirname(v1), "-T", "1"] + d)
    check("a version 1 checkpoint resumes bit for bit", r.returncode == 0 and losses(r.stdout) == tail,
          "\n".join(tail + ["resumed:"] + losses(r.stdout) + [r.stderr]))
    return v1


def other_shards(tmp, d):
    """The loader position against the shards -r finds: other shards are read from their
    beginning; a position outside the shards the checkpoint read is refused."""
    two, one, three = (os.path.join(tmp, n) for n in ("two", "one", "three"))
    for folder in (two, one, three):
        os.mkdir(folder)
    for i in (1, 2):  # 24 rows of T + 1 = 17 tokens each
        write_shard(os.path.join(two, "s_%06d.bin" % i), tokens(400, 10 + i))
    write_shard(os.path.join(one, "s_000001.bin"), tokens(400, 11))
    for i in (1, 2, 3):  # 3 rows each
        write_shard(os.path.join(three, "s_%06d.bin" % i), tokens(50, 20 + i))
    pos = os.path.join(tmp, "pos")
    r = run(["-i", os.path.join(two, "s_*.bin"), "-j", d[3]] + TINY + ["-n", "14", "-K", "14", "-v", "0", "-O", pos])
    ck = os.path.join(pos, "ckpt_00000014.bin")
    blob = open(ck, "rb").read() if r.returncode == 0 else b"\0" * CKPT_HEADER
    check("2 shards of 24 rows: step 14 saves the loader at epoch 0, shard 1, row 4",
          struct.unpack_from("<3Q", blob, H64 + 8) == (0, 1, 4), r.stderr)
    for name, shards in (("1 shard", one), ("3 smaller shards", three)):
        out = os.path.join(tmp, "pos_" + name[0])
        r = run(["-r", ck, "-i", os.path.join(shards, "s_*.bin"), "-j", d[3], "-n", "16", "-O", out, "-T", "1"])
        check("resume on %s (trained on 2): says so, reads them from the beginning" % name,
              r.returncode == 0 and "from their beginning" in r.stdout and "step    16/16" in r.stdout,
              "exit %d: %s %s" % (r.returncode, r.stdout[-300:], r.stderr[-300:]))
    v1 = write(os.path.join(tmp, "pos_v1", "ckpt_00000014.bin"), version1(blob))
    r = run(["-r", v1, "-i", os.path.join(one, "s_*.bin"), "-j", d[3], "-n", "16", "-O", os.path.dirname(v1), "-T", "1"])
    check("version 1 checkpoint, position outside the shards found: says so, reads them from the beginning",
          r.returncode == 0 and "does not name its train shards" in r.stdout and "step    16/16" in r.stdout,
          "exit %d: %s %s" % (r.returncode, r.stdout[-300:], r.stderr[-300:]))
    for name, offset, value in (("shard", H64 + 16 + 7, 1), ("row", H64 + 24 + 1, 16), ("epoch", H64 + 8 + 3, 1)):
        bad = write(os.path.join(tmp, "pos_bad", name + ".bin"), patched(blob, "<B", offset, value))
        expect_error("a flipped byte in the saved %s: damaged" % name,
                     ["-r", bad, "-i", os.path.join(two, "s_*.bin"), "-j", d[3], "-O", os.path.join(tmp, "pos_bad")],
                     "damaged")


def damaged_headers(tmp, d, blob, out):
    """Every header field held to its meaning: a damaged one is refused, naming the file."""
    LE = 2 * 4  # L * E of TINY
    cases = [("training-state flag 7", "<i", H32 + 2 * 4, 7),
             ("alpha -163.84 (a flipped byte)", "<f", HF32 + 0, -163.84),
             ("B with a flipped top byte", "<i", H32 + 16 * 4, 2 + (1 << 24)),
             ("negative steps done", "<i", H32 + 27 * 4, -5),
             ("negative step count", "<i", H32 + 19 * 4, -8),
             ("AdamW steps beyond the steps done", "<i", H32 + 28 * 4, 9),
             ("stale-statistic flag 2", "<i", H32 + 29 * 4, 2),
             ("lr NaN", "<f", HF32 + 5 * 4, float("nan")),
             ("beta2 1.5", "<f", HF32 + 7 * 4, 1.5),
             ("seed beyond 2^31", "<Q", H64, 1 << 40),
             ("a non-zero unused word", "<i", H32 + 100 * 4, 1),
             ("a data path without its NUL", "<1024s", CKPT_HEADER, b"x" * 1024),
             ("stale statistic 7", "<f", len(blob) - 4 * LE, 7.0)]
    for name, fmt, offset, value in cases:
        path = write(os.path.join(tmp, "damaged", name.replace(" ", "_") + ".bin"), patched(blob, fmt, offset, value))
        expect_error("damaged checkpoint, %s" % name, d + ["-r", path] + out, "damaged")
    sig = os.path.join(tmp, "sigmoid")
    r = run(d + TINY + ["-R", "sigmoid", "-n", "2", "-K", "2", "-O", sig])
    sblob = open(os.path.join(sig, "ckpt_00000002.bin"), "rb").read() if r.returncode == 0 else blob
    P = (len(sblob) - CKPT_HEADER - CKPT_PATH_BLOCK - 2 * 4 * LE) // 12
    bad = write(os.path.join(tmp, "damaged", "bias_nan.bin"),
                patched(sblob, "<f", CKPT_HEADER + CKPT_PATH_BLOCK + 4 * P + 4, float("nan")))
    expect_error("damaged checkpoint, a NaN expert bias (sigmoid router)", d + ["-r", bad] + out, "damaged")
    r = run(["eval", "-c", bad, "-i", d[3]], prog=INFER)
    check("infer_unipool refuses the NaN expert bias in one line", r.returncode == 1 and "damaged" in r.stderr
          and len(r.stderr.splitlines()) == 1, r.stderr)


def kills(tmp, d, full):
    """A kill while saving, and at a random moment: the next run removes the temporary, the log
    has each step once, and the run ends as an uninterrupted one does."""
    kill = os.path.join(tmp, "kill")
    run(d + TINY + ["-n", "8", "-K", "4", "-O", kill])
    os.remove(os.path.join(kill, "ckpt_00000008.bin"))  # stopped after step 8 with its last checkpoint at 4
    size = os.path.getsize(os.path.join(kill, "ckpt_00000004.bin"))
    r = run(["-r", "latest", "-O", kill, "-K", "2", "-T", "1"] + d, limit_fsize=size // 2, killed_by_limit=True)
    check("killed while saving step 6's checkpoint: a partial temporary is left",
          r.returncode == -signal.SIGXFSZ and os.path.exists(os.path.join(kill, "ckpt_00000006.bin.tmp")),
          "exit %d, %s" % (r.returncode, sorted(os.listdir(kill))))
    r = run(["-r", "latest", "-O", kill, "-T", "1"] + d)
    check("the next run removes the temporary and says so",
          r.returncode == 0 and "removed the temporaries" in r.stdout and not any(f.endswith(".tmp") for f in os.listdir(kill)),
          "%s %s" % (sorted(os.listdir(kill)), r.stderr))
    check("after the kills: log.jsonl has each step and each validation once",
          log_steps(os.path.join(kill, "log.jsonl")) == (list(range(1, 9)), [0, 2, 4, 6, 8]),
          str(log_steps(os.path.join(kill, "log.jsonl"))))
    with open(os.path.join(full, "ckpt_00000008.bin"), "rb") as f1, open(os.path.join(kill, "ckpt_00000008.bin"), "rb") as f2:
        check("after the kills: the final checkpoint of the uninterrupted run", f1.read() == f2.read())

    rnd = os.path.join(tmp, "random_kill")
    p = subprocess.Popen([TRAIN] + d + TINY + ["-n", "1000", "-K", "3", "-v", "5", "-O", rnd], stdout=subprocess.PIPE,
                         text=True)
    saved = steps = 0
    for line in p.stdout:  # 3 checkpoints and 2 steps (the first logged), then a kill wherever the run is
        saved += line.startswith("saved")
        steps += saved == 3 and line.startswith("step")
        if steps == 2:
            break
    time.sleep(random.uniform(0, 0.003))
    p.kill()
    p.wait()
    p.stdout.close()
    last = int(re.search(r"ckpt_(\d+)\.bin$", sorted(glob.glob(os.path.join(rnd, "ckpt_*.bin")))[-1]).group(1))
    n = last + 3
    r = run(["-r", "latest", "-O", rnd, "-n", str(n), "-T", "1"] + d)
    check("killed at a random moment (last checkpoint at %d): the next run completes, no temporary, each step "
          "and validation once" % last, r.returncode == 0 and not any(f.endswith(".tmp") for f in os.listdir(rnd)) and
          log_steps(os.path.join(rnd, "log.jsonl")) == (list(range(1, n + 1)), sorted(set(range(0, n + 1, 5)) | {n})),
          "%s %s %s" % (log_steps(os.path.join(rnd, "log.jsonl")), sorted(os.listdir(rnd)), r.stderr))


def early_checks(tmp, d):
    """Mistakes cost a moment at any model size: they are found before the model is built."""
    big = ["-p", "182m", "-T", "1"]
    for name, args, mention in (
            ("a typo in -i", ["-i", os.path.join(tmp, "data", "t_trian_*.bin"), "-j", d[3], "-O", os.path.join(tmp, "e1")],
             "t_trian_"),
            ("a typo in -j", ["-i", d[1], "-j", os.path.join(tmp, "data", "t_vla_*.bin"), "-O", os.path.join(tmp, "e1")],
             "t_vla_"),
            ("-O under a file", d + ["-O", os.path.join(tmp, "data", "t_val_000000.bin", "out")], "t_val_000000.bin"),
            ("-O not writable", d + ["-O", "/proc/self"], "/proc/self")):
        t0 = time.time()
        expect_error("%s at 182M: one line within a second" % name, big + args, mention, timeout=5)
        check("%s at 182M: reported in %.2f s" % (name, time.time() - t0), time.time() - t0 < 1.0)


def eta_and_never(tmp, d):
    """-K never writes no checkpoint; the ETA is the mean of the last 20 step times (not the
    process's first) times the steps left."""
    never = os.path.join(tmp, "never")
    n = 30
    r = run(d + TINY + ["-n", str(n), "-K", "never", "-v", "0", "-O", never])
    check("-K never: no checkpoint at all", r.returncode == 0 and os.listdir(never) == ["log.jsonl"],
          "%s %s" % (os.listdir(never) if os.path.isdir(never) else None, r.stderr))
    recs = [json.loads(l) for l in open(os.path.join(never, "log.jsonl"))] if r.returncode == 0 else []
    bad = []
    for i, rec in enumerate(recs):
        ms = [x["ms"] for x in recs[:i + 1]]
        window = ms[1:][-20:] or ms
        want = sum(window) / len(window) * (n - i - 1) / 1000
        if abs(rec.get("eta_s", -1) - want) > 2e-3 + 1e-6 * want:
            bad.append((rec["step"], rec.get("eta_s"), round(want, 4)))
    check("ETA: mean of the last 20 step times x steps left", len(recs) == n and not bad, str(bad[:5]))


def heat_rgb(count, mx):
    """infer_unipool's heatmap colour (heat_rgb): white unused, else light to dark blue by sqrt."""
    lo, hi = (198, 219, 239), (8, 48, 107)
    t = math.sqrt(count / mx)
    return tuple(int(math.floor(a + (b - a) * t + 0.5)) for a, b in zip(lo, hi)) if count > 0 else (255, 255, 255)


def svg_checks(prefix):
    """util's SVG: a cell per used (layer, expert) in the colour of its count on a square-root
    scale, expert-index ticks, a colour scale, the bar chart's axis values."""
    svg = open(prefix + ".svg").read()
    counts = {(int(l), int(e)): int(n) for l, e, n in
              (row.split(",") for row in open(prefix + ".csv").read().splitlines()[1:])}
    mx = max(counts.values())
    cells = {(int(l), int(e)): (int(n), (int(r), int(g), int(b))) for r, g, b, l, e, n in re.findall(
        r'fill="rgb\((\d+),(\d+),(\d+)\)"><title>layer (\d+), expert (\d+): (\d+) tokens</title>', svg)}
    want = {k: (n, heat_rgb(n, mx)) for k, n in counts.items() if n > 0}
    check("util SVG: a cell per used expert, coloured by sqrt(count / busiest)", cells == want,
          "svg %s\nwant %s" % (sorted(cells.items())[:6], sorted(want.items())[:6]))
    two = heat_rgb(0.02 * mx, mx)
    check("util SVG: a 2%% cell is plainly not white (%s)" % (two,), max(255 - c for c in two) >= 60)
    check("util SVG: expert-index ticks, a colour scale, the bar chart's axis values",
          re.search(r'text-anchor="middle" font-size="10">0</text>', svg) and "expert (index" in svg and
          "square-root scale" in svg and ">unused<" in svg and
          len(re.findall(r'text-anchor="end" font-size="10">\d+</text>', svg)) >= 2, svg[:300])


def gen_anywhere(tmp, ck):
    """gen from another folder, with a python3 first on PATH that is not the one with the project's
    tokenizer: it finds the tokenizer table, prepro_pile.py and the encoder files by itself."""
    fake = write(os.path.join(tmp, "fakebin", "python3"), b"#!/bin/sh\necho 'not this python' >&2\nexit 3\n")
    os.chmod(fake, 0o755)
    env = dict(os.environ, PATH=os.path.dirname(fake) + os.pathsep + os.environ.get("PATH", ""))
    elsewhere = os.path.join(tmp, "elsewhere")
    os.makedirs(elsewhere, exist_ok=True)
    if not (os.path.exists(os.path.join(ROOT, "data", "sotu", "gpt2_tokenizer.bin")) and
            os.path.exists(os.path.join(ROOT, "data", "cache", "gpt2", "encoder.json"))):
        print("SKIP   gen with a prompt: no data/sotu and data/cache/gpt2 (make data)")
        return
    if os.access("/usr/bin/python3", os.X_OK):
        r = run(["gen", "-c", ck, "-p", "Hello world", "-n", "4", "-T", "1"], prog=INFER, cwd=elsewhere, env=env)
        check("gen from another folder, another python3 first on PATH: encodes the prompt and samples",
              r.returncode == 0 and r.stdout.startswith("Hello world") and "4 new" in r.stderr, r.stdout + r.stderr)
    expect_error("gen: a missing -P, one line naming it",
                 ["gen", "-c", ck, "-p", "Hi", "-P", "nowhere/prepro.py"], "nowhere/prepro.py", prog=INFER, cwd=elsewhere)
    expect_error("gen: a missing -z, one line naming it", ["gen", "-c", ck, "-z", "nowhere/tok.bin"], "nowhere/tok.bin",
                 prog=INFER, cwd=elsewhere)


def write_table(path, n):
    """A tokenizer table of n tokens whose token i prints as "<i>"; the last is end-of-text."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256I", *([magic("TOKENIZER_MAGIC"), magic("TOKENIZER_VERSION"), n, n - 1] + [0] * 252)))
        for i in range(n):
            b = ("<%d>" % i).encode()
            f.write(bytes([len(b)]) + b)
    return path


def small_vocab(tmp, d, ck_gpt2):
    """The vocabulary comes with the data: shards of 300 tokens train a model of V 300 (Vp 1024) that
    gen samples from; shards, tables and checkpoints of different vocabularies are refused in one line
    naming both."""
    V = 300
    sv = os.path.join(tmp, "v300")
    os.makedirs(sv, exist_ok=True)
    write_shard(os.path.join(sv, "s_val_000000.bin"), [t % V for t in tokens(2000, 7)], vocab=V)
    write_shard(os.path.join(sv, "s_train_000001.bin"), [t % V for t in tokens(4000, 8)], vocab=V)
    table = write_table(os.path.join(sv, "tok.bin"), V)
    ds = ["-i", os.path.join(sv, "s_train_*.bin"), "-j", os.path.join(sv, "s_val_*.bin"), "-z", table]
    out = os.path.join(tmp, "v300_run")
    r = run(ds + TINY + ["-n", "4", "-K", "0", "-O", out])
    ck = os.path.join(out, "ckpt_00000004.bin")
    head = struct.unpack_from("<5i", open(ck, "rb").read(), H32) if r.returncode == 0 else ()
    check("V from the shards: a 300-token vocabulary trains, the checkpoint holds V 300 and Vp 1024",
          r.returncode == 0 and head[3:5] == (V, 1024), "%s %s" % (head, r.stderr[-300:]))
    if r.returncode != 0:
        return
    g = subprocess.run([INFER, "gen", "-c", ck, "-n", "12", "-s", "3", "-T", "1"], capture_output=True, text=True)
    ids = [int(x) for x in re.findall(r"<(\d+)>", g.stdout)]
    check("gen on a 300-token checkpoint, with the table it trained with: 12 ids, all below 300",
          g.returncode == 0 and len(ids) == 12 and max(ids) < V, g.stdout + g.stderr)
    e = subprocess.run([INFER, "eval", "-c", ck, "-i", ds[3], "-n", "2", "-T", "1"], capture_output=True, text=True)
    check("eval on a 300-token checkpoint", e.returncode == 0 and "loss" in e.stdout, e.stdout + e.stderr)
    r2 = run(["-r", ck, "-n", "6", "-O", out, "-T", "1"])
    check("resume a 300-token run on its shards", r2.returncode == 0 and "step     6/6" in r2.stdout, r2.stderr[-300:])
    if os.path.exists(os.path.join(ROOT, "data", "cache", "gpt2", "encoder.json")):
        p = subprocess.run([INFER, "gen", "-c", ck, "-p", "Hello world", "-n", "3", "-T", "1"], capture_output=True,
                           text=True)
        ids = [int(x) for x in re.findall(r"<(\d+)>", p.stdout)]
        check("gen with a prompt on a 300-token checkpoint: prepro_pile.py encodes it with --vocab 300",
              p.returncode == 0 and len(ids) > 3 and max(ids) < V, p.stdout + p.stderr)
    bad = ["-O", os.path.join(tmp, "v300_bad")]
    gpt2_table = write_table(os.path.join(sv, "gpt2.bin"), 50257)
    expect_error("vocabulary: 300-token shards with a 50257-token table",
                 ds[:4] + ["-z", gpt2_table] + TINY + bad, "gpt2.bin' one of 50257")
    expect_error("vocabulary: 300-token train shards with 50257-token val shards",
                 ds[:2] + [d[2], d[3], "-z", table] + TINY + bad, "one of 50257")
    expect_error("vocabulary: resuming a 300-token checkpoint on 50257-token shards",
                 d + ["-z", gpt2_table, "-r", ck] + bad, "checkpoint '%s' one of 300" % ck)
    expect_error("vocabulary: eval of 50257-token shards on a 300-token checkpoint",
                 ["eval", "-c", ck, "-i", d[3]], "the checkpoint one of 300", prog=INFER)
    expect_error("vocabulary: eval of 300-token shards on a 50257-token checkpoint",
                 ["eval", "-c", ck_gpt2, "-i", ds[3]], "the checkpoint one of 50257", prog=INFER)
    expect_error("vocabulary: gen with a table of another vocabulary than the checkpoint",
                 ["gen", "-c", ck, "-z", gpt2_table, "-n", "2"], "the checkpoint one of 300", prog=INFER)
    mixed = os.path.join(sv, "m_train_000002.bin")
    write_shard(mixed, tokens(2000, 9))
    write_shard(os.path.join(sv, "m_train_000001.bin"), [t % V for t in tokens(2000, 9)], vocab=V)
    expect_error("vocabulary: one glob of shards with two vocabularies",
                 ["-i", os.path.join(sv, "m_train_*.bin")] + ds[2:] + TINY + bad, "m_train_000002.bin")
    write_shard(mixed, tokens(2000, 9), vocab=-5)
    expect_error("vocabulary: a negative vocabulary in a shard header", ["-i", mixed] + ds[2:] + TINY + bad,
                 "m_train_000002.bin")


def done_line(stdout):
    """The run's last line: the last val loss against the printed unigram baseline, the most dead layer."""
    last_val = [l for l in stdout.splitlines() if l.startswith("val step")][-1]
    val = float(re.search(r"loss (\S+)", last_val).group(1))
    dead = max(int(x) for x in re.search(r"dead% (\S+)", last_val).group(1).split("/"))
    unigram = float(re.search(r"unigram baseline: \S+ on train, (\S+) on val", stdout).group(1))
    got = re.fullmatch(r"done: val loss (\S+) against the unigram baseline's (\S+) \((\S+)\); "
                       r"at most (\d+)% dead tokens in a layer", stdout.splitlines()[-1])
    ok = (got is not None and float(got.group(1)) == val and float(got.group(2)) == unigram
          and abs(float(got.group(3)) - (val - unigram)) < 1.5e-4 and int(got.group(4)) == dead)
    check("the last line: val loss, unigram baseline, most dead layer", ok, "last val %r; got %r" % (
        last_val, stdout.splitlines()[-1]))


def util_rows(tmp, infer, ck):
    """util -w: each row's counts with its document, the end-of-text tokens (50256) up to its first token."""
    toks = tokens(300, 9)
    for i in (20, 21, 96, 250):  # 96: a row's first token
        toks[i] = 50256
    shard = os.path.join(tmp, "eot_val_000000.bin")
    write_shard(shard, toks)
    prefix, rows_csv = os.path.join(tmp, "util", "w"), os.path.join(tmp, "util", "w.rows.csv")
    u = subprocess.run([infer, "util", "-c", ck, "-i", shard, "-b", "2", "-t", "16", "-n", "0", "-o", prefix,
                        "-w", rows_csv], capture_output=True, text=True)
    lines = [l.split(",") for l in open(rows_csv).read().splitlines()] if u.returncode == 0 else [[]]
    body = [list(map(int, l)) for l in lines[1:]]
    n_rows = (300 - 1) // 16 // 2 * 2  # whole batches of 2 rows of 16 inputs (17 tokens, one shared)
    docs = {r: d for r, d, _, _, _ in body}
    want = {r: sum(t == 50256 for t in toks[:r * 16 + 1]) for r in range(n_rows)}
    check("util -w: a header, every row with the end-of-text tokens up to its first token as its document",
          lines[0] == ["row", "doc", "layer", "expert", "tokens"] and docs == want, "%s %s" % (docs, u.stderr))
    per_row, per_expert = {}, {}
    for r, _, l, e, n in body:
        per_row[(r, l)] = per_row.get((r, l), 0) + n
        per_expert[(l, e)] = per_expert.get((l, e), 0) + n
    totals = {(int(l), int(e)): int(n) for l, e, n in (x.split(",") for x in open(prefix + ".csv").read().splitlines()[1:])
              if int(n)} if u.returncode == 0 else None
    check("util -w: each row's counts sum to its 16 tokens in every layer, and the rows' to util's CSV",
          set(per_row.values()) == {16} and len(per_row) == 2 * n_rows and per_expert == totals,
          "%s %s" % (per_row, totals))
    e = subprocess.run([infer, "eval", "-c", ck, "-i", shard, "-w", rows_csv], capture_output=True, text=True)
    check("util -w: another command refuses it (exit 2)", e.returncode == 2 and "-w" in e.stderr, e.stderr)


def main():
    if not os.path.exists(TRAIN):
        sys.exit("error: %s not built; run make first" % TRAIN)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.mkdir(data)
        write_shard(os.path.join(data, "t_val_000000.bin"), tokens(3000, 1))
        write_shard(os.path.join(data, "t_train_000001.bin"), tokens(5000, 2))
        write_shard(os.path.join(data, "t_train_000002.bin"), tokens(2000, 3), version=magic("SHARD_VERSION_U32"))
        d = ["-i", os.path.join(data, "t_train_*.bin"), "-j", os.path.join(data, "t_val_*.bin")]

        # Resume: an interrupted run continues with exactly the figures of an uninterrupted one.
        full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
        a = run(d + TINY + ["-n", "8", "-K", "4", "-O", full])
        check("uninterrupted run", a.returncode == 0, a.stderr)
        b = run(d + TINY + ["-n", "8", "-K", "4", "-O", part])
        os.remove(os.path.join(part, "ckpt_00000008.bin"))  # as if stopped after step 4's checkpoint
        c = run(["-r", os.path.join(part, "ckpt_00000004.bin"), "-O", part, "-T", "1"] + d)
        la, lc = losses(a.stdout), losses(c.stdout)
        tail = [l for l in la if re.match(r"step +[5-8]/|val step [468]", l)]
        check("resume: steps 5-8 equal the uninterrupted run bit for bit", c.returncode == 0 and tail == lc and len(tail) == 7,
              "\n".join(["uninterrupted:"] + tail + ["resumed:"] + lc + [c.stderr]))
        done_line(a.stdout)
        with open(os.path.join(full, "ckpt_00000008.bin"), "rb") as f1, open(os.path.join(part, "ckpt_00000008.bin"), "rb") as f2:
            check("resume: final checkpoints identical", f1.read() == f2.read())
        check("keep the last N checkpoints", sorted(os.listdir(full)) == ["ckpt_00000004.bin", "ckpt_00000008.bin", "log.jsonl"],
              str(sorted(os.listdir(full))))
        r = run(d + ["-r", "latest", "-O", full, "-n", "10"])
        check("resume 'latest' and extend -n", r.returncode == 0 and "resumed from" in r.stdout and "step    10/10" in r.stdout,
              r.stdout[-300:] + r.stderr)
        log = open(os.path.join(full, "log.jsonl")).read().splitlines()
        check("log.jsonl holds a line per step and val", sum('"loss"' in l for l in log) == 10 and sum('"val_loss"' in l for l in log) >= 5,
              "\n".join(log))
        r1 = run(d + TINY + ["-n", "3", "-K", "0", "-O", os.path.join(tmp, "s1")])
        r2 = run(d + TINY + ["-n", "3", "-K", "0", "-O", os.path.join(tmp, "s2")])
        check("same seed, same figures", losses(r1.stdout) == losses(r2.stdout) and losses(r1.stdout))
        r3 = run(d + TINY + ["-n", "3", "-K", "0", "-s", "7", "-O", os.path.join(tmp, "s3")])
        check("another seed, other figures", losses(r3.stdout) != losses(r1.stdout))
        v1 = resume_anywhere(tmp, d, a)

        # infer_unipool on the run's checkpoint.
        infer = INFER
        ck8 = os.path.join(full, "ckpt_00000008.bin")
        e = subprocess.run([infer, "eval", "-c", ck8, "-i", d[3], "-n", "2", "-T", "1"], capture_output=True, text=True)
        val8 = [l for l in la if l.startswith("val step 8")][0]
        want = re.search(r"loss (\S+)", val8).group(1)
        got = re.search(r"loss (\S+),", e.stdout)
        check("eval equals the training program's val loss", got is not None and "%.4f" % float(got.group(1)) == want,
              "train: %s, eval: %s %s" % (val8, e.stdout, e.stderr))
        prefix = os.path.join(tmp, "util", "u")
        u = subprocess.run([infer, "util", "-c", ck8, "-i", d[3], "-n", "3", "-b", "2", "-t", "16", "-o", prefix],
                           capture_output=True, text=True)
        rows = [l.split(",") for l in open(prefix + ".csv").read().splitlines()[1:]] if u.returncode == 0 else []
        per_layer = {}
        for layer, _, n in rows:
            per_layer[layer] = per_layer.get(layer, 0) + int(n)
        check("util: counts per layer sum to tokens x K", per_layer == {"0": 3 * 2 * 16, "1": 3 * 2 * 16}
              and "<svg" in open(prefix + ".svg").read(), "%s %s %s" % (per_layer, u.stdout, u.stderr))
        if u.returncode == 0:
            svg_checks(prefix)
        util_rows(tmp, infer, ck8)
        p = subprocess.run([infer, "probe", "-c", ck8, "-i", d[3], "-n", "2"], capture_output=True, text=True)
        check("probe reports the deep layer and the mean", p.returncode == 0 and re.search(r"^\s+1 \|", p.stdout, re.M)
              and "mean" in p.stdout, p.stdout + p.stderr)
        table = write_table(os.path.join(tmp, "tok.bin"), 50257)
        g = [subprocess.run([infer, "gen", "-c", ck8, "-z", table, "-n", "12", "-s", s], capture_output=True, text=True)
             for s in ("5", "5", "6")]
        check("gen: same seed same text, another seed other text", g[0].returncode == 0 and g[0].stdout == g[1].stdout
              and g[0].stdout != g[2].stdout and g[0].stdout.count("<") == 12, g[0].stdout + g[0].stderr)
        gen_anywhere(tmp, v1)
        small_vocab(tmp, d, ck8)

        # Bad data.
        out = ["-O", os.path.join(tmp, "bad")]
        expect_error("missing shards", ["-i", os.path.join(tmp, "nope_*.bin"), "-j", d[3]] + TINY + out, "nope_*.bin")
        empty = os.path.join(tmp, "empty.bin")
        open(empty, "wb").close()
        expect_error("empty shard", ["-i", empty, "-j", d[3]] + TINY + out, "empty.bin")
        trunc = os.path.join(tmp, "trunc.bin")
        write_shard(trunc, tokens(500, 4), count=600)
        expect_error("truncated shard", ["-i", trunc, "-j", d[3]] + TINY + out, "trunc.bin")
        foreign = os.path.join(tmp, "foreign.bin")
        with open(foreign, "wb") as f:
            f.write(bytes(range(256)) * 20)
        expect_error("foreign file as shard", ["-i", foreign, "-j", d[3]] + TINY + out, "foreign.bin")
        badver = os.path.join(tmp, "badver.bin")
        write_shard(badver, tokens(500, 4), version=3, width=2)
        expect_error("shard of an unknown version", ["-i", badver, "-j", d[3]] + TINY + out, "badver.bin")
        short = os.path.join(tmp, "short.bin")
        write_shard(short, tokens(10, 4))
        expect_error("shard shorter than one row", ["-i", short, "-j", d[3]] + TINY + out, "short.bin")
        big = os.path.join(tmp, "bigtoken.bin")
        write_shard(big, tokens(400, 5) + [60000] + tokens(400, 6))
        expect_error("token id >= V", ["-i", big, "-j", d[3]] + TINY + out + ["-n", "50", "-v", "0"], "bigtoken.bin")

        # Bad checkpoints.
        ck = os.path.join(full, "ckpt_00000008.bin")
        blob = open(ck, "rb").read()
        for name, content, mention in [("truncated checkpoint", blob[:-100], "truncated"),
                                       ("checkpoint of another magic", struct.pack("<i", 1234) + blob[4:], "not a unipool checkpoint"),
                                       ("checkpoint header only", blob[:1000], "shorter than its header")]:
            path = os.path.join(tmp, name.replace(" ", "_") + ".bin")
            open(path, "wb").write(content)
            expect_error(name, d + ["-r", path] + out, mention)
        expect_error("resume with another model's flags", d + ["-r", ck, "-L", "4"] + out, "model flags", code=2)
        expect_error("resume with fewer steps than done", d + ["-r", ck, "-n", "6"] + out, "-n 6", code=2)
        damaged_headers(tmp, d, blob, out)
        other_shards(tmp, d)
        expect_error("resume 'latest' with no checkpoint", d + ["-r", "latest", "-O", os.path.join(tmp, "none")], "no checkpoint")

        # Bad flags: exit 2, naming the flag.
        expect_error("unknown flag", ["-x", "1"], "-x", code=2)
        expect_error("bad number", ["-b", "two"], "-b", code=2)
        expect_error("number out of range", ["-t", "0"], "-t", code=2)
        expect_error("missing value", ["-n"], "-n", code=2)
        expect_error("bad choice", ["-o", "shared"], "-o", code=2)
        expect_error("G not dividing L", ["-L", "6", "-g", "4"], "-g", code=2)
        expect_error("T beyond maxT", ["-t", "2048"], "-t", code=2)
        expect_error("K beyond E", ["-k", "9", "-e", "8"], "K", code=2)
        expect_error("-R sigmoid with an aux loss", ["-R", "sigmoid", "-a", "layer"], "-a layer", code=2)
        expect_error("a negative bias rate", ["-R", "sigmoid", "-br", "-1"], "-br", code=2)
        expect_error("-br without the sigmoid router", ["-R", "norm", "-br", "1e-3"], "-br", code=2)
        expect_error("a zero init std", ["-I", "0"], "-I", code=2)
        expect_error("an init std that is not a number", ["-I", "small"], "-I", code=2)

        # NaN: a checkpoint whose parameters hold a NaN stops the run, naming the step, keeping the checkpoint.
        nan_dir = os.path.join(tmp, "nan")
        os.mkdir(nan_dir)
        header, LE = CKPT_HEADER + CKPT_PATH_BLOCK, 2 * 4  # L * E of TINY
        P = (len(blob) - header - 4 * LE) // 12  # parameters, AdamW m and v
        poisoned = blob[:header] + struct.pack("<f", float("nan")) * P + blob[header + 4 * P:]
        open(os.path.join(nan_dir, "ckpt_00000008.bin"), "wb").write(poisoned)
        expect_error("NaN in training", d + ["-r", "latest", "-O", nan_dir, "-n", "12", "-v", "0"], "step 9")
        check("NaN: the last checkpoint is kept", open(os.path.join(nan_dir, "ckpt_00000008.bin"), "rb").read() == poisoned)

        # A full disk while saving: a clear error, and the previous checkpoint survives whole.
        disk = os.path.join(tmp, "disk")
        r = run(d + TINY + ["-n", "2", "-K", "2", "-O", disk])
        first = open(os.path.join(disk, "ckpt_00000002.bin"), "rb").read()
        expect_error("disk full while saving", d + ["-r", "latest", "-O", disk, "-n", "4", "-K", "4"], "cannot write checkpoint",
                     limit_fsize=len(first) // 2)
        check("disk full: previous checkpoint intact, no temporary left",
              open(os.path.join(disk, "ckpt_00000002.bin"), "rb").read() == first and
              sorted(os.listdir(disk)) == ["ckpt_00000002.bin", "log.jsonl"], str(sorted(os.listdir(disk))))

        kills(tmp, d, full)
        early_checks(tmp, d)
        eta_and_never(tmp, d)
    print("%s: %d failed" % (os.path.basename(__file__), len(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
