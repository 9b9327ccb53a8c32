/*
train_unipool.c: Mixture-of-Experts language-model training in one C file, for
vanilla MoE (every layer owns its experts) and UniPool (every layer's router
draws from one globally shared expert pool, arXiv 2605.06665).

The idea fits in a sentence: the experts of all layers live in one buffer of
G*E experts, and layer l's router chooses among the E experts of pool
g(l) = l / (L/G). G = L is vanilla MoE, G = 1 is UniPool, anything between is
a grouped pool. Nothing else in the code knows which of them it runs.

The model (../shared/SPEC.md is the contract, to the last term):
  token embedding -> L pre-norm blocks [RMSNorm, causal attention with GQA and
  rotate-half RoPE, RMSNorm, router + top-K of SwiGLU experts] -> RMSNorm ->
  untied LM head over a padded vocabulary.

Reading order: helpers, configuration and the parameter table, layers (each
_forward next to its _backward, fast kernels next to their naive twins), the
model, the optimizer, the training step, main.

Short names, the same everywhere:
  B batch, T time, N = B*T tokens, C channels, L layers, NH query heads,
  NKV key/value heads, hd head size, F expert hidden size, G pools,
  E experts per pool (= router candidates), K experts per token, V vocab,
  Vp padded vocab. Every tensor comment gives its shape in these names.
*/
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// Errors and checked helpers. Every failure is one line on stderr naming the
// file (or flag) and what to do, and the process exits 1 (2 for bad usage).

#define EXIT_USAGE 2

// Naive twins of the fast kernels are only called by test_unipool.c.
#define NAIVE_TWIN __attribute__((unused)) static

__attribute__((format(printf, 1, 2), noreturn))
static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(EXIT_FAILURE);
}

static FILE *fopen_check_(const char *path, const char *mode, const char *src, int line) {
    FILE *f = fopen(path, mode);
    if (!f) fail("cannot open '%s' (%s): %s; check the path and permissions [%s:%d]",
                 path, mode[0] == 'r' ? "read" : "write", strerror(errno), src, line);
    return f;
}
#define fopen_check(path, mode) fopen_check_(path, mode, __FILE__, __LINE__)

// Reads exactly n items or fails naming the file: short files are the usual
// sign of a truncated download or an interrupted write.
static void fread_check_(void *dst, size_t size, size_t n, FILE *f, const char *path,
                         const char *src, int line) {
    size_t got = fread(dst, size, n, f);
    if (got != n) fail("'%s' is truncated or unreadable (wanted %zu items of %zu bytes, got %zu); "
                       "re-create the file [%s:%d]", path, n, size, got, src, line);
}
#define fread_check(dst, size, n, f, path) fread_check_(dst, size, n, f, path, __FILE__, __LINE__)

static void *malloc_check_(size_t size, const char *src, int line) {
    void *p = malloc(size ? size : 1);
    if (!p) fail("out of memory allocating %.1f MiB; use a smaller model or batch [%s:%d]",
                 size / 1048576.0, src, line);
    return p;
}
#define malloc_check(size) malloc_check_(size, __FILE__, __LINE__)

static void *calloc_check_(size_t n, size_t size, const char *src, int line) {
    void *p = calloc(n ? n : 1, size);
    if (!p) fail("out of memory allocating %.1f MiB; use a smaller model or batch [%s:%d]",
                 (double)n * size / 1048576.0, src, line);
    return p;
}
#define calloc_check(n, size) calloc_check_(n, size, __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// Random numbers: splitmix64, small and fully determined by its seed.

typedef struct { uint64_t s; } Rng;

static uint64_t rng_u64(Rng *r) {
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_uniform(Rng *r) { return (double)(rng_u64(r) >> 11) * 0x1.0p-53; }  // [0, 1)

static double rng_normal(Rng *r) {  // Box-Muller; 1 - u keeps log() away from 0
    double u = 1.0 - rng_uniform(r), w = rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * w);
}

// ----------------------------------------------------------------------------
// Configuration (SPEC section 1) and the parameter table (SPEC section 2)

/* File magics, one constant each; the dev/ Python scripts read them from here. */
#define DUMP_MAGIC 20261125      // reference dump (SPEC section 6)
#define DUMP_VERSION 1
#define SHARD_MAGIC 20240520     // llm.c token shard: int32[256] header, then tokens
#define SHARD_VERSION_U16 1      // tokens are uint16
#define SHARD_VERSION_U32 7      // tokens are uint32
#define TOKENIZER_MAGIC 20240328 // llm.c decoding table: uint32[256] header, then (length, bytes) per token
#define TOKENIZER_VERSION 2

enum { ROUTER_SOFTMAX = 0, ROUTER_NORM = 1 };
enum { AUX_NONE = 0, AUX_LAYER = 1, AUX_POOL_PREV = 2, AUX_POOL_CUR = 3 };

typedef struct {
    int V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux;
    float alpha, norm_eps, rope_theta, router_c, router_eps;
} Config;

#define HD(c) ((c)->C / (c)->NH)

/* The one table of parameter tensors: name, weight decay (AdamW), rank, shape.
   Allocation, checkpoints, the decay mask and the tests all walk it. */
#define PARAM_TABLE(X, c)                                                   \
    X(wte,          1, 2, (c)->Vp,           (c)->C,          1)            \
    X(attn_norm,    0, 2, (c)->L,            (c)->C,          1)            \
    X(wq,           1, 3, (c)->L,            (c)->NH * HD(c), (c)->C)       \
    X(wk,           1, 3, (c)->L,            (c)->NKV * HD(c), (c)->C)      \
    X(wv,           1, 3, (c)->L,            (c)->NKV * HD(c), (c)->C)      \
    X(wo,           1, 3, (c)->L,            (c)->C,          (c)->NH * HD(c)) \
    X(ffn_norm,     0, 2, (c)->L,            (c)->C,          1)            \
    X(router,       1, 3, (c)->L,            (c)->E,          (c)->C)       \
    X(router_scale, 0, 1, (c)->L,            1,               1)            \
    X(expert_fc1,   1, 3, (c)->G * (c)->E,   2 * (c)->F,      (c)->C)       \
    X(expert_fc2,   1, 3, (c)->G * (c)->E,   (c)->C,          (c)->F)       \
    X(final_norm,   0, 1, (c)->C,            1,               1)            \
    X(lm_head,      1, 2, (c)->Vp,           (c)->C,          1)

#define X_ENUM(name, ...) PT_##name,
enum { PARAM_TABLE(X_ENUM, 0) NUM_PARAM_TENSORS };
#undef X_ENUM

typedef struct {
#define X_FIELD(name, ...) float *name;
    PARAM_TABLE(X_FIELD, 0)
#undef X_FIELD
} ParamTensors;

#define X_NAME(name, ...) #name,
static const char *const param_names[NUM_PARAM_TENSORS] = {PARAM_TABLE(X_NAME, 0)};
#undef X_NAME
#define X_DECAY(name, decay, ...) decay,
static const int param_decay[NUM_PARAM_TENSORS] = {PARAM_TABLE(X_DECAY, 0)};
#undef X_DECAY

typedef struct { int rank; size_t dim[3]; } Shape;

static void param_shapes(Shape shapes[NUM_PARAM_TENSORS], const Config *c) {
    int i = 0;
#define X_SHAPE(name, decay, rank, d0, d1, d2) shapes[i++] = (Shape){rank, {d0, d1, d2}};
    PARAM_TABLE(X_SHAPE, c)
#undef X_SHAPE
}

static size_t shape_numel(Shape s) { return s.dim[0] * s.dim[1] * s.dim[2]; }

// Points the struct's fields into one contiguous buffer, in table order.
static void param_point(ParamTensors *p, float *memory, const Shape shapes[NUM_PARAM_TENSORS]) {
    float **fields[NUM_PARAM_TENSORS] = {
#define X_PTR(name, ...) &p->name,
        PARAM_TABLE(X_PTR, 0)
#undef X_PTR
    };
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        *fields[i] = memory;
        memory += shape_numel(shapes[i]);
    }
}

// Returns NULL if the configuration is usable, else what is wrong with it.
static const char *config_error(const Config *c) {
    if (c->V < 1 || c->Vp < c->V) return "need 1 <= V <= Vp";
    if (c->L < 1 || c->C < 1 || c->F < 1 || c->maxT < 1) return "L, C, F and maxT must be positive";
    if (c->NH < 1 || c->NKV < 1 || c->NH % c->NKV) return "NH must be a multiple of NKV";
    if (c->C % c->NH || HD(c) % 2) return "C / NH (the head size) must be an even whole number";
    if (c->G < 1 || c->L % c->G) return "the number of pools G must divide L";
    if (c->E < 1 || c->K < 1 || c->K > c->E) return "need 1 <= K <= E";
    if (c->router != ROUTER_SOFTMAX && c->router != ROUTER_NORM) return "router must be 0 or 1";
    if (c->aux < AUX_NONE || c->aux > AUX_POOL_CUR) return "aux must be 0..3";
    if (!(c->norm_eps > 0) || !(c->rope_theta > 0)) return "norm_eps and rope_theta must be > 0";
    return NULL;
}

// ----------------------------------------------------------------------------
// Small vector helpers. gcc vectorises a float sum only when it may reorder
// it; 16 independent partial sums give it that freedom without -ffast-math,
// and the order (hence the result) is fixed.

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {  // y += a x
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

// ----------------------------------------------------------------------------
// Layers. Outputs first in every argument list; backward functions accumulate
// (+=) into parameter gradients and into the input gradient.

// x[n] = wte[token[n]]
static void encoder_forward(float *out, const int *tokens, const float *wte, int N, int C) {
    // out (N,C), tokens (N), wte (Vp,C)
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, C * sizeof(float));
}

static void encoder_backward(float *dwte, const float *dout, const int *tokens, int N, int C) {
    // dwte (Vp,C) +=, dout (N,C); in token order, so repeated tokens add up deterministically
    for (int n = 0; n < N; n++) axpy(dwte + (size_t)tokens[n] * C, 1.0f, dout + (size_t)n * C, C);
}

// y = x / sqrt(mean(x^2) + eps) * w
static void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int C,
                            float eps) {
    // out (N,C), rstd (N), inp (N,C), w (C)
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float r = 1.0f / sqrtf(dot(x, x, C) / C + eps);
        for (int i = 0; i < C; i++) y[i] = x[i] * r * w[i];
        rstd[n] = r;
    }
}

// With u = x r, g = dy * w:  dx = r (g - u mean(g u)),  dw = sum_n dy u
static void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                             const float *rstd, int N, int C) {
    // dinp (N,C) +=, dw (C) +=, dout (N,C), inp (N,C), w (C), rstd (N)
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float r = rstd[n], gu = 0.0f;
        for (int i = 0; i < C; i++) gu += dy[i] * w[i] * x[i];
        gu *= r / C;
        for (int i = 0; i < C; i++) dx[i] += r * (dy[i] * w[i] - x[i] * r * gu);
    }
    // dw reduces over tokens: split by channel so each sum has one owner and a fixed order
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += dout[(size_t)n * C + i] * inp[(size_t)n * C + i] * rstd[n];
        dw[i] += s;
    }
}

/* Matrix multiply, the layout of nn.Linear: out (M,N) = inp (M,K) W^T with
   W (N,K). The forward is a tile of dot products (both operands run along
   K); the two backward products are tiles of row updates (rows of W or of
   inp run along the output). Each output element has one owner and a fixed
   summation order, so results do not depend on the thread count. */

#define MM_MR 4   // rows of inp per forward tile
#define MM_NR 4   // rows of W per forward tile
#define MM_KC 64  // output columns held in registers by the backward tile

static void matmul_forward(float *out, const float *inp, const float *w, int M, int K, int N) {
    // out (M,N), inp (M,K), w (N,K)
    int mt = (M + MM_MR - 1) / MM_MR, nt = (N + MM_NR - 1) / MM_NR;
#pragma omp parallel for schedule(static)
    for (int tile = 0; tile < mt * nt; tile++) {
        int m0 = (tile / nt) * MM_MR, n0 = (tile % nt) * MM_NR;
        if (m0 + MM_MR > M || n0 + MM_NR > N) {  // ragged edge
            for (int m = m0; m < M && m < m0 + MM_MR; m++)
                for (int n = n0; n < N && n < n0 + MM_NR; n++)
                    out[(size_t)m * N + n] = dot(inp + (size_t)m * K, w + (size_t)n * K, K);
            continue;
        }
        const float *a[MM_MR], *b[MM_NR];
        for (int i = 0; i < MM_MR; i++) a[i] = inp + (size_t)(m0 + i) * K;
        for (int j = 0; j < MM_NR; j++) b[j] = w + (size_t)(n0 + j) * K;
        float acc[MM_MR][MM_NR][16] = {{{0}}};
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int i = 0; i < MM_MR; i++)
                for (int j = 0; j < MM_NR; j++)
                    for (int l = 0; l < 16; l++) acc[i][j][l] += a[i][k + l] * b[j][k + l];
        for (int i = 0; i < MM_MR; i++)
            for (int j = 0; j < MM_NR; j++) {
                float s = 0.0f;
                for (int kk = k; kk < K; kk++) s += a[i][kk] * b[j][kk];
                for (int l = 0; l < 16; l++) s += acc[i][j][l];
                out[(size_t)(m0 + i) * N + n0 + j] = s;
            }
    }
}

/* c (I,J) += sum_p a(i,p) b(p,:), with a(i,p) = a[i*ai + p*ap] and b rows of
   stride ldb. Both backward products are this shape:
     dinp (M,K) += dout (M,N) W (N,K):     i = m, p = n
     dW   (N,K) += dout^T (N,M) inp (M,K): i = n, p = m                     */
static void matmul_rows(float *c, const float *a, size_t ai, size_t ap, const float *b, int ldb, int I,
                        int J, int P) {
    int it = (I + MM_MR - 1) / MM_MR, jt = (J + MM_KC - 1) / MM_KC;
#pragma omp parallel for schedule(static)
    for (int tile = 0; tile < it * jt; tile++) {
        int i0 = (tile / jt) * MM_MR, j0 = (tile % jt) * MM_KC;
        int ni = I - i0 < MM_MR ? I - i0 : MM_MR, nj = J - j0 < MM_KC ? J - j0 : MM_KC;
        if (ni < MM_MR || nj < MM_KC) {  // ragged edge
            for (int i = i0; i < i0 + ni; i++)
                for (int p = 0; p < P; p++)
                    axpy(c + (size_t)i * J + j0, a[i * ai + p * ap], b + (size_t)p * ldb + j0, nj);
            continue;
        }
        float acc[MM_MR][MM_KC];
        for (int i = 0; i < MM_MR; i++) memcpy(acc[i], c + (size_t)(i0 + i) * J + j0, sizeof acc[i]);
        for (int p = 0; p < P; p++) {
            const float *bp = b + (size_t)p * ldb + j0;
            for (int i = 0; i < MM_MR; i++) {
                float av = a[(i0 + i) * ai + p * ap];
                for (int j = 0; j < MM_KC; j++) acc[i][j] += av * bp[j];
            }
        }
        for (int i = 0; i < MM_MR; i++) memcpy(c + (size_t)(i0 + i) * J + j0, acc[i], sizeof acc[i]);
    }
}

static void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                            int M, int K, int N) {
    // dinp (M,K) += (may be NULL), dw (N,K) +=, dout (M,N), inp (M,K), w (N,K)
    if (dinp) matmul_rows(dinp, dout, (size_t)N, 1, w, K, M, K, N);
    matmul_rows(dw, dout, 1, (size_t)N, inp, K, N, K, M);
}

// The naive twins the tests hold the fast kernels to.
NAIVE_TWIN void matmul_forward_naive(float *out, const float *inp, const float *w, int M, int K, int N) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += (double)inp[(size_t)m * K + k] * w[(size_t)n * K + k];
            out[(size_t)m * N + n] = (float)s;
        }
}

NAIVE_TWIN void matmul_backward_naive(float *dinp, float *dw, const float *dout, const float *inp,
                                  const float *w, int M, int K, int N) {
    for (int m = 0; m < M && dinp; m++)
        for (int k = 0; k < K; k++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) s += (double)dout[(size_t)m * N + n] * w[(size_t)n * K + k];
            dinp[(size_t)m * K + k] += (float)s;
        }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            double s = 0.0;
            for (int m = 0; m < M; m++) s += (double)dout[(size_t)m * N + n] * inp[(size_t)m * K + k];
            dw[(size_t)n * K + k] += (float)s;
        }
}

/* RoPE, rotate-half: for i < hd/2, the pair (u[i], u[i+hd/2]) turns by the
   angle t w_i, w_i = theta^(-2i/hd). The backward turns the gradient back by
   the same angle (dir = -1): a rotation's inverse is its transpose. */
static void rope_table(float *cosv, float *sinv, int maxT, int hd, float theta) {
    // cosv, sinv (maxT, hd/2); angles in double, as the float64 reference does
    for (int t = 0; t < maxT; t++)
        for (int i = 0; i < hd / 2; i++) {
            double ang = t * pow((double)theta, -2.0 * i / hd);
            cosv[t * (hd / 2) + i] = (float)cos(ang);
            sinv[t * (hd / 2) + i] = (float)sin(ang);
        }
}

static void rope_apply(float *x, const float *cosv, const float *sinv, int N, int T, int nh, int hd,
                       int dir) {
    // x (N, nh*hd) in place; token n sits at position n % T
    int h2 = hd / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *cs = cosv + (size_t)(n % T) * h2, *sn = sinv + (size_t)(n % T) * h2;
        for (int h = 0; h < nh; h++) {
            float *u = x + ((size_t)n * nh + h) * hd;
            for (int i = 0; i < h2; i++) {
                float a = u[i], b = u[i + h2], s = dir * sn[i];
                u[i] = a * cs[i] - b * s;
                u[i + h2] = a * s + b * cs[i];
            }
        }
    }
}

/* Causal attention with grouped key/value heads; query head h reads kv head
   h / (NH/NKV). The forward keeps only the output and each row's logsumexp
   (online softmax), never the T x T matrix; the backward recomputes
   p = exp(q.k/sqrt(hd) - lse) and uses ds = p (do.v - do.o). */
static void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                              int B, int T, int NH, int NKV, int hd) {
    // out (B,T,NH*hd), lse (B,T,NH), q (B,T,NH*hd), k, v (B,T,NKV*hd)
    float scale = 1.0f / sqrtf((float)hd);
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
#pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++) {
                const float *qt = q + ((size_t)b * T + t) * qs + h * hd;
                const float *kb = k + (size_t)b * T * ks + (h / grp) * hd;
                const float *vb = v + (size_t)b * T * ks + (h / grp) * hd;
                float *o = out + ((size_t)b * T + t) * qs + h * hd;
                float m = -INFINITY, l = 0.0f;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int s = 0; s <= t; s++) {
                    float sc = dot(qt, kb + (size_t)s * ks, hd) * scale;
                    if (sc > m) {  // a new maximum: rescale what is summed so far
                        float corr = expf(m - sc);
                        l *= corr;
                        for (int i = 0; i < hd; i++) o[i] *= corr;
                        m = sc;
                    }
                    float p = expf(sc - m);
                    l += p;
                    axpy(o, p, vb + (size_t)s * ks, hd);
                }
                for (int i = 0; i < hd; i++) o[i] /= l;
                lse[((size_t)b * T + t) * NH + h] = m + logf(l);
            }
}

static void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                               const float *k, const float *v, const float *out, const float *lse, int B,
                               int T, int NH, int NKV, int hd) {
    // dq (B,T,NH*hd) +=, dk, dv (B,T,NKV*hd) +=, dout, out (B,T,NH*hd), lse (B,T,NH)
    float scale = 1.0f / sqrtf((float)hd);
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    // one task per (batch, kv head): it alone writes that head's dk and dv
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < NKV; kh++)
            for (int h = kh * grp; h < (kh + 1) * grp; h++)
                for (int t = 0; t < T; t++) {
                    size_t qo = ((size_t)b * T + t) * qs + h * hd;
                    const float *qt = q + qo, *dot_ = dout + qo;
                    float D = dot(dot_, out + qo, hd), l = lse[((size_t)b * T + t) * NH + h];
                    for (int s = 0; s <= t; s++) {
                        size_t ko = ((size_t)b * T + s) * ks + kh * hd;
                        float p = expf(dot(qt, k + ko, hd) * scale - l);
                        float ds = p * (dot(dot_, v + ko, hd) - D) * scale;
                        axpy(dq + qo, ds, k + ko, hd);
                        axpy(dk + ko, ds, qt, hd);
                        axpy(dv + ko, p, dot_, hd);
                    }
                }
}

// The naive twin: the full T x T probability matrix per head, as textbooks write it.
NAIVE_TWIN void attention_forward_naive(float *out, float *att, const float *q, const float *k, const float *v,
                                    int B, int T, int NH, int NKV, int hd) {
    // out (B,T,NH*hd), att (B,NH,T,T) probabilities (0 above the diagonal)
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                float *a = att + (((size_t)b * NH + h) * T + t) * T;
                double mx = -INFINITY, sum = 0.0;
                for (int s = 0; s < T; s++) {
                    double sc = 0.0;
                    for (int i = 0; i < hd; i++)
                        sc += (double)q[((size_t)b * T + t) * qs + h * hd + i] *
                              k[((size_t)b * T + s) * ks + (h / grp) * hd + i];
                    a[s] = s <= t ? (float)(sc / sqrt((double)hd)) : -INFINITY;
                    if (a[s] > mx) mx = a[s];
                }
                for (int s = 0; s < T; s++) sum += s <= t ? exp(a[s] - mx) : 0.0;
                for (int s = 0; s < T; s++) a[s] = s <= t ? (float)(exp(a[s] - mx) / sum) : 0.0f;
                for (int i = 0; i < hd; i++) {
                    double o = 0.0;
                    for (int s = 0; s <= t; s++) o += (double)a[s] * v[((size_t)b * T + s) * ks + (h / grp) * hd + i];
                    out[((size_t)b * T + t) * qs + h * hd + i] = (float)o;
                }
            }
}

NAIVE_TWIN void attention_backward_naive(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                     const float *k, const float *v, const float *att, int B, int T, int NH,
                                     int NKV, int hd) {
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    double scale = 1.0 / sqrt((double)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *a = att + (((size_t)b * NH + h) * T + t) * T;
                const float *dot_ = dout + ((size_t)b * T + t) * qs + h * hd;
                double datt[T], sum = 0.0;  // d loss / d att[t][s], then softmax backward
                for (int s = 0; s <= t; s++) {
                    const float *vs = v + ((size_t)b * T + s) * ks + (h / grp) * hd;
                    datt[s] = 0.0;
                    for (int i = 0; i < hd; i++) datt[s] += (double)dot_[i] * vs[i];
                    sum += datt[s] * a[s];
                    for (int i = 0; i < hd; i++) dv[((size_t)b * T + s) * ks + (h / grp) * hd + i] += a[s] * dot_[i];
                }
                for (int s = 0; s <= t; s++) {
                    double ds = a[s] * (datt[s] - sum) * scale;
                    for (int i = 0; i < hd; i++) {
                        dq[((size_t)b * T + t) * qs + h * hd + i] += (float)(ds * k[((size_t)b * T + s) * ks + (h / grp) * hd + i]);
                        dk[((size_t)b * T + s) * ks + (h / grp) * hd + i] += (float)(ds * q[((size_t)b * T + t) * qs + h * hd + i]);
                    }
                }
            }
}

/* Router scores from the router logits z = router h (E per token).
     softmax:    s = softmax(z)
     NormRouter: s = sigma c relu(u),  u = z / (||z|| + eps)
   c makes the chosen scores about 1 in norm at initialisation (see
   norm_router_c); sigma is learned per layer. */
static void router_forward(float *score, const float *z, float sigma, const Config *c, int N) {
    // score (N,E), z (N,E)
    int E = c->E;
    for (int n = 0; n < N; n++) {
        const float *zn = z + (size_t)n * E;
        float *s = score + (size_t)n * E;
        if (c->router == ROUTER_SOFTMAX) {
            float mx = zn[0], sum = 0.0f;
            for (int j = 1; j < E; j++) mx = zn[j] > mx ? zn[j] : mx;
            for (int j = 0; j < E; j++) sum += (s[j] = expf(zn[j] - mx));
            for (int j = 0; j < E; j++) s[j] /= sum;
        } else {
            float inv = 1.0f / (sqrtf(dot(zn, zn, E)) + c->router_eps);
            for (int j = 0; j < E; j++) s[j] = sigma * c->router_c * fmaxf(zn[j] * inv, 0.0f);
        }
    }
}

/* softmax:    dz = s (ds - sum_j s_j ds_j)
   NormRouter: with r = ||z||, du = sigma c ds [u > 0],
               dz = du / (r + eps) - z (du . z) / (r (r + eps)^2),
               dsigma = sum c relu(u) ds                                     */
static void router_backward(float *dz, float *dsigma, const float *dscore, const float *z,
                            const float *score, float sigma, const Config *c, int N) {
    // dz (N,E) written, dsigma (1) +=, dscore, z, score (N,E)
    int E = c->E;
    double dsig = 0.0;
    for (int n = 0; n < N; n++) {
        const float *zn = z + (size_t)n * E, *s = score + (size_t)n * E, *ds = dscore + (size_t)n * E;
        float *d = dz + (size_t)n * E;
        if (c->router == ROUTER_SOFTMAX) {
            float sds = dot(s, ds, E);
            for (int j = 0; j < E; j++) d[j] = s[j] * (ds[j] - sds);
            continue;
        }
        float r = sqrtf(dot(zn, zn, E)), re = r + c->router_eps, duz = 0.0f;
        for (int j = 0; j < E; j++) {
            float u = zn[j] / re;
            d[j] = u > 0.0f ? sigma * c->router_c * ds[j] : 0.0f;  // du, for now
            dsig += (double)c->router_c * (u > 0.0f ? u : 0.0f) * ds[j];
            duz += d[j] * zn[j];
        }
        float corr = r > 0.0f ? duz / (r * re * re) : 0.0f;
        for (int j = 0; j < E; j++) d[j] = d[j] / re - zn[j] * corr;
    }
    *dsigma += (float)dsig;
}

// The K largest scores of each token, ties to the lower index.
static void topk_forward(int *chosen, const float *score, int N, int E, int K) {
    // chosen (N,K), score (N,E)
    for (int n = 0; n < N; n++) {
        const float *s = score + (size_t)n * E;
        int *ch = chosen + (size_t)n * K;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int j = 0; j < E; j++) {
                int taken = 0;
                for (int kk = 0; kk < k; kk++) taken |= ch[kk] == j;
                if (!taken && (best < 0 || s[j] > s[best])) best = j;
            }
            ch[k] = best;
        }
    }
}

/* NormRouter's c: the mean of 1 / ||topK(relu(x / ||x||))|| over x ~ N(0, I_E)
   (draws whose top K are all zero are skipped), so that sigma = 1 starts the
   chosen gates at about unit norm. For small E this mean does not exist (it
   diverges where one entry is barely positive); a fixed seed makes the
   estimate a fixed, documented number. Computed once, stored with the model. */
#define ROUTER_C_DRAWS 100000  // SPEC section 3: 100,000 draws or more
#define ROUTER_C_SEED 1234

static float norm_router_c(int E, int K, long draws, uint64_t seed) {
    Rng rng = {seed};
    double x[E], sum = 0.0;
    long used = 0;
    for (long d = 0; d < draws; d++) {
        double nrm = 0.0;
        for (int j = 0; j < E; j++) {
            x[j] = rng_normal(&rng);
            nrm += x[j] * x[j];
        }
        nrm = sqrt(nrm);
        double top = 0.0;  // ||topK(relu(x))|| / ||x||: select the K largest by repeated max
        for (int k = 0; k < K; k++) {
            int best = 0;
            for (int j = 1; j < E; j++) best = x[j] > x[best] ? j : best;
            if (x[best] > 0.0) top += x[best] * x[best];
            x[best] = -INFINITY;
        }
        if (top > 0.0) {
            sum += nrm / sqrt(top);
            used++;
        }
    }
    return used ? (float)(sum / used) : 1.0f;
}

// SwiGLU: h = [a; b] (2F), out = silu(a) * b, silu(a) = a sigmoid(a)
static void swiglu_forward(float *out, const float *h, int M, int F) {
    // out (M,F), h (M,2F)
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *a = h + (size_t)m * 2 * F, *b = a + F;
        float *o = out + (size_t)m * F;
        for (int i = 0; i < F; i++) o[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
    }
}

// da = dout b silu'(a), silu'(a) = sig(a) (1 + a (1 - sig(a))); db = dout silu(a)
static void swiglu_backward(float *dh, const float *dout, const float *h, int M, int F) {
    // dh (M,2F) written, dout (M,F), h (M,2F)
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *a = h + (size_t)m * 2 * F, *b = a + F, *d = dout + (size_t)m * F;
        float *da = dh + (size_t)m * 2 * F, *db = da + F;
        for (int i = 0; i < F; i++) {
            float sg = 1.0f / (1.0f + expf(-a[i]));
            da[i] = d[i] * b[i] * sg * (1.0f + a[i] * (1.0f - sg));
            db[i] = d[i] * a[i] * sg;
        }
    }
}

/* The mixture of one layer, dropless: y_n = sum_k gate_nk expert_{chosen_nk}(x_n).
   The N*K (token, slot) assignments are counting-sorted by expert (stable,
   so deterministic); each expert then runs as one matmul over its contiguous
   block of gathered rows, and the results are scattered back with the gates.
   fc1 and fc2 point at the E experts this layer's router sees. */
typedef struct {
    int *order;   // (N*K) assignment a = n*K + k at each sorted position
    int *slot;    // (N*K) sorted position of each assignment (inverse of order)
    int *offset;  // (E+1) first sorted position of each expert
} Dispatch;

static void moe_dispatch(Dispatch *d, const int *chosen, int NK, int E) {
    for (int e = 0; e <= E; e++) d->offset[e] = 0;
    for (int a = 0; a < NK; a++) d->offset[chosen[a] + 1]++;
    for (int e = 0; e < E; e++) d->offset[e + 1] += d->offset[e];
    for (int a = 0; a < NK; a++) d->slot[a] = d->offset[chosen[a]]++;
    for (int e = E; e > 0; e--) d->offset[e] = d->offset[e - 1];  // undo the increments
    d->offset[0] = 0;
    for (int a = 0; a < NK; a++) d->order[d->slot[a]] = a;
}

static void moe_gather(float *xs, const float *x, const Dispatch *d, int NK, int K, int C) {
    // xs (N*K,C) rows in sorted order, x (N,C)
#pragma omp parallel for schedule(static)
    for (int p = 0; p < NK; p++) memcpy(xs + (size_t)p * C, x + (size_t)(d->order[p] / K) * C, C * sizeof(float));
}

static void moe_forward(float *y, float *h, float *eout, float *xs, float *act, const float *x,
                        const float *score, const int *chosen, const Dispatch *d, const float *fc1,
                        const float *fc2, int N, int C, int F, int E, int K) {
    // y (N,C) out; saved: h (N*K,2F), eout (N*K,C); scratch: xs (N*K,C), act (N*K,F)
    // x (N,C), score (N,E), chosen (N,K), fc1 (E,2F,C), fc2 (E,C,F)
    moe_gather(xs, x, d, N * K, K, C);
    for (int e = 0; e < E; e++) {
        int p0 = d->offset[e], ne = d->offset[e + 1] - p0;
        if (ne) matmul_forward(h + (size_t)p0 * 2 * F, xs + (size_t)p0 * C, fc1 + (size_t)e * 2 * F * C, ne, C, 2 * F);
    }
    swiglu_forward(act, h, N * K, F);
    for (int e = 0; e < E; e++) {
        int p0 = d->offset[e], ne = d->offset[e + 1] - p0;
        if (ne) matmul_forward(eout + (size_t)p0 * C, act + (size_t)p0 * F, fc2 + (size_t)e * C * F, ne, F, C);
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *yn = y + (size_t)n * C;
        for (int i = 0; i < C; i++) yn[i] = 0.0f;
        for (int k = 0; k < K; k++) {
            int a = n * K + k;
            axpy(yn, score[(size_t)n * E + chosen[a]], eout + (size_t)d->slot[a] * C, C);
        }
    }
}

// dgate_nk = dy_n . expert output; experts with no tokens cost nothing.
static void moe_backward(float *dx, float *dscore, float *dfc1, float *dfc2, float *xs, float *dxs,
                         float *act, float *dact, float *dh, const float *dy, const float *h,
                         const float *eout, const float *x, const float *score, const int *chosen,
                         const Dispatch *d, const float *fc1, const float *fc2, int N, int C, int F, int E,
                         int K) {
    // dx (N,C) +=, dscore (N,E) += at the chosen experts, dfc1 (E,2F,C) +=, dfc2 (E,C,F) +=
    // scratch: xs, dxs (N*K,C), act, dact (N*K,F), dh (N*K,2F)
    // saved by the forward: h (N*K,2F), eout (N*K,C); x (N,C), score (N,E), chosen (N,K)
    int NK = N * K;
    float *deout = dxs;  // d(expert output) first; the same rows hold d(gathered x) later
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int a = n * K + k, p = d->slot[a];
            const float *dyn = dy + (size_t)n * C;
            float g = score[(size_t)n * E + chosen[a]];
            dscore[(size_t)n * E + chosen[a]] += dot(dyn, eout + (size_t)p * C, C);
            for (int i = 0; i < C; i++) deout[(size_t)p * C + i] = g * dyn[i];
        }
    swiglu_forward(act, h, NK, F);  // recomputed: cheaper than keeping it
    memset(dact, 0, (size_t)NK * F * sizeof(float));
    for (int e = 0; e < E; e++) {
        int p0 = d->offset[e], ne = d->offset[e + 1] - p0;
        if (ne) matmul_backward(dact + (size_t)p0 * F, dfc2 + (size_t)e * C * F, deout + (size_t)p0 * C,
                                act + (size_t)p0 * F, fc2 + (size_t)e * C * F, ne, F, C);
    }
    swiglu_backward(dh, dact, h, NK, F);
    moe_gather(xs, x, d, NK, K, C);
    memset(dxs, 0, (size_t)NK * C * sizeof(float));
    for (int e = 0; e < E; e++) {
        int p0 = d->offset[e], ne = d->offset[e + 1] - p0;
        if (ne) matmul_backward(dxs + (size_t)p0 * C, dfc1 + (size_t)e * 2 * F * C, dh + (size_t)p0 * 2 * F,
                                xs + (size_t)p0 * C, fc1 + (size_t)e * 2 * F * C, ne, C, 2 * F);
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) axpy(dx + (size_t)n * C, 1.0f, dxs + (size_t)d->slot[n * K + k] * C, C);
}

// The naive twin: every token through its experts one at a time, in double.
NAIVE_TWIN void moe_forward_naive(float *y, const float *x, const float *score, const int *chosen,
                              const float *fc1, const float *fc2, int N, int C, int F, int E, int K) {
    double *hh = malloc_check(2 * (size_t)F * sizeof(double));
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++) y[(size_t)n * C + i] = 0.0f;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int e = chosen[n * K + k];
            const float *w1 = fc1 + (size_t)e * 2 * F * C, *w2 = fc2 + (size_t)e * C * F;
            for (int r = 0; r < 2 * F; r++) {
                hh[r] = 0.0;
                for (int i = 0; i < C; i++) hh[r] += (double)w1[(size_t)r * C + i] * x[(size_t)n * C + i];
            }
            for (int r = 0; r < F; r++) hh[r] = hh[r] / (1.0 + exp(-hh[r])) * hh[F + r];
            for (int i = 0; i < C; i++) {
                double o = 0.0;
                for (int r = 0; r < F; r++) o += (double)w2[(size_t)i * F + r] * hh[r];
                y[(size_t)n * C + i] += (float)(score[(size_t)n * E + e] * o);
            }
        }
    free(hh);
}

NAIVE_TWIN void moe_backward_naive(float *dx, float *dscore, float *dfc1, float *dfc2, const float *dy,
                               const float *x, const float *score, const int *chosen, const float *fc1,
                               const float *fc2, int N, int C, int F, int E, int K) {
    double *hh = malloc_check(2 * (size_t)F * sizeof(double)), *act = malloc_check((size_t)F * sizeof(double));
    double *dact = malloc_check((size_t)F * sizeof(double)), *dh = malloc_check(2 * (size_t)F * sizeof(double));
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int e = chosen[n * K + k];
            const float *w1 = fc1 + (size_t)e * 2 * F * C, *w2 = fc2 + (size_t)e * C * F;
            const float *xn = x + (size_t)n * C, *dyn = dy + (size_t)n * C;
            double g = score[(size_t)n * E + e], dg = 0.0;
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
                    dfc2[(size_t)e * C * F + (size_t)i * F + r] += (float)(g * dyn[i] * act[r]);
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
                    dfc1[(size_t)e * 2 * F * C + (size_t)r * C + i] += (float)(dh[r] * xn[i]);
                }
        }
    free(hh);
    free(act);
    free(dact);
    free(dh);
}

/* Cross-entropy over the first V of Vp logits: loss_n = lse_n - logit[target].
   The backward writes d logits over the logits (they are not needed after):
   (softmax - onehot) * dloss for the first V, 0 for the padding. */
static double crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets,
                                   int N, int V, int Vp) {
    // losses (N), lse (N), logits (N,Vp), targets (N); returns the mean loss
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *lg = logits + (size_t)n * Vp;
        float mx = lg[0];
        for (int i = 1; i < V; i++) mx = lg[i] > mx ? lg[i] : mx;
        double sum = 0.0;
        for (int i = 0; i < V; i++) sum += expf(lg[i] - mx);
        lse[n] = mx + (float)log(sum);
        losses[n] = lse[n] - lg[targets[n]];
    }
    double mean = 0.0;
    for (int n = 0; n < N; n++) mean += losses[n];
    return mean / N;
}

static void crossentropy_backward(float *logits, const float *lse, const int *targets, float dloss, int N,
                                  int V, int Vp) {
    // logits (N,Vp) in: logits, out: d logits
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *lg = logits + (size_t)n * Vp;
        for (int i = 0; i < V; i++) lg[i] = (expf(lg[i] - lse[n]) - (i == targets[n])) * dloss;
        for (int i = V; i < Vp; i++) lg[i] = 0.0f;
    }
}

// ----------------------------------------------------------------------------
// The model

/* Ownership is data. Layer l's router sees experts [g E, (g+1) E) of the one
   expert buffer, g = l / (L/G): G = L gives each layer E experts of its own
   (vanilla MoE), G = 1 gives every layer the same E experts (UniPool), and
   the backward of a shared expert simply accumulates over the layers that
   used it. This function is the only place the difference lives. */
static size_t layer_first_expert(const Config *c, int l) { return (size_t)(l / (c->L / c->G)) * c->E; }

/* Activations, for N = B*T tokens (NK = N*K expert assignments). The
   expressions name local variables of act_alloc. Saved by the forward: */
#define ACT_TABLE(X)                                                               \
    X(resid,  (L + 1) * N * C)  /* (L+1,N,C) residual entering layer l; [L] the final norm's input */ \
    X(ln1,    L * N * C)        /* (L,N,C) attention norm output */                 \
    X(rstd1,  L * N)            /* (L,N) */                                         \
    X(q,      L * N * Q)        /* (L,N,NH*hd) after RoPE */                        \
    X(k,      L * N * KV)       /* (L,N,NKV*hd) after RoPE */                       \
    X(v,      L * N * KV)       /* (L,N,NKV*hd) */                                  \
    X(atty,   L * N * Q)        /* (L,N,NH*hd) attention output, input of wo */     \
    X(att_lse, L * N * NH)      /* (L,N,NH) logsumexp of each attention row */      \
    X(resmid, L * N * C)        /* (L,N,C) residual after attention */              \
    X(ln2,    L * N * C)        /* (L,N,C) expert norm output: router and expert input */ \
    X(rstd2,  L * N)            /* (L,N) */                                         \
    X(z,      L * N * E)        /* (L,N,E) router logits */                         \
    X(score,  L * N * E)        /* (L,N,E) router scores; the chosen ones are the gates */ \
    X(h,      L * NK * 2 * F)   /* (L,N*K,2F) expert fc1 output, in dispatch order */ \
    X(eout,   L * NK * C)       /* (L,N*K,C) expert output before its gate, dispatch order */ \
    X(lnf,    N * C)            /* (N,C) final norm output */                       \
    X(rstdf,  N)                /* (N) */                                           \
    X(logits, N * Vp)           /* (N,Vp); the backward turns them into d logits */  \
    X(ce_lse, N)                /* (N) logsumexp over the first V logits */          \
    X(losses, N)                /* (N) per-token cross-entropy */                    \
    /* scratch, reused by every layer: */                                           \
    X(dresid, N * C)            /* (N,C) gradient of the residual stream */         \
    X(dln,    N * C)            /* (N,C) gradient of a norm output */               \
    X(dq,     N * Q)            /* (N,NH*hd) */                                     \
    X(dk,     N * KV)           /* (N,NKV*hd) */                                    \
    X(dv,     N * KV)           /* (N,NKV*hd) */                                    \
    X(datty,  N * Q)            /* (N,NH*hd) */                                     \
    X(dz,     N * E)            /* (N,E) */                                         \
    X(dscore, N * E)            /* (N,E) */                                         \
    X(y,      N * C)            /* (N,C) a sublayer's output before the residual add */ \
    X(xs,     NK * C)           /* (N*K,C) expert inputs gathered in dispatch order */ \
    X(dxs,    NK * C)           /* (N*K,C) */                                       \
    X(act,    NK * F)           /* (N*K,F) SwiGLU output */                         \
    X(dact,   NK * F)           /* (N*K,F) */                                       \
    X(dh,     NK * 2 * F)       /* (N*K,2F) */

#define ACT_INT_TABLE(X)                                                           \
    X(inputs,  N)               /* (N) token ids */                                 \
    X(targets, N)               /* (N) next-token ids */                            \
    X(chosen,  L * NK)          /* (L,N,K) expert index within the layer's pool */  \
    X(order,   L * NK)          /* (L,N*K) dispatch: assignment at each position */  \
    X(slot,    L * NK)          /* (L,N*K) dispatch: position of each assignment */ \
    X(offset,  L * (E + 1))     /* (L,E+1) dispatch: first position of each expert */

typedef struct {
#define X_FIELD(name, size) float *name;
    ACT_TABLE(X_FIELD)
#undef X_FIELD
#define X_FIELD(name, size) int *name;
    ACT_INT_TABLE(X_FIELD)
#undef X_FIELD
} Acts;

typedef struct {
    Config cfg;
    Shape shapes[NUM_PARAM_TENSORS];
    size_t num_params;
    float *params_memory, *grads_memory;   // (num_params) each
    float *m_memory, *v_memory;            // (num_params) AdamW moments, allocated by the first update
    ParamTensors params, grads;
    int adam_t;                            // AdamW updates taken
    float *rope_cos, *rope_sin;            // (maxT, hd/2)
    // load balance (section 4): f (L,E) of this and of the previous training
    // micro-batch (model state: it survives steps), and d aux / d P (L,E)
    float *aux_f, *aux_prev_f, *aux_coef;
    int aux_prev_valid;
    // activations, sized by the first forward for up to maxN tokens
    Acts acts;
    void *acts_memory;
    size_t acts_bytes;
    int maxN, B, T;                        // B, T of the last forward
    double ce, aux;                        // of the last forward
} Model;

static void model_build(Model *m, const Config *cfg) {
    const char *err = config_error(cfg);
    if (err) fail("bad model configuration: %s", err);
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    param_shapes(m->shapes, cfg);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) m->num_params += shape_numel(m->shapes[i]);
    m->params_memory = calloc_check(m->num_params, sizeof(float));
    m->grads_memory = calloc_check(m->num_params, sizeof(float));
    param_point(&m->params, m->params_memory, m->shapes);
    param_point(&m->grads, m->grads_memory, m->shapes);
    int h2 = HD(cfg) / 2;
    m->rope_cos = malloc_check((size_t)cfg->maxT * h2 * sizeof(float));
    m->rope_sin = malloc_check((size_t)cfg->maxT * h2 * sizeof(float));
    rope_table(m->rope_cos, m->rope_sin, cfg->maxT, HD(cfg), cfg->rope_theta);
    size_t le = (size_t)cfg->L * cfg->E;
    m->aux_f = calloc_check(le, sizeof(float));
    m->aux_prev_f = calloc_check(le, sizeof(float));
    m->aux_coef = calloc_check(le, sizeof(float));
}

static void model_free(Model *m) {
    free(m->params_memory);
    free(m->grads_memory);
    free(m->m_memory);
    free(m->v_memory);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->aux_f);
    free(m->aux_prev_f);
    free(m->aux_coef);
    free(m->acts_memory);
}

/* The paper's initialisation: N(0, 0.01) for every matrix, N(0, 0.01/sqrt(2L))
   for the projections that write into the residual stream (wo, expert fc2),
   1 for the norms and sigma. Padded vocabulary rows start at 0. */
static void model_init(Model *m, uint64_t seed) {
    const Config *c = &m->cfg;
    Rng rng = {seed};
    float *p = m->params_memory;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        size_t n = shape_numel(m->shapes[i]);
        float std = (i == PT_wo || i == PT_expert_fc2) ? 0.01f / sqrtf(2.0f * c->L) : 0.01f;
        for (size_t j = 0; j < n; j++) p[j] = param_decay[i] ? std * (float)rng_normal(&rng) : 1.0f;
        if (i == PT_wte || i == PT_lm_head) memset(p + (size_t)c->V * c->C, 0, (size_t)(c->Vp - c->V) * c->C * sizeof(float));
        p += n;
    }
}

static void act_alloc(Model *m, int N) {
    const Config *c = &m->cfg;
    size_t L = c->L, C = c->C, Q = (size_t)c->NH * HD(c), KV = (size_t)c->NKV * HD(c), NH = c->NH;
    size_t E = c->E, F = c->F, Vp = c->Vp, NK = (size_t)N * c->K;
    size_t fsizes[] = {
#define X_SIZE(name, size) size,
        ACT_TABLE(X_SIZE)
    }, isizes[] = {ACT_INT_TABLE(X_SIZE)
#undef X_SIZE
    };
    float **ff[] = {
#define X_PTR(name, size) &m->acts.name,
        ACT_TABLE(X_PTR)
    };
    int **fi[] = {ACT_INT_TABLE(X_PTR)
#undef X_PTR
    };
    size_t nf = sizeof fsizes / sizeof *fsizes, ni = sizeof isizes / sizeof *isizes, total = 0;
    for (size_t i = 0; i < nf; i++) total += fsizes[i] * sizeof(float);
    for (size_t i = 0; i < ni; i++) total += isizes[i] * sizeof(int);
    free(m->acts_memory);
    char *mem = m->acts_memory = malloc_check(total);
    for (size_t i = 0; i < nf; i++) { *ff[i] = (float *)mem; mem += fsizes[i] * sizeof(float); }
    for (size_t i = 0; i < ni; i++) { *fi[i] = (int *)mem; mem += isizes[i] * sizeof(int); }
    m->acts_bytes = total;
    m->maxN = N;
}

/* Load-balancing loss (SPEC section 4), one formula for every mode:
     aux = sum_l sum_j coef[l][j] P[l][j],   P[l][j] = mean_n score[l][n][j]
     coef[l][j] = alpha E fbar[j] / |S|,     fbar = mean over l' in S of f[l'][j]
   where S is l's group: {l} for the per-layer loss (aux 1), the layers of
   l's pool for the pool losses (aux 2, 3); aux 2 takes f from the previous
   training micro-batch (none yet: no loss). f[l][j] = count / (K N) carries
   no gradient, so d aux / d score[l][n][j] = coef[l][j] / N. */
static double aux_forward(Model *m, int N, int training) {
    const Config *c = &m->cfg;
    int L = c->L, E = c->E, S = c->aux == AUX_LAYER ? 1 : L / c->G;
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            const int *off = m->acts.offset + (size_t)l * (E + 1);
            m->aux_f[l * E + j] = (float)(off[j + 1] - off[j]) / ((float)c->K * N);
        }
    const float *fsrc = c->aux == AUX_POOL_PREV ? m->aux_prev_f : m->aux_f;
    int active = c->aux != AUX_NONE && (c->aux != AUX_POOL_PREV || m->aux_prev_valid);
    double aux = 0.0;
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            double fbar = 0.0, P = 0.0;
            int l0 = l / S * S;
            for (int ll = l0; ll < l0 + S; ll++) fbar += fsrc[ll * E + j];
            fbar /= S;
            for (int n = 0; n < N; n++) P += m->acts.score[((size_t)l * N + n) * E + j];
            P /= N;
            float coef = active ? (float)(c->alpha * E * fbar / S) : 0.0f;
            m->aux_coef[l * E + j] = coef;
            aux += (double)coef * P;
        }
    if (training) {  // evaluation passes leave the stale statistic alone
        memcpy(m->aux_prev_f, m->aux_f, (size_t)L * E * sizeof(float));
        m->aux_prev_valid = 1;
    }
    return aux;
}

static void check_tokens(const int *tok, int N, int V, const char *what) {
    for (int n = 0; n < N; n++)
        if (tok[n] < 0 || tok[n] >= V)
            fail("%s token %d at position %d is outside the vocabulary [0, %d); check the data", what, tok[n], n, V);
}

/* Forward over B sequences of T tokens. With targets (N), it computes the
   cross-entropy and aux losses (m->ce, m->aux) and the backward may follow;
   training = 1 marks a training micro-batch (it advances the stale pool
   statistic of aux 2). Without targets it computes the logits only. */
static void model_forward(Model *m, const int *inputs, const int *targets, int B, int T, int training) {
    const Config *c = &m->cfg;
    int N = B * T, L = c->L, C = c->C, E = c->E, K = c->K, F = c->F, hd = HD(c);
    int Q = c->NH * hd, KV = c->NKV * hd, NK = N * K;
    if (T > c->maxT) fail("sequence length %d exceeds the model's maxT %d; use a smaller -t", T, c->maxT);
    if (N > m->maxN) act_alloc(m, N);
    m->B = B;
    m->T = T;
    Acts *a = &m->acts;
    ParamTensors *p = &m->params;
    check_tokens(inputs, N, c->V, "input");
    memcpy(a->inputs, inputs, (size_t)N * sizeof(int));
    encoder_forward(a->resid, inputs, p->wte, N, C);
    for (int l = 0; l < L; l++) {
        size_t lN = (size_t)l * N;
        float *x = a->resid + lN * C, *ln1 = a->ln1 + lN * C, *xm = a->resmid + lN * C, *ln2 = a->ln2 + lN * C;
        float *q = a->q + lN * Q, *k = a->k + lN * KV, *v = a->v + lN * KV, *atty = a->atty + lN * Q;
        float *z = a->z + lN * E, *score = a->score + lN * E;
        int *chosen = a->chosen + (size_t)l * NK;
        // attention sublayer
        rmsnorm_forward(ln1, a->rstd1 + lN, x, p->attn_norm + (size_t)l * C, N, C, c->norm_eps);
        matmul_forward(q, ln1, p->wq + (size_t)l * Q * C, N, C, Q);
        matmul_forward(k, ln1, p->wk + (size_t)l * KV * C, N, C, KV);
        matmul_forward(v, ln1, p->wv + (size_t)l * KV * C, N, C, KV);
        rope_apply(q, m->rope_cos, m->rope_sin, N, T, c->NH, hd, +1);
        rope_apply(k, m->rope_cos, m->rope_sin, N, T, c->NKV, hd, +1);
        attention_forward(atty, a->att_lse + lN * c->NH, q, k, v, B, T, c->NH, c->NKV, hd);
        matmul_forward(a->y, atty, p->wo + (size_t)l * C * Q, N, Q, C);
        for (size_t i = 0; i < (size_t)N * C; i++) xm[i] = x[i] + a->y[i];
        // expert sublayer: route into this layer's pool, run the chosen experts
        rmsnorm_forward(ln2, a->rstd2 + lN, xm, p->ffn_norm + (size_t)l * C, N, C, c->norm_eps);
        matmul_forward(z, ln2, p->router + (size_t)l * E * C, N, C, E);
        router_forward(score, z, p->router_scale[l], c, N);
        topk_forward(chosen, score, N, E, K);
        Dispatch d = {a->order + (size_t)l * NK, a->slot + (size_t)l * NK, a->offset + (size_t)l * (E + 1)};
        moe_dispatch(&d, chosen, NK, E);
        size_t e0 = layer_first_expert(c, l);
        moe_forward(a->y, a->h + (size_t)l * NK * 2 * F, a->eout + (size_t)l * NK * C, a->xs, a->act, ln2, score,
                    chosen, &d, p->expert_fc1 + e0 * 2 * F * C, p->expert_fc2 + e0 * C * F, N, C, F, E, K);
        float *xn = a->resid + (lN + N) * C;
        for (size_t i = 0; i < (size_t)N * C; i++) xn[i] = xm[i] + a->y[i];
    }
    rmsnorm_forward(a->lnf, a->rstdf, a->resid + (size_t)L * N * C, p->final_norm, N, C, c->norm_eps);
    matmul_forward(a->logits, a->lnf, p->lm_head, N, C, c->Vp);
    if (!targets) return;
    check_tokens(targets, N, c->V, "target");
    memcpy(a->targets, targets, (size_t)N * sizeof(int));
    m->ce = crossentropy_forward(a->losses, a->ce_lse, a->logits, targets, N, c->V, c->Vp);
    m->aux = aux_forward(m, N, training);
}

/* Accumulates the gradient of scale * (CE + aux) of the last forward into
   m->grads (scale = 1 / micro-batches per step). The logits become d logits. */
static void model_backward(Model *m, float scale) {
    const Config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, L = c->L, C = c->C, E = c->E, K = c->K, F = c->F, hd = HD(c);
    int Q = c->NH * hd, KV = c->NKV * hd, NK = N * K;
    Acts *a = &m->acts;
    ParamTensors *p = &m->params, *g = &m->grads;
    crossentropy_backward(a->logits, a->ce_lse, a->targets, scale / N, N, c->V, c->Vp);
    memset(a->dln, 0, (size_t)N * C * sizeof(float));
    matmul_backward(a->dln, g->lm_head, a->logits, a->lnf, p->lm_head, N, C, c->Vp);
    memset(a->dresid, 0, (size_t)N * C * sizeof(float));
    rmsnorm_backward(a->dresid, g->final_norm, a->dln, a->resid + (size_t)L * N * C, p->final_norm, a->rstdf, N, C);
    for (int l = L - 1; l >= 0; l--) {  // a->dresid holds d(residual leaving layer l)
        size_t lN = (size_t)l * N;
        const float *ln2 = a->ln2 + lN * C, *ln1 = a->ln1 + lN * C;
        const float *z = a->z + lN * E, *score = a->score + lN * E;
        const int *chosen = a->chosen + (size_t)l * NK;
        Dispatch d = {a->order + (size_t)l * NK, a->slot + (size_t)l * NK, a->offset + (size_t)l * (E + 1)};
        size_t e0 = layer_first_expert(c, l);
        // expert sublayer: d score = gate path + aux path, then router and norm
        for (int n = 0; n < N; n++)
            for (int j = 0; j < E; j++) a->dscore[(size_t)n * E + j] = m->aux_coef[l * E + j] * scale / N;
        memset(a->dln, 0, (size_t)N * C * sizeof(float));
        moe_backward(a->dln, a->dscore, g->expert_fc1 + e0 * 2 * F * C, g->expert_fc2 + e0 * C * F, a->xs, a->dxs,
                     a->act, a->dact, a->dh, a->dresid, a->h + (size_t)l * NK * 2 * F, a->eout + (size_t)l * NK * C,
                     ln2, score, chosen, &d, p->expert_fc1 + e0 * 2 * F * C, p->expert_fc2 + e0 * C * F, N, C, F, E,
                     K);
        router_backward(a->dz, g->router_scale + l, a->dscore, z, score, p->router_scale[l], c, N);
        matmul_backward(a->dln, g->router + (size_t)l * E * C, a->dz, ln2, p->router + (size_t)l * E * C, N, C, E);
        rmsnorm_backward(a->dresid, g->ffn_norm + (size_t)l * C, a->dln, a->resmid + lN * C,
                         p->ffn_norm + (size_t)l * C, a->rstd2 + lN, N, C);
        // attention sublayer; a->dresid now holds d(residual after attention)
        memset(a->datty, 0, (size_t)N * Q * sizeof(float));
        matmul_backward(a->datty, g->wo + (size_t)l * C * Q, a->dresid, a->atty + lN * Q, p->wo + (size_t)l * C * Q, N, Q, C);
        memset(a->dq, 0, (size_t)N * Q * sizeof(float));
        memset(a->dk, 0, (size_t)N * KV * sizeof(float));
        memset(a->dv, 0, (size_t)N * KV * sizeof(float));
        attention_backward(a->dq, a->dk, a->dv, a->datty, a->q + lN * Q, a->k + lN * KV, a->v + lN * KV,
                           a->atty + lN * Q, a->att_lse + lN * c->NH, B, T, c->NH, c->NKV, hd);
        rope_apply(a->dq, m->rope_cos, m->rope_sin, N, T, c->NH, hd, -1);
        rope_apply(a->dk, m->rope_cos, m->rope_sin, N, T, c->NKV, hd, -1);
        memset(a->dln, 0, (size_t)N * C * sizeof(float));
        matmul_backward(a->dln, g->wq + (size_t)l * Q * C, a->dq, ln1, p->wq + (size_t)l * Q * C, N, C, Q);
        matmul_backward(a->dln, g->wk + (size_t)l * KV * C, a->dk, ln1, p->wk + (size_t)l * KV * C, N, C, KV);
        matmul_backward(a->dln, g->wv + (size_t)l * KV * C, a->dv, ln1, p->wv + (size_t)l * KV * C, N, C, KV);
        rmsnorm_backward(a->dresid, g->attn_norm + (size_t)l * C, a->dln, a->resid + lN * C,
                         p->attn_norm + (size_t)l * C, a->rstd1 + lN, N, C);
    }
    encoder_backward(g->wte, a->dresid, a->inputs, N, C);
}

// ----------------------------------------------------------------------------
// The optimizer: global-norm clipping and AdamW (PyTorch semantics)

typedef struct { float lr, b1, b2, eps, wd, clip; } OptConfig;

#define NORM_CHUNK 65536

/* L2 norm of a long vector, in double, summed in fixed chunks and then in
   chunk order: the same bits for any thread count. */
static double vector_norm(const float *x, size_t n) {
    size_t nc = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    double *part = malloc_check(nc * sizeof(double)), sum = 0.0;
#pragma omp parallel for schedule(static)
    for (size_t ch = 0; ch < nc; ch++) {
        size_t end = (ch + 1) * NORM_CHUNK < n ? (ch + 1) * NORM_CHUNK : n;
        double s = 0.0;
        for (size_t i = ch * NORM_CHUNK; i < end; i++) s += (double)x[i] * x[i];
        part[ch] = s;
    }
    for (size_t ch = 0; ch < nc; ch++) sum += part[ch];
    free(part);
    return sqrt(sum);
}

/*   m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2
     p -= lr wd p                        (tensors the table marks for decay)
     p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)                       */
static void adamw_update(Model *m, const OptConfig *o, float lr) {
    if (!m->m_memory) {
        m->m_memory = calloc_check(m->num_params, sizeof(float));
        m->v_memory = calloc_check(m->num_params, sizeof(float));
    }
    m->adam_t++;
    float bc1 = 1.0f - (float)pow(o->b1, m->adam_t), bc2 = 1.0f - (float)pow(o->b2, m->adam_t);
    size_t off = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        size_t n = shape_numel(m->shapes[i]);
        float decay = param_decay[i] ? 1.0f - lr * o->wd : 1.0f;
        float *p = m->params_memory + off, *g = m->grads_memory + off, *mm = m->m_memory + off, *vv = m->v_memory + off;
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < n; j++) {
            mm[j] = o->b1 * mm[j] + (1.0f - o->b1) * g[j];
            vv[j] = o->b2 * vv[j] + (1.0f - o->b2) * g[j] * g[j];
            p[j] = p[j] * decay - lr * (mm[j] / bc1) / (sqrtf(vv[j] / bc2) + o->eps);
        }
        off += n;
    }
}

// ----------------------------------------------------------------------------
// One training step (SPEC section 5)

typedef struct { double ce, aux, grad_norm; } StepStats;

// Splits B rows of T+1 tokens into inputs (B,T) and targets (B,T).
static void split_rows(int *inputs, int *targets, const int *rows, int B, int T) {
    for (int b = 0; b < B; b++) {
        memcpy(inputs + (size_t)b * T, rows + (size_t)b * (T + 1), (size_t)T * sizeof(int));
        memcpy(targets + (size_t)b * T, rows + (size_t)b * (T + 1) + 1, (size_t)T * sizeof(int));
    }
}

/* The gradient half of a step: n_micro micro-batches of B rows of T+1
   tokens (tokens: (n_micro,B,T+1)), each adding the gradient of
   (CE + aux) / n_micro to m->grads. Returns the mean CE, mean aux and the
   global gradient norm. */
static StepStats step_gradients(Model *m, const int *tokens, int n_micro, int B, int T) {
    StepStats st = {0};
    int *io = malloc_check(2 * (size_t)B * T * sizeof(int));
    memset(m->grads_memory, 0, m->num_params * sizeof(float));
    for (int mb = 0; mb < n_micro; mb++) {
        split_rows(io, io + (size_t)B * T, tokens + (size_t)mb * B * (T + 1), B, T);
        model_forward(m, io, io + (size_t)B * T, B, T, 1);
        model_backward(m, 1.0f / n_micro);
        st.ce += m->ce / n_micro;
        st.aux += m->aux / n_micro;
    }
    free(io);
    st.grad_norm = vector_norm(m->grads_memory, m->num_params);
    return st;
}

// The update half: if clip > 0 and clip / (norm + 1e-6) < 1, scale the gradient by it; then AdamW.
static void step_update(Model *m, const OptConfig *o, float lr, double grad_norm) {
    if (o->clip > 0.0f) {
        float s = (float)(o->clip / (grad_norm + 1e-6));
        if (s < 1.0f)
            for (size_t i = 0; i < m->num_params; i++) m->grads_memory[i] *= s;
    }
    adamw_update(m, o, lr);
}

// ----------------------------------------------------------------------------
// main

#ifndef UNIPOOL_NO_MAIN
int main(void) {
    Config cfg = {.V = 61, .Vp = 64, .maxT = 16, .L = 4, .C = 32, .NH = 4, .NKV = 2, .F = 48, .G = 1, .E = 16,
                  .K = 1, .router = ROUTER_NORM, .aux = AUX_POOL_PREV, .alpha = 1e-2f, .norm_eps = 1e-5f,
                  .rope_theta = 1e6f, .router_eps = 1e-8f};
    cfg.router_c = norm_router_c(cfg.E, cfg.K, ROUTER_C_DRAWS, ROUTER_C_SEED);
    Model m;
    model_build(&m, &cfg);
    model_init(&m, 42);
    OptConfig o = {.lr = 1e-2f, .b1 = 0.9f, .b2 = 0.95f, .eps = 1e-8f, .wd = 0.1f, .clip = 1.0f};
    int B = 4, T = 16, tokens[4 * 17];
    Rng rng = {7};
    for (int i = 0; i < B * (T + 1); i++) tokens[i] = (int)(rng_u64(&rng) % cfg.V);
    for (int step = 0; step < 50; step++) {
        StepStats st = step_gradients(&m, tokens, 1, B, T);
        step_update(&m, &o, o.lr, st.grad_norm);
        printf("step %d ce %.4f aux %.5f norm %.4f\n", step, st.ce, st.aux, st.grad_norm);
    }
    model_free(&m);
    return 0;
}
#endif
