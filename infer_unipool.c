/*
infer_unipool.c: what a user does with a trained checkpoint. It includes
train_unipool.c (its main fenced off), so the model is the training
program's, line for line.

  ./infer_unipool gen   -c CKPT [-p TEXT] [-n 128] [-temp 1.0] [-topp 0.9] [-s 1337]
  ./infer_unipool eval  -c CKPT -i SHARDS [-b B] [-t T] [-n BATCHES]
  ./infer_unipool util  -c CKPT -i SHARDS [-b B] [-t T] [-n BATCHES] [-o PREFIX] [-w ROWS.csv]
  ./infer_unipool probe -c CKPT -i SHARDS [-b B] [-t T] [-n BATCHES] [-s 1337]

gen    samples text after a prompt with a KV cache, streaming tokens as they
       come. The prompt is encoded by prepro_pile.py --encode (the project's
       GPT-2 BPE, run by /usr/bin/python3 when it exists, else python3; it
       finds the encoder files of `make data` next to itself); tokens are
       printed with the tokenizer table (-z; by default the one the checkpoint
       trained with, else data/sotu's). Both files are found from any folder:
       a relative path that does not exist from the current one is taken
       relative to this program's folder, the repository.
eval   mean loss and perplexity over the shards' rows, read in file order as
       the training program's validation reads them.
util   the paper's utilisation analysis: tokens per expert per layer (CSV),
       pool coverage, the share of the pool each layer uses, its router's
       health (busiest expert, load entropy, dead tokens: see RouteHealth),
       cross-layer reuse (distinct experts a token visits over the L layers,
       divided by L), and an SVG: a layers x experts heatmap over a bar chart of pool load.
       -w also writes the counts of every row (sequence) apart, with the
       document its first token is in (the end-of-text tokens in the shards
       up to it, read in file order): what a test that needs independent
       units, documents rather than tokens, resamples.
probe  the routing-randomisation probe: for each layer of the deep half, one
       at a time, each token's experts are replaced by uniformly random ones
       (from the layer's whole pool, then from its 8 most-used experts), each
       taking the gate of the choice it replaces; the loss change per layer.
*/
#define UNIPOOL_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // parts of the training program this one does not call
#include "train_unipool.c"

#include <sys/wait.h>

static void infer_usage(void) {
    printf("usage: ./infer_unipool COMMAND -c CKPT [-flag value ...]\n"
           "  gen    sample text:  [-p TEXT] [-n TOKENS 128] [-temp 1.0] [-topp 0.9] [-s SEED 1337]\n"
           "                       [-z TOKENIZER: the checkpoint's, else data/sotu/gpt2_tokenizer.bin]\n"
           "                       [-P PREPRO prepro_pile.py]; relative paths: from here, else from\n"
           "                       this program's folder\n"
           "  eval   loss over shards:            -i SHARDS [-b B] [-t T] [-n BATCHES, 0 = all]\n"
           "  util   expert utilisation:          -i SHARDS [-b -t -n] [-o PREFIX out/util] -> .csv, .svg\n"
           "                                      [-w ROWS.csv: the counts of each row and its document]\n"
           "  probe  routing randomisation probe: -i SHARDS [-b -t -n] [-s SEED]\n"
           "  -T     threads (all); -b and -t default to the checkpoint's training B and T\n");
}

typedef struct {
    const char *ckpt, *shards, *prompt, *tokenizer, *prepro, *out, *rows;
    int B, T, batches, n_new;
    float temperature, top_p;
    uint64_t seed;
} InferArgs;

/* The folder of the running program (the repository, where make builds it),
   from /proc/self/exe; "." if that cannot be read. */
static const char *program_dir(void) {
    static char dir[4096];
    if (!dir[0]) {
        ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
        dir[n > 0 ? n : 0] = '\0';
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        else strcpy(dir, ".");
    }
    return dir;
}

/* A file named relative to the repository: path itself when it exists (or is
   absolute), else path under the program's folder when it exists there, else
   NULL. buf (4096 bytes) holds the second. */
static const char *find_file(const char *path, char *buf) {
    if (access(path, R_OK) == 0) return path;
    if (path[0] == '/') return NULL;
    snprintf(buf, 4096, "%s/%s", program_dir(), path);
    return access(buf, R_OK) == 0 ? buf : NULL;
}

/* Encodes text with prepro_pile.py --encode --vocab V (no shell: the text is
   one argv entry), run by /usr/bin/python3 when it exists (Debian's, the one the
   tests use), else the python3 on PATH. Returns the number of ids written to
   ids (at most cap). A failure names the command and its last line of
   stderr. */
static int encode_prompt(int *ids, int cap, const char *prepro, const char *text, int V) {
    const char *python = access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
    char vocab[16];  // formatted before fork: the child only redirects and executes
    snprintf(vocab, sizeof vocab, "%d", V);
    int out[2], err[2];
    if (pipe(out) != 0 || pipe(err) != 0) fail("-p: cannot create a pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) fail("-p: cannot start %s: %s", python, strerror(errno));
    if (pid == 0) {
        dup2(out[1], STDOUT_FILENO);
        dup2(err[1], STDERR_FILENO);
        close(out[0]), close(out[1]), close(err[0]), close(err[1]);
        execlp(python, python, prepro, "--encode", text, "--vocab", vocab, (char *)NULL);
        fprintf(stderr, "cannot run %s: %s\n", python, strerror(errno));
        _exit(127);
    }
    close(out[1]);
    close(err[1]);
    FILE *f = fdopen(out[0], "r");
    int n = 0, id;
    while (n < cap && fscanf(f, "%d", &id) == 1) ids[n++] = id;
    fclose(f);
    char msg[1024] = "", line[1024];
    FILE *e = fdopen(err[0], "r");
    while (fgets(line, sizeof line, e))
        if (line[0] != '\n') snprintf(msg, sizeof msg, "%s", line);  // the last line says what went wrong
    fclose(e);
    msg[strcspn(msg, "\n")] = '\0';
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("-p: '%s %s --encode' failed (exit %d: %s); run 'make data' for the encoder files, or pass -P", python,
             prepro, WIFEXITED(status) ? WEXITSTATUS(status) : -1, msg[0] ? msg : "no message");
    return n;
}

/* gen's files, found before the model is built: the tokenizer table (-z, else
   the checkpoint's, else data/sotu's) and, for a prompt, prepro_pile.py. */
static void gen_files(InferArgs *a, const CheckpointHeader *ck, Tokenizer *tok) {
    static char zbuf[4096], pbuf[4096];
    const char *z = a->tokenizer, *trained = ck->paths[PATH_TOKENIZER];
    if (!z) z = trained[0] && access(trained, R_OK) == 0 ? trained : "data/sotu/gpt2_tokenizer.bin";
    const char *found = find_file(z, zbuf);
    if (!found || tokenizer_load(tok, found) != 0)
        fail("-z: cannot open the tokenizer table '%s' (looked in the current folder and in '%s'); run 'make data' "
             "or pass -z", z, program_dir());
    a->tokenizer = found;
    char what[4200];
    snprintf(what, sizeof what, "-z tokenizer table '%s'", found);
    vocab_agree(what, tok->n, "the checkpoint", ck->cfg.V);
    if (a->prompt && *a->prompt) {
        if (!(found = find_file(a->prepro, pbuf)))
            fail("-P: cannot find '%s' (looked in the current folder and in '%s'); pass -P PATH/prepro_pile.py",
                 a->prepro, program_dir());
        a->prepro = found;
    }
}

static void cmd_gen(Model *m, const InferArgs *a, Tokenizer tok) {
    const Config *c = &m->cfg;
    int *seq = malloc_check((size_t)c->maxT * sizeof(int)), n = 0;
    seq[n++] = tok.eot;  // every document of the training data starts after an end-of-text token
    if (a->prompt && *a->prompt) n += encode_prompt(seq + 1, c->maxT - 1, a->prepro, a->prompt, c->V);
    int n_new = a->n_new < c->maxT - n ? a->n_new : c->maxT - n;
    for (int i = 1; i < n; i++) tokenizer_print(seq[i], &tok);
    Rng rng = {a->seed};
    double t0 = now_seconds();
    generate(m, seq, n, n_new, a->temperature, a->top_p, &rng, tokenizer_print, &tok);
    double dt = now_seconds() - t0;
    printf("\n");
    fprintf(stderr, "gen: %d prompt tokens, %d new, %.1f tokens/s\n", n, n_new, n_new / dt);
    free(seq);
    tokenizer_free(&tok);
}

// Batches available in the shards at B x T, capped by -n.
static int batch_count(const DataLoader *d, int B, int want) {
    int64_t rows = 0;
    for (int s = 0; s < d->n; s++) rows += (int64_t)((d->count[s] - 1) / d->T);
    int64_t all = rows / B;
    if (all == 0) fail("-i: the shards hold %lld rows of T+1 = %d tokens, fewer than one batch of %d", (long long)rows, d->T + 1, B);
    return want && want < all ? want : (int)(all < INT32_MAX ? all : INT32_MAX);
}

/* One row's counts as CSV lines row,doc,layer,expert,tokens (those above 0):
   the (token, slot) assignments of its T tokens, tokens n0 .. n0+T-1 of the
   batch, per layer and expert of the buffer. */
static void write_row_counts(FILE *f, const Model *m, int64_t row, int64_t doc, int n0, int T,
                             uint32_t *scratch) {
    // scratch (L, G*E), zero on entry and on return
    const Config *c = &m->cfg;
    int L = c->L, K = c->K, GE = c->G * c->E;
    for (int l = 0; l < L; l++)
        for (int n = n0; n < n0 + T; n++)
            for (int k = 0; k < K; k++)
                scratch[(size_t)l * GE + layer_first_expert(c, l) +
                        m->acts.chosen[((size_t)l * m->maxN + n) * K + k]]++;
    for (int l = 0; l < L; l++)
        for (int e = 0; e < GE; e++) {
            uint32_t *x = scratch + (size_t)l * GE + e;
            if (*x) fprintf(f, "%lld,%lld,%d,%d,%u\n", (long long)row, (long long)doc, l, e, *x);
            *x = 0;
        }
}

/* Utilisation over the data: counts (L, G*E) of (token, slot) assignments
   per layer and expert of the buffer, the router health (if health is not
   NULL) and the cross-layer reuse figure; with rows_out, each row's counts
   (write_row_counts), its document the number of end-of-text tokens (id
   V - 1) in the shards up to its first token: a document's rows share it
   whether its end-of-text token opens it (prepro_pile.py) or closes it. */
static double utilisation(Model *m, DataLoader *d, int B, int batches, uint64_t *counts, RouteHealth *health,
                          FILE *rows_out) {
    const Config *c = &m->cfg;
    int T = d->T, N = B * T, L = c->L, K = c->K, GE = c->G * c->E;
    int *rows = malloc_check((size_t)B * (T + 1) * sizeof(int)), *io = malloc_check(2 * (size_t)N * sizeof(int));
    int *seen = malloc_check((size_t)L * K * sizeof(int));
    uint32_t *row_counts = rows_out ? calloc_check((size_t)L * GE, sizeof(uint32_t)) : NULL;
    int64_t doc = 0;
    double reuse = 0.0;
    loader_seek(d, 0, 0, 0);
    for (int i = 0; i < batches; i++) {
        loader_next(d, rows, B);
        split_rows(io, io + N, rows, B, T);
        model_forward(m, io, NULL, B, T, 0, 0);
        if (health) health_add(health, m, N);
        for (int b = 0; rows_out && b < B; b++) {
            const int *row = rows + (size_t)b * (T + 1);
            doc += row[0] == c->V - 1;
            write_row_counts(rows_out, m, (int64_t)i * B + b, doc, b * T, T, row_counts);
            for (int t = 1; t < T; t++) doc += row[t] == c->V - 1;
        }
        for (int n = 0; n < N; n++) {
            int distinct = 0;
            for (int l = 0; l < L; l++)
                for (int k = 0; k < K; k++) {
                    int e = (int)layer_first_expert(c, l) + m->acts.chosen[((size_t)l * m->maxN + n) * K + k], dup = 0;
                    counts[(size_t)l * GE + e]++;
                    for (int s = 0; s < distinct; s++) dup |= seen[s] == e;
                    if (!dup) seen[distinct++] = e;
                }
            reuse += (double)distinct / L;
        }
    }
    free(rows);
    free(io);
    free(seen);
    free(row_counts);
    return reuse / ((double)batches * N);
}

/* The heatmap's colour of a cell holding count tokens, the busiest cell
   holding mx: white when unused, else from light blue (198,219,239) to dark
   blue (8,48,107) by t = sqrt(count / mx). The square root spreads the small
   counts: a cell at 2% of the busiest is t = 0.14, (171,195,220), plainly
   blue next to an unused white one, where a linear scale would give
   (250,251,253), white to the eye. */
static void heat_rgb(double count, double mx, int rgb[3]) {
    static const int lo[3] = {198, 219, 239}, hi[3] = {8, 48, 107};
    double t = count > 0 && mx > 0 ? sqrt(count / mx) : 0.0;
    for (int k = 0; k < 3; k++) rgb[k] = count > 0 ? (int)lround(lo[k] + (hi[k] - lo[k]) * t) : 255;
}

// The step of an axis over [0, span] with at most `most` steps: 1, 2 or 5 times a power of ten.
static double nice_step(double span, int most) {
    static const double mult[3] = {1, 2, 5};
    for (double p = 1;; p *= 10)
        for (int k = 0; k < 3; k++)
            if (span / (p * mult[k]) <= most) return p * mult[k];
}

// Expert-index ticks and labels under a row of GE cells of width cw from x0, at height y.
static void svg_expert_ticks(FILE *f, int GE, double x0, double cw, double y) {
    int step = (int)nice_step(GE, 16);
    for (int e = 0; e < GE; e += step) {
        double x = x0 + cw * (e + 0.5);
        fprintf(f, "<line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\" stroke=\"#444\"/>\n", x, y, x, y + 4);
        fprintf(f, "<text x=\"%.2f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"10\">%d</text>\n", x, y + 14, e);
    }
}

/* The SVG: a heatmap of counts (rows: layers, columns: the buffer's experts;
   hovering a cell shows its count) with expert-index ticks and its colour
   scale, over a bar chart of pool load with its axis values and the uniform
   line. */
static void write_svg(const char *path, const uint64_t *counts, int L, int GE, const char *title) {
    FILE *f = fopen_check(path, "w");
    double cw = GE > 400 ? 2.0 : 800.0 / GE, ch = 18.0, x0 = 70, y0 = 40, hw = cw * GE, hh = ch * L, bh = 160;
    double *load = calloc_check(GE, sizeof(double)), mx = 1, lmx = 1, total = 0;
    for (int l = 0; l < L; l++)
        for (int e = 0; e < GE; e++) {
            double v = (double)counts[(size_t)l * GE + e];
            mx = fmax(mx, v), load[e] += v, total += v;
        }
    for (int e = 0; e < GE; e++) lmx = fmax(lmx, load[e]);
    double uniform = total / GE, ly = y0 + hh + 40, ytop = ly + 70;
    lmx = fmax(lmx, uniform);
    int rgb[3];
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            fmax(x0 + hw + 40, x0 + 480), ytop + bh + 50);
    fprintf(f, "<text x=\"%.0f\" y=\"20\" font-size=\"14\">%s</text>\n", x0, title);
    for (int l = 0; l < L; l++) {
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">layer %d</text>\n", x0 - 6, y0 + ch * l + ch * 0.7, l);
        for (int e = 0; e < GE; e++) {
            uint64_t v = counts[(size_t)l * GE + e];
            if (!v) continue;  // unused: the white background
            heat_rgb((double)v, mx, rgb);
            fprintf(f, "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" fill=\"rgb(%d,%d,%d)\"><title>layer %d, "
                       "expert %d: %llu tokens</title></rect>\n", x0 + cw * e, y0 + ch * l, cw, ch, rgb[0], rgb[1], rgb[2],
                    l, e, (unsigned long long)v);
        }
    }
    fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.2f\" height=\"%.1f\" fill=\"none\" stroke=\"#888\"/>\n", x0, y0, hw, hh);
    svg_expert_ticks(f, GE, x0, cw, y0 + hh);
    fprintf(f, "<text x=\"%.0f\" y=\"%.1f\">expert (index in the buffer of %d)</text>\n", x0, y0 + hh + 30, GE);
    // the colour scale: white for unused, then 40 steps of the square-root scale, counts at five points
    fprintf(f, "<rect x=\"%.0f\" y=\"%.1f\" width=\"16\" height=\"12\" fill=\"white\" stroke=\"#888\"/>\n"
               "<text x=\"%.0f\" y=\"%.1f\" font-size=\"10\">unused</text>\n", x0, ly, x0 + 20, ly + 10);
    double sx = x0 + 70, sw = 300;
    for (int i = 0; i < 40; i++) {
        double t = (i + 0.5) / 40;
        heat_rgb(t * t * mx, mx, rgb);
        fprintf(f, "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"12\" fill=\"rgb(%d,%d,%d)\"/>\n", sx + sw * i / 40, ly,
                sw / 40 + 0.3, rgb[0], rgb[1], rgb[2]);
    }
    for (int i = 0; i <= 4; i++) {
        double t = i / 4.0, x = sx + sw * t;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>\n", x, ly + 12, x, ly + 16);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"10\">%.0f</text>\n", x, ly + 26, t * t * mx);
    }
    fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" font-size=\"10\">tokens per cell (square-root scale)</text>\n", sx + sw + 10, ly + 10);
    // the bar chart with its value axis
    double step = nice_step(lmx, 5);
    for (double v = 0; v <= lmx * 1.0000001; v += step) {
        double y = ytop + bh - bh * v / lmx;
        fprintf(f, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, y, x0 + hw, y);
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\" font-size=\"10\">%.0f</text>\n", x0 - 6, y + 4, v);
    }
    for (int e = 0; e < GE; e++) {
        double h = bh * load[e] / lmx;
        fprintf(f, "<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" fill=\"#4a7ab5\"/>\n", x0 + cw * e,
                ytop + bh - h, cw * 0.9, h);
    }
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#444\"/>\n", x0, ytop, x0, ytop + bh);
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>\n", x0, ytop + bh, x0 + hw, ytop + bh);
    svg_expert_ticks(f, GE, x0, cw, ytop + bh);
    double uy = ytop + bh - bh * uniform / lmx;
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#c33\" stroke-dasharray=\"4 3\"/>\n", x0, uy,
            x0 + hw, uy);
    fprintf(f, "<text x=\"%.0f\" y=\"%.1f\">pool load: tokens per expert over all layers; dashed: uniform (%.0f)</text>\n",
            x0, ytop + bh + 32, uniform);
    fprintf(f, "</svg>\n");
    free(load);
    if (fclose(f) != 0) fail("cannot write '%s': %s", path, strerror(errno));
}

static void cmd_util(Model *m, DataLoader *d, const InferArgs *a, int n, FILE *rows_out) {
    const Config *c = &m->cfg;
    int L = c->L, GE = c->G * c->E, E = c->E;
    uint64_t *counts = calloc_check((size_t)L * GE, sizeof(uint64_t));
    RouteHealth health;
    health_init(&health, c);
    if (rows_out) fprintf(rows_out, "row,doc,layer,expert,tokens\n");
    double reuse = utilisation(m, d, a->B, n, counts, &health, rows_out);
    if (rows_out && fclose(rows_out) != 0) fail("cannot write '%s': %s", a->rows, strerror(errno));
    char path[4096];
    snprintf(path, sizeof path, "%s.csv", a->out);
    FILE *f = fopen_check(path, "w");
    fprintf(f, "layer,expert,tokens\n");
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            int e = (int)layer_first_expert(c, l) + j;
            fprintf(f, "%d,%d,%llu\n", l, e, (unsigned long long)counts[(size_t)l * GE + e]);
        }
    if (fclose(f) != 0) fail("cannot write '%s': %s", path, strerror(errno));
    int covered = 0;
    for (int e = 0; e < GE; e++) {
        uint64_t s = 0;
        for (int l = 0; l < L; l++) s += counts[(size_t)l * GE + e];
        covered += s > 0;
    }
    printf("util: %d batches of %d x %d tokens, K %d | pool coverage %d/%d experts (%.1f%%) | cross-layer reuse %.3f "
           "(distinct experts per token / L)\n", n, a->B, d->T, c->K, covered, GE, 100.0 * covered / GE, reuse);
    for (int l = 0; l < L; l++) {
        int used;
        double top, entropy;
        load_stats(health.load + (size_t)l * E, E, &used, &top, &entropy);
        printf("layer %2d: uses %d/%d of its pool (%.1f%%), busiest expert %.1f%% of its tokens, load entropy %.3f, "
               "dead tokens %.1f%%\n", l, used, E, 100.0 * used / E, 100.0 * top, entropy,
               100.0 * health.dead[l] / health.tokens);
    }
    health_free(&health);
    char title[256];
    snprintf(title, sizeof title, "%s: %s, L %d, G %d pools of E %d, K %d", a->ckpt,
             c->G == L ? "vanilla MoE" : c->G == 1 ? "UniPool" : "grouped pools", L, c->G, E, c->K);
    snprintf(path, sizeof path, "%s.svg", a->out);
    write_svg(path, counts, L, GE, title);
    printf("wrote %s.csv and %s.svg\n", a->out, a->out);
    free(counts);
}

/* The routing-randomisation probe: each token's K experts are replaced by K
   distinct experts drawn uniformly from set (n >= K local indices), and each
   new expert receives the gate the router gave to the choice it replaces.
   So the probe changes which experts run, not how much of their output is
   mixed in. Only the chosen scores are rewritten: the loss it measures is CE. */
static void probe_reroute(int *chosen, float *score, int N, int E, int K, const int *set, int n, Rng *rng) {
    for (int t = 0; t < N; t++) {
        int *ch = chosen + (size_t)t * K;
        float g[K], *s = score + (size_t)t * E;
        for (int k = 0; k < K; k++) g[k] = s[ch[k]];
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = set[rng_u64(rng) % (uint64_t)n];
                dup = 0;
                for (int kk = 0; kk < k; kk++) dup |= ch[kk] == e;
            } while (dup);
            ch[k] = e;
        }
        for (int k = 0; k < K; k++) s[ch[k]] = g[k];
    }
}

/* The probe's hook into model_forward (Model.route_hook): at one layer,
   every token's experts are redrawn from set. */
typedef struct {
    int layer, E, K, n;
    const int *set;  // (n) local expert indices
    Rng rng;
} Probe;

static void probe_hook(void *ctx, int l, int *chosen, float *score, int N) {
    Probe *p = ctx;
    if (l == p->layer) probe_reroute(chosen, score, N, p->E, p->K, p->set, p->n, &p->rng);
}

static void cmd_probe(Model *m, DataLoader *d, const InferArgs *a, int n) {
    const Config *c = &m->cfg;
    int L = c->L, E = c->E, GE = c->G * E, top = E < 8 ? E : 8;
    if (top < c->K) fail("the probe needs at least K = %d experts per pool", c->K);
    uint64_t *counts = calloc_check((size_t)L * GE, sizeof(uint64_t));
    utilisation(m, d, a->B, n, counts, NULL, NULL);
    double base = evaluate(m, d, a->B, n, NULL, 0), sum[2] = {0, 0};
    int *all = malloc_check(E * sizeof(int)), *busiest = malloc_check(E * sizeof(int));
    printf("probe: %d batches of %d x %d tokens; baseline loss %.5f\n", n, a->B, d->T, base);
    printf("layer | random over the pool (%d) | random over its %d most-used\n", E, top);
    for (int l = L / 2; l < L; l++) {
        const uint64_t *cl = counts + (size_t)l * GE + layer_first_expert(c, l);
        for (int j = 0; j < E; j++) all[j] = busiest[j] = j;
        for (int i = 0; i < top; i++)  // selection: the `top` most-used, ties to the lower index
            for (int j = i + 1; j < E; j++)
                if (cl[busiest[j]] > cl[busiest[i]]) {
                    int tmp = busiest[i];
                    busiest[i] = busiest[j];
                    busiest[j] = tmp;
                }
        double delta[2];
        for (int s = 0; s < 2; s++) {
            Probe probe = {l, E, c->K, s ? top : E, s ? busiest : all, {a->seed + (uint64_t)l}};
            m->route_hook = probe_hook;
            m->route_ctx = &probe;
            delta[s] = evaluate(m, d, a->B, n, NULL, 0) - base;
            sum[s] += delta[s];
        }
        m->route_hook = NULL;
        printf("%5d | %+.5f | %+.5f\n", l, delta[0], delta[1]);
    }
    int deep = L - L / 2;
    printf("mean  | %+.5f | %+.5f   (loss change, %d deep layers)\n", sum[0] / deep, sum[1] / deep, deep);
    free(all);
    free(busiest);
    free(counts);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "-h")) {
        infer_usage();
        return argc < 2 ? EXIT_USAGE : 0;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "gen") && strcmp(cmd, "eval") && strcmp(cmd, "util") && strcmp(cmd, "probe"))
        usage_error("unknown command '%s'", cmd);
    InferArgs a = {.prepro = "prepro_pile.py", .out = "out/util",
                   .n_new = 128, .temperature = 1.0f, .top_p = 0.9f, .seed = 1337};
    for (int i = 2; i < argc; i += 2) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(f, "-h")) infer_usage(), exit(0);
        if (!v) usage_error("flag %s needs a value", f);
        if (!strcmp(f, "-c")) a.ckpt = v;
        else if (!strcmp(f, "-i")) a.shards = v;
        else if (!strcmp(f, "-p")) a.prompt = v;
        else if (!strcmp(f, "-z")) a.tokenizer = v;
        else if (!strcmp(f, "-P")) a.prepro = v;
        else if (!strcmp(f, "-o")) a.out = v;
        else if (!strcmp(f, "-w")) a.rows = v;
        else if (!strcmp(f, "-b")) a.B = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "-t")) a.T = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "-n")) a.batches = a.n_new = (int)parse_int(f, v, 0, INT32_MAX);
        else if (!strcmp(f, "-temp")) a.temperature = parse_float(f, v, 0, 100);
        else if (!strcmp(f, "-topp")) a.top_p = parse_float(f, v, 1e-6, 1);
        else if (!strcmp(f, "-s")) a.seed = (uint64_t)parse_int(f, v, 0, INT32_MAX);
#ifdef _OPENMP
        else if (!strcmp(f, "-T")) omp_set_num_threads((int)parse_int(f, v, 1, 4096));
#endif
        else usage_error("unknown flag %s", f);
    }
    if (!a.ckpt) usage_error("%s needs -c CKPT", cmd);
    if (a.rows && strcmp(cmd, "util")) usage_error("-w is util's flag, not %s's", cmd);
    // everything but the model first: a typo costs a moment at any model size
    CheckpointHeader ck;
    checkpoint_header(a.ckpt, &ck);
    Tokenizer tok;
    DataLoader d;
    int gen = !strcmp(cmd, "gen"), batches = 0;
    FILE *rows_out = NULL;
    if (gen) {
        gen_files(&a, &ck, &tok);
    } else {
        if (!a.shards) usage_error("%s needs -i SHARDS", cmd);
        a.B = a.B ? a.B : ck.tc.B;
        a.T = a.T ? a.T : ck.tc.T;
        if (a.T > ck.cfg.maxT) usage_error("-t %d exceeds the model's maxT %d", a.T, ck.cfg.maxT);
        if ((int64_t)a.B * a.T > MAX_BATCH_TOKENS) usage_error("-b %d x -t %d exceeds 2^24 tokens", a.B, a.T);
        loader_init(&d, a.shards, a.T, 0, 0, "-i");
        char what[4200];
        snprintf(what, sizeof what, "-i shards '%s'", a.shards);
        vocab_agree(what, d.V, "the checkpoint", ck.cfg.V);
        batches = batch_count(&d, a.B, a.batches);
        if (!strcmp(cmd, "util")) {
            char dir[4096];
            snprintf(dir, sizeof dir, "%s", a.out);
            char *slash = strrchr(dir, '/');
            if (slash) slash[slash == dir] = '\0';
            check_writable_dir(slash ? dir : ".", "-o");
            if (a.rows) rows_out = fopen_check(a.rows, "w");
        }
    }
    Model m;
    model_build(&m, &ck.cfg);
    checkpoint_read_body(a.ckpt, &m, &ck);
    if (gen) {
        cmd_gen(&m, &a, tok);
    } else {
        if (!strcmp(cmd, "eval")) {
            double loss = evaluate(&m, &d, a.B, batches, NULL, 1);
            printf("eval %s on %s: %d batches of %d x %d tokens, loss %.6f, perplexity %.4f\n", a.ckpt, a.shards,
                   batches, a.B, a.T, loss, exp(loss));
        } else if (!strcmp(cmd, "util")) {
            cmd_util(&m, &d, &a, batches, rows_out);
        } else {
            cmd_probe(&m, &d, &a, batches);
        }
        loader_free(&d);
    }
    model_free(&m);
    return 0;
}
