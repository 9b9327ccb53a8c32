#!/usr/bin/env python3
"""Tests of the training program as a user runs it: resume is bit-exact, and
bad input (missing, empty, truncated or foreign files, token ids out of range,
wrong checkpoints, bad flags, NaN, a full disk) gets a one-line error naming
the file or flag and a non-zero exit, never a crash.

    python3 dev/test_train.py        (from the repository root, after make)

Standard library only; tiny synthetic shards in a temporary folder.
"""
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from magic import magic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_unipool")
TINY = ["-L", "2", "-C", "32", "-NH", "2", "-NKV", "1", "-F", "32", "-e", "4", "-t", "16", "-b", "2",
        "-v", "2", "-V", "2", "-S", "0", "-T", "1"]
failures = []


def check(name, ok, detail=""):
    print(("OK     " if ok else "NOT OK ") + name + ("" if ok else ": " + detail))
    if not ok:
        failures.append(name)


def write_shard(path, tokens, version=None, count=None, width=None):
    version = magic("SHARD_VERSION_U16") if version is None else version
    width = width or (2 if version == magic("SHARD_VERSION_U16") else 4)
    header = [0] * 256
    header[0], header[1], header[2] = magic("SHARD_MAGIC"), version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack("<%d%s" % (len(tokens), "H" if width == 2 else "I"), *tokens))


def tokens(n, seed):
    x, out = seed, []
    for _ in range(n):  # a small LCG: deterministic, with structure to learn
        x = (x * 1103515245 + 12345) % 2**31
        out.append((out[-1] * 7 + (x >> 16) % 5) % 1000 if out else 1)
    return out


def run(args, limit_fsize=None):
    def pre():
        if limit_fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    return subprocess.run([TRAIN] + args, capture_output=True, text=True, timeout=300, preexec_fn=pre)


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
    r = run(args, **kw)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = (r.returncode != 0 and 0 < r.returncode < 128 and (code is None or r.returncode == code)
          and len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0])
    check(name, ok, "exit %d, stderr %r" % (r.returncode, r.stderr[-400:]))
    return r


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

        # infer_unipool on the run's checkpoint.
        infer = os.path.join(ROOT, "infer_unipool")
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
        p = subprocess.run([infer, "probe", "-c", ck8, "-i", d[3], "-n", "2"], capture_output=True, text=True)
        check("probe reports the deep layer and the mean", p.returncode == 0 and re.search(r"^\s+1 \|", p.stdout, re.M)
              and "mean" in p.stdout, p.stdout + p.stderr)
        table = os.path.join(tmp, "tok.bin")
        with open(table, "wb") as f:  # a tokenizer table whose token i prints as "<i>"
            f.write(struct.pack("<256I", *([magic("TOKENIZER_MAGIC"), magic("TOKENIZER_VERSION"), 50257, 50256] + [0] * 252)))
            for i in range(50257):
                b = ("<%d>" % i).encode()
                f.write(bytes([len(b)]) + b)
        g = [subprocess.run([infer, "gen", "-c", ck8, "-z", table, "-n", "12", "-s", s], capture_output=True, text=True)
             for s in ("5", "5", "6")]
        check("gen: same seed same text, another seed other text", g[0].returncode == 0 and g[0].stdout == g[1].stdout
              and g[0].stdout != g[2].stdout and g[0].stdout.count("<") == 12, g[0].stdout + g[0].stderr)

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

        # NaN: a checkpoint whose parameters hold a NaN stops the run, naming the step, keeping the checkpoint.
        nan_dir = os.path.join(tmp, "nan")
        os.mkdir(nan_dir)
        header, LE = 1024 + 256 + 256, 2 * 4  # L * E of TINY
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
    print("%s: %d failed" % (os.path.basename(__file__), len(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
