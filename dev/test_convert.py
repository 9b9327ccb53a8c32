#!/usr/bin/env python3
"""Tests of dev/convert.py against the C programs: for a vanilla MoE, a UniPool
model with the NormRouter and top-2 grouped pools (L 4, G 2), each trained for
a few steps by ./train_unipool,
  - `convert.py check` passes (PyTorch float64/float32 vs ./infer_unipool),
  - ckpt -> pt -> ckpt is byte-identical,
  - the parameters of the torch file give the same PyTorch loss as the checkpoint,
  - a parameters-only checkpoint made from the torch file is accepted by
    ./infer_unipool with the same loss and round-trips byte-identically,
  - truncated checkpoints and foreign files get one line 'error: ...' naming
    the file and exit status 1 (the same message as the C reader's for a
    truncated checkpoint).

    /usr/bin/python3 dev/test_convert.py      (from anywhere, after make)

Needs torch and numpy, the built programs and data/sotu (make data).
"""
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

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
import torch  # noqa: E402
import convert  # noqa: E402

# Tiny models, trained long enough (lr 3e-3) that tensors differ clearly from their init: a
# misplaced tensor then moves the loss far beyond check's tolerance.
COMMON = ["-C", "32", "-NH", "2", "-NKV", "1", "-F", "32", "-t", "32", "-b", "2", "-n", "20", "-l", "3e-3",
          "-w", "2", "-v", "0", "-S", "0", "-K", "0", "-T", "1", "-i", TRAIN_SHARDS, "-j", VAL_SHARD]
CASES = [
    ("vanilla", ["-L", "2", "-o", "layer", "-e", "4"]),
    ("unipool-norm", ["-L", "2", "-o", "pool", "-R", "norm", "-e", "8"]),
    ("grouped-top2", ["-L", "4", "-g", "2", "-k", "2", "-e", "4"]),
]
PY = sys.executable
failures = []


def check(name, ok, detail=""):
    print(("OK     " if ok else "NOT OK ") + name + ("" if ok else ": " + detail), flush=True)
    if not ok:
        failures.append(name)


def run_all(cmds):
    """Runs commands in parallel; returns their CompletedProcess-like results in order."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def one_line_error(r, path):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return (r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0],
            "exit %d, stderr %r" % (r.returncode, r.stderr[-400:]))


def eval_loss(ckpt):
    r = subprocess.run([INFER, "eval", "-c", ckpt, "-i", VAL_SHARD, "-b", "2", "-t", "32", "-n", "1"],
                       capture_output=True, text=True)
    m = re.search(r"loss (\S+), perplexity", r.stdout)
    return m.group(1) if r.returncode == 0 and m else "exit %d: %s" % (r.returncode, r.stderr.strip()[-300:])


def train(out, flags):
    r = subprocess.run([TRAIN] + COMMON + flags + ["-O", out], capture_output=True, text=True, timeout=300)
    found = sorted(glob.glob(os.path.join(out, "ckpt_*.bin")))
    if r.returncode != 0 or not found:
        print("error: ./train_unipool %s failed: %s" % (" ".join(flags), r.stderr.strip()[-400:]), file=sys.stderr)
        sys.exit(1)
    return found[-1]


def test_case(name, flags, tmp, idx):
    out = os.path.join(tmp, name)
    ckpt = train(out, flags)
    pt, back = os.path.join(out, "a.pt"), os.path.join(out, "back.bin")
    cut = os.path.join(out, "cut.bin")

    # check, and the conversion ckpt -> pt, in parallel
    r_check, r_pt = run_all([[PY, CONVERT, "check", ckpt, VAL_SHARD], [PY, CONVERT, "to-torch", ckpt, pt]])
    rel = re.findall(r"PyTorch (float\d\d) +loss (\S+) +relative difference (\S+)", r_check.stdout)
    c_line = re.search(r"\(C, float32\) +loss (\S+)", r_check.stdout)
    check(name + ": check passes", r_check.returncode == 0 and len(rel) == 2, r_check.stdout + r_check.stderr)
    for dt, loss, rd in rel:
        print("         %s: C %s, PyTorch %s %s, relative difference %s"
              % (name, c_line.group(1) if c_line else "?", dt, loss, rd))
    check(name + ": to-torch", r_pt.returncode == 0, r_pt.stderr)

    r = subprocess.run([PY, CONVERT, "to-ckpt", pt, back], capture_output=True, text=True)
    with open(ckpt, "rb") as f:
        orig = f.read()
    same = r.returncode == 0 and os.path.exists(back) and open(back, "rb").read() == orig
    check(name + ": ckpt -> pt -> ckpt is byte-identical", same, r.stderr)

    # the torch file's parameters against the checkpoint's, through the PyTorch model
    ck = convert.read_checkpoint(ckpt)
    d = torch.load(pt)
    x, y = convert.read_batch(VAL_SHARD, 2, 32, ck["config"]["V"])
    for dtype in (torch.float64, torch.float32):
        a = convert.torch_loss(convert.build_model(ck, dtype), x, y)
        b = convert.torch_loss(convert.model_from_torch(d, dtype), x, y)
        check("%s: torch file's parameters give the checkpoint's PyTorch loss (%s)" % (name, dtype), a == b,
              "%r vs %r" % (a, b))
    L, E = ck["config"]["L"], ck["config"]["E"]
    check(name + ": torch file holds the training state",
          d["step"] == 20 and d["adam_t"] == 20 and d["adam_m"].shape == (len(ck["params"]),) and
          d["adam_v"].dtype == torch.float32 and d["prev_f"] is not None and d["prev_f"].shape == (L, E) and
          d["train"]["T"] == 32 and d["train"]["row"] == ck["train"]["row"] and
          torch.equal(d["prev_f"], torch.from_numpy(ck["prev_f"])), str({k: d[k] for k in ("step", "adam_t")}))

    # a parameters-only checkpoint from the torch file: the C program reads it, same loss; round trip
    po_pt, po_ckpt, po_pt2, po_back = (os.path.join(out, n) for n in ("po.pt", "po.bin", "po2.pt", "po2.bin"))
    torch.save({"config": d["config"], "state_dict": d["state_dict"],
                "train": {k: d["train"][k] for k in convert.TRAIN_CONFIG_KEYS}}, po_pt)
    rc = convert.main(["to-ckpt", po_pt, po_ckpt])
    size_ok = rc == 0 and os.path.getsize(po_ckpt) == convert.checkpoint_size(ck["config"], False)
    check(name + ": parameters-only checkpoint has the parameters-only size", size_ok)
    l_orig, l_po = eval_loss(ckpt), eval_loss(po_ckpt)
    check(name + ": infer_unipool gives the same loss on the parameters-only checkpoint", l_orig == l_po,
          "%s vs %s" % (l_orig, l_po))
    rc = convert.main(["to-torch", po_ckpt, po_pt2]) or convert.main(["to-ckpt", po_pt2, po_back])
    check(name + ": parameters-only round trip is byte-identical",
          rc == 0 and open(po_back, "rb").read() == open(po_ckpt, "rb").read())

    # truncated checkpoints (a different cut per case) and foreign files
    header = convert.HEADER_BYTES
    cut_at = [len(orig) - 1, header // 2, convert.checkpoint_size(ck["config"], False)][idx]
    with open(cut, "wb") as f:
        f.write(orig[:cut_at])
    foreign = [VAL_SHARD, pt, CONVERT][idx]
    junk = os.path.join(out, "junk.pt")
    with open(junk, "wb") as f:
        f.write(os.urandom(3000))
    results = run_all([[PY, CONVERT, "to-torch", cut, os.path.join(out, "x.pt")],
                       [PY, CONVERT, "check", cut, VAL_SHARD],
                       [INFER, "eval", "-c", cut, "-i", VAL_SHARD],
                       [PY, CONVERT, "to-torch", foreign, os.path.join(out, "y.pt")],
                       [PY, CONVERT, "to-ckpt", [ckpt, junk, VAL_SHARD][idx], os.path.join(out, "z.bin")]])
    r_tt, r_chk, r_c, r_ft, r_fc = results
    check(name + ": truncated checkpoint (%d of %d bytes), to-torch: one-line error" % (cut_at, len(orig)),
          *one_line_error(r_tt, cut))
    check(name + ": truncated checkpoint, check: one-line error", *one_line_error(r_chk, cut))
    check(name + ": truncated checkpoint: the C reader's message", r_tt.stderr == r_c.stderr,
          "%r vs %r" % (r_tt.stderr, r_c.stderr))
    check(name + ": foreign file %s, to-torch: one-line error" % os.path.basename(foreign),
          *one_line_error(r_ft, foreign))
    check(name + ": foreign file, to-ckpt: one-line error", *one_line_error(r_fc, r_fc.args[2]))
    check(name + ": no output left behind by failed conversions",
          not any(os.path.exists(os.path.join(out, n)) for n in ("x.pt", "y.pt", "z.bin", "z.bin.tmp")))


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(CASES):
            test_case(name, flags, tmp, i)
    print("%s (%.0f s)" % ("FAILED: %d" % len(failures) if failures else "all passed", time.time() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
