#!/usr/bin/env python3
"""Proves dev/ablation/test_ablation.py can fail: plants one deliberate bug at a time in a copy of run.py
(dev/ablation/.mutant_run.py, beside run.py so that it finds the repository), runs the test groups that
should notice it against the copy (ABLATION_RUN) and expects them to report a failure (exit 1). A mutant
that passes is a hole in the tests. First the unmutated copy must pass those groups.

    python3 dev/ablation/mutants.py            # every mutant (a few minutes: the smoke groups train micro models)
    python3 dev/ablation/mutants.py seeds      # only those whose name contains "seeds"

Each mutant is one exact text replacement that must occur exactly once in run.py, so a refactor that moves
the code fails loudly here instead of silently testing nothing. Standard library only.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "run.py")
COPY = os.path.join(HERE, ".mutant_run.py")
TEST = os.path.join(HERE, "test_ablation.py")

# (name, text in run.py, replacement, the test groups that should catch it)
MUTANTS = [
    ("welch: the coefficient is not squared",
     'var = [c * c * (s["std"] ** 2 / s["n"])', 'var = [c * (s["std"] ** 2 / s["n"])', "stats"),
    ("welch: df is always the pooled n - 1",
     'df = (total ** 2 / sum(v ** 2 / (s["n"] - 1) for v, s in zip(var, st)) if total > 0',
     'df = (sum(s["n"] - 1 for s in st) if total > 0', "stats"),
    ("paired: the coefficients are ignored",
     'diffs = [sum(c * values[seed] for c, values in parts) for seed in common]',
     'diffs = [sum(values[seed] for c, values in parts) for seed in common]', "stats"),
    ("parse: a bracket's sign is not carried inside",
     "            out = expr(sign)\n", "            out = expr(1)\n", "stats"),
    ("t975: capped at df 10, as before",
     "    df = max(1, int(df))\n", "    df = min(10, max(1, int(df)))\n", "stats"),
    ("t975: df rounded to the nearest, not down",
     "    df = max(1, int(df))\n", "    df = max(1, round(df))\n", "stats"),
    ("resolved: strictly narrower than 0.03",
     'paired["hi"] - paired["lo"] <= RESOLVED_WIDTH', 'paired["hi"] - paired["lo"] < RESOLVED_WIDTH', "stats"),
    ("resolved: an interval excluding 0 does not count",
     'return paired is not None and (paired["lo"] > 0 or paired["hi"] < 0 or',
     'return paired is not None and (False or', "stats"),
    ("resolved: no paired test counts as resolved",
     'return paired is not None and (paired["lo"] > 0', 'return paired is None or (paired["lo"] > 0', "stats"),
    ("seeds needed: the smaller target, not the larger",
     'target = max(abs(paired["diff"]), RESOLVED_WIDTH / 2)', 'target = min(abs(paired["diff"]), RESOLVED_WIDTH / 2)',
     "stats"),
    ("seeds needed: one too few",
     "        lo, hi = (lo, mid) if enough(mid) else (mid, hi)\n    return hi\n",
     "        lo, hi = (lo, mid) if enough(mid) else (mid, hi)\n    return lo\n", "stats"),
    ("pools: a reduced pool from the recipe's L, not the arm's",
     'L = layers(s.recipe + " " + arm.flags)', "L = layers(s.recipe)", "stats"),
    ("diagnostics: entropy normalised by the used experts, not the reachable",
     "/ math.log(len(counts))", "/ math.log(sum(t > 0 for _, t in counts))", "diagnostics"),
    ("diagnostics: top ties go to the higher index",
     "key=lambda e: (-e[1], e[0]))[:TOP_N]", "key=lambda e: (-e[1], -e[0]))[:TOP_N]", "diagnostics"),
    ("diagnostics: the top set keeps experts without tokens",
     "top = sorted((e for e in counts if e[1] > 0),", "top = sorted((e for e in counts),", "diagnostics"),
    ("diagnostics: coverage of the top 8",
     "key=lambda e: (-e[1], e[0]))[:TOP_N]", "key=lambda e: (-e[1], e[0]))[:8]", "diagnostics"),
    ("diagnostics: dead = reachable minus the top set",
     'out["dead"].append(sum(t == 0 for _, t in counts))', 'out["dead"].append(len(counts) - len(top))', "diagnostics"),
    ("diagnostics: Jaccard over neighbouring layers only",
     "for b in sets[i + 1:] if a | b]", "for b in sets[i + 1:i + 2] if a | b]", "diagnostics"),
    ("diagnostics: a record from another util command counts",
     'return found if found and found.get("command") == command else None', "return found", "report"),
    ("course: df n, not n - 1",
     'interval(d["mean"], d["std"] / math.sqrt(d["n"]), d["n"] - 1).items()',
     'interval(d["mean"], d["std"] / math.sqrt(d["n"]), d["n"]).items()', "report"),
    ("course: the step's values of the first seed's curve for every seed",
     "d = stats([sum(c * curves[key][seed][step] for key, c in terms) for seed in seeds])",
     "d = stats([sum(c * curves[key][seeds[0]][step] for key, c in terms) for seed in seeds])", "report"),
    ("course: the other claims' table holds the central ones too",
     'others = [c for c in res["course"] if not c["central"]]', 'others = list(res["course"])', "report"),
    ("course: the other claims' cells give the interval's low end twice",
     "f\" [{r['lo']:+.4f}, {r['hi']:+.4f}]\"))", "f\" [{r['lo']:+.4f}, {r['lo']:+.4f}]\"))", "report"),
    ("by source: the pairs' paired column centred on Welch's difference",
     "{centred(paired, 3)} | {centred(welch, 3)}", "{centred(welch, 3)} | {centred(welch, 3)}", "stats"),
    ("claims: the paired column centred on Welch's difference",
     'f"{centred(paired)} | {c[\'verdict\']', 'f"{centred(welch)} | {c[\'verdict\']', "stats"),
    ("mix: seeds from 1",
     "first_seed=101", "first_seed=1", "select"),
    ("mix: the plan's extra seeds ignored (every arm 4)",
     "n if n is not None else exp.more_seeds.get(arm.key, exp.seeds)", "n if n is not None else exp.seeds", "select"),
    ("mix: the data flags left out of the train command",
     "*s.recipe.split(), *s.data.split(), *arm_flags(s, arm).split()", "*s.recipe.split(), *arm_flags(s, arm).split()",
     "select"),
    ("mix: the probe on data/sotu's val shards",
     '["./infer_unipool", "probe", "-i", s.source.val,', '["./infer_unipool", "probe", "-i", SOTU_CORPUS.val,',
     "select"),
    ("sotu: every identity carries the data flags (the committed summaries turn stale)",
     'data = {"data": s.data} if s.data else {}  # the SOTU', 'data = {"data": s.data}  # the SOTU', "sotu"),
    ("sotu: the claims table's header",
     '"| the paper finds | a - b | paper: a - b |', '"| the paper finds | a - b | paper |', "sotu"),
    ("mix: no util after a run",
     'if s.exp.diagnostics and status != "failed":', "if False:", "mix"),
    ("mix: util re-runs although the summary has its diagnostics",
     'if (summary.get("diagnostics") or {}).get("command") == shlex.join(command):', "if False:", "mix"),
    ("mix: a summary without diagnostics is not done (the run trains again)",
     "return record is not None and all(record.get(k) == v for k, v in identity(s, arm).items())",
     'return record is not None and all(record.get(k) == v for k, v in identity(s, arm).items()) and '
     '(not s.exp.diagnostics or META in record or "diagnostics" in record)', "mix"),
    ("by source: the information in nats, not bits",
     "math.log2(n * total / (n_s[i] * n_e[j]))", "math.log(n * total / (n_s[i] * n_e[j]))", "diagnostics"),
    ("by source: counts from another util command count",
     'return found if all(found["sources"][k]["command"] == shlex.join(c) for k, c in commands.items()) else None',
     "return found", "report"),
    ("by source: counts on other source shards count",
     'if found.get("fingerprint") != shards_fingerprint(sources(s).values()):', "if False:", "report"),
    ("by source: the baseline's labels are never shuffled",
     "        rng.shuffle(labels)\n", "        pass\n", "diagnostics"),
    ("by source: a document's rows overwrite each other instead of adding up",
     "counts[layer][where[layer][expert]] += tokens", "counts[layer][where[layer][expert]] = tokens", "diagnostics"),
    ("by source: the excess is not net of the baseline",
     'mean([(x["information"] - x["null"]["mean"]) / entropy for x in layers_])',
     'mean([x["information"] / entropy for x in layers_])', "report"),
    ("by source: every source counted from the first source's CSV",
     'csv = os.path.join(ROOT, command[-1] + ".csv")',
     'csv = os.path.join(ROOT, next(iter(commands.values()))[-1] + ".csv")', "mix"),
    ("by source: no counts after a run",
     'if arm.key in s.exp.by_source and status != "failed":', "if False:", "mix"),
    ("by source: the pairs compare each arm's first run only",
     'excess = {b["arm"]: {seed: x["excess"] for seed, x in b.get("seeds", {}).items() if x["excess"] is not None}',
     'excess = {b["arm"]: {seed: x["excess"] for seed, x in list(b.get("seeds", {}).items())[:1]}', "report"),
    ("mix: a missing checkpoint's util failure is not counted",
     'return runs["failed"] + probes["failed"] + utils["failed"] + by["failed"] == 0',
     'return runs["failed"] + probes["failed"] + by["failed"] == 0',
     "mix"),
]


def run_tests(groups):
    env = dict(os.environ, ABLATION_RUN=COPY)
    return subprocess.run([sys.executable, TEST, *groups], env=env, capture_output=True, text=True)


def main(argv):
    source = open(RUN).read()
    chosen = [m for m in MUTANTS if not argv or any(word in m[0] for word in argv)]
    broken = [name for name, old, _, _ in chosen if source.count(old) != 1]
    if broken:
        sys.exit("text not found exactly once in run.py: " + "; ".join(broken))
    groups = sorted({g for m in chosen for g in m[3].split()})
    survived = []
    try:
        with open(COPY, "w") as f:
            f.write(source)
        done = run_tests(groups)
        if done.returncode != 0:
            sys.exit(f"the unmutated copy fails {' '.join(groups)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        print(f"unmutated: {' '.join(groups)} pass", flush=True)
        for name, old, new, which in chosen:
            with open(COPY, "w") as f:
                f.write(source.replace(old, new))
            done = run_tests(which.split())
            fails = [line[5:] for line in done.stdout.splitlines() if line.startswith("FAIL ")]
            crashed = "Traceback" in done.stderr
            if done.returncode == 0:
                survived.append(name)
                print(f"SURVIVED  {name}", flush=True)
            else:
                print(f"caught    {name} ({which}: " + (f"{len(fails)} checks failed, first: {fails[0]}" if fails else
                                                        "crashed" if crashed else f"exit {done.returncode}") + ")",
                      flush=True)
    finally:
        if os.path.exists(COPY):
            os.remove(COPY)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught" +
          (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
