#!/usr/bin/env python3
"""Writes the fuzz harness's seed inputs into a folder: valid token shards
(uint16 and uint32), valid checkpoints of a micro model (parameters only in
version 1, and with the training state in version 2), and resume inputs (a
checkpoint with the shards it resumes on, in the harness's layout: byte 0 the
number of shards - 1, their lengths as uint16, the shards, the checkpoint),
so the fuzzer starts from files the readers accept and mutates inward from
there.

    python3 dev/fuzz/seeds.py DIR
"""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from magic import magic  # noqa: E402

M64 = (1 << 64) - 1


def shard(version, tokens):
    h = [0] * 256
    h[:3] = [magic("SHARD_MAGIC"), version, len(tokens)]
    fmt = "H" if version == magic("SHARD_VERSION_U16") else "I"
    return struct.pack("<256i", *h) + struct.pack("<%d%s" % (len(tokens), fmt), *tokens)


def mix_seed(a, b, c):
    """train_unipool.c's mix_seed: one splitmix64 step from a * K1 ^ b * K2 ^ c."""
    z = ((a * 0x9e3779b97f4a7c15 ^ b * 0xc2b2ae3d27d4eb4f ^ c) + 0x9e3779b97f4a7c15) & M64
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def fingerprint(shards):
    """train_unipool.c's loader_fingerprint of (token count, version) per shard, in glob order."""
    h = mix_seed(len(shards), 0xf1, 0)
    for count, version in shards:
        h = mix_seed(h & M64, count, version)
    return h or 1


def checkpoint(with_state, version, fp=0, position=(0, 0, 3)):
    V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux = 16, 16, 16, 2, 8, 2, 1, 4, 1, 2, 1, 1, 2
    hd = C // NH
    P = (Vp * C + L * C + L * NH * hd * C + 2 * L * NKV * hd * C + L * C * NH * hd + L * C + L * E * C + L
         + G * E * 2 * F * C + G * E * C * F + C + Vp * C)
    h = [0] * 256
    h[:3] = [magic("CKPT_MAGIC"), magic(version), int(with_state)]
    h[3:16] = [V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux]
    h[16:27] = [2, 8, 1, 10, 1, 5, 1, 0, 8, 5, 2]  # B T n_micro steps warmup val_every val_batches ...
    h[27:30] = [3, 3, 1] if with_state else [0, 0, 0]
    hp = [0.0] * 64
    hp[:12] = [0.01, 1e-5, 1e6, 2.0, 1e-8, 5e-4, 0.9, 0.999, 1e-8, 0.01, 1.0, 0.1]
    h64 = [0] * 32
    h64[0] = 1337
    if with_state:
        h64[1:6] = list(position) + [99, fp]
    head = struct.pack("<256i", *h) + struct.pack("<64f", *hp) + struct.pack("<32Q", *h64)
    if version == "CKPT_VERSION":
        head += b"".join(p.ljust(1024, b"\0") for p in (b"/data/t_*.bin", b"/data/val.bin", b""))
    body = struct.pack("<%df" % P, *[0.01 * (i % 7) for i in range(P)])
    if with_state:
        body += struct.pack("<%df" % P, *[0.0] * P) * 2 + struct.pack("<%df" % (L * E), *[0.5] * (L * E))
    return head + body


def resume(shards, ckpt):
    return (bytes([len(shards) - 1]) + b"".join(struct.pack("<H", len(s)) for s in shards) + b"".join(shards)
            + ckpt)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    u16 = magic("SHARD_VERSION_U16")
    two = [shard(u16, [i % 16 for i in range(40)]), shard(u16, [(3 * i) % 16 for i in range(40)])]  # 4 rows each
    fp = fingerprint([(40, u16), (40, u16)])
    seeds = {"shard_u16.bin": shard(u16, [i % 50 for i in range(40)]),
             "shard_u32.bin": shard(magic("SHARD_VERSION_U32"), [i % 50 for i in range(40)]),
             "ckpt_params.bin": checkpoint(False, "CKPT_VERSION_1"),
             "ckpt_state.bin": checkpoint(True, "CKPT_VERSION", fp),
             "resume_same.bin": resume(two, checkpoint(True, "CKPT_VERSION", fp)),
             "resume_shard_end.bin": resume(two, checkpoint(True, "CKPT_VERSION", fp, (1, 1, 4))),
             "resume_other.bin": resume(two[:1], checkpoint(True, "CKPT_VERSION", fp, (0, 1, 2))),
             "resume_v1.bin": resume(two, checkpoint(True, "CKPT_VERSION_1"))}
    for name, blob in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    main()
