#!/usr/bin/env bash
# What a new user's first commands cost: a fresh clone of this repository, every compile
# cache empty and the embedded model not yet converted, then `make setup` and one of
# `make run` / `make test`, each timed. pip's wheel cache is kept (set PIP_CACHE_DIR to an
# empty folder to include the ~3.5 GB download too).
#
#   bash benchmarks/fresh_start.sh run  [ARGS="run.steps=2"]    # or: test
#
# Prints the CPU capability (AVX512 / AVX2: bf16 is native only on some AVX512 CPUs), the
# load average before it starts, and the seconds of each phase. Logs go to $OUT.
set -u
what=${1:-run}
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
OUT=${OUT:-$(mktemp -d /tmp/fipo-fresh-XXXXXX)}
mkdir -p "$OUT/caches"
git clone -q "$src" "$OUT/clone" && cd "$OUT/clone" || exit 1
export FIPO_CACHE_DIR=$OUT/caches/fipo VLLM_CACHE_ROOT=$OUT/caches/vllm
export TORCHINDUCTOR_CACHE_DIR=$OUT/caches/inductor XDG_CACHE_HOME=$OUT/caches/xdg
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$HOME/.cache/pip}
echo "fresh clone in $OUT/clone | load $(cut -d' ' -f1 /proc/loadavg) | $(nproc) cores"
t0=$(date +%s)
make setup > "$OUT/setup.log" 2>&1 || { echo "make setup failed: $OUT/setup.log"; exit 1; }
t1=$(date +%s)
echo "CPU capability $(.venv/bin/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
echo "make setup: $((t1 - t0)) s"
if [ "$what" = test ]; then
  CI=true bash .ci/run > "$OUT/test.log" 2>&1; rc=$?
else
  make run ARGS="${ARGS:-} run.out_dir=$OUT/runs" > "$OUT/run.log" 2>&1; rc=$?
  grep -a -o "\[eval\].*" "$OUT/run.log"
fi
t2=$(date +%s)
echo "make $what: exit $rc, $((t2 - t1)) s (log: $OUT/$what.log); total $((t2 - t0)) s"
exit $rc
