"""PyTorch reference of the UniPool model (dev/SPEC.md, sections 1-5).

A Mixture-of-Experts transformer whose L layers route into G expert pools of
E experts each; layer l uses pool l // (L // G). G = L is a vanilla MoE, G = 1
is UniPool (one pool shared by all layers). Written for clarity, in any float
dtype: float64 for the reference dumps, float32 for benchmarks and checkpoint
conversion. The backward pass is autograd's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Config:
    """Model hyperparameters, SPEC section 1."""
    V: int             # vocabulary size
    Vp: int            # padded vocabulary, Vp >= V
    maxT: int          # longest sequence
    L: int             # layers, every one an MoE layer
    C: int             # channels
    NH: int            # query heads
    NKV: int           # key/value heads (GQA)
    F: int             # expert hidden size (SwiGLU)
    G: int             # expert pools
    E: int             # experts per pool
    K: int             # experts chosen per token
    router: int = 0    # 0 softmax router, 1 NormRouter, 2 sigmoid router with expert bias
    aux: int = 0       # 0 none, 1 per layer, 2 pool/previous counts, 3 pool/current counts
    alpha: float = 1e-2
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    router_c: float = 1.0
    router_eps: float = 1e-8
    bias_rate: float = 0.0   # sigmoid router: expert-bias step per training step

    @property
    def hd(self):
        """Head size."""
        return self.C // self.NH

    def validate(self):
        """The SPEC's divisibility and range constraints; the sigmoid router balances through
        its bias and runs without an aux loss."""
        assert self.Vp >= self.V and self.C % self.NH == 0 and self.hd % 2 == 0
        assert self.NH % self.NKV == 0 and self.L % self.G == 0
        assert 1 <= self.K <= self.E and self.router in (0, 1, 2) and self.aux in (0, 1, 2, 3)
        assert self.router != 2 or self.aux == 0, "the sigmoid router runs with aux = 0"
        assert self.bias_rate >= 0, "bias_rate must be >= 0"


# The parameter tensors in buffer order, SPEC section 2. Linear maps are (out, in).
PARAM_TABLE = [
    ("wte",          lambda c: (c.Vp, c.C)),
    ("attn_norm",    lambda c: (c.L, c.C)),
    ("wq",           lambda c: (c.L, c.NH * c.hd, c.C)),
    ("wk",           lambda c: (c.L, c.NKV * c.hd, c.C)),
    ("wv",           lambda c: (c.L, c.NKV * c.hd, c.C)),
    ("wo",           lambda c: (c.L, c.C, c.NH * c.hd)),
    ("ffn_norm",     lambda c: (c.L, c.C)),
    ("router",       lambda c: (c.L, c.E, c.C)),
    ("router_scale", lambda c: (c.L,)),
    ("expert_fc1",   lambda c: (c.G * c.E, 2 * c.F, c.C)),  # rows [0,F) gate, [F,2F) up
    ("expert_fc2",   lambda c: (c.G * c.E, c.C, c.F)),
    ("final_norm",   lambda c: (c.C,)),
    ("lm_head",      lambda c: (c.Vp, c.C)),
]

# Tensors that AdamW decays (SPEC section 5); norms and router_scale are not decayed.
DECAYED = {"wte", "wq", "wk", "wv", "wo", "router", "expert_fc1", "expert_fc2", "lm_head"}


def param_shapes(cfg):
    """[(name, shape)] in buffer order."""
    return [(name, shape(cfg)) for name, shape in PARAM_TABLE]


def num_params(cfg):
    """Length of the flat parameter buffer."""
    return sum(math.prod(shape) for _, shape in param_shapes(cfg))


def rmsnorm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_cos_sin(T, hd, theta, dtype):
    """cos and sin of t * w_i, w_i = theta^(-2i/hd), t < T, i < hd/2; shape (T, hd/2)."""
    i = torch.arange(hd // 2, dtype=torch.float64)
    w = theta ** (-2.0 * i / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * w[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rope(u, cos, sin):
    """Non-interleaved ("rotate half") RoPE of u (..., T, hd): the pairs are (i, i + hd/2).

    u[i] <- a cos - b sin, u[i + hd/2] <- a sin + b cos with a = u[i], b = u[i + hd/2].
    """
    a, b = u.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def top_k_lower_index(scores, K):
    """Indices (N, K) of the K largest scores per row; equal scores go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :K]


@dataclass
class LayerRouting:
    """What one layer's router did, detached: for tests and the dump re-draw rule."""
    scores: torch.Tensor     # (N, E) the SPEC's scores: softmax, NormRouter or plain sigmoid
    ranked: torch.Tensor     # (N, E) what the top-K ranks: scores, + bias[l] for the sigmoid router
    chosen: torch.Tensor     # (N, K) chosen experts, best first
    unit: torch.Tensor       # (N, E) z / (||z|| + eps) for the NormRouter, else None


@dataclass
class Output:
    logits: torch.Tensor     # (B, T, Vp)
    ce: torch.Tensor         # mean cross-entropy over the first V logits (None without targets)
    aux: torch.Tensor        # auxiliary load-balancing loss (a scalar, possibly a constant 0)
    routing: list            # [LayerRouting] for each layer


class UniPool(torch.nn.Module):
    """The SPEC model. Parameters are registered in PARAM_TABLE order under their names.

    State beyond the parameters: prev_f, the (L, E) routed fractions f of the
    previous training micro-batch, used by aux = 2 (None until the first one);
    for the sigmoid router, expert_bias, float32 (L, E), and expert_counts, the
    (L, E) counts of the training micro-batches since the last bias update
    (update_expert_bias). Both exist, unused, for the other routers too.
    """

    def __init__(self, cfg, dtype=torch.float32):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        for name, shape in param_shapes(cfg):
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))
        self.prev_f = None
        self.expert_bias = torch.zeros(cfg.L, cfg.E, dtype=torch.float32)
        self.expert_counts = torch.zeros(cfg.L, cfg.E, dtype=torch.int64)

    def ordered_params(self):
        """[(name, parameter)] in buffer order."""
        return [(name, getattr(self, name)) for name, _ in PARAM_TABLE]

    # ---- blocks ---------------------------------------------------------------

    def slices(self):
        """Per-layer and per-expert views of the stacked parameters (name -> tuple of tensors).

        One unbind per forward: indexing a stacked parameter inside the layer loop would make
        autograd write a zero-filled gradient of the whole stack for every use (for the expert
        pool at 182M, 1.8 GB per expert per layer); unbind's backward gathers the slices' own
        gradients, each accumulated over all the layers that used it, into one stack.
        """
        return {name: p.unbind(0) for name, p in self.ordered_params()
                if name not in ("wte", "final_norm", "lm_head")}

    def attention(self, w, l, h):
        """Causal GQA self-attention of layer l on normed input h (B, T, C); w: slices()."""
        cfg = self.cfg
        B, T, _ = h.shape
        hd = cfg.hd
        q = (h @ w["wq"][l].T).view(B, T, cfg.NH, hd).transpose(1, 2)    # (B, NH, T, hd)
        k = (h @ w["wk"][l].T).view(B, T, cfg.NKV, hd).transpose(1, 2)   # (B, NKV, T, hd)
        v = (h @ w["wv"][l].T).view(B, T, cfg.NKV, hd).transpose(1, 2)
        cos, sin = rope_cos_sin(T, hd, cfg.rope_theta, h.dtype)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # query head i reads key/value head i // (NH / NKV)
        k = k.repeat_interleave(cfg.NH // cfg.NKV, dim=1)
        v = v.repeat_interleave(cfg.NH // cfg.NKV, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, cfg.NH * hd)
        return o @ w["wo"][l].T

    def route(self, w, l, h):
        """Router of layer l on normed tokens h (N, C): gates (N, E) with gradient, whose
        chosen entries are the chosen experts' gates, and the routing.

        Softmax and NormRouter: the gates are the scores, and top-K ranks them. Sigmoid
        router: s = sigmoid(z); top-K ranks s + bias[l] (float32 bias, added in the model's
        dtype), and the gate is s_j itself for K = 1, s_j / (sum over chosen of s + 1e-20)
        for K > 1, the normalisation part of the graph.
        """
        cfg = self.cfg
        z = h @ w["router"][l].T
        unit = None
        if cfg.router == 0:
            scores = z.softmax(dim=-1)
        elif cfg.router == 1:
            # NormRouter: sigma * c * relu(z / (||z|| + eps)), gradient through the norm too
            unit = z / (z.norm(dim=-1, keepdim=True) + cfg.router_eps)
            scores = w["router_scale"][l] * cfg.router_c * torch.relu(unit)
        else:
            scores = torch.sigmoid(z)
        ranked = scores.detach()
        if cfg.router == 2:
            ranked = ranked + self.expert_bias[l].to(ranked.dtype)
        chosen = top_k_lower_index(ranked, cfg.K)
        gates = scores
        if cfg.router == 2 and cfg.K > 1:
            gates = scores / (scores.gather(1, chosen).sum(dim=-1, keepdim=True) + 1e-20)
        return gates, LayerRouting(scores.detach(), ranked, chosen,
                                   None if unit is None else unit.detach())

    def experts(self, w, l, h, gates, chosen):
        """sum over chosen j of gate_j * fc2_j(silu(fc1gate_j h) * fc1up_j h), with the experts of
        pool l // (L/G); gates (N, E) is read at the chosen entries only."""
        cfg = self.cfg
        pool = l // (cfg.L // cfg.G)
        y = torch.zeros_like(h)
        for j in range(cfg.E):
            rows = (chosen == j).any(dim=-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e = pool * cfg.E + j
            gate_up = h[rows] @ w["expert_fc1"][e].T                     # (n, 2F)
            hidden = F.silu(gate_up[:, :cfg.F]) * gate_up[:, cfg.F:]
            y = y.index_add(0, rows, gates[rows, j:j + 1] * (hidden @ w["expert_fc2"][e].T))
        return y

    def aux_loss(self, f, P):
        """Load-balancing loss from routed fractions f (L, E, constant) and mean scores P (L, E).

        1: sum_l alpha E sum_j f[l,j] P[l,j]
        3: sum_g alpha E sum_j fbar[g,j] Pbar[g,j], bars = means over the layers of pool g
        2: as 3 with fbar from the previous training micro-batch (0 when there is none)
        """
        cfg = self.cfg
        if cfg.aux == 0 or (cfg.aux == 2 and self.prev_f is None):
            return torch.zeros((), dtype=P.dtype)
        if cfg.aux == 1:
            return cfg.alpha * cfg.E * (f * P).sum()
        f_src = f if cfg.aux == 3 else self.prev_f
        fbar = f_src.view(cfg.G, cfg.L // cfg.G, cfg.E).mean(dim=1)
        Pbar = P.view(cfg.G, cfg.L // cfg.G, cfg.E).mean(dim=1)
        return cfg.alpha * cfg.E * (fbar * Pbar).sum()

    # ---- forward --------------------------------------------------------------

    def forward(self, idx, targets=None, train=False):
        """Run B sequences idx (B, T). train=True makes this micro-batch the 'previous' one
        of aux = 2 and, for the sigmoid router, adds its counts to expert_counts; evaluation
        passes (train=False) leave that state alone."""
        cfg = self.cfg
        B, T = idx.shape
        assert T <= cfg.maxT
        N = B * T
        x = self.wte[idx]
        w = self.slices()
        count_rows, P_rows, routing = [], [], []
        for l in range(cfg.L):
            x = x + self.attention(w, l, rmsnorm(x, w["attn_norm"][l], cfg.norm_eps))
            h = rmsnorm(x, w["ffn_norm"][l], cfg.norm_eps).reshape(N, cfg.C)
            gates, r = self.route(w, l, h)
            x = x + self.experts(w, l, h, gates, r.chosen).view(B, T, cfg.C)
            count_rows.append(F.one_hot(r.chosen, cfg.E).sum(dim=(0, 1)))
            P_rows.append(gates.mean(dim=0))   # the scores: the aux routers' gates
            routing.append(r)
        logits = rmsnorm(x, self.final_norm, cfg.norm_eps) @ self.lm_head.T
        ce = None
        if targets is not None:
            ce = F.cross_entropy(logits[..., :cfg.V].reshape(N, cfg.V), targets.reshape(N))
        counts = torch.stack(count_rows)
        f = counts.to(x.dtype) / (cfg.K * N)
        aux = self.aux_loss(f, torch.stack(P_rows))
        if train:
            self.prev_f = f
            if cfg.router == 2:
                self.expert_counts += counts
        return Output(logits, ce, aux, routing)


# ---- flat buffers -----------------------------------------------------------

def flatten_params(model):
    """All parameters as one 1-D tensor in buffer order."""
    return torch.cat([p.detach().reshape(-1) for _, p in model.ordered_params()])


def flatten_grads(model):
    """All gradients as one 1-D tensor in buffer order (zeros where there is none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for _, p in model.ordered_params()])


def load_params(model, flat):
    """Copy a 1-D buffer (any float dtype, e.g. the C model's float32 one) into the parameters."""
    flat = torch.as_tensor(flat)
    assert flat.numel() == num_params(model.cfg), "buffer size does not match the config"
    offset = 0
    with torch.no_grad():
        for _, p in model.ordered_params():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


# ---- training -----------------------------------------------------------------

class AdamW:
    """AdamW with PyTorch's semantics (SPEC section 5), step counter t from 1.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p *= 1 - lr wd (DECAYED tensors only);
    p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    """

    def __init__(self, model, lr, b1, b2, eps, wd):
        self.model, self.lr, self.b1, self.b2, self.eps, self.wd = model, lr, b1, b2, eps, wd
        self.t = 0
        self.m = {name: torch.zeros_like(p) for name, p in model.ordered_params()}
        self.v = {name: torch.zeros_like(p) for name, p in model.ordered_params()}

    @torch.no_grad()
    def step(self):
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for name, p in self.model.ordered_params():
            g, m, v = p.grad, self.m[name], self.v[name]
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            if name in DECAYED:
                p.mul_(1 - self.lr * self.wd)
            p.sub_(self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))


def accumulate_grads(model, micro_batches):
    """Set p.grad to the gradient of sum over micro-batches of (CE + aux) / n_micro.
    Returns the [Output] of each micro-batch (run with train=True, in order)."""
    n = len(micro_batches)
    for _, p in model.ordered_params():
        p.grad = torch.zeros_like(p)
    outputs = []
    for idx, targets in micro_batches:
        out = model(idx, targets, train=True)
        ((out.ce + out.aux) / n).backward()
        outputs.append(out)
    return outputs


def clip_grads(model, grad_clip):
    """Global L2 norm of the gradient; if grad_clip > 0 and scale = grad_clip / (norm + 1e-6)
    is < 1, multiply every gradient by scale. Returns (norm before clipping, clipped)."""
    grads = [p.grad for _, p in model.ordered_params()]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    scale = grad_clip / (norm + 1e-6)
    if grad_clip > 0 and scale < 1:
        for g in grads:
            g.mul_(scale)
        return norm, True
    return norm, False


@dataclass
class StepResult:
    ce: float          # mean CE over the micro-batches
    aux: float         # mean aux over the micro-batches
    norm: float        # global gradient L2 norm before clipping
    clipped: bool      # whether clipping scaled the gradient
    outputs: list      # [Output] of each micro-batch


@torch.no_grad()
def update_expert_bias(model):
    """The sigmoid router's once-per-step bias update, after AdamW (SPEC section 3), from the
    counts of the step's training micro-batches; resets the counts.

    bias[l][j] += bias_rate * sign(mean_j' count[l][j'] - count[l][j]), sign(0) = 0, in
    float32: mean = float32(sum_j' count[l][j']) / float32(E), the add rounded to float32.
    Under-used experts gain bias, over-used ones lose it, a count on the mean keeps it.
    """
    counts = model.expert_counts.to(torch.float32)            # exact: counts < 2^24
    total = model.expert_counts.sum(dim=1, keepdim=True).to(torch.float32)
    mean = total / torch.tensor(model.cfg.E, dtype=torch.float32)
    rate = torch.tensor(model.cfg.bias_rate, dtype=torch.float32)
    model.expert_bias += rate * torch.sign(mean - counts)
    model.expert_counts.zero_()


def train_step(model, opt, micro_batches, grad_clip):
    """One training step (SPEC section 5) over [(inputs, targets)]: accumulate, clip, AdamW,
    and for the sigmoid router the bias update."""
    outputs = accumulate_grads(model, micro_batches)
    norm, clipped = clip_grads(model, grad_clip)
    opt.step()
    if model.cfg.router == 2:
        update_expert_bias(model)
    n = len(outputs)
    return StepResult(ce=sum(float(o.ce) for o in outputs) / n,
                      aux=sum(float(o.aux) for o in outputs) / n,
                      norm=norm, clipped=clipped, outputs=outputs)
