#!/usr/bin/env python3
"""Data parallelism on this machine: tokens/s of 2 ranks x 1 thread (train_unipool_mpi) against
1 process x 2 threads and 1 process x 1 thread (train_unipool), side by side, in alternating rounds
(the machine's speed drifts), at make train's batch for tiny vanilla MoE and tiny UniPool.

    make train_unipool train_unipool_mpi data && python3 dev/bench/mpi.py [--rounds 2] [--steps 12]

Each figure is the median over rounds of a run's mean tokens/s over its steps after the first two.
Standard library only.
"""
import argparse
import os
import re
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = [("tiny vanilla", ["-o", "layer"]), ("tiny UniPool", ["-o", "pool"])]
MODES = [("1 process x 2 threads", None, 2), ("2 ranks x 1 thread", 2, 1), ("1 process x 1 thread", None, 1)]


def tok_per_s(ranks, threads, flags, steps, out):
    args = ["-p", "tiny", "-b", "16", "-t", "128", "-n", str(steps), "-v", "0", "-S", "0", "-K", "never",
            "-T", str(threads), "-O", out] + flags
    if ranks:
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd = ["mpirun"] + root + ["--oversubscribe", "--bind-to", "none", "-np", str(ranks),
                                   os.path.join(ROOT, "train_unipool_mpi")] + args
    else:
        cmd = [os.path.join(ROOT, "train_unipool")] + args
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    rates = [float(m.group(1)) for m in re.finditer(r"\| ([0-9.]+) tok/s", r.stdout)]
    return statistics.mean(rates[2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    res = {(c, m): [] for c, _ in CONFIGS for m, _, _ in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.rounds):
            for c, flags in CONFIGS:
                for m, ranks, threads in (MODES if k % 2 == 0 else MODES[::-1]):
                    res[(c, m)].append(tok_per_s(ranks, threads, flags, a.steps, os.path.join(tmp, "out")))
                    print("round %d  %-13s %-22s %7.0f tok/s" % (k + 1, c, m, res[(c, m)][-1]), flush=True)
    print("\n| config, B 16 T 128 | " + " | ".join(m for m, _, _ in MODES) + " | 2 ranks / 1 process x 2 threads |")
    print("|---|" + "---|" * (len(MODES) + 1))
    for c, _ in CONFIGS:
        med = [statistics.median(res[(c, m)]) for m, _, _ in MODES]
        print("| %s | %s | %.2f |" % (c, " | ".join("%.0f" % x for x in med), med[1] / med[0]))


if __name__ == "__main__":
    main()
