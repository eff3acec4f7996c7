#!/usr/bin/env bash
# Issue #26: base_train end to end with --activation-checkpointing=auto --device-batch-size=auto
# while a ballast process leaves ~24.0 GiB free (mem_get_info then reports what a 24 GB card does).
set -uo pipefail
source runs/offline_env.sh; export NANOCHAT_BASE_DIR
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
git log -1 --format=%h > $OUT/commit.txt 2>/dev/null
python - > $OUT/ballast.txt 2>&1 <<'PY' &
import time, torch
GiB = 2 ** 30
torch.empty(1, device="cuda")
free = torch.cuda.mem_get_info()[0]
hold = torch.empty(int(free - 24.0 * GiB), dtype=torch.uint8, device="cuda")
print(f"ballast holds {(free - 24.0 * GiB) / GiB:.2f} GiB; free now {torch.cuda.mem_get_info()[0] / GiB:.2f} GiB", flush=True)
time.sleep(900)
PY
BALLAST=$!; sleep 12; cat $OUT/ballast.txt
for D in 28 24; do
  timeout 90 python -m scripts.base_train --run=dummy --depth=$D --max-seq-len=2048 --window-pattern=L \
    --total-batch-size=32768 --device-batch-size=auto --activation-checkpointing=auto --num-iterations=6 \
    --eval-every=-1 --eval-tokens=65536 --core-metric-every=-1 --sample-every=-1 --save-every=-1 \
    --model-tag=e2e_d$D > $OUT/e2e_d$D.txt 2>&1
  echo "e2e d$D rc=$?"
  grep -E "activation checkpointing:|device batch:|^memory|done:|Error|error" $OUT/e2e_d$D.txt | cut -c1-300
done
kill $BALLAST 2>/dev/null
