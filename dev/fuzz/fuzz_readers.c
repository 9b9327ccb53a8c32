/*
A libFuzzer harness over the readers of files a user hands the programs: token
shards (header, size, token range) and checkpoints (header, configuration,
size, body). Every input must be either accepted or rejected with an error;
never a crash, a hang or an out-of-bounds access.

    clang -g -O1 -fsanitize=fuzzer,address,undefined -o fuzz_readers dev/fuzz/fuzz_readers.c -lm
    ./fuzz_readers -max_total_time=60 -detect_leaks=0 -close_fd_mask=2 dev/fuzz/corpus

(make fuzz does this.) A rejection longjmps back here (UNIPOOL_FUZZ), which
abandons the rejected reader's allocations: hence -detect_leaks=0.
*/
#define UNIPOOL_NO_MAIN
#define UNIPOOL_FUZZ
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../train_unipool.c"

#include <fcntl.h>

static char path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/unipool-fuzz-%d.bin", (int)getpid());
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) abort();
    if (setjmp(fuzz_escape) == 0) {  // as a shard: a tiny model reads rows of 8 + 1 tokens
        DataLoader d;
        loader_init(&d, path, 8, 50257, 1, 1, "fuzz");
        int rows[2 * 9];
        loader_next(&d, rows, 2);
        loader_free(&d);
    }
    if (setjmp(fuzz_escape) == 0) {  // as a checkpoint
        Model m;
        CheckpointHeader ck;
        checkpoint_load_model(&m, &ck, path);
        model_free(&m);
    }
    return 0;
}
