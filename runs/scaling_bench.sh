#!/usr/bin/env bash
# Data-parallel scaling at the d12 anchor shape: each arm on 1 GPU and on NPROC GPUs with one
# micro-step per rank (total batch = 32,768 x ranks), all arms in one job, then a table of steady
# tok/s and the scaling factor, plus a same-total-batch loss check (1 GPU x NPROC accumulation
# steps vs NPROC GPUs: the losses must agree). docs/distributed.md has the measured numbers.
#
#   bash runs/scaling_bench.sh                       # 2 GPUs, 80 steps per arm
#   NPROC=4 STEPS=150 OUT_DIR=results/scaling bash runs/scaling_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
STEPS=${STEPS:-80}
OUT_DIR=${OUT_DIR:-results/scaling}
ARMS=${ARMS:-"full:;dyn:--block-update-schedule=dynamic_suffix --dyn-relevance-threshold=0.6 --muon-active-only-stack;full_fp8:--fp8;dyn_fp8:--fp8 --block-update-schedule=dynamic_suffix --dyn-relevance-threshold=0.6 --muon-active-only-stack"}
[[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -ge 2 ]] || { echo "scaling_bench.sh: NPROC=$NPROC must be an integer >= 2" >&2; exit 2; }
[[ "$STEPS" =~ ^[0-9]+$ && "$STEPS" -ge 3 ]] || { echo "scaling_bench.sh: STEPS=$STEPS must be an integer >= 3" >&2; exit 2; }
mkdir -p "$OUT_DIR"
BASE="--depth=12 --window-pattern=L --max-seq-len=1024 --device-batch-size=32 --eval-every=-1 --save-every=-1"
go() {  # name nproc args...
  local name=$1 np=$2; shift 2
  local launch=(python -m scripts.base_train)
  # "--" ends torchrun's options (it would read --run=... as its --run-path)
  [[ $np -gt 1 ]] && launch=(python -m torch.distributed.run --standalone "--nproc_per_node=$np" -m scripts.base_train --)
  # shellcheck disable=SC2086
  "${launch[@]}" $BASE --model-tag="scaling_$name" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo "$name: exit $? $(grep -E '^done:' "$OUT_DIR/$name.log" | cut -c1-120)"
}
tok() { grep -oE "steady tok/s [0-9,]+" "$OUT_DIR/$1.log" | tr -dc 0-9; }
# tokens / median step time (steps after the first): shows the rate without one-off stalls, which
# the steady (mean) rate includes
median_tok() { python - "$OUT_DIR/$1.log" "$2" <<'PY'
import re, statistics, sys
dts = [float(m) for m in re.findall(r"^step \d+/\d+ .*\| dt ([\d.]+)ms", open(sys.argv[1]).read(), re.M)][1:]
print(int(int(sys.argv[2]) / (statistics.median(dts) / 1000)) if dts else 0)
PY
}
IFS=';' read -r -a arm_list <<< "$ARMS"
for arm in "${arm_list[@]}"; do
  name=${arm%%:*}; extra=${arm#*:}
  # shellcheck disable=SC2086
  go "${name}_1gpu" 1 --total-batch-size=32768 --num-iterations="$STEPS" $extra
  # shellcheck disable=SC2086
  go "${name}_${NPROC}gpu" "$NPROC" --total-batch-size=$((32768 * NPROC)) --num-iterations="$STEPS" $extra
done
go same_batch_1gpu 1 --total-batch-size=$((32768 * NPROC)) --num-iterations=10
go "same_batch_${NPROC}gpu" "$NPROC" --total-batch-size=$((32768 * NPROC)) --num-iterations=10
echo
printf "%-12s %14s %14s %8s   %s\n" arm "1 GPU tok/s" "$NPROC GPUs tok/s" scaling "(by median step: 1 GPU, $NPROC GPUs, scaling)"
for arm in "${arm_list[@]}"; do
  name=${arm%%:*}; a=$(tok "${name}_1gpu"); b=$(tok "${name}_${NPROC}gpu")
  ma=$(median_tok "${name}_1gpu" 32768); mb=$(median_tok "${name}_${NPROC}gpu" $((32768 * NPROC)))
  python -c "a, b, ma, mb = ${a:-0}, ${b:-0}, ${ma:-0}, ${mb:-0}; r = lambda x, y: x / y if y else float('nan')
print(f'{\"$name\":12s} {a:14,} {b:14,} {r(b, a):7.3f}x   ({ma:,}, {mb:,}, {r(mb, ma):.3f}x)')"
done
echo "same total batch, loss per step (1 GPU x $NPROC accumulation | $NPROC GPUs):"
paste <(grep -oE "^step [0-9]+/10 \| loss [0-9.]+" "$OUT_DIR/same_batch_1gpu.log") \
      <(grep -oE "^step [0-9]+/10 \| loss [0-9.]+" "$OUT_DIR/same_batch_${NPROC}gpu.log")
