#!/usr/bin/env bash
# The main job: set up, prepare data + tokenizer, pretrain a base model.
#
#   bash runs/speedrun_small.sh                        # GPU: d12 anchor config; CPU: a tiny config
#   DEPTH=20 NUM_ITERATIONS=2000 bash runs/speedrun_small.sh
#   DRY_RUN=1 bash runs/speedrun_small.sh              # print the resolved command, run nothing
#
# Every environment variable below maps to one base_train flag (docs/feature_flags.md lists them);
# BASE_TRAIN_EXTRA_ARGS is appended last, so its flags win. Unset variables keep the defaults.
# A mistyped variable (NUM_ITERS=5) is an error, with the name it probably meant.
# WANDB_RUN is nanochat's name for RUN_NAME (the wandb run; unset or "dummy" = no wandb), and
# WANDB_PROJECT picks the wandb project.
# After training: a report (val bpb, samples, the checkpoint, the commands to use it next), unless
# REPORT=0; REPORT_SAMPLES=N samples (default 3, 0 = none). Its numbers come from the run's metrics
# file: METRICS_FILE, else <base_dir>/base_checkpoints/<model tag>/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

# Before anything runs (stdlib only, so before setup too). The compare script runs this one with its
# own variables still in the environment: those are accepted.
"${PYTHON:-python3}" -m nanochat.runner_env runs/speedrun_small.sh --also runs/dynamic_suffix_compare.sh

die() { echo "speedrun_small.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^-?[0-9]+$ ]]; }
is_num() { [[ "$1" =~ ^-?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; }
is_bool() { [[ "$1" == 0 || "$1" == 1 ]]; }

SKIP_SETUP=${SKIP_SETUP:-0}
PREPARE_DATA=${PREPARE_DATA:-auto}
DRY_RUN=${DRY_RUN:-0}
NUM_SHARDS=${NUM_SHARDS:-8}
DATASET=${DATASET:-climbmix}
LOG_FILE=${LOG_FILE:-}
REPORT=${REPORT:-1}
REPORT_SAMPLES=${REPORT_SAMPLES:-3}
is_bool "$SKIP_SETUP" || die "SKIP_SETUP=$SKIP_SETUP must be 0 or 1"
is_bool "$DRY_RUN" || die "DRY_RUN=$DRY_RUN must be 0 or 1"
[[ "$PREPARE_DATA" =~ ^(auto|0|1)$ ]] || die "PREPARE_DATA=$PREPARE_DATA must be auto, 0 or 1"
is_int "$NUM_SHARDS" || die "NUM_SHARDS=$NUM_SHARDS must be an integer"
is_bool "$REPORT" || die "REPORT=$REPORT must be 0 or 1"
is_int "$REPORT_SAMPLES" && (( REPORT_SAMPLES >= 0 )) || die "REPORT_SAMPLES=$REPORT_SAMPLES must be an integer >= 0"
if [[ -n "${WANDB_RUN:-}" ]]; then
  [[ -z "${RUN_NAME:-}" || "$RUN_NAME" == "$WANDB_RUN" ]] \
    || die "WANDB_RUN=$WANDB_RUN and RUN_NAME=$RUN_NAME name the same run (--run) differently; set one of them"
  RUN_NAME=$WANDB_RUN
fi
[[ -z "${WANDB_PROJECT:-}" ]] || export WANDB_PROJECT  # read by nanochat.common.init_wandb
# The rule of nanochat.common.get_base_dir, here so that DRY_RUN needs no Python packages.
BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

# ---------------------------------------------------------------------------- setup
if [[ "$SKIP_SETUP" == 0 && "$DRY_RUN" == 0 ]]; then
  if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  if ! python -c "import torch" >/dev/null 2>&1; then
    if [[ "$has_gpu" == 0 ]]; then
      # No GPU: take the CPU build first (PyPI's default Linux wheel is a multi-GB CUDA build).
      # torch alone from the CPU index (its dependencies come from PyPI below); fall back to PyPI.
      pip install -q --no-deps --timeout 15 --retries 0 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        || pip install -q "torch==2.13.0"
    fi
  fi
  # Before 0.2.0 the distribution was called nanochat: drop that name's editable install of this
  # checkout, or two distributions would claim the one `nanochat` package.
  if pip show nanochat 2>/dev/null | grep -qxF "Editable project location: $PWD"; then pip uninstall -y -q nanochat; fi
  # torchao is the optional FP8 backend: installed only when this run asks for it
  if [[ "${USE_FP8:-0}" == 1 && "${FP8_BACKEND:-custom}" == torchao ]]; then pip install -q -e ".[dev,fp8]"; else pip install -q -e ".[dev]"; fi
  if [[ "$has_gpu" == 1 ]]; then
    # cuDNN's native sliding-window attention for --window-pattern with S layers (the `cudnn` attention
    # backend; throughput.md section 13). --no-deps: its torch op needs only cuDNN, which torch ships.
    pip install -q --no-deps "nvidia-cudnn-frontend>=1.32" \
      || echo "WARNING: nvidia-cudnn-frontend did not install; S layers will use FlexAttention (slower)" >&2
  fi
elif [[ -x .venv/bin/python && "$DRY_RUN" == 0 ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
PY=${PYTHON:-python}

# ---------------------------------------------------------------------------- config
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
is_int "$NPROC_PER_NODE" && (( NPROC_PER_NODE >= 1 )) || die "NPROC_PER_NODE=$NPROC_PER_NODE must be an integer >= 1"
if [[ "$has_gpu" == 1 ]]; then
  : "${DEPTH:=12}" "${MAX_SEQ_LEN:=1024}" "${DEVICE_BATCH_SIZE:=32}" "${TOTAL_BATCH_SIZE:=32768}"
  : "${NUM_ITERATIONS:=520}" "${EVAL_EVERY:=100}" "${EVAL_TOKENS:=524288}" "${WINDOW_PATTERN:=L}"
  DEVICE_ARGS=()
else
  # CPU: a config that trains visibly in a few minutes on 2 cores.
  : "${DEPTH:=4}" "${MAX_SEQ_LEN:=256}" "${DEVICE_BATCH_SIZE:=8}" "${TOTAL_BATCH_SIZE:=4096}"
  : "${NUM_ITERATIONS:=300}" "${EVAL_EVERY:=100}" "${EVAL_TOKENS:=32768}" "${WINDOW_PATTERN:=L}"
  : "${ASPECT_RATIO:=32}" "${HEAD_DIM:=64}" "${TOK_VOCAB_SIZE:=4096}" "${TOK_MAX_CHARS:=20000000}"
  DEVICE_ARGS=(--device-type=cpu --no-compile)
fi
: "${TOK_VOCAB_SIZE:=32768}" "${TOK_MAX_CHARS:=2000000000}"

ARGS=()
add() { ARGS+=("$1=$2"); }                          # add FLAG VALUE
opt() { local v=${!1:-}; [[ -z "$v" ]] || add "$2" "$v"; }    # opt ENV FLAG
flag() { local v=${!1:-}; [[ -z "$v" ]] && return 0; is_bool "$v" || die "$1=$v must be 0 or 1"; [[ "$v" == 1 ]] && ARGS+=("$2"); return 0; }
int_opt() { local v=${!1:-}; [[ -z "$v" ]] && return 0; is_int "$v" || die "$1=$v must be an integer"; add "$2" "$v"; }
num_opt() { local v=${!1:-}; [[ -z "$v" ]] && return 0; is_num "$v" || die "$1=$v must be a number"; add "$2" "$v"; }
choice_opt() { local v=${!1:-}; [[ -z "$v" ]] && return 0; [[ " $3 " == *" $v "* ]] || die "$1=$v must be one of: $3"; add "$2" "$v"; }

# Base (nanochat) variables
opt RUN_NAME --run
opt MODEL_TAG --model-tag
int_opt DEPTH --depth
int_opt ASPECT_RATIO --aspect-ratio
int_opt HEAD_DIM --head-dim
opt WINDOW_PATTERN --window-pattern
int_opt MAX_SEQ_LEN --max-seq-len
opt DEVICE_BATCH_SIZE --device-batch-size  # an integer or auto (base_train checks it)
int_opt TOTAL_BATCH_SIZE --total-batch-size
int_opt NUM_ITERATIONS --num-iterations
num_opt TARGET_PARAM_DATA_RATIO --target-param-data-ratio
num_opt TARGET_FLOPS --target-flops
int_opt EVAL_EVERY --eval-every
int_opt EVAL_TOKENS --eval-tokens
int_opt SAVE_EVERY --save-every
int_opt SEED --seed
num_opt TIME_BUDGET_SEC --time-budget-sec
opt METRICS_FILE --metrics-file
# FP8 (finer knobs: BASE_TRAIN_EXTRA_ARGS="--fp8-skip-lm-head --fp8-min-dim=256 ...")
flag USE_FP8 --fp8
choice_opt FP8_BACKEND --fp8-backend "custom torchao"
choice_opt FP8_RECIPE --fp8-recipe "tensorwise rowwise"
# Dynamic suffix
choice_opt BLOCK_UPDATE_SCHEDULE --block-update-schedule "full_update dynamic_suffix layer_drop depth_growth"
int_opt DYN_WARMUP_STEPS --dyn-warmup-steps
int_opt DYN_PROBE_EVERY --dyn-probe-every
int_opt DYN_REFRESH_EVERY --dyn-refresh-every
choice_opt DYN_RELEVANCE_METRIC --dyn-relevance-metric "grad_ratio saliency_abs_gp"
num_opt DYN_RELEVANCE_THRESHOLD --dyn-relevance-threshold
int_opt DYN_MIN_ACTIVE_LAYERS --dyn-min-active-layers
int_opt DYN_MAX_ACTIVE_LAYERS --dyn-max-active-layers
int_opt DYN_FREEZE_START_STEP --dyn-freeze-start-step
num_opt DYN_FREEZE_START_FRAC --dyn-freeze-start-frac
num_opt DYN_EMA_DECAY --dyn-ema-decay
num_opt DYN_EPS --dyn-eps
int_opt DYN_LOG_EVERY --dyn-log-every
num_opt DROP_RATE_START --drop-rate-start
num_opt DROP_FULL_DEPTH_AT --drop-full-depth-at
choice_opt DROP_MODE --drop-mode "bernoulli fixed"
num_opt GROWTH_AT --growth-at
int_opt GROWTH_FACTOR --growth-factor
# Muon
flag MUON_ACTIVE_ONLY_STACK --muon-active-only-stack
int_opt MUON_STACK_CHUNK_SIZE --muon-stack-chunk-size
# LM-head cross-entropy
choice_opt LM_CE_BACKEND --lm-ce-backend "baseline chunked"
int_opt LM_CE_CHUNK_SIZE --lm-ce-chunk-size
choice_opt LM_CE_KERNEL --lm-ce-kernel "auto triton inductor"
# Memory (docs/optimizations/memory.md)
choice_opt ACTIVATION_CHECKPOINTING --activation-checkpointing "none blocks selective auto"

read -r -a EXTRA <<< "${BASE_TRAIN_EXTRA_ARGS:-}"

# last_flag --name DEFAULT: the value base_train will see for --name (the last one given wins).
last_flag() {
  local name=$1 val=$2 prev="" a
  for a in "${ARGS[@]}" "${EXTRA[@]}"; do
    [[ "$prev" == "$name" ]] && val=$a
    [[ "$a" == "$name="* ]] && val=${a#*=}
    prev=$a
  done
  echo "$val"
}
# The run's checkpoint directory (base_train's rule: --model-tag, else d<depth>) also holds its
# metrics file when none is given: the end report reads the final numbers from it.
RUN_TAG=$(last_flag --model-tag "")
RUN_TAG=${RUN_TAG:-d$(last_flag --depth "")}
RUN_DIR="$BASE_DIR/base_checkpoints/$RUN_TAG"
METRICS=$(last_flag --metrics-file "")
if [[ -z "$METRICS" && "$REPORT" == 1 ]]; then
  METRICS="$RUN_DIR/metrics.jsonl"
  add --metrics-file "$METRICS"
fi
if [[ "$NPROC_PER_NODE" == 1 ]]; then
  LAUNCH=("$PY" -m scripts.base_train)
else
  # "--" ends torchrun's own options: without it torchrun reads --run=NAME as an abbreviation of
  # its --run-path and stops with "ambiguous option".
  LAUNCH=("$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC_PER_NODE" -m scripts.base_train --)
fi
CMD=("${LAUNCH[@]}" "${DEVICE_ARGS[@]}" "${ARGS[@]}" "${EXTRA[@]}")

echo "speedrun_small.sh: gpu=$has_gpu nproc=$NPROC_PER_NODE prepare_data=$PREPARE_DATA"
echo "speedrun_small.sh: command: ${CMD[*]}"
if [[ "$DRY_RUN" == 1 ]]; then exit 0; fi

# ---------------------------------------------------------------------------- data + tokenizer
say() { echo "speedrun_small.sh: $*"; }
# Both steps can be silent for minutes (a shard is ~100 MB; BPE on 2B characters): say when each
# starts and ends, and that the tokenizer is still at work.
HEARTBEAT=""
stop_heartbeat() { [[ -z "$HEARTBEAT" ]] || kill "$HEARTBEAT" 2>/dev/null || true; HEARTBEAT=""; }
trap stop_heartbeat EXIT
if [[ "$PREPARE_DATA" == 1 || ( "$PREPARE_DATA" == auto && -z "$(ls "$BASE_DIR"/base_data/*.parquet 2>/dev/null)" ) ]]; then
  say "[data] downloading $NUM_SHARDS $DATASET train shards and the val shard to $BASE_DIR/base_data (a line per shard)"
  t0=$SECONDS
  if "$PY" -m nanochat.dataset -n "$NUM_SHARDS" --dataset "$DATASET"; then
    say "[data] done in $((SECONDS - t0))s"
  else
    say "[data] download failed (above); using the shards already in $BASE_DIR/base_data, else the embedded sample"
  fi
fi
if [[ "$PREPARE_DATA" == 1 || ( "$PREPARE_DATA" == auto && ! -f "$BASE_DIR/tokenizer/tokenizer.json" ) ]]; then
  say "[tokenizer] training a $TOK_VOCAB_SIZE-token BPE on up to $TOK_MAX_CHARS characters"
  t0=$SECONDS
  # (sleep's output to /dev/null: once the loop is killed, a left-over sleep must not hold a pipe
  # that reads this script's output, such as `| tee`, open)
  ( while sleep 60 >/dev/null 2>&1; do say "[tokenizer] still training ($(( (SECONDS - t0) / 60 )) min)"; done ) &
  HEARTBEAT=$!
  "$PY" -m scripts.tok_train --vocab-size="$TOK_VOCAB_SIZE" --max-chars="$TOK_MAX_CHARS"
  stop_heartbeat
  say "[tokenizer] done in $((SECONDS - t0))s"
  # tok_train has shown the embedded-sample banner if the sample is in use: base_train says it in one line.
  export NANOCHAT_SAMPLE_BANNER_SHOWN=1
else
  have_vocab=$("$PY" -c "from nanochat.tokenizer import get_tokenizer; print(get_tokenizer().get_vocab_size())" 2>/dev/null || echo "?")
  say "[tokenizer] using the existing one in $BASE_DIR/tokenizer (vocab $have_vocab); PREPARE_DATA=1 retrains it"
  if [[ "$have_vocab" != "$TOK_VOCAB_SIZE" ]]; then
    say "WARNING: that tokenizer has vocab $have_vocab, this config asks for $TOK_VOCAB_SIZE (e.g. trained by a CPU smoke run on the embedded sample)"
  fi
fi

# ---------------------------------------------------------------------------- train
# A stop signal to this script (SIGTERM, SIGINT) goes to the trainer: every rank finishes its
# step, saves and exits 0. Under torchrun it goes to the worker processes, not to torchrun, which
# would stop them the same way but then exit 1 with a traceback of its own.
stop_training() {
  if [[ "$NPROC_PER_NODE" == 1 ]]; then kill -TERM "$1" 2>/dev/null || true
  else pkill -TERM -P "$1" 2>/dev/null || true; fi
}
train() {
  "${CMD[@]}" &
  local pid=$! rc=0
  trap 'stop_training '"$pid" TERM INT
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # else a trapped signal cut the wait short: the run is saving
  done
  trap - TERM INT
  return "$rc"
}
say "[train] $RUN_TAG"
[[ -z "$METRICS" ]] || mkdir -p "$(dirname "$METRICS")"
if [[ -n "$LOG_FILE" ]]; then
  mkdir -p "$(dirname "$LOG_FILE")"
  train > >(tee "$LOG_FILE") 2>&1
else
  train
fi

# ---------------------------------------------------------------------------- report
if [[ "$REPORT" == 1 ]]; then
  # The suggested base_eval: on CPU, bpb on as many tokens as training evaluated (its defaults are
  # sized for a GPU).
  EVAL_SUGGEST=""
  [[ "$has_gpu" == 1 ]] || EVAL_SUGGEST="--device-type=cpu --evals=bpb,sample --eval-tokens=$EVAL_TOKENS"
  # base_eval takes no auto: its own default batch then
  [[ "$has_gpu" == 1 ]] || ! is_int "$DEVICE_BATCH_SIZE" || EVAL_SUGGEST+=" --device-batch-size=$DEVICE_BATCH_SIZE"
  REPORT_CMD=("$PY" -m nanochat.run_report "--metrics-file=$METRICS" "--checkpoint-dir=$RUN_DIR" "--model-tag=$RUN_TAG"
              "--samples=$REPORT_SAMPLES" "--eval-args=$EVAL_SUGGEST")
  if [[ -n "$LOG_FILE" ]]; then
    "${REPORT_CMD[@]}" 2>&1 | tee -a "$LOG_FILE" || echo "speedrun_small.sh: WARNING: the report failed (training succeeded)" >&2
  else
    "${REPORT_CMD[@]}" || echo "speedrun_small.sh: WARNING: the report failed (training succeeded)" >&2
  fi
fi
