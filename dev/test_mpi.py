#!/usr/bin/env python3
"""Tests of data-parallel training over MPI (train_unipool_mpi, make MPI=1) on this machine:

- one rank of the MPI build is the plain program: the same checkpoint, byte for byte;
- two ranks train what one process trains, for vanilla MoE (softmax, per-layer aux), UniPool
  (NormRouter, stale pool aux) and the sigmoid router (K = 2, expert bias): the same printed losses,
  and parameters and AdamW state within float32 rounding of the one-process run's;
- two ranks give the same bits twice (every sum in a fixed order);
- checkpoints cross rank counts: a 2-rank checkpoint resumes under 1 rank and a 1-rank checkpoint under
  2 ranks with the numbers of the uninterrupted run, and 2 ranks resume their own bit for bit;
- the AdamW state is sharded: each of 2 ranks reports half the optimizer memory;
- failures end the whole job with a message and a non-zero exit, never a hang: a -b the ranks do not
  divide, a missing shard, a rank killed mid-run.

    python3 dev/test_mpi.py              (after make train_unipool_mpi and make data)
    python3 dev/test_mpi.py unipool      one model's checks only (dev/mutants.py)

TRAIN_UNIPOOL and TRAIN_UNIPOOL_MPI name other builds of the two programs (dev/mutants.py).

Without mpicc or mpirun it says so and exits 0, unless UNIPOOL_REQUIRE_MPI=1 (CI), which makes that a
failure. numpy for the checkpoint comparisons.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = os.environ.get("TRAIN_UNIPOOL", os.path.join(ROOT, "train_unipool"))
MPI = os.environ.get("TRAIN_UNIPOOL_MPI", os.path.join(ROOT, "train_unipool_mpi"))
CKPT_BODY = 1024 + 256 + 256 + 3 * 1024  # header blocks and data paths (version 2): the floats follow
# a tiny model on the default corpus, 6 steps with a checkpoint every 3, one thread per rank
RUN = ["-p", "tiny", "-L", "2", "-C", "64", "-NH", "2", "-NKV", "1", "-F", "64", "-b", "4", "-t", "32", "-m", "2",
       "-n", "6", "-l", "3e-3", "-w", "2", "-v", "3", "-V", "2", "-S", "0", "-K", "3", "-N", "3", "-T", "1"]
ARMS = {"vanilla": ["-o", "layer"], "unipool": ["-o", "pool", "-e", "8"], "sigmoid": ["-o", "layer", "-R", "sigmoid", "-k", "2"]}
# root may run mpirun only when it says so (CI runs as root); ranks may outnumber the cores
MPIRUN = ["mpirun"] + (["--allow-run-as-root"] if os.geteuid() == 0 else []) + ["--oversubscribe"]
failures = []


def check(name, ok, detail=""):
    print(("OK     " if ok else "NOT OK ") + name + ("" if ok else ": " + detail))
    if not ok:
        failures.append(name)


def mpirun(n, args, **kw):
    cmd = MPIRUN + ["-np", str(n), MPI] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), cwd=ROOT, **kw)


def train(ranks, args, out):
    """ranks 0: the plain program; else the MPI build on that many ranks."""
    args = args + ["-O", out]
    r = (subprocess.run([PLAIN] + args, capture_output=True, text=True, timeout=300, cwd=ROOT) if ranks == 0
         else mpirun(ranks, args))
    if r.returncode != 0:
        check("run %s on %d rank(s)" % (" ".join(args), ranks), False, r.stderr[-600:])
    return r


def steps(stdout):
    """The printed losses: step, loss, aux, lr and norm of each step; the val lines without the
    perplexity (exp(loss) to 9 digits shows the order of the loss's double sum, the loss does not)."""
    return [" | ".join(l.split(" | ")[:5]) if l.startswith("step ") else re.sub(r" \| ppl [0-9.]+", "", l)
            for l in stdout.splitlines() if l.startswith("step ") or l.startswith("val step")]


def floats(path):
    return np.fromfile(path, dtype="<f4", offset=CKPT_BODY)


def close(a, b, ref, what):
    """a and b (checkpoint bodies: parameters, expert bias, AdamW m and v, stale statistic) agree to
    float32 rounding: their difference is below 1e-3 of how far training moved a from ref (a
    checkpoint 3 steps earlier). A wrong formula moves them apart by the size of the update itself."""
    rel = np.linalg.norm(a - b) / np.linalg.norm(a - ref)
    check(what, a.shape == b.shape and rel < 1e-3, "difference %.3g of the update" % rel)
    return rel


def ckpt(out, step):
    return os.path.join(out, "ckpt_%08d.bin" % step)


def memory_and_failures(tmp):
    """The AdamW memory per rank; failures that must end the job."""
    # ZeRO stage 1: the AdamW memory per rank
    def adamw_mib(stdout):
        m = re.search(r"AdamW ([0-9.]+) MiB", stdout)
        return float(m.group(1)) if m else -1
    one = mpirun(1, RUN + ["-n", "1", "-v", "0", "-K", "never", "-O", os.path.join(tmp, "mem1")])
    two = mpirun(2, RUN + ["-n", "1", "-v", "0", "-K", "never", "-O", os.path.join(tmp, "mem2")])
    check("2 ranks keep half the AdamW state each (%.1f against %.1f MiB)" % (adamw_mib(two.stdout),
          adamw_mib(one.stdout)), abs(2 * adamw_mib(two.stdout) - adamw_mib(one.stdout)) < 0.2
          and "memory per rank" in two.stdout)

    # failures end the job: a message, a non-zero exit, no hang
    def fails(name, args, mentions, code):
        try:
            r = mpirun(2, args, timeout=60)
        except subprocess.TimeoutExpired:
            return check(name, False, "still running after 60 s")
        errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
        check(name, r.returncode == code and errors and all(mentions in l for l in errors),
              "exit %d, stderr %r" % (r.returncode, r.stderr[-600:]))
    fails("-b 3 on 2 ranks: a usage error naming -b, exit 2", RUN + ["-b", "3", "-O", os.path.join(tmp, "b3")],
          "-b 3 is not a multiple of the 2 ranks", 2)
    fails("a missing shard: an error naming it, exit 1", RUN + ["-i", os.path.join(tmp, "none_*.bin"), "-O",
          os.path.join(tmp, "miss")], "none_*.bin", 1)

    # a rank killed mid-run ends the job within seconds
    out = os.path.join(tmp, "killed")
    p = subprocess.Popen(MPIRUN + ["-np", "2", MPI] + RUN +
                         ["-n", "100000", "-v", "0", "-K", "never", "-O", out], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = False
    for line in p.stdout:
        if line.startswith("step     2/"):
            started = True
            break
    pids = subprocess.run(["pgrep", "-f", "^%s .* -O %s" % (MPI, out)], capture_output=True,
                          text=True).stdout.split()
    if started and len(pids) == 2:
        os.kill(int(pids[-1]), signal.SIGKILL)
        t = time.time()
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
        check("a rank killed mid-run ends the job in %.1f s with exit %s" % (time.time() - t, rc),
              rc not in (None, 0) and time.time() - t < 15)
    else:
        p.kill()
        p.wait()
        check("a rank killed mid-run ends the job", False, "the run did not start (%d processes)" % len(pids))


def main():
    have = shutil.which("mpirun") and os.path.exists(MPI)
    if not have:
        print("skipped: no mpirun or no train_unipool_mpi (apt-get install libopenmpi-dev openmpi-bin; make "
              "train_unipool_mpi)")
        return 1 if os.environ.get("UNIPOOL_REQUIRE_MPI") == "1" else 0
    tmp = tempfile.mkdtemp(prefix="unipool_mpi_")
    t0 = time.time()
    try:
        only = sys.argv[1:]
        for arm, flags in ARMS.items():
            if only and arm not in only:
                continue
            args, d = RUN + flags, os.path.join(tmp, arm)
            plain, one, two, again = train(0, args, d + "_plain"), train(1, args, d + "_1"), train(2, args, d + "_2"), \
                train(2, args, d + "_2again")
            last = ckpt(d + "_1", 6)
            check(arm + ": one rank of the MPI build is the plain program, byte for byte",
                  open(ckpt(d + "_plain", 6), "rb").read() == open(last, "rb").read()
                  and steps(plain.stdout) == steps(one.stdout))
            check(arm + ": 2 ranks print the losses of 1 (step, loss, aux, lr, norm; val lines)",
                  steps(two.stdout) == steps(one.stdout) and len(steps(two.stdout)) == 9,
                  "\n".join(a + "\n  vs " + b for a, b in zip(steps(one.stdout), steps(two.stdout)) if a != b))
            rel = close(floats(last), floats(ckpt(d + "_2", 6)), floats(ckpt(d + "_1", 3)),
                        arm + ": 2 ranks' final checkpoint is 1 rank's to float32 rounding")
            print("       (difference %.2g of the last 3 steps' update)" % rel)
            check(arm + ": 2 ranks twice give the same bits",
                  open(ckpt(d + "_2", 6), "rb").read() == open(ckpt(d + "_2again", 6), "rb").read())
            # resume across rank counts, from the step-3 checkpoints
            for src, ranks in ((d + "_2", 1), (d + "_1", 2), (d + "_2", 2)):
                out = "%s_from%s_on%d" % (d, src[-1], ranks)
                os.makedirs(out)
                shutil.copy(ckpt(src, 3), out)
                r = train(ranks, ["-r", "latest", "-T", "1"], out)
                what = "%s: a %s-rank checkpoint resumed on %d rank%s" % (arm, src[-1], ranks, "s" * (ranks > 1))
                full = steps(one.stdout if src.endswith("_1") else two.stdout)
                check(what + " prints the uninterrupted run's losses", steps(r.stdout) == full[-len(steps(r.stdout)):]
                      and len(steps(r.stdout)) == 5, "%s vs %s" % (steps(r.stdout), full[-5:]))
                if src[-1] == str(ranks):
                    check(what + " ends with its uninterrupted run's bits",
                          open(ckpt(out, 6), "rb").read() == open(ckpt(src, 6), "rb").read())
                else:
                    close(floats(ckpt(src, 6)), floats(ckpt(out, 6)), floats(ckpt(src, 3)),
                          what + " ends at the uninterrupted run's state to float32 rounding")
        if not only:
            memory_and_failures(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%s (%.0f s)" % ("all passed" if not failures else "FAILED: " + ", ".join(failures), time.time() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
