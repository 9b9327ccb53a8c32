#!/usr/bin/env python3
"""Named experiments on the paper's routing and ownership claims (arXiv 2605.06665) at a scale a 2-core CPU
trains. An experiment (EXPERIMENTS) is a record: a recipe (the same tokens, active parameters and optimizer
for every arm), the data flags and the corpus they fingerprint, the arms (flags added to the recipe), the
claims (linear combinations of arms' final val losses), the seeds, the probed arms, and the folders its
summaries, report and run folders live in.

    sotu (the default): the 182M router/ownership table, 7 arms on data/sotu, seeds 1, 2, 3;
        summaries in dev/ablation/runs/, report in dev/ablation/, run folders in out/ablation/
    mix: 9 arms on data/mix (`make data-mix`) at L 8 (two at L 4), seeds 101 to 106 for the three central
        arms (vanilla softmax, vanilla NormRouter, UniPool) and 101 to 104 for the other six; summaries in
        dev/ablation/mix/runs/, report in dev/ablation/mix/, run folders in out/ablation/mix/; every run's
        final checkpoint also gets routing diagnostics (./infer_unipool util), every run of the three
        central arms and of the shared softmax pool util's counts source by source (data/mix/sources/),
        the report says which claims are resolved, how many seeds the unresolved ones need, the course
        over training of the two central gaps and of every other claim, and how much a layer's choice of
        expert tells about a token's source

Every arm trains for the seeds of the experiment's plan (--seeds N: its first N seeds instead), each run on
one thread (the same seed gives the same bits), --jobs runs at a time, first the first seed of every arm,
then the second, and so on. A finished run leaves a summary in the experiment's runs/<arm>_s<seed>.json;
a summary for the current recipe, data flags, arm flags and corpus (a fingerprint of the corpus's shards)
means the run is done, so a sitting on a fresh clone trains only what no committed summary covers. A run
stopped part-way resumes from its last checkpoint in its run folder (-r latest) if that folder is still
there.
After a run of the first seed of a probed arm, infer_unipool's routing-randomisation probe runs on its
final checkpoint, and after any run of an arm the experiment counts by source, util once per source. Last,
the report: results.md, results.json, val_curves.svg.

    python3 dev/ablation/run.py                   train what is missing (the plan, 2 jobs), probe, report
    python3 dev/ablation/run.py --seeds 5 --only unipool,vanilla_softmax
    python3 dev/ablation/run.py --experiment mix
    python3 dev/ablation/run.py --report          the report from the summaries that exist
    python3 dev/ablation/run.py --dry-run         print the commands, run nothing
    python3 dev/ablation/run.py --smoke DIR       every arm, one seed, a micro model on data/sotu; all
                                                  output in DIR

It builds the programs and the experiment's corpus with make (--report only the corpus, when it is
missing; --dry-run nothing), commits nothing and prints what to commit. Exit status 1 if a run, the probe,
the diagnostics or the counts by source failed. Standard library only.
"""
import argparse
import collections
import concurrent.futures
import functools
import glob
import hashlib
import json
import math
import os
import random
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

# ---- the experiments ----

# key, label, the paper's val loss at 182M (None: not given), flags added to the recipe. In the flags,
# {name} stands for round(fraction * 8 * L) experts, the fraction from the experiment's pools and L the
# arm's own (the recipe's, or the arm's -L).
Arm = collections.namedtuple("Arm", "key label paper flags")
# a corpus: its name, the make target that builds it, the data flags train_unipool takes for it, the
# glob of the token shards its fingerprint covers, the glob of its val shards (the probe's, util's), the
# glob of its per-source shards (None: one source; a source's shards share a name up to their number) and
# the util batches of one sequence each counted per source (0: all of its tokens)
Corpus = collections.namedtuple("Corpus", "name make flags shards val sources source_batches")
# an experiment: name; the report's title; recipe; corpus; the first of its seeds; the plan (how many seeds
# every arm trains, and {arm key: how many} for the arms that train more; --seeds N gives every arm N
# instead); arms; pools ({name: fraction} for the flags); claims ((what the paper finds, a linear
# combination of arm keys)); the claims section's title; the probed arms (their first seed); course (the
# central claims, whose paired gaps the report follows over training in a table of their own; given any,
# it follows every other claim too, in a table with a row each); diagnostics (util on every final
# checkpoint); by_source (the arms whose final checkpoints util counts source by source, every seed);
# resolve (the report says which claims are resolved and what the others need); the folders
# of its summaries, run folders and report; the losses table's words for an arm the paper gives no
# number ({key: text}, else "not given"); the baseline (drawn dashed beside the pools) and the
# highlighted arm of the plot
Experiment = collections.namedtuple(
    "Experiment", "name title recipe corpus first_seed seeds more_seeds arms pools claims claims_title probed "
                  "course diagnostics by_source resolve runs out report paper_none baseline highlight")

PAPER_NONE = "not given (\"matches or beats vanilla\")"
SOTU_CORPUS = Corpus("data/sotu", "data", "", "data/sotu/sotu_*.bin", "data/sotu/sotu_val_*.bin", None, 0)
MIX_CORPUS = Corpus("data/mix", "data-mix",
                    "-i data/mix/mix_train_*.bin -j data/mix/mix_val_*.bin -z data/mix/gpt2_tokenizer.bin",
                    "data/mix/mix_*.bin", "data/mix/mix_val_*.bin", "data/mix/sources/*_val_*.bin", 0)

# The SOTU ablation: the paper's 182M table, seven arms on data/sotu.
ARMS = [
    ("vanilla_softmax", "vanilla MoE, softmax, per-layer aux", 1.9317, "-o layer"),
    ("vanilla_norm", "vanilla MoE, NormRouter, per-layer aux", 1.9375, "-o layer -R norm"),
    ("vanilla_sigmoid", "vanilla MoE, sigmoid, expert bias (aux-free)", 1.9239, "-o layer -R sigmoid"),
    ("pool_softmax_layeraux", "shared pool, softmax, per-layer aux", 1.9480, "-o pool -R softmax -a layer"),
    ("pool_softmax_poolaux", "shared pool, softmax, pool aux", 1.9180, "-o pool -R softmax -a pool"),
    ("unipool", "UniPool: shared pool, NormRouter, pool aux", 1.9029, "-o pool"),
    ("unipool_reduced", "UniPool, reduced pool (2/3 of 8L experts)", None, "-o pool -e {reduced}"),
]
RECIPE = "-p tiny -b 16 -t 128 -n 600 -l 2e-3 -w 30 -I 0.025 -A 3e-4 -v 50 -V 40 -S 0 -K 200 -N 1"
# The paper's claims as pairs of arms: (what the paper finds, a - b).
CLAIMS = [
    ("UniPool beats vanilla MoE", "unipool - vanilla_softmax"),
    ("UniPool beats the best vanilla router (sigmoid, expert bias)", "unipool - vanilla_sigmoid"),
    ("a reduced pool matches or beats vanilla", "unipool_reduced - vanilla_softmax"),
    ("in a shared pool the NormRouter beats softmax", "unipool - pool_softmax_poolaux"),
    ("in a shared softmax pool the pool loss beats the per-layer loss", "pool_softmax_poolaux - pool_softmax_layeraux"),
    ("a shared softmax pool with the pool loss beats vanilla", "pool_softmax_poolaux - vanilla_softmax"),
    ("a shared softmax pool with per-layer losses is worse than vanilla", "pool_softmax_layeraux - vanilla_softmax"),
    ("in vanilla layers the NormRouter is a little worse than softmax", "vanilla_norm - vanilla_softmax"),
    ("the sigmoid router beats softmax in vanilla layers", "vanilla_sigmoid - vanilla_softmax"),
]

# The mix experiment: nine arms on data/mix, at L 8 and, for depth, L 4. The recipe was fixed before it.
MIX_ARMS = [
    ("vanilla_softmax", "vanilla MoE, softmax, per-layer aux", 1.9317, "-o layer"),
    ("vanilla_norm", "vanilla MoE, NormRouter, per-layer aux", 1.9375, "-o layer -R norm"),
    ("vanilla_sigmoid", "vanilla MoE, sigmoid, expert bias (aux-free)", 1.9239, "-o layer -R sigmoid"),
    ("pool_softmax_poolaux", "shared pool, softmax, pool aux", 1.9180, "-o pool -R softmax -a pool"),
    ("unipool", "UniPool: shared pool, NormRouter, pool aux", 1.9029, "-o pool"),
    ("unipool_r67", "UniPool, pool of 2/3 of 8L experts", None, "-o pool -e {r67}"),
    ("unipool_r42", "UniPool, pool of 41.6% of 8L experts", None, "-o pool -e {r42}"),
    ("vanilla_softmax_L4", "vanilla MoE, softmax, L 4", None, "-o layer -L 4"),
    ("unipool_L4", "UniPool, L 4", None, "-o pool -L 4"),
]
MIX_RECIPE = "-p exp -b 16 -t 256 -n 1500 -l 2e-3 -w 30 -I 0.025 -A 3e-4 -v 250 -V 64 -S 0 -K 250 -N 1"
HEADLINE = "unipool - vanilla_softmax"
# the arms of the central claims: the power calculation (README) gives them 6 seeds, the other arms 4
CENTRAL_ARMS = ("vanilla_softmax", "vanilla_norm", "unipool")
POOL_EFFECT = "unipool - vanilla_norm"
MIX_CLAIMS = [
    ("UniPool beats vanilla MoE (the paper's headline)", HEADLINE),
    ("the pool's own effect at a fixed router", POOL_EFFECT),
    ("UniPool beats the best vanilla router", "unipool - vanilla_sigmoid"),
    ("a pool of 2/3 matches or beats vanilla", "unipool_r67 - vanilla_softmax"),
    ("a pool of 41.6% matches or beats vanilla", "unipool_r42 - vanilla_softmax"),
    ("in a shared pool the NormRouter beats softmax", "unipool - pool_softmax_poolaux"),
    ("a shared softmax pool with the pool loss beats vanilla", "pool_softmax_poolaux - vanilla_softmax"),
    ("in vanilla layers the NormRouter is a little worse than softmax", "vanilla_norm - vanilla_softmax"),
    ("the sigmoid router beats softmax in vanilla layers", "vanilla_sigmoid - vanilla_softmax"),
    ("UniPool's gain grows with depth", "(unipool - vanilla_softmax) - (unipool_L4 - vanilla_softmax_L4)"),
]

EXPERIMENTS = {e.name: e for e in (
    Experiment(
        name="sotu", title="Router and ownership ablation (arXiv 2605.06665, the 182M table) at CPU scale",
        recipe=RECIPE, corpus=SOTU_CORPUS, first_seed=1, seeds=3, more_seeds={}, arms=[Arm._make(a) for a in ARMS],
        pools={"reduced": 2 / 3}, claims=CLAIMS, claims_title="The paper's claims, pair by pair",
        probed=("vanilla_softmax", "unipool"), course=(), diagnostics=False, by_source=(), resolve=False,
        runs=os.path.join(HERE, "runs"), out=os.path.join(ROOT, "out", "ablation"), report=HERE,
        paper_none={"unipool_reduced": PAPER_NONE}, baseline="vanilla_softmax", highlight="unipool"),
    Experiment(
        name="mix", title="UniPool's claims (arXiv 2605.06665) on data/mix at CPU scale: 9 arms, L 8 and L 4",
        recipe=MIX_RECIPE, corpus=MIX_CORPUS, first_seed=101, seeds=4, more_seeds=dict.fromkeys(CENTRAL_ARMS, 6),
        arms=[Arm._make(a) for a in MIX_ARMS],
        pools={"r67": 2 / 3, "r42": 0.416}, claims=MIX_CLAIMS, claims_title="The paper's claims",
        probed=("vanilla_softmax", "unipool"), course=(HEADLINE, POOL_EFFECT), diagnostics=True,
        by_source=("vanilla_softmax", "vanilla_norm", "pool_softmax_poolaux", "unipool"), resolve=True,
        runs=os.path.join(HERE, "mix", "runs"), out=os.path.join(ROOT, "out", "ablation", "mix"),
        report=os.path.join(HERE, "mix"),
        paper_none={"unipool_r67": PAPER_NONE, "unipool_r42": PAPER_NONE},
        baseline="vanilla_softmax", highlight="unipool"),
)}
DEFAULT = "sotu"

SMOKE_RECIPE = "-p tiny -L 2 -C 32 -NH 2 -NKV 1 -F 32 -b 2 -t 16 -n 6 -v 3 -V 2 -S 0 -K 3 -N 2"
# every experiment's smoke trains on data/sotu: it tests the machinery, not the corpus; its two sources are
# a train shard and the val shard, 32 sequences of each
SMOKE_CORPUS = SOTU_CORPUS._replace(sources="data/sotu/sotu_*_00000[01].bin", source_batches=32)
PRESET_LAYERS = {"tiny": 4, "exp": 8, "182m": 12, "469m": 24, "650m": 36, "830m": 48, "978m": 24}
HEALTH = ("unused", "max_share", "entropy", "dead", "used", "top_share", "load_entropy")
META = "ablation.json"  # in a run's folder: recipe, flags, commands so far, wall seconds so far
UTIL_BATCHES = 64  # val batches the diagnostics count tokens over
TOP_N = 16  # the diagnostics' most-used experts of a layer
NULL_PERMUTATIONS = 200  # source labels shuffled over documents: the by-source baseline's draws
NULL_SEED = 2605  # and their seed
RESOLVED_WIDTH = 0.03  # a claim whose paired 95% interval is at most this wide is resolved even if it holds 0

# seeds: {arm key: its seeds} for every arm of the experiment (the report's missing runs), arms: the ones to run
Setup = collections.namedtuple("Setup", "exp recipe data source runs out report seeds jobs arms command corpus")
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


def layers(flags):
    """L as train_unipool takes it from these flags, in order: -p sets the preset's, -L overrides."""
    words, L = flags.split(), PRESET_LAYERS["tiny"]
    for flag, value in zip(words, words[1:]):
        if flag == "-p":
            L = PRESET_LAYERS[value]
        elif flag == "-L":
            L = int(value)
    return L


def arm_flags(s, arm):
    """The arm's flags with each {name} a pool of round(fraction * 8 L) experts, L the arm's own."""
    L = layers(s.recipe + " " + arm.flags)
    return arm.flags.format(**{key: round(fraction * 8 * L) for key, fraction in s.exp.pools.items()})


def parse_combination(text):
    """A claim's linear combination of arm keys ('a - b', '(a - b) - (c - d)', sums too) as
    [(key, coefficient)], in order of first appearance, a key named twice once (dropped at 0)."""
    tokens, pos = re.findall(r"\w+|\S", text), 0

    def term(sign):
        nonlocal pos
        while pos < len(tokens) and tokens[pos] in "+-":
            sign, pos = -sign if tokens[pos] == "-" else sign, pos + 1
        if pos == len(tokens):
            raise ValueError(f"'{text}': a term is missing at the end")
        token, pos = tokens[pos], pos + 1
        if token == "(":
            out = expr(sign)
            if pos == len(tokens) or tokens[pos] != ")":
                raise ValueError(f"'{text}': a ')' is missing")
            pos += 1
            return out
        if not re.fullmatch(r"[A-Za-z_]\w*", token):
            raise ValueError(f"'{text}': unexpected '{token}'")
        return [(token, sign)]

    def expr(sign):
        nonlocal pos
        out = term(sign)
        while pos < len(tokens) and tokens[pos] in "+-":
            op, pos = 1 if tokens[pos] == "+" else -1, pos + 1
            out += term(sign * op)
        return out

    terms = expr(1)
    if pos != len(tokens):
        raise ValueError(f"'{text}': unexpected '{tokens[pos]}'")
    merged = {}
    for key, coef in terms:
        merged[key] = merged.get(key, 0) + coef
    return [(key, coef) for key, coef in merged.items() if coef]


def pair(terms):
    """(a, b) when the combination is a - b, else None."""
    return (terms[0][0], terms[1][0]) if [c for _, c in terms] == [1, -1] else None


def fingerprint(corpus):
    """The corpus's fingerprint: sha256 of its token shards (16 hex digits), None when it has none; a
    run on other tokens is another run."""
    return shards_fingerprint([corpus.shards])


def shards_fingerprint(patterns):
    """sha256 of the files the globs match, in path order (16 hex digits); None when they match none."""
    paths = sorted({path for pattern in patterns for path in glob.glob(os.path.join(ROOT, pattern))})
    if not paths:
        return None
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def identity(s, arm):
    data = {"data": s.data} if s.data else {}  # the SOTU runs' summaries predate data flags
    return {"recipe": s.recipe, **data, "flags": arm_flags(s, arm), "corpus": s.corpus}


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
    return "train", ["./train_unipool", *s.recipe.split(), *s.data.split(), *arm_flags(s, arm).split(),
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
    data = {"data": meta["data"]} if "data" in meta else {}
    return dict(
        arm=arm.key, label=arm.label, seed=seed, recipe=meta["recipe"], **data, flags=meta["flags"],
        corpus=meta["corpus"], commands=meta["commands"], git_commit=git("rev-parse", "--short", "HEAD"),
        uncommitted_sources=git("status", "--porcelain", "--", "*.c", "*.h", "Makefile").splitlines(),
        wall_seconds=round(meta["wall_seconds"], 1),
        **pool_shape(folder),
        val_curve=[[step, val[step]["val_loss"]] for step in sorted(val)],
        train_curve=subsample([[step, steps[step]["loss"]] for step in sorted(steps)]),
        final_val_loss=last["val_loss"], health={key: last[key] for key in HEALTH})


def final_checkpoint(s, arm, seed, summary):
    return os.path.join(run_dir(s, arm, seed), f"ckpt_{summary['val_curve'][-1][0]:08d}.bin")


def probe_base(s):
    """The probe's command without its checkpoint: ./infer_unipool probe, then its flags."""
    return ["./infer_unipool", "probe", "-i", s.source.val, "-n", "20", "-T", "1"]


def probe_path(s, arm, seed):
    return os.path.join(s.runs, f"probe_{name(arm, seed)}.txt")


def probe_header(s, arm):
    data = f" | data: {s.data}" if s.data else ""
    return f"recipe: {s.recipe}{data} | flags: {arm_flags(s, arm)} | corpus: {s.corpus}"


def probe_command(s, arm, seed):
    """The probe on the run's final checkpoint, or None when the run has no current summary."""
    summary = read_json(summary_path(s, arm, seed))
    if not matches(summary, arm, s):
        return None
    base = probe_base(s)
    return base[:2] + ["-c", rel(final_checkpoint(s, arm, seed, summary))] + base[2:]


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


# ---- routing diagnostics on a final checkpoint ----

def util_command(s, arm, seed, ckpt):
    """infer_unipool util on a checkpoint: tokens per layer and expert over the val shards, into the
    run folder's util.csv (and util.svg)."""
    return ["./infer_unipool", "util", "-c", rel(ckpt), "-i", s.source.val, "-n", str(UTIL_BATCHES), "-T", "1",
            "-o", rel(os.path.join(run_dir(s, arm, seed), "util"))]


def read_util_csv(text):
    """util's CSV (layer,expert,tokens) as {layer: [(expert, tokens), ...]}, in the file's order."""
    rows = collections.defaultdict(list)
    lines = text.strip().splitlines()
    if not lines or lines[0].strip() != "layer,expert,tokens":
        raise ValueError("util's CSV lacks its header 'layer,expert,tokens'")
    for line in lines[1:]:
        layer, expert, tokens = (int(x) for x in line.split(","))
        rows[layer].append((expert, tokens))
    return rows


def diagnose_csv(text):
    """Routing diagnostics from util's CSV (layer,expert,tokens; a layer's rows are the experts it can
    reach): per layer the load entropy over its reachable experts normalised by the log of their number
    (1: even; None for a layer that reaches one expert or routed nothing), the share of its tokens its
    TOP_N most-used experts take, and its dead experts (reachable, 0 tokens); the top-TOP_N sets (most tokens
    first, ties to the lower index, only experts with tokens); across layers the mean Jaccard overlap
    |A & B| / |A | B| of the top sets over every pair of layers (0 where layers own disjoint experts,
    vanilla MoE; None below 2 layers)."""
    rows = read_util_csv(text)
    out = {"reachable": [], "load_entropy": [], "top_coverage": [], "dead": [], "top": []}
    for layer in sorted(rows):
        counts = rows[layer]
        total = sum(t for _, t in counts)
        entropy = None
        if total > 0 and len(counts) > 1:
            entropy = -sum(t / total * math.log(t / total) for _, t in counts if t) / math.log(len(counts))
        top = sorted((e for e in counts if e[1] > 0), key=lambda e: (-e[1], e[0]))[:TOP_N]
        out["reachable"].append(len(counts))
        out["load_entropy"].append(entropy)
        out["top_coverage"].append(sum(t for _, t in top) / total if total else None)
        out["dead"].append(sum(t == 0 for _, t in counts))
        out["top"].append(sorted(e for e, _ in top))
    sets = [set(t) for t in out["top"]]
    overlaps = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:] if a | b]
    return dict(layers=len(sets), **out, jaccard=mean(overlaps) if overlaps else None)


def finished(s, arm, seed):
    """A run with a current summary: (its summary's path, the summary, its final checkpoint); else None."""
    path = summary_path(s, arm, seed)
    summary = read_json(path)
    return (path, summary, final_checkpoint(s, arm, seed, summary)) if matches(summary, arm, s) else None


def diagnose(s, arm, seed):
    """util on the run's final checkpoint, its diagnostics into the run's summary, unless the summary has
    them for this command; returns (status, detail)."""
    run = finished(s, arm, seed)
    if run is None:
        return "failed", "no current summary"
    path, summary, ckpt = run
    command = util_command(s, arm, seed, ckpt)
    if (summary.get("diagnostics") or {}).get("command") == shlex.join(command):
        return "skipped", ""
    if not os.path.exists(ckpt):
        return "failed", "no final checkpoint (out/ is not kept across clones): delete the run's summary to retrain"
    say(f"util {name(arm, seed)}: {shlex.join(command)}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    csv = os.path.join(run_dir(s, arm, seed), "util.csv")
    if done.returncode != 0 or not os.path.exists(csv):
        return "failed", f"exit {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    with open(os.path.join(run_dir(s, arm, seed), "util.txt"), "w") as f:
        f.write(done.stdout)
    try:
        found = diagnose_csv(open(csv).read())
    except ValueError as e:
        return "failed", f"{rel(csv)}: {e}"
    summary["diagnostics"] = dict(command=shlex.join(command), **found)
    write_json(path, summary)
    return "diagnosed", ""


# ---- routing by source on a final checkpoint ----

def sources(s):
    """The corpus's sources as {name: util's -i pattern}: the shards its sources glob finds, grouped by their
    name up to the shard number; a source's name drops a trailing _val ({} for a corpus of one source)."""
    found = {}
    if not s.source.sources:
        return found
    for path in sorted(glob.glob(os.path.join(ROOT, s.source.sources))):
        prefix = re.sub(r"_\d+\.bin$", "", os.path.basename(path))
        found[re.sub(r"_val$", "", prefix)] = rel(os.path.join(os.path.dirname(path), prefix + "_*.bin"))
    return found


def source_commands(s, arm, seed, ckpt):
    """util on a checkpoint, one command per source: every sequence of the source's shards (or the corpus's
    source_batches of them), one at a time (-b 1: a small source fills no batch of the training B), into
    the run folder's sources/NAME.csv, and each sequence's counts with its document into NAME.rows.csv."""
    folder = os.path.join(run_dir(s, arm, seed), "sources")
    return {name: ["./infer_unipool", "util", "-c", rel(ckpt), "-i", pattern, "-b", "1",
                   "-n", str(s.source.source_batches), "-T", "1", "-w", rel(os.path.join(folder, name + ".rows.csv")),
                   "-o", rel(os.path.join(folder, name))]
            for name, pattern in sources(s).items()}


def read_rows_csv(text, experts):
    """util -w's CSV (row,doc,layer,expert,tokens) as each document's counts, {doc: [[tokens of each of the
    layer's experts] for each layer]}, experts[l] the experts of layer l in the CSV's order."""
    lines = text.strip().splitlines()
    if not lines or lines[0].strip() != "row,doc,layer,expert,tokens":
        raise ValueError("util -w's CSV lacks its header 'row,doc,layer,expert,tokens'")
    where = [{e: i for i, e in enumerate(layer)} for layer in experts]
    docs = {}
    for line in lines[1:]:
        _, doc, layer, expert, tokens = (int(x) for x in line.split(","))
        counts = docs.setdefault(doc, [[0] * len(layer) for layer in experts])
        counts[layer][where[layer][expert]] += tokens
    return docs


def permutation_null(documents, permutations, seed):
    """The by-source baseline: I(S; E) of every layer when the documents' source labels are shuffled
    (each source keeps its number of documents), so that the source says nothing about the experts but
    the tokens keep their documents. documents: [(source, [[tokens of each expert] for each layer])].
    Per layer the mean, standard deviation and 95th percentile of the draws' I(S; E), in bits."""
    rng = random.Random(seed)
    labels = [source for source, _ in documents]
    draws = [[] for _ in documents[0][1]]
    for _ in range(permutations):
        rng.shuffle(labels)
        for layer, out in enumerate(draws):
            table = {}
            for label, (_, counts) in zip(labels, documents):
                row = table.get(label)
                table[label] = list(counts[layer]) if row is None else [a + b for a, b in zip(row, counts[layer])]
            out.append(source_information(table)[0])
    return [{"mean": mean(d), "sd": stats(d)["std"], "q95": sorted(d)[math.ceil(0.95 * len(d)) - 1]}
            for d in draws]


def current_by_source(s, arm, summary):
    """The summary's counts by source when util ran them on this run's final checkpoint, for every source
    of the corpus, as it runs now, on the source shards there are now; else None."""
    found = summary.get("by_source")
    commands = source_commands(s, arm, summary["seed"], final_checkpoint(s, arm, summary["seed"], summary))
    if not found or not commands or set(found["sources"]) != set(commands):
        return None
    if found.get("fingerprint") != shards_fingerprint(sources(s).values()):
        return None
    return found if all(found["sources"][k]["command"] == shlex.join(c) for k, c in commands.items()) else None


def count_by_source(s, arm, seed):
    """util on the run's final checkpoint, source by source, its counts into the run's summary (by_source:
    the source shards' fingerprint, the experts of each layer, and per source and layer the tokens of each),
    unless the summary has them for these commands and shards; returns (status, detail)."""
    run = finished(s, arm, seed)
    if run is None:
        return "failed", "no current summary"
    path, summary, ckpt = run
    commands = source_commands(s, arm, seed, ckpt)
    if not commands:
        return "failed", f"no shards match {s.source.sources} (`make {s.source.make}` builds them)"
    if current_by_source(s, arm, summary):
        return "skipped", ""
    if not os.path.exists(ckpt):
        return "failed", "no final checkpoint (out/ is not kept across clones): delete the run's summary to retrain"
    found, experts, documents = {}, None, []
    for source, command in commands.items():
        say(f"sources {name(arm, seed)}: {shlex.join(command)}")
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        csv = os.path.join(ROOT, command[-1] + ".csv")
        if done.returncode != 0 or not os.path.exists(csv):
            return "failed", f"{source}: exit {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        try:
            rows = read_util_csv(open(csv).read())
        except ValueError as e:
            return "failed", f"{rel(csv)}: {e}"
        ids = [[e for e, _ in rows[layer]] for layer in sorted(rows)]
        if experts is not None and ids != experts:
            return "failed", f"{rel(csv)}: other experts than the first source's CSV"
        experts = ids
        counts = [[t for _, t in rows[layer]] for layer in sorted(rows)]
        try:
            docs = read_rows_csv(open(os.path.join(ROOT, command[command.index("-w") + 1])).read(), experts)
        except (OSError, ValueError) as e:
            return "failed", f"{source}: {e}"
        if [[sum(col) for col in zip(*layer)] for layer in zip(*docs.values())] != counts:
            return "failed", f"{source}: its rows' counts do not add up to its counts"
        documents += [(source, docs[doc]) for doc in sorted(docs)]
        found[source] = {"command": shlex.join(command), "documents": len(docs), "counts": counts}
    null = permutation_null(documents, NULL_PERMUTATIONS, NULL_SEED)
    summary["by_source"] = {"fingerprint": shards_fingerprint(sources(s).values()), "experts": experts,
                            "sources": found, "null": {"permutations": NULL_PERMUTATIONS, "seed": NULL_SEED,
                                                       "layers": null}}
    write_json(path, summary)
    return "counted", ""


def job(s, arm, seed):
    """One run, then its diagnostics (when the experiment has them), its probe (when it is a probed one)
    and its counts by source (when its arm has them); a list of (what, status, detail)."""
    status, detail = train(s, arm, seed)
    results = [(name(arm, seed), status, detail)]
    if s.exp.diagnostics and status != "failed":
        results.append(("util " + name(arm, seed), *diagnose(s, arm, seed)))
    if arm.key in s.exp.probed and seed == s.exp.first_seed and status != "failed":
        results.append(("probe " + name(arm, seed), *probe(s, arm, seed)))
    if arm.key in s.exp.by_source and status != "failed":
        results.append(("sources " + name(arm, seed), *count_by_source(s, arm, seed)))
    for what, status, detail in results:
        say(f"{status} {what}" + (f": {detail.splitlines()[0]}" if detail else ""))
    return results


def runs_planned(s):
    """The (arm, seed) runs of the arms to run, seed-major: every arm's first seed, then the second, ..."""
    every = sorted({seed for arm in s.arms for seed in s.seeds[arm.key]})
    return [(arm, seed) for seed in every for arm in s.arms if seed in s.seeds[arm.key]]


def run_all(s):
    """Every run (seed-major, --jobs at a time); True when none failed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=s.jobs) as pool:
        results = [r for rs in pool.map(lambda w: job(s, *w), runs_planned(s)) for r in rs]
    kind = lambda what: what.split()[0] if " " in what else "run"  # noqa: E731
    count = lambda k: collections.Counter(status for what, status, _ in results if kind(what) == k)  # noqa: E731
    runs, probes, utils, by = count("run"), count("probe"), count("util"), count("sources")
    say(f"runs: trained {runs['trained']}, resumed {runs['resumed']}, skipped {runs['skipped']}, "
        f"failed {runs['failed']}; probes: written {probes['probed']}, skipped {probes['skipped']}, "
        f"failed {probes['failed']}" + (f"; diagnostics: written {utils['diagnosed']}, skipped {utils['skipped']}, "
                                         f"failed {utils['failed']}" if s.exp.diagnostics else "") +
        (f"; by source: counted {by['counted']}, skipped {by['skipped']}, failed {by['failed']}"
         if s.exp.by_source else ""))
    for what, status, detail in results:
        if status == "failed":
            say(f"FAILED {what}: {detail}")
    return runs["failed"] + probes["failed"] + utils["failed"] + by["failed"] == 0


def dry_run(s):
    if s.corpus is None:
        say(f"{s.source.name} is not built (`make {s.source.make}` builds it): no summary can be current")
    for arm, seed in runs_planned(s):
        action, command = plan(s, arm, seed)
        say(f"{action} {name(arm, seed)}" + (f": {shlex.join(command)}" if command else ""))
        ckpt = rel(os.path.join(run_dir(s, arm, seed), "ckpt_<last step>.bin"))
        if s.exp.diagnostics:
            util = util_command(s, arm, seed, os.path.join(run_dir(s, arm, seed), "ckpt_<last step>.bin"))
            say(f"util {name(arm, seed)}: {shlex.join(util[:3])} {ckpt} {shlex.join(util[4:])} "
                f"> the summary's diagnostics")
        if arm.key in s.exp.probed and seed == s.exp.first_seed:
            base = probe_base(s)
            say(f"probe {name(arm, seed)}: {shlex.join(base[:2])} -c {ckpt} {shlex.join(base[2:])} "
                f"> {rel(probe_path(s, arm, seed))}")
        if arm.key in s.exp.by_source:
            for command in source_commands(s, arm, seed, os.path.join(run_dir(s, arm, seed), "X")).values():
                say(f"sources {name(arm, seed)}: {shlex.join(command[:3])} {ckpt} {shlex.join(command[4:])} "
                    f"> the summary's by_source")
    return 0


def make(*targets):
    done = subprocess.run(["make", *targets], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"make failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def build(s):
    """The programs and the corpus (a fresh clone has neither)."""
    make("train_unipool", "infer_unipool", s.source.make)


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


def beta_inc(a, b, x):
    """The regularised incomplete beta function I_x(a, b) (its continued fraction, modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - beta_inc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h


@functools.lru_cache(maxsize=None)
def t975(df):
    """Student t's 97.5% quantile, to 3 decimals, at df rounded down: a two-sided 95% interval is
    mean +- t975(df) x se. P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2), solved for 0.05 by bisection;
    from df 10^5 on it is the normal's 1.960 to 3 decimals."""
    df = max(1, int(df))
    if df >= 100000:
        return 1.96
    lo, hi = 0.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_inc(df / 2, 0.5, df / (df + mid * mid)) > 0.05 else (lo, mid)
    return round((lo + hi) / 2, 3)


def interval(diff, se, df):
    half = t975(df) * se
    return {"diff": diff, "se": se, "df": df, "lo": diff - half, "hi": diff + half}


def combine(parts):
    """A linear combination sum(c x arm) of arms' final val losses, parts [(c, {seed: loss})], tested two
    ways, each with a 95% interval: welch, the combination of the means, its variance sum(c^2 s^2 / n)
    with Welch-Satterthwaite df; paired, the mean of the per-seed combinations over the seeds every arm
    has (a seed fixes the data order for every arm, so they share it). A test is None below 2 seeds in an
    arm (2 shared seeds for the paired one)."""
    out = {"welch": None, "paired": None}
    if all(len(values) >= 2 for _, values in parts):
        st = [stats(list(values.values())) for _, values in parts]
        var = [c * c * (s["std"] ** 2 / s["n"]) for (c, _), s in zip(parts, st)]
        total = sum(var)
        df = (total ** 2 / sum(v ** 2 / (s["n"] - 1) for v, s in zip(var, st)) if total > 0
              else sum(s["n"] - 1 for s in st))
        out["welch"] = interval(sum(c * s["mean"] for (c, _), s in zip(parts, st)), math.sqrt(total), df)
    common = sorted(set.intersection(*(set(values) for _, values in parts)))
    if len(common) >= 2:
        diffs = [sum(c * values[seed] for c, values in parts) for seed in common]
        d = stats(diffs)
        out["paired"] = dict(interval(d["mean"], d["std"] / math.sqrt(d["n"]), d["n"] - 1), seeds=common, diffs=diffs)
    tests = [t for t in out.values() if t]
    beyond = sum(t["lo"] > 0 or t["hi"] < 0 for t in tests)
    out["verdict"] = (None if not tests else "beyond seed noise" if beyond == len(tests) else
                      "within seed noise" if beyond == 0 else "beyond seed noise in one test only")
    return out


def versus(a, b):
    """Arm a's final val losses {seed: loss} against arm b's: the combination a - b."""
    return combine([(1, a), (-1, b)])


def resolved(paired):
    """A claim is resolved when its paired 95% interval excludes 0 or is at most RESOLVED_WIDTH wide."""
    return paired is not None and (paired["lo"] > 0 or paired["hi"] < 0 or
                                   paired["hi"] - paired["lo"] <= RESOLVED_WIDTH)


def seeds_needed(paired, most=10 ** 9):
    """The seeds an unresolved claim needs, at the paired per-seed sd and mean observed so far: the
    smallest n with t975(n - 1) x sd / sqrt(n) below |mean| (the interval would exclude 0) or below
    RESOLVED_WIDTH / 2 (it would be at most RESOLVED_WIDTH wide), whichever is the smaller n; None when
    there is no paired test, or beyond `most`."""
    if paired is None:
        return None
    sd = stats(paired["diffs"])["std"]
    target = max(abs(paired["diff"]), RESOLVED_WIDTH / 2)
    enough = lambda n: t975(n - 1) * sd / math.sqrt(n) < target  # noqa: E731 (t975 and 1/sqrt(n) fall with n)
    lo, hi = 1, 2  # enough(lo) is false (n = 1 has no interval); find hi with enough(hi), then bisect
    while not enough(hi):
        if hi > most:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


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
    by_key = {arm.key: arm for arm in s.exp.arms}
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
    for arm in (a for a in s.exp.arms if a.key in s.exp.probed):
        path = probe_path(s, arm, s.exp.first_seed)
        text = open(path).read() if os.path.exists(path) else ""
        if text.startswith(probe_header(s, arm) + "\n"):
            found.append(dict(arm=arm.key, seed=s.exp.first_seed, file=os.path.basename(path), **parse_probe(text)))
    return found


def current_diagnostics(s, arm, summary):
    """The summary's diagnostics when util ran on this run's final checkpoint as it runs now, else None."""
    found = summary.get("diagnostics")
    command = shlex.join(util_command(s, arm, summary["seed"], final_checkpoint(s, arm, summary["seed"], summary)))
    return found if found and found.get("command") == command else None


def arm_diagnostics(s, arm, ours):
    """The diagnostics of an arm's runs, the mean over the seeds that have them (None if none has)."""
    have = [(r["seed"], current_diagnostics(s, arm, r)) for r in ours]
    have = [(seed, d) for seed, d in have if d]
    if not have:
        return None
    found = [d for _, d in have]
    avg = lambda values: None if any(v is None for v in values) else mean(values)  # noqa: E731
    per_layer = lambda key: [avg(col) for col in zip(*(d[key] for d in found))]  # noqa: E731
    return {"seeds": [seed for seed, _ in have], "reachable": found[0]["reachable"],
            "load_entropy": per_layer("load_entropy"), "top_coverage": per_layer("top_coverage"),
            "dead": per_layer("dead"), "jaccard": avg([d["jaccard"] for d in found])}


def source_information(layer):
    """One layer's counts by source, {source: [tokens of each expert]}: (I(S; E), H(S)) in bits, the
    information the expert a token goes to carries about its source and the source's entropy, as the
    counts n(s, e) estimate them (N the total, n_s and n_e the margins):
      I(S; E) = sum over s, e of n/N log2(n N / (n_s n_e)),   H(S) = -sum over s of n_s/N log2(n_s / N)."""
    rows = list(layer.values())
    total = sum(map(sum, rows))
    n_s = [sum(r) for r in rows]
    n_e = [sum(column) for column in zip(*rows)]
    information = sum(n / total * math.log2(n * total / (n_s[i] * n_e[j]))
                      for i, r in enumerate(rows) for j, n in enumerate(r) if n)
    entropy = -sum(n / total * math.log2(n / total) for n in n_s if n)
    return information, entropy


def by_source_seed(found):
    """One run's routing by source from its current counts: per layer I(S; E), H(S), the plug-in
    estimate's bias were the tokens independent, about (sources - 1)(experts - 1) / (2 N ln 2) bits, and
    the baseline of the sources shuffled over documents (permutation_null); the excess, I(S; E) less the
    baseline's mean over H(S), averaged over layers; the layers above the baseline's 95th percentile."""
    counts, layers_ = found["sources"], []
    for layer, experts in enumerate(found["experts"]):
        information, entropy = source_information({k: v["counts"][layer] for k, v in counts.items()})
        total = sum(sum(v["counts"][layer]) for v in counts.values())
        layers_.append({"information": information, "entropy": entropy,
                        "bias": (len(counts) - 1) * (len(experts) - 1) / (2 * total * math.log(2)),
                        "null": found["null"]["layers"][layer]})
    entropy = layers_[0]["entropy"]
    excess = (mean([(x["information"] - x["null"]["mean"]) / entropy for x in layers_]) if entropy > 0
              else None)
    return {"layers": layers_, "excess": excess, "above": sum(x["information"] > x["null"]["q95"] for x in layers_)}


def by_source_result(s, arm, runs):
    """An arm's routing by source over its runs with current counts: the tokens and documents of each
    source (its first such run's), and by_source_seed of each run ({seed: ...}); None without any."""
    have = [(r, current_by_source(s, arm, r)) for r in sorted(runs.get(arm.key, []), key=lambda r: r["seed"])]
    have = [(r, found) for r, found in have if found]
    if not have:
        return None
    counts, found = have[0][1]["sources"], have[0][1]
    return {"arm": arm.key, "seeds": {r["seed"]: by_source_seed(f) for r, f in have},
            "tokens": {k: sum(v["counts"][0]) for k, v in counts.items()},
            "documents": {k: v["documents"] for k, v in counts.items()},
            "permutations": found["null"]["permutations"]}


def course(s, runs, claim, text):
    """A claim's paired combination at every validation step the runs share: per step the mean over the
    seeds every arm of the claim has, and its 95% interval (Student t at n - 1; None below 2 seeds)."""
    terms = parse_combination(text)
    curves = {key: {r["seed"]: dict(map(tuple, r["val_curve"])) for r in runs.get(key, [])} for key, _ in terms}
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in curves.values())))
    steps = sorted(set.intersection(*(set(curves[key][seed]) for key, _ in terms for seed in seeds))) if seeds else []
    rows = []
    for step in steps:
        d = stats([sum(c * curves[key][seed][step] for key, c in terms) for seed in seeds])
        row = {"step": step, "n": d["n"], "mean": d["mean"], "lo": None, "hi": None}
        if d["n"] >= 2:
            row.update({k: v for k, v in interval(d["mean"], d["std"] / math.sqrt(d["n"]), d["n"] - 1).items()
                        if k in ("lo", "hi")})
        rows.append(row)
    return {"claim": claim, "combination": text, "seeds": seeds, "steps": rows}


def claim_result(s, claim, text, by_key):
    terms = parse_combination(text)
    ab = pair(terms)
    head = {"a": ab[0], "b": ab[1]} if ab else {"combination": text, "terms": [[key, c] for key, c in terms]}
    papers = [by_key[key]["paper"] for key, _ in terms]
    paper = None if None in papers else sum(c * p for (_, c), p in zip(terms, papers))
    out = dict(claim=claim, **head, paper=paper, **combine([(c, by_key[key]["seeds"]) for key, c in terms]))
    if s.exp.resolve:
        out["resolved"] = resolved(out["paired"])
        out["seeds_needed"] = None if out["resolved"] else seeds_needed(out["paired"])
    return out


def results(s):
    runs, stale = collect(s)
    arms = []
    for arm in s.exp.arms:
        ours = runs.get(arm.key, [])
        entry = dict(arm._asdict(), flags=arm_flags(s, arm), runs=len(ours),
                     seeds={r["seed"]: r["final_val_loss"] for r in sorted(ours, key=lambda r: r["seed"])})
        if ours:
            entry.update(stats=stats(list(entry["seeds"].values())), health=arm_health(ours),
                         pool_size=ours[0].get("pool_size"), wall_seconds=mean([r["wall_seconds"] for r in ours]))
            if s.exp.diagnostics:
                entry["diagnostics"] = arm_diagnostics(s, arm, ours)
        arms.append(entry)
    by_key = {entry["key"]: entry for entry in arms}
    claims = [claim_result(s, claim, text, by_key) for claim, text in s.exp.claims]
    missing = [f"{arm.key}_s{seed}" for arm in s.exp.arms for seed in s.seeds[arm.key]
               if seed not in {r["seed"] for r in runs.get(arm.key, [])}]
    commits = sorted({r["git_commit"] for rs in runs.values() for r in rs})
    data = {"data": s.data} if s.data else {}
    res = dict(command=s.command, recipe=s.recipe, **data, corpus=s.corpus, layers=layers(s.recipe), seeds=s.seeds,
               commits=commits, arms=arms, claims=claims, missing=missing, stale=stale, probes=probes(s))
    if s.exp.course:
        res["course"] = [dict(course(s, runs, claim, text), central=text in s.exp.course)
                         for claim, text in s.exp.claims]
    if s.exp.by_source:
        res["by_source"] = [by_source_result(s, arm, runs) or {"arm": arm.key, "missing": True}
                            for arm in s.exp.arms if arm.key in s.exp.by_source]
        excess = {b["arm"]: {seed: x["excess"] for seed, x in b.get("seeds", {}).items() if x["excess"] is not None}
                  for b in res["by_source"]}
        res["by_source_pairs"] = [dict(a=a.key, b=b.key, **versus(excess[a.key], excess[b.key]))
                                  for a in s.exp.arms if a.key in s.exp.by_source and a.flags.startswith("-o pool")
                                  for b in s.exp.arms if b.key in s.exp.by_source and b.flags.startswith("-o layer")]
    if s.exp.diagnostics:
        res["missing_diagnostics"] = [f"{arm.key}_s{r['seed']}" for arm in s.exp.arms
                                      for r in sorted(runs.get(arm.key, []), key=lambda r: r["seed"])
                                      if not current_diagnostics(s, arm, r)]
    return res, runs


def fmt(value, digits=4, sign=""):
    return "-" if value is None else f"{value:{sign}.{digits}f}"


def md_losses(res, exp):
    rows = ["| arm | what | flags | paper (182M) | ours: mean | sample std | min-max | n | per seed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in res["arms"]:
        st = a.get("stats")
        paper = exp.paper_none.get(a["key"], "not given") if a["paper"] is None else fmt(a["paper"])
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


def md_diagnostics(res, s):
    util = util_command(s, s.exp.arms[0], s.exp.first_seed, "CKPT")
    rows = [f"Counted on each run's final checkpoint by `{shlex.join(util[:3])} CKPT {shlex.join(util[4:-1])} "
            "RUN_FOLDER/util` "
            f"(which expert each of the K slots of every token of {UTIL_BATCHES} val batches goes to, per layer). Per "
            "layer: the load entropy over the experts the layer can reach, divided by the log of their number (1: "
            f"even load); the coverage of its {TOP_N} most-used experts (their share of the layer's tokens); its dead "
            f"experts (reachable, 0 tokens). Across layers: the mean Jaccard overlap |A & B| / |A | B| of the layers' "
            f"top-{TOP_N} sets over every pair of layers. In vanilla MoE every layer owns its own experts, so the "
            "overlap is 0 by construction (and with 8 experts a layer's top 16 are all it has used). Each figure is "
            "the mean over the seeds that have it; per-layer lists run from layer 0.", "",
            f"| arm | seeds | experts a layer reaches | load entropy: mean over layers (per layer) | "
            f"top-{TOP_N} coverage: mean (per layer) | dead experts: mean over layers (per layer) | "
            f"top-{TOP_N} Jaccard across layers |",
            "|---|---|---|---|---|---|---|"]
    number = lambda v, f: "-" if v is None else f(v)  # noqa: E731
    listed = lambda values, f: (f"{number(None if None in values else mean(values), f)} "  # noqa: E731
                                f"({'/'.join(number(v, f) for v in values)})")
    for a in res["arms"]:
        d = a.get("diagnostics")
        if d is None:
            rows.append(f"| {a['key']} | missing | | | | | |")
            continue
        reach = "/".join(str(r) for r in sorted(set(d["reachable"])))
        jaccard = number(d["jaccard"], "{:.3f}".format) + (
            " (by construction)" if a["flags"].split()[:2] == ["-o", "layer"] else "")
        rows.append(f"| {a['key']} | {', '.join(map(str, d['seeds']))} | {reach} | "
                    f"{listed(d['load_entropy'], '{:.3f}'.format)} | {listed(d['top_coverage'], '{:.1%}'.format)} | "
                    f"{listed(d['dead'], lambda v: f'{round(v, 1):g}')} | {jaccard} |")
    return rows


def md_by_source(res, s):
    found = [b for b in res["by_source"] if not b.get("missing")]
    tokens, docs = (found[0]["tokens"], found[0]["documents"]) if found else ({}, {})
    total = sum(tokens.values())
    mix = ", ".join(f"{k} {n / total:.1%} ({docs[k]})" for k, n in sorted(tokens.items(), key=lambda kv: -kv[1]))
    draws = found[0]["permutations"] if found else NULL_PERMUTATIONS
    rows = [f"Does the expert a token goes to depend on where the token comes from? On each run's final "
            f"checkpoint, util counts each source's val shards apart (`{s.source.sources}`, every whole sequence "
            "of each, one at a time, so a sequence holds one source's text only) and so gives, per layer, the "
            "tokens n(s, e) of each source s that go to each expert e. From them, I(S; E) = sum n/N log2(n N / "
            "(n_s n_e)): the bits the expert choice carries about the source, shown as a share of the source's "
            "entropy H(S) (0: the choice is the same for every source; 1: it names the source). The estimate is "
            "biased up, the more the more experts a layer has, and more than independent tokens would make it "
            "(about (sources - 1)(experts - 1) / (2 N ln 2) bits), because tokens come in documents whose tokens "
            "can route alike. So the baseline: the same I(S; E) with the documents' source labels shuffled "
            f"({draws} draws, each source keeping its number of documents; a sequence belongs to the document of "
            "its first token), what the routing would show if it did not depend on the source at all. Excess: "
            "I(S; E) minus the baseline's mean, as a share of H(S). Per layer figures are means over the seeds." +
            (f" The sources' shares of the {total:,} tokens (and the documents their sequences start in): {mix}."
             if found else ""), "",
            "| arm | seeds | H(S) bits | I(S; E) / H(S): mean over layers (per layer) | baseline, shuffled over "
            "documents: mean (per layer) | excess: mean (per layer) | excess per seed | layers above the "
            "baseline's 95th percentile, per seed |", "|---|---|---|---|---|---|---|---|"]
    per_layer = lambda values: f"{mean(values):.3f} ({'/'.join(f'{v:.3f}' for v in values)})"  # noqa: E731
    for b in res["by_source"]:
        runs = [x for x in b.get("seeds", {}).values() if x["excess"] is not None]
        if not runs:
            rows.append(f"| {b['arm']} | missing | | | | | | |")
            continue
        H = runs[0]["layers"][0]["entropy"]
        column = lambda f: [mean([f(x) / H for x in layer]) for layer in zip(*(r["layers"] for r in runs))]  # noqa
        shares, base = column(lambda x: x["information"]), column(lambda x: x["null"]["mean"])
        seeds = [seed for seed, x in b["seeds"].items() if x["excess"] is not None]
        each = ", ".join(f"s{seed}: {r['excess']:+.3f}" for seed, r in zip(seeds, runs))
        above = ", ".join(f"{r['above']} of {len(r['layers'])}" for r in runs)
        rows.append(f"| {b['arm']} | {', '.join(map(str, seeds))} | {H:.3f} | {per_layer(shares)} | "
                    f"{per_layer(base)} | {per_layer([a - n for a, n in zip(shares, base)])} | {each} | {above} |")
    rows += ["", "Each shared pool against each vanilla router: the excess of one minus the other's, per seed; "
             "paired, the mean of the per-seed differences over the seeds both have; Welch's, the difference of "
             "the arms' means over all their seeds; each with its 95% interval.", "",
             "| a - b | per seed | paired: mean [95% interval] | Welch: difference of the means [95% interval] | "
             "verdict |", "|---|---|---|---|---|"]
    return rows + [md_source_pair(p) for p in res["by_source_pairs"]]


def md_source_pair(p):
    """A row of the by-source pairs: each test's own centre beside its interval (the paired mean covers the
    seeds both arms have, Welch's difference of the means all of each arm's)."""
    welch, paired = p["welch"], p["paired"]
    return (f"| {p['a']} - {p['b']} | {per_seed(paired)} | {centred(paired, 3)} | {centred(welch, 3)} | "
            f"{p['verdict'] or 'needs 2+ seeds in both arms'} |")


def md_claims(res):
    rows = ["Each claim is tested as a's final val loss minus b's, two ways, with 95% intervals: Welch's (the "
            "difference of the means) and paired (the mean of the per-seed differences: a seed fixes the data order "
            "for every arm). Student t is taken at the degrees of freedom rounded down. A difference is beyond the "
            "seed noise when both intervals exclude 0.", "",
            "| the paper finds | a - b | paper: a - b | ours: a - b | Welch 95% interval | per seed | "
            "paired 95% interval | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in res["claims"]:
        welch, paired = c["welch"], c["paired"]
        rows.append(f"| {c['claim']} | {c['a']} - {c['b']} | {fmt(c['paper'], sign='+')} | "
                    f"{fmt(welch and welch['diff'], sign='+')} | {span(welch)} | {per_seed(paired)} | "
                    f"{span(paired)} | {c['verdict'] or 'not comparable: needs 2+ seeds in both arms'} |")
    return rows


def span(test):
    return "-" if test is None else f"[{test['lo']:+.4f}, {test['hi']:+.4f}] (df {test['df']:.1f})"


def centred(test, digits=4):
    """A test's centre (the paired mean, or Welch's combination of the means) and its interval."""
    return f"{fmt(test and test['diff'], digits, '+')} {span(test)}"


def per_seed(paired):
    return ", ".join(f"s{seed}: {d:+.4f}" for seed, d in zip(paired["seeds"], paired["diffs"])) if paired else "-"


def combination(c):
    return f"{c['a']} - {c['b']}" if "a" in c else c["combination"]


def md_claims_resolved(res):
    rows = ["Each claim is a linear combination of the arms' final val losses: a - b, and for depth "
            "(a - b) - (c - d), the gap at L 8 minus the gap at L 4 (negative: the gain grows with depth). Each is "
            "tested two ways, with 95% intervals: Welch's (the same combination of the arms' means; its variance the "
            "sum over arms of the coefficient squared times the variance of the arm's mean, Welch-Satterthwaite "
            "degrees of freedom) and paired (the mean over the seeds every arm of the claim has of the per-seed "
            "combination: a seed fixes the data order for every arm). Student t is taken at the degrees of freedom "
            "rounded down. A difference is beyond the seed noise when both intervals exclude 0.", "",
            f"A claim is RESOLVED when its paired interval excludes 0 or is at most {RESOLVED_WIDTH:g} wide. For an "
            "unresolved one, the seeds needed: the smallest n with t(0.975, n - 1) x sd / sqrt(n) below |mean| (the "
            f"interval would exclude 0) or below {RESOLVED_WIDTH / 2:g} (it would be at most {RESOLVED_WIDTH:g} wide), "
            "at the sd and mean of the per-seed combinations so far (- without a paired test).", "",
            "| the paper finds | combination | paper | ours: the means combined | Welch 95% interval | per seed | "
            "paired: mean [95% interval] | verdict | resolved | seeds needed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["claims"]:
        welch, paired = c["welch"], c["paired"]
        needed = "" if c["resolved"] else "-" if c["seeds_needed"] is None else str(c["seeds_needed"])
        rows.append(f"| {c['claim']} | {combination(c)} | {fmt(c['paper'], sign='+')} | "
                    f"{fmt(welch and welch['diff'], sign='+')} | {span(welch)} | {per_seed(paired)} | "
                    f"{centred(paired)} | {c['verdict'] or 'not comparable: needs 2+ seeds in every arm'} | "
                    f"{'RESOLVED' if c['resolved'] else 'no'} | {needed} |")
    done = sum(bool(c["resolved"]) for c in res["claims"])
    return rows + ["", f"Resolved: {done} of {len(res['claims'])} claims."]


def md_course(res, central):
    rows = ["The central gaps at every validation step: the mean over seeds of the per-seed difference, and its "
            "paired 95% interval (Student t at n - 1 df, n the seeds both arms have; - below 2 seeds). The last row "
            "is the final val loss's paired test above.", ""]
    by_text = {c["combination"]: c for c in res["course"]}
    courses = [by_text[text] for text in central]
    heads = [f"{c['combination']} ({c['claim']}): mean | 95% interval" for c in courses]
    rows += ["| step | " + " | ".join(heads) + " |", "|---|" + "---|---|" * len(courses)]
    by_step = [{r["step"]: r for r in c["steps"]} for c in courses]
    for step in sorted(set().union(*by_step)):
        cells = []
        for rows_of in by_step:
            r = rows_of.get(step)
            span_n = "-" if r is None or r["lo"] is None else f"[{r['lo']:+.4f}, {r['hi']:+.4f}] (n {r['n']})"
            cells += ["-" if r is None else f"{r['mean']:+.4f}", span_n]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return rows


def md_course_others(res):
    others = [c for c in res["course"] if not c["central"]]
    steps = sorted(set().union(*({r["step"] for r in c["steps"]} for c in others)))
    rows = ["Every other claim the same way, a row each: at every validation step the mean over seeds of the "
            "per-seed combination, and its paired 95% interval (none below 2 seeds; - where no seed has every "
            "arm of the claim). The last column is the final val loss's paired test in the claims table.", "",
            "| combination | the paper finds | seeds | " + " | ".join(f"step {step}" for step in steps) + " |",
            "|---|---|---|" + "---|" * len(steps)]
    for c in others:
        by_step = {r["step"]: r for r in c["steps"]}
        cells = []
        for step in steps:
            r = by_step.get(step)
            cells.append("-" if r is None else f"{r['mean']:+.4f}" + (
                "" if r["lo"] is None else f" [{r['lo']:+.4f}, {r['hi']:+.4f}]"))
        rows.append(f"| {c['combination']} | {c['claim']} | {len(c['seeds'])} | " + " | ".join(cells) + " |")
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


def md_probe(res, s):
    rows = ["Each layer of the deep half in turn gets uniformly random experts instead of its router's choice "
            "(from its whole pool, then from its 8 most-used experts); the loss change, mean over the deep layers "
            f"(`{shlex.join(probe_base(s))}` on the final checkpoint; files in runs/).", "",
            "| arm | seed | baseline loss | probe | mean loss change |", "|---|---|---|---|---|"]
    for p in res["probes"]:
        rows += [f"| {p['arm']} | {p['seed']} | {p['baseline']:.4f} | {kind} | {change:+.5f} |"
                 for kind, change in p["mean_change"].items()]
    missing = ", ".join(f"{key}_s{s.exp.first_seed}" for key in s.exp.probed
                        if key not in {p["arm"] for p in res["probes"]})
    return rows + (["", f"Missing probes: {missing}."] if missing else [])


def seeds_text(seeds):
    """The report's line on the seeds, {arm key: seeds}: one list when every arm has it, else a list for
    each group of arms that share one, and last the list most arms have, for the other arms."""
    groups = collections.defaultdict(list)
    for key, arm_seeds in seeds.items():
        groups[tuple(arm_seeds)].append(key)
    common = max(groups, key=lambda g: len(groups[g]))
    listed = lambda g: ", ".join(map(str, g))  # noqa: E731
    if len(groups) == 1:
        return f"Seeds {listed(common)}."
    rest = [f"{listed(g)} for {', '.join(keys)}" for g, keys in groups.items() if g != common]
    return f"Seeds {'; '.join(rest)}; {listed(common)} for the other arms."


def markdown(res, s):
    exp = s.exp
    data = f" on the data flags `{res['data']}`" if res.get("data") else ""
    own_layers = ", or the arm's -L" if any("-L" in arm.flags.split() for arm in exp.arms) else ""
    lines = [f"# {exp.title}", "",
             f"Reproduce: `{res['command']}` (trains what has no summary, then writes this report; "
             "`--report` rewrites the report alone).", "",
             f"Recipe for every arm: `{res['recipe']}`{data} plus the arm's flags and `-s SEED -T 1` "
             f"(L = {res['layers']}{own_layers}). "
             f"{seeds_text(res['seeds'])} Built from commit(s) {', '.join(res['commits']) or '-'}. "
             f"Corpus: {s.source.name} (`make {s.source.make}`), fingerprint {res['corpus']}.",
             "", "## Final val loss", "", *md_losses(res, exp),
             "", "## Routing health at the last validation (mean over seeds)", "", *md_health(res)]
    if exp.diagnostics:
        lines += ["", "## Routing diagnostics on the final checkpoint (mean over seeds)", "", *md_diagnostics(res, s)]
    if exp.by_source:
        lines += ["", "## Routing by source", "", *md_by_source(res, s)]
    lines += ["", f"## {exp.claims_title}", "", *(md_claims_resolved(res) if exp.resolve else md_claims(res))]
    if exp.course:
        lines += ["", "## The central gaps over training", "", *md_course(res, exp.course)]
        if len(exp.course) < len(exp.claims):
            lines += ["", "## The other claims over training", "", *md_course_others(res)]
    lines += ["", "## Ordering, lowest val loss first", "", *md_order(res),
              "", "## Routing-randomisation probe", "", *md_probe(res, s),
              "", "## Missing and stale", "",
              "Missing runs: " + (", ".join(res["missing"]) or "none") + "."]
    if exp.diagnostics:
        lines.append("Runs without diagnostics: " + (", ".join(res["missing_diagnostics"]) or "none") + ".")
    lines += ["Stale summaries (another recipe, flags or corpus, left out): " + (", ".join(res["stale"]) or "none")
              + ".", "", "Val curves: val_curves.svg."]
    return "\n".join(lines) + "\n"


# ---- the SVG ----

W, LEFT, RIGHT, GAP, TOP, PLOT_H = 900, 64, 16, 58, 76, 280
PANEL_W = (W - LEFT - RIGHT - GAP) // 2
SHOW_FROM = 0.2  # the x axis starts at this fraction of the last step: the first steps' drop hides the rest
COLORS = {"vanilla_softmax": "#1f77b4", "vanilla_norm": "#17becf", "vanilla_sigmoid": "#2ca02c",
          "pool_softmax_layeraux": "#9467bd", "pool_softmax_poolaux": "#ff7f0e", "unipool": "#d62728",
          "unipool_reduced": "#e377c2", "unipool_r67": "#e377c2", "unipool_r42": "#8c564b",
          "vanilla_softmax_L4": "#7f7f7f", "unipool_L4": "#bcbd22"}


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


def panels(runs, exp):
    """(title, [(arm, seed curves, mean curve)], reference) for the vanilla and the shared-pool arms; the
    reference, drawn dashed, is the baseline's mean in the shared-pool panel."""
    out = []
    for title, owner in (("vanilla MoE: each layer owns its experts", "-o layer"),
                         ("one shared pool (UniPool highlighted)", "-o pool")):
        arms = [a for a in exp.arms if a.flags.startswith(owner)]
        lines = [(a, [r["val_curve"] for r in runs.get(a.key, [])], mean_curve(runs.get(a.key, []))) for a in arms]
        out.append((title, lines, mean_curve(runs.get(exp.baseline, [])) if owner == "-o pool" else []))
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


def panel(x0, shown, xr, yr, exp):
    title, lines, reference = shown
    parts = axes(x0, xr, yr, title)
    for row, (arm, seeds, avg) in enumerate(lines):
        color, width = COLORS.get(arm.key, "#000000"), 3 if arm.key == exp.highlight else 1.8
        parts += [polyline(c, x0, xr, yr, f'class="seed" stroke="{color}" stroke-width="0.8" stroke-opacity="0.35"')
                  for c in seeds]
        style = f'stroke="{color}" stroke-width="{width}"'
        if avg:
            parts.append(polyline(avg, x0, xr, yr, f'class="mean" data-arm="{arm.key}" {style}'))
        parts += legend(x0, row, style, f"{arm.key}: " + (f"{avg[-1][1]:.4f} (n = {len(seeds)})" if avg else "no runs"))
    if reference:
        style = 'stroke="#777" stroke-width="1.5" stroke-dasharray="5,4"'
        parts += [polyline(reference, x0, xr, yr, f'class="reference" {style}'),
                  *legend(x0, len(lines), style, f"{exp.baseline}, for reference")]
    return parts


def svg(runs, recipe, exp):
    shown = panels(runs, exp)
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
        body += panel(LEFT + i * (PANEL_W + GAP), one, xr, yr, exp)
    return "\n".join(body + ["</svg>"]) + "\n"


def report(s):
    res, runs = results(s)
    os.makedirs(s.report, exist_ok=True)
    write_json(os.path.join(s.report, "results.json"), res)
    with open(os.path.join(s.report, "results.md"), "w") as f:
        f.write(markdown(res, s))
    with open(os.path.join(s.report, "val_curves.svg"), "w") as f:
        f.write(svg(runs, s.recipe, s.exp))
    say(f"report: {rel(os.path.join(s.report, 'results.md'))}, results.json, val_curves.svg "
        f"(missing runs: {len(res['missing'])})")


def commit_hint(s):
    paths = " ".join(rel(p) for p in (s.runs, *(os.path.join(s.report, f) for f in
                                                ("results.md", "results.json", "val_curves.svg"))))
    say(f"to commit: git add {paths} && git commit -m 'ablation: runs and report' -- {paths}")


# ---- the command line ----

def problems(exp):
    """What is wrong with an experiment's record: a claim that names arms it lacks or does not parse, a
    course that is none of its claims, a probed arm it lacks, a plan for an arm it lacks."""
    keys, out = {arm.key for arm in exp.arms}, []
    for claim, text in exp.claims:
        try:
            unknown = sorted({key for key, _ in parse_combination(text)} - keys)
        except ValueError as e:
            out.append(f"claim '{claim}': {e}")
            continue
        if unknown:
            out.append(f"claim '{claim}' names arms it lacks: {', '.join(unknown)}")
    out += [f"course '{text}' is none of its claims" for text in exp.course if text not in {t for _, t in exp.claims}]
    out += [f"probed arm {key} is none of its arms" for key in exp.probed if key not in keys]
    out += [f"arm {key} counted by source is none of its arms" for key in exp.by_source if key not in keys]
    out += [f"arm {key} with seeds of its own is none of its arms" for key in exp.more_seeds if key not in keys]
    out += ["arms counted by source, but the corpus has one source"] if exp.by_source and not exp.corpus.sources else []
    return out


def planned(exp, n=None):
    """{arm key: its seeds}: the first n seeds for every arm, or the experiment's plan when n is None."""
    count = lambda arm: n if n is not None else exp.more_seeds.get(arm.key, exp.seeds)  # noqa: E731
    return {arm.key: [exp.first_seed + i for i in range(count(arm))] for arm in exp.arms}


def setup(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=DEFAULT, choices=list(EXPERIMENTS),
                   help=f"the experiment (default {DEFAULT})")
    p.add_argument("--seeds", type=int,
                   help="every arm the experiment's first N seeds: " + "; ".join(
                       f"{e.name}: {e.first_seed}, {e.first_seed + 1}, ..." for e in EXPERIMENTS.values()) +
                   " (default: the experiment's plan; " + "; ".join(
                       f"{e.name}: {e.seeds}" + "".join(f", {key} {n}" for key, n in e.more_seeds.items())
                       for e in EXPERIMENTS.values()) + ")")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--only", help="comma-separated arm keys of the experiment: " + "; ".join(
        f"{e.name}: {', '.join(arm.key for arm in e.arms)}" for e in EXPERIMENTS.values()))
    p.add_argument("--report", action="store_true", help="only write the report from the summaries that exist")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--smoke", metavar="DIR",
                   help="every arm for the first seed with a micro model on data/sotu; all output in DIR")
    a = p.parse_args(argv)
    exp = EXPERIMENTS[a.experiment]
    wrong = problems(exp)
    if wrong:
        p.error(f"experiment {exp.name}: " + "; ".join(wrong))
    arms = [arm for arm in exp.arms if not a.only or arm.key in a.only.split(",")]
    unknown = set(a.only.split(",")) - {arm.key for arm in exp.arms} if a.only else set()
    if unknown or not arms or (a.seeds is not None and a.seeds < 1) or a.jobs < 1:
        p.error(f"unknown arm(s) of {exp.name}: {', '.join(sorted(unknown))}" if unknown else "nothing to run")
    command = "python3 dev/ablation/run.py" + ("" if exp.name == DEFAULT else f" --experiment {exp.name}")
    if a.smoke:
        smoke = os.path.abspath(a.smoke)
        return a, Setup(exp, SMOKE_RECIPE, SMOKE_CORPUS.flags, SMOKE_CORPUS, os.path.join(smoke, "runs"),
                        os.path.join(smoke, "out"), smoke, planned(exp, 1), a.jobs, arms,
                        f"{command} --smoke {smoke}", None)
    return a, Setup(exp, exp.recipe, exp.corpus.flags, exp.corpus, exp.runs, exp.out, exp.report,
                    planned(exp, a.seeds), a.jobs, arms,
                    command + ("" if a.seeds is None else f" --seeds {a.seeds}"), None)


def main(argv):
    a, s = setup(argv)
    if a.dry_run:
        return dry_run(s._replace(corpus=fingerprint(s.source)))
    if not a.report:
        build(s)  # the corpus first: its fingerprint tells current summaries from stale ones
    elif fingerprint(s.source) is None:
        make(s.source.make)  # the report needs the corpus's fingerprint, not the programs
    s = s._replace(corpus=fingerprint(s.source))
    if s.corpus is None:
        sys.exit(f"make {s.source.make} left no shards matching {s.source.shards}")
    ok = True
    if not a.report:
        ok = run_all(s)
    report(s)
    if not a.smoke:
        commit_hint(s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
