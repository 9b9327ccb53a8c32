#!/usr/bin/env python3
"""Proves the tests can fail: plants one deliberate bug at a time in a copy of
train_unipool.c, builds test_unipool against it and expects it to report a
failure (exit 1). A mutant that passes is a hole in the tests. The bugs in
data parallelism (MPI_MUTANTS) are held to dev/test_mpi.py instead, on one
model (its unipool arm), with both programs built from the mutated copy;
without mpicc they are skipped, unless UNIPOOL_REQUIRE_MPI=1 (CI).

    python3 dev/mutants.py            # all mutants, from the repository root
    python3 dev/mutants.py rope       # only those whose name contains "rope"

Standard library only. Each mutant is one exact text replacement that must
occur exactly once, so a refactor that moves the code fails loudly here
instead of silently testing nothing.
"""
import os
import shutil
import subprocess
import sys
import tempfile

# (name, text in train_unipool.c, replacement)
MUTANTS = [
    # (A shift of every position by one is invisible: RoPE scores depend on t - s only.)
    ("rope frequency index off by one",
     "double ang = t * pow((double)theta, -2.0 * i / hd);",
     "double ang = t * pow((double)theta, -2.0 * (i + 1) / hd);"),
    ("kv cache: rope ignores the position offset",
     "cosv + (size_t)(pos0 + n % T) * h2,\n                    *sn = sinv + (size_t)(pos0 + n % T) * h2",
     "cosv + (size_t)(n % T) * h2,\n                    *sn = sinv + (size_t)(n % T) * h2"),
    ("kv cache: attention reads only the new positions",
     "att_copy(vb, lv, v + (size_t)b * nkeys * ks + kh * hd, ks, nkeys, hd);",
     "att_copy(vb, lv, v + (size_t)b * nkeys * ks + (size_t)t0 * ks + kh * hd, ks, nkeys - t0, hd);"),
    ("attention backward: dQ from V instead of K",
     "att_copy(kb, lv, k + ko, ks, T, hd);",
     "att_copy(kb, lv, v + ko, ks, T, hd);"),
    ("attention probabilities not normalised",
     "for (int j = 0; j < n; j++) p[j] *= inv;",
     "for (int j = 0; j < n; j++) p[j] *= 1.0f;"),
    ("rope sin sign flipped",
     "u[i] = a * cs[i] - b * s;",
     "u[i] = a * cs[i] + b * s;"),
    ("rope interleaved pairs instead of halves",
     "float a = u[i], b = u[i + h2], s = dir * sn[i];\n                u[i] = a * cs[i] - b * s;\n                u[i + h2] = a * s + b * cs[i];",
     "float a = u[2 * i], b = u[2 * i + 1], s = dir * sn[i];\n                u[2 * i] = a * cs[i] - b * s;\n                u[2 * i + 1] = a * s + b * cs[i];"),
    ("transposed wq",
     "matmul_forward(l_q, l_ln1, w.wq, N, C, Q);",
     "matmul_forward_naive_t(l_q, l_ln1, w.wq, N, C, Q);"),
    ("gqa heads mapped modulo",
     "for (int h = kh * grp; h < (kh + 1) * grp; h++)\n                    for (int q0 = 0; q0 < T; q0 += ATT_QB) {\n                        // keys the block's last query sees\n                        int m = T - q0 < ATT_QB ? T - q0 : ATT_QB, n = t0 + q0 + m;",
     "for (int h = kh; h < NH; h += NKV)\n                    for (int q0 = 0; q0 < T; q0 += ATT_QB) {\n                        // keys the block's last query sees\n                        int m = T - q0 < ATT_QB ? T - q0 : ATT_QB, n = t0 + q0 + m;"),
    ("attention not causal by one",
     "j <= pos + r ? s[(size_t)r * ld + j] * scale : -INFINITY;",
     "j <= pos + r + 1 ? s[(size_t)r * ld + j] * scale : -INFINITY;"),
    ("threads beside other processes: the cores they took truncated, not rounded",
     "int n = most - (int)lround(others);",
     "int n = most - (int)others;"),
    ("padded vocabulary: a block too many",
     "static int padded_vocab(int V) { return (V + 1023) / 1024 * 1024; }",
     "static int padded_vocab(int V) { return (V + 1024) / 1024 * 1024; }"),
    ("training FLOPs: experts counted once whatever K",
     ".experts = L * 6.0 * c->K * 3.0 * c->F * C",
     ".experts = L * 6.0 * 3.0 * c->F * C"),
    ("training FLOPs: causal attention's scores counted at half",
     "+ 6.0 * T * C),",
     "+ 3.0 * T * C),"),
    ("rmsnorm without eps",
     "float r = 1.0f / sqrtf(dot(x, x, C) / C + eps);",
     "float r = 1.0f / sqrtf(dot(x, x, C) / C + 0.0f * eps);"),
    ("aux gradient missing",
     "dscore[(size_t)n * E + j] = coef[j] * scale / N_all;",
     "dscore[(size_t)n * E + j] = 0.0f;"),
    ("aux without the factor E",
     "float coef = active ? (float)(c->alpha * E * fbar / group) : 0.0f;",
     "float coef = active ? (float)(c->alpha * fbar / group) : 0.0f;"),
    ("pool aux on current counts instead of stale",
     "const float *f = c->aux == AUX_POOL_PREV ? m->aux_prev_f : m->aux_f;",
     "const float *f = m->aux_f;"),
    ("stale statistic advanced by evaluation",
     "if (training) aux_keep_statistic(m);",
     "if (1) aux_keep_statistic(m);"),
    ("pool loss grouped per layer",
     "int L = c->L, E = c->E, group = c->aux == AUX_LAYER ? 1 : L / c->G;",
     "int L = c->L, E = c->E, group = 1;"),
    ("pool index by modulo",
     "return (size_t)(l / (c->L / c->G)) * c->E;",
     "return (size_t)(l % c->G) * c->E;"),
    ("sigmoid router: the bias ignored in the choice",
     "float v = bias ? s[j] + bias[j] : s[j];",
     "float v = s[j];"),
    ("sigmoid router: the bias added to the gate",
     "topk_forward(l_chosen, l_score, l_bias, N, E, K);",
     "topk_forward(l_chosen, l_score, l_bias, N, E, K);\n"
     "        for (size_t n = 0; l_bias && n < N; n++) l_score[n * E + l_chosen[n * K]] += l_bias[l_chosen[n * K]];"),
    ("sigmoid router: top-K gates not renormalised",
     "if (c->router == ROUTER_SIGMOID && K > 1) router_gates(l_score, l_chosen, N, E, K);",
     "(void)router_gates;"),
    ("sigmoid router: renormalisation left out of the backward",
     "for (int k = 0; k < K; k++) d[ch[k]] = (ds[ch[k]] - dgg) / (sum + 1e-20f);",
     "for (int k = 0; k < K; k++) d[ch[k]] = ds[ch[k]];"),
    ("sigmoid router: bias moves with the sign flipped",
     "m->expert_bias[l * c->E + j] += c->bias_rate * (float)((d > 0.0f) - (d < 0.0f));",
     "m->expert_bias[l * c->E + j] -= c->bias_rate * (float)((d > 0.0f) - (d < 0.0f));"),
    ("sigmoid router: a tie moves the bias up",
     "m->expert_bias[l * c->E + j] += c->bias_rate * (float)((d > 0.0f) - (d < 0.0f));",
     "m->expert_bias[l * c->E + j] += c->bias_rate * (float)((d >= 0.0f) - (d < 0.0f));"),
    ("sigmoid router: counts not reset after an update",
     "            cnt[j] = 0;\n",
     ""),
    ("sigmoid router: evaluation passes counted",
     "if (training) aux_keep_statistic(m);",
     "if (training || c->router == ROUTER_SIGMOID) aux_keep_statistic(m);"),
    ("norm router norm detached",
     "float corr = r > 0.0f ? duz / (r * re * re) : 0.0f;",
     "float corr = 0.0f * duz;"),
    ("norm router sigma gradient dropped",
     "*dsigma += (float)dsig;",
     "*dsigma += 0.0f * (float)dsig;"),
    ("gates renormalised over the chosen experts",
     "axpy(yn, score[(size_t)n * E + chosen[a]], eout + (size_t)d->slot[a] * C, C);",
     "axpy(yn, score[(size_t)n * E + chosen[a]] / gate_sum(score + (size_t)n * E, chosen + (size_t)n * K, K), eout + (size_t)d->slot[a] * C, C);"),
    ("top-k ties to the higher index",
     "if (!taken && (best < 0 || v > bv)) best = j, bv = v;",
     "if (!taken && (best < 0 || v >= bv)) best = j, bv = v;"),
    ("swiglu gate and up swapped",
     "for (int i = 0; i < F; i++) o[i] = a[i] * sigmoid(a[i]) * b[i];",
     "for (int i = 0; i < F; i++) o[i] = b[i] * sigmoid(b[i]) * a[i];"),
    ("cross-entropy over the padded vocabulary",
     "float mx = max_of(lg, V);\n        lse[n] = mx + (float)log(sum_exp(NULL, lg, V, mx));",
     "float mx = max_of(lg, Vp);\n        lse[n] = mx + (float)log(sum_exp(NULL, lg, Vp, mx));"),
    ("exp polynomial two terms short",
     "p = p * r + 8.3334519073e-3f;",
     "p = p * 0.0f + 8.3334519073e-3f;"),
    ("micro-batch gradient not averaged",
     "model_backward(m, 1.0f / n_micro);",
     "model_backward(m, 1.0f);"),
    ("clipping never applied",
     "adamw_update(m, o, lr, s < 1.0f ? s : 1.0f);",
     "adamw_update(m, o, lr, 1.0f);"),
    ("gradient norm drops a partial sum",
     "part[ch] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));",
     "part[ch] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + s[6]);"),
    ("in-place A rows read from depth 0 in every block",
     "A.p + (size_t)(r0 + (ii < mr ? ii : mr - 1)) * A.rs + k0;",
     "A.p + (size_t)(r0 + (ii < mr ? ii : mr - 1)) * A.rs;"),
    ("experts with many rows skipped",
     "if (offset[by_size[i] + 1] - offset[by_size[i]] > share)\n            expert_matmul(",
     "if (offset[by_size[i] + 1] - offset[by_size[i]] > offset[E])\n            expert_matmul("),
    ("weight decay on every tensor",
     "float decay = param_decay[i] ? 1.0f - lr * o->wd : 1.0f;",
     "float decay = 1.0f - lr * o->wd;"),
    ("weight decay never applied",
     "float decay = param_decay[i] ? 1.0f - lr * o->wd : 1.0f;",
     "float decay = 1.0f + 0.0f * param_decay[i] * lr * o->wd;"),
    ("adam without bias correction",
     "float bc1 = 1.0f - (float)pow(o->b1, m->adam_t), bc2",
     "float bc1 = 1.0f, bc2"),
    ("gemm packing drops the last row of a panel",
     "                    dst[i * panel_stride(kc, width) + (size_t)k * width + w] =\n                        r < rows ?",
     "                    dst[i * panel_stride(kc, width) + (size_t)k * width + w] =\n                        r < rows - 1 ?"),
    ("gemm reads packed B panels at the unpadded stride",
     "bp + (j - inplace) * panel_stride(kc, GM_NR);",
     "bp + (size_t)(j - inplace) * kc * GM_NR;"),
    ("gemm transposed packing misplaces a row",
     "for (int w = 0; w < n; w++) d[w] = col[r0 + w];",
     "for (int w = 0; w < n; w++) d[w] = col[r0 + (w + 1) % n];"),
    ("gemm reads an in-place B panel one column off",
     "const float *b = j < inplace ? B.p + (size_t)k0 * B.rs + c0\n",
     "const float *b = j < inplace ? B.p + (size_t)k0 * B.rs + c0 + 1\n"),
    ("small-M forward writes out untransposed",
     "gemm(out, 1, (size_t)n_out, (Mat){w, (size_t)n_in, 1}, (Mat){inp, 1, (size_t)n_in}, NULL,",
     "gemm(out, (size_t)rows, 1, (Mat){w, (size_t)n_in, 1}, (Mat){inp, 1, (size_t)n_in}, NULL,"),
    ("gemm accumulates over a block of its depth only",
     "int kc = depth - k0 < kcb ? depth - k0 : kcb, accumulate = add || k0 > 0;",
     "int kc = depth - k0 < kcb ? depth - k0 : kcb, accumulate = add;"),
    ("a transposed output's scratch starts from zero when the product adds",
     "if (add) transpose(t, (size_t)cols, out, ocs, cols, rows);",
     "if (0 * add) transpose(t, (size_t)cols, out, ocs, cols, rows);"),
    ("rmsnorm weight gradient: every row scaled by the first row's rstd",
     "s[i] = fmaf(dy[i] * x[i], rstd[n], s[i]);",
     "s[i] = fmaf(dy[i] * x[i], rstd[0], s[i]);"),
    ("rmsnorm weight gradient: every task's sums added at the first channels",
     "for (int i = 0; i < n_ch; i++) dw[i0 + i] += s[i];",
     "for (int i = 0; i < n_ch; i++) dw[i] += s[i];"),
    ("a transposition's scalar edge skips the source's last row",
     "    for (int i = 0; i < m; i++)\n        for (int j = i < m8 ? n8 : 0; j < n; j++)",
     "    for (int i = 0; i < m - 1; i++)\n        for (int j = i < m8 ? n8 : 0; j < n; j++)"),
    ("a transposition's 8x8 block swaps two columns",
     "int c = h == 1 ? 2 : h == 2 ? 1 : h;",
     "int c = h;"),
    ("gemm's whole-row tile store overwrites instead of adding",
     "for (int j = 0; j < GM_NR; j++) row[j] += acc[i][j];",
     "for (int j = 0; j < GM_NR; j++) row[j] = acc[i][j];"),
    ("expert weight gradients from the pool's first layer only",
     "        for (int j = 0; j < nl; j++)\n            for (int p = offset[j * (E + 1) + e];",
     "        for (int j = 0; j < 1; j++)\n            for (int p = offset[j * (E + 1) + e];"),
    ("a full chunk of an expert's rows dropped",
     "                if (R == N * K) {\n                    expert_weight_grads(d1, d2, sc, R, pr, C, F, K);",
     "                if (R == N * K) {\n                    (void)d1;"),
    ("a packed panel ignores its operand's row index",
     "const float *col = X.p + (size_t)(dk ? dk[k0 + k] : k0 + k) * X.cs;",
     "const float *col = X.p + (size_t)(k0 + k) * X.cs;"),
    ("an indexed A gets the depth blocks of a packed one, not those of its rows gathered",
     "    int kcb = a_direct ? (depth < GM_KROW",
     "    int kcb = a_read ? (depth < GM_KROW"),
    ("expert weight gradients read x at the rows of d h",
     "weight_grad(dfc1, pr->dh + r0 * 2 * F, rr, pr->x, xrows, R, C, 2 * F);",
     "weight_grad(dfc1, pr->dh + r0 * 2 * F, rr, pr->x, rows, R, C, 2 * F);"),
    ("expert weight gradients read rows in place though they are not one run",
     "    int run = rows[R - 1] - rows[0] == R - 1;",
     "    int run = 1;"),
    ("SwiGLU backward: act computed differently from the forward",
     "                o[i] = silu * b[i];",
     "                o[i] = a[i] * b[i] * sg;"),
    ("SwiGLU backward reads every chunk's b from the first",
     "memcpy(b, h + (size_t)m * 2 * F + F + i0, n * sizeof(float));",
     "memcpy(b, h + (size_t)m * 2 * F + F, n * sizeof(float));"),
    ("checkpoint header: training-state flag unchecked",
     "if (h[2] != 0 && h[2] != 1) checkpoint_damaged(",
     "if (0) checkpoint_damaged("),
    ("checkpoint header: training configuration unchecked",
     "if ((err = train_config_error(&ck->tc))) checkpoint_damaged(",
     "if (0) checkpoint_damaged("),
    ("checkpoint header: steps done not held to the run's steps",
     "if (ck->step < 0 || ck->step > ck->tc.steps)",
     "if (ck->step < 0)"),
    ("checkpoint header: loader epoch unbounded",
     "if ((double)ck->epoch > rows)",
     "if ((double)ck->epoch > rows * 2)"),
    ("checkpoint header: unused words unchecked",
     "    if (at >= 0)\n        checkpoint_damaged(path, \"byte %ld",
     "    if (0)\n        checkpoint_damaged(path, \"byte %ld"),
    ("checkpoint header: bytes after a path's NUL unchecked",
     "if (len == CKPT_PATH_BYTES || first_nonzero(p + len, CKPT_PATH_BYTES - len, 1) >= 0)",
     "if (len == CKPT_PATH_BYTES)"),
    ("loader position: a row past the shard's end accepted",
     "if (row > (uint64_t)rows) {",
     "if (row > (uint64_t)rows + 1) {"),
    ("loader position: shard index n accepted",
     "shard >= (uint64_t)d->n",
     "shard > (uint64_t)d->n"),
    ("shard fingerprint ignores the token counts",
     "h = mix_seed(h, d->count[i], (uint64_t)d->version[i]);",
     "h = mix_seed(h, 0, (uint64_t)d->version[i]);"),
    ("ETA from the last step only",
     "return k > 0 ? sum / k : s->first;",
     "return k > 0 ? s->recent[(s->n - 2) % ETA_WINDOW] : s->first;"),
    ("expert products: each expert runs its predecessor's weights",
     "*we = w + (size_t)e * n_out * n_in;",
     "*we = w + (size_t)(e > 0 ? e - 1 : 0) * n_out * n_in;"),
    ("pooled weight gradient skipped at a pool's first layer",
     "if (l % LP == 0) pool_backward(m, l, N);",
     "if (l % LP == 0 && l > 0) pool_backward(m, l, N);"),
    ("plain matmul: the weight gradient skips the last output of each block",
     "for (int o = o0; o < n_out && o < o0 + PLAIN_ROWS; o++)",
     "for (int o = o0; o < n_out && o < o0 + PLAIN_ROWS - 1; o++)"),
    ("plain matmul forward: a block's rows read from its first row",
     "for (int r = r0; r < rows && r < r0 + PLAIN_ROWS; r++)\n                out[(size_t)r * n_out + o] =\n                    dot(inp + (size_t)r * n_in,",
     "for (int r = r0; r < rows && r < r0 + PLAIN_ROWS; r++)\n                out[(size_t)r * n_out + o] =\n                    dot(inp + (size_t)r0 * n_in,"),
    ("plain attention backward: dv from the scores before the softmax",
     "axpy(dv + kj, pj, dout + qo, hd);",
     "axpy(dv + kj, dot(q + qo, k + kj, hd) * scale, dout + qo, hd);"),
    ("moe scatter to the wrong slot",
     "axpy(dx + (size_t)n * C, 1.0f, dxs + (size_t)d->slot[n * K + k] * C, C);",
     "axpy(dx + (size_t)n * C, 1.0f, dxs + (size_t)d->slot[n * K] * C, C);"),
]

# Bugs only a run on several ranks shows (dev/test_mpi.py).
MPI_MUTANTS = [
    ("data parallel: expert counts not summed over the ranks",
     "    world_sum_i64(m->counts, (size_t)L * E);\n",
     ""),
    ("data parallel: the loss means over this rank's tokens only",
     "m->N_all = N * world.size;",
     "m->N_all = N;"),
    ("data parallel: the gradient range not summed over the ranks",
     "for (int q = 1; q < R; q++) sum += in[(size_t)q * WORLD_CHUNK + i];",
     "for (int q = 1; q < R; q++) sum += 0.0f * in[(size_t)q * WORLD_CHUNK + i];"),
    ("data parallel: a resumed rank reads rank 0's AdamW moments",
     "fseek(f, moments + (long)(lo * sizeof(float)), SEEK_SET);",
     "fseek(f, moments, SEEK_SET);"),
    ("data parallel: a rank's updated range not sent to the others",
     "    world_allgather(m->params_memory, m->num_params);\n",
     ""),
]

# Helpers some mutants call, added to the mutated copy only.
PRELUDE = """
static void matmul_forward_naive_t(float *out, const float *inp, const float *w, int M, int K, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += inp[(size_t)m * K + k] * w[(size_t)k * N + n];
            out[(size_t)m * N + n] = s;
        }
}
static float gate_sum(const float *score, const int *chosen, int K) {
    float s = 0.0f;
    for (int k = 0; k < K; k++) s += score[chosen[k]];
    return s > 0.0f ? s : 1.0f;
}
"""
ANCHOR = "// ----------------------------------------------------------------------------\n// Layers."


def main():
    sys.stdout.reconfigure(line_buffering=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = open(os.path.join(root, "train_unipool.c")).read()
    pick = lambda ms: [m for m in ms if not sys.argv[1:] or any(a in m[0] for a in sys.argv[1:])]
    wanted, wanted_mpi = pick(MUTANTS), pick(MPI_MUTANTS)
    cc = os.environ.get("CC", "gcc")
    flags = ["-O2", "-march=native", "-std=c11", "-D_DEFAULT_SOURCE", "-fopenmp", "-ffp-contract=fast",
             "-fno-trapping-math", "-fno-math-errno", "-w"]
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(root, "test_unipool.c"), tmp)
        for name, old, new in wanted_mpi:
            if not shutil.which("mpicc"):
                print(f"SKIPPED {name}: no mpicc (apt-get install libopenmpi-dev openmpi-bin)")
                if os.environ.get("UNIPOOL_REQUIRE_MPI") == "1":
                    survivors.append(name)
                continue
            if src.count(old) != 1:
                print(f"STALE   {name}: its text occurs {src.count(old)} times in train_unipool.c; update dev/mutants.py")
                survivors.append(name)
                continue
            with open(os.path.join(tmp, "train_unipool.c"), "w") as f:
                f.write(src.replace(old, new))
            plain, mpi = os.path.join(tmp, "train_unipool"), os.path.join(tmp, "train_unipool_mpi")
            builds = [subprocess.run([cc] + flags + ["-o", plain, os.path.join(tmp, "train_unipool.c"), "-lm"],
                                     capture_output=True, text=True),
                      subprocess.run(["mpicc"] + flags + ["-DUNIPOOL_MPI", "-o", mpi, os.path.join(tmp, "train_unipool.c"),
                                      "-lm"], capture_output=True, text=True, env=dict(os.environ, OMPI_CC=cc))]
            if any(b.returncode for b in builds):
                print(f"NOBUILD {name}: {' '.join(b.stderr.strip()[-200:] for b in builds)}")
                survivors.append(name)
                continue
            run = subprocess.run([sys.executable, os.path.join(root, "dev", "test_mpi.py"), "unipool"], cwd=root,
                                 capture_output=True, text=True, timeout=1200,
                                 env=dict(os.environ, TRAIN_UNIPOOL=plain, TRAIN_UNIPOOL_MPI=mpi))
            failed = [l[7:60] for l in run.stdout.splitlines() if l.startswith("NOT OK")]
            if run.returncode == 1 and failed:
                print(f"caught  {name}: {len(failed)} checks failed, first: {failed[0]}")
            else:
                print(f"MISSED  {name}: test_mpi exit {run.returncode}")
                survivors.append(name)
        for name, old, new in wanted:
            if src.count(old) != 1:
                print(f"STALE   {name}: its text occurs {src.count(old)} times in train_unipool.c; update dev/mutants.py")
                survivors.append(name)
                continue
            mutated = src.replace(old, new).replace(ANCHOR, PRELUDE + ANCHOR, 1)
            with open(os.path.join(tmp, "train_unipool.c"), "w") as f:
                f.write(mutated)
            exe = os.path.join(tmp, "test_unipool")
            build = subprocess.run([cc] + flags + ["-o", exe, os.path.join(tmp, "test_unipool.c"), "-lm"],
                                   capture_output=True, text=True)
            if build.returncode:
                print(f"NOBUILD {name}: {build.stderr.strip().splitlines()[-1]}")
                survivors.append(name)
                continue
            # 2 threads whatever the caller set: some mutants sit in code that only a second thread runs
            run = subprocess.run([exe], cwd=root, capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, OMP_NUM_THREADS="2"))
            failed = [l.split()[2] if l.startswith("NOT OK") else l for l in run.stdout.splitlines()
                      if l.startswith("NOT OK")]
            if run.returncode == 1:
                print(f"caught  {name}: {len(failed)} checks failed, first: {' '.join(failed[:3])}")
            else:
                print(f"MISSED  {name}: test exit {run.returncode}")
                survivors.append(name)
    total = len(wanted) + len(wanted_mpi)
    print(f"{total - len(survivors)} of {total} mutants caught")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
