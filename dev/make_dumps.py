"""Write the reference-dump suite (dev/SPEC.md section 6) into dev/dumps/.

    /usr/bin/python3 dev/make_dumps.py [--out DIR] [--only NAME]

Each case is a tiny model trained for a few steps in float64, from float32
hparams, tokens and initial weights drawn with numpy's frozen RandomState, so
that a second run writes byte-identical files. Weights are re-drawn (next seed)
until no float32 implementation can reasonably route or clip differently, and,
for the sigmoid router, until the expert bias moves a choice and some count
sits exactly on its layer's mean (where the bias must not move).
"""
import argparse
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model import (AdamW, UniPool, accumulate_grads, clip_grads, flatten_grads, flatten_params,
                   load_params, param_shapes, top_k_lower_index, update_expert_bias)
from read_dump import (HEADER_FIELDS, HEADER_INTS, HPARAM_FIELDS, HPARAM_FLOATS, MAGIC, SECTIONS,
                       VERSION, config_from)
from router_c import estimate_router_c

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dumps")

# Re-draw rule thresholds (SPEC section 6).
MIN_SCORE_GAP = 1e-4      # K-th minus (K+1)-th score
MIN_UNIT_LOGIT = 1e-5     # |z / (||z|| + eps)|, NormRouter
MIN_CLIP_DISTANCE = 0.01  # |norm - grad_clip| / grad_clip
MAX_DRAWS = 100

# The computed sections, in file order.
SECTION_ORDER = [name for name, _ in SECTIONS if name not in ("params", "tokens")]

ROUTER_C_DRAWS = 100_000
ROUTER_C_SEED = 1125

# Base tiny configuration: model fields of Config, then the training fields. F = 20 keeps
# the suite small (2F, C, F and hd all differ); grad_clip = 20 is far above every norm.
BASE = dict(V=61, Vp=64, maxT=16, L=4, C=32, NH=4, NKV=2, F=20, G=4, E=4, K=1, router=0, aux=1,
            alpha=1e-2, norm_eps=1e-5, rope_theta=1e6, router_eps=1e-8, bias_rate=0.0,
            B=2, T=8, n_micro=1, n_steps=2, lr=1e-2, b1=0.9, b2=0.95, eps=1e-5, wd=0.0,
            grad_clip=20.0)


@dataclass
class Case:
    name: str
    changes: dict = field(default_factory=dict)   # overrides of BASE
    clips: bool = False                           # clipping must trigger at every step (else never)

    def setting(self, key):
        return self.changes.get(key, BASE[key])


CASES = [
    Case("vanilla_softmax_layeraux", dict(G=4, E=4, K=1, router=0, aux=1)),
    # the paper's UniPool: the stale statistic crosses micro-batches and steps
    Case("unipool_norm_staleaux", dict(G=1, E=16, K=1, router=1, aux=2, n_micro=2, n_steps=3)),
    Case("unipool_top2_poolaux", dict(G=1, E=8, K=2, router=1, aux=3)),
    Case("vanilla_top3", dict(L=3, G=3, E=6, K=3, router=0, aux=1)),
    # T = maxT: the whole RoPE table
    Case("grouped_pools", dict(G=2, E=6, K=1, router=1, aux=2, n_micro=2, n_steps=2, B=1, T=16)),
    Case("reduced_pool", dict(G=1, E=6, K=1, router=1, aux=2, n_micro=2)),
    # F > C as in the paper; grad_clip = 0 disables clipping
    Case("dense", dict(F=48, G=4, E=1, K=1, router=0, aux=0, grad_clip=0.0)),
    Case("mha_novpad", dict(NH=4, NKV=4, Vp=61, G=4, E=4, K=2, router=0, aux=3, rope_theta=100.0)),
    # clip at about 0.28 of the norm; eps = 1e-3 makes the clipped scale visible in the update
    Case("clip_triggers", dict(G=1, E=16, K=1, router=1, aux=2, rope_theta=100.0, grad_clip=1.5,
                               eps=1e-3), clips=True),
    Case("weight_decay", dict(L=2, G=2, E=4, K=1, router=0, aux=1, wd=0.1, lr=3e-2, n_steps=3)),
    # B = 3, T = 5: odd sizes
    Case("softmax_poolaux_cur", dict(G=1, E=8, K=1, router=0, aux=3, n_micro=2, B=3, T=5)),
    # the sigmoid router: bias steps of 0.02, against score gaps of a few hundredths, move
    # choices from the second step on; 32 tokens a step over E = 4 (64 choices over E = 8 in
    # the pool) give an integer mean, so counts on it occur
    Case("sigmoid_bias_top1", dict(G=4, E=4, K=1, router=2, aux=0, bias_rate=0.02, n_micro=2,
                                   n_steps=4)),
    Case("sigmoid_bias_top2_pool", dict(G=1, E=8, K=2, router=2, aux=0, bias_rate=0.02,
                                        n_micro=2, n_steps=3)),
]


def make_header(case):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    values = dict(magic=MAGIC, version=VERSION, **{k: case.setting(k) for k in HEADER_FIELDS[2:]})
    header[:len(HEADER_FIELDS)] = [values[k] for k in HEADER_FIELDS]
    return header


def make_hparams(case):
    """float32[64]; router_c is estimated for the NormRouter and 1 for the other routers."""
    values = {k: case.setting(k) for k in HPARAM_FIELDS if k != "router_c"}
    values["router_c"] = 1.0
    if case.setting("router") == 1:
        rng = np.random.RandomState(ROUTER_C_SEED)
        values["router_c"] = estimate_router_c(case.setting("E"), case.setting("K"),
                                               ROUTER_C_DRAWS, rng)[0]
    hparams = np.zeros(HPARAM_FLOATS, dtype="<f4")
    hparams[:len(HPARAM_FIELDS)] = [values[k] for k in HPARAM_FIELDS]
    return hparams


def init_params(cfg, rng):
    """Initial weights as float32: every linear map N(0, 1/fan_in), wte N(0, 0.3^2), and the
    norm weights and router_scale 1 + N(0, 0.1^2), so that a wrong gradient of any shows."""
    parts = []
    for name, shape in param_shapes(cfg):
        if name in ("attn_norm", "ffn_norm", "final_norm", "router_scale"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "wte":
            w = 0.3 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        parts.append(w.reshape(-1))
    return np.concatenate(parts).astype("<f4")


def routing_problems(cfg, outputs):
    """Reasons why float32 could route differently from these float64 forward passes."""
    problems = []
    for out in outputs:
        for l, r in enumerate(out.routing):
            if cfg.E > cfg.K:
                top = torch.sort(r.ranked, dim=-1, descending=True).values
                kth, next_ = top[:, cfg.K - 1], top[:, cfg.K]
                gap = kth - next_
                if cfg.router == 1:   # both 0 after the relu: the lower-index rule decides
                    gap = gap[(kth > 0) | (next_ > 0)]
                if gap.numel() and gap.min() <= MIN_SCORE_GAP:
                    problems.append(f"layer {l}: score gap {float(gap.min()):.2e}")
            if r.unit is not None and r.unit.abs().min() <= MIN_UNIT_LOGIT:
                problems.append(f"layer {l}: normalised logit {float(r.unit.abs().min()):.2e}")
    return problems


def run_training(cfg, hparams, params, tokens, dtype=torch.float64):
    """Train as SPEC section 5 says, from float32 hparams (dict), params and tokens
    (n_steps, n_micro, B, T+1). Returns the computed dump sections as float64 arrays ("bias"
    for the sigmoid router only) and, per step, (grad norm, clipped, [Output] of the
    micro-batches, expert bias (L, E) float32 after the step)."""
    h = {k: float(v) for k, v in hparams.items()}
    model = UniPool(cfg, dtype=dtype)
    load_params(model, torch.from_numpy(np.asarray(params, dtype=np.float64)).to(dtype))
    opt = AdamW(model, lr=h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], wd=h["wd"])
    tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    stats, steps = [], []
    for step, micro_batches in enumerate(tokens):
        outputs = accumulate_grads(model, [(mb[:, :-1], mb[:, 1:]) for mb in micro_batches])
        if step == 0:
            logits = outputs[0].logits[..., :cfg.V].detach().clone()
            grads = flatten_grads(model).clone()
        norm, clipped = clip_grads(model, h["grad_clip"])
        opt.step()
        if cfg.router == 2:
            update_expert_bias(model)
        n = len(outputs)
        stats += [sum(float(o.ce) for o in outputs) / n,
                  sum(float(o.aux) for o in outputs) / n, norm]
        steps.append((norm, clipped, outputs, model.expert_bias.clone()))
    computed = {"logits": logits.reshape(-1), "stats": torch.tensor(stats, dtype=torch.float64),
                "grads": grads, "final": flatten_params(model)}
    if cfg.router == 2:
        computed["bias"] = model.expert_bias.reshape(-1)
    return {k: v.double().numpy() for k, v in computed.items()}, steps


def bias_moved_choices(cfg, steps):
    """(token, layer) choices over the run whose chosen set the expert bias changed."""
    moved = 0
    for _, _, outputs, _ in steps:
        for out in outputs:
            for r in out.routing:
                plain = top_k_lower_index(r.scores, cfg.K).sort(dim=-1).values
                moved += int((r.chosen.sort(dim=-1).values != plain).any(dim=-1).sum())
    return moved


def bias_problems(cfg, steps):
    """Reasons to re-draw a sigmoid-router case: the bias never changes a choice, or no count
    ever sits exactly on its layer's mean (float32(sum) / float32(E)), so that sign(0) = 0
    goes untested. Raises if a bias entry on such a tie moved."""
    problems = []
    if bias_moved_choices(cfg, steps) == 0:
        problems.append("the expert bias changes no choice")
    ties = 0
    before = torch.zeros(cfg.L, cfg.E, dtype=torch.float32)
    for step, (_, _, outputs, after) in enumerate(steps):
        counts = torch.stack([sum(F.one_hot(out.routing[l].chosen, cfg.E).sum(dim=(0, 1))
                                  for out in outputs) for l in range(cfg.L)]).to(torch.float32)
        mean = counts.sum(dim=1, keepdim=True) / torch.tensor(cfg.E, dtype=torch.float32)
        on_mean = counts == mean
        if not torch.equal(after[on_mean], before[on_mean]):
            raise RuntimeError(f"step {step}: a bias whose count is its layer's mean moved")
        ties += int(on_mean.sum())
        before = after
    if ties == 0:
        problems.append("no count on its layer's mean")
    return problems


def redraw_problems(case, cfg, grad_clip, steps):
    """Reasons to re-draw: float32 could route differently, or clip differently, or clipping
    does not do what the case wants, or (sigmoid router) bias_problems()."""
    problems = bias_problems(cfg, steps) if cfg.router == 2 else []
    for step, (norm, clipped, outputs, _) in enumerate(steps):
        problems += routing_problems(cfg, outputs)
        if grad_clip > 0 and abs(norm - grad_clip) <= MIN_CLIP_DISTANCE * grad_clip:
            problems.append(f"step {step}: grad norm {norm:.4g} near grad_clip")
        if clipped != case.clips:
            problems.append(f"step {step}: grad norm {norm:.4g}, clipped: {clipped}")
    return problems


def case_seed(case):
    """A seed that depends on the case name only."""
    return zlib.crc32(case.name.encode())


def make_case(case, out_dir):
    """Draw, check and write one case. Returns (weight draws needed, stats as (n_steps, 3),
    choices the expert bias changed: bias_moved_choices(), None without the sigmoid router)."""
    header, hparams = make_header(case), make_hparams(case)
    cfg = config_from(dict(zip(HEADER_FIELDS, map(int, header))), dict(zip(HPARAM_FIELDS, hparams)))
    shape = [case.setting(k) for k in ("n_steps", "n_micro", "B")] + [case.setting("T") + 1]
    tokens = np.random.RandomState(case_seed(case)).randint(0, cfg.V, shape).astype("<i4")
    hp = dict(zip(HPARAM_FIELDS, hparams))
    for draw in range(1, MAX_DRAWS + 1):
        params = init_params(cfg, np.random.RandomState((case_seed(case) + draw) % 2**32))
        computed, steps = run_training(cfg, hp, params, tokens)
        problems = redraw_problems(case, cfg, float(hp["grad_clip"]), steps)
        if not problems:
            break
    else:
        raise RuntimeError(f"{case.name}: no acceptable draw in {MAX_DRAWS}: {problems[0]}")
    computed = {k: v.astype("<f4") for k, v in computed.items()}
    with open(os.path.join(out_dir, case.name + ".bin"), "wb") as f:
        for part in [header, hparams, params, tokens] + [computed[k] for k in SECTION_ORDER
                                                         if k in computed]:
            f.write(part.tobytes())
    moved = bias_moved_choices(cfg, steps) if cfg.router == 2 else None
    return draw, computed["stats"].reshape(-1, 3), moved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default dev/dumps)")
    parser.add_argument("--only", help="make only this case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [c for c in CASES if args.only in (None, c.name)]
    if not cases:
        parser.error(f"no case {args.only!r}; cases: {', '.join(c.name for c in CASES)}")
    os.makedirs(args.out, exist_ok=True)
    for case in cases:
        draws, stats, moved = make_case(case, args.out)
        steps = "; ".join(f"ce {ce:.4f} aux {aux:.4g} norm {norm:.3f}" for ce, aux, norm in stats)
        bias = "" if moved is None else f"; the bias changed {moved} choice(s)"
        print(f"{case.name}: {draws} draw(s); {steps}{bias}", flush=True)


if __name__ == "__main__":
    main()
