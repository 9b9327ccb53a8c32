#!/usr/bin/env python3
"""File-format constants, read from train_unipool.c so they live in one place.

    from magic import magic
    magic("SHARD_MAGIC")        # -> 20240520
    magic("TOKENIZER_VERSION")  # -> 2

Looks for a line `#define NAME <integer>` in train_unipool.c at the repo root
(the folder above this file). Raises KeyError if the name is not defined there.
"""
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "train_unipool.c")


@functools.lru_cache(maxsize=None)
def _defines(path=SOURCE):
    with open(path, encoding="utf-8") as f:
        src = f.read()
    out = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+"
                         r"(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", src, re.M):
        v = m.group(2)
        out.setdefault(m.group(1), int(v, 16) if v[:2] in ("0x", "0X") else int(v, 10))
    return out


def magic(name, path=SOURCE):
    """Integer value of `#define name ...` in train_unipool.c."""
    d = _defines(path)
    if name not in d:
        raise KeyError("%s: no '#define %s <integer>'" % (path, name))
    return d[name]


if __name__ == "__main__":
    import sys
    names = sys.argv[1:] or sorted(_defines())
    for n in names:
        print(n, magic(n))
