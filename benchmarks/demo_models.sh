#!/usr/bin/env bash
# The demo models and the benchmark table of docs/benchmarks.md, in one lease of a GPU machine:
#   1. the embedded default (`pretrain --config embedded`, heads included), packed for the package;
#   2. the GPU pair (`pretrain --config gpu`, heads included), trained at the same time;
#   3. `specdec bench` on the GPU pair: bf16 greedy and sampled; bf16 greedy with the target compiled; fp32 greedy.
# It outlasts one 10-minute device call, so start it detached and collect with `collect`:
#   setsid nohup bash benchmarks/demo_models.sh run >/dev/null 2>&1 &
#   bash benchmarks/demo_models.sh collect     # copies logs and finished results to $OUT
# EMBEDDED_CONFIG / GPU_CONFIG choose other configs and EMBEDDED_ARGS / GPU_ARGS / BENCH_ARGS add arguments, for
# a smoke test on a CPU: EMBEDDED_CONFIG=tiny GPU_CONFIG=tiny EMBEDDED_ARGS="--steps 20 --heads-steps 5" ...
# EMBEDDED_CONFIG=none skips the embedded models. TABLES picks the tables and their order (default
# "bf16 bf16-compiled fp32"; "bf16-greedy" is bf16 without sampling). Two trainings at once share the GPU by time-slicing: on an H100
# (2026-11-24) head training then ran at only 6-10 steps/s, and the whole run outlasted a 30-minute lease.
set -uo pipefail
W=${WORK:-/root/specdec-work}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1

COMPILED=("specdec: draft model, compiled" "specdec: prompt lookup, compiled" "specdec: medusa, compiled"
          "specdec: eagle, compiled")

bench() {  # one table per file, so a lease that ends early still leaves the tables finished before it
  local name=$1; shift
  python3 -m specdec bench --models "$W/gpu" "$@" ${BENCH_ARGS:---prompts 8 --max-new-tokens 256} \
      --out "$W/$name.json" >>"$W/bench.log" 2>&1
}

run() {
  # A copy of the checkout: later calls re-sync the working tree, and this run must not see edits made meanwhile.
  mkdir -p "$W" && rm -rf "$W/src" && cp -a . "$W/src" && cd "$W/src" || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$W/install.log" 2>&1 || exit 1
  [ "${EMBEDDED_CONFIG:-embedded}" = none ] || ( python3 -m specdec.pretrain --config "${EMBEDDED_CONFIG:-embedded}" --out "$W/embedded" ${EMBEDDED_ARGS:---compile} >"$W/embedded.log" 2>&1 \
      && tar -C "$W/embedded" --exclude corpus.json -czf "$W/embedded.tgz" . ) &
  python3 -m specdec.pretrain --config "${GPU_CONFIG:-gpu}" --out "$W/gpu" ${GPU_ARGS:---compile} >"$W/gpu.log" 2>&1
  wait
  for table in ${TABLES:-bf16 bf16-compiled fp32}; do
    case $table in
      bf16) bench bench-bf16 --dtype bfloat16 ;;
      bf16-greedy) bench bench-bf16 --dtype bfloat16 --modes greedy ;;
      bf16-compiled) bench bench-bf16-compiled --dtype bfloat16 --modes greedy --compiled --only "${COMPILED[@]}" ;;
      fp32) bench bench-fp32 --dtype float32 --modes greedy ;;
    esac
  done
  touch "$W/done"
}

collect() {
  mkdir -p "$OUT"
  for f in embedded.log gpu.log bench.log; do [ -f "$W/$f" ] && tr '\r' '\n' <"$W/$f" | grep -v '^ *$' | tail -c 200000 >"$OUT/$f"; done
  for f in embedded.tgz bench-bf16.json bench-bf16-compiled.json bench-fp32.json; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
  [ -f "$W/gpu/recipe.json" ] && cp "$W/gpu/recipe.json" "$OUT/recipe-gpu.json"
  [ -f "$W/done" ] && echo DONE
  for f in embedded.log gpu.log bench.log; do [ -f "$OUT/$f" ] && { echo "== $f"; tail -n 4 "$OUT/$f"; }; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}

"${1:-run}"
