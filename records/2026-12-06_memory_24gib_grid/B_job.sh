#!/usr/bin/env bash
# Issue #26 in one call: (1) the rows of the seq-2048 grid that decide the fastest fitting setting
# per depth, a few small batches, and d30 (the deepest that may fit); (2) shapes the estimate was
# not fitted on (d24; seq 1024 with and without accumulation; seq 4096); (3) base_train end to end
# with --activation-checkpointing=auto --device-batch-size=auto while a ballast process leaves
# ~24.0 GiB free (what mem_get_info reports, as on a real 24 GB card); (4) the GPU tests.
set -uo pipefail
T0=$(date +%s); END=$(( T0 + ${LIMIT:-585} ))
left() { echo $(( END - $(date +%s) )); }
source runs/offline_env.sh; export NANOCHAT_BASE_DIR
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
python -c "import torch; print(torch.__version__, torch.version.cuda)" >> $OUT/gpu.txt
bench() {  # bench <name> <seq> <variants> <seconds>
  echo "python -m scripts.bench_memory --variants=$3 --seq-lens=$2 --memory-gib=24" >> $OUT/command.txt
  timeout $4 python -m scripts.bench_memory --variants=$3 --seq-lens=$2 --memory-gib=24 > $OUT/$1.txt 2> $OUT/$1.err
  echo "$1 rc=$? [$(( $(date +%s) - T0 )) s]"
}
G=20:selective:16,28:none:2,28:selective:4,28:blocks:16,30:none:1,30:selective:2,30:blocks:8,30:blocks:16,26:selective:8
G=$G,12:none:1,12:selective:4,12:blocks:1,20:none:1,20:selective:2,20:blocks:2,26:none:1,26:blocks:1,28:blocks:2
bench grid_s2048 2048 $G 170
bench oos_s2048 2048 24:none:1,24:none:4,24:selective:4,24:selective:8,24:blocks:16 70
bench oos_s1024 1024 12:none:32,12:selective:32,12:blocks:32,20:none:16,20:selective:32,20:blocks:32 70
bench oos_s4096 4096 12:none:8,12:selective:8,12:blocks:8,20:none:2,20:none:4,20:selective:4,20:blocks:8 75
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
for D in 20 28; do
  (( $(left) > 150 )) || { echo "e2e d$D skipped: $(left) s left"; continue; }
  timeout 100 python -m scripts.base_train --run=dummy --depth=$D --max-seq-len=2048 \
    --window-pattern=L --total-batch-size=32768 --device-batch-size=auto --activation-checkpointing=auto \
    --num-iterations=6 --eval-every=-1 --eval-tokens=65536 --core-metric-every=-1 --sample-every=-1 \
    --save-every=-1 --model-tag=e2e_d$D > $OUT/e2e_d$D.txt 2>&1
  echo "e2e d$D rc=$? [$(( $(date +%s) - T0 )) s]"
  grep -E "activation checkpointing:|device batch:|memory|tok/s|Error|error" $OUT/e2e_d$D.txt | cut -c1-330 | tail -6
done
kill $BALLAST 2>/dev/null; wait $BALLAST 2>/dev/null
timeout $(( $(left) - 10 )) python -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/gpu_tests.txt 2>&1
echo "gpu tests rc=$? [$(( $(date +%s) - T0 )) s]"; tail -4 $OUT/gpu_tests.txt
for f in grid_s2048 oos_s2048 oos_s1024 oos_s4096; do grep "^|" $OUT/$f.txt | grep -v "^|---"; done
