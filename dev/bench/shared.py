#!/usr/bin/env python3
"""A training step alone and beside a busy neighbour (README, "Speed": "On a shared machine").

    /usr/bin/python3 dev/bench/shared.py [--rounds 3] [--steps 12]

Runs ./train_unipool at `make train`'s configuration (tiny UniPool, B 16, T 128,
random order of the default corpus; needs `make train_unipool data`) under
each condition below, the conditions alternated round by round so that the
machine's drift falls on all of them alike. The neighbour is one busy
single-threaded process (a Python loop) started before the run and killed
after it. A run's figure is the median of its step times after the first two;
the table gives the median over rounds, the range, and the ratio to the
1-thread step beside the same neighbour.

The program picks its thread count beside other processes (train_unipool.c,
"Threads beside other processes") unless -T or OMP_NUM_THREADS sets it: the
rows with -T 2 show how it ran before it did, and what a fixed count costs.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (label, -T or None for the program's own choice, neighbour)
CONDITIONS = [
    ("alone, threads chosen by the program", None, False),
    ("alone, -T 2", 2, False),
    ("alone, -T 1", 1, False),
    ("one busy neighbour, threads chosen by the program", None, True),
    ("one busy neighbour, -T 2", 2, True),
    ("one busy neighbour, -T 1", 1, True),
]
STEP = re.compile(r"^step +\d+/\d+ \|.*\| ([0-9.]+) ms \|", re.M)


def run_once(threads, neighbour, steps, out):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = ["./train_unipool", "-p", "tiny", "-o", "pool", "-b", "16", "-t", "128", "-n", str(steps),
           "-l", "2e-3", "-w", "30", "-I", "0.025", "-A", "3e-4", "-v", "0", "-S", "0", "-K", "never",
           "-O", out] + (["-T", str(threads)] if threads else [])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
    try:
        if busy:
            time.sleep(0.5)  # the neighbour is running before the first step
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        if busy:
            busy.kill()
            busy.wait()
    if r.returncode != 0:
        sys.exit("error: %s exited %d: %s" % (" ".join(cmd), r.returncode, r.stderr.strip()[-300:]))
    ms = [float(x) for x in STEP.findall(r.stdout)]
    if len(ms) != steps:
        sys.exit("error: expected %d step lines from train_unipool, got %d" % (steps, len(ms)))
    return statistics.median(ms[2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    if a.steps < 3 or a.rounds < 1:
        ap.error("--steps must be at least 3 and --rounds at least 1")
    if not os.path.exists(os.path.join(ROOT, "train_unipool")):
        sys.exit("error: ./train_unipool is missing; run `make train_unipool data` first")
    print("date: %s; %d cores; rounds %d, steps %d (median of steps 3-%d)"
          % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.cpu_count(), a.rounds, a.steps, a.steps))
    got = {c[0]: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory() as out:
        for rnd in range(a.rounds):
            for label, threads, neighbour in CONDITIONS:
                got[label].append(run_once(threads, neighbour, a.steps, out))
                print("round %d: %-68s %7.0f ms/step" % (rnd + 1, label, got[label][-1]), flush=True)
    base = statistics.median(got["one busy neighbour, -T 1"])
    print("\n| condition | ms/step (median) | range | / -T 1 beside the neighbour |")
    print("|---|---|---|---|")
    for label, *_ in CONDITIONS:
        v = got[label]
        print("| %s | %.0f | %.0f-%.0f | %.2f |" % (label, statistics.median(v), min(v), max(v),
                                                    statistics.median(v) / base))


if __name__ == "__main__":
    main()
