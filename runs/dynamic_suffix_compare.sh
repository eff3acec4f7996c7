#!/usr/bin/env bash
# A/B of the block-update schedule: `full_update` vs `dynamic_suffix` on one config, one or more
# seeds per arm, optionally FP8 in both arms; then `python -m scripts.compare_report RESULTS_DIR`
# writes summary.csv, summary.md and val_bpb_vs_time.png. docs/compare.md explains every number.
#
#   SKIP_SETUP=1 PREPARE_DATA=0 bash runs/dynamic_suffix_compare.sh                    # fixed steps
#   FULL_NUM_ITERATIONS=520 DYNAMIC_NUM_ITERATIONS=650 bash runs/dynamic_suffix_compare.sh # spec's fair-time style
#   FULL_NUM_ITERATIONS=520 DYNAMIC_NUM_ITERATIONS=650 EVAL_EVERY=20 SEEDS="1 2 3" \
#     bash runs/dynamic_suffix_compare.sh                                              # time to target (headline)
#   TIME_BUDGET_SEC=190 SEEDS="42 43 44" bash runs/dynamic_suffix_compare.sh             # equal wall-clock budget
#   FULL_NUM_ITERATIONS=520 DYNAMIC_TIME_BUDGET_SEC=133 EVAL_EVERY=25 SEEDS="1 2 3" \
#     bash runs/dynamic_suffix_compare.sh             # time to target, dynamic schedule over full's time
#   USE_FP8_COMPARE=1 FP8_BACKEND_COMPARE=custom bash runs/dynamic_suffix_compare.sh     # FP8 in both arms
#   DRY_RUN=1 bash runs/dynamic_suffix_compare.sh                                        # print every command
#
# Each run is `bash runs/speedrun_small.sh` with environment variables, so every variable of that
# runner (DEPTH, MAX_SEQ_LEN, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, EVAL_TOKENS, EVAL_EVERY, LM_CE_*,
# MUON_*, BASE_TRAIN_EXTRA_ARGS, ...) applies to BOTH arms. The arms differ only in the schedule:
#   - BLOCK_UPDATE_SCHEDULE is set by this script (full_update / dynamic_suffix);
#   - every DYN_* variable goes to the dynamic arm only;
#   - FULL_NUM_ITERATIONS / DYNAMIC_NUM_ITERATIONS (default NUM_ITERATIONS, else the runner's default)
#     set each arm's steps; with TIME_BUDGET_SEC both arms get --time-budget-sec (the LR schedule
#     follows elapsed/budget) and the iteration counts, if set, are only caps.
# Compare-only variables:
#   SEEDS="42"            space-separated weight-init seeds; each seed runs both arms, the order
#                         alternating per seed (full,dynamic then dynamic,full)
#   USE_FP8_COMPARE=0|1   --fp8 in both arms; FP8_BACKEND_COMPARE (custom|torchao) and
#                         FP8_RECIPE_COMPARE (tensorwise|rowwise) likewise
#   TIME_BUDGET_SEC       equal step-time budget per run (compile included, eval excluded)
#   DYNAMIC_TIME_BUDGET_SEC  a step-time budget for the dynamic arm only (its LR schedule spans it;
#                         DYNAMIC_NUM_ITERATIONS, if set, is a cap), while full_update runs its fixed
#                         FULL_NUM_ITERATIONS: the headline time to target with the dynamic arm's
#                         schedule sized to full_update's own time (set it to that time). Not with
#                         TIME_BUDGET_SEC.
#   RESULTS_DIR           default results/dynamic_suffix_compare_<timestamp>
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
#                         in its runs.tsv with exit code 0 are skipped (their commands must match)
#   SKIP_SETUP, PREPARE_DATA apply once (to the first run); every later run gets SKIP_SETUP=1 PREPARE_DATA=0.
# Run-specific variables (SEED, MODEL_TAG, METRICS_FILE, LOG_FILE, USE_FP8, FP8_BACKEND, FP8_RECIPE,
# BLOCK_UPDATE_SCHEDULE) are set per run here; setting them yourself is an error (exit 2).
#
# Output in RESULTS_DIR: <run>.log and <run>.metrics.jsonl per run, runs.tsv (one line per run:
# order, seed, wall seconds, exit code, command), then from scripts/compare_report.py:
# summary.csv, one row per run, columns (docs/compare.md says exactly how each is computed):
#   variant, schedule, num_iterations, elapsed_sec, max_tok_per_sec, avg_tok_per_sec, final_loss,
#   min_val_bpb, avg_step_peak_vram_mib, peak_vram_mib, active_layers_mean, active_layers_range,
#   seed, tokens, compile_sec, setup_sec, final_val_bpb, wall_sec, status, run_id,
#   target_val_bpb, time_to_target_sec, time_to_target_ratio
# summary.md (time to target, per-arm medians over seeds, ratios dynamic/full, paired val bpb
# differences) and val_bpb_vs_time.png (val bpb against train_elapsed, every run).
# Time to target (the headline): per seed, the train time dynamic_suffix needs to reach the final val
# bpb of full_update, as a fraction of full_update's train time (compile included), median over seeds.
# The full arm is an ordinary run of its steps (NUM_ITERATIONS=520 in both arms is the equal-steps
# case; the dynamic arm may then end above the target: "not reached"); giving the dynamic arm more
# steps (the example above: 520 vs 650) lets it get there. Use a small EVAL_EVERY (e.g. 20): the
# crossing is only known to within one eval interval of the dynamic arm.
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

# ---------------------------------------------------------------------------- validate (all at once)
SEEDS=${SEEDS:-42}
USE_FP8_COMPARE=${USE_FP8_COMPARE:-0}
FP8_BACKEND_COMPARE=${FP8_BACKEND_COMPARE:-}
FP8_RECIPE_COMPARE=${FP8_RECIPE_COMPARE:-}
FULL_NUM_ITERATIONS=${FULL_NUM_ITERATIONS:-${NUM_ITERATIONS:-}}
DYNAMIC_NUM_ITERATIONS=${DYNAMIC_NUM_ITERATIONS:-${NUM_ITERATIONS:-}}
TIME_BUDGET_SEC=${TIME_BUDGET_SEC:-}
DYNAMIC_TIME_BUDGET_SEC=${DYNAMIC_TIME_BUDGET_SEC:-}
WARMUP_STEPS=${WARMUP_STEPS:-2}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}
COMPILE_CACHE=${COMPILE_CACHE:-shared}
DRY_RUN=${DRY_RUN:-0}
RESUME=${RESUME:-0}
MAX_RUNS=${MAX_RUNS:-0}
SKIP_SETUP=${SKIP_SETUP:-0}
PREPARE_DATA=${PREPARE_DATA:-auto}
PY=${PYTHON:-python}

problems=()
bad() { problems+=("$*"); }
read -r -a SEED_LIST <<< "$SEEDS"
(( ${#SEED_LIST[@]} >= 1 )) || bad "SEEDS is empty; give one or more integers, e.g. SEEDS=\"42 43 44\""
declare -A seen=()
for s in "${SEED_LIST[@]}"; do
  if ! [[ "$s" =~ ^[0-9]+$ ]]; then bad "SEEDS: '$s' is not a non-negative integer"
  elif [[ -n "${seen[$s]:-}" ]]; then bad "SEEDS: seed $s is listed twice"
  else seen[$s]=1; fi
done
is_bool "$USE_FP8_COMPARE" || bad "USE_FP8_COMPARE=$USE_FP8_COMPARE must be 0 or 1"
[[ -z "$FP8_BACKEND_COMPARE" || "$FP8_BACKEND_COMPARE" =~ ^(custom|torchao)$ ]] \
  || bad "FP8_BACKEND_COMPARE=$FP8_BACKEND_COMPARE must be custom or torchao"
[[ -z "$FP8_RECIPE_COMPARE" || "$FP8_RECIPE_COMPARE" =~ ^(tensorwise|rowwise)$ ]] \
  || bad "FP8_RECIPE_COMPARE=$FP8_RECIPE_COMPARE must be tensorwise or rowwise"
if [[ "$USE_FP8_COMPARE" != 1 && ( -n "$FP8_BACKEND_COMPARE" || -n "$FP8_RECIPE_COMPARE" ) ]]; then
  bad "FP8_BACKEND_COMPARE / FP8_RECIPE_COMPARE need USE_FP8_COMPARE=1"
fi
for v in FULL_NUM_ITERATIONS DYNAMIC_NUM_ITERATIONS; do
  x=${!v}
  [[ -z "$x" ]] || { [[ "$x" =~ ^[0-9]+$ ]] && (( 10#$x >= 1 )); } \
    || bad "$v=$x must be an integer >= 1 (it defaults to NUM_ITERATIONS)"
done
for v in TIME_BUDGET_SEC DYNAMIC_TIME_BUDGET_SEC; do
  x=${!v}
  [[ -z "$x" ]] || { is_num "$x" && awk -v t="$x" 'BEGIN{exit !(t > 0)}'; } \
    || bad "$v=$x must be a number of seconds > 0"
done
[[ -z "$TIME_BUDGET_SEC" || -z "$DYNAMIC_TIME_BUDGET_SEC" ]] \
  || bad "TIME_BUDGET_SEC (both arms) and DYNAMIC_TIME_BUDGET_SEC (dynamic arm only) are exclusive; set one"
[[ "$WARMUP_STEPS" =~ ^[0-9]+$ ]] || bad "WARMUP_STEPS=$WARMUP_STEPS must be an integer >= 0"
is_bool "$KEEP_CHECKPOINTS" || bad "KEEP_CHECKPOINTS=$KEEP_CHECKPOINTS must be 0 or 1"
[[ "$COMPILE_CACHE" == shared || "$COMPILE_CACHE" == per_run ]] \
  || bad "COMPILE_CACHE=$COMPILE_CACHE must be shared or per_run"
is_bool "$DRY_RUN" || bad "DRY_RUN=$DRY_RUN must be 0 or 1"
is_bool "$RESUME" || bad "RESUME=$RESUME must be 0 or 1"
[[ "$MAX_RUNS" =~ ^[0-9]+$ ]] || bad "MAX_RUNS=$MAX_RUNS must be an integer >= 0 (0 = all)"
is_bool "$SKIP_SETUP" || bad "SKIP_SETUP=$SKIP_SETUP must be 0 or 1"
[[ "$PREPARE_DATA" =~ ^(auto|0|1)$ ]] || bad "PREPARE_DATA=$PREPARE_DATA must be auto, 0 or 1"
[[ -z "${EVAL_EVERY:-}" ]] || is_int "$EVAL_EVERY" || bad "EVAL_EVERY=$EVAL_EVERY must be an integer"
[[ -z "${EVAL_TOKENS:-}" ]] || is_int "$EVAL_TOKENS" || bad "EVAL_TOKENS=$EVAL_TOKENS must be an integer"
declare -A instead=([SEED]=SEEDS [MODEL_TAG]="(set per run)" [METRICS_FILE]="(set per run, in RESULTS_DIR)"
  [LOG_FILE]="(set per run, in RESULTS_DIR)" [USE_FP8]=USE_FP8_COMPARE [FP8_BACKEND]=FP8_BACKEND_COMPARE
  [FP8_RECIPE]=FP8_RECIPE_COMPARE [BLOCK_UPDATE_SCHEDULE]="(set per arm)")
for v in SEED MODEL_TAG METRICS_FILE LOG_FILE USE_FP8 FP8_BACKEND FP8_RECIPE BLOCK_UPDATE_SCHEDULE; do
  [[ -z "${!v:-}" ]] || bad "$v is set; the compare script sets it per run, use ${instead[$v]} (unset $v)"
done
read -r -a extra_args <<< "${BASE_TRAIN_EXTRA_ARGS:-}"
for a in "${extra_args[@]}"; do
  case "$a" in
    --block-update-schedule*|--dyn-*) bad "BASE_TRAIN_EXTRA_ARGS has $a; schedule flags go through DYN_* (dynamic arm only)";;
    --fp8|--fp8=*|--fp8-backend*|--fp8-recipe*) bad "BASE_TRAIN_EXTRA_ARGS has $a; use USE_FP8_COMPARE / FP8_*_COMPARE";;
    --seed*|--model-tag*|--metrics-file*|--num-iterations*|--time-budget-sec*|--resume-from-step*)
      bad "BASE_TRAIN_EXTRA_ARGS has $a; the compare script sets it per run (see SEEDS, *_NUM_ITERATIONS, TIME_BUDGET_SEC)";;
  esac
done
if [[ -n "${RESULTS_DIR:-}" ]]; then
  [[ "$RESULTS_DIR" == /* ]] || RESULTS_DIR="$CALLER_PWD/$RESULTS_DIR"
else
  [[ "$RESUME" != 1 ]] || bad "RESUME=1 needs the RESULTS_DIR of the comparison to continue"
  RESULTS_DIR="$REPO/results/dynamic_suffix_compare_$(date +%Y%m%d_%H%M%S)"
fi
if [[ -e "$RESULTS_DIR/runs.tsv" && "$RESUME" != 1 ]]; then
  bad "RESULTS_DIR=$RESULTS_DIR already holds a comparison (runs.tsv); RESUME=1 continues it (same variables), or choose a new RESULTS_DIR"
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
[[ -z "$FULL_NUM_ITERATIONS" ]] || FULL_NUM_ITERATIONS=$((10#$FULL_NUM_ITERATIONS))
[[ -z "$DYNAMIC_NUM_ITERATIONS" ]] || DYNAMIC_NUM_ITERATIONS=$((10#$DYNAMIC_NUM_ITERATIONS))
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
FP8_TAG=""; [[ "$USE_FP8_COMPARE" == 1 ]] && FP8_TAG="_fp8"
STAMP=$(printf %s "$(basename "$RESULTS_DIR")" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-80)
DYN_VARS=()
while IFS= read -r v; do DYN_VARS+=("$v"); done < <(compgen -e | grep '^DYN_' || true)

# Run list: per seed two runs, order alternating (seed index even: full first; odd: dynamic first).
RUN_IDS=(); RUN_ROLES=(); RUN_SEEDS=()
i=0
for s in "${SEED_LIST[@]}"; do
  if (( i % 2 == 0 )); then roles=(full dynamic); else roles=(dynamic full); fi
  for r in "${roles[@]}"; do RUN_IDS+=("${r}${FP8_TAG}_s${s}"); RUN_ROLES+=("$r"); RUN_SEEDS+=("$s"); done
  i=$((i + 1))
done

# speedrun_env ROLE SEED RUN_ID FIRST: fills ENV_CMD with `env -u ... VAR=... ` for one run.
speedrun_env() {
  local role=$1 seed=$2 id=$3 first=$4 v
  local -a drop=(-u LOG_FILE -u USE_FP8 -u FP8_BACKEND -u FP8_RECIPE -u METRICS_FILE -u TIME_BUDGET_SEC -u EVAL_EVERY -u NUM_ITERATIONS)
  local -a assign=(SEED="$seed" MODEL_TAG="${STAMP}_${id}")
  if [[ "$role" == dynamic ]]; then
    assign+=(BLOCK_UPDATE_SCHEDULE=dynamic_suffix)
  else
    assign+=(BLOCK_UPDATE_SCHEDULE=full_update)
    for v in "${DYN_VARS[@]}"; do drop+=(-u "$v"); done
  fi
  if [[ "$USE_FP8_COMPARE" == 1 ]]; then
    assign+=(USE_FP8=1)
    [[ -z "$FP8_BACKEND_COMPARE" ]] || assign+=(FP8_BACKEND="$FP8_BACKEND_COMPARE")
    [[ -z "$FP8_RECIPE_COMPARE" ]] || assign+=(FP8_RECIPE="$FP8_RECIPE_COMPARE")
  fi
  if [[ "$role" == warmup ]]; then
    assign+=(NUM_ITERATIONS="$WARMUP_STEPS" EVAL_EVERY=-1)
  else
    assign+=(METRICS_FILE="$RESULTS_DIR/$id.metrics.jsonl")
    local iters=$FULL_ITERS; [[ "$role" == dynamic ]] && iters=$DYN_ITERS
    [[ -z "$iters" ]] || assign+=(NUM_ITERATIONS="$iters")
    local budget=$TIME_BUDGET_SEC; [[ "$role" == dynamic && -n "$DYNAMIC_TIME_BUDGET_SEC" ]] && budget=$DYNAMIC_TIME_BUDGET_SEC
    [[ -z "$budget" ]] || assign+=(TIME_BUDGET_SEC="$budget")
    [[ -z "${EVAL_EVERY:-}" ]] || assign+=(EVAL_EVERY="$EVAL_EVERY")
  fi
  if [[ "$COMPILE_CACHE" == per_run && "$role" != warmup ]]; then
    assign+=(TORCHINDUCTOR_CACHE_DIR="$RESULTS_DIR/compile_cache/$id/inductor"
             TRITON_CACHE_DIR="$RESULTS_DIR/compile_cache/$id/triton")
  fi
  if [[ "$first" == 1 ]]; then assign+=(SKIP_SETUP="$SKIP_SETUP" PREPARE_DATA="$PREPARE_DATA")
  else assign+=(SKIP_SETUP=1 PREPARE_DATA=0); fi
  ENV_CMD=(env "${drop[@]}" "${assign[@]}")
}

# Resolve every command first (speedrun_small.sh's DRY_RUN validates its variables): nothing runs
# unless every run's environment is valid.
declare -A COMMAND=()
resolve() {  # resolve ROLE SEED RUN_ID
  local out
  speedrun_env "$1" "$2" "$3" 0
  if ! out=$("${ENV_CMD[@]}" DRY_RUN=1 bash runs/speedrun_small.sh 2>&1); then
    echo "$out" >&2
    die "run $3: runs/speedrun_small.sh rejected the environment (above)"
  fi
  COMMAND[$3]=$(sed -n 's/^speedrun_small.sh: command: //p' <<< "$out")
}
(( WARMUP_STEPS == 0 )) || resolve warmup "${SEED_LIST[0]}" warmup
for k in "${!RUN_IDS[@]}"; do resolve "${RUN_ROLES[$k]}" "${RUN_SEEDS[$k]}" "${RUN_IDS[$k]}"; done

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
    [[ -n "${COMMAND[$rid]+x}" ]] || die "RESUME: runs.tsv has run $rid, which these variables (SEEDS, USE_FP8_COMPARE) do not plan"
    if [[ "$(norm_cmd "$cmd")" != "$(norm_cmd "${COMMAND[$rid]}")" ]]; then
      die "RESUME: run $rid was done with a different command; use the variables of the first call.
  then: $(norm_cmd "$cmd")
  now:  $(norm_cmd "${COMMAND[$rid]}")"
    fi
    DONE[$rid]=1
  done < <(awk -F'\t' 'NR > 1 && $8 == "0" { print $1 "\037" $11 }' "$MANIFEST")
fi
EXEC_IDS=(); EXEC_ROLES=(); EXEC_SEEDS=()
for k in "${!RUN_IDS[@]}"; do
  [[ -z "${DONE[${RUN_IDS[$k]}]:-}" ]] || continue
  (( MAX_RUNS == 0 || ${#EXEC_IDS[@]} < MAX_RUNS )) || break
  EXEC_IDS+=("${RUN_IDS[$k]}"); EXEC_ROLES+=("${RUN_ROLES[$k]}"); EXEC_SEEDS+=("${RUN_SEEDS[$k]}")
done
n_left=$(( ${#RUN_IDS[@]} - ${#DONE[@]} - ${#EXEC_IDS[@]} ))
if (( ${#EXEC_IDS[@]} && WARMUP_STEPS > 0 )); then
  EXEC_IDS=(warmup "${EXEC_IDS[@]}"); EXEC_ROLES=(warmup "${EXEC_ROLES[@]}"); EXEC_SEEDS=("${SEED_LIST[0]}" "${EXEC_SEEDS[@]}")
fi

say "$MODE | seeds: ${SEED_LIST[*]} | fp8: $USE_FP8_COMPARE | gpu: $has_gpu"
say "results: $RESULTS_DIR"
for id in "${RUN_IDS[@]}"; do [[ -z "${DONE[$id]:-}" ]] || say "skip[$id]: done (runs.tsv)"; done
for id in "${EXEC_IDS[@]}"; do say "command[$id]: ${COMMAND[$id]}"; done
[[ "$COMPILE_CACHE" == shared ]] || say "compile caches: empty for every recorded run, under $RESULTS_DIR/compile_cache/<run>"
(( n_left == 0 )) || say "$n_left run(s) left after these (MAX_RUNS=$MAX_RUNS): continue with RESUME=1 and the same variables"
say "then: $PY -m scripts.compare_report $RESULTS_DIR"
if [[ "$DRY_RUN" == 1 ]]; then exit 0; fi

# ---------------------------------------------------------------------------- run
mkdir -p "$RESULTS_DIR"
if [[ ! -e "$MANIFEST" ]]; then
  printf 'run_id\tvariant\tschedule\tseed\torder\ttime_budget_sec\twall_sec\texit_code\tmetrics_file\tlog_file\tcommand\n' > "$MANIFEST"
  { echo "mode: $MODE"; echo "seeds: ${SEED_LIST[*]}"; echo "fp8: $USE_FP8_COMPARE${FP8_BACKEND_COMPARE:+ backend=$FP8_BACKEND_COMPARE}${FP8_RECIPE_COMPARE:+ recipe=$FP8_RECIPE_COMPARE}";
  echo "gpu: $has_gpu"; echo "warmup_steps: $WARMUP_STEPS"; echo "compile_cache: $COMPILE_CACHE"; } > "$RESULTS_DIR/compare_config.txt"
fi

failed=0
order=$n_rows
base_dir=""
for k in "${!EXEC_IDS[@]}"; do
  id=${EXEC_IDS[$k]}; role=${EXEC_ROLES[$k]}; seed=${EXEC_SEEDS[$k]}
  speedrun_env "$role" "$seed" "$id" "$(( k == 0 ))"
  log="$RESULTS_DIR/$id.log"
  rm -f "$RESULTS_DIR/$id.metrics.jsonl"  # a killed earlier attempt may have left one: base_train appends
  rm -rf "${RESULTS_DIR:?}/compile_cache/$id"  # COMPILE_CACHE=per_run: start empty
  say "=== run $id ($role, seed $seed)"
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
  if [[ "$KEEP_CHECKPOINTS" == 0 || "$role" == warmup ]] && [[ -n "$STAMP" ]]; then
    rm -rf "${base_dir:?}/base_checkpoints/${STAMP}_${id}"
  fi
  if [[ "$role" == warmup ]]; then
    (( rc == 0 )) || { echo "$ME: error: the warm-up run failed (exit $rc, log $log)" >&2; exit 1; }
    continue
  fi
  order=$((order + 1))
  schedule=full_update; budget=${TIME_BUDGET_SEC:-}
  [[ "$role" == dynamic ]] && { schedule=dynamic_suffix; budget=${DYNAMIC_TIME_BUDGET_SEC:-$budget}; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$role$FP8_TAG" "$schedule" "$seed" "$order" \
    "$budget" "$wall" "$rc" "$id.metrics.jsonl" "$id.log" "${COMMAND[$id]}" >> "$MANIFEST"
  if (( rc != 0 )); then failed=$((failed + 1)); say "run $id FAILED (exit $rc); continuing, see $log"; fi
done

"$PY" -m scripts.compare_report "$RESULTS_DIR" || { echo "$ME: error: compare_report failed" >&2; exit 1; }
if (( failed )); then echo "$ME: error: $failed run(s) failed; see runs.tsv and the logs" >&2; exit 1; fi
if (( n_left )); then say "$n_left run(s) left: continue with RESUME=1 and the same variables"; fi
say "done: $RESULTS_DIR/summary.md"
