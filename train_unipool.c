/*
train_unipool.c: Mixture-of-Experts language-model training in one C file, for
vanilla MoE (every layer owns its experts) and UniPool (every layer's router
draws from one globally shared expert pool, arXiv 2605.06665).

The idea fits in a sentence: the experts of all layers live in one buffer of
G*E experts, and layer l's router chooses among the E experts of pool
g(l) = l / (L/G). G = L is vanilla MoE, G = 1 is UniPool, anything between is
a grouped pool. Nothing else in the code knows which of them it runs.

The model (dev/SPEC.md is the contract, to the last term; "SPEC section N" below
cites it):
  token embedding -> L pre-norm blocks [RMSNorm, causal attention with GQA and
  rotate-half RoPE, RMSNorm, router + top-K of SwiGLU experts] -> RMSNorm ->
  untied LM head over a padded vocabulary.

Reading order: helpers, configuration and the parameter table, the kernels'
interface, the layers (each _forward next to its _backward, in plain loops),
the routers, the mixture of experts (sorted by expert, one product per
expert, the pooled weight gradient), the model (ownership, the aux losses,
forward and backward), AdamW, the training step, data parallelism over MPI
(make MPI=1), data, checkpoints, main; last, the machinery: the fast kernels
behind the interface.

Short names, the same everywhere:
  B batch, T time, N = B*T tokens, C channels, L layers, NH query heads,
  NKV key/value heads, hd head size, F expert hidden size, G pools,
  E experts per pool (= router candidates), K experts per token, V vocab,
  Vp padded vocab. Every tensor comment gives its shape in these names.
*/
#define _POSIX_C_SOURCE 200809L  // glob, fsync, mkdir
#define _DEFAULT_SOURCE          // madvise
#include <errno.h>
#include <float.h>
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef UNIPOOL_MPI
#include <mpi.h>
#endif

// ----------------------------------------------------------------------------
// Errors and checked helpers. Every failure is one line on stderr naming the
// file (or flag) and what to do, and the process exits 1 (2 for bad usage).

#define EXIT_USAGE 2

#ifdef UNIPOOL_FUZZ
#include <setjmp.h>
static jmp_buf fuzz_escape;  // dev/fuzz: a rejected input returns to the harness instead of exiting
#endif

// Defined with the I/O code below ("Errors and checked I/O").
__attribute__((format(printf, 1, 2), noreturn)) static void fail(const char *fmt, ...);
__attribute__((format(printf, 1, 2), noreturn)) static void usage_error(const char *fmt, ...);
static FILE *fopen_check_(const char *path, const char *mode, const char *src, int line);
#define fopen_check(path, mode) fopen_check_(path, mode, __FILE__, __LINE__)
static void fread_check_(void *dst, size_t size, size_t n, FILE *f, const char *path,
                         const char *src, int line);
#define fread_check(dst, size, n, f, path) fread_check_(dst, size, n, f, path, __FILE__, __LINE__)
static void *malloc_check_(size_t size, const char *src, int line);
#define malloc_check(size) malloc_check_(size, __FILE__, __LINE__)
static void *calloc_check_(size_t n, size_t size, const char *src, int line);
#define calloc_check(n, size) calloc_check_(n, size, __FILE__, __LINE__)

/* The processes of a data-parallel run (see "Data parallelism"): this one's
   rank and their number R. One process without MPI. */
typedef struct { int rank, size; } World;
static World world = {0, 1};
static void world_shard(size_t P, int q, size_t *lo, size_t *hi);  // rank q's range of P parameters
// this rank's rows of a micro-batch
static const int *world_rows(const int *rows, int B, int T);
// x summed over the ranks, in place
static void world_sum_i64(int64_t *x, size_t n);
static void world_sum_f64(double *x, int n);                        // the same, in rank order
// g summed over the ranks, own range
static void world_reduce_scatter(float *g, size_t P);
// every rank's range of p to every rank
static void world_allgather(float *p, size_t P);
static void world_finish(void);                                     // before a clean exit
static void world_abort(int code);                                  // ends every rank's process

/* Zeroed memory for the big buffers (parameters, gradients, AdamW moments,
   activations); defined in the machinery section (huge pages). */
static void *calloc_big_(size_t size, const char *src, int line);
#define calloc_big(size) calloc_big_(size, __FILE__, __LINE__)

/* The threads of a step beside other busy processes (see "Threads beside other
   processes" in the machinery section): sharing_start once, sharing_step after
   each step, which returns the thread count for the next (or 0, unchanged). */
typedef struct {
    // threads on a free machine (0: the user chose a count), threads now
    int most, now;
    // at the start of the window: clock, busy CPU seconds of all, of this process
    double wall, busy, own;
} Sharing;
static void sharing_start(Sharing *s, int adapt);
static int sharing_step(Sharing *s, double *others);

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

#define PI 3.14159265358979323846

static double rng_normal(Rng *r) {  // Box-Muller; 1 - u keeps log() away from 0
    double u = 1.0 - rng_uniform(r), w = rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(2.0 * PI * w);
}

// ----------------------------------------------------------------------------
// Configuration (SPEC section 1) and the parameter table (SPEC section 2)

/* File magics, one constant each; the dev/ Python scripts read them from here. */
#define DUMP_MAGIC 20261125      // reference dump (SPEC section 6)
#define DUMP_VERSION 1
#define SHARD_MAGIC 20240520     // llm.c token shard: int32[256] header, then tokens
#define SHARD_VERSION_U16 1      // tokens are uint16
#define SHARD_VERSION_U32 7      // tokens are uint32
// GPT-2's vocabulary: the one a shard means when its header's vocabulary slot is 0
#define GPT2_VOCAB 50257
// llm.c decoding table: uint32[256] header, then (length, bytes) per token
#define TOKENIZER_MAGIC 20240328
#define TOKENIZER_VERSION 2
#define CKPT_MAGIC 20261127      // checkpoint (see "Checkpoints" below)
#define CKPT_VERSION 2           // written: the data paths follow the header blocks
#define CKPT_VERSION_1 1         // read too: no data paths

enum { ROUTER_SOFTMAX = 0, ROUTER_NORM = 1, ROUTER_SIGMOID = 2 };
enum { AUX_NONE = 0, AUX_LAYER = 1, AUX_POOL_PREV = 2, AUX_POOL_CUR = 3 };

typedef struct {
    int V, Vp, maxT, L, C, NH, NKV, F, G, E, K, router, aux;
    float alpha, norm_eps, rope_theta, router_c, router_eps;
    float bias_rate;  // sigmoid router: step of the expert bias per training step
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
__attribute__((unused)) static const char *const param_names[NUM_PARAM_TENSORS] = {
    PARAM_TABLE(X_NAME, 0)};
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
/* Layer l's slices of the per-layer tensors, of the parameters or of their gradients. */
typedef struct {
    float *attn_norm;     // (C)
    float *wq;            // (NH*hd,C)
    float *wk, *wv;       // (NKV*hd,C)
    float *wo;            // (C,NH*hd)
    float *ffn_norm;      // (C)
    float *router;        // (E,C)
    float *router_scale;  // (1) the NormRouter's sigma
} LayerTensors;

static LayerTensors layer_tensors(const ParamTensors *t, const Config *c, size_t l) {
    size_t C = c->C, Q = (size_t)c->NH * HD(c), KV = (size_t)c->NKV * HD(c), E = c->E;
    return (LayerTensors){t->attn_norm + l * C, t->wq + l * Q * C,         t->wk + l * KV * C,
                          t->wv + l * KV * C,   t->wo + l * C * Q,         t->ffn_norm + l * C,
                          t->router + l * E * C, t->router_scale + l};
}

static const char *config_error(const Config *c) {
    // bounds far beyond any real model keep every size computation small enough for 64 bits
    if (c->Vp > (1 << 24) || c->L > 1024 || c->C > (1 << 16) || c->F > (1 << 20) ||
        c->maxT > (1 << 16) || c->G > 1024 || c->E > (1 << 16))
        return "a size is beyond this program's bounds (Vp 2^24, L 1024, C 2^16, F 2^20, maxT 2^16, G 1024, E 2^16)";
    if (c->V < 1 || c->Vp < c->V) return "need 1 <= V <= Vp";
    if (c->L < 1 || c->C < 1 || c->F < 1 || c->maxT < 1) return "L, C, F and maxT must be positive";
    if (c->NH < 1 || c->NKV < 1 || c->NH % c->NKV) return "NH must be a multiple of NKV";
    if (c->C % c->NH || HD(c) % 2 || HD(c) > 1024) return "C / NH (the head size) must be an even whole number <= 1024";
    if (c->G < 1 || c->L % c->G) return "the number of pools G must divide L";
    if (c->E < 1 || c->K < 1 || c->K > c->E) return "need 1 <= K <= E";
    if (c->router < ROUTER_SOFTMAX || c->router > ROUTER_SIGMOID) return "router must be 0, 1 or 2";
    if (c->aux < AUX_NONE || c->aux > AUX_POOL_CUR) return "aux must be 0..3";
    if (c->router == ROUTER_SIGMOID && c->aux != AUX_NONE)
        return "the sigmoid router balances with its expert bias, not an aux loss (aux must be none)";
    if (!(c->bias_rate >= 0.0f && c->bias_rate <= 1.0f)) return "the expert bias rate must be in [0, 1]";
    if (!(c->norm_eps > 0) || !(c->rope_theta > 0) || !(c->router_eps >= 0) || !(c->router_c > 0) ||
        !isfinite(c->norm_eps + c->rope_theta + c->router_eps + c->router_c))
        return "norm_eps, rope_theta and router_c must be > 0, router_eps >= 0, all finite";
    if (!(c->alpha >= 0.0f && c->alpha <= 1e3f)) return "the aux coefficient alpha must be in [0, 1000]";
    return NULL;
}

// ----------------------------------------------------------------------------
// The kernels' interface. The model calls exponential, matmul_forward,
// matmul_backward, attention_forward, attention_backward and experts_matmul,
// each a function defined next to its plain twin (name_ref) and its math
// below; it runs name_ref in a `make REFERENCE=1` build (-DUNIPOOL_REFERENCE),
// else the fast name_fast of the machinery section at the end of the file.
// The plain twins are loops in float in a fixed order, with OpenMP over
// rows or heads; test_unipool holds both to oracles that sum in double.

#ifdef UNIPOOL_REFERENCE
#define KERNEL(name) name##_ref
#else
#define KERNEL(name) name##_fast
#endif
#define KERNEL_DEF __attribute__((unused)) static  // a build leaves one definition of each unused

/* The parts of a training step, for dev/bench's share of a step in each:
   model_forward, model_backward and the update mark the part they enter.
   The programs time nothing (STEP_PART is empty); dev/bench defines it. */
enum { PART_HEAD, PART_ATTENTION, PART_ROUTERS, PART_EXPERTS, PART_ADAMW, NUM_PARTS };
#ifndef STEP_PART
#define STEP_PART(part) ((void)0)
#endif

/* One attention call: B sequences of T queries at positions [t0, t0 + T),
   NH query heads and NKV key/value heads of hd each. */
typedef struct {
    int B, T, t0, NH, NKV, hd;
    const float *q;      // (B,T,NH*hd) queries after RoPE
    const float *k, *v;  // (B,t0+T,NKV*hd) keys after RoPE, values
} Attention;

static inline float exp_fast(float x);
KERNEL_DEF void matmul_forward_fast(float *out, const float *inp, const float *w, int rows,
                                    int n_in, int n_out);
KERNEL_DEF void matmul_backward_fast(float *dinp, float *dw, const float *dout, const float *inp,
                                     const float *w, int rows, int n_in, int n_out);
KERNEL_DEF void weight_grad_fast(float *dw, const float *dout, const int *drows, const float *inp,
                                 const int *irows, int rows, int n_in, int n_out);
KERNEL_DEF void attention_forward_fast(float *out, float *lse, const Attention *at);
KERNEL_DEF void attention_backward_fast(float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const Attention *at);
KERNEL_DEF void experts_matmul_fast(float *y, const float *x, const float *w, const int *offset,
                                    int E, int n_in, int n_out, int backward);

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

// 16 partial maxima, for the same reason as dot
static inline float max_of(const float *x, int n) {
    float m[16];
    for (int j = 0; j < 16; j++) m[j] = x[0];
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    for (; i < n; i++) m[0] = x[i] > m[0] ? x[i] : m[0];
    for (int j = 1; j < 16; j++) m[0] = m[j] > m[0] ? m[j] : m[0];
    return m[0];
}

static inline float exp_ref(float x) { return expf(x); }
static inline float exponential(float x) { return KERNEL(exp)(x); }  // e^x as the model computes it

static inline float sigmoid(float x) { return 1.0f / (1.0f + exponential(-x)); }

/* sum_i exp(x[i] - shift), in 8 double partial sums: 50,000 terms stay
   exact to ~1e-9. The terms are stored in out (which may be x) unless it is
   NULL. */
static inline double sum_exp(float *out, const float *x, int n, float shift) {
    double acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            float e = exponential(x[i + j] - shift);
            if (out) out[i + j] = e;
            acc[j] += e;
        }
    for (; i < n; i++) {
        float e = exponential(x[i] - shift);
        if (out) out[i] = e;
        acc[0] += e;
    }
    double s = 0.0;
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

// ----------------------------------------------------------------------------
// Layers. Outputs first in every argument list; backward functions accumulate
// (+=) into parameter gradients and into the input gradient.

// x[n] = wte[token[n]]
static void encoder_forward(float *out, const int *tokens, const float *wte, int N, int C) {
    // out (N,C), tokens (N), wte (Vp,C)
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, C * sizeof(float));
}

static void encoder_backward(float *dwte, const float *dout, const int *tokens, int N, int C) {
    // dwte (Vp,C) +=, dout (N,C); in token order, so repeated tokens add up deterministically
    for (int n = 0; n < N; n++) axpy(dwte + (size_t)tokens[n] * C, 1.0f, dout + (size_t)n * C, C);
}

// out = a + b: a residual connection (its backward passes the gradient to both unchanged)
static void residual_forward(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
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
#define RMS_DW_CHANNELS 16  // channels of dw per task: 64 bytes of each row

static void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int N, int C) {
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
    // dw reduces over tokens: split by channel so each sum has one owner and a fixed order (token
    // order). A task takes RMS_DW_CHANNELS of them (a cache line of each row) and walks the rows
    // once, so each line is read once and the sums run side by side. The fused multiply-add is
    // written out, so that the bits do not hinge on what the compiler contracts.
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < C; i0 += RMS_DW_CHANNELS) {
        int n_ch = C - i0 < RMS_DW_CHANNELS ? C - i0 : RMS_DW_CHANNELS;
        float s[RMS_DW_CHANNELS] = {0};
        for (int n = 0; n < N; n++) {
            const float *dy = dout + (size_t)n * C + i0, *x = inp + (size_t)n * C + i0;
            for (int i = 0; i < n_ch; i++) s[i] = fmaf(dy[i] * x[i], rstd[n], s[i]);
        }
        for (int i = 0; i < n_ch; i++) dw[i0 + i] += s[i];
    }
}

/* A linear map, y = x W^T with W (out, in) as nn.Linear stores it:
     forward:  out (rows,n_out) = inp (rows,n_in) W^T,  W (n_out,n_in)
     backward: dinp (rows,n_in) += dout (rows,n_out) W,  dW (n_out,n_in) += dout^T inp
   Here n_in and n_out are the map's input and output sizes. The plain loops
   sum in float in a fixed order: each dot product in dot's 16 partial sums,
   each accumulation over rows or outputs in their order. They go through
   the rows in blocks of PLAIN_ROWS, which stay in the L1 cache while W
   streams past once per block. */
#define PLAIN_ROWS 32

KERNEL_DEF void matmul_forward_ref(float *out, const float *inp, const float *w, int rows, int n_in,
                                   int n_out) {
#pragma omp parallel for schedule(static)
    for (int r0 = 0; r0 < rows; r0 += PLAIN_ROWS)
        for (int o = 0; o < n_out; o++)
            for (int r = r0; r < rows && r < r0 + PLAIN_ROWS; r++)
                out[(size_t)r * n_out + o] =
                    dot(inp + (size_t)r * n_in, w + (size_t)o * n_in, n_in);
}

// What the model calls: the plain loop above in the reference build, else the fast one (machinery).
static void matmul_forward(float *out, const float *inp, const float *w, int rows, int n_in,
                           int n_out) {
    KERNEL(matmul_forward)(out, inp, w, rows, n_in, n_out);
}

/* The weight gradient over rows taken from anywhere: dW (n_out,n_in) +=
   sum over r < rows of dout[dr]^T inp[ir], with row dr = drows[r] of dout
   (.,n_out) and row ir = irows[r] of inp (.,n_in), or row r where the index
   is NULL. A pooled expert's rows of every layer are read where they are,
   never gathered. */
KERNEL_DEF void weight_grad_ref(float *dw, const float *dout, const int *drows, const float *inp,
                                const int *irows, int rows, int n_in, int n_out) {
#pragma omp parallel for schedule(static)
    for (int o0 = 0; o0 < n_out; o0 += PLAIN_ROWS)
        for (int r = 0; r < rows; r++) {
            const float *dy = dout + (size_t)(drows ? drows[r] : r) * n_out,
                        *x = inp + (size_t)(irows ? irows[r] : r) * n_in;
            for (int o = o0; o < n_out && o < o0 + PLAIN_ROWS; o++)
                axpy(dw + (size_t)o * n_in, dy[o], x, n_in);
        }
}

static void weight_grad(float *dw, const float *dout, const int *drows, const float *inp,
                        const int *irows, int rows, int n_in, int n_out) {
    KERNEL(weight_grad)(dw, dout, drows, inp, irows, rows, n_in, n_out);
}

KERNEL_DEF void matmul_backward_ref(float *dinp, float *dw, const float *dout, const float *inp,
                                    const float *w, int rows, int n_in, int n_out) {
    // either of dinp, dw may be NULL
    if (dinp) {
#pragma omp parallel for schedule(static)
        for (int r0 = 0; r0 < rows; r0 += PLAIN_ROWS)
            for (int o = 0; o < n_out; o++)
                for (int r = r0; r < rows && r < r0 + PLAIN_ROWS; r++)
                    axpy(dinp + (size_t)r * n_in, dout[(size_t)r * n_out + o], w + (size_t)o * n_in,
                         n_in);
    }
    if (dw) weight_grad_ref(dw, dout, NULL, inp, NULL, rows, n_in, n_out);
}

static void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                            const float *w, int rows, int n_in, int n_out) {
    KERNEL(matmul_backward)(dinp, dw, dout, inp, w, rows, n_in, n_out);
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

static void rope_apply(float *x, const float *cosv, const float *sinv, int N, int T, int pos0,
                       int nh, int hd, int dir) {
    // x (N, nh*hd) in place; token n sits at position pos0 + n % T
    int h2 = hd / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *cs = cosv + (size_t)(pos0 + n % T) * h2,
                    *sn = sinv + (size_t)(pos0 + n % T) * h2;
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

/* Causal attention with grouped key/value heads: query head h reads
   key/value head h / (NH/NKV), and the query at position t sees keys j <= t:
     s_j = q_t . k_j / sqrt(hd),  p = softmax(s),  o_t = sum_j p_j v_j
   The forward keeps each row's logsumexp, lse = log sum_j exp(s_j), so the
   backward recomputes p_j = exp(s_j - lse) instead of storing T x T of them:
     ds_j = p_j (do_t . v_j - do_t . o_t)
     dq_t += sum_j ds_j k_j / sqrt(hd),  dk_j += ds_j q_t / sqrt(hd),  dv_j += p_j do_t
   The queries may start at position t0 (KV-cache decoding, B = 1): keys and
   values then hold positions [0, t0 + T). */
KERNEL_DEF void attention_forward_ref(float *out, float *lse, const Attention *at) {
    // out (B,T,NH*hd), lse (B,T,NH), q (B,T,NH*hd), k, v (B,t0+T,NKV*hd)
    int B = at->B, T = at->T, t0 = at->t0, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            // one query's scores, then weights
            float *p = malloc_check((size_t)(t0 + T) * sizeof(float));
            const float *kb = k + (size_t)b * (t0 + T) * ks + (h / grp) * hd, *vb = v + (kb - k);
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * qs + h * hd;
                float *o = out + ((size_t)b * T + t) * qs + h * hd;
                int n = t0 + t + 1;  // keys this query sees
                float mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {
                    p[j] = dot(qt, kb + (size_t)j * ks, hd) * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j < n; j++) sum += (p[j] = exponential(p[j] - mx));
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int j = 0; j < n; j++) axpy(o, p[j] / sum, vb + (size_t)j * ks, hd);
                lse[((size_t)b * T + t) * NH + h] = mx + logf(sum);
            }
            free(p);
        }
}

static void attention_forward(float *out, float *lse, const Attention *at) {
    KERNEL(attention_forward)(out, lse, at);
}

KERNEL_DEF void attention_backward_ref(float *dq, float *dk, float *dv, const float *dout,
                                       const float *out, const float *lse, const Attention *at) {
    // dq (B,T,NH*hd) +=, dk, dv (B,T,NKV*hd) +=, dout, out (B,T,NH*hd), lse (B,T,NH)
    int B = at->B, T = at->T, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    float scale = 1.0f / sqrtf((float)hd);
    // a task per (sequence, kv head): it alone writes
    // that head's dk and dv, and its query heads' dq
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < NKV; kh++)
            for (int h = kh * grp; h < (kh + 1) * grp; h++)
                for (int t = 0; t < T; t++) {
                    size_t qo = ((size_t)b * T + t) * qs + h * hd,
                           ko = (size_t)b * T * ks + kh * hd;
                    // do_t . o_t
                    float D = dot(dout + qo, out + qo, hd), l = lse[((size_t)b * T + t) * NH + h];
                    for (int j = 0; j <= t; j++) {
                        size_t kj = ko + (size_t)j * ks;
                        float pj = exponential(dot(q + qo, k + kj, hd) * scale - l);
                        float ds = pj * (dot(dout + qo, v + kj, hd) - D) * scale;
                        axpy(dq + qo, ds, k + kj, hd);
                        axpy(dk + kj, ds, q + qo, hd);
                        axpy(dv + kj, pj, dout + qo, hd);
                    }
                }
}

static void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const Attention *at) {
    KERNEL(attention_backward)(dq, dk, dv, dout, out, lse, at);
}

/* The routers. A token's router logits z (E) = router h become its scores s
   (E); its K largest scores (plus the sigmoid router's expert bias) choose its
   experts (topk_forward), and the chosen scores are their gates. Each router's
   forward sits beside its backward; router_forward and router_backward run
   the configured one over the N tokens of a layer. */

/* Softmax router (vanilla MoE): s = softmax(z).
   Backward: dz = s (ds - sum_j s_j ds_j). */
static void softmax_router_forward(float *s, const float *z, int E) {
    float mx = z[0], sum = 0.0f;
    for (int j = 1; j < E; j++) mx = z[j] > mx ? z[j] : mx;
    for (int j = 0; j < E; j++) sum += (s[j] = exponential(z[j] - mx));
    for (int j = 0; j < E; j++) s[j] /= sum;
}

static void softmax_router_backward(float *d, const float *ds, const float *s, int E) {
    float sds = dot(s, ds, E);
    for (int j = 0; j < E; j++) d[j] = s[j] * (ds[j] - sds);
}

/* NormRouter (UniPool): s = sigma c relu(u), u = z / (||z|| + eps). sigma is
   learned per layer; c (norm_router_c below) makes the chosen scores about 1
   in norm at initialisation.
   Backward, with r = ||z||: du = sigma c ds [u > 0],
     dz = du / (r + eps) - z (du . z) / (r (r + eps)^2),  dsigma = sum c relu(u) ds. */
static void norm_router_forward(float *s, const float *z, float sigma, float c, float eps, int E) {
    float inv = 1.0f / (sqrtf(dot(z, z, E)) + eps);
    for (int j = 0; j < E; j++) {
        float u = z[j] * inv;
        s[j] = sigma * c * (u > 0.0f ? u : 0.0f);
    }
}

static void norm_router_backward(float *d, const float *ds, const float *z, float sigma, float c,
                                 float eps, int E) {
    // d (E) written: one token's dz; du . z summed apart, with fused multiply-adds
    float r = sqrtf(dot(z, z, E)), re = r + eps, duz = 0.0f;
    for (int j = 0; j < E; j++) d[j] = z[j] / re > 0.0f ? sigma * c * ds[j] : 0.0f;  // du
    for (int j = 0; j < E; j++) duz = fmaf(d[j], z[j], duz);
    float corr = r > 0.0f ? duz / (r * re * re) : 0.0f;
    for (int j = 0; j < E; j++) d[j] = d[j] / re - z[j] * corr;
}

/* One token's part of dsigma, sum_j c relu(u_j) ds_j, added to dsig in
   double, j in order. The layer's dsigma sums its tokens in order on one
   thread, so its bits do not depend on the thread count; c relu(u) comes
   first, so that the sum's dependency chain holds only its multiply-adds,
   each fused (one rounding a term) whatever the compiler would contract. */
static double norm_router_dsigma(double dsig, const float *ds, const float *z, float c, float eps,
                                 int E) {
    double cu[E];  // c relu(u) (E)
    float re = sqrtf(dot(z, z, E)) + eps;
    for (int j = 0; j < E; j++) {
        float u = z[j] / re;
        cu[j] = (double)c * (u > 0.0f ? u : 0.0f);
    }
    for (int j = 0; j < E; j++) dsig = fma(cu[j], ds[j], dsig);
    return dsig;
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

// The router constant a new model stores: the NormRouter's c, 1 for the others.
static float router_constant(const Config *c) {
    return c->router == ROUTER_NORM ? norm_router_c(c->E, c->K, ROUTER_C_DRAWS, ROUTER_C_SEED)
                                    : 1.0f;
}

/* Sigmoid router with an expert bias: the router of the paper's vanilla 182M
   script, its strongest vanilla baseline. s = sigmoid(z), no aux loss; a
   per-layer expert bias (E) moves the choice, never the gate, and steps after
   each update towards an even load (expert_bias_update). With K > 1 the
   chosen gates are renormalised to sum to one (router_gates below).
   Backward: dz = ds' s (1 - s), s = sigmoid(z) recomputed, where ds' = ds
   for K = 1 and, through g = s / D (D = sum of the chosen s + 1e-20),
   ds'_j = (dg_j - sum_k dg_k g_k) / D for K > 1. */
static void sigmoid_router_forward(float *s, const float *z, int E) {
    for (int j = 0; j < E; j++) s[j] = sigmoid(z[j]);
}

static void sigmoid_router_backward(float *d, const float *ds, const float *s, const float *z,
                                    const int *ch, int E, int K) {
    // d (E) written; ch (K) the token's chosen experts
    for (int j = 0; j < E; j++) d[j] = ds[j];
    if (K > 1) {
        float sum = 0.0f, dgg = 0.0f;
        for (int k = 0; k < K; k++) sum += sigmoid(z[ch[k]]), dgg += ds[ch[k]] * s[ch[k]];
        for (int k = 0; k < K; k++) d[ch[k]] = (ds[ch[k]] - dgg) / (sum + 1e-20f);
    }
    for (int j = 0; j < E; j++) {
        float sg = sigmoid(z[j]);
        d[j] *= sg * (1.0f - sg);
    }
}

/* The sigmoid router with K > 1 mixes its chosen experts with weights that
   sum to one: g_j = s_j / (sum over chosen of s + 1e-20), written over s_j. */
static void router_gates(float *score, const int *chosen, int N, int E, int K) {
    // score (N,E) in place at the chosen entries, chosen (N,K)
    for (int n = 0; n < N; n++) {
        float *s = score + (size_t)n * E, sum = 0.0f;
        const int *ch = chosen + (size_t)n * K;
        for (int k = 0; k < K; k++) sum += s[ch[k]];
        for (int k = 0; k < K; k++) s[ch[k]] /= sum + 1e-20f;
    }
}

// The configured router over N tokens: score (N,E)
// from z (N,E); sigma is the layer's NormRouter scale.
static void router_forward(float *score, const float *z, float sigma, const Config *c, int N) {
    int E = c->E;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *zn = z + (size_t)n * E;
        float *s = score + (size_t)n * E;
        if (c->router == ROUTER_SOFTMAX) softmax_router_forward(s, zn, E);
        else if (c->router == ROUTER_NORM)
            norm_router_forward(s, zn, sigma, c->router_c, c->router_eps, E);
        else sigmoid_router_forward(s, zn, E);
    }
}

static void router_backward(float *dz, float *dsigma, const float *dscore, const float *z,
                            const float *score, const int *chosen, float sigma, const Config *c,
                            int N) {
    // dz (N,E) written, dsigma (1) +=, dscore, z, score (N,E), chosen (N,K)
    int E = c->E, K = c->K;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *zn = z + (size_t)n * E, *s = score + (size_t)n * E,
                    *ds = dscore + (size_t)n * E;
        float *d = dz + (size_t)n * E;
        if (c->router == ROUTER_SOFTMAX) softmax_router_backward(d, ds, s, E);
        else if (c->router == ROUTER_NORM)
            norm_router_backward(d, ds, zn, sigma, c->router_c, c->router_eps, E);
        else sigmoid_router_backward(d, ds, s, zn, chosen + (size_t)n * K, E, K);
    }
    if (c->router != ROUTER_NORM) return;
    double dsig = 0.0;
    for (int n = 0; n < N; n++)
        dsig = norm_router_dsigma(dsig, dscore + (size_t)n * E, z + (size_t)n * E, c->router_c,
                                  c->router_eps, E);
    *dsigma += (float)dsig;
}

/* The K largest of score + bias for each token, ties to the lower index.
   bias (E) is the sigmoid router's expert bias, NULL for the others: it
   moves the choice, never the gate. */
static void topk_forward(int *chosen, const float *score, const float *bias, int N, int E, int K) {
    // chosen (N,K), score (N,E), bias (E) or NULL
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *s = score + (size_t)n * E;
        int *ch = chosen + (size_t)n * K;
        for (int k = 0; k < K; k++) {
            int best = -1;
            float bv = 0.0f;
            for (int j = 0; j < E; j++) {
                int taken = 0;
                for (int kk = 0; kk < k; kk++) taken |= ch[kk] == j;
                float v = bias ? s[j] + bias[j] : s[j];
                if (!taken && (best < 0 || v > bv)) best = j, bv = v;
            }
            ch[k] = best;
        }
    }
}

/* Cross-entropy over the first V of Vp logits: loss_n = lse_n - logit[target].
   The backward writes d logits over the logits (they are not needed after):
   (softmax - onehot) * dloss for the first V, 0 for the padding. */
static double crossentropy_forward(float *losses, float *lse, const float *logits,
                                   const int *targets, int N, int V, int Vp) {
    // losses (N), lse (N), logits (N,Vp), targets (N); returns the summed loss
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *lg = logits + (size_t)n * Vp;
        float mx = max_of(lg, V);
        lse[n] = mx + (float)log(sum_exp(NULL, lg, V, mx));
        losses[n] = lse[n] - lg[targets[n]];
    }
    double sum = 0.0;
    for (int n = 0; n < N; n++) sum += losses[n];
    return sum;
}

static void crossentropy_backward(float *logits, const float *lse, const int *targets, float dloss,
                                  int N, int V, int Vp) {
    // logits (N,Vp) in: logits, out: d logits
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *lg = logits + (size_t)n * Vp;
        float l = lse[n];
        for (int i = 0; i < V; i++) lg[i] = exponential(lg[i] - l) * dloss;
        lg[targets[n]] -= dloss;
        for (int i = V; i < Vp; i++) lg[i] = 0.0f;
    }
}

// ----------------------------------------------------------------------------
// The mixture of experts: one layer's view of its pool

/* A layer's mixture, dropless: y_n = sum_k gate_nk expert_{chosen_nk}(x_n),
   with expert_e(x) = fc2_e (silu(a) * b), [a; b] = fc1_e x (a the gate rows,
   b the up rows), silu(a) = a sigmoid(a). Ownership is all a layer needs to
   know: fc1 and fc2 below point at the E experts of its pool
   (layer_first_expert), so with G < L several layers read the same rows.

   It runs expert by expert. The N*K (token, slot) assignments are sorted by
   expert (the dispatch); row p of the sorted order is assignment order[p],
   and expert e's rows are the block [offset[e], offset[e+1]). Then
     xs[p]  = x[order[p] / K]                          (N*K,C)  gather
     h_e    = xs_e fc1_e^T                             (n_e,2F) one product per expert
     act    = silu(h[:, :F]) * h[:, F:]                (N*K,F)  SwiGLU
     eout_e = act_e fc2_e^T                            (n_e,C)  one product per expert
     y_n    = sum_k gate_nk eout[slot[n K + k]]        (N,C)    the gated scatter-add
   and the backward runs the same steps in reverse. An expert with no tokens
   costs nothing. */
typedef struct {
    int *order;   // (N*K) assignment a = n*K + k at each sorted position
    int *slot;    // (N*K) sorted position of each assignment (inverse of order)
    int *offset;  // (E+1) first sorted position of each expert
} Dispatch;

// A counting sort by expert, stable (so deterministic); its counts are also the experts' loads.
static void moe_dispatch(Dispatch *d, const int *chosen, int NK, int E) {
    for (int e = 0; e <= E; e++) d->offset[e] = 0;
    for (int a = 0; a < NK; a++) d->offset[chosen[a] + 1]++;
    for (int e = 0; e < E; e++) d->offset[e + 1] += d->offset[e];
    for (int a = 0; a < NK; a++) d->slot[a] = d->offset[chosen[a]]++;
    for (int e = E; e > 0; e--) d->offset[e] = d->offset[e - 1];  // undo the increments
    d->offset[0] = 0;
    for (int a = 0; a < NK; a++) d->order[d->slot[a]] = a;
}

// What a layer's mixture reads: its input, its routing and its pool.
typedef struct {
    int N, C, F, E, K;
    const float *x;          // (N,C) input: the ffn norm's output
    const float *score;      // (N,E) router scores; the chosen ones are the gates
    const int *chosen;       // (N,K) chosen experts, indices into the pool
    const float *fc1, *fc2;  // (E,2F,C), (E,C,F) the pool's experts
    Dispatch d;              // the assignments sorted by expert
} MoeLayer;

static void moe_gather(float *xs, const float *x, const Dispatch *d, int NK, int K, int C) {
    // xs (N*K,C) rows in sorted order, x (N,C)
#pragma omp parallel for schedule(static)
    for (int p = 0; p < NK; p++)
        memcpy(xs + (size_t)p * C, x + (size_t)(d->order[p] / K) * C, C * sizeof(float));
}

/* Expert e's product over its block of sorted rows, W (E,n_out,n_in):
     forward:  y_e = x_e W_e^T  (x rows of n_in, y rows of n_out)
     backward: y_e += x_e W_e   (the input's gradient: x rows of n_out, y rows of n_in) */
static void expert_matmul(float *y, const float *x, const float *w, const int *offset, int e,
                          int n_in, int n_out, int backward) {
    size_t ys = backward ? (size_t)n_in : (size_t)n_out,
           xs = backward ? (size_t)n_out : (size_t)n_in;
    int p0 = offset[e], ne = offset[e + 1] - p0;
    if (ne == 0) return;  // an expert no token chose costs nothing
    float *ye = y + (size_t)p0 * ys;
    const float *xe = x + (size_t)p0 * xs, *we = w + (size_t)e * n_out * n_in;
    if (backward)
        matmul_backward(ye, NULL, xe, NULL, we, ne, n_in, n_out);
    else
        matmul_forward(ye, xe, we, ne, n_in, n_out);
}

// Every expert's product of one layer, one after another
// (the fast build schedules them on the threads).
KERNEL_DEF void experts_matmul_ref(float *y, const float *x, const float *w, const int *offset,
                                   int E, int n_in, int n_out, int backward) {
    for (int e = 0; e < E; e++) expert_matmul(y, x, w, offset, e, n_in, n_out, backward);
}

static void experts_matmul(float *y, const float *x, const float *w, const int *offset, int E,
                           int n_in, int n_out, int backward) {
    KERNEL(experts_matmul)(y, x, w, offset, E, n_in, n_out, backward);
}

// SwiGLU: h = [a; b] (2F), out = silu(a) * b, silu(a) = a sigmoid(a)
static void swiglu_forward(float *out, const float *h, int M, int F) {
    // out (M,F), h (M,2F)
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *a = h + (size_t)m * 2 * F, *b = a + F;
        float *o = out + (size_t)m * F;
        for (int i = 0; i < F; i++) o[i] = a[i] * sigmoid(a[i]) * b[i];
    }
}

/* da = dout b silu'(a), silu'(a) = sig(a) (1 + a (1 - sig(a))); db = dout silu(a);
   and the forward's output again, act = silu(a) b (the same bits), which
   the weight gradient of fc2 needs. In place: dh may be h and act may be
   dout. Each element is read before it is written, but a vectorised loop
   may not assume so; inputs go through a small copy. */
#define SWIGLU_CHUNK 256
static void swiglu_backward(float *dh, float *act, const float *dout, const float *h, int M,
                            int F) {
    // dh (M,2F) written, act (M,F) written, dout (M,F), h (M,2F)
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++)
        for (int i0 = 0; i0 < F; i0 += SWIGLU_CHUNK) {
            int n = F - i0 < SWIGLU_CHUNK ? F - i0 : SWIGLU_CHUNK;
            float a[SWIGLU_CHUNK], b[SWIGLU_CHUNK], d[SWIGLU_CHUNK];
            memcpy(a, h + (size_t)m * 2 * F + i0, n * sizeof(float));
            memcpy(b, h + (size_t)m * 2 * F + F + i0, n * sizeof(float));
            memcpy(d, dout + (size_t)m * F + i0, n * sizeof(float));
            float *restrict da = dh + (size_t)m * 2 * F + i0, *restrict db = da + F;
            float *restrict o = act + (size_t)m * F + i0;
            for (int i = 0; i < n; i++) {
                float sg = sigmoid(a[i]), silu = a[i] * sg;
                da[i] = d[i] * b[i] * sg * (1.0f + a[i] * (1.0f - sg));
                db[i] = d[i] * silu;
                o[i] = silu * b[i];
            }
        }
}

static void moe_forward(float *y, float *h, float *eout, float *xs, float *act,
                        const MoeLayer *ml) {
    // y (N,C); saved for the backward: h (N*K,2F), eout (N*K,C); scratch: xs (N*K,C), act (N*K,F)
    const float *score = ml->score;
    const int *chosen = ml->chosen;
    const Dispatch *d = &ml->d;
    int N = ml->N, C = ml->C, F = ml->F, E = ml->E, K = ml->K;
    moe_gather(xs, ml->x, d, N * K, K, C);
    experts_matmul(h, xs, ml->fc1, d->offset, E, C, 2 * F, 0);
    swiglu_forward(act, h, N * K, F);
    experts_matmul(eout, act, ml->fc2, d->offset, E, F, C, 0);
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

/* The backward for the input and the gates. With g the gate and o the
   expert's output (eout):
     dgate = dy . o,   do = g dy,   dact = do fc2,
     da = dact b silu'(a),   db = dact silu(a)   (swiglu_backward),
     dxs = [da; db] fc1,   dx_n += sum_k dxs[slot[n K + k]]
   The experts' weight gradients,
     dfc2_e += do_e^T act_e,   dfc1_e += [da; db]_e^T xs_e,
   wait for pool_weight_grads (below): this backward leaves what they need in
   place of what it has finished with, do over eout, [da; db] over h, and
   SwiGLU's output act, recomputed (the same bits as the forward's). */
static void moe_backward(float *dx, float *dscore, float *eout, float *h, float *act, float *dxs,
                         const float *dy, const MoeLayer *ml) {
    // dx (N,C) +=, dscore (N,E) += at the chosen experts; saved by the forward and overwritten:
    // eout (N*K,C) -> do, h (N*K,2F) -> [da; db]; act
    // (N*K,F) written; scratch dxs (N*K,C); dy (N,C)
    const float *score = ml->score;
    const int *chosen = ml->chosen;
    const Dispatch *d = &ml->d;
    int N = ml->N, C = ml->C, F = ml->F, E = ml->E, K = ml->K;
    int NK = N * K;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int a = n * K + k;
            const float *dyn = dy + (size_t)n * C;
            float g = score[(size_t)n * E + chosen[a]], *eo = eout + (size_t)d->slot[a] * C;
            dscore[(size_t)n * E + chosen[a]] += dot(dyn, eo, C);
            for (int i = 0; i < C; i++) eo[i] = g * dyn[i];
        }
    memset(act, 0, (size_t)NK * F * sizeof(float));
    experts_matmul(act, eout, ml->fc2, d->offset, E, F, C, 1);  // d act, until SwiGLU's backward
    swiglu_backward(h, act, act, h, NK, F);
    memset(dxs, 0, (size_t)NK * C * sizeof(float));
    experts_matmul(dxs, h, ml->fc1, d->offset, E, C, 2 * F, 1);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            axpy(dx + (size_t)n * C, 1.0f, dxs + (size_t)d->slot[n * K + k] * C, C);
}

/* The pooled weight gradient, UniPool's own step in the backward. A shared
   expert serves every layer of its pool, so its gradient is a sum over all
   of them:
     dfc2_e += sum over the pool's layers j of do_{j,e}^T act_{j,e}
     dfc1_e += sum over j of [da; db]_{j,e}^T xs_{j,e}
   model_backward runs it once a pool's last layer in backward order (its
   first) is done, as one product per weight over the expert's rows of every
   layer, so each gradient is written once per pool instead of once per layer
   (vanilla MoE is the pool of one layer). The rows of nl layers are what
   moe_backward left, each layer a block of `block` tokens (block*K rows): */
typedef struct {
    const float *dh;     // (nl,block*K,2F) [da; db], dispatch order
    const float *deout;  // (nl,block*K,C) do
    const float *act;    // (nl,block*K,F) SwiGLU output
    const float *x;      // (nl,block,C) the mixture's input
    const int *order;    // (nl,block*K) dispatch: assignment at each position
    const int *offset;   // (nl,E+1) dispatch: first position of each expert
    int nl;
    size_t block;
} PoolRows;

// Scratch for a chunk of up to N*K rows of one expert, their indices:
// rows (N*K) in the pool's blocks, xrows (N*K) in its inputs'.
typedef struct { int *rows, *xrows; } GradScratch;

/* One expert's weight gradients from R of its rows (rows[r] = layer j of the
   pool times block*K plus the dispatch position), each read where it is:
   row rows[r] of d h, do and the SwiGLU output, and its token's input, row
   j block + order / K of x. Rows that are one run (vanilla: an expert's rows
   of its one layer) go as a plain block. */
static void expert_weight_grads(float *dfc1, float *dfc2, const GradScratch *sc, int R,
                                const PoolRows *pr, int C, int F, int K) {
    // dfc1 (2F,C) +=, dfc2 (C,F) +=
    const int *rows = sc->rows, *order = pr->order;
    int *xrows = sc->xrows;
    size_t blockK = pr->block * K, q0 = (size_t)rows[0];
    int run = rows[R - 1] - rows[0] == R - 1;  // rows increase, so this means consecutive
    for (int r = 0; r < R; r++) {  // row q: position q % blockK of layer j = q / blockK
        int q = rows[r], j = (int)(q / blockK);
        xrows[r] = (int)(j * pr->block) + order[q] / K;
    }
    const int *rr = run ? NULL : rows;  // a run: its rows from q0 on
    size_t r0 = run ? q0 : 0;
    weight_grad(dfc2, pr->deout + r0 * C, rr, pr->act + r0 * F, rr, R, F, C);
    weight_grad(dfc1, pr->dh + r0 * 2 * F, rr, pr->x, xrows, R, C, 2 * F);
}

/* The weight gradients of a pool's E experts: each expert's rows of every
   layer, in layer then dispatch order, in chunks of at most N*K rows (the
   scratch of indices). */
static void pool_weight_grads(float *dfc1, float *dfc2, const GradScratch *sc, const PoolRows *pr,
                              int N, int C, int F, int E, int K) {
    // dfc1 (E,2F,C) +=, dfc2 (E,C,F) +=
    const int *offset = pr->offset;
    int *rows = sc->rows, nl = pr->nl;
    size_t blockK = pr->block * K;
    for (int e = 0; e < E; e++) {
        float *d1 = dfc1 + (size_t)e * 2 * F * C, *d2 = dfc2 + (size_t)e * C * F;
        int R = 0;
        for (int j = 0; j < nl; j++)
            for (int p = offset[j * (E + 1) + e]; p < offset[j * (E + 1) + e + 1]; p++) {
                rows[R++] = (int)(j * blockK + p);
                if (R == N * K) {
                    expert_weight_grads(d1, d2, sc, R, pr, C, F, K);
                    R = 0;
                }
            }
        if (R) expert_weight_grads(d1, d2, sc, R, pr, C, F, K);
    }
}

// ----------------------------------------------------------------------------
// The model

/* Ownership is data. Layer l's router sees experts [g E, (g+1) E) of the one
   expert buffer, g = l / (L/G): G = L gives each layer E experts of its own
   (vanilla MoE), G = 1 gives every layer the same E experts (UniPool), and
   the backward of a shared expert simply accumulates over the layers that
   used it. This function is the only place the difference lives. */
static size_t layer_first_expert(const Config *c, int l) {
    return (size_t)(l / (c->L / c->G)) * c->E;
}

/* Activations, for N = B*T tokens (NK = N*K expert assignments). The
   expressions name local variables of act_alloc. Saved by the forward: */
#define ACT_TABLE(X)                                                               \
    X(resid,  (L + 1) * N * C)  /* (L+1,N,C) residual entering layer l; [L] final norm's input */ \
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
    X(h,      L * NK * 2 * F)   /* (L,N*K,2F) expert fc1 output, dispatch order; then d h */ \
    X(eout,   L * NK * C)       /* (L,N*K,C) expert output before its gate; then its gradient */ \
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
    X(act_pool, LP * NK * F)    /* (L/G,N*K,F) SwiGLU outputs of the pool in the backward */

#define ACT_INT_TABLE(X)                                                           \
    X(inputs,  N)               /* (N) token ids */                                 \
    X(targets, N)               /* (N) next-token ids */                            \
    X(chosen,  L * NK)          /* (L,N,K) expert index within the layer's pool */  \
    X(order,   L * NK)          /* (L,N*K) dispatch: assignment at each position */  \
    X(slot,    L * NK)          /* (L,N*K) dispatch: position of each assignment */ \
    X(offset,  L * (E + 1))     /* (L,E+1) dispatch: first position of each expert */ \
    X(rows,    NK)              /* (N*K) a chunk of one expert's rows across its pool's layers */ \
    X(xrows,   NK)              /* (N*K) the rows of their inputs */

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
    // (opt_hi - opt_lo) AdamW moments, allocated by the first update
    float *m_memory, *v_memory;
    // the parameters this rank updates: all of them on one process
    size_t opt_lo, opt_hi;
    ParamTensors params, grads;
    int adam_t;                            // AdamW updates taken
    float *rope_cos, *rope_sin;            // (maxT, hd/2)
    // load balance (section 4): f (L,E) of this and of the previous training
    // micro-batch (model state: it survives steps), and d aux / d P (L,E)
    float *aux_f, *aux_prev_f, *aux_coef;
    double *aux_P;  // (L,E) scratch of aux_forward: the scores' sum, then mean
    int aux_prev_valid;
    // (L,E) tokens per expert in the last forward, over all ranks
    int64_t *counts;
    // the sigmoid router's balancing (section 3): the expert bias (L,E), and
    // the tokens each expert took at each layer in this step's training
    // micro-batches so far (L,E)
    float *expert_bias;
    int64_t *step_counts;
    // activations, sized by the first forward for up to maxN tokens
    Acts acts;
    void *acts_memory;
    size_t acts_bytes;
    int maxN, B, T;                        // B, T of the last forward
    // its tokens over all ranks: the N of the loss means (B T R)
    int N_all;
    double ce, aux;                        // of the last forward
    // called after each layer's routing, which it may rewrite (infer_unipool's probe); NULL: none
    // chosen (N,K), score (N,E)
    void (*route_hook)(void *ctx, int l, int *chosen, float *score, int N);
    void *route_ctx;
} Model;

static void model_build(Model *m, const Config *cfg) {
    const char *err = config_error(cfg);
    if (err) fail("bad model configuration: %s", err);
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    param_shapes(m->shapes, cfg);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) m->num_params += shape_numel(m->shapes[i]);
    m->params_memory = calloc_big(m->num_params * sizeof(float));
    m->grads_memory = calloc_big(m->num_params * sizeof(float));
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
    m->aux_P = calloc_check(le, sizeof(double));
    m->expert_bias = calloc_check(le, sizeof(float));
    m->step_counts = calloc_check(le, sizeof(int64_t));
    m->counts = calloc_check(le, sizeof(int64_t));
    world_shard(m->num_params, world.rank, &m->opt_lo, &m->opt_hi);
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
    free(m->aux_P);
    free(m->expert_bias);
    free(m->step_counts);
    free(m->counts);
    free(m->acts_memory);
}

/* The paper's initialisation: N(0, std^2) for every matrix (std 0.01 in its
   scripts), N(0, (std/sqrt(2L))^2) for the projections that write into the
   residual stream (wo, expert fc2), 1 for the norms and sigma. Padded
   vocabulary rows start at 0. */
static void model_init(Model *m, uint64_t seed, float init_std) {
    const Config *c = &m->cfg;
    Rng rng = {seed};
    float *p = m->params_memory;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        size_t n = shape_numel(m->shapes[i]);
        float std = (i == PT_wo || i == PT_expert_fc2) ? init_std / sqrtf(2.0f * c->L) : init_std;
        for (size_t j = 0; j < n; j++) p[j] = param_decay[i] ? std * (float)rng_normal(&rng) : 1.0f;
        if (i == PT_wte || i == PT_lm_head)
            memset(p + (size_t)c->V * c->C, 0, (size_t)(c->Vp - c->V) * c->C * sizeof(float));
        p += n;
    }
}

static void act_alloc(Model *m, int N) {
    const Config *c = &m->cfg;
    size_t L = c->L, C = c->C, Q = (size_t)c->NH * HD(c), KV = (size_t)c->NKV * HD(c), NH = c->NH;
    size_t E = c->E, F = c->F, Vp = c->Vp, NK = (size_t)N * c->K, LP = c->L / c->G;
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
    char *mem = m->acts_memory = calloc_big(total);
    for (size_t i = 0; i < nf; i++) { *ff[i] = (float *)mem; mem += fsizes[i] * sizeof(float); }
    for (size_t i = 0; i < ni; i++) { *fi[i] = (int *)mem; mem += isizes[i] * sizeof(int); }
    m->acts_bytes = total;
    m->maxN = N;
}

/* Each layer's expert loads of the last forward, from its dispatch:
   counts[l][j], summed over the ranks, and f[l][j] = counts[l][j] / (K N_all). */
static void expert_loads(Model *m) {
    const Config *c = &m->cfg;
    int L = c->L, E = c->E;
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            const int *off = m->acts.offset + (size_t)l * (E + 1);
            m->counts[l * E + j] = off[j + 1] - off[j];
        }
    world_sum_i64(m->counts, (size_t)L * E);
    for (int i = 0; i < L * E; i++) m->aux_f[i] = (float)m->counts[i] / ((float)c->K * m->N_all);
}

/* After a training micro-batch: its f becomes the stale statistic of the
   next one (aux 2), and the sigmoid router's step counts take its loads. */
static void aux_keep_statistic(Model *m) {
    const Config *c = &m->cfg;
    int LE = c->L * c->E;
    memcpy(m->aux_prev_f, m->aux_f, (size_t)LE * sizeof(float));
    m->aux_prev_valid = 1;
    for (int i = 0; c->router == ROUTER_SIGMOID && i < LE; i++) m->step_counts[i] += m->counts[i];
}

/* The load-balancing loss (SPEC section 4). UniPool's pool loss, as the
   paper writes it, for each pool of M = E experts:
     aux = alpha M sum_j fprev_j P_j
   where, over the L/G layers l of the pool and the micro-batch's N tokens,
     P_j     = mean over l and n of score[l][n][j]   (every candidate: the gradient flows here)
     fprev_j = mean over l of f[l][j] of the previous training micro-batch (the stale statistic),
     f[l][j] = count[l][j] / (K N), count[l][j] the tokens layer l sent to expert j (a constant).
   Its variants: aux 3 takes f of this micro-batch; aux 1 is vanilla MoE's
   per-layer loss, each layer a pool of one (alpha E sum_j f[l][j] P[l][j]);
   aux 0 is none. With P[l][j] the mean over n alone, each of them is
     aux = sum_l sum_j coef[l][j] P[l][j],   coef[l][j] = alpha E fbar[j] / |group|,
   fbar the mean of f over l's group (its pool, or {l}), which is how it is
   computed and what the backward needs: d aux / d score[l][n][j] = coef[l][j] / N.
   In a data-parallel run N and the counts are the whole micro-batch's, all
   ranks' rows (N_all), as on one process; the P summed here is this rank's
   share of the sum over n. */
static double aux_forward(Model *m, int N, int training) {
    const Config *c = &m->cfg;
    int L = c->L, E = c->E, group = c->aux == AUX_LAYER ? 1 : L / c->G;
    expert_loads(m);  // f (L,E) of this micro-batch: m->aux_f
    const float *f = c->aux == AUX_POOL_PREV ? m->aux_prev_f : m->aux_f;
    int active = c->aux != AUX_NONE && (c->aux != AUX_POOL_PREV || m->aux_prev_valid);
    double aux = 0.0, *P = m->aux_P;  // (L,E) sum, then mean
    memset(P, 0, (size_t)L * E * sizeof(double));
#pragma omp parallel for schedule(static)
    for (int l = 0; l < L; l++)  // each P[l][j] summed over n in order, the rows read in turn
        for (int n = 0; n < N; n++)
            for (int j = 0; j < E; j++)
                P[l * E + j] += m->acts.score[((size_t)l * m->maxN + n) * E + j];
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            double fbar = 0.0;
            int l0 = l / group * group;
            for (int ll = l0; ll < l0 + group; ll++) fbar += f[ll * E + j];
            fbar /= group;
            P[l * E + j] /= m->N_all;
            float coef = active ? (float)(c->alpha * E * fbar / group) : 0.0f;
            m->aux_coef[l * E + j] = coef;
            aux += (double)coef * P[l * E + j];
        }
    // evaluation passes leave it, and the step's counts, alone
    if (training) aux_keep_statistic(m);
    return aux;
}

/* d aux / d score[l][n][j] = coef[l][j] / N_all, times the backward's scale:
   where d score (N,E) of layer l starts; the gates' path adds to it. */
static void aux_backward(float *dscore, const float *coef, float scale, int N_all, int N, int E) {
    // dscore (N,E) written, coef (E) layer l's row of aux_coef
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int j = 0; j < E; j++) dscore[(size_t)n * E + j] = coef[j] * scale / N_all;
}

/* Balancing without a loss, for the sigmoid router (SPEC section 3): after
   each step's update, with count[l][j] the tokens of the step's training
   micro-batches that chose expert j at layer l,
     bias[l][j] += rate * sign(mean_j' count[l][j'] - count[l][j])
   in float32. An overloaded expert becomes a little less likely to be
   chosen and an idle one a little more; its gate does not change. */
static void expert_bias_update(Model *m) {
    const Config *c = &m->cfg;
    for (int l = 0; l < c->L; l++) {
        int64_t *cnt = m->step_counts + (size_t)l * c->E, total = 0;
        for (int j = 0; j < c->E; j++) total += cnt[j];
        float mean = (float)total / (float)c->E;
        for (int j = 0; j < c->E; j++) {
            float d = mean - (float)cnt[j];
            m->expert_bias[l * c->E + j] += c->bias_rate * (float)((d > 0.0f) - (d < 0.0f));
            cnt[j] = 0;
        }
    }
}

/* Layer l's mixture over rows [row, row + N) of its (L, maxN) activation
   blocks: its input and routing, and the E experts of its pool. */
static MoeLayer moe_layer(Model *m, int l, size_t row, int N) {
    const Config *c = &m->cfg;
    Acts *a = &m->acts;
    int C = c->C, F = c->F, E = c->E, K = c->K;
    size_t e0 = layer_first_expert(c, l);
    Dispatch d = {a->order + row * K, a->slot + row * K, a->offset + (size_t)l * (E + 1)};
    return (MoeLayer){N, C, F, E, K, a->ln2 + row * C, a->score + row * E, a->chosen + row * K,
                      m->params.expert_fc1 + e0 * 2 * F * C, m->params.expert_fc2 + e0 * C * F, d};
}

/* The weight gradients of the pool whose first layer is l0, once the
   backward has been through all its L/G layers (pool_weight_grads). */
static void pool_backward(Model *m, int l0, int N) {
    const Config *c = &m->cfg;
    Acts *a = &m->acts;
    int C = c->C, F = c->F, E = c->E, K = c->K, LP = c->L / c->G;
    size_t block = (size_t)m->maxN, f0 = (size_t)l0 * block, e0 = layer_first_expert(c, l0);
    PoolRows pr = {a->h + f0 * K * 2 * F, a->eout + f0 * K * C, a->act_pool, a->ln2 + f0 * C,
                   a->order + f0 * K, a->offset + (size_t)l0 * (E + 1), LP, block};
    GradScratch sc = {a->rows, a->xrows};
    pool_weight_grads(m->grads.expert_fc1 + e0 * 2 * F * C, m->grads.expert_fc2 + e0 * C * F, &sc,
                      &pr, N, C, F, E, K);
}

static void check_tokens(const int *tok, int N, int V, const char *what) {
    for (int n = 0; n < N; n++)
        if (tok[n] < 0 || tok[n] >= V)
            fail("%s token %d at position %d is outside the vocabulary [0, %d); check the data", what, tok[n], n, V);
}

/* Forward over B sequences of T tokens. With targets (N), it computes the
   cross-entropy and aux losses (m->ce, m->aux: means over the N_all tokens
   of all ranks, of which this rank's N give its share; on one process the
   means) and the backward may follow;
   training = 1 marks a training micro-batch (it advances the stale pool
   statistic of aux 2). Without targets it computes the logits only.

   t0 > 0 continues one sequence (B = 1): the inputs sit at positions
   [t0, t0 + T), and rows [0, t0) of every layer's keys and values, left by
   earlier calls, are the KV cache. Every layer's activations are rows of a
   block of m->maxN tokens, so those rows stay where the next call finds them.
   The logits (T,Vp) of the new positions are rows 0..T-1 of m->acts.logits. */
static void model_forward(Model *m, const int *inputs, const int *targets, int B, int T, int t0,
                          int training) {
    const Config *c = &m->cfg;
    if (t0 + T > c->maxT) fail("sequence length %d exceeds the model's maxT %d; use a smaller -t", t0 + T, c->maxT);
    if (t0 > 0 && (B != 1 || targets || t0 + T > m->maxN)) fail("internal: KV-cache forward beyond its capacity");
    if (B * T > m->maxN) act_alloc(m, B * T);
    m->B = B;
    m->T = T;
    size_t N = (size_t)B * T, L = c->L, C = c->C, E = c->E, K = c->K, F = c->F, NH = c->NH,
           hd = HD(c);
    size_t Q = NH * hd, KV = (size_t)c->NKV * hd, Vp = c->Vp;
    size_t block = m->maxN;  // rows of each layer's block of activations
    float eps = c->norm_eps;
    Acts *a = &m->acts;
    ParamTensors *p = &m->params;
    STEP_PART(PART_HEAD);  // the embedding
    check_tokens(inputs, N, c->V, "input");
    memcpy(a->inputs + t0, inputs, N * sizeof(int));
    encoder_forward(a->resid + t0 * C, inputs, p->wte, N, C);
    for (size_t l = 0; l < L; l++) {
        size_t row = l * block + t0;  // this call's first row of layer l's block
        LayerTensors w = layer_tensors(p, c, l);  // the layer's weights
        const float *l_bias = c->router == ROUTER_SIGMOID ? m->expert_bias + l * E : NULL;  // (E)
        // its activations
        float *l_resid = a->resid + row * C;            // (N,C) the residual entering the layer
        float *l_ln1 = a->ln1 + row * C;                // (N,C)
        float *l_rstd1 = a->rstd1 + row;                // (N)
        float *l_q = a->q + row * Q;                    // (N,Q)
        float *l_k = a->k + l * block * KV;             // (t0+N,KV) from row 0: the KV cache
        float *l_v = a->v + l * block * KV;             // (t0+N,KV)
        float *l_atty = a->atty + row * Q;              // (N,Q)
        float *l_att_lse = a->att_lse + row * NH;       // (N,NH)
        float *l_resmid = a->resmid + row * C;          // (N,C)
        float *l_ln2 = a->ln2 + row * C;                // (N,C)
        float *l_rstd2 = a->rstd2 + row;                // (N)
        float *l_z = a->z + row * E;                    // (N,E)
        float *l_score = a->score + row * E;            // (N,E)
        int *l_chosen = a->chosen + row * K;            // (N,K)
        float *l_h = a->h + row * K * 2 * F;            // (N*K,2F)
        float *l_eout = a->eout + row * K * C;          // (N*K,C)
        float *l_resid_out = a->resid + (row + block) * C;  // (N,C) the residual leaving it
        // attention sublayer
        STEP_PART(PART_ATTENTION);
        rmsnorm_forward(l_ln1, l_rstd1, l_resid, w.attn_norm, N, C, eps);
        matmul_forward(l_q, l_ln1, w.wq, N, C, Q);
        matmul_forward(l_k + t0 * KV, l_ln1, w.wk, N, C, KV);
        matmul_forward(l_v + t0 * KV, l_ln1, w.wv, N, C, KV);
        rope_apply(l_q, m->rope_cos, m->rope_sin, N, T, t0, NH, hd, +1);
        rope_apply(l_k + t0 * KV, m->rope_cos, m->rope_sin, N, T, t0, c->NKV, hd, +1);
        Attention at = {B, T, t0, NH, c->NKV, hd, l_q, l_k, l_v};
        attention_forward(l_atty, l_att_lse, &at);
        matmul_forward(a->y, l_atty, w.wo, N, Q, C);
        residual_forward(l_resmid, l_resid, a->y, N * C);
        // expert sublayer: route into this layer's pool, run the chosen experts
        STEP_PART(PART_ROUTERS);
        rmsnorm_forward(l_ln2, l_rstd2, l_resmid, w.ffn_norm, N, C, eps);
        matmul_forward(l_z, l_ln2, w.router, N, C, E);
        router_forward(l_score, l_z, *w.router_scale, c, N);
        topk_forward(l_chosen, l_score, l_bias, N, E, K);
        if (c->router == ROUTER_SIGMOID && K > 1) router_gates(l_score, l_chosen, N, E, K);
        if (m->route_hook) m->route_hook(m->route_ctx, l, l_chosen, l_score, N);
        STEP_PART(PART_EXPERTS);
        MoeLayer ml = moe_layer(m, l, row, N);
        moe_dispatch(&ml.d, l_chosen, N * K, E);
        moe_forward(a->y, l_h, l_eout, a->xs, a->act, &ml);
        residual_forward(l_resid_out, l_resmid, a->y, N * C);
    }
    STEP_PART(PART_HEAD);
    rmsnorm_forward(a->lnf, a->rstdf, a->resid + (L * block + t0) * C, p->final_norm, N, C, eps);
    matmul_forward(a->logits, a->lnf, p->lm_head, N, C, Vp);
    if (!targets) return;
    check_tokens(targets, N, c->V, "target");
    memcpy(a->targets, targets, N * sizeof(int));
    m->N_all = N * world.size;
    m->ce = crossentropy_forward(a->losses, a->ce_lse, a->logits, targets, N, c->V, Vp) / m->N_all;
    STEP_PART(PART_ROUTERS);
    m->aux = aux_forward(m, N, training);
}

/* Accumulates the gradient of scale * (CE + aux) of the last forward into
   m->grads (scale = 1 / micro-batches per step). The logits become d logits. */
static void model_backward(Model *m, float scale) {
    const Config *c = &m->cfg;
    int B = m->B, T = m->T;
    size_t N = (size_t)B * T, L = c->L, C = c->C, E = c->E, K = c->K, F = c->F, NH = c->NH,
           hd = HD(c);
    size_t Q = NH * hd, KV = (size_t)c->NKV * hd, Vp = c->Vp;
    size_t block = m->maxN;  // rows of each layer's block, as in the forward
    size_t LP = L / c->G;    // layers per pool
    Acts *a = &m->acts;
    ParamTensors *p = &m->params;
    ParamTensors *g = &m->grads;
    STEP_PART(PART_HEAD);
    crossentropy_backward(a->logits, a->ce_lse, a->targets, scale / m->N_all, N, c->V, Vp);
    memset(a->dln, 0, N * C * sizeof(float));
    matmul_backward(a->dln, g->lm_head, a->logits, a->lnf, p->lm_head, N, C, Vp);
    memset(a->dresid, 0, N * C * sizeof(float));
    rmsnorm_backward(a->dresid, g->final_norm, a->dln, a->resid + L * block * C, p->final_norm,
                     a->rstdf, N, C);
    for (size_t l = L; l-- > 0;) {  // a->dresid holds d(residual leaving layer l)
        size_t row = l * block;
        LayerTensors w = layer_tensors(p, c, l);   // the layer's weights
        LayerTensors dw = layer_tensors(g, c, l);  // and their gradients
        // its saved activations
        const float *l_resid = a->resid + row * C;      // (N,C)
        const float *l_ln1 = a->ln1 + row * C;          // (N,C)
        const float *l_rstd1 = a->rstd1 + row;          // (N)
        const float *l_q = a->q + row * Q;              // (N,Q)
        const float *l_k = a->k + row * KV;             // (N,KV)
        const float *l_v = a->v + row * KV;             // (N,KV)
        const float *l_atty = a->atty + row * Q;        // (N,Q)
        const float *l_att_lse = a->att_lse + row * NH; // (N,NH)
        const float *l_resmid = a->resmid + row * C;    // (N,C)
        const float *l_ln2 = a->ln2 + row * C;          // (N,C)
        const float *l_rstd2 = a->rstd2 + row;          // (N)
        const float *l_z = a->z + row * E;              // (N,E)
        const float *l_score = a->score + row * E;      // (N,E)
        const int *l_chosen = a->chosen + row * K;      // (N,K)
        float *l_h = a->h + row * K * 2 * F;            // (N*K,2F) becomes d h
        float *l_eout = a->eout + row * K * C;          // (N*K,C) becomes d eout
        float *l_act = a->act_pool + (l % LP) * block * K * F;  // (N*K,F) its slot in act_pool
        // expert sublayer: d score = aux path + gate path, then router and norm
        STEP_PART(PART_ROUTERS);
        aux_backward(a->dscore, m->aux_coef + l * E, scale, m->N_all, N, E);
        STEP_PART(PART_EXPERTS);
        memset(a->dln, 0, N * C * sizeof(float));
        MoeLayer ml = moe_layer(m, l, row, N);
        moe_backward(a->dln, a->dscore, l_eout, l_h, l_act, a->dxs, a->dresid, &ml);
        // UniPool's step: at its first layer every layer sharing the pool is done; each of its
        // experts' weight gradients is one sum over its rows of all of them
        if (l % LP == 0) pool_backward(m, l, N);
        STEP_PART(PART_ROUTERS);
        router_backward(a->dz, dw.router_scale, a->dscore, l_z, l_score, l_chosen, *w.router_scale,
                        c, N);
        matmul_backward(a->dln, dw.router, a->dz, l_ln2, w.router, N, C, E);
        rmsnorm_backward(a->dresid, dw.ffn_norm, a->dln, l_resmid, w.ffn_norm, l_rstd2, N, C);
        // attention sublayer; a->dresid holds d(residual after attention)
        STEP_PART(PART_ATTENTION);
        memset(a->datty, 0, N * Q * sizeof(float));
        matmul_backward(a->datty, dw.wo, a->dresid, l_atty, w.wo, N, Q, C);
        memset(a->dq, 0, N * Q * sizeof(float));
        memset(a->dk, 0, N * KV * sizeof(float));
        memset(a->dv, 0, N * KV * sizeof(float));
        Attention at = {B, T, 0, NH, c->NKV, hd, l_q, l_k, l_v};
        attention_backward(a->dq, a->dk, a->dv, a->datty, l_atty, l_att_lse, &at);
        rope_apply(a->dq, m->rope_cos, m->rope_sin, N, T, 0, NH, hd, -1);
        rope_apply(a->dk, m->rope_cos, m->rope_sin, N, T, 0, c->NKV, hd, -1);
        memset(a->dln, 0, N * C * sizeof(float));
        matmul_backward(a->dln, dw.wq, a->dq, l_ln1, w.wq, N, C, Q);
        matmul_backward(a->dln, dw.wk, a->dk, l_ln1, w.wk, N, C, KV);
        matmul_backward(a->dln, dw.wv, a->dv, l_ln1, w.wv, N, C, KV);
        rmsnorm_backward(a->dresid, dw.attn_norm, a->dln, l_resid, w.attn_norm, l_rstd1, N, C);
    }
    STEP_PART(PART_HEAD);
    encoder_backward(g->wte, a->dresid, a->inputs, N, C);
}

// ----------------------------------------------------------------------------
// The optimizer: global-norm clipping and AdamW (PyTorch semantics)

typedef struct { float lr, b1, b2, eps, wd, clip; } OptConfig;

#define NORM_CHUNK 65536

/* The sum of squares of a long vector, in double, summed in fixed chunks and
   then in chunk order: the same bits for any thread count. Within a chunk, 8
   partial sums (element i into sum i mod 8) let the loop run in vector
   registers instead of waiting on one chain of additions. */
static double sum_squares(const float *x, size_t n) {
    size_t nc = (n + NORM_CHUNK - 1) / NORM_CHUNK;
    double *part = malloc_check(nc * sizeof(double)), sum = 0.0;
#pragma omp parallel for schedule(static)
    for (size_t ch = 0; ch < nc; ch++) {
        size_t i = ch * NORM_CHUNK, end = (ch + 1) * NORM_CHUNK < n ? (ch + 1) * NORM_CHUNK : n;
        double s[8] = {0};
        for (; i + 8 <= end; i += 8)
            for (int l = 0; l < 8; l++) s[l] += (double)x[i + l] * x[i + l];
        for (; i < end; i++) s[0] += (double)x[i] * x[i];
        part[ch] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
    for (size_t ch = 0; ch < nc; ch++) sum += part[ch];
    free(part);
    return sum;
}

/*   g = gscale grad                     (the clipping factor, folded into this pass)
     m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2
     p -= lr wd p                        (tensors the table marks for decay)
     p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
   over the parameters [opt_lo, opt_hi) of the flat buffer, the ones whose m
   and v this rank keeps (all of them on one process). */
static void adamw_update(Model *m, const OptConfig *o, float lr, float gscale) {
    size_t lo = m->opt_lo, hi = m->opt_hi;
    if (!m->m_memory) {
        m->m_memory = calloc_big((hi - lo) * sizeof(float));
        m->v_memory = calloc_big((hi - lo) * sizeof(float));
    }
    m->adam_t++;
    float bc1 = 1.0f - (float)pow(o->b1, m->adam_t), bc2 = 1.0f - (float)pow(o->b2, m->adam_t);
    // tensor i is [off, off + n) of the flat buffer; its part in the range is [a, b)
    size_t off = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        size_t n = shape_numel(m->shapes[i]), a = off > lo ? off : lo,
               b = off + n < hi ? off + n : hi;
        off += n;
        if (a >= b) continue;
        float decay = param_decay[i] ? 1.0f - lr * o->wd : 1.0f;
        float *restrict p = m->params_memory + a, *restrict mm = m->m_memory + (a - lo),
                        *restrict vv = m->v_memory + (a - lo);
        const float *restrict g = m->grads_memory + a;
        const float b1 = o->b1, b2 = o->b2, eps = o->eps;
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < b - a; j++) {
            float gj = g[j] * gscale;
            mm[j] = b1 * mm[j] + (1.0f - b1) * gj;
            vv[j] = b2 * vv[j] + (1.0f - b2) * gj * gj;
            p[j] = p[j] * decay - lr * (mm[j] / bc1) / (sqrtf(vv[j] / bc2) + eps);
        }
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
   global gradient norm. In a data-parallel run of R ranks each runs its B/R
   rows of every micro-batch (world_rows), and the gradient, summed over the
   ranks, is whole only in the rank's own range [opt_lo, opt_hi). */
static StepStats step_gradients(Model *m, const int *tokens, int n_micro, int B, int T) {
    StepStats st = {0};
    int Br = B / world.size, *io = malloc_check(2 * (size_t)Br * T * sizeof(int));
    memset(m->grads_memory, 0, m->num_params * sizeof(float));
    for (int mb = 0; mb < n_micro; mb++) {
        const int *rows = world_rows(tokens + (size_t)mb * B * (T + 1), B, T);
        split_rows(io, io + (size_t)Br * T, rows, Br, T);
        model_forward(m, io, io + (size_t)Br * T, Br, T, 0, 1);
        model_backward(m, 1.0f / n_micro);
        st.ce += m->ce / n_micro;
        st.aux += m->aux / n_micro;
    }
    free(io);
    // the optimizer's share: the gradients' sum over the ranks and their norm, then the update
    STEP_PART(PART_ADAMW);
    world_reduce_scatter(m->grads_memory, m->num_params);
    double sums[3] = {st.ce, st.aux,
                      sum_squares(m->grads_memory + m->opt_lo, m->opt_hi - m->opt_lo)};
    world_sum_f64(sums, 3);
    return (StepStats){sums[0], sums[1], sqrt(sums[2])};
}

/* The update half: if clip > 0 and clip / (norm + 1e-6) < 1, scale the
   gradient by it; then AdamW on this rank's range, whose result every rank
   receives; then, for the sigmoid router, the expert bias (from the counts
   of all ranks, so every rank steps it alike). */
static void step_update(Model *m, const OptConfig *o, float lr, double grad_norm) {
    float s = o->clip > 0.0f ? (float)(o->clip / (grad_norm + 1e-6)) : 1.0f;
    adamw_update(m, o, lr, s < 1.0f ? s : 1.0f);
    world_allgather(m->params_memory, m->num_params);
    if (m->cfg.router == ROUTER_SIGMOID) expert_bias_update(m);
}

// ----------------------------------------------------------------------------
// Errors and checked I/O: the definitions of the helpers declared at the top.

// The end of a line of cap bytes after n of it and a print that reports w: a
// print that failed adds nothing, one that was cut ends at the last byte.
static size_t line_end(size_t n, int w, size_t cap) {
    return w < 0 ? n : n + (size_t)w < cap ? n + (size_t)w : cap - 1;
}

// Prints "error: " fmt tail as one line and exits with code.
__attribute__((noreturn))
static void die(int code, const char *tail, const char *fmt, va_list ap) {
    // the line goes out in one write: beside other ranks and mpirun's own messages it stays whole
    char line[4096];
    size_t n, cap = sizeof line - 1;  // room kept for the newline
    n = line_end(0, world.size > 1 ? snprintf(line, cap, "error (rank %d of %d): ", world.rank,
                                              world.size)
                                   : snprintf(line, cap, "error: "),
                 cap);
    n = line_end(n, vsnprintf(line + n, cap - n, fmt, ap), cap);
    n = line_end(n, snprintf(line + n, cap - n, "%s", tail), cap);
    line[n++] = '\n';
    fflush(stderr);
    if (write(STDERR_FILENO, line, n) < 0) fputs(line, stderr);
#ifdef UNIPOOL_FUZZ
    longjmp(fuzz_escape, 1);
#endif
    world_abort(code);  // the other ranks too: a rank that stops alone leaves them waiting forever
    exit(code);
}

__attribute__((format(printf, 1, 2), noreturn))
static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    die(EXIT_FAILURE, "", fmt, ap);
}

__attribute__((format(printf, 1, 2), noreturn))
static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    die(EXIT_USAGE, "; run with -h for help", fmt, ap);
}

static FILE *fopen_check_(const char *path, const char *mode, const char *src, int line) {
    FILE *f = fopen(path, mode);
    if (!f) fail("cannot open '%s' (%s): %s; check the path and permissions [%s:%d]",
                 path, mode[0] == 'r' ? "read" : "write", strerror(errno), src, line);
    return f;
}

// Reads exactly n items or fails naming the file: short files are the usual
// sign of a truncated download or an interrupted write.
static void fread_check_(void *dst, size_t size, size_t n, FILE *f, const char *path,
                         const char *src, int line) {
    size_t got = fread(dst, size, n, f);
    if (got != n) fail("'%s' is truncated or unreadable (wanted %zu items of %zu bytes, got %zu); "
                       "re-create the file [%s:%d]", path, n, size, got, src, line);
}

static void *malloc_check_(size_t size, const char *src, int line) {
    void *p = malloc(size ? size : 1);
    if (!p) fail("out of memory allocating %.1f MiB; use a smaller model or batch [%s:%d]",
                 size / 1048576.0, src, line);
    return p;
}

static void *calloc_check_(size_t n, size_t size, const char *src, int line) {
    void *p = calloc(n ? n : 1, size);
    if (!p) fail("out of memory allocating %.1f MiB; use a smaller model or batch [%s:%d]",
                 (double)n * size / 1048576.0, src, line);
    return p;
}

// Whether all n items were written (errno says why not).
static int write_all(FILE *f, const void *p, size_t size, size_t n) {
    return fwrite(p, size, n, f) == n;
}

// ----------------------------------------------------------------------------
// Data parallelism (make MPI=1): R processes, "ranks", each with the whole
// model, train on one global batch. Every rank reads the same rows, and of
// each micro-batch of B rows rank r runs rows [r B/R, (r+1) B/R). Everything
// the math makes global stays global, so that the run is the one-process run
// of the same flags:
//   - each forward's expert counts (L,E) are summed over the ranks before the
//     aux losses use them (aux_forward), and N in every mean is B T R: the
//     aux losses, the stale pool statistic and the sigmoid router's loads are
//     the whole micro-batch's;
//   - the losses are summed over the ranks, in rank order (world_sum_f64);
//   - the gradient: rank q owns parameters [lo_q, hi_q) of the flat buffer,
//     about P/R of them (world_shard). It receives every rank's gradient of
//     that range and sums them in rank order (world_reduce_scatter); the norm
//     for clipping is the sum of the ranks' sums of squares; it updates its
//     range with AdamW, keeping m and v for that range alone (ZeRO stage 1:
//     the optimizer state per rank is 1/R), and every rank receives every
//     range (world_allgather);
//   - validation sums its losses and router counts over the ranks; rank 0
//     prints, samples, logs and writes checkpoints (the same file as one
//     process writes: each rank's m and v go to rank 0 in rank order).
// Every sum runs in an order fixed by R, never by the MPI library's choice
// of algorithm, so the same seed, R and thread count give the same bits. On
// another R the gradient's sums over tokens group differently (inside the
// kernels, then across ranks), so runs agree to float32 rounding.
// Without MPI, R = 1: a rank's rows and range are all of them, and the
// functions below that communicate do nothing.

static void world_shard(size_t P, int q, size_t *lo, size_t *hi) {
    *lo = P * (size_t)q / (size_t)world.size;
    *hi = P * (size_t)(q + 1) / (size_t)world.size;
}

// rows (B,T+1): a micro-batch; returns this rank's B/R of them.
static const int *world_rows(const int *rows, int B, int T) {
    return rows + (size_t)world.rank * (B / world.size) * (T + 1);
}

#ifdef UNIPOOL_MPI
#define WORLD_CHUNK ((size_t)1 << 22)  // floats per message (16 MiB): MPI's int counts stay small

static void world_init(int *argc, char ***argv) {
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world.size);
    if (world.rank > 0 && !freopen("/dev/null", "w", stdout)) fail("cannot send rank %d's output to /dev/null", world.rank);
}

static void world_finish(void) { MPI_Finalize(); }

static void world_abort(int code) {
    if (world.size > 1) MPI_Abort(MPI_COMM_WORLD, code);
}

static void world_sum_i64(int64_t *x, size_t n) {  // integers: exact in any order
    if (world.size > 1)
        MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
}

static void world_sum_f64(double *x, int n) {
    if (world.size == 1) return;
    double *all = malloc_check((size_t)world.size * n * sizeof(double));  // (R,n)
    MPI_Allgather(x, n, MPI_DOUBLE, all, n, MPI_DOUBLE, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) {
        x[i] = all[i];
        for (int q = 1; q < world.size; q++) x[i] += all[(size_t)q * n + i];
    }
    free(all);
}

// How many of the floats [c, c + WORLD_CHUNK) lie in a range of n floats.
static size_t chunk_len(size_t n, size_t c) {
    return c < n ? (n - c < WORLD_CHUNK ? n - c : WORLD_CHUNK) : 0;
}

/* g (P) is this rank's gradient. Afterwards its own range holds the sum of
   all ranks' g there, added in rank order; the rest is left as it was. Chunk
   by chunk, every rank sends each other rank that rank's range and receives
   its own range from all of them. */
static void world_reduce_scatter(float *g, size_t P) {
    if (world.size == 1) return;
    int R = world.size, me = world.rank, nreq;
    size_t lo, hi, qlo, qhi, longest = 0;
    for (int q = 0; q < R; q++)
        world_shard(P, q, &qlo, &qhi), longest = qhi - qlo > longest ? qhi - qlo : longest;
    world_shard(P, me, &lo, &hi);
    // (R,WORLD_CHUNK): rank q's part of the chunk
    float *in = malloc_check((size_t)R * WORLD_CHUNK * sizeof(float));
    MPI_Request *req = malloc_check(2 * (size_t)R * sizeof(MPI_Request));
    for (size_t c = 0; c < longest; c += WORLD_CHUNK) {
        size_t n = chunk_len(hi - lo, c);
        nreq = 0;
        for (int q = 0; q < R; q++) {
            if (q == me) continue;
            world_shard(P, q, &qlo, &qhi);
            size_t nq = chunk_len(qhi - qlo, c);
            if (n)
                MPI_Irecv(in + (size_t)q * WORLD_CHUNK, (int)n, MPI_FLOAT, q, 0, MPI_COMM_WORLD,
                          &req[nreq++]);
            if (nq) MPI_Isend(g + qlo + c, (int)nq, MPI_FLOAT, q, 0, MPI_COMM_WORLD, &req[nreq++]);
        }
        MPI_Waitall(nreq, req, MPI_STATUSES_IGNORE);
        float *mine = g + lo + c;
        memcpy(in + (size_t)me * WORLD_CHUNK, mine, n * sizeof(float));
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            float sum = in[i];
            for (int q = 1; q < R; q++) sum += in[(size_t)q * WORLD_CHUNK + i];
            mine[i] = sum;
        }
    }
    free(in);
    free(req);
}

static void world_allgather(float *p, size_t P) {
    for (int q = 0; q < world.size && world.size > 1; q++) {
        size_t lo, hi;
        world_shard(P, q, &lo, &hi);
        for (size_t c = 0; c < hi - lo; c += WORLD_CHUNK)
            MPI_Bcast(p + lo + c, (int)chunk_len(hi - lo, c), MPI_FLOAT, q, MPI_COMM_WORLD);
    }
}

/* Writes a vector of P floats spread over the ranks like the AdamW state
   (this rank's range in x, NULL for zeros) to rank 0's file f, in rank
   order; every rank calls it. Returns ok and whether rank 0's writes
   succeeded. */
static int world_write_ranges(FILE *f, const float *x, size_t P, int ok) {
    float *buf = calloc_check(WORLD_CHUNK, sizeof(float));
    for (int q = 0; q < world.size; q++) {
        size_t qlo, qhi;
        world_shard(P, q, &qlo, &qhi);
        for (size_t c = 0; c < qhi - qlo; c += WORLD_CHUNK) {
            size_t n = chunk_len(qhi - qlo, c);
            const float *part = x ? x + c : buf;
            if (q != 0 && world.rank == q) MPI_Send(part, (int)n, MPI_FLOAT, 0, 1, MPI_COMM_WORLD);
            if (q != 0 && world.rank == 0)
                MPI_Recv(buf, (int)n, MPI_FLOAT, q, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (world.rank == 0) ok = ok && write_all(f, q == 0 ? part : buf, sizeof(float), n);
        }
    }
    free(buf);
    return ok;
}
#else
static void world_init(int *argc, char ***argv) { (void)argc, (void)argv; }
static void world_finish(void) {}
static void world_abort(int code) { (void)code; }
static void world_sum_i64(int64_t *x, size_t n) { (void)x, (void)n; }
static void world_sum_f64(double *x, int n) { (void)x, (void)n; }
static void world_reduce_scatter(float *g, size_t P) { (void)g, (void)P; }
static void world_allgather(float *p, size_t P) { (void)p, (void)P; }
static int world_write_ranges(FILE *f, const float *x, size_t P, int ok) {
    float *zeros = x ? NULL : calloc_check(P, sizeof(float));
    ok = ok && write_all(f, x ? x : zeros, sizeof(float), P);
    free(zeros);
    return ok;
}
#endif

// ----------------------------------------------------------------------------
// Data: llm.c token shards. A shard is an int32[256] header (SHARD_MAGIC,
// version, token count) and then the tokens, uint16 (version 1) or uint32
// (version 7). A row is T+1 consecutive tokens (inputs and their targets);
// shard s has rows [r T, r T + T + 1) for r < (count - 1) / T.
//
// Training visits shards in a seeded random order each epoch and the rows of
// each shard in a seeded random order; evaluation reads rows in file order.
// The position (epoch, shard, row) is three integers, so a checkpoint can
// put the loader back exactly where it was.

typedef struct {
    glob_t files;
    size_t *count;        // (n) tokens in each shard
    int *version;         // (n)
    int n, T, V, shuffle;
    uint64_t seed;
    int64_t epoch, shard, row;  // position: the next row is row_order[row] of shard_order[shard]
    int *shard_order;     // (n) this epoch's shard order
    int64_t *row_order;   // (rows) the current shard's row order
    int64_t rows;         // rows in the current shard
    int loaded;           // shard index held in tokens, or -1
    int *tokens;          // (count) the current shard
} DataLoader;

static uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
    Rng r = {a * 0x9e3779b97f4a7c15ULL ^ b * 0xc2b2ae3d27d4eb4fULL ^ c};
    return rng_u64(&r);
}

static void shuffle_ints(int64_t *x, int64_t n, uint64_t seed) {  // Fisher-Yates
    Rng r = {seed};
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_u64(&r) % (uint64_t)(i + 1)), t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

// Reads up to n bytes from the start of a file and its size,
// and closes it: the checks that follow need no open file.
static size_t read_head(const char *path, void *buf, size_t n, long *file_size) {
    FILE *f = fopen_check(path, "rb");
    size_t got = fread(buf, 1, n, f);
    fseek(f, 0, SEEK_END);
    *file_size = ftell(f);
    fclose(f);
    return got;
}

/* Reads and checks a shard's header and size; returns its token count, and its
   version and vocabulary size through the pointers. what names the flag it came from. */
static size_t shard_header(const char *path, int *version, int *vocab, const char *what) {
    int32_t h[256];
    long size;
    if (read_head(path, h, sizeof h, &size) != sizeof h)
        fail("%s shard '%s' is shorter than its 1024-byte header; re-create it with prepro_pile.py", what, path);
    if (h[0] != SHARD_MAGIC)
        fail("%s '%s' is not a token shard (magic %d, want %d); pass shards written by prepro_pile.py", what,
             path, h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION_U16 && h[1] != SHARD_VERSION_U32)
        fail("%s shard '%s' has version %d; this program reads versions %d (uint16) and %d (uint32)", what, path,
             h[1], SHARD_VERSION_U16, SHARD_VERSION_U32);
    if (h[2] < 0) fail("%s shard '%s' has a negative token count; re-create it", what, path);
    size_t count = (size_t)h[2], width = h[1] == SHARD_VERSION_U16 ? 2 : 4;
    if (size < 0 || (size_t)size != 1024 + count * width)
        fail("%s shard '%s' is %ld bytes, its header says %zu (%zu tokens); it is truncated or damaged, re-create it",
             what, path, size, 1024 + count * width, count);
    if (h[3] < 0 || h[3] > (1 << 24))
        fail("%s shard '%s' names a vocabulary of %d tokens, outside [0, 2^24]; it is damaged, re-create it", what,
             path, h[3]);
    *version = h[1], *vocab = h[3] ? h[3] : GPT2_VOCAB;
    return count;
}

/* Opens the shards that match pattern. They must share one vocabulary, which
   becomes d->V: every token is checked against it as its shard loads. */
static void loader_init(DataLoader *d, const char *pattern, int T, int shuffle, uint64_t seed,
                        const char *what) {
    memset(d, 0, sizeof *d);
    if (glob(pattern, 0, NULL, &d->files) != 0 || d->files.gl_pathc == 0)
        fail("%s: no files match '%s'; run 'make data' or pass shards written by prepro_pile.py", what, pattern);
    d->n = (int)d->files.gl_pathc;
    d->T = T, d->shuffle = shuffle, d->seed = seed, d->loaded = -1;
    d->count = malloc_check(d->n * sizeof(size_t));
    d->version = malloc_check(d->n * sizeof(int));
    d->shard_order = malloc_check(d->n * sizeof(int));
    for (int i = 0; i < d->n; i++) {
        int vocab;
        d->count[i] = shard_header(d->files.gl_pathv[i], &d->version[i], &vocab, what);
        if (i == 0) d->V = vocab;
        else if (vocab != d->V)
            fail("%s shards '%s' and '%s' have vocabularies of %d and %d tokens; pass shards made with one "
                 "prepro_pile.py --vocab", what, d->files.gl_pathv[0], d->files.gl_pathv[i], d->V, vocab);
        if (d->count[i] < (size_t)T + 1)
            fail("%s shard '%s' holds %zu tokens, fewer than one row of T+1 = %d; use a smaller -t", what,
                 d->files.gl_pathv[i], d->count[i], T + 1);
    }
}

static void loader_free(DataLoader *d) {
    globfree(&d->files);
    free(d->count);
    free(d->version);
    free(d->shard_order);
    free(d->row_order);
    free(d->tokens);
}

static void loader_load_shard(DataLoader *d, int s) {
    if (d->loaded == s) return;
    const char *path = d->files.gl_pathv[s];
    size_t n = d->count[s], width = d->version[s] == SHARD_VERSION_U16 ? 2 : 4;
    FILE *f = fopen_check(path, "rb");
    fseek(f, 1024, SEEK_SET);
    free(d->tokens);
    d->tokens = malloc_check(n * sizeof(int));
    void *raw = malloc_check(n * width);
    fread_check(raw, width, n, f, path);
    fclose(f);
    for (size_t i = 0; i < n; i++) {
        uint32_t t = width == 2 ? ((uint16_t *)raw)[i] : ((uint32_t *)raw)[i];
        if (t >= (uint32_t)d->V)
            fail("shard '%s': token %u at index %zu is >= the vocabulary size %d of its shards; it is damaged, "
                 "re-create it", path, t, i, d->V);
        d->tokens[i] = (int)t;
    }
    free(raw);
    d->loaded = s;
}

static int64_t shard_rows(const DataLoader *d, int s) {
    return (int64_t)((d->count[s] - 1) / d->T);
}

// The epoch's shard order: order[i] is the shard visited i-th.
static void loader_shard_order(const DataLoader *d, int64_t epoch, int *order) {
    int64_t o[d->n];
    for (int i = 0; i < d->n; i++) o[i] = i;
    if (d->shuffle) shuffle_ints(o, d->n, mix_seed(d->seed, (uint64_t)epoch, 0xda7a));
    for (int i = 0; i < d->n; i++) order[i] = (int)o[i];
}

/* Whether (epoch, shard, row) is a position in these shards, as a checkpoint
   stores it: shard an index of the epoch's order, row at most the rows of the
   shard there (all of them read: the next read moves on). Returns NULL if so,
   else what is out of range, in buf. */
static const char *loader_position_error(const DataLoader *d, uint64_t epoch, uint64_t shard,
                                         uint64_t row, char *buf, size_t n) {
    if (epoch > INT32_MAX) {
        snprintf(buf, n, "epoch %llu, beyond 2^31", (unsigned long long)epoch);
        return buf;
    }
    if (shard >= (uint64_t)d->n) {
        snprintf(buf, n, "shard %llu of %d", (unsigned long long)shard, d->n);
        return buf;
    }
    int order[d->n];
    loader_shard_order(d, (int64_t)epoch, order);
    int64_t rows = shard_rows(d, order[shard]);
    if (row > (uint64_t)rows) {
        snprintf(buf, n, "row %llu of shard %llu, which has %lld rows", (unsigned long long)row, (unsigned long long)shard,
                 (long long)rows);
        return buf;
    }
    return NULL;
}

/* A fingerprint of the shards: their number and each one's token count and
   width, in glob order. A checkpoint stores the train shards' so that -r can
   tell the shards its loader position refers to from other data. Never 0,
   which stands for unknown (checkpoints of version 1). */
static uint64_t loader_fingerprint(const DataLoader *d) {
    uint64_t h = mix_seed((uint64_t)d->n, 0xf1, 0);
    for (int i = 0; i < d->n; i++) h = mix_seed(h, d->count[i], (uint64_t)d->version[i]);
    return h ? h : 1;
}

// Puts the loader at (epoch, shard, row): derives the orders from the seed, loads the shard.
static void loader_seek(DataLoader *d, int64_t epoch, int64_t shard, int64_t row) {
    d->epoch = epoch, d->shard = shard, d->row = row;
    loader_shard_order(d, epoch, d->shard_order);
    int s = d->shard_order[shard];
    loader_load_shard(d, s);
    d->rows = shard_rows(d, s);
    free(d->row_order);
    d->row_order = malloc_check(d->rows * sizeof(int64_t));
    for (int64_t r = 0; r < d->rows; r++) d->row_order[r] = r;
    if (d->shuffle)
        shuffle_ints(d->row_order, d->rows, mix_seed(d->seed, (uint64_t)epoch, (uint64_t)s + 1));
}

// The next B rows of T+1 tokens: out (B,T+1).
static void loader_next(DataLoader *d, int *out, int B) {
    if (d->loaded < 0) loader_seek(d, d->epoch, d->shard, d->row);
    for (int b = 0; b < B; b++) {
        if (d->row == d->rows) {  // shard done: next shard, or next epoch
            int64_t shard = d->shard + 1, epoch = d->epoch;
            if (shard == d->n) shard = 0, epoch++;
            loader_seek(d, epoch, shard, 0);
        }
        memcpy(out + (size_t)b * (d->T + 1), d->tokens + d->row_order[d->row] * d->T,
               (d->T + 1) * sizeof(int));
        d->row++;
    }
}

// ----------------------------------------------------------------------------
// Tokenizer decoding table (llm.c format): uint32[256] header (TOKENIZER_MAGIC,
// version 2, vocabulary size, end-of-text id), then per token a uint8 length
// and that many bytes. Used to print samples; prepro_pile.py writes it.

typedef struct {
    int n, eot;
    char **piece;  // (n) NUL-terminated byte strings
} Tokenizer;

static int tokenizer_load(Tokenizer *t, const char *path) {  // 0 on success, -1 if absent
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    uint32_t h[256];
    fread_check(h, sizeof(uint32_t), 256, f, path);
    if (h[0] != TOKENIZER_MAGIC || h[1] != TOKENIZER_VERSION || h[2] == 0 || h[2] > (1u << 24) ||
        h[3] >= h[2])
        fail("'%s' is not a version %d tokenizer table (magic %u, version %u); re-create it with prepro_pile.py",
             path, TOKENIZER_VERSION, h[0], h[1]);
    t->n = (int)h[2], t->eot = (int)h[3];
    t->piece = malloc_check(t->n * sizeof(char *));
    for (int i = 0; i < t->n; i++) {
        unsigned char len;
        fread_check(&len, 1, 1, f, path);
        t->piece[i] = malloc_check(len + 1u);
        fread_check(t->piece[i], 1, len, f, path);
        t->piece[i][len] = '\0';
    }
    fclose(f);
    return 0;
}

/* Shards, tokenizer tables and checkpoints each name their vocabulary size,
   and ids mean something only within one vocabulary: wherever two of them
   meet, the sizes must agree. a and b describe the two (flag and path). */
static void vocab_agree(const char *a, int va, const char *b, int vb) {
    if (va != vb)
        fail("%s has a vocabulary of %d tokens, %s one of %d; pass data, tokenizer table and checkpoint made with "
             "the same prepro_pile.py --vocab", a, va, b, vb);
}

// The padded vocabulary of the embedding and the head: V
// rounded up to whole blocks of 1024 rows (GPT-2: 51200).
static int padded_vocab(int V) { return (V + 1023) / 1024 * 1024; }

static void tokenizer_free(Tokenizer *t) {
    for (int i = 0; i < t->n; i++) free(t->piece[i]);
    free(t->piece);
}

// Prints a token's bytes as it comes (ctx: the Tokenizer),
// leaving out control bytes other than newline and tab.
static void tokenizer_print(int id, void *ctx) {
    const Tokenizer *t = ctx;
    if (!t->piece || id < 0 || id >= t->n) {
        printf("<%d>", id);
    } else {
        for (const unsigned char *p = (const unsigned char *)t->piece[id]; *p; p++)
            if (*p >= 32 || *p == '\n' || *p == '\t') putchar(*p);
    }
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// Training configuration: what the flags set. Checkpoints store it, so that
// -r continues a run as it was started.

typedef struct {
    int B, T, n_micro, steps, warmup, val_every, val_batches;
    int sample_every, gen_tokens, ckpt_every, keep;
    uint64_t seed;
    float lr_floor;  // the cosine schedule ends at lr * lr_floor
    float init_std;  // initialisation (model_init); a new run's only, not stored in checkpoints
    OptConfig opt;
} TrainConfig;

#define CKPT_NEVER (-1)               // ckpt_every of -K never: no checkpoint at all
#define MAX_BATCH_TOKENS (1 << 24)    // B * T: token indices and activation sizes stay in an int

/* Returns NULL if the training configuration is one the flags can set, else
   what is wrong with it. Checkpoint headers are held to it too: a damaged
   one then stops at load, naming the field, rather than in the run (a B of
   2^24 as an allocation of terabytes, a negative lr as a NaN steps later). */
static const char *train_config_error(const TrainConfig *tc) {
    if (tc->B < 1 || tc->B > (1 << 20) || tc->T < 1 || tc->T > (1 << 20) || tc->n_micro < 1 ||
        tc->n_micro > (1 << 20))
        return "B, T and the micro-batches per step must be in [1, 2^20]";
    if ((int64_t)tc->B * tc->T > MAX_BATCH_TOKENS) return "B * T must be at most 2^24 tokens";
    if (tc->steps < 1 || tc->warmup < 0 || tc->val_every < 0 || tc->val_batches < 1 ||
        tc->sample_every < 0 || tc->gen_tokens < 1 || tc->gen_tokens > (1 << 20) ||
        tc->ckpt_every < CKPT_NEVER || tc->keep < 1 || tc->keep > (1 << 20))
        return "need steps, val batches, sample tokens (<= 2^20) and checkpoints kept (<= 2^20) >= 1, the intervals "
               "and warmup >= 0";
    if (tc->seed > INT32_MAX) return "the seed must be in [0, 2^31 - 1]";
    const OptConfig *o = &tc->opt;
    if (!(o->lr >= 0.0f && o->lr <= 10.0f) || !(o->b1 >= 0.0f && o->b1 <= 0.999999f) ||
        !(o->b2 >= 0.0f && o->b2 <= 0.999999f) || !(o->eps >= 1e-30f && o->eps <= 1.0f) ||
        !(o->wd >= 0.0f && o->wd <= 10.0f) || !(o->clip >= 0.0f && o->clip <= 1e9f) ||
        !(tc->lr_floor >= 0.0f && tc->lr_floor <= 1.0f))
        return "the optimizer settings must be in the flags' ranges (lr [0, 10], betas [0, 0.999999], eps [1e-30, 1], "
               "wd [0, 10], clip [0, 1e9], lr floor [0, 1])";
    return NULL;
}

// Linear warmup over `warmup` steps, then cosine decay to lr * lr_floor at the last step.
static float lr_at(const TrainConfig *tc, int step) {
    float lr = tc->opt.lr, lo = lr * tc->lr_floor;
    if (step < tc->warmup) return lr * (step + 1) / tc->warmup;
    if (tc->steps <= tc->warmup + 1) return lr;
    double frac = (double)(step - tc->warmup) / (tc->steps - 1 - tc->warmup);
    return lo + (float)(0.5 * (1.0 + cos(PI * frac))) * (lr - lo);
}

// ----------------------------------------------------------------------------
// Checkpoints. Little-endian, in this order:
//   int32[256]  header: [0] CKPT_MAGIC, [1] CKPT_VERSION (CKPT_VERSION_1 is
//               read too), [2] 1 if the training state follows the
//               parameters, else 0, [3..15] V Vp maxT L C NH NKV F G E K router
//               aux, [16..26] B T n_micro steps warmup val_every val_batches
//               sample_every gen_tokens ckpt_every keep, [27] steps done,
//               [28] AdamW steps, [29] stale statistic valid (0 or 1)
//   float[64]   [0..4] alpha norm_eps rope_theta router_c router_eps,
//               [5..11] lr b1 b2 eps wd clip lr_floor, [12] bias_rate
//   uint64[32]  [0] seed, [1..3] loader epoch, shard, row, [4] sampler state,
//               [5] fingerprint of the train shards (loader_fingerprint; 0 in
//               version 1: unknown)
//   char[3][1024] version 2 only: the -i, -j and -z paths the run trained
//               with, absolute, each NUL-terminated and zero-padded
//   float[P]    parameters, in the order of PARAM_TABLE
//   float[L*E]  the expert bias, sigmoid router only (it decides routing)
// and, with the training state: float[P] AdamW m, float[P] AdamW v,
// float[L*E] the stale pool statistic (f of the last training micro-batch).
// Words the header does not use are 0, and so are [27..29] and uint64
// [1..5] without the training state. The reader holds every field to its
// meaning (checkpoint_header) and a resumed run holds the loader position to
// the shards (run_setup): a damaged file is refused with a message, never
// trained on.
// Version 2 adds the paths as a block of its own, so that the parameters of
// a version 1 file stay where they are and it still loads: -r then takes the
// paths from the flags and their defaults. Stored absolute, they name the
// same files from any folder -r runs in.
// Saved to NAME.tmp, flushed, fsynced and renamed over NAME: an interrupted
// save leaves the previous checkpoint whole, and the next run removes the
// temporary (remove_stale_temporaries).

#define CKPT_HEADER_BYTES (256 * 4 + 64 * 4 + 32 * 8)  // the three blocks of every version
#define CKPT_PATHS 3                                   // -i, -j, -z
#define CKPT_PATH_BYTES 1024                           // one path's field in the block of version 2
enum { PATH_TRAIN, PATH_VAL, PATH_TOKENIZER };  // the order of the paths

typedef struct {
    int step;              // steps done
    DataLoader *loader;    // train loader whose position is saved (NULL: none)
    uint64_t sampler;      // state of the sampling RNG
    char paths[CKPT_PATHS][CKPT_PATH_BYTES];  // the data paths, absolute
} TrainState;

static void header_put_config(int32_t *h, float *hp, const Config *c) {
    int32_t v[] = {c->V, c->Vp, c->maxT, c->L, c->C,      c->NH, c->NKV,
                   c->F, c->G,  c->E,    c->K, c->router, c->aux};
    memcpy(h + 3, v, sizeof v);
    float f[] = {c->alpha, c->norm_eps, c->rope_theta, c->router_c, c->router_eps};
    memcpy(hp, f, sizeof f);
    hp[12] = c->bias_rate;
}

static Config header_get_config(const int32_t *h, const float *hp) {
    return (Config){.V = h[3], .Vp = h[4], .maxT = h[5], .L = h[6], .C = h[7], .NH = h[8],
                    .NKV = h[9], .F = h[10], .G = h[11], .E = h[12], .K = h[13], .router = h[14],
                    .aux = h[15], .alpha = hp[0], .norm_eps = hp[1], .rope_theta = hp[2],
                    .router_c = hp[3], .router_eps = hp[4], .bias_rate = hp[12]};
}

/* Completes a file written to tmp: flushes, fsyncs, closes and renames it over
   path, so that path is the old file or the whole new one whenever the
   process stops. ok says whether the writes so far succeeded (errno says why
   not). Returns 0, or the errno of the failure, tmp removed. */
static int commit_temporary(FILE *f, int ok, const char *tmp, const char *path) {
    int err = ok ? 0 : errno;
    if (ok && (fflush(f) != 0 || fsync(fileno(f)) != 0)) ok = 0, err = errno;
    if (fclose(f) != 0 && ok) ok = 0, err = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, err = errno;
    if (!ok) remove(tmp);
    return ok ? 0 : err ? err : EIO;
}

static void checkpoint_save(const char *path, const Model *m, const TrainConfig *tc,
                            const TrainState *st) {
    int32_t h[256] = {CKPT_MAGIC, CKPT_VERSION, st != NULL};
    float hp[64] = {0};
    uint64_t h64[32] = {0};
    char paths[CKPT_PATHS][CKPT_PATH_BYTES];
    header_put_config(h, hp, &m->cfg);
    int32_t t[] = {tc->B, tc->T, tc->n_micro, tc->steps, tc->warmup, tc->val_every, tc->val_batches,
                   tc->sample_every, tc->gen_tokens, tc->ckpt_every, tc->keep};
    memcpy(h + 16, t, sizeof t);
    float o[] = {tc->opt.lr, tc->opt.b1,   tc->opt.b2,  tc->opt.eps,
                 tc->opt.wd, tc->opt.clip, tc->lr_floor};
    memcpy(hp + 5, o, sizeof o);
    h64[0] = tc->seed;
    memset(paths, 0, sizeof paths);
    if (st) {
        h[27] = st->step, h[28] = m->adam_t, h[29] = m->aux_prev_valid;
        if (st->loader) {
            h64[1] = (uint64_t)st->loader->epoch, h64[2] = (uint64_t)st->loader->shard,
            h64[3] = (uint64_t)st->loader->row;
            h64[5] = loader_fingerprint(st->loader);
        }
        h64[4] = st->sampler;
        for (int i = 0; i < CKPT_PATHS; i++) strncpy(paths[i], st->paths[i], CKPT_PATH_BYTES - 1);
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) fail("checkpoint path '%s' is too long", path);
    // every rank sends rank 0 its AdamW state
    FILE *f = world.rank == 0 ? fopen_check(tmp, "wb") : NULL;
    size_t P = m->num_params, LE = (size_t)m->cfg.L * m->cfg.E;
    int ok = !f ||
        (write_all(f, h, sizeof h, 1) && write_all(f, hp, sizeof hp, 1) &&
         write_all(f, h64, sizeof h64, 1) && write_all(f, paths, sizeof paths, 1) &&
         write_all(f, m->params_memory, sizeof(float), P) &&
         (m->cfg.router != ROUTER_SIGMOID || write_all(f, m->expert_bias, sizeof(float), LE)));
    if (st) {  // the moments are NULL (zeros) before the first update
        ok = world_write_ranges(f, m->m_memory, P, ok);
        ok = world_write_ranges(f, m->v_memory, P, ok);
        ok = ok && (!f || write_all(f, m->aux_prev_f, sizeof(float), LE));
    }
    if (!f) return;
    int err = commit_temporary(f, ok, tmp, path);
    if (err)
        fail("cannot write checkpoint '%s': %s; free disk space or choose another -O (the previous checkpoint "
             "is untouched)", path, strerror(err));
}

// What a checkpoint's header says.
typedef struct {
    Config cfg;
    TrainConfig tc;
    int version, has_state, step, adam_t, aux_prev_valid;
    uint64_t epoch, shard, row, sampler;
    uint64_t data_fingerprint;                 // of the train shards; 0: unknown
    char paths[CKPT_PATHS][CKPT_PATH_BYTES];  // -i -j -z as trained; "": unknown (version 1)
    long body;                                 // bytes before the parameters
} CheckpointHeader;

__attribute__((format(printf, 2, 3), noreturn))
static void checkpoint_damaged(const char *path, const char *fmt, ...) {
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    fail("checkpoint '%s' is damaged: %s; use an earlier checkpoint", path, why);
}

// Byte offset of the first non-zero byte of the n words of size bytes at p, or -1.
static long first_nonzero(const void *p, size_t n, size_t size) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n * size; i++)
        if (b[i]) return (long)i;
    return -1;
}

/* Reads a checkpoint's header, holds every field to its meaning and the file
   to the size the header implies. The loader position is checked against the
   shards by the run that resumes (run_setup); here only the epoch, against
   the rows the steps done can have read. */
static void checkpoint_header(const char *path, CheckpointHeader *ck) {
    unsigned char raw[CKPT_HEADER_BYTES + CKPT_PATHS * CKPT_PATH_BYTES];
    int32_t h[256];
    float hp[64];
    uint64_t h64[32];
    long size;
    size_t got = read_head(path, raw, sizeof raw, &size);
    if (got < CKPT_HEADER_BYTES)
        fail("checkpoint '%s' is shorter than its header; it is truncated, use an earlier checkpoint", path);
    memcpy(h, raw, sizeof h);
    memcpy(hp, raw + sizeof h, sizeof hp);
    memcpy(h64, raw + sizeof h + sizeof hp, sizeof h64);
    if (h[0] != CKPT_MAGIC)
        fail("'%s' is not a unipool checkpoint (magic %d, want %d)", path, h[0], CKPT_MAGIC);
    if (h[1] != CKPT_VERSION && h[1] != CKPT_VERSION_1)
        fail("checkpoint '%s' has version %d; this program reads versions %d and %d", path, h[1], CKPT_VERSION_1,
             CKPT_VERSION);
    memset(ck, 0, sizeof *ck);
    ck->version = h[1];
    ck->body = CKPT_HEADER_BYTES + (ck->version == CKPT_VERSION ? CKPT_PATHS * CKPT_PATH_BYTES : 0);
    if (got < (size_t)ck->body)
        fail("checkpoint '%s' is shorter than its header; it is truncated, use an earlier checkpoint", path);
    if (h[2] != 0 && h[2] != 1) checkpoint_damaged(path, "its training-state flag is %d, not 0 or 1", h[2]);
    ck->cfg = header_get_config(h, hp);
    const char *err = config_error(&ck->cfg);
    if (err) checkpoint_damaged(path, "a bad model configuration (%s)", err);
    ck->tc = (TrainConfig){.B = h[16], .T = h[17], .n_micro = h[18], .steps = h[19],
                           .warmup = h[20], .val_every = h[21], .val_batches = h[22],
                           .sample_every = h[23], .gen_tokens = h[24], .ckpt_every = h[25],
                           .keep = h[26], .seed = h64[0], .lr_floor = hp[11],
                           .opt = {.lr = hp[5], .b1 = hp[6], .b2 = hp[7], .eps = hp[8],
                                   .wd = hp[9], .clip = hp[10]}};
    if ((err = train_config_error(&ck->tc))) checkpoint_damaged(path, "a bad training configuration (%s)", err);
    if (ck->tc.T > ck->cfg.maxT) checkpoint_damaged(path, "its T %d exceeds its maxT %d", ck->tc.T, ck->cfg.maxT);
    ck->has_state = h[2], ck->step = h[27], ck->adam_t = h[28], ck->aux_prev_valid = h[29];
    ck->epoch = h64[1], ck->shard = h64[2], ck->row = h64[3], ck->sampler = h64[4],
    ck->data_fingerprint = h64[5];
    if (ck->has_state) {
        if (ck->step < 0 || ck->step > ck->tc.steps)
            checkpoint_damaged(path, "its step %d is outside [0, %d], the steps of its run", ck->step, ck->tc.steps);
        if (ck->adam_t < 0 || ck->adam_t > ck->step)
            checkpoint_damaged(path, "its AdamW step count %d is outside [0, %d], the steps done", ck->adam_t, ck->step);
        if (ck->aux_prev_valid != 0 && ck->aux_prev_valid != 1)
            checkpoint_damaged(path, "its stale-statistic flag is %d, not 0 or 1", ck->aux_prev_valid);
        // every epoch holds a row at least
        double rows = (double)ck->step * ck->tc.B * ck->tc.n_micro;
        if ((double)ck->epoch > rows)
            checkpoint_damaged(path, "its loader epoch %llu is more than the %.0f rows its %d steps read",
                               (unsigned long long)ck->epoch, rows, ck->step);
    }
    long at = first_nonzero(h + 30, 256 - 30, 4), word = 30;
    if (at < 0) at = first_nonzero(hp + 13, 64 - 13, 4), word = 256 + 13;
    if (at < 0) at = first_nonzero(h64 + 6, 32 - 6, 8), word = 256 + 64 + 6 * 2;
    if (at < 0 && !ck->has_state) at = first_nonzero(h + 27, 3, 4), word = 27;
    if (at < 0 && !ck->has_state) at = first_nonzero(h64 + 1, 5, 8), word = 256 + 64 + 2;
    if (at >= 0)
        checkpoint_damaged(path, "byte %ld of its header, in words it leaves 0 (or in the state words of a file "
                           "without the training state), is not 0", 4 * word + at);
    for (int i = 0; i < CKPT_PATHS && ck->version == CKPT_VERSION; i++) {
        const char *p = (const char *)raw + CKPT_HEADER_BYTES + (size_t)i * CKPT_PATH_BYTES;
        size_t len = strnlen(p, CKPT_PATH_BYTES);
        if (len == CKPT_PATH_BYTES || first_nonzero(p + len, CKPT_PATH_BYTES - len, 1) >= 0)
            checkpoint_damaged(path, "data path %d of its path block is not a NUL-terminated, zero-padded string", i);
        memcpy(ck->paths[i], p, len + 1);
    }
    Shape shapes[NUM_PARAM_TENSORS];
    param_shapes(shapes, &ck->cfg);
    double P = 0.0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++)
        P += (double)shapes[i].dim[0] * shapes[i].dim[1] * shapes[i].dim[2];
    double LE = (double)ck->cfg.L * ck->cfg.E;
    double want = ck->body + 4.0 * P * (ck->has_state ? 3 : 1) + (ck->has_state ? 4.0 * LE : 0.0) +
                  (ck->cfg.router == ROUTER_SIGMOID ? 4.0 * LE : 0.0);
    if ((double)size != want)
        fail("checkpoint '%s' is %ld bytes, its header implies %.0f; it is truncated or damaged, use an earlier one",
             path, size, want);
}

// Index of the first of the n floats at x that is not finite or outside [lo, hi], or -1.
static long first_outside(const float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++)
        if (!(x[i] >= lo && x[i] <= hi)) return (long)i;
    return -1;
}

/* Reads the parameters (and with the state, AdamW and the stale statistic)
   into m, built from ck->cfg; of AdamW's m and v, the rank's range alone.
   The expert bias decides routing and the stale statistic (token fractions)
   the next aux loss: both are checked finite, the statistic in [0, 1]. */
static void checkpoint_read_body(const char *path, Model *m, const CheckpointHeader *ck) {
    size_t P = m->num_params, LE = (size_t)m->cfg.L * m->cfg.E, lo = m->opt_lo,
           n = m->opt_hi - m->opt_lo;
    FILE *f = fopen_check(path, "rb");
    fseek(f, ck->body, SEEK_SET);
    fread_check(m->params_memory, sizeof(float), P, f, path);
    if (m->cfg.router == ROUTER_SIGMOID) fread_check(m->expert_bias, sizeof(float), LE, f, path);
    if (ck->has_state) {
        long moments = ftell(f);  // m (P), then v (P)
        m->m_memory = malloc_check(n * sizeof(float));
        m->v_memory = malloc_check(n * sizeof(float));
        fseek(f, moments + (long)(lo * sizeof(float)), SEEK_SET);
        fread_check(m->m_memory, sizeof(float), n, f, path);
        fseek(f, moments + (long)((P + lo) * sizeof(float)), SEEK_SET);
        fread_check(m->v_memory, sizeof(float), n, f, path);
        fseek(f, moments + (long)(2 * P * sizeof(float)), SEEK_SET);
        fread_check(m->aux_prev_f, sizeof(float), LE, f, path);
        m->adam_t = ck->adam_t;
        m->aux_prev_valid = ck->aux_prev_valid;
    }
    fclose(f);
    long i = first_outside(m->expert_bias, LE, -FLT_MAX, FLT_MAX);
    if (i >= 0) checkpoint_damaged(path, "its expert bias at layer %ld, expert %ld is %g", i / m->cfg.E, i % m->cfg.E,
                                   m->expert_bias[i]);
    if ((i = first_outside(m->aux_prev_f, LE, 0.0f, 1.0f)) >= 0)
        checkpoint_damaged(path, "its stale pool statistic at layer %ld, expert %ld is %g, not a fraction in [0, 1]",
                           i / m->cfg.E, i % m->cfg.E, m->aux_prev_f[i]);
}

// ----------------------------------------------------------------------------
// Evaluation and sampling, shared by the training program and infer_unipool.c

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Router health, per layer, over evaluation batches: the share of tokens
   whose router gives every expert a zero score ("dead" tokens: a NormRouter
   whose logits are all <= 0; the token's expert output is multiplied by 0
   and its router learns nothing from it), and the load on each of the
   layer's E experts, from which the experts used, the busiest expert's share
   and the load entropy follow. A collapsing router shows here first. */
typedef struct {
    int L, E;
    uint64_t tokens;  // tokens seen by each layer
    uint64_t *dead;   // (L)
    uint64_t *load;   // (L,E) (token, slot) assignments
} RouteHealth;

static void health_init(RouteHealth *h, const Config *c) {
    h->L = c->L, h->E = c->E, h->tokens = 0;
    h->dead = calloc_check(c->L, sizeof(uint64_t));
    h->load = calloc_check((size_t)c->L * c->E, sizeof(uint64_t));
}

static void health_free(RouteHealth *h) {
    free(h->dead);
    free(h->load);
}

// Adds the routing of the model's last forward (N tokens).
static void health_add(RouteHealth *h, const Model *m, int N) {
    const Config *c = &m->cfg;
    for (int l = 0; l < c->L; l++) {
        const int *off = m->acts.offset + (size_t)l * (c->E + 1);
        for (int j = 0; j < c->E; j++)
            h->load[(size_t)l * c->E + j] += (uint64_t)(off[j + 1] - off[j]);
        for (int n = 0; n < N; n++) {
            const float *s = m->acts.score + ((size_t)l * m->maxN + n) * c->E;
            int zero = 1;
            for (int j = 0; j < c->E; j++) zero &= s[j] == 0.0f;
            h->dead[l] += (uint64_t)zero;
        }
    }
    h->tokens += (uint64_t)N;
}

/* Load statistics of n counts: how many are non-zero, the largest one's
   share of the total, and the entropy of the shares over log(n) (1: even). */
static void load_stats(const uint64_t *counts, int n, int *used, double *top_share,
                       double *entropy) {
    double total = 0.0, mx = 0.0, h = 0.0;
    *used = 0;
    for (int i = 0; i < n; i++)
        total += (double)counts[i], mx = fmax(mx, (double)counts[i]), *used += counts[i] > 0;
    for (int i = 0; i < n; i++)
        if (counts[i]) h -= counts[i] / total * log(counts[i] / total);
    *top_share = total > 0 ? mx / total : 0.0;
    *entropy = n > 1 ? h / log((double)n) : 1.0;
}

/* Mean CE over `batches` batches of B rows from the start of a loader (an
   evaluation pass: the stale pool statistic is untouched). With health,
   adds the routing of every batch to it. progress: a line on stderr. In a
   data-parallel run each rank runs its rows of every batch, and the losses
   and the health are summed over the ranks. */
static double evaluate(Model *m, DataLoader *d, int B, int batches, RouteHealth *health,
                       int progress) {
    int T = d->T, Br = B / world.size, N = Br * T;
    int *rows = malloc_check((size_t)B * (T + 1) * sizeof(int)),
        *io = malloc_check(2 * (size_t)N * sizeof(int));
    loader_seek(d, 0, 0, 0);
    double loss = 0.0, t0 = now_seconds();
    for (int i = 0; i < batches; i++) {
        loader_next(d, rows, B);
        split_rows(io, io + N, world_rows(rows, B, T), Br, T);
        model_forward(m, io, io + N, Br, T, 0, 0);
        loss += m->ce;
        if (health) health_add(health, m, N);
        if (progress)
            fprintf(stderr, "\reval: %d/%d batches, loss %.4f, %.0f tok/s%s", i + 1, batches, loss / (i + 1),
                    (double)(i + 1) * N / (now_seconds() - t0), i + 1 == batches ? "\n" : "");
    }
    free(rows);
    free(io);
    world_sum_f64(&loss, 1);
    if (health) {  // counts: int64 sums, exact (int64_t and uint64_t may alias)
        world_sum_i64((int64_t *)&health->tokens, 1);
        world_sum_i64((int64_t *)health->dead, (size_t)health->L);
        world_sum_i64((int64_t *)health->load, (size_t)health->L * health->E);
    }
    return loss / batches;
}

/* Sampling at a temperature with top-p (nucleus): the smallest set of the
   most probable tokens whose probabilities reach top_p, renormalised;
   top_p >= 1 keeps them all, temperature 0 takes the argmax. The sort breaks
   ties by id, so a seed fixes the result. */
typedef struct {
    float p;
    int id;
} ProbIndex;

static int prob_desc(const void *a, const void *b) {
    const ProbIndex *x = a, *y = b;
    return x->p != y->p ? (x->p < y->p) - (x->p > y->p) : (x->id > y->id) - (x->id < y->id);
}

static int sample_token(const float *logits, int V, float temperature, float top_p, Rng *rng,
                        ProbIndex *scratch) {
    int best = 0;
    for (int i = 1; i < V; i++) best = logits[i] > logits[best] ? i : best;
    if (temperature <= 0.0f) return best;
    double sum = 0.0;
    for (int i = 0; i < V; i++)
        sum += (scratch[i].p = expf((logits[i] - logits[best]) / temperature));
    int n = V;
    if (top_p < 1.0f) {
        // tokens below (1 - top_p) / (V - 1) of the mass
        // cannot be in the nucleus: sort only the rest
        double floor = (1.0 - top_p) / (V - 1) * sum;
        n = 0;
        for (int i = 0; i < V; i++)
            if (scratch[i].p >= floor) scratch[n++] = (ProbIndex){scratch[i].p, i};
        qsort(scratch, n, sizeof *scratch, prob_desc);
        double cum = 0.0;
        int keep = 0;
        while (keep < n && cum < top_p * sum) cum += scratch[keep++].p;
        n = keep, sum = cum;
    } else {
        for (int i = 0; i < V; i++) scratch[i].id = i;
    }
    double u = rng_uniform(rng) * sum;
    for (int i = 0; i < n; i++)
        if ((u -= scratch[i].p) <= 0.0) return scratch[i].id;
    return scratch[n - 1].id;
}

/* Continues seq[0:n_prompt] by n_new tokens (B = 1) through the KV cache:
   the prompt in one forward, then one position per forward (t0 = its
   position). Each new token goes to emit as soon as it is chosen. */
static void generate(Model *m, int *seq, int n_prompt, int n_new, float temperature, float top_p,
                     Rng *rng, void (*emit)(int token, void *ctx), void *ctx) {
    const Config *c = &m->cfg;
    int total = n_prompt + n_new;
    if (n_prompt < 1 || total > c->maxT)
        fail("a prompt of %d tokens and %d new ones do not fit the model's maxT %d; ask for fewer", n_prompt, n_new, c->maxT);
    if (m->maxN < total) act_alloc(m, total);
    ProbIndex *scratch = malloc_check((size_t)c->V * sizeof *scratch);
    model_forward(m, seq, NULL, 1, n_prompt, 0, 0);
    const float *logits = m->acts.logits + (size_t)(n_prompt - 1) * c->Vp;
    for (int t = n_prompt; t < total; t++) {
        seq[t] = sample_token(logits, c->V, temperature, top_p, rng, scratch);
        emit(seq[t], ctx);
        if (t + 1 < total) {
            model_forward(m, seq + t, NULL, 1, 1, t, 0);
            logits = m->acts.logits;
        }
    }
    free(scratch);
}

// ----------------------------------------------------------------------------
// The training program

typedef struct {
    const char *name;
    int L, C, NH, NKV, F;
    float pool_frac;   // UniPool's default pool: pool_frac * 8 L experts
    float pool_alpha;  // default coefficient of the pool loss
    float init_std;    // default initialisation std (-I)
} Preset;

/* The paper's scales (its training scripts; named by active parameters with
   K = 1) and two for CPU experiments. Vanilla MoE gives each layer 8 experts
   and the per-layer loss at alpha 0.01; UniPool's pool holds 8 L experts
   (469m: a reduced pool of 128 = 2/3 of that), with the pool loss at alpha
   0.01 (182m) or 0.02 (469m and up). tiny is make train's. exp is the CPU
   experiment's (README, "Does UniPool learn better?"): the paper's ratios
   (F = 4C, 8 experts a layer, top-1) at a depth where sharing across layers
   means something, L = 8, and C = 128, the widest at which a run of 6M
   tokens takes under an hour here; with a vocabulary of 8192 (make
   data-mix) the experts hold about half of a step's FLOPs. */
static const Preset presets[] = {
    {"tiny", 4, 128, 4, 2, 512, 1.0f, 1e-2f, 1e-2f},
    {"exp", 8, 128, 4, 2, 512, 1.0f, 1e-2f, 1e-2f},
    {"182m", 12, 768, 12, 4, 3072, 1.0f, 1e-2f, 1e-2f},
    {"469m", 24, 1024, 16, 4, 4096, 2.0f / 3.0f, 2e-2f, 1e-2f},
    {"650m", 36, 1024, 16, 4, 4096, 1.0f, 2e-2f, 1e-2f},
    {"830m", 48, 1024, 16, 4, 4096, 1.0f, 2e-2f, 1e-2f},
    {"978m", 24, 1536, 16, 4, 6144, 1.0f, 2e-2f, 1e-2f},
};

static void usage(void) {
    printf(
        "usage: ./train_unipool [-flag value ...]      (defaults in brackets)\n"
        "data\n"
        "  -i  train shard glob                 [data/sotu/sotu_train_*.bin]\n"
        "  -j  val shard glob                   [data/sotu/sotu_val_*.bin]\n"
        "  -z  tokenizer table, for samples     [data/sotu/gpt2_tokenizer.bin]\n"
        "model\n"
        "  -p  preset: tiny exp 182m 469m 650m 830m 978m [tiny]\n"
        "  -L -C -NH -NKV -F  override the preset: layers, channels, query heads, kv heads, expert hidden\n"
        "  -o  ownership: layer (vanilla MoE) or pool (UniPool) [pool]\n"
        "  -g  number of pools G, dividing L; overrides -o: grouped pools\n"
        "  -e  experts per pool E               [layer: 8; pools: 8 per layer served, 469m: 2/3 of that]\n"
        "  -k  experts per token K              [1]\n"
        "  -R  router: softmax, norm, or sigmoid (with an expert bias, no aux loss)\n"
        "                                       [layer: softmax; pools: norm]\n"
        "  -a  aux loss: none, layer, pool (previous micro-batch's counts, as the paper), poolcur\n"
        "                                       [layer: layer; pools: pool; sigmoid: none]\n"
        "  -br expert bias rate, sigmoid router [1e-3]\n"
        "  -A  aux coefficient alpha            [0.01; pool loss at 469m and up: 0.02]\n"
        "  -M  maxT, the longest sequence       [1024]\n"
        "training (optimizer defaults are the paper's)\n"
        "  -b  batch size B                     [4]\n"
        "  -t  sequence length T                [1024]\n"
        "  -m  micro-batches per step           [1]\n"
        "  -n  steps                            [1000]\n"
        "  -l  peak learning rate               [5e-4]\n"
        "  -w  warmup steps                     [1%% of -n]\n"
        "  -f  final lr as a fraction of peak   [0.1]\n"
        "  -I  initialisation std (matrices; residual projections / sqrt(2L)) [the preset's: 0.01]\n"
        "  -d  weight decay                     [0.01]\n"
        "  -b1 -b2 -ae  AdamW betas and eps     [0.9 0.999 1e-8]\n"
        "  -c  gradient clip, 0 = off           [1.0]\n"
        "  -s  seed                             [1337]\n"
        "  -v  val every N steps, 0 = never     [100]\n"
        "  -V  val batches                      [20]\n"
        "  -S  sample every N steps, 0 = never  [200]\n"
        "  -G  tokens per sample                [64]\n"
        "  -K  checkpoint every N steps, 0 = at the end only, never = none at all [500]\n"
        "  -N  checkpoints kept                 [2]\n"
        "  -O  output dir: checkpoints and log.jsonl [out]\n"
        "  -r  resume from a checkpoint, or 'latest' in -O; other flags, -i -j -z included,\n"
        "      default to the checkpoint's\n"
        "  -T  threads                          [all]\n"
        "  -h  this help\n");
}

static long parse_int(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi)
        usage_error("bad value '%s' for %s: want a whole number in [%ld, %ld]", v, flag, lo, hi);
    return x;
}

static float parse_float(const char *flag, const char *v, double lo, double hi) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi))
        usage_error("bad value '%s' for %s: want a number in [%g, %g]", v, flag, lo, hi);
    return (float)x;
}

static int parse_choice(const char *flag, const char *v, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v, names[i])) return i;
    usage_error("bad value '%s' for %s", v, flag);
}

typedef struct {
    const char *train, *val, *tokenizer, *out, *resume;
    int threads;
} Paths;

/* Applies the command line to a model configuration and a training
   configuration that hold their defaults (or a checkpoint's values).
   Returns through *model_flags whether any flag touched the model. */
static void apply_flags(int argc, char **argv, Config *c, TrainConfig *tc, Paths *p,
                        int *model_flags, int derive) {
    static const char *const own[] = {"layer", "pool"}, *const routers[] = {"softmax", "norm", "sigmoid"},
                              *const auxes[] = {"none", "layer", "pool", "poolcur"};
    const Preset *pre = &presets[0];
    int G = -1, E = -1, router = -1, aux = -1, warmup = -1;
    float alpha = -1.0f, bias_rate = -1.0f, init_std = -1.0f;
    *model_flags = 0;
    for (int i = 1; i < argc; i += 2) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(f, "-h")) usage(), world_finish(), exit(0);
        if (f[0] != '-') usage_error("unexpected argument '%s'", f);
        if (!v) usage_error("flag %s needs a value", f);
        int model = 1;
        if (!strcmp(f, "-p")) {
            size_t k = 0;
            while (k < sizeof presets / sizeof *presets && strcmp(v, presets[k].name)) k++;
            if (k == sizeof presets / sizeof *presets) usage_error("unknown preset '%s' for -p", v);
            pre = &presets[k];
            c->L = pre->L, c->C = pre->C, c->NH = pre->NH, c->NKV = pre->NKV, c->F = pre->F;
            derive = 1;
        } else if (!strcmp(f, "-L")) c->L = (int)parse_int(f, v, 1, 1024), derive = 1;
        else if (!strcmp(f, "-C")) c->C = (int)parse_int(f, v, 2, 1 << 16);
        else if (!strcmp(f, "-NH")) c->NH = (int)parse_int(f, v, 1, 1024);
        else if (!strcmp(f, "-NKV")) c->NKV = (int)parse_int(f, v, 1, 1024);
        else if (!strcmp(f, "-F")) c->F = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "-M")) c->maxT = (int)parse_int(f, v, 1, 1 << 20);
        // 0 stands for L
        else if (!strcmp(f, "-o")) G = parse_choice(f, v, own, 2) == 0 ? 0 : 1, derive = 1;
        else if (!strcmp(f, "-g")) G = (int)parse_int(f, v, 1, 1024), derive = 1;
        else if (!strcmp(f, "-e")) E = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "-k")) c->K = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "-R")) router = parse_choice(f, v, routers, 3);
        else if (!strcmp(f, "-a")) aux = parse_choice(f, v, auxes, 4);
        else if (!strcmp(f, "-A")) alpha = parse_float(f, v, 0, 1e3);
        else if (!strcmp(f, "-br")) bias_rate = parse_float(f, v, 0, 1);
        else {
            model = 0;
            if (!strcmp(f, "-i")) p->train = v;
            else if (!strcmp(f, "-j")) p->val = v;
            else if (!strcmp(f, "-z")) p->tokenizer = v;
            else if (!strcmp(f, "-O")) p->out = v;
            else if (!strcmp(f, "-r")) p->resume = v;
            else if (!strcmp(f, "-T")) p->threads = (int)parse_int(f, v, 1, 4096);
            else if (!strcmp(f, "-b")) tc->B = (int)parse_int(f, v, 1, 1 << 20);
            else if (!strcmp(f, "-t")) tc->T = (int)parse_int(f, v, 1, 1 << 20);
            else if (!strcmp(f, "-m")) tc->n_micro = (int)parse_int(f, v, 1, 1 << 20);
            else if (!strcmp(f, "-n")) tc->steps = (int)parse_int(f, v, 1, INT32_MAX);
            else if (!strcmp(f, "-l")) tc->opt.lr = parse_float(f, v, 0, 10);
            else if (!strcmp(f, "-w")) warmup = (int)parse_int(f, v, 0, INT32_MAX);
            else if (!strcmp(f, "-f")) tc->lr_floor = parse_float(f, v, 0, 1);
            else if (!strcmp(f, "-I")) init_std = parse_float(f, v, 1e-6, 1);
            else if (!strcmp(f, "-d")) tc->opt.wd = parse_float(f, v, 0, 10);
            else if (!strcmp(f, "-b1")) tc->opt.b1 = parse_float(f, v, 0, 0.999999);
            else if (!strcmp(f, "-b2")) tc->opt.b2 = parse_float(f, v, 0, 0.999999);
            else if (!strcmp(f, "-ae")) tc->opt.eps = parse_float(f, v, 1e-30, 1);
            else if (!strcmp(f, "-c")) tc->opt.clip = parse_float(f, v, 0, 1e9);
            else if (!strcmp(f, "-s")) tc->seed = (uint64_t)parse_int(f, v, 0, INT32_MAX);
            else if (!strcmp(f, "-v")) tc->val_every = (int)parse_int(f, v, 0, INT32_MAX);
            else if (!strcmp(f, "-V")) tc->val_batches = (int)parse_int(f, v, 1, INT32_MAX);
            else if (!strcmp(f, "-S")) tc->sample_every = (int)parse_int(f, v, 0, INT32_MAX);
            else if (!strcmp(f, "-G")) tc->gen_tokens = (int)parse_int(f, v, 1, 1 << 20);
            else if (!strcmp(f, "-K")) tc->ckpt_every = !strcmp(v, "never") ? CKPT_NEVER : (int)parse_int(f, v, 0, INT32_MAX);
            else if (!strcmp(f, "-N")) tc->keep = (int)parse_int(f, v, 1, 1 << 20);
            else usage_error("unknown flag %s", f);
        }
        *model_flags |= model;
    }
    /* Ownership decides the defaults of E, the router and the aux loss:
       vanilla (G = L) takes 8 experts per layer, softmax and the per-layer
       loss; pools take 8 per layer they serve (scaled by the preset's
       pool_frac for G = 1), the NormRouter and the stale pool loss. */
    if (derive) {
        c->G = G < 0 ? c->G : G == 0 ? c->L : G;
        if (c->G < 1 || c->L % c->G) usage_error("-g %d does not divide the %d layers (-L)", c->G, c->L);
        int vanilla = c->G == c->L;
        c->E =
            vanilla ? 8 : (int)lroundf(8.0f * (c->L / c->G) * (c->G == 1 ? pre->pool_frac : 1.0f));
        c->router = vanilla ? ROUTER_SOFTMAX : ROUTER_NORM;
        c->aux = vanilla ? AUX_LAYER : AUX_POOL_PREV;
        c->alpha = vanilla ? 1e-2f : pre->pool_alpha;
    }
    if (E > 0) c->E = E;
    if (router >= 0) c->router = router;
    if (router == ROUTER_SIGMOID && aux > AUX_NONE)
        usage_error("-R sigmoid balances with its expert bias, not an aux loss: drop -a %s (or use -a none)", auxes[aux]);
    if (bias_rate >= 0.0f && c->router != ROUTER_SIGMOID) usage_error("-br sets the sigmoid router's bias rate; add -R sigmoid");
    if (router == ROUTER_SIGMOID) c->aux = AUX_NONE;
    if (aux >= 0) c->aux = aux;
    if (alpha >= 0.0f) c->alpha = alpha;
    if (bias_rate >= 0.0f) c->bias_rate = bias_rate;
    // only the sigmoid router has a bias to move
    if (c->router != ROUTER_SIGMOID) c->bias_rate = 0.0f;
    if (init_std > 0.0f) tc->init_std = init_std;
    else if (derive) tc->init_std = pre->init_std;
    if (warmup >= 0) tc->warmup = warmup;
    else if (derive) tc->warmup = tc->steps / 100;  // the paper warms up over 1% of training
    if (tc->T > c->maxT) usage_error("-t %d exceeds the model's maxT %d (-M)", tc->T, c->maxT);
    const char *err = config_error(c);
    if (err) usage_error("bad model configuration: %s", err);
    if ((err = train_config_error(tc))) usage_error("bad training configuration (-b -t -m ...): %s", err);
}

static int config_equal(const Config *a, const Config *b) {
    return a->V == b->V && a->Vp == b->Vp && a->maxT == b->maxT && a->L == b->L && a->C == b->C &&
        a->NH == b->NH && a->NKV == b->NKV && a->F == b->F && a->G == b->G && a->E == b->E &&
        a->K == b->K && a->router == b->router && a->aux == b->aux && a->alpha == b->alpha &&
        a->bias_rate == b->bias_rate;
}

static void make_dirs(const char *path) {  // mkdir -p
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = buf + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char was = *s;
            *s = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                fail("cannot create directory '%s': %s; choose another output folder", buf, strerror(errno));
            if (!(*s = was)) break;
        }
    }
}

// Creates dir if needed and checks that files can be made in it; flag names where it came from.
static void check_writable_dir(const char *dir, const char *flag) {
    make_dirs(dir);
    char probe[4096 + 32];
    snprintf(probe, sizeof probe, "%s/.unipool_write_test_XXXXXX", dir);
    int fd = mkstemp(probe);
    if (fd < 0) fail("%s: cannot write in '%s': %s; choose another folder or fix its permissions", flag, dir, strerror(errno));
    close(fd);
    remove(probe);
}

// The files of dir matching pattern, sorted (0), or none (1).
static int glob_in(const char *dir, const char *pattern, glob_t *g) {
    char pat[4096 + 64];
    snprintf(pat, sizeof pat, "%s/%s", dir, pattern);
    return glob(pat, 0, NULL, g) != 0;
}

// The newest checkpoint in dir (names sort by step), or NULL.
static char *latest_checkpoint(const char *dir) {
    glob_t g;
    if (glob_in(dir, "ckpt_*.bin", &g)) return NULL;
    char *path = strdup(g.gl_pathv[g.gl_pathc - 1]);
    globfree(&g);
    return path;
}

// Keeps the newest `keep` checkpoints in dir.
static void prune_checkpoints(const char *dir, int keep) {
    glob_t g;
    if (glob_in(dir, "ckpt_*.bin", &g)) return;
    for (size_t i = 0; i + keep < g.gl_pathc; i++) remove(g.gl_pathv[i]);
    globfree(&g);
}

/* Removes what a killed run leaves in dir: a checkpoint's temporary (killed
   while saving; the checkpoint before it is whole), the log's (killed while
   rewriting it; log.jsonl is whole) and check_writable_dir's probe. Says so
   in one line. Another run writing into the same folder at the same time
   would lose its temporary: runs do not share an output folder. */
static void remove_stale_temporaries(const char *dir) {
    static const char *const patterns[] = {"ckpt_*.bin.tmp", "log.jsonl.tmp", ".unipool_write_test_*"};
    int n = 0;
    for (int k = 0; k < 3; k++) {
        glob_t g;
        if (glob_in(dir, patterns[k], &g)) continue;
        for (size_t i = 0; i < g.gl_pathc; i++) {
            if (remove(g.gl_pathv[i]) != 0) fail("cannot remove the stale temporary '%s': %s; remove it by hand",
                                                 g.gl_pathv[i], strerror(errno));
            printf("%s%s", n++ ? ", " : "removed the temporaries of an interrupted run: ", g.gl_pathv[i]);
        }
        globfree(&g);
    }
    if (n) printf("\n");
}

/* Opens dir/log.jsonl for the run's records. A fresh run starts it empty. A
   resumed run at step S keeps the records before its checkpoint and drops the
   rest: the steps after S (written by a run stopped past its last checkpoint;
   they run again), the validation at S (it runs again too) and a torn line
   (a kill while writing). The kept lines go to log.jsonl.tmp, renamed over
   the log, so that a kill leaves the old log or the new one. Each step is
   then in the log once, whatever the number of resumes. */
static FILE *log_open(const char *dir, int resume_step) {
    char path[4096 + 16], tmp[4096 + 32];
    snprintf(path, sizeof path, "%s/log.jsonl", dir);
    snprintf(tmp, sizeof tmp, "%s/log.jsonl.tmp", dir);
    FILE *old = resume_step >= 0 ? fopen(path, "r") : NULL;
    if (old) {
        FILE *out = fopen_check(tmp, "w");
        char *line = NULL, key[16];
        size_t cap = 0;
        ssize_t len;
        int step, ok = 1;
        while ((len = getline(&line, &cap, old)) > 0) {
            int whole = len >= 2 && line[len - 2] == '}' && line[len - 1] == '\n';
            if (whole && sscanf(line, "{\"step\": %d, \"%15[a-z_]\"", &step, key) == 2 &&
                (step < resume_step || (step == resume_step && strcmp(key, "val_loss"))))
                ok = ok && fputs(line, out) >= 0;
        }
        free(line);
        fclose(old);
        int err = commit_temporary(out, ok, tmp, path);
        if (err) fail("cannot rewrite '%s' through '%s': %s; free disk space or choose another -O", path, tmp, strerror(err));
    }
    FILE *f = fopen(path, resume_step >= 0 ? "a" : "w");
    if (!f) fail("-O: cannot write '%s': %s; choose another -O or fix its permissions", path, strerror(errno));
    return f;
}

/* path made absolute against the current folder (a glob stays a glob) into
   out, which holds CKPT_PATH_BYTES: checkpoints store it so that -r finds the
   same files from any folder. flag names where it came from. */
static void absolute_path(char *out, const char *path, const char *flag) {
    char cwd[4096];
    if (path[0] != '/' && !getcwd(cwd, sizeof cwd)) fail("%s: cannot get the current folder: %s", flag, strerror(errno));
    int n = path[0] == '/' ? snprintf(out, CKPT_PATH_BYTES, "%s", path) : snprintf(out, CKPT_PATH_BYTES, "%s/%s", cwd, path);
    if (n >= CKPT_PATH_BYTES)
        usage_error("%s '%s' is %d bytes as an absolute path, more than the %d a checkpoint stores; use a shorter path",
                    flag, path, n, CKPT_PATH_BYTES - 1);
}

#define ETA_WINDOW 20  // steps in the ETA's running mean

/* Step times for the ETA: the mean of this process's last ETA_WINDOW steps,
   leaving out its first (it warms caches and pages) once there is another.
   One slow or fast step moves the ETA by a twentieth of its difference. */
typedef struct {
    double first, recent[ETA_WINDOW];
    long n;  // steps timed
} StepTimes;

static void step_times_add(StepTimes *s, double dt) {
    if (s->n++ == 0) s->first = dt;
    else s->recent[(s->n - 2) % ETA_WINDOW] = dt;
}

static double step_times_mean(const StepTimes *s) {
    long k = s->n - 1 < ETA_WINDOW ? s->n - 1 : ETA_WINDOW;
    double sum = 0.0;
    for (long i = 0; i < k; i++) sum += s->recent[i];
    return k > 0 ? sum / k : s->first;
}

static void print_memory(const Model *m, const TrainConfig *tc) {
    double mib = 1048576.0, P = (double)m->num_params * sizeof(float),
           S = (double)(m->opt_hi - m->opt_lo) * sizeof(float);
    printf("memory%s: parameters %.1f MiB, gradients %.1f MiB, AdamW %.1f MiB, activations %.1f MiB (B*T = %d)\n",
           world.size > 1 ? " per rank" : "", P / mib, P / mib, 2 * S / mib, m->acts_bytes / mib,
           tc->B / world.size * tc->T);
}

// Active parameters: what one token touches (K experts per layer of the pool's E).
static double active_params(const Model *m) {
    const Config *c = &m->cfg;
    double expert = 3.0 * c->F * c->C, all = (double)m->num_params;
    return all - (double)c->G * c->E * expert + (double)c->L * c->K * expert;
}

/* Training FLOPs per token, by part. A product with a matrix of n parameters
   costs 2n FLOPs in the forward and 4n in the backward (the gradients of its
   input and of its weight); causal attention's scores and weighted sum cost
   2 (T/2) C each in the forward, 3 times that with the backward. A token runs
   K experts of 3 C F parameters each; the head multiplies all Vp rows. The
   embedding lookup, norms and softmaxes are left out: they are not products. */
typedef struct { double head, attention, routers, experts; } Flops;

static Flops training_flops(const Config *c, int T) {
    double L = c->L, C = c->C, q = (double)c->NH * HD(c), kv = (double)c->NKV * HD(c);
    return (Flops){.head = 6.0 * c->Vp * C,
                   .attention = L * (6.0 * (2.0 * q * C + 2.0 * kv * C) + 6.0 * T * C),
                   .routers = L * 6.0 * c->E * C,
                   .experts = L * 6.0 * c->K * 3.0 * c->F * C};
}

static double flops_total(Flops f) { return f.head + f.attention + f.routers + f.experts; }

/* Prints the validation line and writes its log.jsonl record (log NULL: none):
   loss, then the pool's load over all layers (experts unused, the busiest
   one's share, entropy over log(G E)), then per layer the router health
   (evaluate): dead-token percentage, experts used, the busiest expert's
   percentage of the layer's load, load entropy over log(E). Returns the
   largest layer's share of dead tokens. */
static double report_validation(FILE *log, int step, double loss, const RouteHealth *h,
                                const Config *c) {
    int L = c->L, E = c->E, GE = c->G * c->E, used[L], pool_used;
    double dead[L], top[L], ent[L], pool_top, pool_ent, most_dead = 0.0;
    uint64_t *pool = calloc_check(GE, sizeof(uint64_t));
    for (int l = 0; l < L; l++) {
        for (int j = 0; j < E; j++)
            pool[layer_first_expert(c, l) + j] += h->load[(size_t)l * E + j];
        load_stats(h->load + (size_t)l * E, E, &used[l], &top[l], &ent[l]);
        dead[l] = h->tokens ? (double)h->dead[l] / h->tokens : 0.0;
        most_dead = fmax(most_dead, dead[l]);
    }
    load_stats(pool, GE, &pool_used, &pool_top, &pool_ent);
    free(pool);
    printf("val step %d | loss %.4f | ppl %.2f | pool: %d/%d unused, top %.1f%%, H %.2f | by layer: dead%%", step, loss,
           exp(loss), GE - pool_used, GE, 100 * pool_top, pool_ent);
    for (int l = 0; l < L; l++) printf("%c%.0f", l ? '/' : ' ', 100 * dead[l]);
    printf(" used");
    for (int l = 0; l < L; l++) printf("%c%d", l ? '/' : ' ', used[l]);
    printf(" top%%");
    for (int l = 0; l < L; l++) printf("%c%.0f", l ? '/' : ' ', 100 * top[l]);
    printf(" H");
    for (int l = 0; l < L; l++) printf("%c%.2f", l ? '/' : ' ', ent[l]);
    printf("\n");
    if (!log) return most_dead;
    fprintf(log, "{\"step\": %d, \"val_loss\": %.6f, \"val_ppl\": %.4f, \"unused\": %d, \"max_share\": %.6f, "
                 "\"entropy\": %.6f", step, loss, exp(loss), GE - pool_used, pool_top, pool_ent);
    const char *names[4] = {"dead", "used", "top_share", "load_entropy"};
    for (int k = 0; k < 4; k++) {
        fprintf(log, ", \"%s\": [", names[k]);
        for (int l = 0; l < L; l++) {
            if (k == 1) fprintf(log, "%s%d", l ? ", " : "", used[l]);
            else fprintf(log, "%s%.6f", l ? ", " : "", k == 0 ? dead[l] : k == 2 ? top[l] : ent[l]);
        }
        fprintf(log, "]");
    }
    fprintf(log, "}\n");
    fflush(log);
    return most_dead;
}

/* Unigram baselines: the token frequencies of the first train shard
   (add-one smoothed) as a model. Returns the cross-entropy of the val rows'
   targets under it; *train_ce gets that of the shard itself. A model that
   has learned anything beyond frequencies goes below them. */
static double unigram_baseline(DataLoader *train, DataLoader *val, int batches, int B, int V,
                               double *train_ce) {
    double *cnt = calloc_check(V, sizeof(double)), total = V;
    loader_load_shard(train, 0);
    for (size_t i = 0; i < train->count[0]; i++) cnt[train->tokens[i]] += 1.0;
    for (int i = 0; i < V; i++) total += cnt[i];
    *train_ce = 0.0;
    for (int i = 0; i < V; i++) *train_ce -= cnt[i] / train->count[0] * log((cnt[i] + 1.0) / total);
    int T = val->T, *rows = malloc_check((size_t)B * (T + 1) * sizeof(int));
    double loss = 0.0;
    loader_seek(val, 0, 0, 0);
    for (int i = 0; i < batches; i++) {
        loader_next(val, rows, B);
        for (int b = 0; b < B; b++)
            for (int t = 1; t <= T; t++) loss -= log((cnt[rows[b * (T + 1) + t]] + 1.0) / total);
    }
    train->loaded = -1;  // the loader reloads its own shard when it next reads
    free(cnt);
    free(rows);
    return loss / ((double)batches * B * T);
}

/* A run up to its model: the configurations, the checkpoint's header when
   resuming, the shards and where the train loader starts, the output folder
   and the log, the tokenizer table. All of it is cheap and it holds every
   check that does not need the model, so that a typo or a damaged file costs
   a moment at any model size; main builds the model after it. */
typedef struct {
    Config cfg;
    TrainConfig tc;
    Paths paths;
    char *resume;               // the checkpoint resumed from, or NULL
    CheckpointHeader ck;        // its header
    DataLoader train, val;
    int64_t epoch, shard, row;  // where the train loader starts
    TrainState st;
    char restored[16];          // the data flags taken from the checkpoint ("" if none)
    FILE *log;                  // rank 0's; NULL on the others
    Tokenizer tok;
    int have_tok;
} Run;

/* Where a resumed run's train loader starts. The checkpoint's fingerprint of
   the shards it read tells whether these are the same shards: then its
   position must lie in them, else the file is damaged and refused. Other
   shards (continuing on another corpus) are read from their beginning, said
   in one line. A version 1 file has no fingerprint: its position is used if
   it lies in these shards, else they too are read from the beginning. */
static void resume_position(Run *r) {
    const CheckpointHeader *ck = &r->ck;
    char why[160];
    const char *outside =
        loader_position_error(&r->train, ck->epoch, ck->shard, ck->row, why, sizeof why);
    int same = ck->data_fingerprint == loader_fingerprint(&r->train);
    if (same && outside)
        checkpoint_damaged(r->resume, "its loader position (%s) is outside the train shards it was trained on", outside);
    if (same || (!ck->data_fingerprint && !outside)) {
        r->epoch = (int64_t)ck->epoch, r->shard = (int64_t)ck->shard, r->row = (int64_t)ck->row;
    } else {
        printf("data: %s; reading them from their beginning (epoch 0, shard 0, row 0)\n",
               ck->data_fingerprint ? "the train shards (-i) differ from those the checkpoint read (in number or size)"
                                    : "the checkpoint does not name its train shards, and its loader position is outside "
                                      "these (-i)");
    }
}

static void run_setup(Run *r, int argc, char **argv) {
    memset(r, 0, sizeof *r);
    Config cfg = {.V = GPT2_VOCAB, .Vp = padded_vocab(GPT2_VOCAB), .maxT = 1024, .G = 1, .K = 1,
                  .norm_eps = 1e-5f, .rope_theta = 1e6f, .router_c = 1.0f, .router_eps = 1e-8f,
                  .bias_rate = 1e-3f};
    TrainConfig tc = {.B = 4, .T = 1024, .n_micro = 1, .steps = 1000, .val_every = 100,
                      .val_batches = 20, .sample_every = 200, .gen_tokens = 64, .ckpt_every = 500,
                      .keep = 2, .seed = 1337, .lr_floor = 0.1f, .init_std = 0.01f,
                      .opt = {.lr = 5e-4f, .b1 = 0.9f, .b2 = 0.999f, .eps = 1e-8f, .wd = 0.01f,
                              .clip = 1.0f}};
    // the data paths: the checkpoint's, else the defaults below
    Paths paths = {NULL, NULL, NULL, "out", NULL, 0};
    const Preset *tiny = &presets[0];
    cfg.L = tiny->L, cfg.C = tiny->C, cfg.NH = tiny->NH, cfg.NKV = tiny->NKV, cfg.F = tiny->F;
    int model_flags;
    apply_flags(argc, argv, &cfg, &tc, &paths, &model_flags, 1);
    const char **data[CKPT_PATHS] = {&paths.train, &paths.val, &paths.tokenizer};
    static const char *const flag[CKPT_PATHS] = {"-i", "-j", "-z"}, *const restored[CKPT_PATHS] = {
        "-i (the checkpoint's)", "-j (the checkpoint's)", "-z (the checkpoint's)"};
    const char *what[CKPT_PATHS] = {flag[0], flag[1], flag[2]};  // names a path in messages
    if (paths.resume) {
        r->resume = !strcmp(paths.resume, "latest") ? latest_checkpoint(paths.out) : strdup(paths.resume);
        if (!r->resume) fail("-r latest: no checkpoint in '%s'; start without -r", paths.out);
        CheckpointHeader *ck = &r->ck;
        checkpoint_header(r->resume, ck);
        if (!ck->has_state) fail("checkpoint '%s' holds parameters only; it cannot resume training", r->resume);
        // the checkpoint's configuration, with this command line's flags on top
        Config want = ck->cfg;
        TrainConfig tc2 = ck->tc;
        Paths p2 = paths;
        apply_flags(argc, argv, &want, &tc2, &p2, &model_flags, 0);
        if (model_flags && !config_equal(&want, &ck->cfg))
            usage_error("the model flags describe another model than checkpoint '%s'; drop them to resume", r->resume);
        if (tc2.B != ck->tc.B || tc2.T != ck->tc.T || tc2.n_micro != ck->tc.n_micro ||
            tc2.seed != ck->tc.seed)
            usage_error("-b, -t, -m and -s must stay as in checkpoint '%s' to resume its data order", r->resume);
        if (tc2.steps < ck->step)
            usage_error("-n %d is fewer steps than the %d checkpoint '%s' has done; pass a larger -n", tc2.steps, ck->step,
                        r->resume);
        cfg = ck->cfg;
        tc = tc2;
        r->st.step = ck->step;
        r->st.sampler = ck->sampler;
        for (int i = 0; i < CKPT_PATHS; i++)
            if (!*data[i] && ck->paths[i][0]) {
                *data[i] = ck->paths[i], what[i] = restored[i];
                snprintf(r->restored + strlen(r->restored), sizeof r->restored - strlen(r->restored), " %s", flag[i]);
            }
    } else {
        r->st.sampler = tc.seed ^ 0x5eed;
    }
    static const char *const defaults[CKPT_PATHS] = {"data/sotu/sotu_train_*.bin", "data/sotu/sotu_val_*.bin",
                                                     "data/sotu/gpt2_tokenizer.bin"};
    for (int i = 0; i < CKPT_PATHS; i++) {
        if (!*data[i]) *data[i] = defaults[i];
        absolute_path(r->st.paths[i], *data[i], what[i]);
    }
    loader_init(&r->train, paths.train, tc.T, 1, tc.seed, what[PATH_TRAIN]);
    loader_init(&r->val, paths.val, tc.T, 0, 0, what[PATH_VAL]);
    r->have_tok = tokenizer_load(&r->tok, paths.tokenizer) == 0;
    // the vocabulary comes with the data: the train shards name it; the rest must agree
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s shards '%s'", what[PATH_TRAIN], paths.train);
    snprintf(b, sizeof b, "%s shards '%s'", what[PATH_VAL], paths.val);
    vocab_agree(a, r->train.V, b, r->val.V);
    if (r->have_tok) {
        snprintf(b, sizeof b, "%s tokenizer table '%s'", what[PATH_TOKENIZER], paths.tokenizer);
        vocab_agree(a, r->train.V, b, r->tok.n);
    }
    if (r->resume) {
        snprintf(b, sizeof b, "checkpoint '%s'", r->resume);
        vocab_agree(a, r->train.V, b, cfg.V);
        resume_position(r);
    } else {
        cfg.V = r->train.V, cfg.Vp = padded_vocab(cfg.V);
    }
    if (tc.B % world.size)
        usage_error("-b %d is not a multiple of the %d ranks: each rank runs B/R rows of every micro-batch", tc.B,
                    world.size);
    if (world.rank == 0) {  // the one rank that writes: checkpoints and the log
        check_writable_dir(paths.out, "-O");
        remove_stale_temporaries(paths.out);
        r->log = log_open(paths.out, r->resume ? r->st.step : -1);
    }
    r->cfg = cfg, r->tc = tc, r->paths = paths;
}

// Seconds as [Hh]MMmSSs.
static void format_duration(char *out, size_t n, double seconds) {
    long s = seconds > 0 ? (long)(seconds + 0.5) : 0;
    if (s >= 3600) snprintf(out, n, "%ldh%02ldm%02lds", s / 3600, s / 60 % 60, s % 60);
    else snprintf(out, n, "%ldm%02lds", s / 60, s % 60);
}

#ifndef UNIPOOL_NO_MAIN
int main(int argc, char **argv) {
    world_init(&argc, &argv);
    setvbuf(stdout, NULL, _IOLBF, 0);
    Run r;
    run_setup(&r, argc, argv);
#ifdef _OPENMP
    if (r.paths.threads) omp_set_num_threads(r.paths.threads);
#endif
    Config cfg = r.cfg;
    TrainConfig tc = r.tc;
    TrainState *st = &r.st;
    Model m;
    if (r.resume) {
        model_build(&m, &cfg);
        checkpoint_read_body(r.resume, &m, &r.ck);
    } else {
        cfg.router_c = router_constant(&cfg);
        model_build(&m, &cfg);
        model_init(&m, tc.seed, tc.init_std);
    }
    loader_seek(&r.train, r.epoch, r.shard, r.row);
    st->loader = &r.train;
    act_alloc(&m, tc.B / world.size * tc.T);

    const char *own = cfg.G == cfg.L ? "vanilla MoE (each layer owns its experts)"
                      : cfg.G == 1   ? "UniPool (one shared pool)"
                                     : "grouped pools";
    static const char *const aname[] = {"none", "layer", "pool (stale)", "pool (current)"};
    char rdesc[64] = "softmax";
    if (cfg.router == ROUTER_NORM) snprintf(rdesc, sizeof rdesc, "norm (c %.4f)", cfg.router_c);
    if (cfg.router == ROUTER_SIGMOID) snprintf(rdesc, sizeof rdesc, "sigmoid (bias rate %g)", cfg.bias_rate);
    printf("model: %s | L %d C %d NH %d NKV %d F %d | G %d pools of E %d, K %d | router %s | aux %s alpha %g\n",
           own, cfg.L, cfg.C, cfg.NH, cfg.NKV, cfg.F, cfg.G, cfg.E, cfg.K, rdesc, aname[cfg.aux],
           cfg.alpha);
    printf("parameters: %.2fM stored, %.2fM active per token\n", m.num_params / 1e6, active_params(&m) / 1e6);
    Flops fl = training_flops(&cfg, tc.T);
    double ft = flops_total(fl);
    printf("training FLOPs per token: %.1fM; experts %.0f%%, head %.0f%%, attention %.0f%%, routers %.0f%%\n",
           ft / 1e6, 100 * fl.experts / ft, 100 * fl.head / ft, 100 * fl.attention / ft,
           100 * fl.routers / ft);
    printf("training: B %d T %d x %d micro-batches, %d steps, lr %g (warmup %d, floor %g), wd %g, clip %g, seed %llu",
           tc.B, tc.T, tc.n_micro, tc.steps, tc.opt.lr, tc.warmup, tc.lr_floor, tc.opt.wd,
           tc.opt.clip,
           (unsigned long long)tc.seed);
    if (!r.resume) printf(", init std %g", tc.init_std);
    printf("\n");
    printf("data: %d train shards (%s), %d val shards (%s)%s%s\n", r.train.n, r.paths.train, r.val.n, r.paths.val,
           r.restored[0] ? "; from the checkpoint:" : "", r.restored);
    if (world.size > 1) printf("data parallel: %d ranks, each running %d of the %d rows of every micro-batch\n",
                               world.size, tc.B / world.size, tc.B);
    print_memory(&m, &tc);
    if (r.resume) printf("resumed from %s at step %d\n", r.resume, st->step);
    double unigram_train,
        unigram = unigram_baseline(&r.train, &r.val, tc.val_batches, tc.B, cfg.V, &unigram_train);
    printf("unigram baseline: %.4f on train, %.4f on val\n", unigram_train, unigram);

    char ckpath[4096 + 32], eta[32];
    size_t per_step = (size_t)tc.n_micro * tc.B * (tc.T + 1);
    int *tokens = malloc_check(per_step * sizeof(int));
    double tokens_per_step = (double)tc.n_micro * tc.B * tc.T;
    StepTimes times = {0};
    double val_loss = NAN, most_dead = 0.0;  // the last validation's
    Sharing share;
    sharing_start(&share, !r.paths.threads && !getenv("OMP_NUM_THREADS"));
    for (int step = st->step; step <= tc.steps; step++) {
        int last = step == tc.steps;
        if (tc.val_every && (step % tc.val_every == 0 || last)) {
            RouteHealth health;
            health_init(&health, &cfg);
            val_loss = evaluate(&m, &r.val, tc.B, tc.val_batches, &health, 0);
            most_dead = report_validation(r.log, step, val_loss, &health, &cfg);
            health_free(&health);
        }
        if (tc.sample_every && step > 0 && (step % tc.sample_every == 0 || last) &&
            world.rank == 0) {
            Rng rng = {st->sampler};
            int *seq = malloc_check((tc.gen_tokens + 1) * sizeof(int));
            seq[0] = r.have_tok ? r.tok.eot : cfg.V - 1;
            printf("sample: ");
            generate(&m, seq, 1, tc.gen_tokens, 1.0f, 1.0f, &rng, tokenizer_print, &r.tok);
            printf("\n");
            free(seq);
            st->sampler = rng.s;
        }
        if (last) break;
        double t0 = now_seconds();
        loader_next(&r.train, tokens, tc.n_micro * tc.B);
        StepStats s = step_gradients(&m, tokens, tc.n_micro, tc.B, tc.T);
        if (!isfinite(s.ce) || !isfinite(s.aux) || !isfinite(s.grad_norm))
            fail("step %d: loss %g, aux %g, gradient norm %g is not finite; stopping before the update (the last "
                 "checkpoint in '%s' is the last good state); try a lower -l or -c", step + 1, s.ce, s.aux,
                 s.grad_norm, r.paths.out);
        float lr = lr_at(&tc, step);
        step_update(&m, &tc.opt, lr, s.grad_norm);
        double dt = now_seconds() - t0;
        step_times_add(&times, dt);
        double eta_s = step_times_mean(&times) * (tc.steps - step - 1);
        format_duration(eta, sizeof eta, eta_s);
        printf("step %5d/%d | loss %.4f | aux %.5f | lr %.2e | norm %.4f | %.1f ms | %.0f tok/s | eta %s\n",
               step + 1, tc.steps, s.ce, s.aux, lr, s.grad_norm, dt * 1e3, tokens_per_step / dt,
               eta);
        if (r.log) {
            fprintf(r.log, "{\"step\": %d, \"loss\": %.6f, \"aux\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, "
                           "\"ms\": %.2f, \"tok_per_s\": %.1f, \"eta_s\": %.3f}\n", step + 1, s.ce, s.aux, lr,
                    s.grad_norm, dt * 1e3, tokens_per_step / dt, eta_s);
            fflush(r.log);
        }
        double others;
        int threads = sharing_step(&share, &others);
        if (threads) printf("threads: %d of %d from here (other processes kept %.1f cores busy)\n", threads, share.most,
                            others);
        st->step = step + 1;
        if (tc.ckpt_every != CKPT_NEVER &&
            ((tc.ckpt_every && st->step % tc.ckpt_every == 0) || st->step == tc.steps)) {
            snprintf(ckpath, sizeof ckpath, "%s/ckpt_%08d.bin", r.paths.out, st->step);
            checkpoint_save(ckpath, &m, &tc, st);
            if (world.rank == 0) prune_checkpoints(r.paths.out, tc.keep);
            printf("saved %s\n", ckpath);
        }
    }
    if (!isnan(val_loss))
        printf("done: val loss %.4f against the unigram baseline's %.4f (%+.4f); at most %.0f%% dead tokens in a layer\n",
               val_loss, unigram, val_loss - unigram, 100 * most_dead);
    if (r.log) fclose(r.log);
    free(tokens);
    free(r.resume);
    if (r.have_tok) tokenizer_free(&r.tok);
    loader_free(&r.train);
    loader_free(&r.val);
    model_free(&m);
    world_finish();
    return 0;
}
#endif

// ============================================================================
// Machinery: the fast definitions behind the kernels' interface (see the top
// of the file) and the memory they run in. Nothing above depends on how they
// work. Each computes what its plain twin computes, in float32, with every
// sum in an order fixed by the shapes and never by the thread count, so the
// same seed and thread count give the same bits.
// ============================================================================

/* Zeroed memory for the big buffers (parameters, gradients, AdamW moments,
   activations), in 2 MiB-aligned blocks the kernel is asked to back with huge
   pages: 512 times fewer page faults when the buffers are first touched, and
   fewer TLB misses in the matmuls. The advice may be ignored; the memory is
   the same either way. */
static void *calloc_big_(size_t size, const char *src, int line) {
    size_t huge = (size_t)2 << 20, n = (size + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, n ? n : huge);
    if (!p) fail("out of memory allocating %.1f MiB; use a smaller model or batch [%s:%d]", size / 1048576.0, src, line);
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
    memset(p, 0, n);
    return p;
}

/* exp(x) in a form gcc vectorises (libm's expf is a call per element):
   x = n ln2 + r with |r| <= ln2/2, exp(r) by the degree-6 polynomial of
   Cephes' expf, 2^n written into the exponent bits. Within 2 ulp of libm on
   [-87, 88]; inputs are clamped to it (exp(-87) ~ 1.6e-38 stands in for 0),
   and NaN stays NaN. test_unipool holds it to libm. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    // 1.5 * 2^23: round(x / ln2) lands in the low bits
    float t = x * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts, for an exact product
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;  // n + 127, the biased exponent of 2^n
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Matrix multiply. Every product in the model is C (M,N) = [C +] A (M,K) B (K,N)
   with A and B read through strides, so one kernel serves the forward
   (out = inp W^T, W as nn.Linear stores it) and both backward products.
   It is the classic cache-blocked GEMM: a KC x NC block of B and the KC-deep
   slices of A are packed into contiguous panels, and a register tile of
   GM_MR x GM_NR outputs runs over each panel pair. The sum over K always runs
   in the same order and each output has one owner, so the result does not
   depend on the thread count. */

// Block sizes, sized for the caches named below; dev/bench
// times other choices (-DGM_KC=... overrides them).
#define GM_MR 6          // register tile: rows of A
#define GM_NR 16         // register tile: columns of B (two 8-float vectors)
#ifndef GM_KC
#define GM_KC 256        // depth of a block: a packed B panel (KC x NR) stays in L1
#endif
#ifndef GM_MC
#define GM_MC 144        // rows of A per block, a multiple of MR: a packed A block (MC x KC) in L2
#endif
#ifndef GM_NC
#define GM_NC 3072       // columns of B per block: a packed B block (KC x NC) stays in L3
#endif
#ifndef GM_KROW
#define GM_KROW 4096     // depth of a block when A is read in place: a B panel (KROW x NR) in L2
#endif
#ifndef GM_SMALL
#define GM_SMALL 192     // an operand meeting fewer rows or columns than this is read in place
#endif
#ifndef GM_TBUF
#define GM_TBUF 65536    // floats of a transposed output computed in a scratch (256 KiB, in L2)
#endif

typedef struct { const float *p; size_t rs, cs; } Mat;  // element (r, c) at p[r rs + c cs]

/* The register tile: acc (MR,NR) = sum over kc of column k of A times row k
   of B, with A's rows at a[i] (step ak along k) and B's rows step bk apart.
   Packed panels have ak = MR, bk = NR; an operand read in place has its own
   strides. With gcc or clang it is written in vector extensions: 12
   accumulators in registers, B rows loaded once, A values broadcast straight
   from memory (a broadcast from a register would take a slot of an FMA
   port). Elsewhere plain C computes the same sums in the same order.
   An operand read in place from memory can be fetched ahead, pa floats past
   A's rows (a line per row every 16 steps) or pb floats past B's rows (each
   step); 0 fetches nothing. */
#if defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));

static inline void gemm_tile(float acc_out[GM_MR][GM_NR], const float *const a[GM_MR], size_t ak,
                             const float *restrict b, size_t bk, int kc, size_t pa, size_t pb) {
    v8f acc[GM_MR][2];
    memset(acc, 0, sizeof acc);
#pragma GCC unroll 4
    for (int k = 0; k < kc; k++, b += bk) {
        if (pa && k % 16 == 0)
            for (int i = 0; i < GM_MR; i++) __builtin_prefetch(a[i] + k * ak + pa);
        if (pb) __builtin_prefetch(b + pb);
        v8f b0, b1;
        memcpy(&b0, b, sizeof b0);
        memcpy(&b1, b + 8, sizeof b1);
        for (int i = 0; i < GM_MR; i++) {
            float x = a[i][k * ak];
            v8f ai = {x, x, x, x, x, x, x, x};
            acc[i][0] += ai * b0;
            acc[i][1] += ai * b1;
        }
    }
    memcpy(acc_out, acc, sizeof acc);
}
#else
static inline void gemm_tile(float acc[GM_MR][GM_NR], const float *const a[GM_MR], size_t ak,
                             const float *restrict b, size_t bk, int kc, size_t pa, size_t pb) {
    (void)pa, (void)pb;
    memset(acc, 0, sizeof(float) * GM_MR * GM_NR);
    for (int k = 0; k < kc; k++, b += bk)
        for (int i = 0; i < GM_MR; i++)
            for (int j = 0; j < GM_NR; j++) acc[i][j] += a[i][k * ak] * b[j];
}
#endif

/* Asks for the C lines a tile will update while the tile is being computed:
   C is usually far bigger than the caches, and a tile's 6 row misses would
   otherwise stall the store after every product. */
static inline void tile_prefetch(const float *c, size_t crs, size_t ccs, int mr) {
#if defined(__GNUC__)
    for (int i = 0; i < mr; i++) {
        __builtin_prefetch(c + (size_t)i * crs, 1);
        __builtin_prefetch(c + (size_t)i * crs + (GM_NR - 1) * ccs, 1);
    }
#else
    (void)c, (void)crs, (void)ccs, (void)mr;
#endif
}

/* C rows r0.., columns c0.. [+]= the mr x nr corner of a tile; a full tile
   into contiguous rows goes as whole rows (the loop vectorises). */
static inline void tile_store(float *c, size_t crs, size_t ccs, float acc[GM_MR][GM_NR], int mr,
                              int nr, int add) {
    if (ccs == 1 && nr == GM_NR) {
        for (int i = 0; i < mr; i++) {
            float *restrict row = c + (size_t)i * crs;
            if (add)
                for (int j = 0; j < GM_NR; j++) row[j] += acc[i][j];
            else
                for (int j = 0; j < GM_NR; j++) row[j] = acc[i][j];
        }
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *x = c + (size_t)i * crs + (size_t)j * ccs;
            *x = add ? *x + acc[i][j] : acc[i][j];
        }
}

/* dst (n,m) = src (m,n)^T: dst[j dld + i] = src[i sld + j]. Element by
   element, a transposition costs a load and a store per float, about a
   quarter of a small expert's forward at exp. With gcc 12+ or clang, 8 x 8
   blocks are transposed in registers instead, in three rounds of shuffles
   (AVX's unpack, shuffle and 128-bit permute), along 8 rows of dst at a time
   so that the stores run along them (a small expert's rows of out are 4 KiB
   apart at exp: lines down a column would share one L1 set); the edges go
   element by element. */
#if defined(__GNUC__) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define GM_SHUFFLE
static inline void transpose8(float *dst, size_t dld, const float *src, size_t sld) {
    v8f x[8], u[8], w[8];
    for (int i = 0; i < 8; i++) memcpy(&x[i], src + (size_t)i * sld, sizeof x[i]);
    for (int i = 0; i < 8; i += 2) {  // rows 2p and 2p + 1 interleaved within each 4-float half
        u[i] = __builtin_shufflevector(x[i], x[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        u[i + 1] = __builtin_shufflevector(x[i], x[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)  // then two such pairs: 4 rows of one column in each half
        for (int h = 0; h < 2; h++) {
            w[i + h] = __builtin_shufflevector(u[i + h], u[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            w[i + h + 2] = __builtin_shufflevector(u[i + h], u[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    // w[h] holds columns c and c + 4 of rows 0-3 in its halves, w[h + 4] those of rows 4-7, with
    // c = 0, 2, 1, 3 for h = 0, 1, 2, 3: the halves joined are whole columns
    for (int h = 0; h < 4; h++) {
        int c = h == 1 ? 2 : h == 2 ? 1 : h;
        v8f lo = __builtin_shufflevector(w[h], w[h + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v8f hi = __builtin_shufflevector(w[h], w[h + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        memcpy(dst + (size_t)c * dld, &lo, sizeof lo);
        memcpy(dst + (size_t)(c + 4) * dld, &hi, sizeof hi);
    }
}
#endif
#endif

static void transpose(float *dst, size_t dld, const float *src, size_t sld, int m, int n) {
    int m8 = 0, n8 = 0;  // the rows and columns of src done in blocks
#ifdef GM_SHUFFLE
    m8 = m / 8 * 8, n8 = n / 8 * 8;
    for (int j = 0; j < n8; j += 8)
        for (int i = 0; i < m8; i += 8) transpose8(dst + (size_t)j * dld + i, dld, src + (size_t)i * sld + j, sld);
#endif
    for (int i = 0; i < m; i++)
        for (int j = i < m8 ? n8 : 0; j < n; j++) dst[(size_t)j * dld + i] = src[(size_t)i * sld + j];
}

// grow-only scratch for the packed panels
static float *gemm_buffer(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *buf = malloc_check(n * sizeof(float));
        *cap = n;
    }
    return *buf;
}

/* Packed panels are a cache line more than kc x width apart: a multiple of
   4 KiB apart, the lines a pack writes at one depth k (one per panel) would
   all fall in the same L1 set. */
static size_t panel_stride(int kc, int width) { return (size_t)kc * width + GM_NR; }

/* Packs rows [0, rows) and depth [k0, k0+kc) of X into panels of `width`
   rows, each k-major and zero-padded: panel i holds X(i*width + w, dk[k0 + k])
   at dst[i panel_stride + k width + w], X's column d read at dk[d] (at d if
   dk is NULL). The loop runs along whichever index of X is contiguous, so a
   transposed operand packs as fast as a plain one. */
static void pack_panels(float *dst, Mat X, const int *dk, int rows, int k0, int kc, int width) {
    int np = (rows + width - 1) / width;
    if (X.rs == 1) {  // columns of X are contiguous: each is cut into the panels' rows at depth k
#pragma omp parallel for schedule(static)
        for (int k = 0; k < kc; k++) {
            const float *col = X.p + (size_t)(dk ? dk[k0 + k] : k0 + k) * X.cs;
            for (int i = 0; i < np; i++) {
                float *d = dst + i * panel_stride(kc, width) + (size_t)k * width;
                int r0 = i * width, n = rows - r0 < width ? rows - r0 : width;
                for (int w = 0; w < n; w++) d[w] = col[r0 + w];
                for (int w = n; w < width; w++) d[w] = 0.0f;
            }
        }
    } else {
#pragma omp parallel for schedule(static)
        for (int i = 0; i < np; i++)
            for (int k = 0; k < kc; k++)
                for (int w = 0; w < width; w++) {
                    int r = i * width + w;
                    dst[i * panel_stride(kc, width) + (size_t)k * width + w] =
                        r < rows ? X.p[(size_t)r * X.rs + (size_t)(dk ? dk[k0 + k] : k0 + k) * X.cs]
                                 : 0.0f;
                }
    }
}

// whether a product runs on one thread: its parallel loops then run on the thread that calls it
static int gemm_alone(void) {
#ifdef _OPENMP
    return omp_in_parallel() || omp_get_max_threads() == 1;
#else
    return 1;
#endif
}

/* out (rows,cols) [+]= A (rows,depth) B (depth,cols), element (r, c) of out at out[r ors + c ocs].
   Blocks: KC-deep slices of A and B; B in blocks of NC columns (packed into
   NR-wide panels, read from L3), A in blocks of MC rows (packed into MR-high
   panels, kept in L2 by the thread that works on that block). An operand
   that meets fewer than GM_SMALL rows or columns of the other is read in
   place instead (packing it would cost as much as the product): B when rows is
   small and its rows are contiguous (and not 4 KiB apart), A when cols is small
   and its rows are. Such an operand comes from memory, so the tiles fetch
   ahead what the next one will read: the next B panel, and the next rows of
   A when those are short (the hardware prefetcher follows a row only after
   a few lines of it). With few rows on the other side, a line serves only a
   few FMAs and the loads must not wait. This is the case of UniPool's
   experts, a few dozen rows each per layer; for them fc2's weights, whose
   rows are F floats apart, are packed in blocks of whole rows, which the
   hardware prefetcher follows.
   The depth index d may go through an index, A's column at adk[d] and B's
   row at bdk[d] (NULL: at d), so that rows can lie anywhere (a pooled
   expert's, across its layers). Such an operand is always packed, in blocks
   of the sizes it would have otherwise: the sums are those of its rows
   gathered. */
static void gemm(float *out, size_t ors, size_t ocs, Mat A, Mat B, const int *adk, const int *bdk,
                 int rows, int cols, int depth, int add) {
    // per thread: experts run one per thread (experts_matmul_fast)
    static _Thread_local float *apack, *bpack, *tbuf;
    static _Thread_local size_t acap, bcap, tcap;
    if (rows <= 0 || cols <= 0) return;  // an empty product: nothing to write
    // An output stored transposed (ors 1: each of its columns is contiguous), as an expert's forward
    // writes out^T = W inp^T, puts a tile's 16 columns on 16 lines ocs floats apart; 4 KiB apart
    // (ocs 1024) they share one set of the L1 cache and evict each other. A small one is computed
    // into a row-major scratch and transposed once: the same sums in the same order.
    if (ors == 1 && ocs != 1 && (size_t)rows * cols <= GM_TBUF) {
        float *t = gemm_buffer(&tbuf, &tcap, (size_t)rows * cols);  // (rows,cols)
        if (add) transpose(t, (size_t)cols, out, ocs, cols, rows);
        gemm(t, (size_t)cols, 1, A, B, adk, bdk, rows, cols, depth, add);
        transpose(out, ocs, t, (size_t)cols, rows, cols);
        return;
    }
    // B's rows read in place fall in the L1 sets their stride leaves them. A multiple of 4 KiB
    // apart, they all share one set: such a B is packed. A multiple of 256 bytes apart, they share
    // at most 16 of the 64 sets, which hold 128 lines, half of a KC-deep panel: the panel evicts
    // itself before the next rows of A come to use it. Such a B is packed when the product runs on
    // one thread (an expert beside another: UniPool's fc1 d input at exp, 1.4x); split over
    // threads, the packing and its barrier cost more than the misses (exp's wq d weight, 0.9x).
    // Packed or read in place, its blocks are GM_KC deep, so the sums do not depend on the threads.
    int few = rows < GM_SMALL;  // few rows of A
    // whether each operand's shape reads it in place, which sizes the blocks; an indexed one is
    // packed all the same (a_read, and inplace below)
    int a_direct = A.cs == 1 && cols < GM_SMALL, b_rows = B.cs == 1 && few && B.rs % 1024 != 0;
    int b_direct = b_rows && !(B.rs % 64 == 0 && gemm_alone());
    int a_read = a_direct && !adk;
    // A blocks of at most MC rows, all of about the same size (mcp panels of MR rows), so that the
    // threads' shares of the tiles are even; a few rows are one block and the threads split B
    int mp = (rows + GM_MR - 1) / GM_MR, nmc = (mp + GM_MC / GM_MR - 1) / (GM_MC / GM_MR);
    int mcp = (mp + nmc - 1) / nmc;
    // An A read in place goes whole rows at a time, up to KROW (long runs from memory, which the
    // prefetcher follows); otherwise a block is KC deep. With few rows of A, B's block is read from
    // memory for little work, so it is the prefetcher's to follow too: packed, whole rows of up to
    // NC (a weight's rows are then one run); read in place, panels a quarter as wide, sized for L2.
    int kcb = a_direct ? (depth < GM_KROW ? depth : GM_KROW) : GM_KC;
    int ncb = few && b_direct ? GM_NC / 4 : GM_NC;
    ncb = cols < ncb ? (cols + GM_NR - 1) / GM_NR * GM_NR : ncb;
    float *ap = a_read ? NULL : gemm_buffer(&apack, &acap, (size_t)mp * panel_stride(kcb, GM_MR));
    float *bp = gemm_buffer(&bpack, &bcap, (size_t)(ncb / GM_NR + 1) * panel_stride(kcb, GM_NR));
    for (int n0 = 0; n0 < cols; n0 += ncb) {
        int nc = cols - n0 < ncb ? cols - n0 : ncb, np = (nc + GM_NR - 1) / GM_NR;
        // B panels read in place; the rest are packed
        int inplace = b_direct && !bdk ? nc / GM_NR : 0;
        // B's columns are its panels' rows
        Mat Bt = {B.p + (size_t)(n0 + inplace * GM_NR) * B.cs, B.cs, B.rs};
        for (int k0 = 0; k0 < depth; k0 += kcb) {
            int kc = depth - k0 < kcb ? depth - k0 : kcb, accumulate = add || k0 > 0;
            if (inplace < np) pack_panels(bp, Bt, bdk, nc - inplace * GM_NR, k0, kc, GM_NR);
            if (!a_read) pack_panels(ap, A, adk, rows, k0, kc, GM_MR);
            // tiles: blocks of A rows outermost, so a thread
            // keeps its A block in L2 across all B panels
#pragma omp parallel for schedule(static)
            for (int t = 0; t < nmc * np; t++) {
                int mb = t / np, j = t % np, c0 = n0 + j * GM_NR,
                    nr = n0 + nc - c0 < GM_NR ? n0 + nc - c0 : GM_NR;
                const float *b = j < inplace ? B.p + (size_t)k0 * B.rs + c0
                                             : bp + (j - inplace) * panel_stride(kc, GM_NR);
                size_t bk = j < inplace ? B.rs : GM_NR;
                int i1 = (mb + 1) * mcp < mp ? (mb + 1) * mcp : mp;
                for (int i = mb * mcp; i < i1; i++) {
                    int r0 = i * GM_MR, mr = rows - r0 < GM_MR ? rows - r0 : GM_MR;
                    const float *a[GM_MR];
                    float acc[GM_MR][GM_NR];
                    tile_prefetch(out + (size_t)r0 * ors + (size_t)c0 * ocs, ors, ocs, mr);
                    // fetched ahead: the next panel, if read in
                    // place too, and the next tile's rows of
                    // an A read in place, if they are shorter than a page (4 KiB). Both packed, the
                    // call has constants and its copy of the tile loop no checks.
                    size_t pb = j + 1 < inplace ? GM_NR : 0;
                    if (a_read) {  // A's rows past the last repeat it; their sums are dropped
                        for (int ii = 0; ii < GM_MR; ii++)
                            a[ii] = A.p + (size_t)(r0 + (ii < mr ? ii : mr - 1)) * A.rs + k0;
                        size_t pa = A.rs <= 1024 && r0 + 2 * GM_MR <= rows ? GM_MR * A.rs : 0;
                        gemm_tile(acc, a, 1, b, bk, kc, pa, pb);
                    } else {
                        for (int ii = 0; ii < GM_MR; ii++)
                            a[ii] = ap + i * panel_stride(kc, GM_MR) + ii;
                        if (j < inplace)
                            gemm_tile(acc, a, GM_MR, b, bk, kc, 0, pb);
                        else
                            gemm_tile(acc, a, GM_MR, b, GM_NR, kc, 0, 0);
                    }
                    tile_store(out + (size_t)r0 * ors + (size_t)c0 * ocs, ors, ocs, acc, mr, nr,
                               accumulate);
                }
            }
        }
    }
}

/* out (rows,n_out) = inp (rows,n_in) W^T, W (n_out,n_in): the forward of a linear map. A few
   rows (decoding one token) are dot products straight off W. Up to
   GM_SMALL rows (an expert's share of a batch) run as out^T = W inp^T, so
   that W, the big operand, is read in place rather than packed. */
KERNEL_DEF void matmul_forward_fast(float *out, const float *inp, const float *w, int rows,
                                    int n_in, int n_out) {
    if (rows >= GM_SMALL) {
        gemm(out, (size_t)n_out, 1, (Mat){inp, (size_t)n_in, 1}, (Mat){w, 1, (size_t)n_in}, NULL,
             NULL, rows, n_out, n_in, 0);
    } else if (rows >= GM_MR) {
        gemm(out, 1, (size_t)n_out, (Mat){w, (size_t)n_in, 1}, (Mat){inp, 1, (size_t)n_in}, NULL,
             NULL, n_out, rows, n_in, 0);
    } else {
#pragma omp parallel for schedule(static)
        for (int o = 0; o < n_out; o++)
            for (int r = 0; r < rows; r++)
                out[(size_t)r * n_out + o] =
                    dot(inp + (size_t)r * n_in, w + (size_t)o * n_in, n_in);
    }
}

/* dW (n_out,n_in) += sum over r of dout[dr]^T inp[ir] (weight_grad_ref's
   math), the rows' depth index through drows and irows. With few input
   features (n_in < GM_SMALL) it runs as dW^T = inp^T dout, so that dout, the
   big operand (the logits of a small model), is read in place rather than
   packed. */
KERNEL_DEF void weight_grad_fast(float *dw, const float *dout, const int *drows, const float *inp,
                                 const int *irows, int rows, int n_in, int n_out) {
    if (n_in < GM_SMALL && n_out >= GM_SMALL)
        gemm(dw, 1, (size_t)n_in, (Mat){inp, 1, (size_t)n_in}, (Mat){dout, (size_t)n_out, 1}, irows,
             drows, n_in, n_out, rows, 1);
    else
        gemm(dw, (size_t)n_in, 1, (Mat){dout, 1, (size_t)n_out}, (Mat){inp, (size_t)n_in, 1}, drows,
             irows, n_out, n_in, rows, 1);
}

// dinp (rows,n_in) += dout (rows,n_out) W; dW (n_out,n_in) += dout^T inp; either may be NULL.
KERNEL_DEF void matmul_backward_fast(float *dinp, float *dw, const float *dout, const float *inp,
                                     const float *w, int rows, int n_in, int n_out) {
    if (dinp)
        gemm(dinp, (size_t)n_in, 1, (Mat){dout, (size_t)n_out, 1}, (Mat){w, (size_t)n_in, 1}, NULL,
             NULL, rows, n_in, n_out, 1);
    if (dw) weight_grad_fast(dw, dout, NULL, inp, NULL, rows, n_in, n_out);
}

/* Causal attention with grouped key/value heads; query head h reads kv head
   h / (NH/NKV). Neither pass stores the T x T matrix: the work goes in
   blocks of ATT_QB queries, whose scores Q K^T / sqrt(hd) (ATT_QB x keys)
   live in a scratch block; the forward keeps each row's output and
   logsumexp, the backward recomputes P = exp(scores - lse) and uses
   dscores = P (dO V^T - rowsum(dO O)). Every product is a register-tiled matmul
   (gemm_tile). Tasks are (batch, kv head) pairs: each transposes its K and V
   once and alone writes their gradients. The queries may start at position
   t0 (KV-cache decoding, B = 1): keys and values then hold [0, t0 + T). */

#define ATT_QB 48  // queries per block, a multiple of GM_MR

/* c (m,n) [+]= a (m,k) b (k,n), one thread: row r of a at a + r a_rs with
   step a_ks along k, row k of b at b + k b_ks, row r of c at c + r c_rs.
   A ragged last column panel is copied into tail (k x GM_NR) first. */
static void tile_gemm(float *c, size_t c_rs, Mat A, Mat Bk, int m, int n, int k, int add,
                      float *tail) {
    const float *a = A.p, *b = Bk.p;
    size_t a_rs = A.rs, a_ks = A.cs, b_ks = Bk.rs;
    for (int c0 = 0; c0 < n; c0 += GM_NR) {
        int nr = n - c0 < GM_NR ? n - c0 : GM_NR;
        const float *bp = b + c0;
        size_t bk = b_ks;
        if (nr < GM_NR) {
            for (int kk = 0; kk < k; kk++)
                for (int j = 0; j < GM_NR; j++)
                    tail[(size_t)kk * GM_NR + j] = j < nr ? b[(size_t)kk * b_ks + c0 + j] : 0.0f;
            bp = tail, bk = GM_NR;
        }
        for (int r0 = 0; r0 < m; r0 += GM_MR) {
            int mr = m - r0 < GM_MR ? m - r0 : GM_MR;
            const float *ap[GM_MR];
            for (int i = 0; i < GM_MR; i++) ap[i] = a + (size_t)(r0 + (i < mr ? i : mr - 1)) * a_rs;
            float acc[GM_MR][GM_NR];
            gemm_tile(acc, ap, a_ks, bp, bk, k, 0, 0);
            tile_store(c + (size_t)r0 * c_rs + c0, c_rs, 1, acc, mr, nr, add);
        }
    }
}

/* A grow-only scratch buffer per thread: attention runs every layer, and a
   fresh malloc of this size would be fresh pages from the kernel each time. */
static float *thread_scratch(size_t n) {
    static _Thread_local float *buf;
    static _Thread_local size_t cap;
    if (n > cap) {
        free(buf);
        buf = malloc_check(n * sizeof(float));
        cap = n;
    }
    return buf;
}

/* Row stride of the blocks over n keys (and of the copies of K and V, n =
   hd): n rounded up to whole panels (a panel row is one 64-byte line), and
   to an odd number of them, so that a panel's rows fall in every L1 set. A
   stride of a power-of-two lines puts them in a few sets, where they evict
   each other: K and V as the model stores them are NKV hd floats apart,
   1 KiB at 182M, and a T = 1024 block's rows 4 KiB. */
static size_t att_ld(int n) {
    size_t panels = ((size_t)n + GM_NR - 1) / GM_NR;
    return (panels | 1) * GM_NR;
}

// y (n,ld) = x (n,hd)
static void att_copy(float *y, size_t ld, const float *x, size_t stride, int n, int hd) {
    for (int s = 0; s < n; s++)
        memcpy(y + (size_t)s * ld, x + (size_t)s * stride, (size_t)hd * sizeof(float));
}

// xt (hd,ld) = x (n,hd)^T
static void att_transpose(float *xt, size_t ld, const float *x, size_t stride, int n, int hd) {
    for (int s = 0; s < n; s++)
        for (int i = 0; i < hd; i++) xt[(size_t)i * ld + s] = x[(size_t)s * stride + i];
}

/* Scores of queries q0 .. q0+m-1 (absolute positions pos0 + q0 + r) against
   keys 0 .. n-1, scaled by 1/sqrt(hd); keys past a query's position are
   -inf. Q's rows are q.rs apart; K^T (hd, n) has rows ld apart, as s has. */
static void att_block_scores(float *s, size_t ld, Mat q, const float *kt, int m, int n, int hd,
                             int pos, float *tail) {
    float scale = 1.0f / sqrtf((float)hd);
    tile_gemm(s, ld, q, (Mat){kt, ld, 1}, m, n, hd, 0, tail);
    for (int r = 0; r < m; r++)
        for (int j = 0; j < n; j++)
            s[(size_t)r * ld + j] = j <= pos + r ? s[(size_t)r * ld + j] * scale : -INFINITY;
}

KERNEL_DEF void attention_forward_fast(float *out, float *lse, const Attention *at) {
    // out (B,T,NH*hd), lse (B,T,NH), q (B,T,NH*hd), k, v (B,t0+T,NKV*hd)
    int B = at->B, T = at->T, t0 = at->t0, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV, nkeys = t0 + T;
    size_t ld = att_ld(nkeys), lv = att_ld(hd);
#pragma omp parallel
    {
        // transposed K (hd,ld) with zero padding, V
        // (nkeys,hd) at row stride lv, a block of scores, the
        // tail panel of tile_gemm
        float *kt = thread_scratch(((size_t)hd + ATT_QB + GM_NR) * ld + (size_t)nkeys * lv +
                                   (size_t)hd * GM_NR);
        float *vb = kt + (size_t)hd * ld, *sb = vb + (size_t)nkeys * lv,
              *tail = sb + (size_t)ATT_QB * ld;
        memset(kt, 0, (size_t)hd * ld * sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int kh = 0; kh < NKV; kh++) {
                att_transpose(kt, ld, k + (size_t)b * nkeys * ks + kh * hd, ks, nkeys, hd);
                att_copy(vb, lv, v + (size_t)b * nkeys * ks + kh * hd, ks, nkeys, hd);
                for (int h = kh * grp; h < (kh + 1) * grp; h++)
                    for (int q0 = 0; q0 < T; q0 += ATT_QB) {
                        // keys the block's last query sees
                        int m = T - q0 < ATT_QB ? T - q0 : ATT_QB, n = t0 + q0 + m;
                        size_t qo = ((size_t)b * T + q0) * qs + h * hd;
                        att_block_scores(sb, ld, (Mat){q + qo, qs, 1}, kt, m, n, hd, t0 + q0, tail);
                        for (int r = 0; r < m; r++) {  // softmax of each row, in place
                            float *p = sb + (size_t)r * ld, mx = max_of(p, n);
                            double sum = sum_exp(p, p, n, mx);
                            float inv = (float)(1.0 / sum);
                            for (int j = 0; j < n; j++) p[j] *= inv;
                            lse[((size_t)b * T + q0 + r) * NH + h] = mx + (float)log(sum);
                        }
                        tile_gemm(out + qo, qs, (Mat){sb, ld, 1}, (Mat){vb, lv, 1}, m, hd, n, 0,
                                  tail);
                    }
            }
    }
}

KERNEL_DEF void attention_backward_fast(float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const Attention *at) {
    // dq (B,T,NH*hd) +=, dk, dv (B,T,NKV*hd) +=, dout, out (B,T,NH*hd), lse (B,T,NH)
    int B = at->B, T = at->T, NH = at->NH, NKV = at->NKV, hd = at->hd;
    const float *q = at->q, *k = at->k, *v = at->v;
    float scale = 1.0f / sqrtf((float)hd);
    int qs = NH * hd, ks = NKV * hd, grp = NH / NKV;
    size_t ld = att_ld(T), hl = (size_t)hd * ld, lv = att_ld(hd);
#pragma omp parallel
    {
        // transposed K and V, the transposed gradients of
        // K and V (hd,ld), a block of P and of dscores,
        // K (T,hd) at row stride lv
        float *kt = thread_scratch(4 * hl + 2 * (size_t)ATT_QB * ld + (size_t)T * lv +
                                   ((size_t)ld + hd + ATT_QB) * GM_NR);
        float *vt = kt + hl, *dkt = vt + hl, *dvt = dkt + hl, *pb = dvt + hl,
              *db = pb + (size_t)ATT_QB * ld;
        float *kb = db + (size_t)ATT_QB * ld, *tail = kb + (size_t)T * lv;
        memset(kt, 0, 2 * hl * sizeof(float));  // the zero padding of K^T and V^T
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int kh = 0; kh < NKV; kh++) {
                size_t ko = (size_t)b * T * ks + kh * hd;
                att_transpose(kt, ld, k + ko, ks, T, hd);
                att_transpose(vt, ld, v + ko, ks, T, hd);
                att_copy(kb, lv, k + ko, ks, T, hd);
                memset(dkt, 0, 2 * hl * sizeof(float));
                for (int h = kh * grp; h < (kh + 1) * grp; h++)
                    for (int q0 = 0; q0 < T; q0 += ATT_QB) {
                        int m = T - q0 < ATT_QB ? T - q0 : ATT_QB, n = q0 + m;
                        size_t qo = ((size_t)b * T + q0) * qs + h * hd;
                        att_block_scores(pb, ld, (Mat){q + qo, qs, 1}, kt, m, n, hd, q0, tail);
                        // dP = dO V^T
                        tile_gemm(db, ld, (Mat){dout + qo, qs, 1}, (Mat){vt, ld, 1}, m, n, hd, 0,
                                  tail);
                        for (int r = 0; r < m; r++) {
                            size_t row = (size_t)b * T + q0 + r;
                            size_t ro = qo + (size_t)r * qs;
                            float D = dot(dout + ro, out + ro, hd);
                            float l = lse[row * NH + h];
                            float *p = pb + (size_t)r * ld, *d = db + (size_t)r * ld;
                            for (int j = 0; j < n; j++) {
                                p[j] = exp_fast(p[j] - l);       // masked: exp_fast(-inf) ~ 1.6e-38
                                d[j] = p[j] * (d[j] - D) * scale;  // dscores
                            }
                        }
                        // dQ += dscores K, dK^T += Q^T dscores, dV^T += dO^T P
                        tile_gemm(dq + qo, qs, (Mat){db, ld, 1}, (Mat){kb, lv, 1}, m, hd, n, 1,
                                  tail);
                        tile_gemm(dkt, ld, (Mat){q + qo, 1, qs}, (Mat){db, ld, 1}, hd, n, m, 1,
                                  tail);
                        tile_gemm(dvt, ld, (Mat){dout + qo, 1, qs}, (Mat){pb, ld, 1}, hd, n, m, 1,
                                  tail);
                    }
                for (int s = 0; s < T; s++)
                    for (int i = 0; i < hd; i++) {
                        dk[ko + (size_t)s * ks + i] += dkt[(size_t)i * ld + s];
                        dv[ko + (size_t)s * ks + i] += dvt[(size_t)i * ld + s];
                    }
            }
    }
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Threads beside other processes. A parallel loop ends at a barrier that
   waits for its slowest thread. Beside a busy process one thread keeps losing
   its core to it, every barrier waits for that thread, and the thread that
   came first spins there (libgomp spins a while before it sleeps), holding the
   other core: 2 threads run several times slower than 1. Sleeping at once
   instead (OMP_WAIT_POLICY=passive) makes each of a step's parallel regions
   wake its threads, which on a virtual machine costs more than a free
   machine's second core gains. So the program looks: over each window of at
   least SHARING_WINDOW seconds it counts the CPU time the other processes
   took (the busy time of /proc/stat less this process's own) and runs the
   next step on the cores they left, at least 1, at most the count it started
   with. No sum depends on the thread count (see the top of this section), so
   the results are the same bits with any count. It adapts only when the user
   has not chosen a count (-T or OMP_NUM_THREADS), and not where /proc/stat
   cannot be read. */
#define SHARING_WINDOW 0.5  // seconds; /proc/stat counts in ticks of 10 ms

// CPU seconds: busy time of all cores since boot, and this process's own; 1 if /proc/stat was read.
static int cpu_times(double *busy, double *own) {
    unsigned long long user, nice, sys, idle, iowait, irq, softirq;
    FILE *f = fopen("/proc/stat", "r");
    int ok = f && fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &sys, &idle, &iowait, &irq,
                         &softirq) == 7;
    if (f) fclose(f);
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    *own = t.tv_sec + t.tv_nsec * 1e-9;
    *busy = ok ? (double)(user + nice + sys + irq + softirq) / (double)sysconf(_SC_CLK_TCK) : 0.0;
    return ok;
}

static void sharing_start(Sharing *s, int adapt) {
    s->now = max_threads();
    s->wall = now_seconds();
    s->most = cpu_times(&s->busy, &s->own) && adapt ? s->now : 0;
}

// The threads to use from the next step on, beside others
// (cores the other processes kept busy in the window).
static int sharing_threads(int most, double others) {
    int n = most - (int)lround(others);
    return n < 1 ? 1 : n > most ? most : n;
}

static int sharing_step(Sharing *s, double *others) {
    double wall = now_seconds(), busy, own;
    if (s->most < 2 || wall - s->wall < SHARING_WINDOW || !cpu_times(&busy, &own)) return 0;
    *others = ((busy - s->busy) - (own - s->own)) / (wall - s->wall);
    s->wall = wall, s->busy = busy, s->own = own;
    int n = sharing_threads(s->most, *others);
    if (n == s->now) return 0;
    s->now = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    return n;
}

/* A layer's expert products (experts_matmul_ref: expert_matmul for each
   expert) scheduled on the threads. Experts with more rows than a thread's
   share of the layer's run in turn, each on all threads; the rest run one per
   thread, largest first, which keeps the threads about equally busy. Split
   across threads, a product of a few dozen rows (a UniPool expert's tokens of
   a layer) would wait at dozens of barriers for microseconds of work each. A
   product computes the same sums whichever threads run it, so the result
   does not depend on them. */
KERNEL_DEF void experts_matmul_fast(float *y, const float *x, const float *w, const int *offset,
                                    int E, int n_in, int n_out, int backward) {
    int by_size[E];  // experts by rows, descending (insertion sort: E is at most a few hundred)
    for (int e = 0; e < E; e++) {
        int i = e, ne = offset[e + 1] - offset[e];
        for (; i > 0 && offset[by_size[i - 1] + 1] - offset[by_size[i - 1]] < ne; i--)
            by_size[i] = by_size[i - 1];
        by_size[i] = e;
    }
    int share = (offset[E] + max_threads() - 1) / max_threads();  // rows per thread
    // the big ones outside any parallel region: inside one, even an inactive one (if false), the
    // GEMM's own regions would be nested ones, which cost more to start
    for (int i = 0; i < E; i++)
        if (offset[by_size[i] + 1] - offset[by_size[i]] > share)
            expert_matmul(y, x, w, offset, by_size[i], n_in, n_out, backward);
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < E; i++) {
        int ne = offset[by_size[i] + 1] - offset[by_size[i]];
        if (ne > 0 && ne <= share)
            expert_matmul(y, x, w, offset, by_size[i], n_in, n_out, backward);
    }
}
