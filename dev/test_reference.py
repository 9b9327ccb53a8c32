#!/usr/bin/env python3
"""The reference build against the fast one: /usr/bin/python3 dev/test_reference.py

train_unipool_ref (make REFERENCE=1's kernels: plain loops summing in float in
a fixed order, OpenMP over rows or heads, libm's exp) and train_unipool (cache-blocked GEMM, tiled attention, batched
expert products) train the same small model from the same seed for a few
steps, for vanilla MoE, UniPool and the sigmoid router. Each step's loss, aux
loss and gradient norm must agree to TOL.

Why TOL = 1e-5: both builds compute in float32 and differ only in the order
and precision of their sums. A sum of n float32 terms in another order moves
by about sqrt(n) ulps (6e-8 each), and the differences pass through a forward,
a backward and a few AdamW steps: the measured gap over these steps is below
2e-6 relative, while a wrong index or a missing term moves a loss by far more
than 1e-5. Routing is discrete, but at initialisation the runs' top-K margins
are far wider than float32 rounding.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
STEPS = 6
MODEL = ["-p", "tiny", "-L", "2", "-C", "64", "-NH", "2", "-NKV", "1", "-F", "128", "-e", "8",
         "-t", "32", "-b", "4", "-n", str(STEPS), "-v", "0", "-S", "0", "-K", "never", "-T", "1"]
MODES = {"vanilla": ["-o", "layer"], "unipool": ["-o", "pool"], "sigmoid": ["-o", "layer", "-R", "sigmoid"]}


def run(binary, extra, out):
    cmd = [os.path.join(ROOT, binary)] + MODEL + extra + ["-O", out]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.exit("FAIL   %s exited %d:\n%s" % (" ".join(cmd), r.returncode, r.stdout[-2000:]))
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [rec for rec in map(json.loads, f) if "loss" in rec]
    if len(steps) != STEPS:
        sys.exit("FAIL   %s logged %d steps, not %d" % (binary, len(steps), STEPS))
    return steps


def main():
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in MODES.items():
            fast = run("train_unipool", extra, os.path.join(tmp, name + "_fast"))
            ref = run("train_unipool_ref", extra, os.path.join(tmp, name + "_ref"))
            worst, at = 0.0, None
            for s, (a, b) in enumerate(zip(fast, ref)):
                for key in ("loss", "aux", "grad_norm"):
                    err = abs(a[key] - b[key]) / (1 + abs(b[key]))
                    if err > worst:
                        worst, at = err, "step %d %s: fast %.6f ref %.6f" % (s + 1, key, a[key], b[key])
            ok = worst <= TOL
            failed += not ok
            print("%s %s: reference build vs fast build over %d steps, max err %.2e (tol %.0e)%s"
                  % ("OK    " if ok else "FAIL  ", name, STEPS, worst, TOL, "" if ok else "; " + at))
    print("%d failed" % failed)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
