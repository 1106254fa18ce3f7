#!/usr/bin/env bash
# The benchmark matrix of docs/benchmarks.md on one GPU lease: the `gpu` recipe's pair (197M target, 12.6M
# draft, trained heads), and the same pair inflated to Llama-3-8B / Llama-3.2-1B shapes (`specdec inflate`,
# in memory), against eager and static-cache transformers, assisted generation and gpt-fast.
#   setsid nohup bash benchmarks/matrix.sh train >/dev/null 2>&1 &     # the pair, about 7 minutes
#   setsid nohup bash benchmarks/matrix.sh tables 8b-b1 demo 8b-b1-compiled 8b-batches >/dev/null 2>&1 &
# MODELS=embedded runs the tables on the pair shipped in the package instead, with no training.
#   bash benchmarks/matrix.sh smoke                                     # every code path once, small, foreground
#   setsid nohup bash benchmarks/matrix.sh cuda-tests >/dev/null 2>&1 &  # tests/test_cuda.py, 4 processes at once
#   bash benchmarks/matrix.sh collect                                   # logs and finished tables to $OUT
# gpt-fast comes from $PEER (default .peers/gpt-fast: a copy of ../shared/peers/gpt-fast carried with the call).
set -uo pipefail
W=${WORK:-/root/specdec-matrix}
OUT=${OUT:-/tmp/out}
PEER=${PEER:-$PWD/.peers/gpt-fast}
MODELS=${MODELS:-$W/gpu}  # "embedded": the pair shipped in the package, no training
export PYTHONUNBUFFERED=1
OURS=("specdec: draft model" "specdec: prompt lookup" "specdec: medusa" "specdec: eagle")
THEIRS=("assisted: draft model" "assisted: prompt lookup" "gpt-fast: speculative")
COMPILED=("specdec, no drafter, compiled" "specdec: draft model, compiled")
COMPILED_ALL=("${COMPILED[@]}" "specdec: prompt lookup, compiled" "specdec: medusa, compiled" "specdec: eagle, compiled")
AUTO=("specdec: draft model, auto" "specdec: prompt lookup, auto" "specdec: medusa, auto" "specdec: eagle, auto")

install() {  # a copy of the checkout per job: later calls re-sync the working tree, and a job must not see edits
  mkdir -p "$W" && rm -rf "$W/src-$1" && cp -a . "$W/src-$1" && cd "$W/src-$1" || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$W/install.log" 2>&1 || exit 1
}

bench() {  # one table per file, so a lease that ends early keeps the tables finished before it
  local name=$1; shift
  echo "== $name $(date -u +%FT%TZ)" >>"$W/bench.log"
  local models=(--models "$MODELS"); [ "$MODELS" = embedded ] && models=()
  python3 -m specdec bench "${models[@]}" --prompts-from "$PEER" --peer "gpt-fast=$PEER" "$@" \
      --out "$W/$name.json" >>"$W/bench.log" 2>&1
}

train() {
  install train
  python3 -m specdec.pretrain --config gpu --out "$W/gpu" --compile >"$W/train.log" 2>&1 && touch "$W/trained"
}

tables() {
  install tables
  while [ "$MODELS" != embedded ] && [ ! -f "$W/trained" ]; do sleep 10; done
  for table in "$@"; do
    case $table in
      8b-b1) bench 8b-b1 --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 8 --batch-sizes 1 --calls 4 \
                 --only "${OURS[@]}" "${THEIRS[@]}" ;;
      8b-b1-greedy) bench 8b-b1-greedy --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 4 --batch-sizes 1 \
                 --calls 2 --modes greedy --only "${OURS[@]}" "assisted: prompt lookup" ;;
      8b-b1-compiled) bench 8b-b1-compiled --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 8 --batch-sizes 1 \
                 --calls 4 --modes greedy --compiled --only "${COMPILED[@]}" ;;
      8b-b1-compiled-all) bench 8b-b1-compiled-all --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 4 \
                 --batch-sizes 1 --calls 2 --modes greedy --compiled --only "${COMPILED_ALL[@]}" ;;
      verify-batches) echo "== verify-batches $(date -u +%FT%TZ)" >>"$W/bench.log"  # a step's cost by rows and tree size
                 python3 benchmarks/verify_step.py --B 1 16 64 --P 512 --T 1 16 64 --steps 10 \
                     --out "$W/verify-batches.json" >>"$W/bench.log" 2>&1 ;;
      verify-8b) echo "== verify-8b $(date -u +%FT%TZ)" >>"$W/bench.log"  # the 8B step against its floor, kernels
                 python3 benchmarks/verify_step.py --P 4096 --T 16 --profile --out "$W/verify-8b.json" \
                     >>"$W/bench.log" 2>&1 ;;
      profiles) echo "== profiles $(date -u +%FT%TZ)" >>"$W/bench.log"  # kernels per step per drafter, compiled or not
                 python3 benchmarks/profile_step.py --out "$W/profile-eager.json" >>"$W/bench.log" 2>&1
                 python3 benchmarks/profile_step.py --compile --trace "$W/traces" --out "$W/profile-compiled.json" \
                     >>"$W/bench.log" 2>&1 ;;
      profiles-8b) echo "== profiles-8b $(date -u +%FT%TZ)" >>"$W/bench.log"  # the compiled step at 8B cost, per drafter
                 python3 benchmarks/profile_step.py --models "$MODELS" --shape llama-3-8b --draft-shape llama-3.2-1b \
                     --compile --out "$W/profile-8b-compiled.json" >>"$W/bench.log" 2>&1 ;;
      auto) bench auto --prompts 64 --batch-sizes 32 1 64 --calls 8 --modes greedy --auto \
                 --only "${OURS[@]}" "${AUTO[@]}" ;;  # speculation="auto" against every step drafted (the default)
      demo) bench demo --prompts 64 --batch-sizes 1 4 16 64 --calls 2 --only "${OURS[@]}" "${THEIRS[@]}" ;;
      pair-b1) bench pair-b1 --prompts 8 --batch-sizes 1 --calls 4 --only "${OURS[@]}" ;;
      b1-compiled) bench b1-compiled --prompts 8 --batch-sizes 1 --calls 8 --modes greedy --compiled \
                 --only "${COMPILED_ALL[@]}" ;;  # the issue's target 1: every drafter compiled, batch 1
      8b-b1-sample) bench 8b-b1-sample --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 4 --batch-sizes 1 \
                 --calls 2 --modes sample --only "${OURS[@]}" "${THEIRS[@]}" ;;
      8b-b1-sample-heads) bench 8b-b1-sample-heads --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 4 \
                 --batch-sizes 1 --calls 2 --modes sample --only "specdec: prompt lookup" "specdec: medusa" "specdec: eagle" ;;
      8b-b64-greedy) bench 8b-b64-greedy --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 64 --batch-sizes 64 \
                 --calls 1 --modes greedy --only "${OURS[@]}" ;;
      8b-b4-b16) bench 8b-b4-b16 --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 64 --batch-sizes 4 16 \
                      --calls 1 --only "${OURS[@]}" ;;
      8b-b64-sample) bench 8b-b64-sample --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 64 --batch-sizes 64 \
                 --calls 1 --modes sample --only "${OURS[@]}" ;;
      gpu-b64) bench gpu-b64 --prompts 64 --batch-sizes 64 --calls 1 --only "${OURS[@]}" ;;
      gpu-8b-b1-greedy) bench gpu-8b-b1-greedy --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 4 \
                 --batch-sizes 1 --calls 2 --modes greedy --only "${OURS[@]}" "gpt-fast: speculative" ;;
      8b-batches) bench 8b-batches --shape llama-3-8b --draft-shape llama-3.2-1b --prompts 64 --batch-sizes 4 16 64 \
                      --calls 1 --only "${OURS[@]}" ;;
    esac
  done
  touch "$W/tables-done"
}

smoke() {  # the embedded pair, inflated, every code path once at small sizes: run in the foreground
  install smoke
  python3 -m specdec bench --prompts 4 --prompts-from "$PEER" --peer "gpt-fast=$PEER" --batch-sizes 1 2 --calls 2 \
      --max-new-tokens 24 --compiled --shape 1024,8,2048,32,8,32 --draft-shape 512,4,1024,16,8,32 \
      --only "${OURS[@]}" "${THEIRS[@]}" "${COMPILED[@]}" --out "$W/smoke.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$"
}

cuda-tests() {  # the GPU tests split over 4 processes (small models: the host, not the GPU, is the limit)
  install tests
  python3 -m pytest -q --co -p no:cacheprovider -o addopts="" tests/test_cuda.py | grep "::" >"$W/cuda-ids" || exit 1
  for part in 0 1 2 3; do
    awk -v p=$part 'NR % 4 == p' "$W/cuda-ids" >"$W/cuda-ids-$part"
    python3 -m pytest -q -p no:cacheprovider -o addopts="" $(cat "$W/cuda-ids-$part") >"$W/cuda-tests-$part.log" 2>&1 &
  done
  wait
  tail -n 3 "$W"/cuda-tests-*.log >"$W/cuda-tests.log"; grep -h -E "^(FAILED|ERROR)" "$W"/cuda-tests-*.log >>"$W/cuda-tests.log"
  touch "$W/cuda-tests-done"
}

collect() {
  mkdir -p "$OUT"
  for f in train.log bench.log cuda-tests.log; do [ -f "$W/$f" ] && tr '\r' '\n' <"$W/$f" | grep -v '^ *$' | tail -c 2000000 >"$OUT/$f"; done
  for f in "$W"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done  # at most 8 files come back: no .md
  [ -f "$W/gpu/recipe.json" ] && cp "$W/gpu/recipe.json" "$OUT/recipe-gpu.json"
  [ -d "$W/traces" ] && tar czf "$OUT/traces.tgz" -C "$W" traces  # profile_step.py --trace: host and device
  for f in trained cuda-tests-done tables-done; do [ -f "$W/$f" ] && echo "$f"; done
  [ -f "$OUT/train.log" ] && tail -n 3 "$OUT/train.log"
  [ -f "$OUT/cuda-tests.log" ] && cat "$OUT/cuda-tests.log"
  [ -f "$OUT/bench.log" ] && grep -E "^==|our fastest|Error|error" "$OUT/bench.log" | tail -n 30
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}

"$@"
