#!/usr/bin/env bash
# Issue #26: rows near the 24 GiB edge with the allocator as base_train sets it (expandable segments), and shapes the revised estimate was not fitted on (d22, d24 blocks 2, d26 blocks 4, d30 blocks 4).
set -uo pipefail
source runs/offline_env.sh; export NANOCHAT_BASE_DIR
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
V=28:selective:4,30:blocks:16,20:selective:16,24:blocks:2,22:blocks:16,26:blocks:4,30:blocks:4,22:selective:8,28:none:2,30:none:1,26:none:4,26:selective:8,24:selective:8,20:none:8,30:blocks:8
echo "python -m scripts.bench_memory --variants=$V --seq-lens=2048 --memory-gib=24" > $OUT/command.txt
timeout ${BENCH_LIMIT:-230} python -m scripts.bench_memory --variants=$V --seq-lens=2048 --memory-gib=24 > $OUT/alloc_s2048.txt 2> $OUT/alloc_s2048.err
echo "rc=$?"; grep -v "^|" $OUT/alloc_s2048.txt; grep "^|" $OUT/alloc_s2048.txt | grep -v "^|---"
