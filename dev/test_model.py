"""Tests of dev/model.py against the SPEC: /usr/bin/python3 dev/test_model.py

- the forward pass against a literal, loop-by-loop numpy transcription of SPEC section 3-4;
- autograd against float64 central finite differences, for the three routers and aux modes
  1-3 (the perturbation is small enough that no routing decision flips, which is checked);
- the sigmoid router: the bias moves the choice but not the gate, the bias update on
  hand-computed counts, which passes count, and the configurations validate() refuses;
- the fixed points of the aux losses, the aux = 2 state, clipping, AdamW against
  torch.optim.AdamW, and the flat-buffer layout;
- a float32 replay of every committed dump, as a float32 implementation (the C one) sees it.
"""
import glob
import math
import os
import unittest

import numpy as np
import torch

from make_dumps import DEFAULT_OUT, run_training
from model import (DECAYED, PARAM_TABLE, AdamW, Config, UniPool, clip_grads, flatten_grads,
                   flatten_params, load_params, num_params, param_shapes, train_step,
                   top_k_lower_index, update_expert_bias)
from read_dump import config_from, load_dump

torch.set_num_threads(1)


def tiny_config(**changes):
    """A very small config: padded vocabulary, GQA, hd = 4 with a RoPE base that rotates."""
    base = dict(V=11, Vp=13, maxT=8, L=2, C=16, NH=4, NKV=2, F=6, G=1, E=4, K=1, router=0, aux=1,
                alpha=0.3, norm_eps=1e-5, rope_theta=10.0, router_c=2.0, router_eps=1e-8)
    base.update(changes)
    return Config(**base)


def random_model(cfg, seed, dtype=torch.float64):
    """A model with random weights of the scale the dumps use (norm weights near 1) and, for
    the sigmoid router, an expert bias N(0, 0.1^2), large enough to move choices."""
    gen = torch.Generator().manual_seed(seed)
    model = UniPool(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.ordered_params():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name in ("attn_norm", "ffn_norm", "final_norm", "router_scale"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    if cfg.router == 2:
        model.expert_bias = 0.1 * torch.randn(cfg.L, cfg.E, generator=gen)
    return model


def random_batch(cfg, B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.V, (B, T + 1), generator=gen)
    return tokens[:, :T], tokens[:, 1:]


def naive_forward(cfg, model, idx, targets, prev_f=None):
    """SPEC sections 3-4 transcribed token by token with numpy. Returns (logits, ce, aux)."""
    P = {name: p.detach().double().numpy() for name, p in model.ordered_params()}
    bias = model.expert_bias.double().numpy()
    B, T = idx.shape
    hd, N = cfg.hd, B * T

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x) + cfg.norm_eps) * w

    def rope(u, t):
        out = u.copy()
        for i in range(hd // 2):
            w = cfg.rope_theta ** (-2 * i / hd)
            a, b = u[i], u[i + hd // 2]
            out[i] = a * math.cos(t * w) - b * math.sin(t * w)
            out[i + hd // 2] = a * math.sin(t * w) + b * math.cos(t * w)
        return out

    def head(W, i, h):
        return W[i * hd:(i + 1) * hd] @ h

    logits = np.zeros((B, T, cfg.Vp))
    counts = np.zeros((cfg.L, cfg.E))
    score_sum = np.zeros((cfg.L, cfg.E))
    for b in range(B):
        x = [P["wte"][idx[b, t]].copy() for t in range(T)]
        for l in range(cfg.L):
            h = [rms(x[t], P["attn_norm"][l]) for t in range(T)]
            q = [[rope(head(P["wq"][l], i, h[t]), t) for i in range(cfg.NH)] for t in range(T)]
            k = [[rope(head(P["wk"][l], j, h[t]), t) for j in range(cfg.NKV)] for t in range(T)]
            v = [[head(P["wv"][l], j, h[t]) for j in range(cfg.NKV)] for t in range(T)]
            for t in range(T):
                o = []
                for i in range(cfg.NH):
                    kv = i // (cfg.NH // cfg.NKV)
                    s = np.array([q[t][i] @ k[u][kv] / math.sqrt(hd) for u in range(t + 1)])
                    a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    o.append(sum(a[u] * v[u][kv] for u in range(t + 1)))
                x[t] = x[t] + P["wo"][l] @ np.concatenate(o)
            pool = l // (cfg.L // cfg.G)
            for t in range(T):
                h = rms(x[t], P["ffn_norm"][l])
                z = P["router"][l] @ h
                ranked = np.zeros(cfg.E)
                if cfg.router == 0:
                    score = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                elif cfg.router == 1:
                    score = (P["router_scale"][l] * cfg.router_c
                             * np.maximum(z / (np.linalg.norm(z) + cfg.router_eps), 0))
                else:
                    score, ranked = 1 / (1 + np.exp(-z)), bias[l]
                chosen = sorted(range(cfg.E), key=lambda j: (-(score[j] + ranked[j]), j))[:cfg.K]
                gate = score
                if cfg.router == 2 and cfg.K > 1:
                    gate = score / (sum(score[j] for j in chosen) + 1e-20)
                y = np.zeros(cfg.C)
                for j in chosen:
                    fc1, fc2 = P["expert_fc1"][pool * cfg.E + j], P["expert_fc2"][pool * cfg.E + j]
                    g, up = fc1[:cfg.F] @ h, fc1[cfg.F:] @ h
                    y += gate[j] * (fc2 @ (g / (1 + np.exp(-g)) * up))
                    counts[l, j] += 1
                score_sum[l] += score
                x[t] = x[t] + y
        for t in range(T):
            logits[b, t] = P["lm_head"] @ rms(x[t], P["final_norm"])
    lv = logits[..., :cfg.V]
    lse = np.log(np.exp(lv - lv.max(-1, keepdims=True)).sum(-1)) + lv.max(-1)
    ce = np.mean(lse - np.take_along_axis(lv, targets[..., None], -1)[..., 0])
    f, Pm = counts / (cfg.K * N), score_sum / N
    Lg = cfg.L // cfg.G
    if cfg.aux == 0 or (cfg.aux == 2 and prev_f is None):
        aux = 0.0
    elif cfg.aux == 1:
        aux = sum(cfg.alpha * cfg.E * np.sum(f[l] * Pm[l]) for l in range(cfg.L))
    else:
        f_src = f if cfg.aux == 3 else prev_f
        pools = [slice(g * Lg, (g + 1) * Lg) for g in range(cfg.G)]
        aux = sum(cfg.alpha * cfg.E * np.sum(f_src[s].mean(0) * Pm[s].mean(0)) for s in pools)
    return logits, ce, aux


# Configurations that exercise every router / aux / pool combination.
VARIANTS = [
    dict(router=0, aux=1, G=2, E=4, K=1),
    dict(router=0, aux=2, G=1, E=4, K=2),
    dict(router=0, aux=3, G=1, E=5, K=2),
    dict(router=1, aux=1, G=2, E=4, K=1),
    dict(router=1, aux=2, G=1, E=6, K=1),
    dict(router=1, aux=3, G=1, E=6, K=2, NKV=1),
    dict(router=2, aux=0, G=2, E=4, K=1),
    dict(router=2, aux=0, G=1, E=6, K=2),
]


class ForwardTest(unittest.TestCase):

    def test_matches_naive_transcription(self):
        for n, variant in enumerate(VARIANTS):
            with self.subTest(**variant):
                cfg = tiny_config(L=4 if variant["G"] == 2 else 2, **variant)
                model = random_model(cfg, seed=n)
                idx, targets = random_batch(cfg, 2, 5, seed=100 + n)
                prev_f = None
                if cfg.aux == 2:   # a previous training micro-batch sets the statistic
                    model(*random_batch(cfg, 2, 5, seed=200 + n), train=True)
                    prev_f = model.prev_f.numpy()
                out = model(idx, targets)
                logits, ce, aux = naive_forward(cfg, model, idx.numpy(), targets.numpy(), prev_f)
                np.testing.assert_allclose(out.logits.detach().numpy(), logits, rtol=0, atol=1e-12)
                self.assertAlmostEqual(float(out.ce), ce, delta=1e-12)
                self.assertAlmostEqual(float(out.aux), aux, delta=1e-14)
                self.assertEqual(aux > 0, cfg.aux != 0)
                if cfg.router == 2:   # the bias of random_model takes part
                    moved = [not torch.equal(r.chosen.sort(dim=-1).values,
                                             r.scores.topk(cfg.K).indices.sort(dim=-1).values)
                             for r in out.routing]
                    self.assertTrue(any(moved), "the bias moves no choice")

    def test_ties_go_to_the_lower_index(self):
        """Zero router weights: softmax scores tie at 1/E, so every token picks experts 0..K-1;
        aux = 1 is then exactly alpha per layer."""
        cfg = tiny_config(E=4, K=2, L=2, G=2, alpha=float(np.float32(1e-2)))
        model = random_model(cfg, seed=1)
        with torch.no_grad():
            model.router.zero_()
        out = model(*random_batch(cfg, 2, 4, seed=2))
        for r in out.routing:
            self.assertTrue(torch.equal(r.chosen, torch.tensor([[0, 1]]).expand(8, 2)))
        self.assertEqual(float(out.aux), cfg.L * cfg.alpha)

    def test_pool_loss_with_one_layer_per_pool_is_the_layer_loss(self):
        for router in (0, 1):
            cfg1 = tiny_config(L=2, G=2, E=4, K=2, router=router, aux=1)
            cfg3 = tiny_config(L=2, G=2, E=4, K=2, router=router, aux=3)
            m1, m3 = random_model(cfg1, seed=3), random_model(cfg3, seed=3)
            batch = random_batch(cfg1, 2, 6, seed=4)
            a1, a3 = m1(*batch).aux, m3(*batch).aux
            self.assertAlmostEqual(float(a1), float(a3), delta=1e-15)

    def test_stale_aux_state(self):
        cfg = tiny_config(L=2, G=1, E=4, K=1, router=1, aux=2)
        model = random_model(cfg, seed=5)
        batch_a, batch_b = random_batch(cfg, 2, 6, seed=6), random_batch(cfg, 2, 6, seed=7)
        self.assertEqual(float(model(*batch_a).aux), 0.0)          # no previous: no pool loss
        self.assertIsNone(model.prev_f)                            # evaluation keeps the state
        self.assertEqual(float(model(*batch_a, train=True).aux), 0.0)
        f_a = model.prev_f.clone()
        model(*batch_b)                                            # evaluation pass
        self.assertTrue(torch.equal(model.prev_f, f_a))
        # on the same batch and weights the stale loss equals the current-counts loss
        stale = model(*batch_a).aux
        cfg3 = tiny_config(L=2, G=1, E=4, K=1, router=1, aux=3)
        model3 = UniPool(cfg3, dtype=torch.float64)
        load_params(model3, flatten_params(model))
        self.assertGreater(float(stale), 0.0)
        self.assertAlmostEqual(float(stale), float(model3(*batch_a).aux), delta=1e-15)

    def test_float32_agrees_with_float64(self):
        cfg = tiny_config(router=1, aux=3, E=6, K=2)
        m64 = random_model(cfg, seed=8)
        m32 = UniPool(cfg, dtype=torch.float32)
        load_params(m32, flatten_params(m64).float())
        batch = random_batch(cfg, 2, 6, seed=9)
        o64, o32 = m64(*batch), m32(*batch)
        np.testing.assert_allclose(o32.logits.detach().numpy(), o64.logits.detach().numpy(),
                                   atol=1e-5)
        self.assertAlmostEqual(float(o32.ce), float(o64.ce), delta=1e-5)


class GradientTest(unittest.TestCase):

    def test_autograd_matches_finite_differences(self):
        h = 1e-6
        for n, variant in enumerate(VARIANTS):
            with self.subTest(**variant):
                cfg = tiny_config(L=4 if variant["G"] == 2 else 2, **variant)
                model = random_model(cfg, seed=10 + n)
                if cfg.aux == 2:
                    model(*random_batch(cfg, 2, 5, seed=30 + n), train=True)
                batch = random_batch(cfg, 2, 5, seed=20 + n)

                def loss():
                    out = model(*batch)
                    return float(out.ce + out.aux), [r.chosen for r in out.routing]

                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                out = model(*batch)
                (out.ce + out.aux).backward()
                _, chosen = loss()
                gen = torch.Generator().manual_seed(n)
                for name, p in model.ordered_params():
                    if name == "router_scale" and cfg.router != 1:
                        self.assertEqual(float(p.grad.abs().max()), 0.0)
                        continue
                    flat, grad = p.data.view(-1), p.grad.view(-1)
                    coords = [int(grad.abs().argmax())]   # the largest and two random entries
                    coords += torch.randint(0, flat.numel(), (2,), generator=gen).tolist()
                    for i in coords:
                        saved = float(flat[i])
                        flat[i] = saved + h
                        up, chosen_up = loss()
                        flat[i] = saved - h
                        down, chosen_down = loss()
                        flat[i] = saved
                        for c, cu, cd in zip(chosen, chosen_up, chosen_down):
                            self.assertTrue(torch.equal(c, cu) and torch.equal(c, cd),
                                            "routing flipped")
                        fd = (up - down) / (2 * h)
                        self.assertAlmostEqual(fd, float(grad[i]), delta=1e-7 + 1e-6 * abs(fd),
                                               msg=f"{name}[{i}]")
                    self.assertGreater(float(grad.abs().max()), 0, name)


class SigmoidRouterTest(unittest.TestCase):

    def test_bias_moves_the_choice_not_the_gate(self):
        """A bias of 10 on experts 1 and 3 makes every token choose them, ahead of any sigmoid
        (scores are < 1); the gates stay the un-biased sigmoids (K = 1), normalised over the
        chosen pair (K = 2)."""
        for K, favoured in ((1, [3]), (2, [3, 1])):
            with self.subTest(K=K):
                cfg = tiny_config(router=2, aux=0, E=4, K=K)
                model = random_model(cfg, seed=60)
                model.expert_bias = torch.zeros(cfg.L, cfg.E)
                model.expert_bias[0, favoured] = torch.tensor([10.0, 9.0])[:K]
                h = torch.randn(7, cfg.C, generator=torch.Generator().manual_seed(61),
                                dtype=torch.float64)
                w = model.slices()
                gates, r = model.route(w, 0, h)
                s = torch.sigmoid(h @ model.router[0].T).detach()
                self.assertTrue(torch.equal(r.chosen, torch.tensor([favoured]).expand(7, K)))
                self.assertTrue(torch.equal(r.scores, s))
                self.assertTrue(torch.equal(r.ranked, s + model.expert_bias[0].double()))
                expected = s[:, favoured] / (s[:, favoured].sum(-1, keepdim=True) + 1e-20) \
                    if K > 1 else s[:, favoured]
                self.assertTrue(torch.equal(gates[:, favoured].detach(), expected))
                self.assertLess(float(expected.max()), 1.0)
                _, r1 = model.route(w, 1, h)   # layer 1 has no bias: its own top-K
                self.assertTrue(torch.equal(r1.chosen, top_k_lower_index(r1.scores, K)))

    def test_bias_update_hand_computed(self):
        """bias += rate * sign(mean - count) in float32, counts given: layer 0 has mean 16/4 = 4
        (experts 2 and 3 on it keep their bias), layer 1 mean 12/4 = 3 (expert 3 keeps it).
        0.1 + 0.2 rounds to float32(0.3); float64 would keep 0.30000000447."""
        cfg = tiny_config(router=2, aux=0, E=4, bias_rate=0.2)
        model = UniPool(cfg, dtype=torch.float64)
        model.expert_bias = torch.tensor([[0.1, 0.0, 0.0, -0.1],
                                          [0.1, 0.1, 0.1, 0.1]], dtype=torch.float32)
        model.expert_counts = torch.tensor([[5, 3, 4, 4],
                                            [0, 7, 2, 3]])
        update_expert_bias(model)
        expected = torch.tensor([[-0.1, 0.2, 0.0, -0.1],
                                 [0.3, -0.1, 0.3, 0.1]], dtype=torch.float32)
        self.assertEqual(model.expert_bias.dtype, torch.float32)
        self.assertTrue(torch.equal(model.expert_bias, expected), model.expert_bias)
        self.assertTrue(torch.equal(model.expert_counts, torch.zeros(cfg.L, cfg.E,
                                                                     dtype=torch.int64)))

    def test_training_passes_count_and_the_step_updates(self):
        """Counts add up over a step's training micro-batches (K N per layer each), evaluation
        passes add none, and train_step applies the update to them once, after AdamW."""
        cfg = tiny_config(router=2, aux=0, E=4, K=2, bias_rate=1e-3)
        model = random_model(cfg, seed=62)
        batches = [random_batch(cfg, 2, 5, seed=63 + m) for m in range(2)]
        model(*batches[0])
        self.assertEqual(int(model.expert_counts.abs().sum()), 0)
        expected = torch.zeros(cfg.L, cfg.E, dtype=torch.int64)
        for batch in batches:
            out = model(*batch, train=True)
            for l, r in enumerate(out.routing):
                expected[l] += torch.bincount(r.chosen.reshape(-1), minlength=cfg.E)
        self.assertTrue(torch.equal(model.expert_counts, expected))
        self.assertTrue(torch.equal(expected.sum(dim=1), torch.full((cfg.L,), 2 * cfg.K * 10)))

        bias_before = model.expert_bias.clone()
        model.expert_counts.zero_()
        opt = AdamW(model, lr=0.01, b1=0.9, b2=0.95, eps=1e-6, wd=0.0)
        train_step(model, opt, batches, grad_clip=0.0)
        step = torch.sign(expected.sum(dim=1, keepdim=True) / cfg.E - expected).float()
        self.assertTrue(torch.equal(model.expert_bias,
                                    bias_before + torch.tensor(1e-3, dtype=torch.float32) * step))
        self.assertEqual(int(model.expert_counts.abs().sum()), 0)

    def test_validate_refuses(self):
        for changes in (dict(router=2, aux=1), dict(router=2, aux=2), dict(router=2, aux=0,
                                                                           bias_rate=-1e-3),
                        dict(router=3, aux=0)):
            with self.subTest(**changes):
                with self.assertRaises(AssertionError):
                    tiny_config(**changes).validate()
        tiny_config(router=2, aux=0, bias_rate=1e-3).validate()


class TrainingTest(unittest.TestCase):

    def test_flat_buffer_layout(self):
        cfg = tiny_config(G=2, L=4, E=3)
        names = [name for name, _ in PARAM_TABLE]
        self.assertEqual(names, ["wte", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm",
                                 "router", "router_scale", "expert_fc1", "expert_fc2",
                                 "final_norm", "lm_head"])
        self.assertEqual(dict(param_shapes(cfg))["expert_fc1"], (6, 12, 16))
        model = UniPool(cfg, dtype=torch.float64)
        flat = torch.arange(num_params(cfg), dtype=torch.float64)
        load_params(model, flat)
        self.assertTrue(torch.equal(flatten_params(model), flat))
        self.assertEqual(float(model.wq[0, 0, 1]), cfg.Vp * cfg.C + cfg.L * cfg.C + 1)

    def test_clipping_rule(self):
        cfg = tiny_config()
        model = random_model(cfg, seed=11)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        norm = 0.5 * math.sqrt(num_params(cfg))
        self.assertEqual(clip_grads(model, 0.0), (norm, False))
        self.assertEqual(clip_grads(model, 2 * norm), (norm, False))
        got, clipped = clip_grads(model, norm / 4)
        self.assertTrue(clipped)
        self.assertAlmostEqual(got, norm, delta=1e-12)
        expected = 0.5 * (norm / 4) / (norm + 1e-6)
        np.testing.assert_allclose(flatten_grads(model).numpy(), expected, rtol=1e-15)

    def test_adamw_matches_torch(self):
        cfg = tiny_config(router=1, aux=2, E=4, K=2)
        ours, ref = random_model(cfg, seed=12), random_model(cfg, seed=12)
        opt = AdamW(ours, lr=0.05, b1=0.9, b2=0.95, eps=1e-6, wd=0.1)
        params = ref.ordered_params()
        torch_opt = torch.optim.AdamW(
            [{"params": [p for n, p in params if n in DECAYED], "weight_decay": 0.1},
             {"params": [p for n, p in params if n not in DECAYED], "weight_decay": 0.0}],
            lr=0.05, betas=(0.9, 0.95), eps=1e-6)
        for step in range(3):
            batch = random_batch(cfg, 2, 5, seed=40 + step)
            res = train_step(ours, opt, [batch], grad_clip=0.5)
            self.assertTrue(res.clipped)
            torch_opt.zero_grad(set_to_none=False)
            out = ref(*batch, train=True)
            (out.ce + out.aux).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            torch_opt.step()
            self.assertLess(float((flatten_params(ours) - flatten_params(ref)).abs().max()), 1e-12)

    def test_train_step_reports_means(self):
        cfg = tiny_config(router=1, aux=2, E=4, K=1)
        model = random_model(cfg, seed=13)
        opt = AdamW(model, lr=0.01, b1=0.9, b2=0.95, eps=1e-6, wd=0.0)
        batches = [random_batch(cfg, 2, 5, seed=50 + m) for m in range(2)]
        res = train_step(model, opt, batches, grad_clip=0.0)
        self.assertEqual(float(res.outputs[0].aux), 0.0)
        self.assertGreater(float(res.outputs[1].aux), 0.0)
        self.assertAlmostEqual(res.aux, float(res.outputs[1].aux) / 2, delta=1e-15)
        mean_ce = float(res.outputs[0].ce + res.outputs[1].ce) / 2
        self.assertAlmostEqual(res.ce, mean_ce, delta=1e-15)


class DumpReplayTest(unittest.TestCase):
    """The model in float32 reproduces the float64 dumps: routing never flips, and the errors
    stay at the float32 level (final parameters: within 2% of lr, see SPEC section 6)."""

    def test_float32_replay(self):
        paths = sorted(glob.glob(os.path.join(DEFAULT_OUT, "*.bin")))
        self.assertTrue(paths, "no dumps")
        for path in paths:
            with self.subTest(os.path.basename(path)):
                d = load_dump(path)
                h = d["header"]
                cfg = config_from(h, d["hparams"])
                tokens = d["tokens"].reshape(h["n_steps"], h["n_micro"], h["B"], h["T"] + 1)
                got, _ = run_training(cfg, d["hparams"], d["params"], tokens, dtype=torch.float32)

                def max_error(key):
                    return np.abs(got[key] - d[key]).max() / np.abs(d[key]).max()

                self.assertLess(max_error("logits"), 5e-6)
                self.assertLess(max_error("grads"), 1e-5)
                np.testing.assert_allclose(got["stats"], d["stats"], rtol=5e-5)
                self.assertLess(np.abs(got["final"] - d["final"]).max(), 0.02 * d["hparams"]["lr"])
                self.assertEqual("bias" in got, "bias" in d)
                if "bias" in d:   # float32 steps decided by integer counts: exact
                    np.testing.assert_array_equal(got["bias"].astype(np.float32), d["bias"])


if __name__ == "__main__":
    unittest.main()
