/*
infer_unipool.c: what a user does with a trained checkpoint. It includes
train_unipool.c (its main fenced off), so the model is the training
program's, line for line.

  ./infer_unipool eval -c CKPT -i SHARDS [-b B] [-t T] [-n BATCHES] [-T THREADS]

eval: mean loss and perplexity of the checkpoint over the rows of the shards
(all of them, or the first BATCHES batches), reading rows in file order as the
training program's validation does; the stale pool statistic is not touched.
*/
#define UNIPOOL_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // parts of the training program this one does not call
#include "train_unipool.c"

static void infer_usage(void) {
    printf("usage: ./infer_unipool eval -c CKPT -i SHARDS [-b B] [-t T] [-n BATCHES] [-T THREADS]\n"
           "  eval  loss and perplexity over the shards (glob), all rows or the first BATCHES batches\n"
           "  -c    checkpoint written by train_unipool\n"
           "  -b -t batch size and sequence length     [the checkpoint's]\n"
           "  -n    batches, 0 = every row             [0]\n"
           "  -T    threads                            [all]\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "-h")) {
        infer_usage();
        return argc < 2 ? EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "eval")) usage_error("unknown command '%s'", argv[1]);
    const char *ckpt = NULL, *shards = NULL;
    int B = 0, T = 0, batches = 0;
    for (int i = 2; i < argc; i += 2) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage_error("flag %s needs a value", f);
        if (!strcmp(f, "-c")) ckpt = v;
        else if (!strcmp(f, "-i")) shards = v;
        else if (!strcmp(f, "-b")) B = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "-t")) T = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "-n")) batches = (int)parse_int(f, v, 0, INT32_MAX);
#ifdef _OPENMP
        else if (!strcmp(f, "-T")) omp_set_num_threads((int)parse_int(f, v, 1, 4096));
#endif
        else usage_error("unknown flag %s", f);
    }
    if (!ckpt || !shards) usage_error("eval needs -c CKPT and -i SHARDS");
    Model m;
    CheckpointHeader ck;
    checkpoint_load_model(&m, &ck, ckpt);
    B = B ? B : ck.tc.B;
    T = T ? T : ck.tc.T;
    if (T > m.cfg.maxT) usage_error("-t %d exceeds the model's maxT %d", T, m.cfg.maxT);
    DataLoader d;
    loader_init(&d, shards, T, m.cfg.V, 0, 0, "-i");
    int64_t rows = 0;
    for (int s = 0; s < d.n; s++) rows += (int64_t)((d.count[s] - 1) / T);
    int64_t all = rows / B;
    if (all == 0) fail("-i: the shards hold %lld rows of T+1 = %d tokens, fewer than one batch of %d", (long long)rows, T + 1, B);
    int n = batches && batches < all ? batches : (int)all;
    double loss = evaluate(&m, &d, B, n, NULL, 1);
    printf("eval %s on %s: %d batches of %d x %d tokens, loss %.6f, perplexity %.4f\n", ckpt, shards, n, B, T, loss,
           exp(loss));
    loader_free(&d);
    model_free(&m);
    return 0;
}
