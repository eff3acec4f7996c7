#!/usr/bin/env bash
set -u
source runs/offline_env.sh
R=$OUT/r; mkdir -p $R
fresh() { export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d); }
A="--depth=12 --window-pattern=L --max-seq-len=1024 --device-batch-size=32 --total-batch-size=32768 --save-every=-1 --run=dummy"
D20="--depth=20 --window-pattern=L --max-seq-len=2048 --device-batch-size=16 --total-batch-size=32768 --num-iterations=12 --eval-every=-1 --save-every=-1 --run=dummy"
fresh; timeout 150 python -m scripts.base_train $D20 --model-tag=d20b > $R/d20_bf16_cold.log 2>&1
fresh; timeout 150 python -m scripts.base_train $D20 --fp8 --fp8-no-allow-in-graph --model-tag=d20f > $R/d20_fp8_cold.log 2>&1
fresh; timeout 150 python -m scripts.base_train $A --num-iterations=520 --eval-every=520 --eval-tokens=524288 --model-tag=a520 > $R/anchor520.log 2>&1
timeout 150 python -m scripts.base_train $A --num-iterations=520 --eval-every=520 --eval-tokens=524288 --fp8 --fp8-no-allow-in-graph --model-tag=a520f > $R/anchor520_fp8.log 2>&1
timeout 170 python -m scripts.bench_step --fp8=off,custom,custom-traced --steps=30 > $R/fp8_d12.log 2>&1
tar czf $OUT/r.tgz -C $OUT r
grep -A5 "^compile/ortho" $R/fp8_d12.log; for f in d20_bf16_cold d20_fp8_cold anchor520 anchor520_fp8; do echo "$f: $(grep -h '^done' $R/$f.log | cut -c1-230)"; done
