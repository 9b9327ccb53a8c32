#!/usr/bin/env bash
# Every speed and memory figure of the README, measured side by side in one
# run: the FMA peak, the GEMM kernels on the 182M and exp shapes (beside
# OpenBLAS's when libopenblas-dev is installed), and
# training steps of C and of the PyTorch reference at the same configuration,
# batch and threads, with their tokens/s ratio. Takes about 20 minutes; the
# 182M runs need 16 GiB of memory. Usage: dev/bench/run.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-2}
export OMP_NUM_THREADS=$THREADS
# PyTorch allocates and frees its activations and temporaries every step, and page faults are
# slow on a VM, so both programs run with the glibc settings that suit PyTorch best. Tiny: malloc
# keeps what it frees. 182M: that would not fit in memory, so malloc asks for huge pages instead.
# The C program allocates once, and asks for huge pages itself.
KEEP="MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000"
HUGE="GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
make -s dev/bench/bench
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB;" \
     "$(gcc --version | head -1); $THREADS threads"
# The peak is a maximum, and a VM may run both threads on one core for seconds at a time: the
# best of five measurements a few seconds apart.
for i in 1 2 3 4 5; do ./dev/bench/bench peak; sleep 2; done | tee /tmp/unipool_peak.txt
PEAK=$(sed -n 's/.*, \([0-9.]*\) GFLOP\/s on [0-9]* threads/\1/p' /tmp/unipool_peak.txt | sort -g | tail -1)
echo "peak used for every MFU below: $PEAK GFLOP/s"
export BENCH_PEAK=$PEAK
./dev/bench/bench tile
./dev/bench/bench gemm
pair() {  # C and PyTorch at the same settings, then the ratio of tokens/s; $ENV: environment for both
    c=$(env $ENV ./dev/bench/bench step "$@" -n "$N")
    t=$(env $ENV /usr/bin/python3 dev/bench/bench_torch.py "$@" -n "$N" --threads "$THREADS" --peak "$PEAK")
    echo "$c"; echo "$t"
    /usr/bin/python3 -c "import re,sys; f=lambda s: float(re.search(r'\| (\d+) tok/s', s).group(1)); \
print('ratio: C / PyTorch tokens/s = %.2f' % (f(sys.argv[1]) / f(sys.argv[2])))" "$c" "$t"
}
./dev/bench/bench bandwidth
ENV=$KEEP N=5 pair -p tiny -o layer -b 16 -t 128
ENV=$KEEP N=5 pair -p tiny -o pool -b 16 -t 128
ENV=$KEEP N=5 pair -vocab 8192 -p exp -o layer -b 16 -t 256
ENV=$KEEP N=5 pair -vocab 8192 -p exp -o pool -b 16 -t 256
ENV=$HUGE N=3 pair -p 182m -o layer -b 4 -t 256
ENV=$HUGE N=3 pair -p 182m -o pool -b 4 -t 256
./dev/bench/bench bandwidth
echo "182M at B*T = 4096 (the memory target is for vanilla), vanilla and UniPool alternated twice:"
: > /tmp/unipool_4096.txt
for round in 1 2; do
    ./dev/bench/bench step -p 182m -o layer -b 4 -t 1024 -n 1 | tee -a /tmp/unipool_4096.txt
    ./dev/bench/bench step -p 182m -o pool -b 4 -t 1024 -n 1 | tee -a /tmp/unipool_4096.txt
done
/usr/bin/python3 -c "import re; s = open('/tmp/unipool_4096.txt').read(); \
ms = lambda k: sum(map(float, re.findall(k + r' .*?\| (\d+) ms/step', s))); \
print('UniPool / vanilla tokens/s at B*T = 4096, both rounds: %.2f' % (ms('vanilla') / ms('UniPool')))"
./dev/bench/bench bandwidth
