#!/usr/bin/env python3
"""PyTorch side of the speed comparison: training steps of the reference model
(dev/model.py) in float32 on random tokens, with torch.optim.AdamW, at the same
configuration, batch and thread count as `dev/bench/bench step`.

    /usr/bin/python3 dev/bench/bench_torch.py -p 182m -o layer -b 4 -t 256 -n 3 --peak 200

Prints one line like the C benchmark: ms/step, tokens/s, GFLOP/s and MFU (same
FLOP count: 6 x active matmul parameters x tokens + 6 L T C per token for
causal attention; --peak is the GFLOP/s that `bench peak` measured), and the
peak resident memory.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import DECAYED, Config, UniPool  # noqa: E402
from router_c import estimate_router_c  # noqa: E402

# name: L, C, NH, NKV, F, pool_frac, pool_alpha (train_unipool.c's presets)
PRESETS = {"tiny": (4, 128, 4, 2, 512, 1.0, 1e-2), "exp": (8, 128, 4, 2, 512, 1.0, 1e-2), "182m": (12, 768, 12, 4, 3072, 1.0, 1e-2),
           "469m": (24, 1024, 16, 4, 4096, 2 / 3, 2e-2), "650m": (36, 1024, 16, 4, 4096, 1.0, 2e-2),
           "830m": (48, 1024, 16, 4, 4096, 1.0, 2e-2), "978m": (24, 1536, 16, 4, 6144, 1.0, 2e-2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-p", default="tiny", choices=PRESETS)
    ap.add_argument("-o", default="pool", choices=["layer", "pool"])
    ap.add_argument("-vocab", type=int, default=50257, help="V; Vp is V rounded up to whole 1024s, as in C")
    ap.add_argument("-b", type=int, default=4)
    ap.add_argument("-t", type=int, default=256)
    ap.add_argument("-n", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak", type=float, default=0.0, help="machine peak GFLOP/s, for MFU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    L, C, NH, NKV, F, frac, pool_alpha = PRESETS[a.p]
    vanilla = a.o == "layer"
    E = 8 if vanilla else round(8 * L * frac)
    router_c = 1.0 if vanilla else float(estimate_router_c(E, 1, 100_000, __import__("numpy").random.default_rng(1234))[0])
    cfg = Config(V=a.vocab, Vp=(a.vocab + 1023) // 1024 * 1024, maxT=1024, L=L, C=C, NH=NH, NKV=NKV, F=F, G=L if vanilla else 1, E=E, K=1,
                 router=0 if vanilla else 1, aux=1 if vanilla else 2, alpha=1e-2 if vanilla else pool_alpha,
                 norm_eps=1e-5, rope_theta=1e6, router_c=router_c, router_eps=1e-8)
    model = UniPool(cfg, dtype=torch.float32)
    with torch.no_grad():  # the paper's initialisation, as model_init in train_unipool.c
        for name, p in model.ordered_params():
            if name in DECAYED:
                p.normal_(0.0, 0.01 / (2 * L) ** 0.5 if name in ("wo", "expert_fc2") else 0.01)
            else:
                p.fill_(1.0)
    decay = [p for n, p in model.ordered_params() if n in DECAYED]
    rest = [p for n, p in model.ordered_params() if n not in DECAYED]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    tokens = torch.randint(0, cfg.V, (a.b, a.t + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for step in range(a.n + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)  # keeps the gradient buffers: no 3 GB of fresh pages per step
        out = model(x, y, train=True)
        (out.ce + out.aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    expert = 3 * F * C
    total = sum(p.numel() for p in model.parameters())
    active = total - cfg.G * cfg.E * expert + L * cfg.K * expert
    matmul = active - cfg.Vp * C - (2 * L + 1) * C - L
    flops = (6 * matmul + 6 * L * a.t * C) * a.b * a.t
    gflops = flops / dt / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576
    mfu = " | MFU %.1f%% of %.0f" % (100 * gflops / a.peak, a.peak) if a.peak else ""
    print("torch: %s L %d C %d G %d E %d K 1 | B %d T %d | %.0f ms/step (mean of %d) | %.0f tok/s | %.1f GFLOP/s%s | "
          "peak RSS %.2f GiB | torch %s, %d threads" % ("vanilla" if vanilla else "UniPool", L, C, cfg.G, E, a.b, a.t,
                                                        dt * 1e3, a.n, a.b * a.t / dt, gflops, mfu, rss,
                                                        torch.__version__, a.threads))


if __name__ == "__main__":
    main()
