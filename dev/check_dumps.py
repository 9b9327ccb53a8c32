"""Regenerate the reference-dump suite and compare it with the committed dev/dumps/.

    /usr/bin/python3 dev/check_dumps.py [--dumps DIR]

Header, hparams, tokens and initial params must match exactly, and so must the
sigmoid router's final expert bias (float32 steps of +-bias_rate decided by
integer counts: once the routing agrees, no rounding can differ); the other
computed sections (logits, stats, grads, final) per element to within 2
float32 ulps or 1e-6 relative, whichever is looser. Exits 0 when every file matches, else 1
with one line per failing file.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from make_dumps import CASES, DEFAULT_OUT, make_case
from read_dump import load_dump

EXACT = ["header_raw", "hparams_raw", "tokens", "params", "bias"]   # "bias": router 2 only
COMPUTED = ["logits", "stats", "grads", "final"]
MAX_ULPS = 2
MAX_REL = 1e-6


def excess(ref, new):
    """Per element |new - ref| divided by its allowance max(2 ulp(ref), 1e-6 |ref|): <= 1 passes."""
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    ulp = np.spacing(np.abs(ref)).astype(np.float64)
    allowed = np.maximum(MAX_ULPS * ulp, MAX_REL * np.abs(ref64))
    return np.abs(new64 - ref64) / allowed


def compare(ref_path, new_path):
    """(problem or None, description of the worst computed difference)."""
    try:
        ref = load_dump(ref_path)
    except (OSError, ValueError) as e:
        return str(e), ""
    new = load_dump(new_path)
    for key in EXACT:   # equal headers: both files hold the same sections
        if key in ref and ref[key].tobytes() != new[key].tobytes():
            return f"{key} differ", ""
    worst_key, worst_index, worst_ratio = None, 0, 0.0
    for key in COMPUTED:
        ratio = excess(ref[key], new[key])
        i = int(np.argmax(ratio))
        if ratio[i] > worst_ratio or worst_key is None:
            worst_key, worst_index, worst_ratio = key, i, float(ratio[i])
    r, n = ref[worst_key][worst_index], new[worst_key][worst_index]
    worst = (f"worst {worst_key}[{worst_index}]: {r:.9g} vs {n:.9g} "
             f"({worst_ratio:.2f} of the allowance)")
    return (worst if worst_ratio > 1 else None), worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", default=DEFAULT_OUT, help="committed dumps (default dev/dumps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    passed = failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        expected = {case.name + ".bin" for case in CASES}
        present = set(os.listdir(args.dumps)) if os.path.isdir(args.dumps) else set()
        for extra in sorted(present - expected):
            print(f"FAIL {extra}: not made by make_dumps.py")
            failures += 1
        for case in CASES:
            make_case(case, tmp)
            name = case.name + ".bin"
            problem, worst = compare(os.path.join(args.dumps, name), os.path.join(tmp, name))
            if problem:
                print(f"FAIL {name}: {problem}")
                failures += 1
            else:
                print(f"ok   {name}: {worst}")
                passed += 1
    print(f"{passed} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
