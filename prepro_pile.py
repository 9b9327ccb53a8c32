#!/usr/bin/env python3
"""Tokenize The Pile (*.jsonl.zst, or plain .jsonl) into llm.c token shards.

    ./prepro_pile.py data/cache/sotu.jsonl.zst -o data/sotu --name sotu
    ./prepro_pile.py https://host/pile/train/00.jsonl.zst --pile-set "Wikipedia (en)" -j 2
    ./prepro_pile.py --encode "Hello world"          # prints: 15496 995
    echo "Hello world" | ./prepro_pile.py --encode -  # text from stdin
    ./prepro_pile.py --decode "15496 995"
    ./prepro_pile.py corpus.jsonl --vocab 8192       # GPT-2's first 7935 merges

Input: one JSON object a line, {"text": "...", "meta": {"pile_set_name": "..."}}.
Inputs are read in the order given; http(s) URLs are downloaded first into the
cache folder (default data/cache/, as HOST/PATH), resuming a partial download.
`.zst` files are read with the Python zstandard module, or else `zstd -dc`.

Token stream: for each document (kept by --pile-set), the end-of-text token
(50256, or N - 1 with --vocab N) and then the document's GPT-2 tokens. The text
"<|endoftext|>" inside a document is tokenized as ordinary text.

--vocab N (257..50257, default 50257): GPT-2's BPE restricted to the first
N - 257 merges of vocab.bpe. GPT-2's id 256 + i is the token of merge i (ids
0..255 are the bytes; checked against encoder.json when the tokenizer loads), so
every id is GPT-2's own id for that piece, all below N - 1, and <|endoftext|>
moves to N - 1. The shards record it in header slot [3] (0 for GPT-2's 50257, so
the default output is byte-identical to that of versions without the flag); the
tokenizer table holds N entries. --encode and --decode follow --vocab.

Output, in --out (default data/NAME/):
  NAME_val_000000.bin     the validation split: the first documents of the
                          stream, whole documents only: documents are added
                          until it holds at least --val-tokens tokens (so it
                          ends at a document boundary and overshoots by less
                          than one document; no document is in both splits).
                          None with --val-tokens 0. --val-docs K instead: the
                          first K documents exactly.
  NAME_train_000001.bin   then the rest of the stream in shards of exactly
  NAME_train_000002.bin   --shard-size tokens (the last one shorter); as in
  ...                     llm.c, a document may continue into the next shard.
  gpt2_tokenizer.bin      llm.c's decoding table for C: uint32[256] header
                          (magic, version, vocab size N, eot id N - 1; 50257 and
                          50256 by default), then for each token id a uint8
                          length and the raw bytes.
Each shard: int32[256] header ([0] magic, [1] version = uint16 tokens, [2] token
count, [3] the vocab size N when --vocab N is not 50257, else 0; rest 0), then
the tokens as little-endian uint16. The magic numbers are
read from train_unipool.c (dev/magic.py). Shards are written into
OUT/.NAME.partial/ and moved into OUT when the run succeeds; then shards of NAME
from an earlier run that this run did not write are deleted, so OUT holds one
consistent set (a failed run leaves the earlier set as it was). The output is
byte-identical for any -j.

Tokenizer: tiktoken's gpt2 if `import tiktoken` works and --vocab is 50257, else
dev/gpt2_bpe.py (this repo, standard library only, same ids) over encoder.json and vocab.bpe from
--encoder-dir (default data/cache/gpt2/, fetched by dev/data/fetch_sotu.py).

Errors print one line `error: ...` and exit 1 (2 for bad usage).
"""
import argparse
import array
import collections
import concurrent.futures
import errno
import json
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "dev"))
import gpt2_bpe  # noqa: E402
from magic import magic  # noqa: E402

DEFAULT_CACHE = os.path.join(ROOT, "data", "cache")
BATCH_BYTES = 1 << 19        # lines are sent to workers in batches of about this much text
BATCH_LINES = 1024


class UserError(Exception):
    """An expected failure: printed as `error: <message>`, exit 1."""


# ----------------------------------------------------------------------------
# progress

def _fmt_bytes(n):
    return "%.1f MB" % (n / 1e6) if n < 1e10 else "%.2f GB" % (n / 1e9)


class Progress:
    """A status line on stderr: redrawn in place on a terminal (5 times a
    second), else a line every 10 seconds; then a final line."""
    open_line = False    # a terminal line without its newline yet

    def __init__(self, quiet=False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0 if self.tty else time.time()
        self.width = 0

    def show(self, msg, final=False):
        if self.quiet:
            return
        now = time.time()
        if not final and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        if self.tty:
            pad = max(0, self.width - len(msg))
            self.width = len(msg)
            sys.stderr.write("\r" + msg + " " * pad + ("\n" if final else ""))
            Progress.open_line = not final
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


# ----------------------------------------------------------------------------
# inputs

def download(url, cache_dir, quiet=False):
    """Download url once into cache_dir/HOST/PATH, resuming a partial file
    (PATH.part) with an HTTP Range request; return the local path."""
    u = urllib.parse.urlparse(url)
    parts = [p for p in [u.netloc] + u.path.split("/") if p not in ("", ".", "..")]
    if len(parts) < 2:
        raise UserError("%s: the URL names no file" % url)
    dest = os.path.join(cache_dir, *parts)
    name = parts[-1]
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    except OSError as e:
        raise UserError("cannot create cache folder %s (%s); pass --cache-dir"
                        % (os.path.dirname(dest), e.strerror))
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "prepro_pile.py"}
    if have:
        headers["Range"] = "bytes=%d-" % have
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:       # nothing left to send: is the part file complete?
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                os.replace(part, dest)
                return dest
            os.remove(part)              # bigger than the file: start again
            return download(url, cache_dir, quiet)
        raise UserError("downloading %s: HTTP %d %s; check the URL" % (url, e.code, e.reason))
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError("downloading %s: %s; check the URL and the network, or download "
                        "it yourself and pass the local file" % (url, reason))
    with resp:
        if have and resp.status != 206:  # server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        prog = Progress(quiet)
        got = have
        t0 = time.time()
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    rate = (got - have) / max(time.time() - t0, 1e-9) / 1e6
                    pct = " (%.1f%%)" % (100.0 * got / total) if total else ""
                    prog.show("downloading %s: %s%s, %.1f MB/s" % (name, _fmt_bytes(got), pct, rate))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError("writing %s: no space left on device; free some space or pass "
                                "--cache-dir on another disk" % part)
            raise UserError("downloading %s: interrupted after %s (%s); run again to resume"
                            % (url, _fmt_bytes(got), e))
        prog.show("downloading %s: %s done" % (name, _fmt_bytes(got)), final=True)
    if total is not None and got != total:
        raise UserError("downloading %s: got %d of %d bytes; run again to resume" % (url, got, total))
    os.replace(part, dest)
    return dest


def _zstd_chunks_module(path, zstandard):
    """Decompressed chunks of a .zst file; raises UserError if it is truncated or bad."""
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    obj, fed = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            while chunk:
                try:
                    out = obj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise UserError("%s: not a valid zstd file (%s); re-download it" % (path, e))
                fed = True
                if out:
                    yield out
                if obj.eof:              # end of one frame; more frames may follow
                    chunk = obj.unused_data
                    obj, fed = dctx.decompressobj(), False
                else:
                    chunk = b""
    if fed:
        raise UserError("%s: truncated zstd file (ends inside a frame); re-download it" % path)


def _zstd_chunks_cli(path):
    exe = shutil.which("zstd")
    if exe is None:
        raise UserError("%s: need the Python zstandard module or the zstd command to read it; "
                        "apt-get install python3-zstandard (or zstd)" % path)
    p = subprocess.Popen([exe, "-dc", "--", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            chunk = p.stdout.read(1 << 20)
            if not chunk:
                break
            yield chunk
    finally:
        p.stdout.close()
        err = p.stderr.read().decode("utf-8", "replace").strip().splitlines()
        p.stderr.close()
        rc = p.wait()
    if rc != 0:
        msg = err[-1] if err else "zstd exited with %d" % rc
        raise UserError("%s: zstd -dc failed (%s); re-download it" % (path, msg.strip()))


def _use_zstandard_module():
    if os.environ.get("PREPRO_ZSTD_CLI"):   # testing: force the zstd command path
        return None
    try:
        import zstandard
        return zstandard
    except ImportError:
        return None


def read_lines(path):
    """Yield (line_number, bytes line) of a .jsonl or .jsonl.zst file."""
    if path.endswith(".zst"):
        zs = _use_zstandard_module()
        chunks = _zstd_chunks_module(path, zs) if zs else _zstd_chunks_cli(path)
    else:
        def _plain():
            with open(path, "rb") as f:
                while True:
                    c = f.read(1 << 20)
                    if not c:
                        return
                    yield c
        chunks = _plain()
    rest = b""
    lineno = 0
    try:
        for chunk in chunks:
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line
    except OSError as e:
        raise UserError("%s: read failed (%s)" % (path, e.strerror or e))
    if rest:
        yield lineno + 1, rest


# ----------------------------------------------------------------------------
# tokenizing (runs in the worker processes)

_TOK = None      # set in the parent before the workers fork
_SETS = None     # frozenset of --pile-set names, or None for all


def tokenize_batch(batch):
    """(label, [(lineno, line), ...]) ->
    (ndocs_kept, doc_lengths bytes, tokens bytes, input bytes, error)."""
    label, lines = batch
    tok, sets, eot = _TOK, _SETS, _TOK.eot
    toks = array.array("H")
    lens = array.array("I")
    nbytes = sum(len(line) + 1 for _, line in lines)
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            return 0, b"", b"", 0, "%s:%d: not valid UTF-8; fix or delete that line" % (label, lineno)
        except ValueError as e:
            return 0, b"", b"", 0, ("%s:%d: not valid JSON (%s at column %d); fix or delete that line"
                                 % (label, lineno, e.msg, e.colno))
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            return 0, b"", b"", 0, ('%s:%d: no "text" string in this JSON object; each line must be '
                                 '{"text": ..., "meta": {"pile_set_name": ...}}' % (label, lineno))
        if sets is not None:
            meta = obj.get("meta")
            name = meta.get("pile_set_name") if isinstance(meta, dict) else None
            if name not in sets:
                continue
        ids = tok.encode(text)
        toks.append(eot)
        toks.extend(ids)
        lens.append(1 + len(ids))
    if sys.byteorder != "little":
        toks.byteswap()
    return len(lens), lens.tobytes(), toks.tobytes(), nbytes, None


def batches(paths):
    for label in paths:
        cur, size = [], 0
        for lineno, line in read_lines(label):
            cur.append((lineno, line))
            size += len(line)
            if size >= BATCH_BYTES or len(cur) >= BATCH_LINES:
                yield label, cur
                cur, size = [], 0
        if cur:
            yield label, cur


def ordered_map(fn, items, workers):
    """Like Pool.imap (results in input order) but reads at most a few batches
    ahead, so memory stays bounded on huge inputs. workers == 1: no processes.
    On an error (a full disk, Ctrl-C) queued batches are cancelled and the few
    running ones finish: Pool.terminate() here could deadlock on the queue lock
    of a worker it killed."""
    if workers == 1:
        for it in items:
            yield fn(it)
        return
    ex = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("fork"))
    try:
        pending = collections.deque()
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) >= 3 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------
# output

def shard_header(ntokens, vocab=gpt2_bpe.N_VOCAB):
    """The int32[256] header of a uint16 token shard: magic, version, token count,
    then the vocab size when it is not GPT-2's 50257 (0 means 50257)."""
    header = [0] * 256
    header[0], header[1], header[2] = magic("SHARD_MAGIC"), magic("SHARD_VERSION_U16"), ntokens
    header[3] = 0 if vocab == gpt2_bpe.N_VOCAB else vocab
    return struct.pack("<256i", *header)


def write_file(path, parts):
    """Writes the byte strings to PATH.tmp, fsyncs and renames it over PATH, so
    an interrupted write keeps what PATH held (dev/convert.py uses it too)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if e.errno == errno.ENOSPC:
            raise UserError("writing %s: no space left on device; free some space or pass "
                            "-o on another disk" % path)
        raise UserError("writing %s: %s" % (path, e.strerror or e))


class ShardWriter:
    """Writes the shards into a staging folder OUT/.NAME.partial/ and moves them
    into OUT only when the whole run succeeded (finish); abort() drops them, so
    a failed run leaves the earlier set of shards as it was."""

    def __init__(self, out, name, shard_size, val_tokens, vocab=gpt2_bpe.N_VOCAB, val_docs=None):
        self.out, self.name = out, name
        self.stage = os.path.join(out, ".%s.partial" % name)
        shutil.rmtree(self.stage, ignore_errors=True)      # left by a killed run
        try:
            os.makedirs(self.stage)
        except OSError as e:
            raise UserError("cannot create %s (%s); pass -o" % (self.stage, e.strerror))
        self.shard_size, self.val_tokens, self.vocab = shard_size, val_tokens, vocab
        self.val_docs_want = val_docs    # None: val by --val-tokens; else exactly this many docs
        self.in_val = val_tokens > 0 if val_docs is None else val_docs > 0
        self.buf = bytearray()           # little-endian uint16 tokens not yet written
        self.val_docs = 0
        self.next_train = 1
        self.written = []                # (path, ntokens)

    def _write(self, fn, data):
        n = len(data) // 2
        write_file(os.path.join(self.stage, fn), [shard_header(n, self.vocab), data])
        self.written.append((os.path.join(self.out, fn), n))

    def _flush_train(self, final):
        step = 2 * self.shard_size
        start = 0
        while len(self.buf) - start >= step or (final and len(self.buf) > start):
            self._write("%s_train_%06d.bin" % (self.name, self.next_train),
                        bytes(self.buf[start:start + step]))
            self.next_train += 1
            start += step
        del self.buf[:start]

    def add(self, ndocs, lens, toks):
        if self.in_val:
            # whole documents into val until it holds >= val_tokens
            lens = array.array("I", lens)
            pos = 0
            for i, n in enumerate(lens):
                pos += 2 * n
                self.val_docs += 1
                if (self.val_docs == self.val_docs_want if self.val_docs_want is not None
                        else len(self.buf) + pos >= 2 * self.val_tokens):
                    self.buf += toks[:pos]
                    self._write("%s_val_%06d.bin" % (self.name, 0), bytes(self.buf))
                    self.buf = bytearray(toks[pos:])
                    self.in_val = False
                    self._flush_train(False)
                    return
            self.buf += toks
        else:
            self.buf += toks
            if len(self.buf) >= 2 * self.shard_size:
                self._flush_train(False)

    def finish(self):
        warn = None
        if self.in_val:
            if self.buf:
                self._write("%s_val_%06d.bin" % (self.name, 0), bytes(self.buf))
                warn = ("all %d tokens went to the val shard (fewer than --val-tokens %d); "
                        "no train shards" % (len(self.buf) // 2, self.val_tokens)
                        if self.val_docs_want is None else
                        "all %d documents went to the val shard (fewer than --val-docs %d); "
                        "no train shards" % (self.val_docs, self.val_docs_want))
            self.buf = bytearray()
        else:
            self._flush_train(True)
        # move the new set in place; delete shards of this name from an earlier run
        keep = {os.path.basename(p) for p, _ in self.written}
        for fn in sorted(keep):
            os.replace(os.path.join(self.stage, fn), os.path.join(self.out, fn))
        os.rmdir(self.stage)
        pat = re.compile(r"^%s_(val|train)_\d{6}\.bin$" % re.escape(self.name))
        for fn in os.listdir(self.out):
            if pat.match(fn) and fn not in keep:
                os.remove(os.path.join(self.out, fn))
        return warn

    def abort(self):
        shutil.rmtree(self.stage, ignore_errors=True)


# ----------------------------------------------------------------------------
# main

class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("error: %s; see %s --help\n" % (message, self.prog))
        sys.exit(2)


def int_at_least(lo, hi=None):
    """An argparse type: an integer (underscores allowed) of at least lo (and at most hi)."""
    def parse(s):
        try:
            v = int(s.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not an integer" % s)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                ("must be at least %d, got %d" % (lo, v)) if hi is None else
                ("must be from %d to %d, got %d" % (lo, hi, v)))
        return v
    return parse


def parse_args(argv):
    p = Parser(prog="prepro_pile.py",
               description="Tokenize The Pile (*.jsonl.zst / .jsonl) with GPT-2 BPE into llm.c "
                           "uint16 token shards (val first, then train) plus gpt2_tokenizer.bin.",
               epilog="Also: --encode TEXT / --decode IDS ('-' reads stdin) print GPT-2 ids / text.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="local .jsonl.zst/.jsonl files or http(s) URLs, read in this order")
    p.add_argument("-o", "--out", help="output folder (default: data/NAME under the repo)")
    p.add_argument("--name", default="pile", help="shard file prefix (default: pile)")
    p.add_argument("--shard-size", type=int_at_least(1), default=100_000_000,
                   help="tokens per train shard (default: 100000000)")
    p.add_argument("--val-tokens", type=int_at_least(0), default=10_000_000,
                   help="validation tokens: whole documents from the start of the stream until at "
                        "least this many (default: 10000000; 0 = no val shard)")
    p.add_argument("--val-docs", type=int_at_least(0), default=None, metavar="K",
                   help="validation split: exactly the first K documents kept (instead of "
                        "--val-tokens; 0 = no val shard)")
    p.add_argument("--vocab", type=int_at_least(257, gpt2_bpe.N_VOCAB), default=gpt2_bpe.N_VOCAB,
                   metavar="N", help="GPT-2's BPE with only its first N - 257 merges: ids below "
                   "N - 1, <|endoftext|> at N - 1 (257..50257, default 50257)")
    p.add_argument("-j", "--workers", type=int_at_least(1), default=os.cpu_count() or 1,
                   help="tokenizer processes (default: number of cores); output is the same for any")
    p.add_argument("--pile-set", action="append", metavar="NAME",
                   help="keep only documents whose meta.pile_set_name is NAME (repeatable)")
    p.add_argument("--encoder-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: data/cache/gpt2)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help="where URLs are downloaded to (default: data/cache under the repo)")
    p.add_argument("--tokenizer", choices=["auto", "builtin", "tiktoken"], default="auto",
                   help="auto: tiktoken if importable (and --vocab 50257), else builtin "
                        "dev/gpt2_bpe.py (same ids)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("--encode", metavar="TEXT", help="print the GPT-2 ids of TEXT ('-': stdin) and exit")
    p.add_argument("--decode", metavar="IDS", help="print the text of space-separated ids ('-': stdin) and exit")
    a = p.parse_args(argv)
    if a.encode is None and a.decode is None and not a.inputs:
        p.error("no INPUT given")
    if a.tokenizer == "tiktoken" and a.vocab != gpt2_bpe.N_VOCAB:
        p.error("argument --vocab: tiktoken serves only %d; use --tokenizer builtin or auto"
                % gpt2_bpe.N_VOCAB)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", a.name):
        p.error("argument --name: %r: use letters, digits, '_', '.', '-'" % a.name)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    tok = gpt2_bpe.get_tokenizer(a.tokenizer, a.encoder_dir, a.vocab)

    if a.encode is not None or a.decode is not None:
        if a.encode is not None:
            text = sys.stdin.read() if a.encode == "-" else a.encode
            print(" ".join(map(str, tok.encode(text))))
        if a.decode is not None:
            s = sys.stdin.read() if a.decode == "-" else a.decode
            try:
                ids = [int(x) for x in s.split()]
            except ValueError:
                raise UserError("--decode: expected space-separated integers")
            bad = [i for i in ids if not 0 <= i < tok.n_vocab]
            if bad:
                raise UserError("--decode: id %d is out of range 0..%d" % (bad[0], tok.n_vocab - 1))
            sys.stdout.write(tok.decode(ids))
            sys.stdout.flush()
        return 0

    # check every input before any work
    paths = []
    for inp in a.inputs:
        if re.match(r"^https?://", inp):
            paths.append(inp)
            continue
        if not os.path.exists(inp):
            raise UserError("%s: no such file; check the path (or pass an http(s) URL)" % inp)
        if os.path.isdir(inp):
            raise UserError("%s: is a folder; pass the .jsonl.zst / .jsonl files in it" % inp)
        if not os.access(inp, os.R_OK):
            raise UserError("%s: not readable (permission denied)" % inp)
        paths.append(inp)
    paths = [download(p, a.cache_dir, a.quiet) if re.match(r"^https?://", p) else p for p in paths]

    out = a.out or os.path.join(ROOT, "data", a.name)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError("cannot create output folder %s (%s); pass -o" % (out, e.strerror))
    write_file(os.path.join(out, "gpt2_tokenizer.bin"),
               [gpt2_bpe.tokenizer_table(tok, magic("TOKENIZER_MAGIC"), magic("TOKENIZER_VERSION"))])

    global _TOK, _SETS
    _TOK = tok
    _SETS = frozenset(a.pile_set) if a.pile_set else None
    writer = ShardWriter(out, a.name, a.shard_size, a.val_tokens, a.vocab, a.val_docs)
    prog = Progress(a.quiet)
    docs = ntok = nbytes = 0
    t0 = time.time()

    def status():
        dt = max(time.time() - t0, 1e-9)
        return ("%s: %d docs, %d tokens, %s, %.1f MB/s, %.0f tokens/s, %.0fs"
                % (a.name, docs, ntok, _fmt_bytes(nbytes), nbytes / dt / 1e6, ntok / dt, dt))

    try:
        for ndocs, lens, toks, nb, err in ordered_map(tokenize_batch, batches(paths), a.workers):
            if err:
                raise UserError(err)
            docs += ndocs
            nbytes += nb
            ntok += len(toks) // 2
            writer.add(ndocs, lens, toks)
            prog.show(status())
        warn = writer.finish()
    except BaseException:
        writer.abort()
        raise
    prog.show(status(), final=True)
    if docs == 0:
        print("warning: no documents kept%s" % (" (check --pile-set)" if a.pile_set else ""),
              file=sys.stderr)
    if warn:
        print("warning: " + warn, file=sys.stderr)
    for path, n in writer.written:
        extra = " (%d docs)" % writer.val_docs if "_val_" in os.path.basename(path) else ""
        print("wrote %s: %d tokens%s" % (path, n, extra))
    print("wrote %s" % os.path.join(out, "gpt2_tokenizer.bin"))
    return 0


def _error(msg):
    if Progress.open_line:
        sys.stderr.write("\n")
    print("error: %s" % msg, file=sys.stderr)
    sys.exit(1)


def cli():
    try:
        sys.exit(main())
    except UserError as e:
        _error(e)
    except gpt2_bpe.TokenizerError as e:
        _error("%s (or pass --encoder-dir)" % e)
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    cli()
