#!/usr/bin/env bash
# Frontier at 120 s of step time (issue #23), in calls of at most ~LIMIT s: the same command every call.
# Phase 1: full_update baselines d6 d8 d10 d12, seed 1. Phase 2 (same RESULTS_DIR, RESUME=1, the plan
# grows): layer_drop and depth_growth at the best baseline depth on the full budget. Phase 3: both on
# 0.8 of the budget, only when one of them beat the best baseline on the full budget (otherwise 0.8
# of the time cannot reach it either).
set -uo pipefail
T0=$(date +%s); LIMIT=${LIMIT:-570}
source runs/offline_env.sh; export NANOCHAT_BASE_DIR
[[ -f $NANOCHAT_BASE_DIR/tokenizer/tokenizer.json ]] || python -m scripts.tok_train --vocab-size=32768 > /dev/null 2>&1
export SKIP_SETUP=1 PREPARE_DATA=0 WARMUP_STEPS=0 TIME_BUDGET_SEC=120 EVAL_EVERY=400 EVAL_TOKENS=524288 \
  ALLOW_FEW_EVAL_TOKENS=1 MAX_SEQ_LEN=1024 DEVICE_BATCH_SIZE=32 TOTAL_BATCH_SIZE=32768 WINDOW_PATTERN=L \
  RESULTS_DIR=results/fr120 SEEDS=1 BASELINE_DEPTHS="6 8 10 12" RESUME=1 MAX_RUNS=1
mkdir -p $RESULTS_DIR
nvidia-smi --query-gpu=name --format=csv,noheader >> $RESULTS_DIR/gpu_per_call.txt
done_runs() { awk -F'\t' 'NR > 1 && $8 == "0"' $RESULTS_DIR/runs.tsv 2>/dev/null | wc -l; }
best() {  # best <role>: "depth bpb" of the lowest final val bpb among full-budget runs of that role
python - "$1" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open("results/fr120/summary.csv"))
        if r["role"] == sys.argv[1] and r["final_val_bpb"] and float(r["budget_fraction"] or 1) == 1]
b = min(rows, key=lambda r: float(r["final_val_bpb"])) if rows else None
print(f'{b["depth"]} {b["final_val_bpb"]}' if b else "none 9")
PY
}
while :; do
  n=$(done_runs); need=150
  if (( n >= 4 )); then
    read -r D BASE < <(best baseline)
    export ARMS="drop_d$D:--depth=$D --block-update-schedule=layer_drop --muon-active-only-stack;growth_d$D:--depth=$D --block-update-schedule=depth_growth --muon-active-only-stack"
    if (( n >= 6 )); then
      read -r _ ARM < <(best feature)
      if ! awk -v a="$ARM" -v b="$BASE" 'BEGIN{exit !(a < b)}'; then
        echo "frontier.sh: best arm $ARM on the full budget is not below the best baseline $BASE: no 0.8-budget runs"; break
      fi
      export BUDGET_FRACTION=0.8; need=125
      (( n < 8 )) || break
    fi
  fi
  (( $(date +%s) - T0 + need < LIMIT )) || { echo "frontier.sh: stopping, $(( $(date +%s) - T0 ))s used, next needs ~${need}s"; break; }
  bash runs/dynamic_suffix_compare.sh 2>&1 | grep -E "=== run|FAILED|error|done:|left" | tail -6
done
echo "elapsed $(( $(date +%s) - T0 ))s"
tail -45 $RESULTS_DIR/summary.md
rm -rf $RESULTS_DIR/compile_cache
tar -czf $OUT/fr120.tar.gz -C results fr120
