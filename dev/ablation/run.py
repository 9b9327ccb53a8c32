#!/usr/bin/env python3
"""The paper's 182M router/ownership ablation (arXiv 2605.06665) at a scale a 2-core CPU trains.

Every arm trains with one recipe (RECIPE: the same tokens, active parameters and optimizer) plus the
arm's flags (ARMS), for seeds 1..N, each run on one thread (the same seed gives the same bits), --jobs
runs at a time, first seed 1 of every arm, then seed 2, and so on. A finished run leaves a summary in
dev/ablation/runs/<arm>_s<seed>.json; a summary for the current recipe, flags and corpus (a fingerprint
of data/sotu's shards) means the run is done, so a sitting on a fresh clone trains only what no committed
summary covers. A run stopped part-way resumes from its last checkpoint in out/ablation/<arm>_s<seed>/
(-r latest) if that folder is still there.
After a run of the first seed of vanilla_softmax or unipool, infer_unipool's routing-randomisation probe
runs on its final checkpoint. Last, the report: dev/ablation/results.md, results.json, val_curves.svg.

    python3 dev/ablation/run.py                   train what is missing (3 seeds, 2 jobs), probe, report
    python3 dev/ablation/run.py --seeds 5 --only unipool,vanilla_softmax
    python3 dev/ablation/run.py --report          the report from the summaries that exist
    python3 dev/ablation/run.py --dry-run         print the commands, run nothing
    python3 dev/ablation/run.py --smoke DIR       every arm, one seed, a micro model; all output in DIR

It builds the programs and the default corpus with make, commits nothing and prints what to commit.
Exit status 1 if a run or the probe failed. Standard library only.
"""
import argparse
import collections
import concurrent.futures
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "dev", "ablation")

# key, label, the paper's val loss at 182M (None: not given), flags added to the recipe
ARMS = [
    ("vanilla_softmax", "vanilla MoE, softmax, per-layer aux", 1.9317, "-o layer"),
    ("vanilla_norm", "vanilla MoE, NormRouter, per-layer aux", 1.9375, "-o layer -R norm"),
    ("vanilla_sigmoid", "vanilla MoE, sigmoid, expert bias (aux-free)", 1.9239, "-o layer -R sigmoid"),
    ("pool_softmax_layeraux", "shared pool, softmax, per-layer aux", 1.9480, "-o pool -R softmax -a layer"),
    ("pool_softmax_poolaux", "shared pool, softmax, pool aux", 1.9180, "-o pool -R softmax -a pool"),
    ("unipool", "UniPool: shared pool, NormRouter, pool aux", 1.9029, "-o pool"),
    ("unipool_reduced", "UniPool, reduced pool (2/3 of 8L experts)", None, "-o pool -e {reduced}"),
]
PAPER_NONE = "not given (\"matches or beats vanilla\")"
REDUCED_POOL = 2 / 3  # {reduced} = round(REDUCED_POOL * 8 * L): 21 at L = 4, 11 at L = 2
RECIPE = "-p tiny -b 16 -t 128 -n 600 -l 2e-3 -w 30 -I 0.025 -A 3e-4 -v 50 -V 40 -S 0 -K 200 -N 1"
SMOKE_RECIPE = "-p tiny -L 2 -C 32 -NH 2 -NKV 1 -F 32 -b 2 -t 16 -n 6 -v 3 -V 2 -S 0 -K 3 -N 2"
PRESET_LAYERS = {"tiny": 4, "182m": 12, "469m": 24, "650m": 36, "830m": 48, "978m": 24}
BASELINE = "vanilla_softmax"
# The paper's claims as pairs of arms: (what the paper finds, arm a, arm b); each is tested as a minus b.
CLAIMS = [
    ("UniPool beats vanilla MoE", "unipool", "vanilla_softmax"),
    ("UniPool beats the best vanilla router (sigmoid, expert bias)", "unipool", "vanilla_sigmoid"),
    ("a reduced pool matches or beats vanilla", "unipool_reduced", "vanilla_softmax"),
    ("in a shared pool the NormRouter beats softmax", "unipool", "pool_softmax_poolaux"),
    ("in a shared softmax pool the pool loss beats the per-layer loss", "pool_softmax_poolaux", "pool_softmax_layeraux"),
    ("a shared softmax pool with the pool loss beats vanilla", "pool_softmax_poolaux", "vanilla_softmax"),
    ("a shared softmax pool with per-layer losses is worse than vanilla", "pool_softmax_layeraux", "vanilla_softmax"),
    ("in vanilla layers the NormRouter is a little worse than softmax", "vanilla_norm", "vanilla_softmax"),
    ("the sigmoid router beats softmax in vanilla layers", "vanilla_sigmoid", "vanilla_softmax"),
]
PROBED = ("vanilla_softmax", "unipool")
HIGHLIGHT = "unipool"
PROBE = ["./infer_unipool", "probe", "-i", "data/sotu/sotu_val_*.bin", "-n", "20", "-T", "1"]
HEALTH = ("unused", "max_share", "entropy", "dead", "used", "top_share", "load_entropy")
META = "ablation.json"  # in a run's folder: recipe, flags, commands so far, wall seconds so far

Arm = collections.namedtuple("Arm", "key label paper flags")
Setup = collections.namedtuple("Setup", "recipe runs out report seeds jobs arms command corpus")
LOCK = threading.Lock()  # one line at a time from the jobs' threads


def say(text):
    with LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = json.dumps(data, indent=1)
    with open(path, "w") as f:  # lists of numbers on one line each
        f.write(re.sub(r"\[\s+([-+.,\w\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n")


def rel(path):
    """The path from the repository root when it is inside it, else the absolute path."""
    inside = os.path.relpath(path, ROOT)
    return path if inside.startswith("..") else inside


def layers(recipe):
    words = recipe.split()
    value = lambda flag, default: words[words.index(flag) + 1] if flag in words else default  # noqa: E731
    return int(value("-L", PRESET_LAYERS[value("-p", "tiny")]))


def arm_flags(arm, recipe):
    return arm.flags.format(reduced=round(REDUCED_POOL * 8 * layers(recipe)))


def corpus():
    """The default corpus's fingerprint: sha256 of its token shards (16 hex digits); a run on other
    tokens is another run."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "sotu", "sotu_*.bin"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def identity(s, arm):
    return {"recipe": s.recipe, "flags": arm_flags(arm, s.recipe), "corpus": s.corpus}


def matches(record, arm, s):
    return record is not None and all(record.get(k) == v for k, v in identity(s, arm).items())


def name(arm, seed):
    return f"{arm.key}_s{seed}"


def summary_path(s, arm, seed):
    return os.path.join(s.runs, name(arm, seed) + ".json")


def run_dir(s, arm, seed):
    return os.path.join(s.out, name(arm, seed))


def plan(s, arm, seed):
    """What a run needs: ('skip', None), ('resume', command) or ('train', command)."""
    if matches(read_json(summary_path(s, arm, seed)), arm, s):
        return "skip", None
    folder = run_dir(s, arm, seed)
    if matches(read_json(os.path.join(folder, META)), arm, s) and glob.glob(os.path.join(folder, "ckpt_*.bin")):
        return "resume", ["./train_unipool", "-r", "latest", "-O", rel(folder), "-T", "1"]
    return "train", ["./train_unipool", *s.recipe.split(), *arm_flags(arm, s.recipe).split(),
                     "-s", str(seed), "-T", "1", "-O", rel(folder)]


def start_fresh(s, arm, seed):
    """An empty run folder (what an earlier attempt left has no checkpoint to resume, or another recipe)."""
    folder = run_dir(s, arm, seed)
    shutil.rmtree(folder, ignore_errors=True)
    meta = dict(identity(s, arm), commands=[], wall_seconds=0.0)
    write_json(os.path.join(folder, META), meta)
    return meta


def tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def train(s, arm, seed):
    """Trains or resumes one run and writes its summary; returns (status, detail)."""
    action, command = plan(s, arm, seed)
    if action == "skip":
        return "skipped", ""
    if os.path.exists(summary_path(s, arm, seed)):
        say(f"stale summary {rel(summary_path(s, arm, seed))} (another recipe, flags or corpus): running again")
    folder = run_dir(s, arm, seed)
    meta = read_json(os.path.join(folder, META)) if action == "resume" else start_fresh(s, arm, seed)
    say(f"{action} {name(arm, seed)}: {shlex.join(command)}")
    start = time.time()
    with open(os.path.join(folder, "train.log"), "a") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    meta["commands"].append(shlex.join(command))
    meta["wall_seconds"] += time.time() - start
    write_json(os.path.join(folder, META), meta)
    if code != 0:
        return "failed", (f"exit {code}; the last lines of {rel(os.path.join(folder, 'train.log'))} "
                          f"(delete the folder to start over):\n{tail(os.path.join(folder, 'train.log'))}")
    write_json(summary_path(s, arm, seed), summarize(arm, seed, meta, folder))
    return {"train": "trained", "resume": "resumed"}[action], f"{meta['wall_seconds']:.0f} s"


def read_log(folder):
    """The val and train records of log.jsonl by step, the last record of a step winning (resumes repeat steps)."""
    val, steps = {}, {}
    with open(os.path.join(folder, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            (val if "val_loss" in record else steps)[record["step"]] = record
    return val, steps


def subsample(points, most=100):
    stride = math.ceil(len(points) / most) if points else 1
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def pool_shape(folder):
    """G pools of E experts, from the model line of the run's log."""
    with open(os.path.join(folder, "train.log"), errors="replace") as f:
        found = re.search(r"G (\d+) pools of E (\d+)", f.read())
    return {"pools": int(found.group(1)), "pool_size": int(found.group(2))} if found else {}


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def summarize(arm, seed, meta, folder):
    val, steps = read_log(folder)
    last = val[max(val)]
    return dict(
        arm=arm.key, label=arm.label, seed=seed, recipe=meta["recipe"], flags=meta["flags"], corpus=meta["corpus"],
        commands=meta["commands"], git_commit=git("rev-parse", "--short", "HEAD"),
        uncommitted_sources=git("status", "--porcelain", "--", "*.c", "*.h", "Makefile").splitlines(),
        wall_seconds=round(meta["wall_seconds"], 1),
        **pool_shape(folder),
        val_curve=[[step, val[step]["val_loss"]] for step in sorted(val)],
        train_curve=subsample([[step, steps[step]["loss"]] for step in sorted(steps)]),
        final_val_loss=last["val_loss"], health={key: last[key] for key in HEALTH})


def probe_path(s, arm, seed):
    return os.path.join(s.runs, f"probe_{name(arm, seed)}.txt")


def probe_header(s, arm):
    return f"recipe: {s.recipe} | flags: {arm_flags(arm, s.recipe)} | corpus: {s.corpus}"


def probe_command(s, arm, seed):
    """The probe on the run's final checkpoint, or None when the run has no current summary."""
    summary = read_json(summary_path(s, arm, seed))
    if not matches(summary, arm, s):
        return None
    ckpt = os.path.join(run_dir(s, arm, seed), f"ckpt_{summary['val_curve'][-1][0]:08d}.bin")
    return PROBE[:2] + ["-c", rel(ckpt)] + PROBE[2:]


def probe(s, arm, seed):
    """Runs the probe unless its file is there for this recipe; returns (status, detail)."""
    path = probe_path(s, arm, seed)
    if os.path.exists(path) and open(path).readline().rstrip("\n") == probe_header(s, arm):
        return "skipped", ""
    command = probe_command(s, arm, seed)
    if command is None or not os.path.exists(os.path.join(ROOT, command[3])):
        return "failed", "no final checkpoint (out/ is not kept across clones): delete the run's summary to retrain"
    say(f"probe {name(arm, seed)}: {shlex.join(command)}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return "failed", f"exit {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    with open(path, "w") as f:
        f.write(f"{probe_header(s, arm)}\ncommand: {shlex.join(command)}\n{done.stdout}")
    return "probed", ""


def job(s, arm, seed):
    """One run, then its probe when it is a probed one; a list of (what, status, detail)."""
    status, detail = train(s, arm, seed)
    results = [(name(arm, seed), status, detail)]
    if arm.key in PROBED and seed == s.seeds[0] and status != "failed":
        results.append(("probe " + name(arm, seed), *probe(s, arm, seed)))
    for what, status, detail in results:
        say(f"{status} {what}" + (f": {detail.splitlines()[0]}" if detail else ""))
    return results


def run_all(s):
    """Every run (seed-major, --jobs at a time); True when none failed."""
    work = [(arm, seed) for seed in s.seeds for arm in s.arms]
    with concurrent.futures.ThreadPoolExecutor(max_workers=s.jobs) as pool:
        results = [r for rs in pool.map(lambda w: job(s, *w), work) for r in rs]
    runs = collections.Counter(status for what, status, _ in results if not what.startswith("probe"))
    probes = collections.Counter(status for what, status, _ in results if what.startswith("probe"))
    say(f"runs: trained {runs['trained']}, resumed {runs['resumed']}, skipped {runs['skipped']}, "
        f"failed {runs['failed']}; probes: written {probes['probed']}, skipped {probes['skipped']}, "
        f"failed {probes['failed']}")
    for what, status, detail in results:
        if status == "failed":
            say(f"FAILED {what}: {detail}")
    return runs["failed"] + probes["failed"] == 0


def dry_run(s):
    for seed in s.seeds:
        for arm in s.arms:
            action, command = plan(s, arm, seed)
            say(f"{action} {name(arm, seed)}" + (f": {shlex.join(command)}" if command else ""))
            if arm.key in PROBED and seed == s.seeds[0]:
                ckpt = rel(os.path.join(run_dir(s, arm, seed), "ckpt_<last step>.bin"))
                say(f"probe {name(arm, seed)}: {shlex.join(PROBE[:2])} -c {ckpt} {shlex.join(PROBE[2:])} "
                    f"> {rel(probe_path(s, arm, seed))}")
    return 0


def build():
    """The programs and the default corpus (a fresh clone has neither)."""
    done = subprocess.run(["make", "train_unipool", "infer_unipool", "data"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"make failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


# ---- the report ----

def mean(values):
    return sum(values) / len(values)


def stats(values):
    n, avg = len(values), mean(values)
    std = math.sqrt(sum((v - avg) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": avg, "std": std, "min": min(values), "max": max(values)}


def arm_health(runs):
    """Routing health at the last validation, the mean over seeds."""
    health = [r["health"] for r in runs]
    return {
        "max_dead": mean([max(h["dead"]) for h in health]),
        "used": [mean(col) for col in zip(*(h["used"] for h in health))],
        "max_top_share": mean([max(h["top_share"]) for h in health]),
        "load_entropy": mean([mean(h["load_entropy"]) for h in health]),
        "unused": mean([h["unused"] for h in health]),
        "entropy": mean([h["entropy"] for h in health]),
    }


# Student t's 97.5% quantile by degrees of freedom: a two-sided 95% interval is mean +- T975[df] x se.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(df):
    """The quantile at df rounded down, and at 10 above 10: both only widen the interval."""
    return T975[min(10, max(1, int(df)))]


def interval(diff, se, df):
    half = t975(df) * se
    return {"diff": diff, "se": se, "df": df, "lo": diff - half, "hi": diff + half}


def versus(a, b):
    """Arm a's final val losses {seed: loss} against arm b's, two ways, each with a 95% interval:
    welch, the difference of the means (Welch's t, Welch-Satterthwaite df); paired, the mean of the per-seed
    differences over the seeds both have (a seed fixes the data order for every arm, so the pairs share it).
    A test is None below 2 seeds (2 shared seeds for the paired one)."""
    out = {"welch": None, "paired": None}
    if len(a) >= 2 and len(b) >= 2:
        sa, sb = stats(list(a.values())), stats(list(b.values()))
        va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
        df = ((va + vb) ** 2 / (va ** 2 / (sa["n"] - 1) + vb ** 2 / (sb["n"] - 1)) if va + vb > 0
              else sa["n"] + sb["n"] - 2)
        out["welch"] = interval(sa["mean"] - sb["mean"], math.sqrt(va + vb), df)
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        diffs = [a[seed] - b[seed] for seed in common]
        d = stats(diffs)
        out["paired"] = dict(interval(d["mean"], d["std"] / math.sqrt(d["n"]), d["n"] - 1), seeds=common, diffs=diffs)
    tests = [t for t in out.values() if t]
    beyond = sum(t["lo"] > 0 or t["hi"] < 0 for t in tests)
    out["verdict"] = (None if not tests else "beyond seed noise" if beyond == len(tests) else
                      "within seed noise" if beyond == 0 else "beyond seed noise in one test only")
    return out


def parse_probe(text):
    """Baseline loss and the mean loss change over the deep layers per probe kind."""
    lines = text.splitlines()
    kinds = next(line for line in lines if line.startswith("layer |")).split("|")[1:]
    means = next(line for line in lines if line.startswith("mean")).split("|")[1:]
    return {"baseline": float(re.search(r"baseline loss ([-+\d.]+)", text).group(1)),
            "mean_change": {k.strip(): float(m.split()[0]) for k, m in zip(kinds, means)}}


def collect(s):
    """The summaries for the current recipe by arm key; stale summaries by name."""
    runs, stale = collections.defaultdict(list), []
    by_key = {arm.key: arm for arm in map(Arm._make, ARMS)}
    for path in sorted(glob.glob(os.path.join(s.runs, "*_s*.json"))):
        summary = read_json(path)
        arm = by_key.get(summary.get("arm"))
        if arm and matches(summary, arm, s):
            runs[arm.key].append(summary)
        else:
            stale.append(os.path.basename(path))
    return runs, stale


def probes(s):
    """The probe files for the current recipe, parsed."""
    found = []
    for arm in (a for a in map(Arm._make, ARMS) if a.key in PROBED):
        path = probe_path(s, arm, s.seeds[0])
        text = open(path).read() if os.path.exists(path) else ""
        if text.startswith(probe_header(s, arm) + "\n"):
            found.append(dict(arm=arm.key, seed=s.seeds[0], file=os.path.basename(path), **parse_probe(text)))
    return found


def results(s):
    runs, stale = collect(s)
    arms = []
    for arm in map(Arm._make, ARMS):
        ours = runs.get(arm.key, [])
        entry = dict(arm._asdict(), flags=arm_flags(arm, s.recipe), runs=len(ours),
                     seeds={r["seed"]: r["final_val_loss"] for r in sorted(ours, key=lambda r: r["seed"])})
        if ours:
            entry.update(stats=stats(list(entry["seeds"].values())), health=arm_health(ours),
                         pool_size=ours[0].get("pool_size"), wall_seconds=mean([r["wall_seconds"] for r in ours]))
        arms.append(entry)
    by_key = {entry["key"]: entry for entry in arms}
    claims = [dict(claim=claim, a=a, b=b, paper=None if by_key[a]["paper"] is None or by_key[b]["paper"] is None
                   else by_key[a]["paper"] - by_key[b]["paper"], **versus(by_key[a]["seeds"], by_key[b]["seeds"]))
              for claim, a, b in CLAIMS]
    missing = [f"{arm.key}_s{seed}" for arm in map(Arm._make, ARMS) for seed in s.seeds
               if seed not in {r["seed"] for r in runs.get(arm.key, [])}]
    commits = sorted({r["git_commit"] for rs in runs.values() for r in rs})
    return dict(command=s.command, recipe=s.recipe, corpus=s.corpus, layers=layers(s.recipe), seeds=s.seeds, commits=commits,
                arms=arms, claims=claims, missing=missing, stale=stale, probes=probes(s)), runs


def fmt(value, digits=4, sign=""):
    return "-" if value is None else f"{value:{sign}.{digits}f}"


def md_losses(res):
    rows = ["| arm | what | flags | paper (182M) | ours: mean | sample std | min-max | n | per seed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in res["arms"]:
        st = a.get("stats")
        paper = PAPER_NONE if a["paper"] is None else fmt(a["paper"])
        spread = f"{st['min']:.4f}-{st['max']:.4f}" if st else "-"
        seeds = ", ".join(f"s{k}: {v:.4f}" for k, v in a["seeds"].items()) or "missing"
        rows.append(f"| {a['key']} | {a['label']} | `{a['flags']}` | {paper} | {fmt(st and st['mean'])} | "
                    f"{fmt(st and st['std'])} | {spread} | {a['runs']} | {seeds} |")
    return rows


def md_health(res):
    rows = ["| arm | max dead share (over layers) | experts used per layer (of E) | busiest expert share "
            "(max over layers) | load entropy (mean over layers) | all experts: unused | all experts: entropy |",
            "|---|---|---|---|---|---|---|"]
    for a in res["arms"]:
        h = a.get("health")
        if h is None:
            rows.append(f"| {a['key']} | missing | | | | | |")
            continue
        used = "/".join(f"{u:g}" for u in (round(u, 1) for u in h["used"]))
        rows.append(f"| {a['key']} | {h['max_dead']:.1%} | {used} (E = {a['pool_size']}) | "
                    f"{h['max_top_share']:.1%} | {h['load_entropy']:.3f} | {h['unused']:g} | {h['entropy']:.3f} |")
    return rows


def md_claims(res):
    rows = ["Each claim is tested as a's final val loss minus b's, two ways, with 95% intervals: Welch's (the "
            "difference of the means) and paired (the mean of the per-seed differences: a seed fixes the data order "
            "for every arm). Student t is taken at the degrees of freedom rounded down. A difference is beyond the "
            "seed noise when both intervals exclude 0.", "",
            "| the paper finds | a - b | paper: a - b | ours: a - b | Welch 95% interval | per seed | "
            "paired 95% interval | verdict |", "|---|---|---|---|---|---|---|---|"]
    span = lambda t: "-" if t is None else f"[{t['lo']:+.4f}, {t['hi']:+.4f}] (df {t['df']:.1f})"
    for c in res["claims"]:
        welch, paired = c["welch"], c["paired"]
        per_seed = ", ".join(f"s{seed}: {d:+.4f}" for seed, d in zip(paired["seeds"], paired["diffs"])) if paired else "-"
        rows.append(f"| {c['claim']} | {c['a']} - {c['b']} | {fmt(c['paper'], sign='+')} | "
                    f"{fmt(welch and welch['diff'], sign='+')} | {span(welch)} | {per_seed} | "
                    f"{span(paired)} | {c['verdict'] or 'not comparable: needs 2+ seeds in both arms'} |")
    return rows


def md_order(res):
    ours = sorted((a for a in res["arms"] if "stats" in a), key=lambda a: a["stats"]["mean"])
    paper = sorted((a for a in res["arms"] if a["paper"] is not None), key=lambda a: a["paper"])
    rows = ["| rank | ours (mean val loss) | paper (182M val loss) |", "|---|---|---|"]
    for i in range(max(len(ours), len(paper))):
        left = f"{ours[i]['key']} {ours[i]['stats']['mean']:.4f}" if i < len(ours) else ""
        right = f"{paper[i]['key']} {paper[i]['paper']:.4f}" if i < len(paper) else ""
        rows.append(f"| {i + 1} | {left} | {right} |")
    unnumbered = ", ".join(a["key"] for a in res["arms"] if a["paper"] is None)
    return rows + (["", f"The paper gives no number for {unnumbered}."] if unnumbered else [])


def md_probe(res):
    rows = ["Each layer of the deep half in turn gets uniformly random experts instead of its router's choice "
            "(from its whole pool, then from its 8 most-used experts); the loss change, mean over the deep layers "
            f"(`{shlex.join(PROBE)}` on the final checkpoint; files in runs/).", "",
            "| arm | seed | baseline loss | probe | mean loss change |", "|---|---|---|---|---|"]
    for p in res["probes"]:
        rows += [f"| {p['arm']} | {p['seed']} | {p['baseline']:.4f} | {kind} | {change:+.5f} |"
                 for kind, change in p["mean_change"].items()]
    missing = ", ".join(f"{key}_s{res['seeds'][0]}" for key in PROBED if key not in {p["arm"] for p in res["probes"]})
    return rows + (["", f"Missing probes: {missing}."] if missing else [])


def markdown(res):
    lines = ["# Router and ownership ablation (arXiv 2605.06665, the 182M table) at CPU scale", "",
             f"Reproduce: `{res['command']}` (trains what has no summary, then writes this report; "
             "`--report` rewrites the report alone).", "",
             f"Recipe for every arm: `{res['recipe']}` plus the arm's flags and `-s SEED -T 1` (L = {res['layers']}). "
             f"Seeds {', '.join(map(str, res['seeds']))}. Built from commit(s) {', '.join(res['commits']) or '-'}. "
             f"Corpus: data/sotu (`make data`), fingerprint {res['corpus']}.",
             "", "## Final val loss", "", *md_losses(res),
             "", "## Routing health at the last validation (mean over seeds)", "", *md_health(res),
             "", "## The paper's claims, pair by pair", "", *md_claims(res),
             "", "## Ordering, lowest val loss first", "", *md_order(res),
             "", "## Routing-randomisation probe", "", *md_probe(res),
             "", "## Missing and stale", "",
             "Missing runs: " + (", ".join(res["missing"]) or "none") + ".",
             "Stale summaries (another recipe, flags or corpus, left out): " + (", ".join(res["stale"]) or "none") + ".",
             "", "Val curves: val_curves.svg."]
    return "\n".join(lines) + "\n"


# ---- the SVG ----

W, LEFT, RIGHT, GAP, TOP, PLOT_H = 900, 64, 16, 58, 76, 280
PANEL_W = (W - LEFT - RIGHT - GAP) // 2
SHOW_FROM = 0.2  # the x axis starts at this fraction of the last step: the first steps' drop hides the rest
COLORS = {"vanilla_softmax": "#1f77b4", "vanilla_norm": "#17becf", "vanilla_sigmoid": "#2ca02c",
          "pool_softmax_layeraux": "#9467bd", "pool_softmax_poolaux": "#ff7f0e", "unipool": "#d62728",
          "unipool_reduced": "#e377c2"}


def nice_ticks(lo, hi, count=8):
    raw = (hi - lo) / count or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def mean_curve(runs):
    """The mean over seeds at the steps every seed has (none without seeds)."""
    if not runs:
        return []
    curves = [dict(map(tuple, r["val_curve"])) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(step, mean([c[step] for c in curves])) for step in steps]


def panels(runs):
    """(title, [(arm, seed curves, mean curve)], reference) for the vanilla and the shared-pool arms; the
    reference, drawn dashed, is the baseline's mean in the shared-pool panel."""
    out = []
    for title, owner in (("vanilla MoE: each layer owns its experts", "-o layer"),
                         ("one shared pool (UniPool highlighted)", "-o pool")):
        arms = [a for a in map(Arm._make, ARMS) if a.flags.startswith(owner)]
        lines = [(a, [r["val_curve"] for r in runs.get(a.key, [])], mean_curve(runs.get(a.key, []))) for a in arms]
        out.append((title, lines, mean_curve(runs.get(BASELINE, [])) if owner == "-o pool" else []))
    return out


def ranges(shown):
    """x and y ranges over every curve's points from SHOW_FROM of the last step on."""
    points = [p for _, lines, _ in shown for _, seeds, avg in lines for curve in seeds + [avg] for p in curve]
    last = max((p[0] for p in points), default=1)
    kept = [p for p in points if p[0] >= SHOW_FROM * last] or [(0, 0.0), (1, 1.0)]
    lo, hi = min(p[1] for p in kept), max(p[1] for p in kept)
    pad = (hi - lo) * 0.04 or 0.01
    return (min(p[0] for p in kept), max(last, min(p[0] for p in kept) + 1)), (lo - pad, hi + pad)


def polyline(points, x0, xr, yr, style):
    xs = lambda step: x0 + (step - xr[0]) / (xr[1] - xr[0]) * PANEL_W  # noqa: E731
    ys = lambda loss: TOP + (yr[1] - loss) / (yr[1] - yr[0]) * PLOT_H  # noqa: E731
    coords = " ".join(f"{xs(x):.1f},{ys(y):.1f}" for x, y in points if x >= xr[0])
    return f'<polyline points="{coords}" fill="none" {style}/>'


def axes(x0, xr, yr, title):
    bottom = TOP + PLOT_H
    parts = [f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PLOT_H}" fill="none" stroke="#444"/>',
             f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 10}" text-anchor="middle" class="panel">{escape(title)}</text>',
             f'<text x="{x0 + PANEL_W / 2}" y="{bottom + 36}" text-anchor="middle">step</text>',
             f'<text transform="translate({x0 - 48},{TOP + PLOT_H / 2}) rotate(-90)" text-anchor="middle">'
             'val loss</text>']
    for v in nice_ticks(*yr):
        y = TOP + (yr[1] - v) / (yr[1] - yr[0]) * PLOT_H
        parts += [f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PANEL_W}" y2="{y:.1f}" stroke="#ddd"/>',
                  f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>']
    for v in nice_ticks(*xr):
        x = x0 + (v - xr[0]) / (xr[1] - xr[0]) * PANEL_W
        parts += [f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#444"/>',
                  f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{v:g}</text>']
    return parts


def legend(x0, row, style, text):
    y = TOP + PLOT_H + 58 + 18 * row
    return [f'<line x1="{x0}" y1="{y - 4}" x2="{x0 + 26}" y2="{y - 4}" {style}/>',
            f'<text x="{x0 + 32}" y="{y}">{escape(text)}</text>']


def panel(x0, shown, xr, yr):
    title, lines, reference = shown
    parts = axes(x0, xr, yr, title)
    for row, (arm, seeds, avg) in enumerate(lines):
        color, width = COLORS[arm.key], 3 if arm.key == HIGHLIGHT else 1.8
        parts += [polyline(c, x0, xr, yr, f'class="seed" stroke="{color}" stroke-width="0.8" stroke-opacity="0.35"')
                  for c in seeds]
        style = f'stroke="{color}" stroke-width="{width}"'
        if avg:
            parts.append(polyline(avg, x0, xr, yr, f'class="mean" data-arm="{arm.key}" {style}'))
        parts += legend(x0, row, style, f"{arm.key}: " + (f"{avg[-1][1]:.4f} (n = {len(seeds)})" if avg else "no runs"))
    if reference:
        style = 'stroke="#777" stroke-width="1.5" stroke-dasharray="5,4"'
        parts += [polyline(reference, x0, xr, yr, f'class="reference" {style}'),
                  *legend(x0, len(lines), style, f"{BASELINE}, for reference")]
    return parts


def svg(runs, recipe):
    shown = panels(runs)
    xr, yr = ranges(shown)
    height = TOP + PLOT_H + 58 + 18 * max(len(lines) + bool(reference) for _, lines, reference in shown)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
            'font-family="sans-serif" font-size="12">',
            f'<rect width="{W}" height="{height}" fill="white"/>',
            f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">Val loss by step: '
            'mean over seeds (thick), each seed (faint); final mean in the legend</text>',
            f'<text x="{W / 2}" y="42" text-anchor="middle" font-size="12">recipe: {escape(recipe)}</text>',
            '<style>.panel { font-size: 13px; font-weight: bold; }</style>']
    for i, one in enumerate(shown):
        body += panel(LEFT + i * (PANEL_W + GAP), one, xr, yr)
    return "\n".join(body + ["</svg>"]) + "\n"


def report(s):
    res, runs = results(s)
    write_json(os.path.join(s.report, "results.json"), res)
    with open(os.path.join(s.report, "results.md"), "w") as f:
        f.write(markdown(res))
    with open(os.path.join(s.report, "val_curves.svg"), "w") as f:
        f.write(svg(runs, s.recipe))
    say(f"report: {rel(os.path.join(s.report, 'results.md'))}, results.json, val_curves.svg "
        f"(missing runs: {len(res['missing'])})")


def commit_hint(s):
    paths = " ".join(rel(p) for p in (s.runs, *(os.path.join(s.report, f) for f in
                                                ("results.md", "results.json", "val_curves.svg"))))
    say(f"to commit: git add {paths} && git commit -m 'ablation: runs and report' -- {paths}")


# ---- the command line ----

def setup(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N (default 3)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--only", help="comma-separated arm keys: " + ", ".join(a[0] for a in ARMS))
    p.add_argument("--report", action="store_true", help="only write the report from the summaries that exist")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--smoke", metavar="DIR", help="every arm for one seed with a micro model; all output in DIR")
    a = p.parse_args(argv)
    arms = [Arm._make(arm) for arm in ARMS if not a.only or arm[0] in a.only.split(",")]
    unknown = set(a.only.split(",")) - {arm[0] for arm in ARMS} if a.only else set()
    if unknown or not arms or a.seeds < 1 or a.jobs < 1:
        p.error(f"unknown arm(s) {', '.join(sorted(unknown))}" if unknown else "nothing to run")
    if a.smoke:
        smoke = os.path.abspath(a.smoke)
        return a, Setup(SMOKE_RECIPE, os.path.join(smoke, "runs"), os.path.join(smoke, "out"), smoke, [1],
                        a.jobs, arms, f"python3 dev/ablation/run.py --smoke {smoke}", None)
    return a, Setup(RECIPE, os.path.join(HERE, "runs"), os.path.join(ROOT, "out", "ablation"), HERE,
                    list(range(1, a.seeds + 1)), a.jobs, arms, f"python3 dev/ablation/run.py --seeds {a.seeds}", None)


def main(argv):
    a, s = setup(argv)
    build()  # the corpus first: its fingerprint tells current summaries from stale ones
    s = s._replace(corpus=corpus())
    if a.dry_run:
        return dry_run(s)
    ok = True
    if not a.report:
        ok = run_all(s)
    report(s)
    if not a.smoke:
        commit_hint(s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
