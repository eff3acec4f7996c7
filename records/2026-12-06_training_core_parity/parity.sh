#!/usr/bin/env bash
# Issue 22 acceptance: the commit before the training-core rewrite vs now, same job, empty compile caches per run.
set -uo pipefail
ROOT=$PWD
source runs/offline_env.sh
export NANOCHAT_BASE_DIR
mkdir -p $OUT/runs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/runs/gpu.txt
python -c "import torch; print(torch.__version__, torch.version.cuda)" >> $OUT/runs/gpu.txt
t0=$(date +%s)
python -m scripts.tok_train --vocab-size=32768 > $OUT/runs/tok.log 2>&1 || { tail $OUT/runs/tok.log; exit 1; }
echo "tokenizer $(( $(date +%s) - t0 ))s"
ANCHOR="--depth=12 --window-pattern=L --max-seq-len=1024 --device-batch-size=32 --total-batch-size=32768 --num-iterations=520 --eval-every=520 --eval-tokens=1048576"
D20="--depth=20 --max-seq-len=2048 --device-batch-size=16 --total-batch-size=32768 --num-iterations=100 --eval-every=100 --eval-tokens=1048576 --block-update-schedule=dynamic_suffix --dyn-relevance-threshold=0.4 --muon-active-only-stack"
run() {  # name dir args...
  local name=$1 dir=$2; shift 2
  local c=/tmp/cache_$name; rm -rf $c; mkdir -p $c
  (cd $dir && TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton python -m scripts.base_train --run=dummy "$@" \
     --model-tag=$name --metrics-file=$OUT/runs/$name.jsonl > $OUT/runs/$name.log 2>&1) || echo "$name FAILED rc=$?"
  echo "$name done at $(( $(date +%s) - t0 ))s"
}
run anchor_before .bench/before $ANCHOR
run anchor_after . $ANCHOR
run d20dyn_before .bench/before $D20
run d20dyn_after . $D20
if (( $(date +%s) - t0 < 330 )); then run anchor_after2 . $ANCHOR; run anchor_before2 .bench/before $ANCHOR; fi
python - <<'PY'
import json, glob, os
out = os.environ["OUT"]
print(f"{'run':16s} {'steps':>5s} {'steady_tok/s':>12s} {'median tok/s':>12s} {'first_step_s':>12s} {'val_bpb':>8s} {'peak_MiB':>9s}")
for f in sorted(glob.glob(f"{out}/runs/*.jsonl")):
    s = [json.loads(l) for l in open(f) if '"summary"' in l]
    if not s: print(os.path.basename(f), "no summary"); continue
    s = s[-1]; st = s.get("step_times") or {}
    print(f"{os.path.basename(f)[:-6]:16s} {s['steps']:5d} {s['steady_tok_per_sec']:12,.0f} {st.get('median_tok_per_sec', 0):12,.0f} "
          f"{s['first_step_sec']:12.2f} {s['final_val_bpb']:8.4f} {s['peak_mib'] or 0:9,.0f}")
PY
tar -czf $OUT/runs.tar.gz -C $OUT runs && rm -rf $OUT/runs
