#!/usr/bin/env bash
# benchmarks/fold_speed.sh - builds benchmarks/fold_speed.c against the C core
# (gcc -O2, as tests/c builds it) and runs it: per dtype and instruction-set
# path, the check pass against a read, and prepare + apply against a memcpy,
# of the same 64 MiB. With OPENMP=1 it also builds the core with -fopenmp (as
# setup.py does by default) and runs it on 1 and 2 threads.
#
# Usage: benchmarks/fold_speed.sh [SIZE_MIB [REPS]]
# The output is Markdown; benchmarks/results/fold_isa.md is one such run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/bench
gcc -std=c11 -O2 -Wall -Wextra -Werror -Icsrc benchmarks/fold_speed.c \
    csrc/fold.c -o build/bench/fold_speed -lm
echo "## 1 thread, core built without OpenMP (gcc -O2)"
echo
./build/bench/fold_speed "$@"
if [ "${OPENMP:-0}" != 0 ]; then
    gcc -std=c11 -O2 -fopenmp -Wall -Wextra -Werror -Icsrc \
        benchmarks/fold_speed.c csrc/fold.c -o build/bench/fold_speed_omp -lm
    for n in 1 2; do
        echo
        echo "## OpenMP build, OMP_NUM_THREADS=$n"
        echo
        OMP_NUM_THREADS=$n ./build/bench/fold_speed_omp "$@"
    done
fi
