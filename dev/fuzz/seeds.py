#!/usr/bin/env python3
"""Writes the fuzz harness's seed inputs into a folder: valid token shards
(uint16 and uint32) and valid checkpoints of a micro model (parameters only,
and with the training state), so the fuzzer starts from files the readers
accept and mutates inward from there.

    python3 dev/fuzz/seeds.py DIR
"""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from magic import magic  # noqa: E402


def shard(version, tokens):
    h = [0] * 256
    h[:3] = [magic("SHARD_MAGIC"), version, len(tokens)]
    fmt = "H" if version == magic("SHARD_VERSION_U16") else "I"
    return struct.pack("<256i", *h) + struct.pack("<%d%s" % (len(tokens), fmt), *tokens)


def checkpoint(with_state):
    V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux = 16, 16, 16, 2, 8, 2, 1, 4, 1, 2, 1, 1, 2
    hd = C // NH
    P = (Vp * C + L * C + L * NH * hd * C + 2 * L * NKV * hd * C + L * C * NH * hd + L * C + L * E * C + L
         + G * E * 2 * F * C + G * E * C * F + C + Vp * C)
    h = [0] * 256
    h[:3] = [magic("CKPT_MAGIC"), magic("CKPT_VERSION"), int(with_state)]
    h[3:16] = [V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux]
    h[16:27] = [2, 8, 1, 10, 1, 5, 1, 0, 8, 5, 2]  # B T n_micro steps warmup val_every val_batches ...
    h[27:30] = [3, 3, 1] if with_state else [0, 0, 0]
    hp = [0.0] * 64
    hp[:12] = [0.01, 1e-5, 1e6, 2.0, 1e-8, 5e-4, 0.9, 0.999, 1e-8, 0.01, 1.0, 0.1]
    h64 = [0] * 32
    h64[:5] = [1337, 0, 0, 4, 99]
    body = struct.pack("<%df" % P, *[0.01 * (i % 7) for i in range(P)])
    if with_state:
        body += struct.pack("<%df" % P, *[0.0] * P) * 2 + struct.pack("<%df" % (L * E), *[0.5] * (L * E))
    return struct.pack("<256i", *h) + struct.pack("<64f", *hp) + struct.pack("<32Q", *h64) + body


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    seeds = {"shard_u16.bin": shard(magic("SHARD_VERSION_U16"), [i % 50 for i in range(40)]),
             "shard_u32.bin": shard(magic("SHARD_VERSION_U32"), [i % 50 for i in range(40)]),
             "ckpt_params.bin": checkpoint(False), "ckpt_state.bin": checkpoint(True)}
    for name, blob in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    main()
