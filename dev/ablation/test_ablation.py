#!/usr/bin/env python3
"""Tests of dev/ablation/run.py, in groups:

    stats        the seed statistics against hand-worked figures: Welch and paired 95% intervals of a - b and
                 of a linear combination (the depth claim's (a - b) - (c - d)), Student t's quantile, the
                 resolved rule and the seeds a claim needs; the combination parser; the reduced pools' sizes
    diagnostics  the routing diagnostics of a hand-made util CSV: entropy, top-16 coverage, dead experts,
                 Jaccard overlap; I(S; E) and H(S) of hand-made counts by source, util -w's rows summed per
                 document, the baseline of source labels shuffled over documents
    report       the mix experiment's report from hand-made summaries: claims, resolved, seeds needed, the
                 gaps' course, diagnostics averaged over seeds, routing by source and the pool against each
                 vanilla router, paired over seeds
    select       --experiment: the mix experiment's dry run prints its recipe, data flags and seeds 101...,
                 the default the SOTU one's; unknown experiments and arms exit 2
    sotu         the SOTU report regenerated from the committed summaries is byte-identical to the committed one
    smoke        the SOTU experiment's --smoke micro model in a temporary folder (about 20 s on 2 cores):
                 every arm gets a summary with a finite val loss and per-layer health; the report lists every
                 arm and the probe; the SVG parses and has one mean line per arm; a second invocation trains
                 nothing; a deleted summary re-runs only its arm; a run stopped after its first checkpoint
                 resumes with -r latest and ends with the val loss of the uninterrupted run; a run that fails
                 is reported and the command exits 1
    mix          the mix experiment's --smoke (on data/sotu): every run's summary gets diagnostics from util
                 on its final checkpoint, seeds 101, and the by-source arms' summaries util's counts for
                 each of two sources (a train shard, the val shard); the report's diagnostics, by-source
                 and course sections; a second invocation runs neither training nor util; diagnostics
                 deleted from a summary come back from util alone

    python3 dev/ablation/test_ablation.py              every group (from anywhere; it builds nothing that
                                                       run.py does not)
    python3 dev/ablation/test_ablation.py stats sotu   only those groups

ABLATION_RUN=path tests another copy of run.py (dev/ablation/mutants.py's mutants; the copy must sit in
dev/ablation/, where run.py finds the repository). Standard library only.
"""
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.abspath(os.environ.get("ABLATION_RUN") or os.path.join(HERE, "run.py"))
spec = importlib.util.spec_from_file_location("ablation", RUN)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)
SOTU = ablation.EXPERIMENTS["sotu"]
MIX = ablation.EXPERIMENTS["mix"]
KEYS = [arm.key for arm in SOTU.arms]
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok or not detail else "\n" + detail), flush=True)
    if not ok:
        failures.append(name)


def near(x, y, tol=5e-4):
    return x is not None and y is not None and abs(x - y) < tol


# ---- stats ----

def test_versus():
    """Hand-worked: a = 6.0, 6.2, 6.1 and b = 5.9, 6.0, 6.2 over seeds 1-3. Welch: means 6.1 and 6.0333, sds
    0.1 and 0.15275, se = sqrt(0.01/3 + 0.023333/3) = 0.10541, df = 0.011111^2 / ((0.01/3)^2/2 + (0.023333/3)^2/2)
    = 3.45, so t(3) = 3.182 and the interval is 0.0667 +- 0.3354. Paired: differences 0.1, 0.2, -0.1, sd
    0.15275, se 0.08819, t(2) = 4.303, 0.0667 +- 0.3795."""
    v = ablation.versus({1: 6.0, 2: 6.2, 3: 6.1}, {1: 5.9, 2: 6.0, 3: 6.2})
    w, p = v["welch"], v["paired"]
    check("versus: Welch's difference, se, df and interval", near(w["diff"], 0.0667) and near(w["se"], 0.10541) and
          near(w["df"], 3.448) and near(w["lo"], 0.0667 - 0.3354) and near(w["hi"], 0.0667 + 0.3354), str(w))
    check("versus: the paired differences, se and interval", p["seeds"] == [1, 2, 3] and
          all(near(x, y) for x, y in zip(p["diffs"], [0.1, 0.2, -0.1])) and near(p["se"], 0.08819) and
          p["df"] == 2 and near(p["lo"], 0.0667 - 0.3795) and near(p["hi"], 0.0667 + 0.3795), str(p))
    check("versus: both intervals hold 0, within seed noise", v["verdict"] == "within seed noise", str(v))
    # The same spread, shifted: a sits 1 above b on every seed (paired interval 1 +- 0). Equal variances
    # and n give Welch df = 2 (n - 1) = 4, so its interval is 1 +- 2.776 x sqrt(0.01/3 + 0.01/3) = 1 +- 0.23.
    clear = ablation.versus({1: 7.0, 2: 7.2, 3: 7.1}, {1: 6.0, 2: 6.2, 3: 6.1})
    check("versus: a shift far outside the spread is beyond seed noise", clear["verdict"] == "beyond seed noise" and
          near(clear["welch"]["df"], 4) and
          near(clear["welch"]["hi"] - clear["welch"]["lo"], 2 * 2.776 * math.sqrt(0.02 / 3)), str(clear))
    # a sits 0.1 above b on every seed, but the seeds spread 0.4: the paired interval excludes 0 and Welch's
    # (se sqrt(0.04/3 + 0.04/3) = 0.163, df 4: 0.1 +- 0.45) holds it.
    split = ablation.versus({1: 6.1, 2: 6.5, 3: 6.3}, {1: 6.0, 2: 6.4, 3: 6.2})
    check("versus: a paired-only difference says so", split["verdict"] == "beyond seed noise in one test only" and
          split["welch"]["lo"] < 0 < split["paired"]["lo"], str(split))
    # Seeds 1 and 3 in common only: a paired test over them, a Welch test over everything.
    part = ablation.versus({1: 6.0, 3: 6.1}, {1: 5.9, 2: 6.0, 3: 6.2})
    check("versus: the paired test uses the shared seeds only", part["paired"]["seeds"] == [1, 3] and
          part["paired"]["df"] == 1 and part["welch"] is not None, str(part))
    # A by-source row: a = 6.0, 6.3 over seeds 1 and 3 against the b above: the paired mean over seeds 1 and
    # 3 is (0.1 + 0.1) / 2 = 0.1, Welch's difference of the means 6.15 - 6.0333 = 0.117, each beside its own
    # interval
    unequal = ablation.versus({1: 6.0, 3: 6.3}, {1: 5.9, 2: 6.0, 3: 6.2})
    line = ablation.md_source_pair(dict(a="x", b="y", **unequal))
    check("versus: a by-source row gives the paired mean and Welch's difference apart",
          line.startswith("| x - y | s1: +0.1000, s3: +0.1000 | +0.100 [") and "(df 1.0) | +0.117 [" in line, line)
    claim = dict(claim="c", a="x", b="y", paper=None, resolved=False, seeds_needed=None, **unequal)
    line = ablation.md_claims_resolved({"claims": [claim]})[-3]
    check("versus: a claims row gives Welch's difference, then the paired mean beside the paired interval",
          line.startswith("| c | x - y | - | +0.1167 | [") and "| s1: +0.1000, s3: +0.1000 | +0.1000 [" in line, line)
    check("versus: one seed in an arm compares nothing", ablation.versus({1: 6.0}, {1: 5.9, 2: 6.0}) ==
          {"welch": None, "paired": None, "verdict": None})


def test_t975():
    # A printed table's t(0.975, df) (any statistics textbook): df 1-10, 15-17, 20, 25, 30, 60, 120.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             15: 2.131, 16: 2.120, 17: 2.110, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000, 120: 1.980}
    got = {df: ablation.t975(df) for df in table}
    check("t975: Student t's 97.5% quantile to 3 decimals, df 1-120", got == table,
          str({df: (got[df], t) for df, t in table.items() if got[df] != t}))
    check("t975: df rounded down (a wider interval), 1 below 1, the normal's 1.960 at 10^6",
          [ablation.t975(df) for df in (0.4, 1.7, 3.9, 10 ** 6)] == [12.706, 12.706, 3.182, 1.96])


# The depth claim's hand-worked figures, seeds 101-103:
#   unipool (a) 5.90 5.95 5.85, vanilla_softmax (b) 6.00 6.02 5.98,
#   unipool_L4 (c) 6.10 6.16 6.07, vanilla_softmax_L4 (d) 6.15 6.20 6.10.
# Per seed (a - b) - (c - d) = (-0.10 - -0.05), (-0.07 - -0.04), (-0.13 - -0.03) = -0.05, -0.03, -0.10: mean
# -0.06, deviations 0.01 0.03 -0.04, sd sqrt(0.0026 / 2) = 0.036056, se 0.020817, t(2) 4.303: -0.06 +- 0.08957,
# [-0.1496, +0.0296]. Welch: means 5.90 6.00 6.11 6.15, -0.06; variances of the means 0.0025/3, 0.0004/3,
# 0.0021/3, 0.0025/3 (coefficients +-1 square to 1), sum 0.0025, se 0.05; df = 0.0025^2 / ((0.00083333^2 +
# 0.00013333^2 + 0.0007^2 + 0.00083333^2) / 2) = 6.25e-6 / 9.4833e-7 = 6.59, t(6) 2.447: -0.06 +- 0.12235.
DEPTH = {"unipool": [5.90, 5.95, 5.85], "vanilla_softmax": [6.00, 6.02, 5.98],
         "unipool_L4": [6.10, 6.16, 6.07], "vanilla_softmax_L4": [6.15, 6.20, 6.10]}
DEPTH_TEXT = "(unipool - vanilla_softmax) - (unipool_L4 - vanilla_softmax_L4)"
SEEDS = [101, 102, 103]


def by_seed(values):
    return dict(zip(SEEDS, values))


def check_depth(what, c):
    w, p = c["welch"], c["paired"]
    check(f"{what}: the depth claim's paired per-seed values, mean and interval",
          p is not None and p["seeds"] == SEEDS and
          all(near(x, y, 1e-9) for x, y in zip(p["diffs"], [-0.05, -0.03, -0.10]))
          and near(p["diff"], -0.06, 1e-9) and near(p["se"], 0.020817, 1e-6) and p["df"] == 2 and
          near(p["lo"], -0.149574, 1e-6) and near(p["hi"], 0.029574, 1e-6), json.dumps(p))
    check(f"{what}: the depth claim's Welch combination, se, df and interval",
          w is not None and near(w["diff"], -0.06, 1e-9) and near(w["se"], 0.05, 1e-9) and near(w["df"], 6.5905) and
          near(w["lo"], -0.18235, 1e-6) and near(w["hi"], 0.06235, 1e-6), json.dumps(w))
    check(f"{what}: both intervals hold 0", c["verdict"] == "within seed noise", str(c["verdict"]))


def test_combination():
    parse = ablation.parse_combination
    check("parse: a - b", parse("unipool - vanilla_softmax") == [("unipool", 1), ("vanilla_softmax", -1)])
    check("parse: (a - b) - (c - d) flips the signs inside the second bracket", parse(DEPTH_TEXT) ==
          [("unipool", 1), ("vanilla_softmax", -1), ("unipool_L4", -1), ("vanilla_softmax_L4", 1)],
          str(parse(DEPTH_TEXT)))
    check("parse: a key named twice is merged, and dropped at 0", parse("(a - b) - (a - c)") == [("b", -1), ("c", 1)]
          and parse("(a - b) + (b - a)") == [], str(parse("(a - b) - (a - c)")))
    bad = []
    for text in ("a -", "(a - b", "a b", "a - b)", "a * b"):
        try:
            parse(text)
            bad.append(text)
        except ValueError:
            pass
    check("parse: a malformed combination is an error", not bad, str(bad))
    check("pair: a - b is a pair, the depth claim is not", ablation.pair(parse("x - y")) == ("x", "y") and
          ablation.pair(parse(DEPTH_TEXT)) is None and ablation.pair(parse("y - x + z")) is None)
    check_depth("combine", ablation.combine([(c, by_seed(DEPTH[key])) for key, c in parse(DEPTH_TEXT)]))
    check("every experiment's record is consistent (claims and course name its arms, probed arms exist)",
          all(not ablation.problems(e) for e in ablation.EXPERIMENTS.values()),
          str({e.name: ablation.problems(e) for e in ablation.EXPERIMENTS.values()}))


def test_resolve():
    """The resolved rule: the paired interval excludes 0, or is at most 0.03 wide."""
    resolved = ablation.resolved
    check("resolved: an interval excluding 0 (below or above)", resolved({"lo": -0.2, "hi": -0.1}) and
          resolved({"lo": 0.001, "hi": 0.5}))
    check("resolved: an interval holding 0 exactly 0.03 wide is resolved, 0.0302 wide is not",
          resolved({"lo": -0.015, "hi": 0.015}) and not resolved({"lo": -0.0151, "hi": 0.0151}))
    check("resolved: no paired test is not resolved", resolved(None) is False)
    # Seeds needed. The depth figures: sd 0.036056, |mean| 0.06 > 0.015, so the target is |mean|: at n = 3,
    # 4.303 x 0.036056 / sqrt(3) = 0.0896 > 0.06; at n = 4, 3.182 x 0.036056 / 2 = 0.0574 < 0.06: 4 seeds.
    depth = ablation.combine([(c, by_seed(DEPTH[key])) for key, c in ablation.parse_combination(DEPTH_TEXT)])
    check("seeds needed: the |mean| target (depth: 4)", ablation.seeds_needed(depth["paired"]) == 4,
          str(ablation.seeds_needed(depth["paired"])))
    # Per-seed values 0.01, -0.02, 0.04: mean 0.01 < 0.015, sd 0.03, so the width target binds: n = 17 gives
    # t(16) 2.120 x 0.03 / sqrt(17) = 0.01543, n = 18 gives t(17) 2.110 x 0.03 / sqrt(18) = 0.01492 < 0.015: 18.
    small = ablation.combine([(1, {1: 6.01, 2: 5.98, 3: 6.04}), (-1, {1: 6.0, 2: 6.0, 3: 6.0})])
    check("seeds needed: the width target (0.015) when |mean| is smaller (18, with t beyond df 10)",
          ablation.seeds_needed(small["paired"]) == 18, str(ablation.seeds_needed(small["paired"])))
    check("seeds needed: not computable without a paired test", ablation.seeds_needed(None) is None)


def test_pools():
    a, s = ablation.setup(["--experiment", "mix"])
    flags = {arm.key: ablation.arm_flags(s, arm) for arm in MIX.arms}
    check("mix: pools of 2/3 and 41.6% of 8 x 8 layers are 43 and 27; the L 4 arms keep their -L",
          flags["unipool_r67"] == "-o pool -e 43" and flags["unipool_r42"] == "-o pool -e 27" and
          flags["unipool_L4"] == "-o pool -L 4", str(flags))
    check("a reduced pool uses the arm's own L: 2/3 of 8 x 4 = 21",
          ablation.arm_flags(s, ablation.Arm("x", "x", None, "-o pool -L 4 -e {r67}")) == "-o pool -L 4 -e 21")
    check("layers: -p sets the preset's L, a later -L overrides", [ablation.layers(f) for f in
          ("-p exp", "-p exp -L 4", "-p tiny -L 2 -o pool -L 4", "-b 4")] == [8, 4, 4, 4])
    _, sotu = ablation.setup([])
    check("sotu: the reduced pool is still 21", ablation.arm_flags(sotu, SOTU.arms[-1]) == "-o pool -e 21")


# ---- diagnostics ----

# Three layers over a pool of 20 (experts 0-19), top 16:
#   layer 0: experts 0-3 100 tokens each, the rest 0: entropy ln 4 / ln 20 = 0.462756, coverage 1 (only 4 have
#     tokens), 16 dead, top {0, 1, 2, 3}
#   layer 1: experts 0-17 10 each, expert 18 40, expert 19 0 (220 in all): entropy ((18/22) ln 22 + (2/11) ln 5.5)
#     / ln 20 = 0.947678; top 16 = expert 18 and, ties to the lower index, experts 0-14: (40 + 150) / 220 =
#     0.863636; 1 dead
#   layer 2: every expert 5: entropy 1, top {0..15}, coverage 16/20 = 0.8, 0 dead
# Jaccard: layers 0-1 4/16, 0-2 4/16, 1-2 |{0..14}| / |{0..15, 18}| = 15/17; mean (0.25 + 0.25 + 0.882353) / 3
# = 0.460784.
POOL_CSV = "layer,expert,tokens\n" + "".join(
    f"0,{e},{100 if e < 4 else 0}\n" for e in range(20)) + "".join(
    f"1,{e},{40 if e == 18 else 0 if e == 19 else 10}\n" for e in range(20)) + "".join(
    f"2,{e},5\n" for e in range(20))
# Vanilla: layer 0 owns experts 0-7 (5 5 5 5 0 0 0 20: entropy (4 x (1/8) ln 8 + (1/2) ln 2) / ln 8 = 2/3,
# 3 dead), layer 1 owns 8-15 (10 each: entropy 1); disjoint sets, Jaccard 0.
VANILLA_CSV = "layer,expert,tokens\n" + "".join(
    f"0,{e},{[5, 5, 5, 5, 0, 0, 0, 20][e]}\n" for e in range(8)) + "".join(f"1,{e},10\n" for e in range(8, 16))


def test_diagnostics():
    d = ablation.diagnose_csv(POOL_CSV)
    check("diagnostics: reachable experts per layer", d["reachable"] == [20, 20, 20] and d["layers"] == 3, str(d))
    check("diagnostics: load entropy normalised by log of the reachable experts",
          all(near(x, y, 1e-6) for x, y in zip(d["load_entropy"], [0.462756, 0.947678, 1.0])), str(d["load_entropy"]))
    check("diagnostics: top-16 coverage",
          all(near(x, y, 1e-6) for x, y in zip(d["top_coverage"], [1.0, 0.863636, 0.8])), str(d["top_coverage"]))
    check("diagnostics: dead experts", d["dead"] == [16, 1, 0], str(d["dead"]))
    check("diagnostics: top-16 sets (ties to the lower index, only experts with tokens)",
          d["top"] == [[0, 1, 2, 3], list(range(15)) + [18], list(range(16))], str(d["top"]))
    check("diagnostics: mean pairwise Jaccard of the top-16 sets", near(d["jaccard"], 0.460784, 1e-6),
          str(d["jaccard"]))
    v = ablation.diagnose_csv(VANILLA_CSV)
    check("diagnostics: vanilla layers own disjoint experts, Jaccard 0; its entropy and dead experts",
          v["jaccard"] == 0 and near(v["load_entropy"][0], 2 / 3, 1e-9) and near(v["load_entropy"][1], 1, 1e-9) and
          v["dead"] == [3, 0] and v["top_coverage"] == [1.0, 1.0], str(v))
    try:
        ablation.diagnose_csv("expert,tokens\n1,2\n")
        check("diagnostics: a CSV without util's header is an error", False)
    except ValueError:
        check("diagnostics: a CSV without util's header is an error", True)
    # By source, hand-worked. Two sources of 4 tokens, 3:1 and 1:3 over two experts: H(S) = 1 bit and
    # H(S | E) = H(3/4) = 0.811278, so I = 0.188722. Sources that split the same way over the experts (2:4:6
    # and 1:2:3) carry none: I = 0, H(S) = H(2/3) = 0.918296. Each source to its own expert: I = H(S) = H(1/4).
    info = ablation.source_information
    check("by source: I(S; E) and H(S) of a 2 x 2 table (0.188722 and 1 bit)",
          all(near(x, y, 1e-6) for x, y in zip(info({"a": [3, 1], "b": [1, 3]}), (0.188722, 1.0))),
          str(info({"a": [3, 1], "b": [1, 3]})))
    check("by source: sources that split alike over the experts carry no information",
          all(near(x, y, 1e-6) for x, y in zip(info({"a": [2, 4, 6], "b": [1, 2, 3]}), (0.0, 0.918296))),
          str(info({"a": [2, 4, 6], "b": [1, 2, 3]})))
    check("by source: an expert per source carries all of H(S), unused experts nothing",
          all(near(x, y, 1e-6) for x, y in zip(info({"a": [5, 0, 0], "b": [0, 15, 0]}), (0.811278, 0.811278))),
          str(info({"a": [5, 0, 0], "b": [0, 15, 0]})))
    # util -w's rows: document 0 has rows 0 and 1, document 3 row 2; layer 1's experts are 8 and 9.
    rows = "row,doc,layer,expert,tokens\n0,0,0,1,5\n0,0,1,9,5\n1,0,0,0,2\n1,0,0,1,3\n1,0,1,8,5\n2,3,0,0,5\n2,3,1,9,5\n"
    check("by source: util -w's rows summed per document, in each layer's expert order",
          ablation.read_rows_csv(rows, [[0, 1], [8, 9]]) == {0: [[2, 8], [5, 5]], 3: [[5, 0], [0, 5]]},
          str(ablation.read_rows_csv(rows, [[0, 1], [8, 9]])))
    # The baseline, hand-worked: four documents of 100 tokens, two of source a on expert 0 and two of b on
    # expert 1 (I = 1 bit). Shuffled, 2 of the 6 equally likely labellings keep the split (I = 1), the
    # other 4 give each source one document on each expert (I = 0): mean 1/3, sd sqrt(2/9) = 0.4714, 95th
    # percentile 1. 3000 draws estimate the mean to about 0.009 (sd / sqrt(3000)); shuffling tokens
    # instead of documents would give about 0.
    docs = [("a", [[100, 0]]), ("a", [[100, 0]]), ("b", [[0, 100]]), ("b", [[0, 100]])]
    null = ablation.permutation_null(docs, 3000, 7)
    check("by source: the baseline of labels shuffled over documents (mean 1/3, 95th percentile 1)",
          len(null) == 1 and abs(null[0]["mean"] - 1 / 3) < 0.035 and abs(null[0]["sd"] - 0.4714) < 0.02 and
          null[0]["q95"] == 1.0 and null == ablation.permutation_null(docs, 3000, 7), str(null))


# ---- report, from hand-made summaries ----

def handmade(s, key, seed, final, at250, diagnostics=None, command=None):
    """A summary as run.py writes one: val curve 10.0 at step 0, at250, final at 500; diagnostics from util as
    run.py runs it now, or by `command`."""
    arm = next(a for a in s.exp.arms if a.key == key)
    L = ablation.layers(s.recipe + " " + arm.flags)
    summary = dict(arm=key, label=arm.label, seed=seed, **ablation.identity(s, arm), commands=[], git_commit="hand",
                   uncommitted_sources=[], wall_seconds=1.0, pools=1, pool_size=64,
                   val_curve=[[0, 10.0], [250, at250], [500, final]], train_curve=[[1, 10.0]], final_val_loss=final,
                   health=dict(unused=0, max_share=0.2, entropy=0.9, dead=[0.0] * L, used=[8] * L,
                               top_share=[0.3] * L, load_entropy=[0.9] * L))
    if diagnostics:
        ckpt = ablation.final_checkpoint(s, arm, seed, summary)
        command = command or shlex.join(ablation.util_command(s, arm, seed, ckpt))
        summary["diagnostics"] = dict(command=command, **diagnostics)
    ablation.write_json(ablation.summary_path(s, arm, seed), summary)


def row(md, first):
    """The table row of results.md whose first cell is `first`."""
    found = re.search(rf"^\| {re.escape(first)} \|.*$", md, re.M)
    return found.group(0) if found else ""


def test_mix_report(folder):
    _, s = ablation.setup(["--experiment", "mix"])
    # two sources, a and b, whose shards util would read (their names are all the report looks at)
    os.makedirs(os.path.join(folder, "sources"))
    for source in ("a", "b"):
        open(os.path.join(folder, "sources", f"{source}_val_000000.bin"), "w").close()
    s = s._replace(runs=os.path.join(folder, "runs"), out=os.path.join(folder, "out"), report=folder,
                   corpus="handmade00000000",
                   source=s.source._replace(sources=os.path.join(folder, "sources", "*_val_*.bin")))
    pool, vanilla = ablation.diagnose_csv(POOL_CSV), ablation.diagnose_csv(VANILLA_CSV)
    other = dict(pool, jaccard=0.2, dead=[0, 0, 0])
    # At step 250, unipool 6.5 6.6 6.4 against vanilla softmax's 6.6 6.6 6.6: -0.1, 0, -0.2, mean -0.1, sd 0.1,
    # se 0.057735, t(2) 4.303: [-0.3484, +0.1484]. At step 0 every arm is at 10.0: 0 +- 0.
    at250 = {"unipool": [6.5, 6.6, 6.4], "vanilla_softmax": [6.6] * 3, "vanilla_norm": [6.6] * 3,
             "unipool_L4": [6.7] * 3, "vanilla_softmax_L4": [6.7] * 3}
    finals = dict(DEPTH, vanilla_norm=[5.95, 5.97, 5.93])
    for key, values in finals.items():
        for i, (seed, final) in enumerate(zip(SEEDS, values)):
            diag = ({0: pool, 1: other}.get(i) if key == "unipool" else vanilla if key == "vanilla_softmax" else None)
            # vanilla_norm's seed 101 has diagnostics from util over other batches (-n 8): not current, left out
            stale = "./infer_unipool util -c CKPT -n 8" if (key, i) == ("vanilla_norm", 0) else None
            handmade(s, key, seed, final, at250[key][i], vanilla if stale else diag, stale)
    # Counts by source, two layers, sources a and b of 4 tokens each, against a baseline of 0.1 and 0.2 bits
    # (95th percentiles 0.5 and 0.9). unipool s101: layer 0 splits a 3:1 and b 1:3 over experts 0 and 1 (I =
    # 1 - H(3/4) = 0.188722 of H(S) 1 bit), layer 1 sends a to 0 and b to 1 (1 bit); the bias were the tokens
    # independent is (2 - 1)(2 - 1) / (2 x 8 ln 2) = 0.090168; excess (0.088722 + 0.8) / 2 = 0.444361, layer
    # 1 alone above its 95th percentile. s102: a to 0 and b to 1 in both layers, excess (0.9 + 0.8) / 2 =
    # 0.85, both above. vanilla_norm s101: layer 0 even (I 0), layer 1 3:1: excess (-0.1 - 0.011278) / 2 =
    # -0.055639; s102: 3:1 in both, (0.088722 - 0.011278) / 2 = 0.038722; s103's counts come from another
    # util command (not current). unipool - vanilla_norm per seed: 0.5 and 0.811278, mean 0.655639, sd
    # 0.311278 / sqrt 2 = 0.220108, se 0.155639, t(1) 12.706: [-1.321910, +2.633188].
    split, apart, even = {"a": [3, 1], "b": [1, 3]}, {"a": [4, 0], "b": [0, 4]}, {"a": [2, 2], "b": [2, 2]}
    for key, seed, layers_, command in (("unipool", 101, (split, apart), None), ("unipool", 102, (apart, apart), None),
                                        ("vanilla_norm", 101, (even, split), None),
                                        ("vanilla_norm", 102, (split, split), None),
                                        ("vanilla_norm", 103, (apart, apart), "./infer_unipool util -n 8")):
        arm = next(a for a in s.exp.arms if a.key == key)
        path = ablation.summary_path(s, arm, seed)
        summary = json.load(open(path))
        commands = ablation.source_commands(s, arm, seed, ablation.final_checkpoint(s, arm, seed, summary))
        summary["by_source"] = {"fingerprint": ablation.shards_fingerprint(ablation.sources(s).values()),
                                "experts": [[0, 1], [0, 1]], "sources": {
            k: {"command": command or shlex.join(commands[k]), "documents": 1,
                "counts": [layer[k] for layer in layers_]} for k in ("a", "b")},
            "null": {"permutations": 200, "seed": 1, "layers": [{"mean": 0.1, "sd": 0.05, "q95": 0.5},
                                                                 {"mean": 0.2, "sd": 0.1, "q95": 0.9}]}}
        ablation.write_json(path, summary)
    ablation.report(s)
    res = json.load(open(os.path.join(folder, "results.json")))
    md = open(os.path.join(folder, "results.md")).read()
    claims = {c["claim"]: c for c in res["claims"]}
    depth = claims["UniPool's gain grows with depth"]
    check("report: the depth claim is a combination of four arms",
          depth.get("combination") == DEPTH_TEXT and depth.get("terms") == [
              ["unipool", 1], ["vanilla_softmax", -1], ["unipool_L4", -1], ["vanilla_softmax_L4", 1]],
          json.dumps(depth))
    check_depth("report", depth)
    check("report: the depth claim is unresolved and needs 4 seeds",
          depth["resolved"] is False and depth["seeds_needed"] == 4, json.dumps(depth))
    # the plan: seeds 101-106 for the three central arms, 101-104 for the other six; the hand-made runs are
    # seeds 101-103 of five arms, so 3 x 3 + 2 x 1 + 4 x 4 = 27 runs are missing
    central = ("vanilla_softmax", "vanilla_norm", "unipool")
    planned = {(a.key, seed) for a in MIX.arms for seed in range(101, 107 if a.key in central else 105)}
    made = {(key, seed) for key in finals for seed in SEEDS}
    check("report: the missing runs are the plan's (6 seeds for the central arms, 4 for the others)",
          sorted(res["missing"]) == sorted(f"{k}_s{seed}" for k, seed in planned - made) and len(res["missing"]) == 27
          and "Seeds 101, 102, 103, 104, 105, 106 for vanilla_softmax, vanilla_norm, unipool; 101, 102, 103, 104 "
              "for the other arms." in md and "Reproduce: `python3 dev/ablation/run.py --experiment mix` " in md,
          json.dumps(res["missing"]) + md[:1200])
    # The headline: per seed -0.10 -0.07 -0.13, mean -0.10, sd 0.03, se 0.017321, 4.303 x: [-0.1745, -0.0255],
    # which excludes 0 (resolved). Welch: se sqrt(0.0025/3 + 0.0004/3) = 0.031091, df 2.62, t(2):
    # [-0.2338, +0.0338], which holds 0.
    head = claims["UniPool beats vanilla MoE (the paper's headline)"]
    check("report: the headline claim's intervals, resolved (paired excludes 0), no seeds needed",
          head.get("a") == "unipool" and head.get("b") == "vanilla_softmax" and
          near(head["paired"]["lo"], -0.174530, 1e-6) and near(head["paired"]["hi"], -0.025470, 1e-6) and
          near(head["welch"]["lo"], -0.233786, 1e-6) and near(head["welch"]["hi"], 0.033786, 1e-6) and
          head["verdict"] == "beyond seed noise in one test only" and head["resolved"] is True and
          head["seeds_needed"] is None and near(head["paper"], 1.9029 - 1.9317, 1e-12), json.dumps(head))
    # The pool's own effect: unipool - vanilla_norm per seed -0.05 -0.02 -0.08, mean -0.05, sd 0.03:
    # [-0.1245, +0.0245] holds 0; n = 3 gives 0.0745 > 0.05, n = 4 gives 3.182 x 0.03 / 2 = 0.0477 < 0.05: 4.
    own = claims["the pool's own effect at a fixed router"]
    check("report: the pool's own effect is unresolved and needs 4 seeds",
          near(own["paired"]["lo"], -0.124530, 1e-6) and own["resolved"] is False and own["seeds_needed"] == 4,
          json.dumps(own))
    check("report: a claim without runs is not resolved, its seeds not computable",
          claims["a pool of 2/3 matches or beats vanilla"]["resolved"] is False and
          claims["a pool of 2/3 matches or beats vanilla"]["seeds_needed"] is None)
    check("results.md: the claims table says resolved, seeds needed, - when not computable",
          row(md, "UniPool's gain grows with depth").endswith("| within seed noise | no | 4 |") and
          row(md, "UniPool beats vanilla MoE (the paper's headline)").endswith("| RESOLVED |  |") and
          row(md, "a pool of 2/3 matches or beats vanilla").endswith("| no | - |") and
          row(md, "in vanilla layers the NormRouter is a little worse than softmax").endswith("| RESOLVED |  |") and
          f"| {DEPTH_TEXT} |" in row(md, "UniPool's gain grows with depth") and
          "Resolved: 2 of 10 claims." in md, "\n".join(row(md, c) for c in claims))
    course = {c["combination"]: c for c in res.get("course", [])}
    headline, effect = course.get("unipool - vanilla_softmax"), course.get("unipool - vanilla_norm")
    steps = {r["step"]: r for r in headline["steps"]} if headline else {}
    check("course: the headline's and the pool effect's gaps at every shared val step",
          headline is not None and effect is not None and sorted(steps) == [0, 250, 500] and
          [r["step"] for r in effect["steps"]] == [0, 250, 500] and headline["seeds"] == SEEDS,
          json.dumps(res.get("course")))
    check("course: the paired mean and interval at step 250 (hand-worked) and 0 +- 0 at step 0",
          bool(steps) and near(steps[250]["mean"], -0.1, 1e-9) and near(steps[250]["lo"], -0.348434, 1e-6) and
          near(steps[250]["hi"], 0.148434, 1e-6) and steps[250]["n"] == 3 and near(steps[0]["mean"], 0, 1e-12) and
          near(steps[0]["lo"], 0, 1e-12) and near(steps[0]["hi"], 0, 1e-12), json.dumps(steps))
    check("course: the last step is the final val loss's paired test",
          bool(steps) and near(steps[500]["lo"], head["paired"]["lo"], 1e-12) and
          near(steps[500]["hi"], head["paired"]["hi"], 1e-12))
    check("results.md: the course table", row(md, "250").startswith("| 250 | -0.1000 | [-0.3484, +0.1484] (n 3) |"),
          row(md, "250"))
    # Every other claim over training. The depth claim at step 250: (6.5 6.6 6.4 - 6.6) - (6.7 - 6.7), the
    # headline's -0.1, 0, -0.2; at 500 its final paired test. vanilla_norm - vanilla_softmax: 0 at 250 and
    # -0.05 on every seed at 500 (sd 0). A claim without runs: - at every step.
    depth_course = course.get(DEPTH_TEXT) or {"steps": []}
    depth_steps = {r["step"]: r for r in depth_course["steps"]}
    check("course: every claim, the central ones marked; the depth claim's gap at 250 and its final test at 500",
          len(course) == 10 and [c["combination"] for c in res["course"] if c.get("central")] ==
          ["unipool - vanilla_softmax", "unipool - vanilla_norm"] and depth_course.get("central") is False and
          sorted(depth_steps) == [0, 250, 500] and near(depth_steps[250]["mean"], -0.1, 1e-9) and
          near(depth_steps[250]["lo"], -0.348434, 1e-6) and near(depth_steps[500]["lo"], -0.149574, 1e-6) and
          near(depth_steps[500]["hi"], 0.029574, 1e-6), json.dumps(depth_course))
    others = section(md, "The other claims over training")
    check("results.md: the other claims over training, a row each, the central ones not among them",
          row(others, DEPTH_TEXT) == f"| {DEPTH_TEXT} | UniPool's gain grows with depth | 3 | +0.0000 [+0.0000, +0.0000] "
          "| -0.1000 [-0.3484, +0.1484] | -0.0600 [-0.1496, +0.0296] |" and
          row(others, "vanilla_norm - vanilla_softmax").endswith(
              "| 3 | +0.0000 [+0.0000, +0.0000] | +0.0000 [+0.0000, +0.0000] | -0.0500 [-0.0500, -0.0500] |") and
          row(others, "unipool_r67 - vanilla_softmax").endswith("| 0 | - | - | - |") and
          "| step 0 | step 250 | step 500 |" in others and not row(others, "unipool - vanilla_softmax") and
          others.count("\n| ") == 9, others)
    arms = {a["key"]: a for a in res["arms"]}
    d = arms["unipool"].get("diagnostics") or {}
    check("diagnostics: the mean over the seeds that have them (unipool: 2 of 3)",
          d.get("seeds") == [101, 102] and near(d.get("jaccard"), (0.460784 + 0.2) / 2, 1e-6) and
          d.get("dead") == [8, 0.5, 0] and near(d["load_entropy"][1], 0.947678, 1e-6), json.dumps(d))
    table = section(md, "Routing diagnostics on the final checkpoint (mean over seeds)")
    check("results.md: diagnostics per arm; vanilla's Jaccard is 0 by construction; runs without them listed",
          row(table, "unipool") == "| unipool | 101, 102 | 20 | 0.803 (0.463/0.948/1.000) | 88.8% "
                                   "(100.0%/86.4%/80.0%) | 2.8 (8/0.5/0) | 0.330 |" and
          row(table, "vanilla_softmax").endswith("| 0.000 (by construction) |") and
          row(table, "vanilla_norm") == "| vanilla_norm | missing | | | | | |" and
          "Runs without diagnostics: vanilla_norm_s101, vanilla_norm_s102, vanilla_norm_s103, unipool_s103, "
          "vanilla_softmax_L4_s101, " in md,
          table)
    by = {b["arm"]: b for b in res.get("by_source", [])}
    u = by.get("unipool", {}).get("seeds", {})
    first = u.get("101", u.get(101, {}))
    check("by source: per run and layer I(S; E), H(S), the bias, the excess and the layers above the baseline",
          by.get("unipool", {}).get("tokens") == {"a": 4, "b": 4} and len(first.get("layers", [])) == 2 and
          near(first["layers"][0]["information"], 0.188722, 1e-6) and
          near(first["layers"][1]["information"], 1, 1e-9) and
          all(near(x["entropy"], 1, 1e-9) and near(x["bias"], 0.090168, 1e-6) for x in first["layers"]) and
          near(first["excess"], 0.444361, 1e-6) and first["above"] == 1, json.dumps(by.get("unipool")))
    check("by source: the runs with current counts (vanilla_norm s103's are from another command; none: missing)",
          sorted(by) == ["pool_softmax_poolaux", "unipool", "vanilla_norm", "vanilla_softmax"] and
          sorted(map(int, by["vanilla_norm"].get("seeds", {}))) == [101, 102] and
          by["vanilla_softmax"].get("missing"), json.dumps(res.get("by_source")))
    pairs = {(p["a"], p["b"]): p for p in res.get("by_source_pairs", [])}
    paired = (pairs.get(("unipool", "vanilla_norm")) or {}).get("paired") or {}
    check("by source: the pool against a vanilla router, paired over seeds (hand-worked)",
          sorted(pairs) == [("pool_softmax_poolaux", "vanilla_norm"), ("pool_softmax_poolaux", "vanilla_softmax"),
                            ("unipool", "vanilla_norm"), ("unipool", "vanilla_softmax")] and
          near(paired.get("diff"), 0.655639, 1e-6) and near(paired.get("lo"), -1.321910, 1e-5) and
          near(paired.get("hi"), 2.633188, 1e-5) and paired.get("seeds") == [101, 102] and
          pairs[("unipool", "vanilla_softmax")]["paired"] is None, json.dumps(res.get("by_source_pairs")))
    table = section(md, "Routing by source")
    check("results.md: the by-source tables and the sources' shares",
          row(table, "unipool") == "| unipool | 101, 102 | 1.000 | 0.797 (0.594/1.000) | 0.150 (0.100/0.200) | "
                                   "0.647 (0.494/0.800) | s101: +0.444, s102: +0.850 | 1 of 2, 2 of 2 |" and
          row(table, "vanilla_norm") == "| vanilla_norm | 101, 102 | 1.000 | 0.142 (0.094/0.189) | 0.150 "
                                        "(0.100/0.200) | -0.008 (-0.006/-0.011) | s101: -0.056, s102: +0.039 | "
                                        "0 of 2, 0 of 2 |" and
          row(table, "vanilla_softmax") == "| vanilla_softmax | missing | | | | | | |" and
          row(table, "unipool - vanilla_norm").startswith(
              "| unipool - vanilla_norm | s101: +0.5000, s102: +0.8113 | +0.656 [-1.3219, +2.6332] (df 1.0) |") and
          row(table, "unipool - vanilla_softmax").endswith("| needs 2+ seeds in both arms |") and
          "The sources' shares of the 8 tokens (and the documents their sequences start in): a 50.0% (1), "
          "b 50.0% (1)." in table, table)
    with open(os.path.join(folder, "sources", "b_val_000000.bin"), "w") as f:
        f.write("other tokens")
    res, _ = ablation.results(s)
    check("by source: counts made on other source shards are missing",
          all(b.get("missing") for b in res["by_source"]), json.dumps(res["by_source"])[:2000])


# ---- selection ----

def run_py(*args):
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True)


def test_select():
    done = run_py("--experiment", "mix", "--dry-run", "--seeds", "3")
    out = done.stdout
    trains = re.findall(r"^(?:train|skip|resume) (\w+)_s(\d+)(?:: (.*))?$", out, re.M)
    data = "-i 'data/mix/mix_train_*.bin' -j 'data/mix/mix_val_*.bin' -z data/mix/gpt2_tokenizer.bin"
    check("select: the mix dry run exits 0 and plans 9 arms x seeds 101, 102, 103", done.returncode == 0 and
          sorted({(k, int(seed)) for k, seed, _ in trains}) == sorted((a.key, seed) for a in MIX.arms for seed in SEEDS)
          and len(trains) == 27, out[-3000:] + done.stderr[-2000:])
    plan = run_py("--experiment", "mix", "--dry-run")
    runs = re.findall(r"^(?:train|skip|resume) (\w+)_s(\d+)", plan.stdout, re.M)
    central = ("vanilla_softmax", "vanilla_norm", "unipool")
    check("select: without --seeds the mix dry run plans seeds 101-106 for the central arms, 101-104 for the "
          "others, seed-major",
          plan.returncode == 0 and [(k, int(seed)) for k, seed in runs] ==
          [(a.key, seed) for seed in range(101, 107) for a in MIX.arms if seed <= 104 or a.key in central],
          plan.stdout[-3000:] + plan.stderr[-2000:])
    # seed 107 is beyond the plan (6 seeds at most), so no committed summary skips it
    late = run_py("--experiment", "mix", "--dry-run", "--seeds", "7", "--only", "unipool").stdout
    unipool = re.search(r"^train unipool_s107: (.*)$", late, re.M)
    check("select: the mix dry run prints its recipe, data flags, seed and run folder",
          unipool is not None and unipool.group(1) == f"./train_unipool {ablation.MIX_RECIPE} {data} -o pool -s 107 "
                                                       "-T 1 -O out/ablation/mix/unipool_s107", late[-3000:])
    check("select: the mix dry run runs util on every run and probes the first seed of its probed arms",
          len(re.findall(r"^util \w+_s10[123]: \./infer_unipool util -c out/ablation/mix/\w+/ckpt_<last step>\.bin "
                         r"-i 'data/mix/mix_val_\*\.bin' -n 64 -T 1 -o out/ablation/mix/\w+/util", out, re.M)) == 27 and
          sorted(re.findall(r"^probe (\w+): .* -i 'data/mix/mix_val_\*\.bin' .*> dev/ablation/mix/runs/probe_\1\.txt$",
                            out, re.M)) == ["unipool_s101", "vanilla_softmax_s101"], out[-3000:])
    sotu = run_py("--dry-run", "--seeds", "4", "--only", "unipool")
    check("select: the default is the SOTU experiment, seeds 1.., its recipe, no data flags, no util",
          sotu.returncode == 0 and re.search(rf"^train unipool_s4: \./train_unipool {re.escape(ablation.RECIPE)} "
                                             r"-o pool -s 4 -T 1 -O out/ablation/unipool_s4$", sotu.stdout, re.M)
          is not None
          and "util" not in sotu.stdout and "_s10" not in sotu.stdout, sotu.stdout + sotu.stderr)
    wrong = [run_py("--experiment", "nope", "--dry-run"), run_py("--only", "unipool_L4", "--dry-run"),
             run_py("--experiment", "mix", "--only", "pool_softmax_layeraux", "--dry-run")]
    check("select: an unknown experiment, or an arm of another experiment, exits 2",
          [w.returncode for w in wrong] == [2, 2, 2], "\n".join(w.stderr for w in wrong))


# ---- the SOTU report, byte for byte ----

def test_sotu(folder):
    """The SOTU report from the committed summaries, with the committed corpus fingerprint (the shards on this
    machine may be rebuilt), is the committed report byte for byte."""
    _, s = ablation.setup([])
    committed = json.load(open(os.path.join(HERE, "results.json")))
    s = s._replace(corpus=committed["corpus"], report=folder)
    ablation.report(s)
    differ = [f for f in ("results.md", "results.json", "val_curves.svg")
              if open(os.path.join(folder, f), "rb").read() != open(os.path.join(HERE, f), "rb").read()]
    check("sotu: the report regenerated from the committed summaries is byte-identical", not differ, str(differ))


# ---- smoke: the SOTU experiment on a micro model ----

def smoke(folder, *extra):
    """run.py --smoke folder, from the folder (not the repository root); (completed process, seconds)."""
    start = time.time()
    done = subprocess.run([sys.executable, RUN, *extra, "--smoke", folder], cwd=folder, capture_output=True, text=True)
    return done, time.time() - start


def output(done):
    return done.stdout[-3000:] + done.stderr[-3000:]


def summary(folder, key, seed=1):
    path = os.path.join(folder, "runs", f"{key}_s{seed}.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def started(done):
    """The runs an invocation started: 'train NAME' or 'resume NAME'."""
    return re.findall(r"^((?:train|resume) \w+):", done.stdout, re.M)


def test_first(folder):
    done, seconds = smoke(folder)
    check(f"the first --smoke exits 0 ({seconds:.0f} s)", done.returncode == 0, output(done))
    layers = ablation.layers(ablation.SMOKE_RECIPE)
    for key in KEYS:
        s = summary(folder, key)
        check(f"{key}: a summary with a finite final val loss", math.isfinite(s.get("final_val_loss", math.nan)))
        health = s.get("health", {})
        check(f"{key}: health lists of length L = {layers}",
              all(len(health.get(k, [])) == layers for k in ("dead", "used", "top_share", "load_entropy")))


def section(md, title):
    """The text under a '## title' heading of the report, up to the next heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.M | re.S)
    return found.group(1) if found else ""


def test_report(folder):
    md = open(os.path.join(folder, "results.md")).read()
    losses = section(md, "Final val loss")
    health = section(md, "Routing health at the last validation (mean over seeds)")
    check("results.md lists every arm's val loss and routing health", all(
        re.search(rf"^\| {key} \|.*\| \d+\.\d+ \|", losses, re.M) and re.search(rf"^\| {key} \| \d", health, re.M)
        for key in KEYS), md)
    check("results.md has the probe for both probed arms", all(
        re.search(rf"^\| {key} \| 1 \| \d+\.\d+ \| random over .* \| [-+]\d+\.\d+ \|$",
                  section(md, "Routing-randomisation probe"), re.M) for key in SOTU.probed), md)
    claims = section(md, "The paper's claims, pair by pair")
    check("results.md tests every claim, one seed each: not comparable", all(
        re.search(rf"^\| {re.escape(claim)} \| {re.escape(text)} \| .* \| "
                  r"not comparable: needs 2\+ seeds in both arms \|$", claims, re.M) for claim, text in SOTU.claims),
          claims)
    check("the paper's UniPool - vanilla difference is 1.9029 - 1.9317 = -0.0288",
          "| unipool - vanilla_softmax | -0.0288 |" in claims, claims)
    check("the SOTU report has no diagnostics, resolved or course sections",
          "diagnostics" not in md.lower() and "RESOLVED" not in md and "over training" not in md)
    try:
        lines = ET.parse(os.path.join(folder, "val_curves.svg")).getroot().iter("{http://www.w3.org/2000/svg}polyline")
        means = [e.get("data-arm") for e in lines if e.get("class") == "mean"]
    except ET.ParseError as e:
        means = [str(e)]
    check("the SVG parses and has one mean line per arm", sorted(means) == sorted(KEYS), str(means))


def test_skip(folder):
    done, seconds = smoke(folder)
    check("a second --smoke trains nothing", done.returncode == 0 and not started(done) and
          f"skipped {len(KEYS)}, failed 0; probes: written 0" in done.stdout, output(done))
    check(f"a second --smoke takes seconds ({seconds:.1f} s)", seconds < 10)


def test_rerun(folder):
    key = "vanilla_norm"
    before = summary(folder, key)
    os.remove(os.path.join(folder, "runs", f"{key}_s1.json"))
    done, _ = smoke(folder)
    check(f"a deleted summary re-runs only its arm ({key})", done.returncode == 0 and
          [run.split()[1] for run in started(done)] == [f"{key}_s1"], output(done))
    check("the re-run gives the same val loss", summary(folder, key).get("final_val_loss") == before["final_val_loss"])


def stop_after_first_checkpoint(folder, key):
    """What a run killed at step 4 leaves: the step-3 checkpoint, log records up to step 4, no summary."""
    run = os.path.join(folder, "out", f"{key}_s1")
    os.remove(os.path.join(folder, "runs", f"{key}_s1.json"))
    os.remove(os.path.join(run, "ckpt_00000006.bin"))
    with open(os.path.join(run, "log.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 4]
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        f.writelines(kept)
    return os.path.exists(os.path.join(run, "ckpt_00000003.bin"))


def test_resume(folder):
    key = "pool_softmax_poolaux"
    before = summary(folder, key)
    check("a step-3 checkpoint to resume from", stop_after_first_checkpoint(folder, key))
    done, _ = smoke(folder)
    check(f"a stopped run resumes with -r latest ({key})", done.returncode == 0 and
          started(done) == [f"resume {key}_s1"] and "./train_unipool -r latest -O" in done.stdout, output(done))
    after = summary(folder, key)
    check("the resumed run ends at the last step with the uninterrupted run's val loss",
          after.get("val_curve") == before["val_curve"] and "-r latest" in after.get("commands", [""])[-1],
          json.dumps(after.get("val_curve")) + "\n" + json.dumps(before["val_curve"]))


def test_failure(folder):
    key = "unipool_reduced"
    run = os.path.join(folder, "out", f"{key}_s1")
    os.remove(os.path.join(folder, "runs", f"{key}_s1.json"))
    with open(os.path.join(run, "ckpt_00000006.bin"), "r+b") as f:
        f.truncate(1000)
    done, _ = smoke(folder)
    check("a failing run is reported with its log and the command exits 1", done.returncode == 1 and
          f"FAILED {key}_s1: exit" in done.stdout and f"skipped {len(KEYS) - 1}, failed 1" in done.stdout,
          output(done))


# ---- mix: the mix experiment's machinery on a micro model ----

def test_mix_smoke(folder):
    done, seconds = smoke(folder, "--experiment", "mix")
    check(f"the mix --smoke exits 0 ({seconds:.0f} s), seed 101, util on every run",
          done.returncode == 0 and "; diagnostics: written 9, skipped 0, failed 0" in done.stdout and
          all(f"util {a.key}_s101: ./infer_unipool util -c " in done.stdout for a in MIX.arms), output(done))
    for arm in MIX.arms:
        s = summary(folder, arm.key, 101)
        L = ablation.layers(ablation.SMOKE_RECIPE + " " + arm.flags)
        d = s.get("diagnostics", {})
        csv = os.path.join(folder, "out", f"{arm.key}_s101", "util.csv")
        ok = (os.path.exists(csv) and {k: v for k, v in d.items() if k != "command"} ==
              json.loads(json.dumps(ablation.diagnose_csv(open(csv).read()))))
        check(f"{arm.key}: diagnostics of L = {L} layers in the summary, from util's CSV of its final checkpoint",
              ok and len(d.get("load_entropy", [])) == L and "ckpt_00000006.bin" in d.get("command", "") and
              (d.get("jaccard") == 0) == arm.flags.startswith("-o layer"), json.dumps(d))
        b = s.get("by_source")
        if arm.key not in MIX.by_source:
            check(f"{arm.key}: no counts by source", b is None, json.dumps(b))
            continue
        # the smoke's two sources, 32 sequences of 16 tokens each: every layer counts each token's K slots
        csvs = {k: os.path.join(folder, "out", f"{arm.key}_s101", "sources", f"{k}.csv")
                for k in ("sotu", "sotu_train")}
        csvs = {k: ablation.read_util_csv(open(p).read()) if os.path.exists(p) else {} for k, p in csvs.items()}
        sums = {k: {sum(layer) for layer in v["counts"]} for k, v in (b or {}).get("sources", {}).items()}
        check(f"{arm.key}: counts by source, L = {L} layers of each source, from util's CSVs on its final checkpoint",
              b is not None and sorted(b["sources"]) == ["sotu", "sotu_train"] and
              all(v["counts"] == [[t for _, t in csvs[k][layer]] for layer in sorted(csvs[k])] and
                  len(v["counts"]) == L and "ckpt_00000006.bin" in v["command"] for k, v in b["sources"].items()) and
              all(len(x) == 1 and next(iter(x)) % 512 == 0 and next(iter(x)) > 0 for x in sums.values()) and
              b["sources"]["sotu"]["counts"] != b["sources"]["sotu_train"]["counts"] and
              b["experts"] == [[e for e, _ in csvs["sotu"][layer]] for layer in sorted(csvs["sotu"])] and
              all(v["documents"] >= 1 for v in b["sources"].values()) and
              b["null"]["permutations"] == ablation.NULL_PERMUTATIONS and len(b["null"]["layers"]) == L and
              all(0 <= x["mean"] <= x["q95"] + 1e-12 for x in b["null"]["layers"]),
              json.dumps(b)[:3000])
    md = open(os.path.join(folder, "results.md")).read()
    check("the mix report has diagnostics for every arm, the course, the resolved column and the probes",
          all(re.search(rf"^\| {a.key} \| 101 \| \d", section(md, "Routing diagnostics on the final checkpoint "
                                                                  "(mean over seeds)"), re.M) for a in MIX.arms) and
          re.search(r"^\| 6 \| [-+]\d\.\d{4} \| - \| [-+]\d\.\d{4} \| - \|$",
                    section(md, "The central gaps over training"), re.M) is not None and
          "Resolved: 0 of 10 claims." in md and
          all(re.search(rf"^\| {k} \| 101 \| ", section(md, "Routing-randomisation probe"), re.M)
              for k in MIX.probed) and
          all(re.search(rf"^\| {k} \| 101 \| \d\.\d{{3}} \| \d\.\d{{3}} \(.*\| \d of 2 \|$",
                        section(md, "Routing by source"), re.M) for k in MIX.by_source),
          md[-6000:])
    done, seconds = smoke(folder, "--experiment", "mix")
    check("a second mix --smoke trains nothing and runs no util", done.returncode == 0 and not started(done) and
          "skipped 9, failed 0; probes: written 0, skipped 2, failed 0; diagnostics: written 0, skipped 9, failed 0; "
          "by source: counted 0, skipped 4, failed 0" in done.stdout and
          not re.search(r"^(util|sources) \w+: ", done.stdout, re.M), output(done))
    path = os.path.join(folder, "runs", "unipool_r42_s101.json")
    s = json.load(open(path))
    before = s.pop("diagnostics")
    ablation.write_json(path, s)
    done, _ = smoke(folder, "--experiment", "mix")
    check("diagnostics deleted from a summary come back from util alone, the same",
          done.returncode == 0 and not started(done) and "diagnostics: written 1, skipped 8" in done.stdout and
          re.findall(r"^util (\w+): ", done.stdout, re.M) == ["unipool_r42_s101"] and
          json.load(open(path)).get("diagnostics") == before, output(done))
    shutil.rmtree(os.path.join(folder, "out", "unipool_r42_s101"))
    s.pop("diagnostics", None)
    ablation.write_json(path, s)
    done, _ = smoke(folder, "--experiment", "mix")
    check("diagnostics without the final checkpoint fail, and the command exits 1", done.returncode == 1 and
          "FAILED util unipool_r42_s101: no final checkpoint" in done.stdout, output(done))


GROUPS = ["stats", "diagnostics", "report", "select", "sotu", "smoke", "mix"]


def guarded(test, *args):
    """Runs one test function; an exception is a failure of it, and the other tests still run."""
    try:
        test(*args)
    except Exception:  # noqa: BLE001 (any crash of the code under test is a failure)
        check(f"{test.__name__} runs to the end", False, traceback.format_exc())


def main(argv):
    wanted = argv or GROUPS
    unknown = set(wanted) - set(GROUPS)
    if unknown:
        sys.exit(f"unknown group(s) {', '.join(sorted(unknown))}; the groups: {', '.join(GROUPS)}")
    start = time.time()
    if "stats" in wanted:
        for test in (test_versus, test_t975, test_combination, test_resolve, test_pools):
            guarded(test)
    if "diagnostics" in wanted:
        guarded(test_diagnostics)
    for group, test in (("report", test_mix_report), ("sotu", test_sotu)):
        if group in wanted:
            with tempfile.TemporaryDirectory() as folder:
                guarded(test, folder)
    if "select" in wanted:
        guarded(test_select)
    if "smoke" in wanted:
        with tempfile.TemporaryDirectory() as folder:
            for test in (test_first, test_report, test_skip, test_rerun, test_resume, test_failure):
                guarded(test, folder)
    if "mix" in wanted:
        with tempfile.TemporaryDirectory() as folder:
            guarded(test_mix_smoke, folder)
    print(f"{len(failures)} failed ({time.time() - start:.0f} s)" if failures else
          f"all passed ({time.time() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
