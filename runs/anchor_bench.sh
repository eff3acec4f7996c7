#!/usr/bin/env bash
# Run the d12 anchor config once per arm on one GPU and print a table (median-free: one run per
# arm; repeat arms to see the noise). Compile, steady tok/s, MFU, peak memory and val bpb come
# from base_train's own summary lines.
#
#   ARMS="base:;chunked:--lm-ce-backend=chunked" bash runs/anchor_bench.sh
#   STEPS=520 OUT_DIR=results/anchor bash runs/anchor_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ARMS=${ARMS:-"full_update:"}
STEPS=${STEPS:-520}
OUT_DIR=${OUT_DIR:-results/anchor}
ANCHOR=${ANCHOR:-"--depth=12 --window-pattern=L --max-seq-len=1024 --device-batch-size=32 --total-batch-size=32768"}
EVAL=${EVAL:-"--eval-every=260 --eval-tokens=524288"}
mkdir -p "$OUT_DIR"
BASE_DIR=$(python -c "from nanochat.common import get_base_dir; print(get_base_dir())")
if [[ ! -f "$BASE_DIR/tokenizer/tokenizer.json" ]]; then
  python -m scripts.tok_train --vocab-size="${TOK_VOCAB_SIZE:-32768}"
fi
IFS=';' read -r -a arm_list <<< "$ARMS"
for arm in "${arm_list[@]}"; do
  name=${arm%%:*}; extra=${arm#*:}
  echo "=== arm $name: $extra"
  # shellcheck disable=SC2086
  python -m scripts.base_train --run=dummy $ANCHOR --num-iterations="$STEPS" $EVAL --model-tag="bench_$name" $extra \
    2>&1 | tee "$OUT_DIR/$name.log" | grep -E "^(step [0-9]+ \| val|done:|attention|FP8|dyn)" || true
done
echo
printf "%-22s %10s %12s %8s %12s %10s\n" arm first_step steady_tok/s mfu peak_MiB val_bpb
for arm in "${arm_list[@]}"; do
  name=${arm%%:*}; log="$OUT_DIR/$name.log"
  python - "$log" "$name" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
done = re.search(r"done: .*?\(([\d.]+)s incl. compile\) \| steady tok/s ([\d,]+|nan) \| peak memory ([\d,]+)MiB", text)
mfus = [float(x) for x in re.findall(r"mfu ([\d.]+)%", text)][10:]
vals = re.findall(r"^step \d+ \| val bpb ([\d.]+)", text, re.M)
mfu = sorted(mfus)[len(mfus) // 2] if mfus else float("nan")
if done:
    print(f"{sys.argv[2]:22s} {done.group(1):>9}s {done.group(2):>12} {mfu:7.1f}% {done.group(3):>12} {vals[-1] if vals else 'nan':>10}")
else:
    print(f"{sys.argv[2]:22s} FAILED (see {sys.argv[1]})")
PY
done
