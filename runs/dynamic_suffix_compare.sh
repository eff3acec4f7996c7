#!/usr/bin/env bash
# A/B sweeps of block-update schedules and other features, then `python -m scripts.compare_report
# RESULTS_DIR` (summary.csv, summary.md, val_bpb_vs_time.png). docs/compare.md explains every number.
# Two modes:
#
# FRONTIER (BASELINE_DEPTHS or ARMS set): a speed-up is judged against the best full_update of ANY
# depth given the same step time. Every run gets --time-budget-sec=TIME_BUDGET_SEC (its LR schedule
# spans elapsed/budget, so no arm wins by a longer or later schedule) and --num-iterations=-1.
#   TIME_BUDGET_SEC=120 SEEDS="1 2 3" BASELINE_DEPTHS="6 8 10 12" EVAL_EVERY=50 \
#   ARMS="dyn_d12:--depth=12 --block-update-schedule=dynamic_suffix --dyn-relevance-threshold=0.4 --muon-active-only-stack" \
#   BUDGET_FRACTION=0.8 RECORD_DIR=records/2026-12-10_frontier_d6-d12_120s bash runs/dynamic_suffix_compare.sh
#   BASELINE_DEPTHS   space-separated depths of the full_update baselines (arm base_d<depth>)
#   ARMS              feature arms, `name:flags` separated by `;`. flags are base_train flags, `--depth=N`
#                     required, everything else free (--block-update-schedule=<any>, its own flags,
#                     --fp8, ...); values without spaces. Run-specific flags (--seed, --model-tag,
#                     --metrics-file, --num-iterations, --time-budget-sec, --eval-every, --eval-tokens,
#                     --resume-*) are refused, and so are LR-schedule flags (--warmup-ratio,
#                     --warmdown-ratio, --final-lr-frac) unless ALLOW_UNEQUAL_SCHEDULES=1
#   TIME_BUDGET_SEC   required; several budgets ("60 120 240") run every arm at each (the frontier:
#                     the best baseline per budget)
#   BUDGET_FRACTION   e.g. "0.8": every feature arm also runs on 0.8 x TIME_BUDGET_SEC (arm
#                     <name>_f0.8, LR schedule over its own shorter budget); the report sets its
#                     final val bpb against the best baseline's on the full budget
#   EVAL_TOKENS       default 1048576; fewer is refused unless ALLOW_FEW_EVAL_TOKENS=1 (the report's
#                     headline then says so)
#   EVAL_EVERY        intermediate evals (steps) for each arm's time to the best baseline's final val
#                     bpb; the final eval always runs
#   COMPILE_CACHE     default per_run here: compile is inside the budget, so every arm compiles cold
#   DEPTH, NUM_ITERATIONS, FULL_/DYNAMIC_NUM_ITERATIONS, DYNAMIC_TIME_BUDGET_SEC and the schedule
#   variables DYN_* / DROP_* / GROWTH_* are refused (each arm states its depth and flags). Run ids:
#   <arm>_t<budget>_s<seed>.
#
# TWO-ARM (neither set): full_update vs dynamic_suffix of one config, one or more seeds per arm.
#   TIME_BUDGET_SEC=190 SEEDS="42 43 44" bash runs/dynamic_suffix_compare.sh             # equal wall-clock budget
#   NUM_ITERATIONS=520 EVAL_EVERY=20 SEEDS="1 2 3" bash runs/dynamic_suffix_compare.sh   # equal steps, time to target
#   USE_FP8_COMPARE=1 FP8_BACKEND_COMPARE=custom bash runs/dynamic_suffix_compare.sh     # FP8 in both arms
#   DRY_RUN=1 bash runs/dynamic_suffix_compare.sh                                        # print every command
# Each run is `bash runs/speedrun_small.sh` with environment variables, so every variable of that
# runner (DEPTH, MAX_SEQ_LEN, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, EVAL_TOKENS, EVAL_EVERY, LM_CE_*,
# MUON_*, BASE_TRAIN_EXTRA_ARGS, ...) applies to BOTH arms. The arms differ only in the schedule:
#   - BLOCK_UPDATE_SCHEDULE is set by this script (full_update / dynamic_suffix);
#   - every DYN_* variable goes to the dynamic arm only;
#   - FULL_NUM_ITERATIONS / DYNAMIC_NUM_ITERATIONS (default NUM_ITERATIONS, else the runner's default)
#     set each arm's steps; with TIME_BUDGET_SEC both arms get --time-budget-sec (the LR schedule
#     follows elapsed/budget) and the iteration counts, if set, are only caps.
#   DYNAMIC_TIME_BUDGET_SEC  a step-time budget for the dynamic arm only, while full_update runs its
#                     fixed FULL_NUM_ITERATIONS. Not with TIME_BUDGET_SEC.
#   Unequal LR schedules (different step counts without a time budget, or DYNAMIC_TIME_BUDGET_SEC)
#   are refused unless ALLOW_UNEQUAL_SCHEDULES=1: a longer or later schedule wins by itself.
#
# Both modes:
#   SEEDS="42"            space-separated weight-init seeds; each seed runs every arm, the order
#                         reversed for every other seed (full,dynamic then dynamic,full)
#   USE_FP8_COMPARE=0|1   --fp8 in every arm; FP8_BACKEND_COMPARE (custom|torchao) and
#                         FP8_RECIPE_COMPARE (tensorwise|rowwise) likewise
#   ALLOW_UNEQUAL_SCHEDULES=1  run and report arms whose LR schedules or token budgets differ (the
#                         report's headline says so); ALLOW_FEW_EVAL_TOKENS=1 likewise for EVAL_TOKENS
#   RESULTS_DIR           default results/dynamic_suffix_compare_<timestamp>
#   RECORD_DIR            records/YYYY-MM-DD_<what>: after the last run, the evidence (provenance,
#                         configs, runs.tsv, the report, every metrics JSONL, the plot) is copied there
#                         to commit as it is (compare_report --record)
#   WARMUP_STEPS=2        an unrecorded full_update run of this many steps first (does setup and data
#                         preparation, warms the page and compile caches); 0 = none
#   KEEP_CHECKPOINTS=0    1 keeps each run's final checkpoint (d12: GBs each)
#   COMPILE_CACHE=shared  shared: every run uses the caller's torch.compile caches, so a run after
#                         another (or after the warm-up) compiles from a warm cache; per_run: each
#                         recorded run gets empty TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR under
#                         RESULTS_DIR/compile_cache/ (removed after it), so every arm pays a cold
#                         compile, as on a fresh machine. At d20, which arm compiled cold moved a
#                         single seed's time-to-target ratio by ~0.1 (optimizations/dynamic_suffix.md).
#   MAX_RUNS=0            run at most this many arm runs now (0 = all), e.g. to fit a time limit;
#   RESUME=1              then continue in the same RESULTS_DIR with the same variables: runs already
#                         in its runs.tsv with exit code 0 are skipped (their commands must match).
#                         A RESUME call may also add seeds, arms or budget fractions (the plan grows;
#                         compare_config.txt holds the latest), never drop a run already done
#   SKIP_SETUP, PREPARE_DATA apply once (to the first run); every later run gets SKIP_SETUP=1 PREPARE_DATA=0.
# Run-specific variables (SEED, MODEL_TAG, METRICS_FILE, LOG_FILE, USE_FP8, FP8_BACKEND, FP8_RECIPE,
# BLOCK_UPDATE_SCHEDULE) are set per run here; setting them yourself is an error (exit 2).
#
# Output in RESULTS_DIR: <run>.log and <run>.metrics.jsonl per run, runs.tsv (one line per run:
# run_id, variant, schedule, seed, order, time_budget_sec, wall_sec, exit_code, metrics_file,
# log_file, command, role, depth, budget_fraction), compare_config.txt (mode, arms, seeds, allowances),
# provenance.txt (per call: the command with its variables, git commit and uncommitted files, GPU,
# CPU, torch), then from scripts/compare_report.py: summary.csv, one row per run, columns
# (docs/compare.md says exactly how each is computed):
#   variant, schedule, num_iterations, elapsed_sec, max_tok_per_sec, avg_tok_per_sec, final_loss,
#   min_val_bpb, avg_step_peak_vram_mib, peak_vram_mib, active_layers_mean, active_layers_range,
#   seed, tokens, compile_sec, setup_sec, final_val_bpb, wall_sec, status, run_id,
#   role, depth, n_layer, mean_trained_blocks, lr_schedule, time_budget_sec, budget_fraction,
#   eval_tokens, target_val_bpb, time_to_target_sec, time_to_target_ratio
# summary.md (frontier: the best baseline, the best feature arm, paired differences at equal time,
# time to the best baseline's final val bpb, the BUDGET_FRACTION check; two-arm: time to target,
# per-arm medians, ratios dynamic/full, paired val bpb differences; both: what each arm's block
# schedule did and the guards) and val_bpb_vs_time.png.
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD

ME=dynamic_suffix_compare.sh
say() { echo "$ME: $*"; }
die() { echo "$ME: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^-?[0-9]+$ ]]; }
is_num() { [[ "$1" =~ ^-?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; }
is_bool() { [[ "$1" == 0 || "$1" == 1 ]]; }
positive() { is_num "$1" && awk -v t="$1" 'BEGIN{exit !(t > 0)}'; }

# The call as given (the variables this script and speedrun_small.sh read), for provenance.txt.
ENV_NAMES=(SEEDS ARMS BASELINE_DEPTHS BUDGET_FRACTION 'ALLOW_[A-Z_]+' RECORD_DIR RESULTS_DIR TIME_BUDGET_SEC
  'DYNAMIC_[A-Z_]+' FULL_NUM_ITERATIONS NUM_ITERATIONS USE_FP8_COMPARE 'FP8_[A-Z_]+' WARMUP_STEPS KEEP_CHECKPOINTS
  COMPILE_CACHE MAX_RUNS RESUME SKIP_SETUP PREPARE_DATA DEPTH ASPECT_RATIO HEAD_DIM WINDOW_PATTERN MAX_SEQ_LEN
  DEVICE_BATCH_SIZE TOTAL_BATCH_SIZE 'TARGET_[A-Z_]+' 'EVAL_[A-Z_]+' SAVE_EVERY NPROC_PER_NODE BASE_TRAIN_EXTRA_ARGS
  'TOK_[A-Z_]+' NUM_SHARDS DATASET 'DYN_[A-Z_]+' 'MUON_[A-Z_]+' 'LM_CE_[A-Z_]+')
ENV_RE="^($(IFS='|'; echo "${ENV_NAMES[*]}"))$"
CALL_LINE=""
while IFS= read -r v; do CALL_LINE+="$v=${!v@Q} "; done < <(compgen -e | grep -E "$ENV_RE" | sort || true)
CALL_LINE+="bash runs/$ME"

# ---------------------------------------------------------------------------- validate (all at once)
SEEDS=${SEEDS:-42}
ARMS=${ARMS:-}
BASELINE_DEPTHS=${BASELINE_DEPTHS:-}
BUDGET_FRACTION=${BUDGET_FRACTION:-}
ALLOW_UNEQUAL_SCHEDULES=${ALLOW_UNEQUAL_SCHEDULES:-0}
ALLOW_FEW_EVAL_TOKENS=${ALLOW_FEW_EVAL_TOKENS:-0}
RECORD_DIR=${RECORD_DIR:-}
USE_FP8_COMPARE=${USE_FP8_COMPARE:-0}
FP8_BACKEND_COMPARE=${FP8_BACKEND_COMPARE:-}
FP8_RECIPE_COMPARE=${FP8_RECIPE_COMPARE:-}
FULL_NUM_ITERATIONS=${FULL_NUM_ITERATIONS:-${NUM_ITERATIONS:-}}
DYNAMIC_NUM_ITERATIONS=${DYNAMIC_NUM_ITERATIONS:-${NUM_ITERATIONS:-}}
TIME_BUDGET_SEC=${TIME_BUDGET_SEC:-}
DYNAMIC_TIME_BUDGET_SEC=${DYNAMIC_TIME_BUDGET_SEC:-}
WARMUP_STEPS=${WARMUP_STEPS:-2}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}
FRONTIER=0; [[ -z "$ARMS$BASELINE_DEPTHS" ]] || FRONTIER=1
COMPILE_CACHE=${COMPILE_CACHE:-$( ((FRONTIER)) && echo per_run || echo shared)}
DRY_RUN=${DRY_RUN:-0}
RESUME=${RESUME:-0}
MAX_RUNS=${MAX_RUNS:-0}
SKIP_SETUP=${SKIP_SETUP:-0}
PREPARE_DATA=${PREPARE_DATA:-auto}
PY=${PYTHON:-python}
MIN_EVAL_TOKENS=1048576

problems=()
bad() { problems+=("$*"); }
# unique_list NAME KIND CHECK VALUES...: each value passes CHECK and is listed once.
unique_list() {
  local name=$1 kind=$2 check=$3 x; shift 3
  local -A once=()
  for x in "$@"; do
    if ! "$check" "$x"; then bad "$name: '$x' is not $kind"
    elif [[ -n "${once[$x]:-}" ]]; then bad "$name: $x is listed twice"
    else once[$x]=1; fi
  done
}
is_seed() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_depth() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 >= 1 )); }
is_fraction() { positive "$1" && awk -v t="$1" 'BEGIN{exit !(t != 1)}'; }
read -r -a SEED_LIST <<< "$SEEDS"
(( ${#SEED_LIST[@]} >= 1 )) || bad "SEEDS is empty; give one or more integers, e.g. SEEDS=\"42 43 44\""
unique_list SEEDS "a non-negative integer" is_seed "${SEED_LIST[@]}"
read -r -a BUDGETS <<< "$TIME_BUDGET_SEC"
unique_list TIME_BUDGET_SEC "a number of seconds > 0" positive "${BUDGETS[@]}"
is_bool "$USE_FP8_COMPARE" || bad "USE_FP8_COMPARE=$USE_FP8_COMPARE must be 0 or 1"
[[ -z "$FP8_BACKEND_COMPARE" || "$FP8_BACKEND_COMPARE" =~ ^(custom|torchao)$ ]] \
  || bad "FP8_BACKEND_COMPARE=$FP8_BACKEND_COMPARE must be custom or torchao"
[[ -z "$FP8_RECIPE_COMPARE" || "$FP8_RECIPE_COMPARE" =~ ^(tensorwise|rowwise)$ ]] \
  || bad "FP8_RECIPE_COMPARE=$FP8_RECIPE_COMPARE must be tensorwise or rowwise"
if [[ "$USE_FP8_COMPARE" != 1 && ( -n "$FP8_BACKEND_COMPARE" || -n "$FP8_RECIPE_COMPARE" ) ]]; then
  bad "FP8_BACKEND_COMPARE / FP8_RECIPE_COMPARE need USE_FP8_COMPARE=1"
fi
for v in ALLOW_UNEQUAL_SCHEDULES ALLOW_FEW_EVAL_TOKENS KEEP_CHECKPOINTS DRY_RUN RESUME SKIP_SETUP; do
  is_bool "${!v}" || bad "$v=${!v} must be 0 or 1"
done
[[ "$WARMUP_STEPS" =~ ^[0-9]+$ ]] || bad "WARMUP_STEPS=$WARMUP_STEPS must be an integer >= 0"
[[ "$COMPILE_CACHE" == shared || "$COMPILE_CACHE" == per_run ]] \
  || bad "COMPILE_CACHE=$COMPILE_CACHE must be shared or per_run"
[[ "$MAX_RUNS" =~ ^[0-9]+$ ]] || bad "MAX_RUNS=$MAX_RUNS must be an integer >= 0 (0 = all)"
[[ "$PREPARE_DATA" =~ ^(auto|0|1)$ ]] || bad "PREPARE_DATA=$PREPARE_DATA must be auto, 0 or 1"
[[ -z "${EVAL_EVERY:-}" ]] || is_int "$EVAL_EVERY" || bad "EVAL_EVERY=$EVAL_EVERY must be an integer"
[[ -z "${EVAL_TOKENS:-}" ]] || is_int "$EVAL_TOKENS" || bad "EVAL_TOKENS=$EVAL_TOKENS must be an integer"
declare -A instead=([SEED]=SEEDS [MODEL_TAG]="(set per run)" [METRICS_FILE]="(set per run, in RESULTS_DIR)"
  [LOG_FILE]="(set per run, in RESULTS_DIR)" [USE_FP8]=USE_FP8_COMPARE [FP8_BACKEND]=FP8_BACKEND_COMPARE
  [FP8_RECIPE]=FP8_RECIPE_COMPARE [BLOCK_UPDATE_SCHEDULE]="(set per arm)")
for v in SEED MODEL_TAG METRICS_FILE LOG_FILE USE_FP8 FP8_BACKEND FP8_RECIPE BLOCK_UPDATE_SCHEDULE; do
  [[ -z "${!v:-}" ]] || bad "$v is set; the compare script sets it per run, use ${instead[$v]} (unset $v)"
done
SCHEDULE_VARS='^(DYN|DROP|GROWTH)_'  # speedrun_small.sh's variables of one block-update schedule
RUN_FLAGS_RE='^--(seed|model-tag|metrics-file|num-iterations|time-budget-sec|eval-every|eval-tokens|resume-from-step|resume-latest)(=|$)'
LR_FLAGS_RE='^--(warmup-ratio|warmdown-ratio|final-lr-frac)(=|$)'
read -r -a extra_args <<< "${BASE_TRAIN_EXTRA_ARGS:-}"
for a in "${extra_args[@]}"; do
  case "$a" in
    --block-update-schedule*|--dyn-*) bad "BASE_TRAIN_EXTRA_ARGS has $a; schedule flags go to one arm (ARMS, or DYN_* for the dynamic arm)";;
    --fp8|--fp8=*|--fp8-backend*|--fp8-recipe*) bad "BASE_TRAIN_EXTRA_ARGS has $a; use USE_FP8_COMPARE / FP8_*_COMPARE (or one arm's flags in ARMS)";;
  esac
  [[ ! "$a" =~ $RUN_FLAGS_RE ]] \
    || bad "BASE_TRAIN_EXTRA_ARGS has $a; the compare script sets it per run (see SEEDS, *_NUM_ITERATIONS, TIME_BUDGET_SEC, EVAL_*)"
done

# Frontier arms: parallel arrays, one entry per arm (baselines first, then ARMS in order).
ARM_NAMES=(); ARM_ROLES=(); ARM_DEPTHS=(); ARM_SCHEDS=(); ARM_FLAGS=()
read -r -a FRACTIONS <<< "$BUDGET_FRACTION"
if (( FRONTIER )); then
  (( ${#BUDGETS[@]} )) || bad "frontier mode (ARMS / BASELINE_DEPTHS) needs TIME_BUDGET_SEC: every arm gets that step-time budget, its LR schedule over it"
  [[ -n "$BASELINE_DEPTHS" ]] || bad "frontier mode needs BASELINE_DEPTHS (e.g. \"6 8 10 12\"): the full_update baselines"
  for v in DEPTH NUM_ITERATIONS FULL_NUM_ITERATIONS DYNAMIC_NUM_ITERATIONS DYNAMIC_TIME_BUDGET_SEC; do
    [[ -z "${!v:-}" ]] || bad "$v is set; in frontier mode every arm's depth and flags are in BASELINE_DEPTHS / ARMS and every run ends at TIME_BUDGET_SEC (unset $v)"
  done
  while IFS= read -r v; do
    bad "$v is set; in frontier mode schedule flags belong to an arm: ARMS=\"name:--depth=N --block-update-schedule=... --dyn-...\" (unset $v)"
  done < <(compgen -e | grep -E "$SCHEDULE_VARS" || true)
  read -r -a depth_list <<< "$BASELINE_DEPTHS"
  unique_list BASELINE_DEPTHS "an integer >= 1" is_depth "${depth_list[@]}"
  for d in "${depth_list[@]}"; do
    is_depth "$d" || continue
    ARM_NAMES+=("base_d$((10#$d))"); ARM_ROLES+=(baseline); ARM_DEPTHS+=("$((10#$d))"); ARM_SCHEDS+=(full_update); ARM_FLAGS+=("")
  done
  IFS=';' read -r -a arm_specs <<< "$ARMS"
  for spec in "${arm_specs[@]}"; do
    [[ "$spec" =~ [^[:space:]] ]] || continue
    name=${spec%%:*}; name=${name//[[:space:]]/}
    if [[ "$spec" != *:* ]]; then bad "ARMS: '$spec' is not name:flags (e.g. dyn_d12:--depth=12 --block-update-schedule=dynamic_suffix)"; continue; fi
    read -r -a toks <<< "${spec#*:}"
    [[ "$name" =~ ^[A-Za-z][A-Za-z0-9_.-]*$ ]] || bad "ARMS: arm name '$name' must start with a letter and hold only letters, digits, _ . -"
    [[ "$name" != base_d* ]] || bad "ARMS: arm name '$name': base_d<depth> names the baselines"
    [[ " ${ARM_NAMES[*]} " != *" $name "* ]] || bad "ARMS: arm $name is listed twice"
    depth=""; sched=full_update; flags=(); prev=""
    for t in "${toks[@]}"; do
      if [[ "$t" =~ $RUN_FLAGS_RE ]]; then bad "ARMS: arm $name has $t; the compare script sets it per run"
      elif [[ "$t" =~ $LR_FLAGS_RE && "$ALLOW_UNEQUAL_SCHEDULES" != 1 ]]; then
        bad "ARMS: arm $name has $t: its LR schedule would differ from the other arms' (set ALLOW_UNEQUAL_SCHEDULES=1 to compare anyway)"
      fi
      if [[ "$t" == --depth=* ]]; then depth=${t#--depth=}
      elif [[ "$prev" == --depth ]]; then depth=$t
      elif [[ "$t" == --block-update-schedule=* ]]; then sched=${t#*=}; flags+=("$t")
      elif [[ "$prev" == --block-update-schedule ]]; then sched=$t; flags+=("$t")
      elif [[ "$t" != --depth ]]; then flags+=("$t"); fi
      prev=$t
    done
    is_depth "$depth" || bad "ARMS: arm $name needs --depth=N (N >= 1) among its flags"
    ARM_NAMES+=("$name"); ARM_ROLES+=(feature); ARM_DEPTHS+=("$depth"); ARM_SCHEDS+=("$sched"); ARM_FLAGS+=("${flags[*]}")
  done
  unique_list BUDGET_FRACTION "a number > 0 other than 1" is_fraction "${FRACTIONS[@]}"
  [[ -z "$BUDGET_FRACTION" || " ${ARM_ROLES[*]} " == *" feature "* ]] || bad "BUDGET_FRACTION needs feature arms (ARMS)"
  : "${EVAL_TOKENS:=$MIN_EVAL_TOKENS}"
  if is_int "$EVAL_TOKENS" && (( EVAL_TOKENS < MIN_EVAL_TOKENS )) && [[ "$ALLOW_FEW_EVAL_TOKENS" != 1 ]]; then
    bad "EVAL_TOKENS=$EVAL_TOKENS < $MIN_EVAL_TOKENS: too few val tokens for a frontier claim (set ALLOW_FEW_EVAL_TOKENS=1 to run anyway; the report then says so)"
  fi
  export EVAL_TOKENS
else
  while IFS= read -r v; do
    [[ "$v" == DYN_* ]] || bad "$v is set; the two-arm mode compares dynamic_suffix with full_update: give other schedules' flags to a frontier arm (ARMS) (unset $v)"
  done < <(compgen -e | grep -E "$SCHEDULE_VARS" || true)
  [[ -z "$BUDGET_FRACTION" ]] || bad "BUDGET_FRACTION needs frontier mode (ARMS / BASELINE_DEPTHS)"
  (( ${#BUDGETS[@]} <= 1 )) || bad "TIME_BUDGET_SEC=\"$TIME_BUDGET_SEC\": several budgets need frontier mode (ARMS / BASELINE_DEPTHS)"
  for v in FULL_NUM_ITERATIONS DYNAMIC_NUM_ITERATIONS; do
    x=${!v}
    [[ -z "$x" ]] || { [[ "$x" =~ ^[0-9]+$ ]] && (( 10#$x >= 1 )); } \
      || bad "$v=$x must be an integer >= 1 (it defaults to NUM_ITERATIONS)"
  done
  [[ -z "$DYNAMIC_TIME_BUDGET_SEC" ]] || positive "$DYNAMIC_TIME_BUDGET_SEC" \
    || bad "DYNAMIC_TIME_BUDGET_SEC=$DYNAMIC_TIME_BUDGET_SEC must be a number of seconds > 0"
  [[ -z "$TIME_BUDGET_SEC" || -z "$DYNAMIC_TIME_BUDGET_SEC" ]] \
    || bad "TIME_BUDGET_SEC (both arms) and DYNAMIC_TIME_BUDGET_SEC (dynamic arm only) are exclusive; set one"
  if [[ "$ALLOW_UNEQUAL_SCHEDULES" != 1 ]]; then
    [[ -z "$DYNAMIC_TIME_BUDGET_SEC" ]] || bad "DYNAMIC_TIME_BUDGET_SEC gives the arms different LR schedules" \
      "(full_update over steps, dynamic over time); set ALLOW_UNEQUAL_SCHEDULES=1 to run it anyway (the report's" \
      "headline then says so), or use TIME_BUDGET_SEC"
    if [[ -z "$TIME_BUDGET_SEC" && "$FULL_NUM_ITERATIONS" != "$DYNAMIC_NUM_ITERATIONS" ]]; then
      bad "FULL_NUM_ITERATIONS=${FULL_NUM_ITERATIONS:-default} and DYNAMIC_NUM_ITERATIONS=${DYNAMIC_NUM_ITERATIONS:-default}" \
        "give the arms different LR schedules and token budgets (the longer one wins by its schedule); use" \
        "TIME_BUDGET_SEC for equal time, or set ALLOW_UNEQUAL_SCHEDULES=1 to run it anyway"
    fi
  fi
fi
if [[ -n "${RESULTS_DIR:-}" ]]; then
  [[ "$RESULTS_DIR" == /* ]] || RESULTS_DIR="$CALLER_PWD/$RESULTS_DIR"
else
  [[ "$RESUME" != 1 ]] || bad "RESUME=1 needs the RESULTS_DIR of the comparison to continue"
  RESULTS_DIR="$REPO/results/dynamic_suffix_compare_$(date +%Y%m%d_%H%M%S)"
fi
if [[ -e "$RESULTS_DIR/runs.tsv" && "$RESUME" != 1 ]]; then
  bad "RESULTS_DIR=$RESULTS_DIR already holds a comparison (runs.tsv); RESUME=1 continues it (same variables), or choose a new RESULTS_DIR"
fi
if [[ -n "$RECORD_DIR" ]]; then
  [[ "$RECORD_DIR" == /* ]] || RECORD_DIR="$CALLER_PWD/$RECORD_DIR"
  [[ "$(basename "$RECORD_DIR")" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}_[A-Za-z0-9._-]+$ ]] \
    || bad "RECORD_DIR=$RECORD_DIR: name the folder YYYY-MM-DD_<what> (e.g. records/2026-12-10_frontier_d6-d12_120s)"
  [[ ! -d "$RECORD_DIR" || -z "$(ls -A "$RECORD_DIR")" ]] || bad "RECORD_DIR=$RECORD_DIR exists and is not empty; evidence is never overwritten"
fi
if (( ${#problems[@]} )); then
  { echo "$ME: error: invalid environment:"; printf '  - %s\n' "${problems[@]}"; } >&2
  exit 2
fi

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi
if [[ "$has_gpu" == 1 && -z "${EVAL_TOKENS:-}" ]]; then
  export EVAL_TOKENS=524288  # val bpb on >= 500k tokens for quality claims (GUIDE section 7), within one pass of the corpus val split
fi
if [[ "$has_gpu" == 1 ]] && (( EVAL_TOKENS < 524288 )); then
  say "WARNING: EVAL_TOKENS=$EVAL_TOKENS < 524288: too few validation tokens for a quality claim"
fi
if (( ${#SEED_LIST[@]} < 3 )); then
  say "note: ${#SEED_LIST[@]} seed(s); quality claims need >= 3 (SEEDS=\"42 43 44\")"
fi

# ---------------------------------------------------------------------------- plan
WARMUP_STEPS=$((10#$WARMUP_STEPS))
MAX_RUNS=$((10#$MAX_RUNS))
FP8_TAG=""; [[ "$USE_FP8_COMPARE" == 1 ]] && FP8_TAG="_fp8"
STAMP=$(printf %s "$(basename "$RESULTS_DIR")" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-80)
DYN_VARS=()
while IFS= read -r v; do DYN_VARS+=("$v"); done < <(compgen -e | grep '^DYN_' || true)

# The run list: parallel arrays, one entry per run. Per seed every arm, the order reversed for
# every other seed (a machine that warms up or slows down favours no arm).
RUN_IDS=(); RUN_ROLES=(); RUN_SEEDS=(); RUN_VARIANTS=(); RUN_SCHEDS=(); RUN_DEPTHS=(); RUN_BUDGETS=()
RUN_FRACS=(); RUN_FLAGS=(); RUN_ITERS=()
plan_run() {  # plan_run ID ROLE SEED VARIANT SCHEDULE DEPTH BUDGET FRACTION FLAGS ITERS
  RUN_IDS+=("$1"); RUN_ROLES+=("$2"); RUN_SEEDS+=("$3"); RUN_VARIANTS+=("$4"); RUN_SCHEDS+=("$5")
  RUN_DEPTHS+=("$6"); RUN_BUDGETS+=("$7"); RUN_FRACS+=("$8"); RUN_FLAGS+=("$9"); RUN_ITERS+=("${10}")
}
i=0
if (( FRONTIER )); then
  MODE="frontier: every run ${TIME_BUDGET_SEC// /, }s of step time (LR schedule over it); baselines full_update at depths ${BASELINE_DEPTHS}; arms: ${ARM_NAMES[*]}"
  [[ -z "$BUDGET_FRACTION" ]] || MODE+="; budget fractions ${BUDGET_FRACTION} for the feature arms"
  for s in "${SEED_LIST[@]}"; do
    for b in "${BUDGETS[@]}"; do
      order=()
      for a in "${!ARM_NAMES[@]}"; do
        order+=("$a:1")
        if [[ "${ARM_ROLES[$a]}" == feature ]]; then for f in "${FRACTIONS[@]}"; do order+=("$a:$f"); done; fi
      done
      (( i % 2 == 0 )) || { mapfile -t order < <(printf '%s\n' "${order[@]}" | tac); }
      for entry in "${order[@]}"; do
        a=${entry%%:*}; f=${entry#*:}
        variant=${ARM_NAMES[$a]}$FP8_TAG; budget=$b
        if [[ "$f" != 1 ]]; then variant+="_f$f"; budget=$(awk -v b="$b" -v f="$f" 'BEGIN{printf "%.6g", b * f}'); fi
        plan_run "${variant}_t${b}_s${s}" "${ARM_ROLES[$a]}" "$s" "$variant" "${ARM_SCHEDS[$a]}" "${ARM_DEPTHS[$a]}" \
          "$budget" "$f" "${ARM_FLAGS[$a]}" -1
      done
    done
    i=$((i + 1))
  done
else
  [[ -z "$FULL_NUM_ITERATIONS" ]] || FULL_NUM_ITERATIONS=$((10#$FULL_NUM_ITERATIONS))
  [[ -z "$DYNAMIC_NUM_ITERATIONS" ]] || DYNAMIC_NUM_ITERATIONS=$((10#$DYNAMIC_NUM_ITERATIONS))
  FULL_BUDGET=$TIME_BUDGET_SEC; DYN_BUDGET=${DYNAMIC_TIME_BUDGET_SEC:-$TIME_BUDGET_SEC}
  if [[ -n "$TIME_BUDGET_SEC" ]]; then
    MODE="equal time budget: ${TIME_BUDGET_SEC}s of step time per run"
    FULL_ITERS=${FULL_NUM_ITERATIONS:--1}       # -1: the clock alone ends the run
    DYN_ITERS=${DYNAMIC_NUM_ITERATIONS:--1}
  elif [[ -n "$DYNAMIC_TIME_BUDGET_SEC" ]]; then
    MODE="time to target: full=${FULL_NUM_ITERATIONS:-runner default} steps, dynamic over a ${DYNAMIC_TIME_BUDGET_SEC}s step-time budget"
    FULL_ITERS=$FULL_NUM_ITERATIONS
    DYN_ITERS=${DYNAMIC_NUM_ITERATIONS:--1}
    if [[ -z "${EVAL_EVERY:-}" && -n "$FULL_ITERS" ]]; then
      EVAL_EVERY=$(( FULL_ITERS / 20 > 0 ? FULL_ITERS / 20 : 1 ))   # ~20 points: the crossing needs a fine curve
    fi
  else
    MODE="fixed steps: full=${FULL_NUM_ITERATIONS:-runner default} dynamic=${DYNAMIC_NUM_ITERATIONS:-runner default}"
    FULL_ITERS=$FULL_NUM_ITERATIONS
    DYN_ITERS=$DYNAMIC_NUM_ITERATIONS
    if [[ -z "${EVAL_EVERY:-}" && -n "$FULL_ITERS" && -n "$DYN_ITERS" ]]; then
      # Same eval interval in both arms, ~5 intervals of the shorter arm: a curve with several points.
      m=$(( FULL_ITERS < DYN_ITERS ? FULL_ITERS : DYN_ITERS ))
      EVAL_EVERY=$(( m / 5 > 0 ? m / 5 : 1 ))
    fi
  fi
  for s in "${SEED_LIST[@]}"; do
    if (( i % 2 == 0 )); then roles=(full dynamic); else roles=(dynamic full); fi
    for r in "${roles[@]}"; do
      if [[ "$r" == full ]]; then plan_run "full${FP8_TAG}_s$s" full "$s" "full$FP8_TAG" full_update "${DEPTH:-}" "$FULL_BUDGET" "" "" "$FULL_ITERS"
      else plan_run "dynamic${FP8_TAG}_s$s" dynamic "$s" "dynamic$FP8_TAG" dynamic_suffix "${DEPTH:-}" "$DYN_BUDGET" "" "" "$DYN_ITERS"; fi
    done
    i=$((i + 1))
  done
fi
[[ "$ALLOW_UNEQUAL_SCHEDULES" != 1 ]] || MODE+=" | ALLOW_UNEQUAL_SCHEDULES=1"
[[ "$ALLOW_FEW_EVAL_TOKENS" != 1 ]] || MODE+=" | ALLOW_FEW_EVAL_TOKENS=1"

# speedrun_env K: fills ENV_CMD with `env -u ... VAR=... ` for run K (K = warmup: the warm-up run).
speedrun_env() {
  local k=$1 first=$2 v role id seed
  local -a drop=(-u LOG_FILE -u USE_FP8 -u FP8_BACKEND -u FP8_RECIPE -u METRICS_FILE -u TIME_BUDGET_SEC -u EVAL_EVERY -u NUM_ITERATIONS)
  local -a assign=(REPORT=0)  # speedrun_small.sh's end-of-run report (samples) is no part of a comparison
  if [[ "$k" == warmup ]]; then
    role=warmup; id=warmup; seed=${SEED_LIST[0]}
    assign+=(BLOCK_UPDATE_SCHEDULE=full_update NUM_ITERATIONS="$WARMUP_STEPS" EVAL_EVERY=-1)
    (( ! FRONTIER )) || assign+=(DEPTH="${ARM_DEPTHS[0]}")
    for v in "${DYN_VARS[@]}"; do drop+=(-u "$v"); done
  else
    role=${RUN_ROLES[$k]}; id=${RUN_IDS[$k]}; seed=${RUN_SEEDS[$k]}
    assign+=(METRICS_FILE="$RESULTS_DIR/$id.metrics.jsonl")
    [[ -z "${RUN_ITERS[$k]}" ]] || assign+=(NUM_ITERATIONS="${RUN_ITERS[$k]}")
    [[ -z "${RUN_BUDGETS[$k]}" ]] || assign+=(TIME_BUDGET_SEC="${RUN_BUDGETS[$k]}")
    [[ -z "${EVAL_EVERY:-}" ]] || assign+=(EVAL_EVERY="$EVAL_EVERY")
    case "$role" in
      full|baseline) assign+=(BLOCK_UPDATE_SCHEDULE=full_update); for v in "${DYN_VARS[@]}"; do drop+=(-u "$v"); done;;
      dynamic) assign+=(BLOCK_UPDATE_SCHEDULE=dynamic_suffix);;
      feature) drop+=(-u BLOCK_UPDATE_SCHEDULE)
               assign+=(BASE_TRAIN_EXTRA_ARGS="${BASE_TRAIN_EXTRA_ARGS:+$BASE_TRAIN_EXTRA_ARGS }${RUN_FLAGS[$k]}");;
    esac
    (( ! FRONTIER )) || assign+=(DEPTH="${RUN_DEPTHS[$k]}")
    if [[ "$COMPILE_CACHE" == per_run ]]; then
      assign+=(TORCHINDUCTOR_CACHE_DIR="$RESULTS_DIR/compile_cache/$id/inductor"
               TRITON_CACHE_DIR="$RESULTS_DIR/compile_cache/$id/triton")
    fi
  fi
  assign+=(SEED="$seed" MODEL_TAG="${STAMP}_${id}")
  if [[ "$USE_FP8_COMPARE" == 1 ]]; then
    assign+=(USE_FP8=1)
    [[ -z "$FP8_BACKEND_COMPARE" ]] || assign+=(FP8_BACKEND="$FP8_BACKEND_COMPARE")
    [[ -z "$FP8_RECIPE_COMPARE" ]] || assign+=(FP8_RECIPE="$FP8_RECIPE_COMPARE")
  fi
  if [[ "$first" == 1 ]]; then assign+=(SKIP_SETUP="$SKIP_SETUP" PREPARE_DATA="$PREPARE_DATA")
  else assign+=(SKIP_SETUP=1 PREPARE_DATA=0); fi
  ENV_CMD=(env "${drop[@]}" "${assign[@]}")
}

# Resolve every command first (speedrun_small.sh's DRY_RUN validates its variables): nothing runs
# unless every run's environment is valid.
declare -A COMMAND=()
resolve() {  # resolve K RUN_ID
  local out
  speedrun_env "$1" 0
  if ! out=$("${ENV_CMD[@]}" DRY_RUN=1 bash runs/speedrun_small.sh 2>&1); then
    echo "$out" >&2
    die "run $2: runs/speedrun_small.sh rejected the environment (above)"
  fi
  COMMAND[$2]=$(sed -n 's/^speedrun_small.sh: command: //p' <<< "$out")
}
(( WARMUP_STEPS == 0 )) || resolve warmup warmup
for k in "${!RUN_IDS[@]}"; do resolve "$k" "${RUN_IDS[$k]}"; done

# Frontier: base_train evaluates whole batches (eval_tokens // (device batch x seq len x ranks)
# of them), so EVAL_TOKENS=1048576 with batches of 24 x 1024 tokens evaluates 1,032,192. Every arm
# must evaluate the same val tokens, at least MIN_EVAL_TOKENS of them: checked on the resolved
# commands before anything runs, not found by the report after the runs.
flag_of() {  # flag_of COMMAND NAME: the last value of --NAME=V in a resolved command
  local v="" t
  for t in $1; do [[ "$t" != "--$2="* ]] || v=${t#*=}; done
  echo "$v"
}
if (( FRONTIER )); then
  declare -A EVAL_ACTUAL=()
  for id in "${RUN_IDS[@]}"; do
    e=$(flag_of "${COMMAND[$id]}" eval-tokens); b=$(flag_of "${COMMAND[$id]}" device-batch-size)
    t=$(flag_of "${COMMAND[$id]}" max-seq-len)
    [[ "$e$b$t" =~ ^[0-9]+$ && -n "$e" && -n "$b" && -n "$t" ]] || continue
    chunk=$(( b * t * ${NPROC_PER_NODE:-1} )); n=$(( e / chunk > 0 ? e / chunk : 1 ))
    EVAL_ACTUAL[$(( n * chunk ))]+="$id "
  done
  if (( ${#EVAL_ACTUAL[@]} > 1 )); then
    die "the arms would evaluate different numbers of val tokens ($(for n in "${!EVAL_ACTUAL[@]}"; do printf '%s: %s; ' "$n" "${EVAL_ACTUAL[$n]% }"; done)): give every arm the same --device-batch-size and MAX_SEQ_LEN, or an EVAL_TOKENS that is a multiple of each arm's batch"
  fi
  for n in "${!EVAL_ACTUAL[@]}"; do
    if (( n < MIN_EVAL_TOKENS )) && [[ "$ALLOW_FEW_EVAL_TOKENS" != 1 ]]; then
      chunk=$(( b * t * ${NPROC_PER_NODE:-1} ))
      die "EVAL_TOKENS=$EVAL_TOKENS evaluates $n tokens (whole batches of $chunk): set EVAL_TOKENS=$(( (MIN_EVAL_TOKENS + chunk - 1) / chunk * chunk )) for at least $MIN_EVAL_TOKENS (or ALLOW_FEW_EVAL_TOKENS=1)"
    fi
  done
fi

# RESUME: the runs that runs.tsv records as done (exit code 0) are skipped; their commands must be
# the ones these variables give, or the arms would not match. Compared without the interpreter and
# the metrics file's directory (a results dir carried to another checkout keeps its runs).
norm_cmd() { sed -E 's#^[^ ]+ ##; s#--metrics-file=[^ ]*/#--metrics-file=#g' <<< "$1"; }
MANIFEST="$RESULTS_DIR/runs.tsv"
declare -A DONE=()
n_rows=0
if [[ -e "$MANIFEST" ]]; then
  n_rows=$(( $(wc -l < "$MANIFEST") - 1 ))
  while IFS=$'\037' read -r rid cmd; do
    [[ -n "${COMMAND[$rid]+x}" ]] || die "RESUME: runs.tsv has run $rid, which these variables (SEEDS, ARMS, USE_FP8_COMPARE, ...) do not plan"
    if [[ "$(norm_cmd "$cmd")" != "$(norm_cmd "${COMMAND[$rid]}")" ]]; then
      die "RESUME: run $rid was done with a different command; use the variables of the first call.
  then: $(norm_cmd "$cmd")
  now:  $(norm_cmd "${COMMAND[$rid]}")"
    fi
    DONE[$rid]=1
  done < <(awk -F'\t' 'NR > 1 && $8 == "0" { print $1 "\037" $11 }' "$MANIFEST")
fi
EXEC=()  # run indices to execute now (warmup first)
for k in "${!RUN_IDS[@]}"; do
  [[ -z "${DONE[${RUN_IDS[$k]}]:-}" ]] || continue
  (( MAX_RUNS == 0 || ${#EXEC[@]} < MAX_RUNS )) || break
  EXEC+=("$k")
done
n_left=$(( ${#RUN_IDS[@]} - ${#DONE[@]} - ${#EXEC[@]} ))
if (( ${#EXEC[@]} && WARMUP_STEPS > 0 )); then EXEC=(warmup "${EXEC[@]}"); fi
run_id_of() { if [[ "$1" == warmup ]]; then echo warmup; else echo "${RUN_IDS[$1]}"; fi; }

say "$MODE | seeds: ${SEED_LIST[*]} | fp8: $USE_FP8_COMPARE | gpu: $has_gpu"
say "results: $RESULTS_DIR"
for id in "${RUN_IDS[@]}"; do [[ -z "${DONE[$id]:-}" ]] || say "skip[$id]: done (runs.tsv)"; done
for k in "${EXEC[@]}"; do id=$(run_id_of "$k"); say "command[$id]: ${COMMAND[$id]}"; done
[[ "$COMPILE_CACHE" == shared ]] || say "compile caches: empty for every recorded run, under $RESULTS_DIR/compile_cache/<run>"
(( n_left == 0 )) || say "$n_left run(s) left after these (MAX_RUNS=$MAX_RUNS): continue with RESUME=1 and the same variables"
say "then: $PY -m scripts.compare_report $RESULTS_DIR${RECORD_DIR:+ --record $RECORD_DIR}"
if [[ "$DRY_RUN" == 1 ]]; then exit 0; fi

# ---------------------------------------------------------------------------- run
mkdir -p "$RESULTS_DIR"
if [[ ! -e "$MANIFEST" ]]; then
  printf 'run_id\tvariant\tschedule\tseed\torder\ttime_budget_sec\twall_sec\texit_code\tmetrics_file\tlog_file\tcommand\trole\tdepth\tbudget_fraction\n' > "$MANIFEST"
fi
# The plan of this call: a RESUME call may have added seeds, arms or fractions to it.
{ echo "mode: $MODE"; echo "seeds: ${SEED_LIST[*]}"; echo "fp8: $USE_FP8_COMPARE${FP8_BACKEND_COMPARE:+ backend=$FP8_BACKEND_COMPARE}${FP8_RECIPE_COMPARE:+ recipe=$FP8_RECIPE_COMPARE}";
    if (( FRONTIER )); then
      echo "time_budget_sec: $TIME_BUDGET_SEC"; echo "baseline_depths: $BASELINE_DEPTHS"; echo "budget_fraction: ${BUDGET_FRACTION:-none}"
      for a in "${!ARM_NAMES[@]}"; do [[ "${ARM_ROLES[$a]}" != feature ]] || echo "arm ${ARM_NAMES[$a]}: --depth=${ARM_DEPTHS[$a]} ${ARM_FLAGS[$a]}"; done
    fi
    echo "eval_tokens: ${EVAL_TOKENS:-runner default}"; echo "eval_every: ${EVAL_EVERY:-runner default}"
    echo "allow_unequal_schedules: $ALLOW_UNEQUAL_SCHEDULES"; echo "allow_few_eval_tokens: $ALLOW_FEW_EVAL_TOKENS"
    echo "gpu: $has_gpu"; echo "warmup_steps: $WARMUP_STEPS"; echo "compile_cache: $COMPILE_CACHE"; } > "$RESULTS_DIR/compare_config.txt"

failed=0
order=$n_rows
base_dir=""
for j in "${!EXEC[@]}"; do
  k=${EXEC[$j]}; id=$(run_id_of "$k")
  speedrun_env "$k" "$(( j == 0 ))"
  log="$RESULTS_DIR/$id.log"
  rm -f "$RESULTS_DIR/$id.metrics.jsonl"  # a killed earlier attempt may have left one: base_train appends
  rm -rf "${RESULTS_DIR:?}/compile_cache/$id"  # COMPILE_CACHE=per_run: start empty
  say "=== run $id"
  t0=$(date +%s.%N)
  set +e
  "${ENV_CMD[@]}" bash runs/speedrun_small.sh 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')
  rm -rf "${RESULTS_DIR:?}/compile_cache/$id"
  if [[ -z "$base_dir" ]]; then
    # The first run did the setup: use the project's venv from here on (as speedrun_small.sh does).
    # shellcheck disable=SC1091
    if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then source .venv/bin/activate; fi
    base_dir=$("$PY" -c "from nanochat.common import get_base_dir; print(get_base_dir())")
  fi
  if [[ "$KEEP_CHECKPOINTS" == 0 || "$k" == warmup ]] && [[ -n "$STAMP" ]]; then
    rm -rf "${base_dir:?}/base_checkpoints/${STAMP}_${id}"
  fi
  if [[ "$k" == warmup ]]; then
    (( rc == 0 )) || { echo "$ME: error: the warm-up run failed (exit $rc, log $log)" >&2; exit 1; }
    continue
  fi
  order=$((order + 1))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "${RUN_VARIANTS[$k]}" "${RUN_SCHEDS[$k]}" \
    "${RUN_SEEDS[$k]}" "$order" "${RUN_BUDGETS[$k]}" "$wall" "$rc" "$id.metrics.jsonl" "$id.log" "${COMMAND[$id]}" \
    "${RUN_ROLES[$k]}" "${RUN_DEPTHS[$k]}" "${RUN_FRACS[$k]}" >> "$MANIFEST"
  if (( rc != 0 )); then failed=$((failed + 1)); say "run $id FAILED (exit $rc); continuing, see $log"; fi
done

# Provenance of this call (a RESUME call appends its own: it may run on another machine).
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | sed -E 's/^ *([0-9]+) (.*)$/\2 x\1/' | paste -sd';' - || true)
[[ -n "$gpu_name" ]] || gpu_name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (cpu)')" 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{print $NF}' | paste -sd' ' - || true)
{ echo "== call $(date -u +%Y-%m-%dT%H:%M:%SZ) =="
  echo "command: $CALL_LINE"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)${dirty:+ with uncommitted changes in: $dirty}"
  echo "gpu: $gpu_name"
  echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1) ($(nproc 2>/dev/null || echo '?') cores)"
  echo "torch: $("$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || echo unknown)"
  echo "runs this call: $(( ${#EXEC[@]} - (WARMUP_STEPS > 0 && ${#EXEC[@]} > 0 ? 1 : 0) ))"
} >> "$RESULTS_DIR/provenance.txt"

record=()
if [[ -n "$RECORD_DIR" ]]; then
  if (( n_left == 0 && failed == 0 )); then record=(--record "$RECORD_DIR")
  else say "RECORD_DIR: not copied yet (runs left or failed); after the last run: $PY -m scripts.compare_report $RESULTS_DIR --record $RECORD_DIR"; fi
fi
"$PY" -m scripts.compare_report "$RESULTS_DIR" "${record[@]}" || { echo "$ME: error: compare_report failed" >&2; exit 1; }
if (( failed )); then echo "$ME: error: $failed run(s) failed; see runs.tsv and the logs" >&2; exit 1; fi
if (( n_left )); then say "$n_left run(s) left: continue with RESUME=1 and the same variables"; fi
say "done: $RESULTS_DIR/summary.md"
