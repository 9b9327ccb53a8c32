/*
test_unipool.c: holds train_unipool.c to a reference, and its kernels, fast and plain, to oracles.

  ./test_unipool            the unit checks, then every dump in dev/dumps/
  ./test_unipool DUMP...    the named reference dumps only

A dump (SPEC section 6) carries a configuration, initial parameters and
tokens, and what a float64 reference computed from them: the first
micro-batch's logits, every step's mean CE, mean aux and gradient norm, step
0's gradient and the final parameters. Any implementation can write one; this
program replays it in float32 and compares tensor by tensor.

One line per check: OK or NOT OK, the largest error, the element where the
error is largest against its tolerance, and the tolerance. Then
"N passed, N failed". Exit 0 if all passed, 1 if a check failed, 2 if a dump
could not be read or is not the size its header implies.
*/
#define UNIPOOL_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // parts of the program this test does not call
#include "train_unipool.c"

#include <sys/wait.h>

#define DEFAULT_DUMPS "dev/dumps/*.bin"

static int n_pass, n_fail;

/* A tolerance: |got - ref| <= abs + scale * max|ref| + rel * |ref|, per
   element. The scale term is relative to the tensor's largest value, so
   elements that are small only because of cancellation do not demand
   impossible precision; the rel term keeps large elements honest. */
typedef struct { double abs, scale, rel; } Tol;

static void format_index(char *buf, size_t len, size_t i, Shape sh) {
    size_t idx[3] = {i / (sh.dim[1] * sh.dim[2]), i / sh.dim[2] % sh.dim[1], i % sh.dim[2]};
    int r = sh.rank < 1 ? 1 : sh.rank;
    int w = snprintf(buf, len, "[");
    for (int d = 0; d < r; d++) {
        size_t v = r == 1 ? i : r == 2 ? (d == 0 ? i / sh.dim[1] : i % sh.dim[1]) : idx[d];
        w += snprintf(buf + w, len - w, d ? ",%zu" : "%zu", v);
    }
    snprintf(buf + w, len - w, "]");
}

static Shape flat(size_t n) { return (Shape){1, {n, 1, 1}}; }

static int check(const char *what, const float *got, const float *ref, Shape sh, Tol tol) {
    size_t n = shape_numel(sh), worst = 0;
    double mx = 0.0, maxerr = 0.0, worst_ratio = -1.0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs((double)ref[i]));
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - ref[i]), t = tol.abs + tol.scale * mx + tol.rel * fabs((double)ref[i]);
        double ratio = err == 0.0 ? 0.0 : (t > 0.0 && err == err) ? err / t : INFINITY;  // NaN never passes
        if (!(err <= maxerr)) maxerr = err;
        if (ratio > worst_ratio) { worst_ratio = ratio; worst = i; }
    }
    int ok = worst_ratio <= 1.0;
    char where[64];
    format_index(where, sizeof where, worst, sh);
    printf("%-6s %-40s max err %.2e at %-12s ref % .6e got % .6e (tol %.0e + %.0e*max + %.0e*|ref|)\n",
           ok ? "OK" : "NOT OK", what, maxerr, where, n ? ref[worst] : 0.0, n ? got[worst] : 0.0, tol.abs,
           tol.scale, tol.rel);
    ok ? n_pass++ : n_fail++;
    return ok;
}

static void check_true(const char *what, int ok, const char *detail) {
    printf("%-6s %-44s %s\n", ok ? "OK" : "NOT OK", what, detail);
    ok ? n_pass++ : n_fail++;
}

// ----------------------------------------------------------------------------
// Reference dumps (SPEC section 6)

/* Tolerances against a float64 reference, for float32 arithmetic.
   - logits: each passes through L blocks of C-long float32 sums, about 1e-6
     relative; 1e-5 of the largest logit leaves a 10x margin, while a RoPE off
     by one position or a transposed weight moves logits by 1e-3 or more.
   - ce, aux, grad norm: scalars of float32 sums of N terms; 1e-5 relative.
   - gradients: the backward adds a second pass of rounding and the softmax
     and norm derivatives cancel; 1e-4 of the tensor's largest entry plus 1e-4
     relative. A missing aux term changes router gradients by far more (its
     share of them is alpha E f / N per score, the same order as the CE part).
   - final parameters: Adam divides by sqrt(v) + eps, so where a gradient is
     near or below eps, float32 noise in it becomes a visible part of the
     step: SPEC section 6 expects about 1% of lr, so the bound leaves a
     margin of three: 3% of lr per step. A missing
     or misplaced weight decay moves a parameter by lr wd |p| per step, which
     the weight_decay dump makes 3x larger than that.
   - the expert bias (sigmoid router): sums of +-bias_rate in float32, so it
     matches exactly when every step's counts do, and a single token routed
     elsewhere moves an entry by 2 bias_rate. Exact. */
static const Tol TOL_LOGITS = {0.0, 1e-5, 1e-5};
static const Tol TOL_STATS = {0.0, 0.0, 1e-5};
static const Tol TOL_GRADS = {0.0, 1e-4, 1e-4};
static Tol tol_final(float lr, int steps) { return (Tol){3e-2 * lr * steps, 0.0, 1e-6}; }

typedef struct {
    Config cfg;
    int B, T, n_micro, n_steps;
    OptConfig opt;
    size_t num_params, n_tokens;
    float *params, *logits, *stats, *grads, *final;
    float *bias;  // (L,E) the expert bias after n_steps steps, sigmoid router only
    int *tokens;
} Dump;

// Reads a whole dump; returns NULL or what is wrong with the file.
static const char *dump_read(Dump *d, const char *path, char *msg, size_t len) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(msg, len, "cannot open: %s", strerror(errno)), msg;
    int32_t hdr[256];
    float hp[64];
    memset(d, 0, sizeof *d);
    if (fread(hdr, sizeof hdr, 1, f) != 1 || fread(hp, sizeof hp, 1, f) != 1) {
        fclose(f);
        return "shorter than its 1280-byte header";
    }
    if (hdr[0] != DUMP_MAGIC || hdr[1] != DUMP_VERSION) {
        fclose(f);
        return snprintf(msg, len, "not a reference dump (magic %d version %d, want %d version %d)", hdr[0],
                        hdr[1], DUMP_MAGIC, DUMP_VERSION), msg;
    }
    Config *c = &d->cfg;
    *c = (Config){.V = hdr[2], .Vp = hdr[3], .maxT = hdr[4], .L = hdr[5], .C = hdr[6], .NH = hdr[7],
                  .NKV = hdr[8], .F = hdr[9], .G = hdr[10], .E = hdr[11], .K = hdr[12], .router = hdr[13],
                  .aux = hdr[14], .norm_eps = hp[0], .rope_theta = hp[1], .alpha = hp[2], .router_c = hp[3],
                  .router_eps = hp[4], .bias_rate = hp[11]};
    d->B = hdr[15], d->T = hdr[16], d->n_micro = hdr[17], d->n_steps = hdr[18];
    d->opt = (OptConfig){.lr = hp[5], .b1 = hp[6], .b2 = hp[7], .eps = hp[8], .wd = hp[9], .clip = hp[10]};
    const char *err = config_error(c);
    if (!err && (d->B < 1 || d->T < 1 || d->T > c->maxT || d->n_micro < 1 || d->n_steps < 1))
        err = "need B, T, n_micro, n_steps >= 1 and T <= maxT";
    if (err) {
        fclose(f);
        return snprintf(msg, len, "bad header: %s", err), msg;
    }
    Shape shapes[NUM_PARAM_TENSORS];
    param_shapes(shapes, c);
    double P = 0.0;  // sizes in double: a foreign header must not overflow them
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) P += (double)shapes[i].dim[0] * shapes[i].dim[1] * shapes[i].dim[2];
    double ntok = (double)d->n_steps * d->n_micro * d->B * (d->T + 1);
    double nbias = c->router == ROUTER_SIGMOID ? (double)c->L * c->E : 0.0;
    double want = 4.0 * (256 + 64 + 3 * P + ntok + (double)d->B * d->T * c->V + 3.0 * d->n_steps + nbias);
    fseek(f, 0, SEEK_END);
    double have = (double)ftell(f);
    if (have != want) {
        fclose(f);
        return snprintf(msg, len, "is %.0f bytes, its header implies %.0f", have, want), msg;
    }
    fseek(f, 1280, SEEK_SET);
    d->num_params = (size_t)P;
    d->n_tokens = (size_t)ntok;
    size_t nl = (size_t)d->B * d->T * c->V;
    d->params = malloc_check(d->num_params * sizeof(float));
    d->tokens = malloc_check(d->n_tokens * sizeof(int));
    d->logits = malloc_check(nl * sizeof(float));
    d->stats = malloc_check(3 * (size_t)d->n_steps * sizeof(float));
    d->grads = malloc_check(d->num_params * sizeof(float));
    d->final = malloc_check(d->num_params * sizeof(float));
    d->bias = malloc_check((size_t)nbias * sizeof(float));
    int ok = fread(d->params, 4, d->num_params, f) == d->num_params && fread(d->tokens, 4, d->n_tokens, f) == d->n_tokens &&
             fread(d->logits, 4, nl, f) == nl && fread(d->stats, 4, 3 * (size_t)d->n_steps, f) == 3 * (size_t)d->n_steps &&
             fread(d->grads, 4, d->num_params, f) == d->num_params && fread(d->final, 4, d->num_params, f) == d->num_params &&
             fread(d->bias, 4, (size_t)nbias, f) == (size_t)nbias;
    fclose(f);
    if (!ok) return "read failed";
    for (size_t i = 0; i < d->n_tokens; i++)
        if (d->tokens[i] < 0 || d->tokens[i] >= c->V)
            return snprintf(msg, len, "token %d at index %zu is outside [0, V = %d)", d->tokens[i], i, c->V), msg;
    return NULL;
}

static void dump_free(Dump *d) {
    free(d->params);
    free(d->tokens);
    free(d->logits);
    free(d->stats);
    free(d->grads);
    free(d->final);
    free(d->bias);
}

static void check_params(const char *dump, const char *part, const float *got, const float *ref, const Model *m,
                         Tol tol) {
    char what[128];
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        snprintf(what, sizeof what, "%s %s.%s", dump, part, param_names[i]);
        check(what, got, ref, m->shapes[i], tol);
        size_t n = shape_numel(m->shapes[i]);
        got += n;
        ref += n;
    }
}

// Replays one dump; returns 0, or -1 if it cannot be read.
static int run_dump(const char *path) {
    Dump d = {0};
    char msg[256];
    const char *err = dump_read(&d, path, msg, sizeof msg);
    if (err) {
        printf("UNREADABLE %s: %s\n", path, err);
        dump_free(&d);
        return -1;
    }
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    char name[64], what[128];
    snprintf(name, sizeof name, "%.*s", (int)(strcspn(base, ".")), base);
    Model m;
    model_build(&m, &d.cfg);
    if (m.num_params != d.num_params) fail("internal: parameter count mismatch");
    memcpy(m.params_memory, d.params, d.num_params * sizeof(float));
    int B = d.B, T = d.T, N = B * T, V = d.cfg.V, Vp = d.cfg.Vp;

    // the first micro-batch's logits: an evaluation pass, so the stale pool statistic is untouched
    int *io = malloc_check(2 * (size_t)N * sizeof(int));
    split_rows(io, io + N, d.tokens, B, T);
    model_forward(&m, io, NULL, B, T, 0, 0);
    float *lg = malloc_check((size_t)N * V * sizeof(float));
    for (int n = 0; n < N; n++) memcpy(lg + (size_t)n * V, m.acts.logits + (size_t)n * Vp, V * sizeof(float));
    snprintf(what, sizeof what, "%s logits", name);
    check(what, lg, d.logits, (Shape){2, {N, V, 1}}, TOL_LOGITS);

    float *stats = malloc_check(3 * (size_t)d.n_steps * sizeof(float));
    size_t per_step = (size_t)d.n_micro * B * (T + 1);
    for (int s = 0; s < d.n_steps; s++) {
        StepStats st = step_gradients(&m, d.tokens + s * per_step, d.n_micro, B, T);
        stats[3 * s] = (float)st.ce, stats[3 * s + 1] = (float)st.aux, stats[3 * s + 2] = (float)st.grad_norm;
        if (s == 0) check_params(name, "grads", m.grads_memory, d.grads, &m, TOL_GRADS);
        step_update(&m, &d.opt, d.opt.lr, st.grad_norm);
    }
    // figures per step, one line per kind: rows of (ce, aux, grad norm)
    static const char *kinds[3] = {"ce", "aux", "grad_norm"};
    for (int k = 0; k < 3; k++) {
        float got[d.n_steps], ref[d.n_steps];
        for (int s = 0; s < d.n_steps; s++) got[s] = stats[3 * s + k], ref[s] = d.stats[3 * s + k];
        snprintf(what, sizeof what, "%s steps.%s", name, kinds[k]);
        check(what, got, ref, flat(d.n_steps), TOL_STATS);
    }
    check_params(name, "final", m.params_memory, d.final, &m, tol_final(d.opt.lr, d.n_steps));
    if (d.cfg.router == ROUTER_SIGMOID) {  // sums of +-bias_rate: exact once every choice matches
        snprintf(what, sizeof what, "%s final.expert_bias", name);
        check(what, m.expert_bias, d.bias, (Shape){2, {d.cfg.L, d.cfg.E, 1}}, (Tol){0});
    }
    free(io);
    free(lg);
    free(stats);
    model_free(&m);
    dump_free(&d);
    return 0;
}

// ----------------------------------------------------------------------------
// Unit checks: the kernels against oracles in double, the NormRouter constant, and
// fixed points of the load-balancing loss.

static float *randn(size_t n, float scale, Rng *rng) {
    float *x = malloc_check(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = scale * (float)rng_normal(rng);
    return x;
}

static float *copy(const float *x, size_t n) {
    float *y = malloc_check(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

/* Oracles for the kernels: plain loops summing in double and libm's exp,
   independent of the program's kernels, fast and plain alike. */
static void oracle_matmul_forward(float *out, const float *inp, const float *w, int rows, int n_in, int n_out) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < n_out; o++) {
            double s = 0.0;
            for (int i = 0; i < n_in; i++) s += (double)inp[(size_t)r * n_in + i] * w[(size_t)o * n_in + i];
            out[(size_t)r * n_out + o] = (float)s;
        }
}

static void oracle_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                  int rows, int n_in, int n_out) {
    // either of dinp, dw may be NULL
    for (int r = 0; r < rows && dinp; r++)
        for (int i = 0; i < n_in; i++) {
            double s = 0.0;
            for (int o = 0; o < n_out; o++) s += (double)dout[(size_t)r * n_out + o] * w[(size_t)o * n_in + i];
            dinp[(size_t)r * n_in + i] += (float)s;
        }
    for (int o = 0; o < n_out && dw; o++)
        for (int i = 0; i < n_in; i++) {
            double s = 0.0;
            for (int r = 0; r < rows; r++) s += (double)dout[(size_t)r * n_out + o] * inp[(size_t)r * n_in + i];
            dw[(size_t)o * n_in + i] += (float)s;
        }
}

static void oracle_attention_forward(float *out, float *lse, const Attention *at) {
    // out (B,T,NH*hd), lse (B,T,NH), q (B,T,NH*hd), k, v (B,t0+T,NKV*hd)
    int B = at->B, T = at->T, t0 = at->t0, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    double scale = 1.0 / sqrt((double)hd), *p = malloc_check((size_t)(t0 + T) * sizeof(double));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * qs + h * hd;
                const float *kb = k + (size_t)b * (t0 + T) * ks + (h / grp) * hd, *vb = v + (kb - k);
                float *o = out + ((size_t)b * T + t) * qs + h * hd;
                int n = t0 + t + 1;  // keys this query sees
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < n; j++) {
                    double s = 0.0;
                    for (int i = 0; i < hd; i++) s += (double)qt[i] * kb[(size_t)j * ks + i];
                    p[j] = s * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j < n; j++) sum += (p[j] = exp(p[j] - mx));
                for (int i = 0; i < hd; i++) {
                    double acc = 0.0;
                    for (int j = 0; j < n; j++) acc += p[j] / sum * vb[(size_t)j * ks + i];
                    o[i] = (float)acc;
                }
                lse[((size_t)b * T + t) * NH + h] = (float)(mx + log(sum));
            }
    free(p);
}

static void oracle_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                     const float *lse, const Attention *at) {
    // dq (B,T,NH*hd) +=, dk, dv (B,T,NKV*hd) +=, dout, out (B,T,NH*hd), lse (B,T,NH)
    int B = at->B, T = at->T, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    double scale = 1.0 / sqrt((double)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                size_t qo = ((size_t)b * T + t) * qs + h * hd, ko = (size_t)b * T * ks + (h / grp) * hd;
                double D = 0.0, l = lse[((size_t)b * T + t) * NH + h];  // D = do_t . o_t
                for (int i = 0; i < hd; i++) D += (double)dout[qo + i] * out[qo + i];
                for (int j = 0; j <= t; j++) {
                    size_t kj = ko + (size_t)j * ks;
                    double s = 0.0, dp = 0.0;
                    for (int i = 0; i < hd; i++) s += (double)q[qo + i] * k[kj + i], dp += (double)dout[qo + i] * v[kj + i];
                    double pj = exp(s * scale - l), ds = pj * (dp - D) * scale;
                    for (int i = 0; i < hd; i++) {
                        dq[qo + i] += (float)(ds * k[kj + i]);
                        dk[kj + i] += (float)(ds * q[qo + i]);
                        dv[kj + i] += (float)(pj * dout[qo + i]);
                    }
                }
            }
}

/* The kernels, fast and plain, against the oracles: a float32 sum of K
   terms is off by about sqrt(K) ulps of its terms, so 1e-5 of the largest
   output plus 1e-5 relative. Any indexing mistake is off by O(1). */
static const Tol TOL_TWIN = {0.0, 1e-5, 1e-5};

typedef void MatmulForward(float *out, const float *inp, const float *w, int rows, int n_in, int n_out);
typedef void MatmulBackward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int rows,
                            int n_in, int n_out);
typedef void WeightGrad(float *dw, const float *dout, const int *drows, const float *inp, const int *irows, int rows,
                        int n_in, int n_out);
static const struct {
    const char *name;
    MatmulForward *forward;
    MatmulBackward *backward;
    WeightGrad *weight_grad;
} MATMULS[2] = {{"fast", matmul_forward_fast, matmul_backward_fast, weight_grad_fast},
                {"plain", matmul_forward_ref, matmul_backward_ref, weight_grad_ref}};

static void test_matmul(void) {
    // (M, K, N): edges of every tile size, K over one packed block (GM_KC) and over one row read in
    // place (GM_KROW), N over one column block (GM_NC, and GM_NC / 4 for few rows), B rows 4 KiB apart
    // (packed; with few rows, blocks GM_NC wide: the d input of {10, GM_NC + 1024, GM_KC + 150} has two
    // blocks each way), M on both sides of GM_SMALL (both operands packed from there) and of the plain
    // kernels' PLAIN_ROWS. The weight gradient over rows read through indices (a pooled expert's) gives
    // the bits of the same rows gathered, the rows of dout and inp scattered apart in 2M-row buffers
    // (N 1: dout^T is an A read in place when gathered, in one block deeper than GM_KC).
    static const int shapes[][3] = {{1, 1, 1}, {5, 17, 3}, {4, 64, 4}, {37, 70, 67}, {64, 128, 96}, {3, 33, 130},
                                    {9, 200, 131}, {7, 600, 37}, {3, 40, 3200}, {150, 70, 45}, {300, 300, 100},
                                    {43, 96, 600}, {200, 150, 500}, {20, GM_KROW + 104, 40}, {50, 64, 1700},
                                    {10, 1024, 50}, {10, GM_NC + 1024, GM_KC + 150}, {GM_SMALL + 8, 150, 500},
                                    {GM_SMALL + 44, 300, 100}, {GM_KC + 44, 20, 1}};
    Rng rng = {1};
    char what[96];
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int M = shapes[s][0], K = shapes[s][1], N = shapes[s][2];
        float *inp = randn((size_t)M * K, 1, &rng), *w = randn((size_t)N * K, 1, &rng);
        float *dout = randn((size_t)M * N, 1, &rng), *out_ref = malloc_check((size_t)M * N * 4);
        float *dinp_ref = randn((size_t)M * K, 1, &rng), *dw_ref = randn((size_t)N * K, 1, &rng);  // += into these
        float *dinp0 = copy(dinp_ref, (size_t)M * K), *dw0 = copy(dw_ref, (size_t)N * K);
        oracle_matmul_forward(out_ref, inp, w, M, K, N);
        oracle_matmul_backward(dinp_ref, dw_ref, dout, inp, w, M, K, N);
        for (int kn = 0; kn < 2; kn++) {
            float *out = randn((size_t)M * N, 1, &rng), *dinp = copy(dinp0, (size_t)M * K), *dw = copy(dw0, (size_t)N * K);
            MATMULS[kn].forward(out, inp, w, M, K, N);
            MATMULS[kn].backward(dinp, dw, dout, inp, w, M, K, N);
            snprintf(what, sizeof what, "matmul %s %dx%dx%d forward", MATMULS[kn].name, M, K, N);
            check(what, out, out_ref, (Shape){2, {M, N, 1}}, TOL_TWIN);
            snprintf(what, sizeof what, "matmul %s %dx%dx%d backward dinp", MATMULS[kn].name, M, K, N);
            check(what, dinp, dinp_ref, (Shape){2, {M, K, 1}}, TOL_TWIN);
            snprintf(what, sizeof what, "matmul %s %dx%dx%d backward dweight", MATMULS[kn].name, M, K, N);
            check(what, dw, dw_ref, (Shape){2, {N, K, 1}}, TOL_TWIN);
            int *drows = malloc_check((size_t)M * sizeof(int)), *irows = malloc_check((size_t)M * sizeof(int));
            float *dout_s = randn((size_t)2 * M * N, 1, &rng), *inp_s = randn((size_t)2 * M * K, 1, &rng);
            for (int r = 0; r < M; r++) {  // row r at 2(M-1-r) in dout_s, at 2r+1 in inp_s
                drows[r] = 2 * (M - 1 - r), irows[r] = 2 * r + 1;
                memcpy(dout_s + (size_t)drows[r] * N, dout + (size_t)r * N, (size_t)N * 4);
                memcpy(inp_s + (size_t)irows[r] * K, inp + (size_t)r * K, (size_t)K * 4);
            }
            float *dw_rows = copy(dw0, (size_t)N * K);
            MATMULS[kn].weight_grad(dw_rows, dout_s, drows, inp_s, irows, M, K, N);
            snprintf(what, sizeof what, "matmul %s %dx%dx%d dweight over indexed rows = gathered, bit for bit",
                     MATMULS[kn].name, M, K, N);
            check_true(what, !memcmp(dw_rows, dw, (size_t)N * K * 4), "");
            free(drows), free(irows), free(dout_s), free(inp_s), free(dw_rows);
            free(out), free(dinp), free(dw);
        }
        free(inp), free(w), free(dout), free(out_ref), free(dinp_ref), free(dw_ref), free(dinp0), free(dw0);
    }
}

/* exp_fast against libm in double, over its whole range: within 2.5 ulp
   (3e-7 relative) everywhere, NaN kept, and the clamp at the low end tiny. */
static void test_exp(void) {
    double worst = 0.0, at = 0.0;
    for (int i = 0; i <= 2000000; i++) {
        float x = -87.0f + 175.0f * i / 2000000;
        double rel = fabs(exp_fast(x) - exp((double)x)) / exp((double)x);
        if (rel > worst) worst = rel, at = x;
    }
    char detail[128];
    snprintf(detail, sizeof detail, "max rel err %.2e at x = %.4f (tol 3e-7); exp(0) = %g", worst, at, exp_fast(0.0f));
    check_true("exp_fast vs libm on [-87, 88]", worst <= 3e-7 && exp_fast(0.0f) == 1.0f, detail);
    snprintf(detail, sizeof detail, "exp(NaN) = %g, exp(-inf) = %g", exp_fast(NAN), exp_fast(-INFINITY));
    check_true("exp_fast keeps NaN, clamps -inf", isnan(exp_fast(NAN)) && exp_fast(-INFINITY) < 1e-37f, detail);
}

typedef void AttentionForward(float *out, float *lse, const Attention *at);
typedef void AttentionBackward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const Attention *at);
static const struct { const char *name; AttentionForward *forward; AttentionBackward *backward; } ATTENTIONS[2] = {
    {"fast", attention_forward_fast, attention_backward_fast}, {"plain", attention_forward_ref, attention_backward_ref}};

static void test_attention(void) {
    // B, T, NH, NKV, hd: T past the 32-key blocks, hd past the 64-wide output chunks
    static const int cases[][5] = {{2, 13, 4, 2, 8}, {1, 9, 4, 4, 6}, {2, 16, 6, 1, 16}, {1, 70, 2, 1, 64}, {2, 40, 2, 2, 96}};
    Rng rng = {2};
    char what[96];
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int B = cases[c][0], T = cases[c][1], NH = cases[c][2], NKV = cases[c][3], hd = cases[c][4];
        size_t nq = (size_t)B * T * NH * hd, nk = (size_t)B * T * NKV * hd, nl = (size_t)B * T * NH;
        float *q = randn(nq, 1, &rng), *k = randn(nk, 1, &rng), *v = randn(nk, 1, &rng), *dout = randn(nq, 1, &rng);
        float *out_ref = malloc_check(nq * 4), *lse_ref = malloc_check(nl * 4);
        float *dq_ref = calloc_check(nq, 4), *dk_ref = calloc_check(nk, 4), *dv_ref = calloc_check(nk, 4);
        Attention at = {B, T, 0, NH, NKV, hd, q, k, v};
        oracle_attention_forward(out_ref, lse_ref, &at);
        oracle_attention_backward(dq_ref, dk_ref, dv_ref, dout, out_ref, lse_ref, &at);
        for (int kn = 0; kn < 2; kn++) {
            float *out = malloc_check(nq * 4), *lse = malloc_check(nl * 4);
            float *dq = calloc_check(nq, 4), *dk = calloc_check(nk, 4), *dv = calloc_check(nk, 4);
            ATTENTIONS[kn].forward(out, lse, &at);
            ATTENTIONS[kn].backward(dq, dk, dv, dout, out, lse, &at);
            const char *names[5] = {"out", "dq", "dk", "dv", "lse"};
            float *got[5] = {out, dq, dk, dv, lse}, *ref[5] = {out_ref, dq_ref, dk_ref, dv_ref, lse_ref};
            for (int i = 0; i < 5; i++) {
                snprintf(what, sizeof what, "attention %s B%d T%d NH%d NKV%d hd%d %s", ATTENTIONS[kn].name, B, T, NH,
                         NKV, hd, names[i]);
                check(what, got[i], ref[i], flat(i == 4 ? nl : i < 2 ? nq : nk), TOL_TWIN);
            }
            free(out), free(lse), free(dq), free(dk), free(dv);
        }
        free(q), free(k), free(v), free(dout), free(out_ref), free(lse_ref), free(dq_ref), free(dk_ref), free(dv_ref);
    }
}

/* The oracle for a layer's mixture: one token and one expert at a time, in
   double, straight from the formulas above moe_forward and moe_backward.
   It shares nothing with the training program's MoE but MoeLayer: no
   dispatch, no gathered rows, no SwiGLU helper, no matmul. */
static void oracle_moe_forward(float *y, const MoeLayer *ml) {
    // y (N,C)
    int N = ml->N, C = ml->C, F = ml->F, E = ml->E, K = ml->K;
    double *hh = malloc_check(2 * (size_t)F * sizeof(double));  // (2F) fc1 x, then silu(a) * b
    for (int n = 0; n < N; n++) {
        const float *xn = ml->x + (size_t)n * C;
        float *yn = y + (size_t)n * C;
        for (int i = 0; i < C; i++) yn[i] = 0.0f;
        for (int k = 0; k < K; k++) {
            int e = ml->chosen[n * K + k];
            const float *w1 = ml->fc1 + (size_t)e * 2 * F * C, *w2 = ml->fc2 + (size_t)e * C * F;
            for (int r = 0; r < 2 * F; r++) {
                hh[r] = 0.0;
                for (int i = 0; i < C; i++) hh[r] += (double)w1[(size_t)r * C + i] * xn[i];
            }
            for (int r = 0; r < F; r++) hh[r] = hh[r] / (1.0 + exp(-hh[r])) * hh[F + r];
            for (int i = 0; i < C; i++) {
                double o = 0.0;
                for (int r = 0; r < F; r++) o += (double)w2[(size_t)i * F + r] * hh[r];
                yn[i] += (float)(ml->score[(size_t)n * E + e] * o);
            }
        }
    }
    free(hh);
}

/* The backward, recomputing each expert's activations from x. With g the
   gate, act = silu(a) * b and o = fc2 act the expert's output:
     dgate = dy . o,  dact = g fc2^T dy,  dfc2 += g dy act^T,
     da = dact b silu'(a), silu'(a) = sig(a) (1 + a (1 - sig(a))),  db = dact silu(a),
     dx += fc1^T [da; db],  dfc1 += [da; db] x^T */
static void oracle_moe_backward(float *dx, float *dscore, float *dfc1, float *dfc2, const float *dy,
                                const MoeLayer *ml) {
    // dx (N,C) +=, dscore (N,E) += at the chosen experts, dfc1 (E,2F,C) +=, dfc2 (E,C,F) +=, dy (N,C)
    int N = ml->N, C = ml->C, F = ml->F, E = ml->E, K = ml->K;
    double *hh = malloc_check(2 * (size_t)F * sizeof(double)), *act = malloc_check((size_t)F * sizeof(double));
    double *dact = malloc_check((size_t)F * sizeof(double)), *dh = malloc_check(2 * (size_t)F * sizeof(double));
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int e = ml->chosen[n * K + k];
            const float *w1 = ml->fc1 + (size_t)e * 2 * F * C, *w2 = ml->fc2 + (size_t)e * C * F;
            float *d1 = dfc1 + (size_t)e * 2 * F * C, *d2 = dfc2 + (size_t)e * C * F;
            const float *xn = ml->x + (size_t)n * C, *dyn = dy + (size_t)n * C;
            double g = ml->score[(size_t)n * E + e], dg = 0.0;
            for (int r = 0; r < 2 * F; r++) {
                hh[r] = 0.0;
                for (int i = 0; i < C; i++) hh[r] += (double)w1[(size_t)r * C + i] * xn[i];
            }
            for (int r = 0; r < F; r++) act[r] = hh[r] / (1.0 + exp(-hh[r])) * hh[F + r];
            for (int r = 0; r < F; r++) dact[r] = 0.0;
            for (int i = 0; i < C; i++) {
                double o = 0.0;
                for (int r = 0; r < F; r++) {
                    o += (double)w2[(size_t)i * F + r] * act[r];
                    dact[r] += g * dyn[i] * w2[(size_t)i * F + r];
                    d2[(size_t)i * F + r] += (float)(g * dyn[i] * act[r]);
                }
                dg += dyn[i] * o;
            }
            dscore[(size_t)n * E + e] += (float)dg;
            for (int r = 0; r < F; r++) {
                double a = hh[r], b = hh[F + r], sg = 1.0 / (1.0 + exp(-a));
                dh[r] = dact[r] * b * sg * (1.0 + a * (1.0 - sg));
                dh[F + r] = dact[r] * a * sg;
            }
            for (int r = 0; r < 2 * F; r++)
                for (int i = 0; i < C; i++) {
                    dx[(size_t)n * C + i] += (float)(dh[r] * w1[(size_t)r * C + i]);
                    d1[(size_t)r * C + i] += (float)(dh[r] * xn[i]);
                }
        }
    free(hh);
    free(act);
    free(dact);
    free(dh);
}

/* experts_matmul_fast schedules a layer's expert products on the threads;
   experts_matmul_ref runs them one after another. Each product is the same
   call either way, so the two must agree bit for bit, forward and backward. */
static void check_expert_schedule(const char *what, const float *x, const float *w, const int *offset, int E,
                                  int n_in, int n_out, int backward) {
    size_t rows = (size_t)offset[E], ny = rows * (backward ? n_in : n_out);
    float *y = calloc_check(ny, 4), *y_ref = calloc_check(ny, 4);
    experts_matmul_fast(y, x, w, offset, E, n_in, n_out, backward);
    experts_matmul_ref(y_ref, x, w, offset, E, n_in, n_out, backward);
    check_true(what, !memcmp(y, y_ref, ny * 4), "");
    free(y), free(y_ref);
}

static void test_moe(void) {
    // N, C, F, E, K, and how many tokens go to expert 0 first (K = 1): the fourth case sends every
    // token to one expert, the fifth gives expert 0 over half the rows, so that it runs on all threads
    // (experts_matmul_fast) while the small ones run with a thread each; they are read in place
    // (GM_SMALL), the sixth has SwiGLU rows longer than swiglu_backward's chunk, and in the last fc1's
    // rows are 1 KiB apart, C over GM_SMALL and 2F deeper than a block (GM_KC): an expert's d x on one
    // thread packs them (gemm's b_direct), on all threads reads them in place, in blocks as deep
    static const int cases[][6] = {{23, 16, 12, 5, 2, 0},
                                   {40, 32, 20, 8, 1, 0},
                                   {7, 8, 4, 4, 3, 0},
                                   {9, 8, 4, 2, 1, 0},
                                   {GM_SMALL + 60, 16, 8, 6, 1, GM_SMALL},
                                   {11, 8, 2 * SWIGLU_CHUNK + 40, 3, 2, 0},
                                   {40, 256, GM_KC / 2 + 32, 4, 1, 0}};
    Rng rng = {3};
    char what[96];
    for (size_t cs = 0; cs < sizeof cases / sizeof *cases; cs++) {
        int N = cases[cs][0], C = cases[cs][1], F = cases[cs][2], E = cases[cs][3], K = cases[cs][4], NK = N * K;
        float *x = randn((size_t)N * C, 1, &rng), *dy = randn((size_t)N * C, 1, &rng);
        float *fc1 = randn((size_t)E * 2 * F * C, 0.3f, &rng), *fc2 = randn((size_t)E * C * F, 0.3f, &rng);
        float *score = randn((size_t)N * E, 1, &rng);
        int *chosen = malloc_check((size_t)NK * sizeof(int));
        for (int n = 0; n < N; n++)  // K distinct experts per token, unevenly; the last expert gets none
            for (int k = 0; k < K; k++) chosen[n * K + k] = n < cases[cs][5] ? 0 : (n * 7 + n / 3 + k) % (E - 1);
        int *ints = malloc_check((2 * (size_t)NK + E + 1) * sizeof(int));
        Dispatch d = {ints, ints + NK, ints + 2 * NK};
        moe_dispatch(&d, chosen, NK, E);
        float *y = malloc_check((size_t)N * C * 4), *y_ref = malloc_check((size_t)N * C * 4);
        float *h = malloc_check((size_t)NK * 2 * F * 4), *eout = malloc_check((size_t)NK * C * 4);
        float *xs = malloc_check((size_t)NK * C * 4), *dxs = malloc_check((size_t)NK * C * 4);
        float *act = malloc_check((size_t)NK * F * 4), *act_kept = malloc_check((size_t)NK * F * 4);
        float *dx = calloc_check((size_t)N * C, 4), *dscore = calloc_check((size_t)N * E, 4);
        float *dfc1 = calloc_check((size_t)E * 2 * F * C, 4), *dfc2 = calloc_check((size_t)E * C * F, 4);
        float *dx_ref = calloc_check((size_t)N * C, 4), *dscore_ref = calloc_check((size_t)N * E, 4);
        float *dfc1_ref = calloc_check((size_t)E * 2 * F * C, 4), *dfc2_ref = calloc_check((size_t)E * C * F, 4);
        MoeLayer ml = {N, C, F, E, K, x, score, chosen, fc1, fc2, d};
        moe_forward(y, h, eout, xs, act, &ml);
        oracle_moe_forward(y_ref, &ml);
        snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d: experts scheduled = one by one, fc1", N, C, F, E, K);
        check_expert_schedule(what, xs, fc1, d.offset, E, C, 2 * F, 0);
        snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d: experts scheduled = one by one, d act", N, C, F, E, K);
        check_expert_schedule(what, eout, fc2, d.offset, E, F, C, 1);
        snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d: experts scheduled = one by one, d x", N, C, F, E, K);
        check_expert_schedule(what, h, fc1, d.offset, E, C, 2 * F, 1);
        moe_backward(dx, dscore, eout, h, act_kept, dxs, dy, &ml);
        snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d: backward's SwiGLU output = forward's, bit for bit", N, C, F, E, K);
        check_true(what, !memcmp(act_kept, act, (size_t)NK * F * 4), "");
        int *rows = malloc_check((size_t)NK * sizeof(int)), *xrows = malloc_check((size_t)NK * sizeof(int));
        GradScratch sc = {rows, xrows};
        pool_weight_grads(dfc1, dfc2, &sc, &(PoolRows){h, eout, act_kept, x, d.order, d.offset, 1, N}, N, C, F, E, K);
        oracle_moe_backward(dx_ref, dscore_ref, dfc1_ref, dfc2_ref, dy, &ml);
        const char *names[5] = {"y", "dx", "dscore", "dfc1", "dfc2"};
        float *got[5] = {y, dx, dscore, dfc1, dfc2}, *ref[5] = {y_ref, dx_ref, dscore_ref, dfc1_ref, dfc2_ref};
        size_t sizes[5] = {(size_t)N * C, (size_t)N * C, (size_t)N * E, (size_t)E * 2 * F * C, (size_t)E * C * F};
        for (int i = 0; i < 5; i++) {
            snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d %s", N, C, F, E, K, names[i]);
            check(what, got[i], ref[i], flat(sizes[i]), TOL_TWIN);
        }
        // a pool of two layers that routed alike: each expert's rows of both layers in one sum
        // (in chunks of N*K rows: more than one when an expert has over half of them), twice the gradient
        float *h2 = malloc_check((size_t)NK * 4 * F * 4), *eo2 = malloc_check((size_t)NK * 2 * C * 4);
        float *ak2 = malloc_check((size_t)NK * 2 * F * 4), *x2 = malloc_check((size_t)N * 2 * C * 4);
        int *ord2 = malloc_check((size_t)NK * 2 * sizeof(int)), *off2 = malloc_check((size_t)(E + 1) * 2 * sizeof(int));
        for (int j = 0; j < 2; j++) {
            memcpy(h2 + (size_t)j * NK * 2 * F, h, (size_t)NK * 2 * F * 4);
            memcpy(eo2 + (size_t)j * NK * C, eout, (size_t)NK * C * 4);
            memcpy(ak2 + (size_t)j * NK * F, act_kept, (size_t)NK * F * 4);
            memcpy(x2 + (size_t)j * N * C, x, (size_t)N * C * 4);
            memcpy(ord2 + (size_t)j * NK, d.order, (size_t)NK * sizeof(int));
            memcpy(off2 + (size_t)j * (E + 1), d.offset, (size_t)(E + 1) * sizeof(int));
        }
        memset(dfc1, 0, (size_t)E * 2 * F * C * 4), memset(dfc2, 0, (size_t)E * C * F * 4);
        pool_weight_grads(dfc1, dfc2, &sc, &(PoolRows){h2, eo2, ak2, x2, ord2, off2, 2, N}, N, C, F, E, K);
        for (size_t i = 0; i < (size_t)E * 2 * F * C; i++) dfc1_ref[i] *= 2;
        for (size_t i = 0; i < (size_t)E * C * F; i++) dfc2_ref[i] *= 2;
        for (int i = 3; i < 5; i++) {
            snprintf(what, sizeof what, "moe N%d C%d F%d E%d K%d %s, pool of 2 layers", N, C, F, E, K, names[i]);
            check(what, got[i], ref[i], flat(sizes[i]), TOL_TWIN);
        }
        free(h2), free(eo2), free(ak2), free(x2), free(ord2), free(off2), free(rows), free(xrows);
        free(x), free(dy), free(fc1), free(fc2), free(score), free(chosen), free(ints), free(y), free(y_ref);
        free(h), free(eout), free(xs), free(dxs), free(act), free(act_kept), free(dx), free(dscore);
        free(dfc1), free(dfc2), free(dx_ref), free(dscore_ref), free(dfc1_ref), free(dfc2_ref);
    }
}

/* NormRouter's c from the training program's estimator (100,000 draws, its
   fixed seed) against an independent estimator, dev/router_c.py (numpy).
   The mean it estimates is infinite for every E (a draw whose top entry is
   barely positive scores 1/u), but the tail that matters shrinks as 2^-E:
   - E >= 32: 10^7-draw means with standard errors near 0.005%; a 10^5-draw
     estimate lies within 0.3% of them.
   - E = 16: the heavy tail makes the 10^7-draw mean seed-dependent; compare
     with the median of 10^5-draw estimates, within 1% (90% of them fall in
     -0.2% .. +0.6%).
   A wrong norm, a missing relu or a top-K of the wrong size moves c by 10%
   or more. */
static void test_router_c(void) {
    static const struct { int E, K; double c, tol; } ref[] = {
        {32, 1, 2.826007, 3e-3}, {96, 1, 4.013615, 3e-3}, {96, 2, 3.022686, 3e-3},
        {16, 1, 2.405267, 1e-2}, {16, 2, 1.912824, 1e-2},
    };
    char what[96], detail[128];
    for (size_t i = 0; i < sizeof ref / sizeof *ref; i++) {
        double c = norm_router_c(ref[i].E, ref[i].K, ROUTER_C_DRAWS, ROUTER_C_SEED);
        double rel = fabs(c - ref[i].c) / ref[i].c;
        snprintf(what, sizeof what, "router_c E=%d K=%d", ref[i].E, ref[i].K);
        snprintf(detail, sizeof detail, "%.5f vs numpy %.5f: %.3f%% (tol %.1f%%)", c, ref[i].c, 100 * rel,
                 100 * ref[i].tol);
        check_true(what, rel <= ref[i].tol, detail);
    }
}

// A tiny model with random, input-dependent routing.
static void tiny_model(Model *m, int G, int E, int K, int router, int aux, uint64_t seed) {
    Config c = {.V = 61, .Vp = 64, .maxT = 16, .L = 4, .C = 32, .NH = 4, .NKV = 2, .F = 24, .G = G, .E = E,
                .K = K, .router = router, .aux = aux, .alpha = 1e-2f, .norm_eps = 1e-5f, .rope_theta = 100.0f,
                .router_c = 1.5f, .router_eps = 1e-8f};
    model_build(m, &c);
    Rng rng = {seed};
    for (int i = 0, off = 0; i < NUM_PARAM_TENSORS; off += (int)shape_numel(m->shapes[i]), i++)
        for (size_t j = 0; j < shape_numel(m->shapes[i]); j++)
            m->params_memory[off + j] = param_decay[i] ? 0.2f * (float)rng_normal(&rng) : 1.0f + 0.1f * (float)rng_normal(&rng);
}

static void tiny_tokens(int *tokens, int n, uint64_t seed) {
    Rng rng = {seed};
    for (int i = 0; i < n; i++) tokens[i] = (int)(rng_u64(&rng) % 61);
}

enum { TB = 2, TT = 8 };  // batch and length of the unit checks' micro-batches

/* Fixed points of SPEC section 4. A router that scores every expert 1/E
   (zero softmax logits) makes each layer's loss alpha E sum_j f_j / E = alpha
   whatever the counts: aux = L alpha per layer, G alpha per pool. And with
   G = L the pool loss on current counts is the per-layer loss, term by term. */
static void test_aux_fixed_points(void) {
    int tok[2 * TB * TT], in[TB * TT], tg[TB * TT];
    tiny_tokens(tok, TB * (TT + 1), 5);
    split_rows(in, tg, tok, TB, TT);
    static const struct { int G, aux; double want; } cases[] = {{4, AUX_LAYER, 4}, {1, AUX_POOL_CUR, 1}, {2, AUX_POOL_CUR, 2}};
    char what[96], detail[96];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        Model m;
        tiny_model(&m, cases[i].G, 6, 2, ROUTER_SOFTMAX, cases[i].aux, 11);
        memset(m.params.router, 0, (size_t)m.cfg.L * m.cfg.E * m.cfg.C * sizeof(float));
        model_forward(&m, in, tg, TB, TT, 0, 1);
        double want = cases[i].want * m.cfg.alpha, rel = fabs(m.aux - want) / want;
        snprintf(what, sizeof what, "uniform router G=%d aux=%d", cases[i].G, cases[i].aux);
        snprintf(detail, sizeof detail, "aux %.8f, want %.8f (%g alpha), rel err %.1e (tol 1e-6)", m.aux, want,
                 cases[i].want, rel);
        check_true(what, rel <= 1e-6, detail);
        model_free(&m);
    }
    Model a, b;
    tiny_model(&a, 4, 6, 2, ROUTER_NORM, AUX_LAYER, 12);
    tiny_model(&b, 4, 6, 2, ROUTER_NORM, AUX_POOL_CUR, 12);
    model_forward(&a, in, tg, TB, TT, 0, 1);
    model_backward(&a, 1.0f);
    model_forward(&b, in, tg, TB, TT, 0, 1);
    model_backward(&b, 1.0f);
    snprintf(detail, sizeof detail, "per-layer %.9f, pool %.9f (must be equal)", a.aux, b.aux);
    check_true("pool aux, current counts, G=L == per-layer aux", a.aux == b.aux && a.aux > 0, detail);
    check("pool aux G=L gradient == per-layer gradient", b.grads_memory, a.grads_memory, flat(a.num_params), (Tol){0});
    model_free(&a);
    model_free(&b);
}

/* The stale statistic (aux 2) is the previous *training* micro-batch's: the
   first micro-batch has no pool loss, and an evaluation pass in between
   changes nothing. */
static void test_stale_statistic(void) {
    int tok[3][TB * (TT + 1)], io[3][2][TB * TT];
    for (int i = 0; i < 3; i++) {
        tiny_tokens(tok[i], TB * (TT + 1), 20 + i);
        split_rows(io[i][0], io[i][1], tok[i], TB, TT);
    }
    Model a, b;
    tiny_model(&a, 1, 8, 1, ROUTER_NORM, AUX_POOL_PREV, 13);
    tiny_model(&b, 1, 8, 1, ROUTER_NORM, AUX_POOL_PREV, 13);
    model_forward(&a, io[0][0], io[0][1], TB, TT, 0, 1);
    char detail[128];
    snprintf(detail, sizeof detail, "aux %.3g (must be 0)", a.aux);
    check_true("stale pool aux: first micro-batch has none", a.aux == 0.0, detail);
    model_forward(&b, io[0][0], io[0][1], TB, TT, 0, 1);
    model_forward(&a, io[1][0], io[1][1], TB, TT, 0, 0);  // evaluation pass on other data
    model_forward(&a, io[2][0], io[2][1], TB, TT, 0, 1);
    model_forward(&b, io[2][0], io[2][1], TB, TT, 0, 1);
    snprintf(detail, sizeof detail, "with an eval pass between %.9f, without %.9f (must be equal, > 0)", a.aux, b.aux);
    check_true("stale pool aux: evaluation leaves it alone", a.aux == b.aux && a.aux > 0, detail);
    model_free(&a);
    model_free(&b);
}

/* The sigmoid router's balancing (SPEC section 3). The update, on counts
   written by hand: bias += rate sign(mean - count), sign(0) = 0, and the
   counts start again from zero. Then a bias that favours one expert takes
   every token of its layer while the gates stay the plain sigmoid of the
   logits; and a training forward counts what it routed. */
static void test_expert_bias(void) {
    Model m;
    tiny_model(&m, 4, 4, 1, ROUTER_SIGMOID, AUX_NONE, 17);
    m.cfg.bias_rate = 0.25f;
    static const int64_t counts[2][4] = {{5, 3, 4, 4}, {0, 0, 0, 16}};  // means 4 and 4
    static const float want[2][4] = {{-0.5f, 0.5f, 0.0f, 0.0f}, {0.5f, 0.5f, 0.5f, -0.5f}};
    for (int rep = 0; rep < 2; rep++) {
        memcpy(m.step_counts, counts, sizeof counts);
        expert_bias_update(&m);
    }
    int ok = 1;
    for (int j = 0; j < 8; j++) ok &= m.expert_bias[j] == want[j / 4][j % 4] && m.step_counts[j] == 0;
    for (int j = 8; j < 16; j++) ok &= m.expert_bias[j] == 0.0f;  // layers whose counts were all equal
    char detail[160];
    snprintf(detail, sizeof detail, "layer 0 % .2f % .2f % .2f % .2f, layer 1 % .2f % .2f % .2f % .2f", m.expert_bias[0],
             m.expert_bias[1], m.expert_bias[2], m.expert_bias[3], m.expert_bias[4], m.expert_bias[5],
             m.expert_bias[6], m.expert_bias[7]);
    check_true("expert bias: two updates by hand, a tie moves nothing", ok, detail);

    int tok[TB * (TT + 1)], in[TB * TT], tg[TB * TT], N = TB * TT, E = m.cfg.E;
    tiny_tokens(tok, TB * (TT + 1), 6);
    split_rows(in, tg, tok, TB, TT);
    memset(m.expert_bias, 0, 16 * sizeof(float));
    m.expert_bias[2] = 10.0f;  // layer 0 favours expert 2
    model_forward(&m, in, tg, TB, TT, 0, 1);
    int all2 = 1, plain = 1;
    for (int n = 0; n < N; n++) {
        all2 &= m.acts.chosen[n] == 2;
        plain &= m.acts.score[(size_t)n * E + 2] == sigmoid(m.acts.z[(size_t)n * E + 2]);
    }
    check_true("expert bias moves the choice, not the gate", all2 && plain, "");
    int64_t total = 0;
    for (int j = 0; j < 16; j++) total += m.step_counts[j];
    snprintf(detail, sizeof detail, "layer 0 expert 2 counted %lld of %d, all layers %lld of %d",
             (long long)m.step_counts[2], N, (long long)total, 4 * N);
    check_true("training forward counts its routing", m.step_counts[2] == N && total == 4 * N, detail);
    model_forward(&m, in, tg, TB, TT, 0, 0);  // an evaluation pass: its routing is not the step's
    int64_t after = 0;
    for (int j = 0; j < 16; j++) after += m.step_counts[j];
    snprintf(detail, sizeof detail, "all layers %lld after it, %lld before", (long long)after, (long long)total);
    check_true("evaluation forward leaves the step's counts alone", after == total, detail);
    model_free(&m);
}

/* Decoding with the KV cache gives the logits of the full forward: a prompt
   of 5 tokens, then 7 more one position at a time, against one forward over
   all 12. The paths differ only in how many rows each matmul sees. */
static void test_kv_cache(void) {
    Model m;
    tiny_model(&m, 1, 8, 2, ROUTER_NORM, AUX_POOL_PREV, 15);
    int tok[12], n = 12, V = m.cfg.V, Vp = m.cfg.Vp;
    tiny_tokens(tok, n, 40);
    act_alloc(&m, n);
    model_forward(&m, tok, NULL, 1, n, 0, 0);
    float *full = malloc_check((size_t)n * V * sizeof(float)), *inc = malloc_check((size_t)n * V * sizeof(float));
    for (int t = 0; t < n; t++) memcpy(full + (size_t)t * V, m.acts.logits + (size_t)t * Vp, V * sizeof(float));
    model_forward(&m, tok, NULL, 1, 5, 0, 0);
    for (int t = 0; t < 5; t++) memcpy(inc + (size_t)t * V, m.acts.logits + (size_t)t * Vp, V * sizeof(float));
    for (int t = 5; t < n; t++) {
        model_forward(&m, tok + t, NULL, 1, 1, t, 0);
        memcpy(inc + (size_t)t * V, m.acts.logits, V * sizeof(float));
    }
    check("KV-cache decoding == full forward (logits)", inc, full, (Shape){2, {n, V, 1}}, TOL_TWIN);
    free(full);
    free(inc);
    model_free(&m);
}

static int emitted[64], n_emitted;
static void collect(int token, void *ctx) {
    (void)ctx;
    emitted[n_emitted++] = token;
}

/* Generation with a seed is reproducible; a different seed gives other
   text; and a nucleus so small it holds one token is the argmax. */
static void test_generate(void) {
    Model m;
    tiny_model(&m, 4, 6, 1, ROUTER_SOFTMAX, AUX_LAYER, 16);
    // runs: seed 7, seed 7 again, seed 8, seed 7 with top-p 1e-6, temperature 0
    static const struct { uint64_t seed; float temperature, top_p; } runs[5] = {
        {7, 1.0f, 1.0f}, {7, 1.0f, 1.0f}, {8, 1.0f, 1.0f}, {7, 1.0f, 1e-6f}, {1, 0.0f, 1.0f}};
    int out[5][15];
    for (int r = 0; r < 5; r++) {
        int seq[16] = {3};
        Rng rng = {runs[r].seed};
        n_emitted = 0;
        generate(&m, seq, 1, 15, runs[r].temperature, runs[r].top_p, &rng, collect, NULL);
        memcpy(out[r], emitted, sizeof out[r]);
    }
    check_true("generation: same seed, same tokens", !memcmp(out[0], out[1], sizeof out[0]), "");
    check_true("generation: another seed, other tokens", memcmp(out[0], out[2], sizeof out[0]) != 0, "");
    check_true("generation: top-p 1e-6 is the argmax", !memcmp(out[3], out[4], sizeof out[3]), "");
    model_free(&m);
}

// ----------------------------------------------------------------------------
// The resume rules of the training program

/* 1 if checkpoint_header accepts the file. It exits on a rejection, as the
   programs do, so it runs in a child process (its message goes nowhere). */
static int header_accepts(const char *path) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stderr)) _exit(3);
        CheckpointHeader ck;
        checkpoint_header(path, &ck);
        _exit(0);
    }
    int status;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* A checkpoint with the training state, saved as the training program saves
   it, is accepted; each damaged header field, one at a time, is refused
   (the bytes written over it: int32 at byte 4 i, float at 1024 + 4 i,
   uint64 at 1280 + 8 i, the path block at 1536); the same file in version 1
   is accepted. */
static void test_checkpoint_header(void) {
    Model m;
    tiny_model(&m, 1, 4, 1, ROUTER_NORM, AUX_POOL_PREV, 3);
    TrainConfig tc = {.B = 2, .T = 8, .n_micro = 1, .steps = 10, .warmup = 1, .val_every = 5, .val_batches = 1,
                      .sample_every = 0, .gen_tokens = 8, .ckpt_every = 5, .keep = 2, .seed = 1337, .lr_floor = 0.1f,
                      .opt = {.lr = 1e-3f, .b1 = 0.9f, .b2 = 0.999f, .eps = 1e-8f, .wd = 0.01f, .clip = 1.0f}};
    TrainState st = {.step = 5, .sampler = 99, .paths = {"/data/t_*.bin", "/data/v_*.bin", "/data/tok.bin"}};
    m.adam_t = 5;
    char path[64], bad[80];
    snprintf(path, sizeof path, "/tmp/unipool-test-%d.bin", (int)getpid());
    snprintf(bad, sizeof bad, "%s.bad", path);
    checkpoint_save(path, &m, &tc, &st);
    FILE *f = fopen_check(path, "rb");
    fseek(f, 0, SEEK_END);
    size_t n = (size_t)ftell(f);
    unsigned char *blob = malloc_check(n), *copy = malloc_check(n);
    rewind(f);
    fread_check(blob, 1, n, f, path);
    fclose(f);
    check_true("checkpoint header: the saved file is accepted", header_accepts(path), "");
    static const struct { const char *what; int at; char type; double value; } cases[] = {
        {"training-state flag 2", 4 * 2, 'i', 2}, {"B 2^24 + 2", 4 * 16, 'i', (1 << 24) + 2},
        {"steps -8", 4 * 19, 'i', -8}, {"steps done 11 of 10", 4 * 27, 'i', 11}, {"steps done -5", 4 * 27, 'i', -5},
        {"AdamW steps 6 of 5 done", 4 * 28, 'i', 6}, {"stale flag 2", 4 * 29, 'i', 2},
        {"a non-zero unused int", 4 * 100, 'i', 1}, {"alpha -163.84", 1024, 'f', -163.84},
        {"lr NaN", 1024 + 4 * 5, 'f', NAN}, {"eps 0", 1024 + 4 * 8, 'f', 0}, {"a non-zero unused float", 1024 + 4 * 40, 'f', 1},
        {"seed 2^40", 1280, 'q', 0x1p40}, {"epoch 11 after 10 rows", 1280 + 8, 'q', 11},
        {"a non-zero unused uint64", 1280 + 8 * 20, 'q', 1}, {"a path without its NUL", 1536, 's', 0},
        {"a byte after a path's NUL", 1536 + 1024 + 1000, 'b', 1}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memcpy(copy, blob, n);
        unsigned char *p = copy + cases[i].at;
        int32_t vi = (int32_t)cases[i].value;
        float vf = (float)cases[i].value;
        uint64_t vq = (uint64_t)cases[i].value;
        if (cases[i].type == 'i') memcpy(p, &vi, 4);
        else if (cases[i].type == 'f') memcpy(p, &vf, 4);
        else if (cases[i].type == 'q') memcpy(p, &vq, 8);
        else if (cases[i].type == 's') memset(p, 'x', CKPT_PATH_BYTES);
        else *p = 1;
        f = fopen_check(bad, "wb");
        fwrite(copy, 1, n, f);
        fclose(f);
        char what[96];
        snprintf(what, sizeof what, "checkpoint header: %s refused", cases[i].what);
        check_true(what, !header_accepts(bad), "");
    }
    // version 1: the same state without the path block and the fingerprint
    memcpy(copy, blob, CKPT_HEADER_BYTES);
    int32_t v1 = CKPT_VERSION_1;
    memcpy(copy + 4, &v1, 4);
    memset(copy + 1280 + 8 * 5, 0, 8);
    memcpy(copy + CKPT_HEADER_BYTES, blob + CKPT_HEADER_BYTES + CKPT_PATHS * CKPT_PATH_BYTES,
           n - CKPT_HEADER_BYTES - CKPT_PATHS * CKPT_PATH_BYTES);
    f = fopen_check(bad, "wb");
    fwrite(copy, 1, n - CKPT_PATHS * CKPT_PATH_BYTES, f);
    fclose(f);
    check_true("checkpoint header: the same state in version 1 is accepted", header_accepts(bad), "");
    remove(path);
    remove(bad);
    free(blob);
    free(copy);
    model_free(&m);
}

/* A loader position is in the shards when the shard is an index of the
   epoch's order and the row at most that shard's rows; the fingerprint moves
   with any shard's count or width and with their number. */
static void test_loader_position(void) {
    size_t count[3] = {4 * 5 + 1, 4 * 3 + 1, 4 * 7 + 1};
    int version[3] = {SHARD_VERSION_U16, SHARD_VERSION_U16, SHARD_VERSION_U32}, order[3];
    DataLoader d = {.count = count, .version = version, .n = 2, .T = 4, .shuffle = 1, .seed = 7};
    char buf[160];
    int ok = 1;
    for (int64_t e = 0; e < 4; e++) {
        loader_shard_order(&d, e, order);
        for (int s = 0; s < 2; s++) {
            uint64_t rows = (count[order[s]] - 1) / 4;
            ok &= !loader_position_error(&d, (uint64_t)e, (uint64_t)s, rows, buf, sizeof buf) &&
                  loader_position_error(&d, (uint64_t)e, (uint64_t)s, rows + 1, buf, sizeof buf) != NULL;
        }
        ok &= loader_position_error(&d, (uint64_t)e, 2, 0, buf, sizeof buf) != NULL;
    }
    ok &= loader_position_error(&d, 1ull << 31, 0, 0, buf, sizeof buf) != NULL;
    check_true("loader position: rows up to the shard's, shards of the order, nothing past", ok, "");
    uint64_t fp = loader_fingerprint(&d);
    count[1]++;
    uint64_t fp_count = loader_fingerprint(&d);
    count[1]--, version[1] = SHARD_VERSION_U32;
    uint64_t fp_width = loader_fingerprint(&d);
    version[1] = SHARD_VERSION_U16, d.n = 3;
    uint64_t fp_more = loader_fingerprint(&d);
    d.n = 2;
    check_true("shard fingerprint: moves with a count, a width, a shard more; never 0",
               fp && fp != fp_count && fp != fp_width && fp != fp_more && fp == loader_fingerprint(&d), "");
}

/* The ETA's step time: the mean of the last ETA_WINDOW steps, the process's
   first step left out once there is another. */
static void test_eta_mean(void) {
    StepTimes s = {0};
    step_times_add(&s, 9.0);
    int ok = step_times_mean(&s) == 9.0;
    step_times_add(&s, 2.0);
    ok &= step_times_mean(&s) == 2.0;
    double want = 0.0;
    for (int i = 1; i <= 30; i++) step_times_add(&s, i);
    for (int i = 11; i <= 30; i++) want += i;
    ok &= fabs(step_times_mean(&s) - want / 20) < 1e-12;
    check_true("ETA: mean of the last 20 step times, the first left out", ok, "");
}

/* The thread count beside other processes: the cores they left, rounded, at
   least 1, at most the count the run started with. */
static void test_sharing_threads(void) {
    static const struct { int most; double others; int want; } cases[] = {
        {2, 0.0, 2}, {2, -0.05, 2}, {2, 0.4, 2}, {2, 0.6, 1}, {2, 1.0, 1}, {2, 1.3, 1}, {2, 7.0, 1},
        {8, 2.6, 5}, {8, 2.4, 6}, {8, 0.0, 8},
    };
    int ok = 1;
    char detail[128] = "";
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int got = sharing_threads(cases[i].most, cases[i].others);
        if (got != cases[i].want) {
            ok = 0;
            snprintf(detail, sizeof detail, "%d threads, others %.2f: got %d, want %d", cases[i].most,
                     cases[i].others, got, cases[i].want);
        }
    }
    check_true("threads beside other processes", ok, detail);
}

/* The padded vocabulary and the FLOP count per token, worked by hand for the
   tiny UniPool (L 4, C 128, NH 4, NKV 2, F 512, E 32, K 1, T 128, V 50257):
   head 6 x 51200 x 128; attention 4 x (6 (2 128 128 + 2 64 128) + 6 x 128 x
   128); routers 4 x 6 x 32 x 128; experts 4 x 6 x 3 x 512 x 128. */
static void test_flops(void) {
    int ok = padded_vocab(50257) == 51200 && padded_vocab(8192) == 8192 && padded_vocab(300) == 1024 &&
             padded_vocab(1025) == 2048;
    check_true("padded vocabulary: whole blocks of 1024", ok, "");
    Config c = {.V = 50257, .Vp = 51200, .L = 4, .C = 128, .NH = 4, .NKV = 2, .F = 512, .G = 1, .E = 32, .K = 1};
    Flops f = training_flops(&c, 128);
    ok = f.head == 39321600.0 && f.attention == 1572864.0 && f.routers == 98304.0 && f.experts == 4718592.0 &&
         flops_total(f) == 45711360.0;
    char detail[160];
    snprintf(detail, sizeof detail, "head %.0f attention %.0f routers %.0f experts %.0f", f.head, f.attention,
             f.routers, f.experts);
    check_true("training FLOPs per token, by part", ok, detail);
    c.K = 2;  // each token runs two experts: twice the experts' FLOPs, the rest unchanged
    f = training_flops(&c, 128);
    check_true("training FLOPs per token, K = 2", f.experts == 9437184.0 && f.head == 39321600.0, "");
}

/* Every reduction has one owner and a fixed order, so a step gives the same
   bits on 1 thread and on 2; the program may change its thread count between
   steps (see test_sharing_threads) for this reason. */
static void test_thread_determinism(void) {
#ifdef _OPENMP
    int tok[2 * TB * (TT + 1)];
    tiny_tokens(tok, 2 * TB * (TT + 1), 30);
    float *grads[2];
    int threads[2] = {1, 2}, saved = omp_get_max_threads();
    for (int i = 0; i < 2; i++) {
        Model m;
        tiny_model(&m, 2, 6, 2, ROUTER_NORM, AUX_POOL_PREV, 14);
        omp_set_num_threads(threads[i]);
        step_gradients(&m, tok, 2, TB, TT);
        grads[i] = copy(m.grads_memory, m.num_params);
        model_free(&m);
    }
    omp_set_num_threads(saved);
    Model m;
    tiny_model(&m, 2, 6, 2, ROUTER_NORM, AUX_POOL_PREV, 14);
    check("step gradient, 2 threads == 1 thread", grads[1], grads[0], flat(m.num_params), (Tol){0});
    model_free(&m);
    free(grads[0]);
    free(grads[1]);
#endif
}

int main(int argc, char **argv) {
    int unreadable = 0;
    if (argc > 1) {
        for (int i = 1; i < argc; i++) unreadable |= run_dump(argv[i]) < 0;
    } else {
        test_matmul();
        test_exp();
        test_attention();
        test_moe();
        test_router_c();
        test_aux_fixed_points();
        test_stale_statistic();
        test_expert_bias();
        test_thread_determinism();
        test_kv_cache();
        test_generate();
        test_checkpoint_header();
        test_loader_position();
        test_eta_mean();
        test_sharing_threads();
        test_flops();
        glob_t g;
        if (glob(DEFAULT_DUMPS, 0, NULL, &g) != 0 || g.gl_pathc == 0) {
            printf("UNREADABLE %s: no dumps found; run from the repository root\n", DEFAULT_DUMPS);
            unreadable = 1;
        } else {
            for (size_t i = 0; i < g.gl_pathc; i++) unreadable |= run_dump(g.gl_pathv[i]) < 0;
        }
        globfree(&g);
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return unreadable ? EXIT_USAGE : n_fail ? EXIT_FAILURE : EXIT_SUCCESS;
}
