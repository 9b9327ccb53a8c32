/*
dev/bench/bench.c: speed and memory figures for this machine (never a test).

  ./bench peak                 fp32 FMA peak: a register-only FMA loop, 1 thread and all threads
  ./bench tile                 the GEMM's register tile alone, panels in L1, one thread: its share of the peak
  ./bench bandwidth            memory read bandwidth, all threads (this VM's neighbours move it by half)
  ./bench gemm [WORD...]       GEMM GFLOP/s on the 182M model's and the exp preset's shapes, forward and both
                               backward products, experts as training runs them, the memory read bandwidth;
                               beside each, OpenBLAS's sgemm when built with it (-DBENCH_OPENBLAS -lopenblas);
                               with WORDs, only the shapes whose names hold one of them (e.g. 182M, lm_head)
  ./bench step [-vocab V] [train flags]
                               training steps on random tokens: ms/step, tokens/s, GFLOP/s, MFU, memory,
                               and the share of the step in each part (head, attention, routers, experts,
                               AdamW)
                               e.g. ./bench step -p 182m -o layer -b 4 -t 1024 -n 3

MFU counts training_flops (train_unipool.c) per token: 6 x the active matmul
parameters (attention, the router, K experts per layer, the LM head; not the
embedding lookup or norms) plus causal attention, 6 x L x T x C (forward QK
and AV, each 2 T/2 C flops, times 3 for the backward), against the peak that
`peak` measures with all threads.
*/
#define UNIPOOL_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"
/* The share of a step in each part (train_unipool.c's PART_ enum): the time from one STEP_PART
   mark to the next goes to the part the first one names; bench_part(-1) ends a step. */
static void bench_part(int part);
#define STEP_PART(part) bench_part(part)
#include "../../train_unipool.c"

static double part_seconds[NUM_PARTS], part_t0;
static int part_now = -1;
static void bench_part(int part) {
    double now = now_seconds();
    if (part_now >= 0) part_seconds[part_now] += now - part_t0;
    part_now = part, part_t0 = now;
}

#include <sys/resource.h>
#ifdef BENCH_OPENBLAS
#include <cblas.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

// 12 independent FMA chains per thread (named variables: an array would live in memory), enough to fill
// two FMA pipes of 4-cycle latency; the empty asm keeps the compiler from folding the loop away.
#define FMA12(X) X(a0) X(a1) X(a2) X(a3) X(a4) X(a5) X(a6) X(a7) X(a8) X(a9) X(a10) X(a11)
static double fma_peak(int threads) {
    long n = 100000000;
    double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
    {
        v8 m = (v8){0} + 0.9999f, c = (v8){0} + 1e-7f;
#define INIT(x) v8 x = m * 0.5f;
        FMA12(INIT)
#define STEP(x) x = x * m + c;
        for (long r = 0; r < n; r++) {
            FMA12(STEP)
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                             "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
        }
        v8 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
        if (s[0] == 12345.0f) printf("%g", s[0]);  // keep the result alive
    }
    return 2.0 * 8 * 12 * n * threads / (now_seconds() - t0) / 1e9;
}

static double peak_all(void) {  // the best of five: a peak is a maximum, noise only lowers it
    double p = 0.0;
    for (int i = 0; i < 5; i++) p = fmax(p, fma_peak(max_threads()));
    return p;
}

// The peak that MFU is measured against: BENCH_PEAK (GFLOP/s) when set, so that every figure of one run of
// dev/bench/run.sh shares one peak (this VM's speed drifts by tens of percent), else measured now.
static double peak_for_mfu(void) {
    const char *e = getenv("BENCH_PEAK");
    return e && atof(e) > 0 ? atof(e) : peak_all();
}

/* Read bandwidth from memory, GB/s, all threads: a sum over a buffer far
   bigger than the caches, 4 vector accumulators per thread; the best of five. */
static double read_bandwidth(void) {
    size_t n = (size_t)1 << 28;  // 1 GiB of floats
    const v8 *a = calloc_big(n * sizeof(float));  // zeros: the sum is of no interest, only its reads
    double best = 0.0, keep = 0.0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_seconds();
#pragma omp parallel reduction(+ : keep)
        {
            v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
#pragma omp for schedule(static)
            for (size_t i = 0; i < n / 32; i++)  // 4 vectors, 128 bytes
                s0 += a[4 * i], s1 += a[4 * i + 1], s2 += a[4 * i + 2], s3 += a[4 * i + 3];
            keep += (s0 + s1 + s2 + s3)[0];
        }
        best = fmax(best, n * sizeof(float) / (now_seconds() - t0) / 1e9);
    }
    if (keep == 1.0) printf("%g", keep);  // keep the sums alive
    free((void *)a);
    return best;
}

// Uniform values in [-1, 1) from a hash of the index (gigabytes of them: rng_normal would take a minute).
static void fill(float *p, size_t n, uint64_t seed) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) p[i] = (float)(((i + seed) * 0x9e3779b97f4a7c15ULL) >> 40) / 8388608.0f - 1.0f;
}

/* The register tile alone (gemm_tile, as gemm calls it on packed panels), one
   thread, its panels in L1: a 6 x GM_KC A panel and a GM_KC x 16 B panel, the
   best of five runs of 200,000 tiles. What it reaches against the one-thread
   peak is the ceiling of every product; what a product loses below it is in
   feeding the tile from L2 and memory. */
static double tile_rate(void) {
    static float ap[GM_MR * GM_KC], bp[GM_KC * GM_NR];
    fill(ap, GM_MR * GM_KC, 5), fill(bp, GM_KC * GM_NR, 6);
    const float *a[GM_MR];
    for (int i = 0; i < GM_MR; i++) a[i] = ap + i;
    float acc[GM_MR][GM_NR], keep = 0.0f;
    double best = 0.0;
    long n = 200000;
    for (int r = 0; r < 5; r++) {
        double t0 = now_seconds();
        for (long t = 0; t < n; t++) {
            gemm_tile(acc, a, GM_MR, bp, GM_NR, GM_KC, 0, 0);
            keep += acc[t % GM_MR][t % GM_NR];
        }
        best = fmax(best, 2.0 * GM_MR * GM_NR * GM_KC * n / (now_seconds() - t0) / 1e9);
    }
    if (keep == 1.0f) printf("%g", keep);  // keep the tiles alive
    return best;
}

/* The products of the 182M model (B*T = 4096 and 1024) and of the exp preset
   (B 16 T 256, V 8192), each as training runs it. Experts run as a layer's
   set (experts_matmul_fast: E experts of M rows each, one per thread when they are
   small); a plain product (attention, LM head) is a set of one, which runs on
   all threads. Each weight gradient is one product over its rows of all the
   layers that share it (pool_weight_grads: M for vanilla, L M for UniPool's
   one pool). An expert's weights come from memory for M rows in the forward
   and d input: at most M * bandwidth / 2 FLOP/s (2 M flops per 4-byte
   weight), printed where it is below the peak. Built with OpenBLAS (make
   bench does so when Debian's libopenblas-dev is installed), each product is
   also timed as cblas_sgemm, one call per expert: what a program that links
   the library would run. */
typedef struct { const char *what; int M, K, N, E, layers; } GemmShape;

static const GemmShape gemm_shapes[] = {
    {"182M wq/wo 4096x768x768", 4096, 768, 768, 1, 1},           {"182M wk/wv 4096x768x256", 4096, 768, 256, 1, 1},
    {"182M fc1 vanilla 8 x 512x768x6144", 512, 768, 6144, 8, 1}, {"182M fc2 vanilla 8 x 512x3072x768", 512, 3072, 768, 8, 1},
    {"182M fc1 vanilla 8 x 128x768x6144", 128, 768, 6144, 8, 1}, {"182M fc2 vanilla 8 x 128x3072x768", 128, 3072, 768, 8, 1},
    {"182M fc1 UniPool 96 x 43x768x6144", 43, 768, 6144, 96, 12}, {"182M fc2 UniPool 96 x 43x3072x768", 43, 3072, 768, 96, 12},
    {"182M fc1 UniPool 96 x 11x768x6144", 11, 768, 6144, 96, 12}, {"182M fc2 UniPool 96 x 11x3072x768", 11, 3072, 768, 96, 12},
    {"182M lm_head 4096x768x51200", 4096, 768, 51200, 1, 1},     {"182M lm_head 1024x768x51200", 1024, 768, 51200, 1, 1},
    {"exp wq/wo 4096x128x128", 4096, 128, 128, 1, 1},            {"exp wk/wv 4096x128x64", 4096, 128, 64, 1, 1},
    {"exp fc1 vanilla 8 x 512x128x1024", 512, 128, 1024, 8, 1},  {"exp fc2 vanilla 8 x 512x512x128", 512, 512, 128, 8, 1},
    {"exp fc1 UniPool 64 x 64x128x1024", 64, 128, 1024, 64, 8},  {"exp fc2 UniPool 64 x 64x512x128", 64, 512, 128, 64, 8},
    {"exp lm_head 4096x128x8192", 4096, 128, 8192, 1, 1},
};

/* One shape's three products, best of 3, GFLOP/s: y = x w^T (forward), dx = y w
   (d input), dw += gy^T gx (d weight, over R rows of every layer sharing it). */
static void gemm_rates(const GemmShape *g, int blas, float *w, float *dw, float *x, float *y, float *dx,
                       const float *gx, const float *gy, double best[3]) {
    int M = g->M, K = g->K, N = g->N, E = g->E, R = M * g->layers;
    int offset[E + 1];
    for (int e = 0; e <= E; e++) offset[e] = e * M;
    double fl = 2.0 * M * K * N * E, flw = 2.0 * R * K * N * E;
    best[0] = best[1] = best[2] = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        double t[4];
        t[0] = now_seconds();
        if (!blas) {
            experts_matmul_fast(y, x, w, offset, E, K, N, 0);
            t[1] = now_seconds();
            experts_matmul_fast(dx, y, w, offset, E, K, N, 1);
            t[2] = now_seconds();
            for (int e = 0; e < E; e++)
                matmul_backward(NULL, dw + (size_t)e * N * K, gy + (size_t)e * R * N, gx + (size_t)e * R * K, NULL, R, K, N);
        } else {
#ifdef BENCH_OPENBLAS
            for (int e = 0; e < E; e++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x + (size_t)e * M * K, K,
                            w + (size_t)e * N * K, K, 0.0f, y + (size_t)e * M * N, N);
            t[1] = now_seconds();
            for (int e = 0; e < E; e++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, K, N, 1.0f, y + (size_t)e * M * N, N,
                            w + (size_t)e * N * K, K, 0.0f, dx + (size_t)e * M * K, K);
            t[2] = now_seconds();
            for (int e = 0; e < E; e++)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, K, R, 1.0f, gy + (size_t)e * R * N, N,
                            gx + (size_t)e * R * K, K, 1.0f, dw + (size_t)e * N * K, K);
#endif
        }
        t[3] = now_seconds();
        double r[3] = {fl / (t[1] - t[0]), fl / (t[2] - t[1]), flw / (t[3] - t[2])};
        for (int i = 0; i < 3; i++) best[i] = fmax(best[i], r[i] / 1e9);
    }
}

static void bench_gemm(int nwords, char **words) {
#ifdef BENCH_OPENBLAS
    int impls = 2;
#else
    int impls = 1;
#endif
    int shown = 0;
    for (size_t s = 0; s < sizeof gemm_shapes / sizeof *gemm_shapes; s++)
        for (int w = 0; w < nwords; w++) shown += strstr(gemm_shapes[s].what, words[w]) != NULL;
    if (nwords && !shown) usage_error("no shape's name holds any of the words given to gemm; see the list in dev/bench/bench.c");
    double peak = peak_for_mfu(), bw = read_bandwidth();
    printf("peak %.1f GFLOP/s, memory read %.1f GB/s (%d threads)%s\n", peak, bw, max_threads(),
           impls == 2 ? "; each shape on this program's kernels, then OpenBLAS's cblas_sgemm" : "");
    printf("%-36s %-8s %12s %12s %12s %12s  (GFLOP/s, %% of peak; best of 3)\n", "shape (E x M x K x N)", "", "forward",
           "d input", "d weight", "memory bound");
    for (size_t s = 0; s < sizeof gemm_shapes / sizeof *gemm_shapes; s++) {
        const GemmShape *g = &gemm_shapes[s];
        int hit = 0;
        while (hit < nwords && !strstr(g->what, words[hit])) hit++;
        if (nwords && hit == nwords) continue;
        size_t R = (size_t)g->M * g->layers, wn = (size_t)g->E * g->N * g->K, xn = (size_t)g->E * g->M * g->K,
               yn = (size_t)g->E * g->M * g->N, gxn = (size_t)g->E * R * g->K, gyn = (size_t)g->E * R * g->N;
        // as training allocates them: 2 MiB blocks, huge pages where the kernel gives them
        float *w = calloc_big(wn * 4), *dw = calloc_big(wn * 4), *x = calloc_big(xn * 4), *y = calloc_big(yn * 4);
        float *dx = calloc_big(xn * 4), *gx = calloc_big(gxn * 4), *gy = calloc_big(gyn * 4);
        fill(w, wn, 1), fill(x, xn, 2), fill(gx, gxn, 3), fill(gy, gyn, 4);
        for (int impl = 0; impl < impls; impl++) {
            double best[3];
            gemm_rates(g, impl, w, dw, x, y, dx, gx, gy, best);
            printf("%-36s %-8s %6.1f (%2.0f%%) %6.1f (%2.0f%%) %6.1f (%2.0f%%)", impl ? "" : g->what,
                   impl ? "OpenBLAS" : "ours", best[0], 100 * best[0] / peak, best[1], 100 * best[1] / peak, best[2],
                   100 * best[2] / peak);
            double bound = g->M * bw / 2;
            if (bound < peak && impl == 0) printf(" %6.1f (%2.0f%%)", bound, 100 * bound / peak);
            printf("\n");
        }
        free(w), free(dw), free(x), free(y), free(dx), free(gx), free(gy);
    }
}

// -vocab V (the data's vocabulary, which training reads from the shards), then train_unipool's flags.
static void bench_step(int argc, char **argv) {
    int V = GPT2_VOCAB;
    if (argc >= 3 && !strcmp(argv[1], "-vocab")) V = (int)parse_int("-vocab", argv[2], 2, 1 << 24), argc -= 2, argv += 2;
    Config cfg = {.V = V, .Vp = padded_vocab(V), .maxT = 1024, .G = 1, .K = 1, .norm_eps = 1e-5f, .rope_theta = 1e6f,
                  .router_c = 1.0f, .router_eps = 1e-8f};
    TrainConfig tc = {.B = 4, .T = 1024, .n_micro = 1, .steps = 3, .val_batches = 1, .gen_tokens = 1, .keep = 1, .seed = 1,
                      .opt = {.lr = 1e-4f, .b1 = 0.9f, .b2 = 0.999f, .eps = 1e-8f, .wd = 0.01f, .clip = 1.0f}};
    Paths paths = {0};
    cfg.L = presets[0].L, cfg.C = presets[0].C, cfg.NH = presets[0].NH, cfg.NKV = presets[0].NKV, cfg.F = presets[0].F;
    int model_flags;
    apply_flags(argc, argv, &cfg, &tc, &paths, &model_flags, 1);
    cfg.router_c = router_constant(&cfg);
    Model m;
    model_build(&m, &cfg);
    model_init(&m, 1, 0.01f);
    act_alloc(&m, tc.B * tc.T);
    print_memory(&m, &tc);
    size_t ntok = (size_t)tc.n_micro * tc.B * (tc.T + 1);
    int *tokens = malloc_check(ntok * sizeof(int));
    Rng rng = {2};
    for (size_t i = 0; i < ntok; i++) tokens[i] = (int)(rng_u64(&rng) % cfg.V);
    const Config *c = &cfg;
    double per_token = flops_total(training_flops(c, tc.T)), matmul_params = (per_token - 6.0 * c->L * tc.T * c->C) / 6;
    double tokens_step = (double)tc.n_micro * tc.B * tc.T;
    double peak = peak_for_mfu(), best = 1e30, sum = 0.0;
    for (int s = 0; s <= tc.steps; s++) {  // step 0 warms up
        double t0 = now_seconds();
        StepStats st = step_gradients(&m, tokens, tc.n_micro, tc.B, tc.T);
        step_update(&m, &tc.opt, tc.opt.lr, st.grad_norm);
        double dt = now_seconds() - t0;
        bench_part(-1);
        if (s > 0) best = fmin(best, dt), sum += dt;
        if (s == 0) memset(part_seconds, 0, sizeof part_seconds);  // the warm-up step does not count
    }
    double med = sum / tc.steps, gflops = per_token * tokens_step / med / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("step: %s L %d C %d G %d E %d K %d | B %d T %d x %d | %.0f ms/step (mean of %d; best %.0f) | %.0f tok/s | "
           "%.1f GFLOP/s | MFU %.1f%% of %.0f | peak RSS %.2f GiB | %.1fM active matmul params\n",
           c->G == c->L ? "vanilla" : c->G == 1 ? "UniPool" : "grouped", c->L, c->C, c->G, c->E, c->K, tc.B, tc.T,
           tc.n_micro, med * 1e3, tc.steps, best * 1e3, tokens_step / med, gflops, 100 * gflops / peak, peak,
           ru.ru_maxrss / 1048576.0, matmul_params / 1e6);
    static const char *const part_names[NUM_PARTS] = {"head", "attention", "routers", "experts", "AdamW"};
    double parts = 0.0;
    for (int i = 0; i < NUM_PARTS; i++) parts += part_seconds[i];
    printf("parts of the step:");
    for (int i = 0; i < NUM_PARTS; i++)
        printf(" %s %.0f%% (%.0f ms)%s", part_names[i], 100 * part_seconds[i] / parts,
               1e3 * part_seconds[i] / tc.steps, i + 1 < NUM_PARTS ? "," : "");
    printf(" (head: embedding, final norm, LM head, CE; attention, routers: with their norms; "
           "AdamW: with the gradient norm)\n");
    free(tokens);
    model_free(&m);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *usage = "usage: ./bench peak | tile | bandwidth | gemm [WORD...] | step [-vocab V] [train_unipool model and batch flags, -n steps]\n";
    if (argc < 2) {
        fputs(usage, stderr);
        return EXIT_USAGE;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fputs(usage, stdout);
    } else if (!strcmp(argv[1], "peak")) {
        printf("fp32 FMA peak: %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads\n", fmax(fma_peak(1), fma_peak(1)), peak_all(), max_threads());
    } else if (!strcmp(argv[1], "tile")) {
        double tile = tile_rate(), one = fmax(fma_peak(1), fma_peak(1));
        printf("register tile (%dx%d, %d deep), panels in L1: %.1f GFLOP/s on 1 thread, %.0f%% of its peak %.1f\n",
               GM_MR, GM_NR, GM_KC, tile, 100 * tile / one, one);
    } else if (!strcmp(argv[1], "bandwidth")) {
        printf("memory read: %.1f GB/s on %d threads\n", read_bandwidth(), max_threads());
    } else if (!strcmp(argv[1], "gemm")) {
        bench_gemm(argc - 2, argv + 2);
    } else if (!strcmp(argv[1], "step")) {
        bench_step(argc - 1, argv + 1);
    } else {
        usage_error("unknown command '%s'", argv[1]);
    }
    return 0;
}
