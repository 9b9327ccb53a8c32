#!/usr/bin/env python3
"""Tests of dev/ablation/run.py. The seed statistics (Welch and paired 95% intervals, the verdict) against
hand-worked figures; then its --smoke micro model in a temporary folder (about 20 s on 2 cores): every arm
gets a summary with a finite val loss and per-layer health; the report lists every arm and the probe; the
SVG parses and has one mean line per arm; a second invocation trains nothing; a deleted summary re-runs only
its arm; a run stopped after its first checkpoint resumes with -r latest and ends with the val loss of the
uninterrupted run; a run that fails is reported and the command exits 1.

    python3 dev/ablation/test_ablation.py        (from anywhere; it builds nothing that run.py does not)

Standard library only.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "run.py")
spec = importlib.util.spec_from_file_location("ablation", RUN)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)
KEYS = [arm[0] for arm in ablation.ARMS]
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok or not detail else "\n" + detail), flush=True)
    if not ok:
        failures.append(name)


def smoke(folder):
    """run.py --smoke folder, from the folder (not the repository root); (completed process, seconds)."""
    start = time.time()
    done = subprocess.run([sys.executable, RUN, "--smoke", folder], cwd=folder, capture_output=True, text=True)
    return done, time.time() - start


def output(done):
    return done.stdout[-3000:] + done.stderr[-3000:]


def summary(folder, key):
    path = os.path.join(folder, "runs", f"{key}_s1.json")
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
                  section(md, "Routing-randomisation probe"), re.M) for key in ablation.PROBED), md)
    claims = section(md, "The paper's claims, pair by pair")
    check("results.md tests every claim, one seed each: not comparable", all(
        re.search(rf"^\| {re.escape(claim)} \| {a} - {b} \| .* \| not comparable: needs 2\+ seeds in both arms \|$",
                  claims, re.M) for claim, a, b in ablation.CLAIMS), claims)
    check("the paper's UniPool - vanilla difference is 1.9029 - 1.9317 = -0.0288",
          "| unipool - vanilla_softmax | -0.0288 |" in claims, claims)
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


def near(x, y):
    return abs(x - y) < 5e-4


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
    check("versus: t quantiles at df rounded down (a wider interval), df 10's beyond 10",
          [ablation.t975(df) for df in (0.99, 1.7, 3.9, 25)] == [12.706, 12.706, 3.182, 2.228])
    # Seeds 1 and 3 in common only: a paired test over them, a Welch test over everything.
    part = ablation.versus({1: 6.0, 3: 6.1}, {1: 5.9, 2: 6.0, 3: 6.2})
    check("versus: the paired test uses the shared seeds only", part["paired"]["seeds"] == [1, 3] and
          part["paired"]["df"] == 1 and part["welch"] is not None, str(part))
    check("versus: one seed in an arm compares nothing", ablation.versus({1: 6.0}, {1: 5.9, 2: 6.0}) ==
          {"welch": None, "paired": None, "verdict": None})


def main():
    start = time.time()
    test_versus()
    with tempfile.TemporaryDirectory() as folder:
        test_first(folder)
        test_report(folder)
        test_skip(folder)
        test_rerun(folder)
        test_resume(folder)
        test_failure(folder)
    print(f"{len(failures)} failed ({time.time() - start:.0f} s)" if failures else
          f"all passed ({time.time() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
