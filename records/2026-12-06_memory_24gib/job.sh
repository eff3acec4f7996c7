#!/usr/bin/env bash
# Issue #26: the memory table on an allocator capped at 24 GiB, seq 2048, total batch 32,768; then the GPU tests of recompute.
set -uo pipefail
source runs/offline_env.sh; export NANOCHAT_BASE_DIR
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
python -c "import torch; print(torch.__version__, torch.version.cuda)" >> $OUT/gpu.txt
V=20:none:4,20:none:8,20:selective:8,20:blocks:8,20:blocks:16,12:none:16,12:selective:16,12:blocks:16
V=$V,26:none:2,26:none:4,26:selective:4,26:blocks:8,26:blocks:16,28:none:1,28:selective:2,28:blocks:8,12:none:8
echo "python -m scripts.bench_memory --variants=$V --seq-lens=2048 --memory-gib=24" > $OUT/command.txt
timeout ${BENCH_LIMIT:-400} python -m scripts.bench_memory --variants=$V --seq-lens=2048 --memory-gib=24 > $OUT/bench_memory.txt 2> $OUT/bench_memory.err
echo "bench rc=$?"
grep -v "^|" $OUT/bench_memory.txt; grep "^|" $OUT/bench_memory.txt
timeout ${TEST_LIMIT:-100} python -m pytest -m gpu -q -x tests/test_memory.py tests/test_robustness.py > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$?"; tail -4 $OUT/gpu_tests.txt
