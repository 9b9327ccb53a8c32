/*
A libFuzzer harness over the readers of files a user hands the programs: token
shards (header, size, token range), checkpoints (header, configuration,
size, body) and the resume path, a checkpoint with the shards it resumes on
(the training program's checks before the model, then the model and body,
the loader put at the saved position and a few rows read). Every input must
be either accepted or rejected with an error; never a crash, a hang or an
out-of-bounds access.

    clang -g -O1 -fsanitize=fuzzer,address,undefined -o fuzz_readers dev/fuzz/fuzz_readers.c -lm
    ./fuzz_readers -max_total_time=60 -detect_leaks=0 -close_fd_mask=2 dev/fuzz/corpus

(make fuzz does this.) A rejection longjmps back here (UNIPOOL_FUZZ), which
abandons the rejected reader's own small allocations: hence -detect_leaks=0.

Each input is read three ways: as a shard, as a checkpoint, and as a resume:
byte 0 gives the number k = 1 + byte % 3 of train shards, the next 2k bytes
their lengths (uint16, little-endian), then come the shards' bytes and the
rest is the checkpoint (dev/fuzz/seeds.py writes inputs of all three kinds).

A rejection longjmps past the frees, so the models and loaders live in statics
and each input first frees what the previous one left (drop_model,
drop_loader): without that, a minute of rejected checkpoints leaks past
libFuzzer's 2 GB limit.
*/
#define UNIPOOL_NO_MAIN
#define UNIPOOL_FUZZ
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../train_unipool.c"

#include <fcntl.h>

static char dir[64], path[128];

static void drop_model(Model *m) {  // frees what an earlier input built, accepted or not
    model_free(m);
    memset(m, 0, sizeof *m);
}

static void drop_loader(DataLoader *d) {
    loader_free(d);
    memset(d, 0, sizeof *d);
}

static void write_file(const char *name, const uint8_t *data, size_t size) {
    FILE *f = fopen(name, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) abort();
}

// The resume path as `train_unipool -r CKPT -i SHARDS -j VAL -O OUT` takes it, up to its first rows.
static void fuzz_resume(const uint8_t *data, size_t size) {
    static Run r;    // static: a rejection in a later step leaves its log and loaders for the next input to free
    static Model m;  // zeroed or built: model_build zeroes it before it allocates
    static int *rows;
    static char val[160], shards[160], out[160], ckpt[160], name[200];
    if (r.log) fclose(r.log), r.log = NULL;
    free(r.resume), r.resume = NULL;
    free(rows), rows = NULL;
    drop_loader(&r.train), drop_loader(&r.val), drop_model(&m);
    if (!val[0]) {  // a fixed val shard: the resume path only checks its header
        snprintf(val, sizeof val, "%s/val.bin", dir);
        snprintf(shards, sizeof shards, "%s/t_*.bin", dir);
        snprintf(out, sizeof out, "%s/out", dir);
        snprintf(ckpt, sizeof ckpt, "%s/resume.bin", dir);
        int32_t h[256 + 64] = {SHARD_MAGIC, SHARD_VERSION_U16, 128};
        write_file(val, (const uint8_t *)h, 1024 + 128 * 2);
    }
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof name, "%s/t_%d.bin", dir, i);
        remove(name);
    }
    snprintf(name, sizeof name, "%s/log.jsonl", out);
    remove(name);  // no rewrite (and fsync) per input: the log holds no records here
    if (size < 1) return;
    int k = 1 + data[0] % 3;
    size_t at = 1 + 2 * (size_t)k;
    if (size < at) return;
    for (int i = 0; i < k; i++) {
        size_t n = data[1 + 2 * i] | (size_t)data[2 + 2 * i] << 8;
        n = n < size - at ? n : size - at;
        snprintf(name, sizeof name, "%s/t_%d.bin", dir, i);
        write_file(name, data + at, n);
        at += n;
    }
    write_file(ckpt, data + at, size - at);
    char *argv[] = {"train_unipool", "-r", ckpt, "-i", shards, "-j", val, "-z", "/nonexistent", "-O", out, "-T", "1"};
    run_setup(&r, sizeof argv / sizeof *argv, argv);
    model_build(&m, &r.cfg);
    checkpoint_read_body(r.resume, &m, &r.ck);
    loader_seek(&r.train, r.epoch, r.shard, r.row);
    rows = malloc_check(3 * ((size_t)r.tc.T + 1) * sizeof(int));
    loader_next(&r.train, rows, 3);  // three rows: enough to cross a shard's end from its last row
}

// Removes the harness's folder when the fuzzer exits.
static void remove_dir(void) {
    static const char *const names[] = {"input.bin", "val.bin", "resume.bin", "t_0.bin", "t_1.bin", "t_2.bin",
                                        "out/log.jsonl", "out/log.jsonl.tmp", "out"};
    char name[200];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(name, sizeof name, "%s/%s", dir, names[i]);
        remove(name);
    }
    rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/unipool-fuzz-%d", (int)getpid());
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) abort();
        snprintf(path, sizeof path, "%s/input.bin", dir);
        atexit(remove_dir);
    }
    write_file(path, data, size);
    static DataLoader d;
    drop_loader(&d);
    if (setjmp(fuzz_escape) == 0) {  // as a shard: a tiny model reads rows of 8 + 1 tokens
        loader_init(&d, path, 8, 1, 1, "fuzz");
        int rows[2 * 9];
        loader_next(&d, rows, 2);
    }
    static Model m;
    drop_model(&m);
    if (setjmp(fuzz_escape) == 0) {  // as a checkpoint
        CheckpointHeader ck;
        checkpoint_header(path, &ck);
        model_build(&m, &ck.cfg);
        checkpoint_read_body(path, &m, &ck);
    }
    if (setjmp(fuzz_escape) == 0) fuzz_resume(data, size);  // as a checkpoint with the shards it resumes on
    return 0;
}
