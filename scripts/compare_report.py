"""Summarise a `runs/dynamic_suffix_compare.sh` results dir (docs/compare.md defines every number).

    python -m scripts.compare_report RESULTS_DIR
    python -m scripts.compare_report RESULTS_DIR [RESULTS_DIR ...] --out MERGED_DIR
    python -m scripts.compare_report RESULTS_DIR --record records/YYYY-MM-DD_<what>

Two kinds of comparison, told apart by the `role` column of `runs.tsv`:

- **frontier** (roles `baseline` / `feature`): full_update at several depths and feature arms, every
  run with the same step-time budget. The report names the best baseline (lowest median final val
  bpb over seeds), the best feature arm, each arm's final val bpb minus the best baseline's (paired
  by seed: median, min, max), each arm's time to reach the best baseline's final val bpb, and the
  arms run on a fraction of the budget (`BUDGET_FRACTION`) against the best baseline's full budget.
- **two-arm** (roles `full` / `dynamic`, or no role column): full_update vs dynamic_suffix of one
  config; time to target, per-arm medians, ratios dynamic/full, paired val bpb differences.

Guards, in both kinds: every arm's mean trained blocks per step is stated, with "every step trained
all blocks" where no block was ever frozen (bold for a block-update schedule: it cannot claim a
speed-up from freezing); no ratio or difference is printed while the compared runs' LR schedules
(time budget vs steps, the budget, warmup / warmdown / final LR) or token budgets differ, unless
ALLOW_UNEQUAL_SCHEDULES=1, and then the headline says so; a frontier report refuses val bpb measured
on fewer than 1,048,576 tokens unless ALLOW_FEW_EVAL_TOKENS=1, and then says so. Both variables are
read from the environment and from the `compare_config.txt` that the runner writes.

The second form merges comparisons that ran as separate calls of the runner (e.g. one seed per
job on a machine that limits a command's time) into one report in MERGED_DIR, read from the
source dirs in place; a run_id (e.g. `full_s1`) may occur in only one of them. `--record DIR`
then copies the evidence (provenance, configs, runs.tsv, the report, every run's metrics JSONL,
the plot) into DIR, a new `records/YYYY-MM-DD_<what>` folder to commit as it is.

Reads `runs.tsv` (one line per run, written by the runner: role, seed, run order, the run's wall
time, exit code, command) and each run's `--metrics-file` JSONL (base_train's run / step / eval /
summary records). Without `runs.tsv` it falls back to every `*.metrics.jsonl` in the dir (no wall
time, so no setup_sec). Writes `summary.csv` (one row per run, COLUMNS), `summary.md`,
`val_bpb_vs_time.png` (matplotlib, the `compare` extra) and `val_bpb_vs_time.csv` (the points).
"""
from __future__ import annotations

import bisect
import csv
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field

from nanochat.usage import OneLineParser

SPEC_COLUMNS = ["variant", "schedule", "num_iterations", "elapsed_sec", "max_tok_per_sec", "avg_tok_per_sec",
                "final_loss", "min_val_bpb", "avg_step_peak_vram_mib", "peak_vram_mib", "active_layers_mean",
                "active_layers_range"]
TARGET_COLUMNS = ["target_val_bpb", "time_to_target_sec", "time_to_target_ratio"]  # filled per seed
RUN_COLUMNS = ["role", "depth", "n_layer", "mean_trained_blocks", "lr_schedule", "time_budget_sec",
               "budget_fraction", "eval_tokens"]
COLUMNS = (SPEC_COLUMNS + ["seed", "tokens", "compile_sec", "setup_sec", "final_val_bpb", "wall_sec", "status",
                           "run_id"] + RUN_COLUMNS + TARGET_COLUMNS)
NUMERIC = ["num_iterations", "elapsed_sec", "max_tok_per_sec", "avg_tok_per_sec", "final_loss", "min_val_bpb",
           "avg_step_peak_vram_mib", "peak_vram_mib", "active_layers_mean", "tokens", "compile_sec", "setup_sec",
           "final_val_bpb", "wall_sec", "mean_trained_blocks"]
DIGITS = {"elapsed_sec": 2, "max_tok_per_sec": 1, "avg_tok_per_sec": 1, "final_loss": 6, "min_val_bpb": 6,
          "avg_step_peak_vram_mib": 2, "peak_vram_mib": 2, "active_layers_mean": 2, "compile_sec": 2,
          "setup_sec": 2, "final_val_bpb": 6, "wall_sec": 2, "target_val_bpb": 6, "time_to_target_sec": 2,
          "time_to_target_ratio": 4, "mean_trained_blocks": 2}
FINAL_LOSS_FRAC = 0.05  # final_loss = mean raw train loss of the last 5% of steps (at least one step)
NA = "NA"
TAIL_FROM = 0.5  # the plot's right panel: evals at train_elapsed >= this fraction of the longest run
SPARSE_EVAL_FRAC = 0.1  # precision warning: the dynamic arm's eval interval exceeds this fraction of full_time
UNEVEN_COMPILE_FRAC = 0.05  # warning: the arms' first steps (compile) differ by more than this fraction of full_time
MIN_EVAL_TOKENS = 1_048_576  # frontier mode: val bpb on at least this many tokens (GUIDE section 7)
FRONTIER_ROLES = ("baseline", "feature")
# base_train's LR-shape defaults: the value of a flag that a command leaves out, for metrics files
# without the run record (which states the resolved horizon itself).
LR_DEFAULTS = {"warmup_ratio": 0.0, "warmdown_ratio": 0.4, "final_lr_frac": 0.0}
# What must be equal for two runs to be compared: the LR schedule's kind and length, its shape, and
# (step schedules) the token budget. A time budget leaves the tokens to the run's speed.
HORIZON_KEYS = ["lr_schedule", "time_budget_sec", "num_iterations", "token_budget", "warmup_ratio",
                "warmdown_ratio", "final_lr_frac"]
WRAP_WARNING = "WARNING: evaluation wrapped around the val split"  # nanochat/dataloader.py's eval loader
PLOT = "val_bpb_vs_time.png"


# -----------------------------------------------------------------------------
# Reading


def read_metrics(path: str) -> dict:
    """{"run": the run record or None, "steps": [...], "evals": [...], "summary": the last summary or
    None} of one metrics JSONL file.

    A run that crashed may leave a truncated last line: unparsable lines are skipped, not fatal.
    """
    out = {"run": None, "steps": [], "evals": [], "summary": None}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = rec.get("kind") if isinstance(rec, dict) else None
            if kind == "step":
                out["steps"].append(rec)
            elif kind == "eval":
                out["evals"].append(rec)
            elif kind in ("summary", "run"):
                out[kind] = rec
    return out


def read_runs(results_dir: str) -> list[dict]:
    """The runner's manifest rows, or (no manifest) one pseudo-row per *.metrics.jsonl."""
    manifest = os.path.join(results_dir, "runs.tsv")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        latest = {r["run_id"]: r for r in rows}  # a run repeated after RESUME=1: its last attempt counts
        return list(latest.values())
    runs = []
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".metrics.jsonl"):
            run_id = name[: -len(".metrics.jsonl")]
            seed = run_id.rsplit("_s", 1)[1] if "_s" in run_id else ""
            runs.append({"run_id": run_id, "seed": seed if seed.isdigit() else "", "metrics_file": name,
                         "log_file": run_id + ".log" if os.path.exists(os.path.join(results_dir, run_id + ".log")) else ""})
    return runs


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _positive(x):
    v = _num(x)
    return v if v is not None and v > 0 else None


def command_of(results_dir: str, run: dict) -> str:
    """The base_train command of a run: from runs.tsv, else from the speedrun_small.sh line of its log."""
    if run.get("command"):
        return run["command"]
    log = os.path.join(results_dir, run.get("log_file") or "")
    if run.get("log_file") and os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("speedrun_small.sh: command: "):
                    return line[len("speedrun_small.sh: command: "):].strip()
    return ""


def flag_value(cmd: str, flag: str) -> str | None:
    """The value base_train sees for `flag` in a command line (`--x=v` or `--x v`; the last wins)."""
    toks, val = cmd.split(), None
    for i, t in enumerate(toks):
        if t.startswith(flag + "="):
            val = t[len(flag) + 1:]
        elif t == flag and i + 1 < len(toks):
            val = toks[i + 1]
    return val


def eval_wrapped(results_dir: str, run: dict) -> bool:
    """Whether the run's log says that an evaluation reached the end of the val split (it stops
    there: fewer val tokens than asked, each row once)."""
    log = os.path.join(results_dir, run.get("log_file") or "")
    if not run.get("log_file") or not os.path.exists(log):
        return False
    with open(log, encoding="utf-8", errors="replace") as f:
        return any(WRAP_WARNING in line for line in f)


# -----------------------------------------------------------------------------
# One run -> one row


def run_horizon(run_rec: dict | None, summary: dict | None, cmd: str) -> dict:
    """The facts that decide whether two runs may be compared: the LR schedule (`time`: it follows
    elapsed / time budget; `steps`: it follows step / num_iterations), its length, its shape, and the
    token budget of a step schedule (num_iterations x total batch). From the run record's `horizon`
    where there is one, else from the command's flags (base_train's defaults where a flag is absent)
    and the summary (the steps a step-scheduled run trained)."""
    h = dict((run_rec or {}).get("horizon") or {})
    summary = summary or {}

    def flag(name):
        return _num(flag_value(cmd, name))

    budget = _num(h["time_budget_sec"]) if "time_budget_sec" in h else flag("--time-budget-sec")
    budget = budget if budget is not None and budget > 0 else None
    lr = h.get("lr_schedule") or ("time" if budget else "steps")
    out = {"lr_schedule": lr, "time_budget_sec": budget if lr == "time" else None, "num_iterations": None,
           "token_budget": None}
    for key, default in LR_DEFAULTS.items():
        v = _num(h.get(key))
        if v is None:
            v = flag("--" + key.replace("_", "-"))
        out[key] = default if v is None else v
    if lr == "steps":
        iters = _positive(h.get("num_iterations")) or _positive(flag("--num-iterations")) or _num(summary.get("steps"))
        batch = _positive(h.get("total_batch_size")) or _positive(flag("--total-batch-size"))
        if batch is None and _num(summary.get("tokens")) and _num(summary.get("steps")):
            batch = summary["tokens"] / summary["steps"]
        out["num_iterations"] = iters
        out["token_budget"] = iters * batch if iters is not None and batch is not None else None
    out["eval_tokens"] = _num((run_rec or {}).get("eval_tokens")) or flag("--eval-tokens")
    return out


def trained_blocks(steps: list[dict], summary: dict | None, run_rec: dict | None, depth) -> dict:
    """What the block schedule did: the mean trained blocks per step (the summary's
    `schedule_stats.mean_trained_blocks`, else the mean of the step records' `active_layers`), the
    number of blocks, and how many steps froze a prefix (known from the step records only)."""
    summary, run_rec = summary or {}, run_rec or {}
    stats = summary.get("schedule_stats") or {}
    active = [s["active_layers"] for s in steps if _num(s.get("active_layers")) is not None]
    mean = _num(stats.get("mean_trained_blocks"))
    if mean is None and active:
        mean = statistics.fmean(active)
    n_layer = next((v for v in (_num(stats.get("n_layer")), _num(run_rec.get("n_layer")),
                                _num((summary.get("dynamic_suffix") or {}).get("n_layer")), _num(depth))
                    if v is not None), None)
    frozen = sum(a < n_layer for a in active) if active and n_layer else None
    every = None if mean is None or not n_layer else mean >= n_layer - 1e-9
    return {"mean_trained_blocks": mean, "n_layer": n_layer, "frozen_steps": frozen, "counted_steps": len(active),
            "all_blocks": every}


def run_row(run: dict, m: dict) -> dict:
    """The summary.csv row of one run (None = not available, written as NA), with the run's horizon
    (`horizon`) and block statistics beside the columns."""
    steps, evals, summary, run_rec = m["steps"], m["evals"], m["summary"], m["run"]
    cmd = run.get("_cmd", "")
    schedule = (summary or {}).get("schedule") or (run_rec or {}).get("schedule") or run.get("schedule") or ""
    variant = run.get("variant") or {"full_update": "full", "dynamic_suffix": "dynamic"}.get(schedule, schedule)
    exit_code = run.get("exit_code", "")
    status = "ok" if summary is not None and exit_code in ("", "0", None) else "failed"
    row = {c: None for c in COLUMNS}
    depth = _num((run_rec or {}).get("depth")) or _num(flag_value(cmd, "--depth")) or _num(run.get("depth"))
    row.update(run_id=run.get("run_id", ""), variant=variant, schedule=schedule, seed=run.get("seed") or None,
               status=status, wall_sec=_num(run.get("wall_sec")), role=run.get("role") or "",
               depth=None if depth is None else int(depth), budget_fraction=_num(run.get("budget_fraction")))
    if steps:
        later = steps[1:]  # the first step of the process compiles: excluded from the rates
        row["num_iterations"] = len(steps)
        row["elapsed_sec"] = steps[-1]["train_elapsed"]
        row["compile_sec"] = steps[0]["dt"]
        row["tokens"] = steps[-1]["tokens"]
        if later:
            row["max_tok_per_sec"] = max(s["tok_per_sec"] for s in later)
            batch = steps[0]["tokens"] / (steps[0]["step"] + 1)  # tokens per optimizer step
            row["avg_tok_per_sec"] = len(later) * batch / sum(s["dt"] for s in later)
        n_last = max(1, math.ceil(FINAL_LOSS_FRAC * len(steps)))
        row["final_loss"] = statistics.fmean(s["loss"] for s in steps[-n_last:])
        peaks = [s["step_peak_mib"] for s in steps if s.get("step_peak_mib") is not None]
        if peaks:
            row["avg_step_peak_vram_mib"] = statistics.fmean(peaks)
            row["peak_vram_mib"] = max(peaks)
        active = [s["active_layers"] for s in steps if s.get("active_layers") is not None]
        if active:
            row["active_layers_mean"] = statistics.fmean(active)
            row["active_layers_range"] = f"{min(active)}-{max(active)}"
    if summary is not None:  # the summary's own numbers win where it has them
        row["num_iterations"] = summary.get("steps_this_run", summary.get("steps", row["num_iterations"]))
        row["elapsed_sec"] = summary.get("train_elapsed", row["elapsed_sec"])
        row["tokens"] = summary.get("tokens", row["tokens"])
        if summary.get("first_step_sec") is not None:
            row["compile_sec"] = summary["first_step_sec"]
        if summary.get("peak_mib") is not None:
            row["peak_vram_mib"] = summary["peak_mib"]
    bpbs = [e["val_bpb"] for e in evals if _num(e.get("val_bpb")) is not None]
    if bpbs:
        row["min_val_bpb"] = min(bpbs)
        row["final_val_bpb"] = bpbs[-1]
    if row["wall_sec"] is not None and row["elapsed_sec"] is not None:
        row["setup_sec"] = row["wall_sec"] - row["elapsed_sec"]
    blocks = trained_blocks(steps, summary, run_rec, row["depth"])
    row["mean_trained_blocks"], row["n_layer"] = blocks["mean_trained_blocks"], blocks["n_layer"]
    row["blocks"] = blocks
    row["horizon"] = run_horizon(run_rec, summary, cmd)
    row["lr_schedule"] = row["horizon"]["lr_schedule"]
    row["time_budget_sec"] = row["horizon"]["time_budget_sec"]
    row["eval_tokens"] = row["horizon"]["eval_tokens"]
    return row


def fmt(col: str, v) -> str:
    if v is None:
        return NA
    if isinstance(v, float) and col in DIGITS:
        return f"{v:.{DIGITS[col]}f}"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# -----------------------------------------------------------------------------
# Aggregation


def median_or_none(values):
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return statistics.median(vals) if vals else None


def median_unreached_last(values) -> float | None:
    """Median of per-seed numbers where None means "never got there" and counts as +inf (worse than
    any seed that did), so that leaving such a seed out cannot flatter the median. None if there are
    no values or the median is such a seed."""
    vals = [math.inf if v is None else v for v in values]
    m = statistics.median(vals) if vals else None
    return m if m is not None and math.isfinite(m) else None


def arm_medians(rows: list[dict], label=lambda r: r["variant"]) -> list[dict]:
    """Per arm (`label` of a row: its variant, or variant and budget): the median over its successful
    runs (seeds) of every numeric column."""
    out = []
    for variant in dict.fromkeys(label(r) for r in rows):
        runs = [r for r in rows if label(r) == variant]
        arm = [r for r in runs if r["status"] == "ok"]
        m = {"variant": variant, "schedule": runs[0]["schedule"], "runs": len(arm), "failed": len(runs) - len(arm)}
        for c in NUMERIC:
            m[c] = median_or_none(r[c] for r in arm)
        out.append(m)
    return out


def ratios(medians: list[dict]) -> dict | None:
    """dynamic/full of the arms' medians, and dynamic - full of their val bpb (None if an arm is missing)."""
    full = next((m for m in medians if m["schedule"] == "full_update"), None)
    dyn = next((m for m in medians if m["schedule"] == "dynamic_suffix"), None)
    if full is None or dyn is None:
        return None

    def ratio(c):
        a, b = dyn[c], full[c]
        return a / b if a is not None and b not in (None, 0) else None

    def diff(c):
        a, b = dyn[c], full[c]
        return a - b if a is not None and b is not None else None

    return {"full": full, "dynamic": dyn,
            "ratio": {c: ratio(c) for c in ("avg_tok_per_sec", "max_tok_per_sec", "elapsed_sec", "num_iterations",
                                            "tokens", "compile_sec", "setup_sec", "avg_step_peak_vram_mib",
                                            "peak_vram_mib")},
            "diff": {c: diff(c) for c in ("final_val_bpb", "min_val_bpb", "final_loss")}}


def paired_diffs(rows: list[dict], col: str) -> list[tuple[str, float]]:
    """(seed, dynamic - full) of `col` for every seed that has a successful run in both arms."""
    by = {}
    for r in rows:
        if r["status"] == "ok" and r["seed"] is not None and r[col] is not None:
            by.setdefault(r["seed"], {})[r["schedule"]] = r[col]
    return [(s, d["dynamic_suffix"] - d["full_update"]) for s, d in by.items()
            if "dynamic_suffix" in d and "full_update" in d]


def seed_key(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


# -----------------------------------------------------------------------------
# Guards: equal schedules, enough eval tokens, what the block schedule did


def _show(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:g}" if isinstance(v, float) else str(v)


def horizon_differences(rows: list[dict], keys=HORIZON_KEYS) -> list[str]:
    """One line per horizon key on which the runs disagree: each value with the arms that have it."""
    out = []
    for key in keys:
        by_value = {}
        for r in rows:
            by_value.setdefault(_show(r["horizon"][key]), []).append(r["variant"])
        if len(by_value) > 1:
            out.append(f"`{key}` " + "; ".join(f"{v} ({', '.join(dict.fromkeys(arms))})"
                                                for v, arms in by_value.items()))
    return out


@dataclass
class Guard:
    """Why the comparative numbers may not be printed, and whether the user allowed it anyway."""
    differences: list[str] = field(default_factory=list)  # horizon keys on which compared runs differ
    few_eval_tokens: list[str] = field(default_factory=list)  # frontier: runs with < MIN_EVAL_TOKENS
    unknown_eval_tokens: list[str] = field(default_factory=list)
    wrapped: list[str] = field(default_factory=list)  # runs whose evaluation reached the end of the val split
    allow_unequal: bool = False
    allow_few: bool = False

    @property
    def refused(self) -> bool:
        return bool(self.differences and not self.allow_unequal) or bool(self.few_eval_tokens and not self.allow_few)

    def lines(self) -> list[str]:
        """The headline's statements about the comparison's validity."""
        out = []
        if self.differences and not self.allow_unequal:
            out.append("**Refused: the compared runs' LR schedules or token budgets differ, so no ratio or difference "
                       "is printed (a run with a longer or later schedule wins by its schedule alone). Differences: "
                       + "; ".join(self.differences) + ". Give every arm the same schedule, or set "
                       "ALLOW_UNEQUAL_SCHEDULES=1 to print them anyway.**")
        elif self.differences:
            out.append("**ALLOW_UNEQUAL_SCHEDULES=1: the compared runs' LR schedules or token budgets differ ("
                       + "; ".join(self.differences) + "). Every ratio and difference below compares runs with "
                       "different schedules: part of any gain may be the schedule's.**")
        if self.few_eval_tokens and not self.allow_few:
            out.append(f"**Refused: val bpb measured on fewer than {MIN_EVAL_TOKENS:,} tokens ("
                       + ", ".join(self.few_eval_tokens) + "): too few for a quality claim. Rerun with "
                       f"EVAL_TOKENS >= {MIN_EVAL_TOKENS:,}, or set ALLOW_FEW_EVAL_TOKENS=1 to print the "
                       "comparison anyway.**")
        elif self.few_eval_tokens:
            out.append(f"**ALLOW_FEW_EVAL_TOKENS=1: val bpb measured on fewer than {MIN_EVAL_TOKENS:,} tokens ("
                       + ", ".join(self.few_eval_tokens) + "): not enough for a quality claim.**")
        if self.unknown_eval_tokens:
            out.append("Eval tokens unknown (no run record, no --eval-tokens in the command) for: "
                       + ", ".join(self.unknown_eval_tokens) + ".")
        if self.wrapped:
            out.append("**Evaluation reached the end of the val split in: " + ", ".join(self.wrapped)
                       + ". The val split holds fewer tokens than EVAL_TOKENS; those evals measured fewer (each row once).**")
        return out


def build_guard(rows: list[dict], frontier: bool, allow_unequal: bool, allow_few: bool) -> Guard:
    """The guard over the runs that are compared with each other: in a frontier report the runs on
    the full budget (runs on a fraction of it are checked against that fraction in their own
    section), in a two-arm report every run."""
    ok = [r for r in rows if r["status"] == "ok"]
    g = Guard(allow_unequal=allow_unequal, allow_few=allow_few)
    if frontier:
        groups = budget_groups(ok)
        for ref, members in groups.items():
            full_budget = [r for r in members if (r["budget_fraction"] or 1.0) == 1.0]
            where = f"at the {_show(ref)} s budget: " if len(groups) > 1 else ""
            g.differences += [where + d for d in horizon_differences(full_budget)]
            g.differences += fraction_differences(members, full_budget)
        g.differences += [f"`lr_schedule` steps in {r['run_id']} (a frontier comparison needs a time budget in every "
                          "run)" for r in ok if r["lr_schedule"] != "time"]
        known = [r for r in ok if r["eval_tokens"] is not None]
        g.few_eval_tokens = [f"{r['run_id']}: {r['eval_tokens']:,.0f}" for r in known
                             if r["eval_tokens"] < MIN_EVAL_TOKENS]
        g.unknown_eval_tokens = [r["run_id"] for r in ok if r["eval_tokens"] is None]
    else:
        g.differences = horizon_differences(ok)
    evals = {_show(r["eval_tokens"]) for r in ok}
    if len(evals) > 1:
        g.differences.append("`eval_tokens` " + ", ".join(sorted(evals)) + " (the val bpb of different val sets)")
    g.wrapped = [r["run_id"] for r in rows if r.get("eval_wrapped")]
    return g


def fraction_differences(members: list[dict], full_budget: list[dict]) -> list[str]:
    """Runs of one reference budget that ran on a fraction of it: their schedule's shape must be that
    of the group's full-budget runs (their budget is that fraction by construction)."""
    out = []
    for r in members:
        if (r["budget_fraction"] or 1.0) == 1.0:
            continue
        if not full_budget:
            out.append(f"{r['run_id']}: no run on the full {_show(reference_budget(r))} s budget to compare with")
            continue
        shape = [k for k in ("lr_schedule", *LR_DEFAULTS) if r["horizon"][k] != full_budget[0]["horizon"][k]]
        if shape:
            out.append(f"{r['run_id']}: {', '.join(f'`{k}`' for k in shape)} differ from the full-budget runs'")
    return out


def budget_groups(rows: list[dict]) -> dict:
    """{reference budget: its rows}, budgets ascending (None, a run without a time budget, last)."""
    groups = {}
    for r in rows:
        groups.setdefault(reference_budget(r), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0)))


def reference_budget(r: dict) -> float | None:
    """The full budget a run belongs to: its time budget divided by its budget fraction."""
    if r["time_budget_sec"] is None:
        return None
    return round(r["time_budget_sec"] / (r["budget_fraction"] or 1.0), 6)


def blocks_note(rows: list[dict], schedule: str) -> str:
    """What the block schedule did over an arm's runs, in words. A block-update schedule that never
    froze a block trained like full_update: it is said in bold, as it cannot claim a speed-up."""
    b = [r["blocks"] for r in rows]
    means = [x["mean_trained_blocks"] for x in b if x["mean_trained_blocks"] is not None]
    n = next((x["n_layer"] for x in b if x["n_layer"]), None)
    if not means or not n:
        return "trained blocks unknown (no schedule_stats, no active_layers)"
    mean = statistics.median(means)
    if all(x["all_blocks"] for x in b):
        note = f"every step trained all {n:g} blocks"
        return note if schedule in ("full_update", "") else f"**no block was ever frozen** ({note})"
    counted = sum(x["counted_steps"] for x in b)
    frozen = sum(x["frozen_steps"] or 0 for x in b)
    steps = f"; fewer than all blocks trained in {frozen}/{counted} steps" if counted else ""
    return f"{mean:.2f} of {n:g} blocks trained per step (median over runs){steps}"


def never_froze(rows: list[dict], schedule: str) -> bool:
    """A block-update schedule (not full_update) whose runs all trained every block at every step."""
    return schedule not in ("full_update", "") and bool(rows) and all(r["blocks"]["all_blocks"] for r in rows)


NO_FREEZE = ("**no block was ever frozen: every step trained all blocks, as full_update does, so this arm cannot "
             "claim a speed-up from training fewer blocks; any gain here comes from elsewhere (its LR schedule, its "
             "seed)**")


def read_allow(name: str, dirs: list[str]) -> bool:
    """ALLOW_* from the environment, or from a `name: 1` line of a source dir's compare_config.txt."""
    if os.environ.get(name) == "1":
        return True
    for d in dirs:
        path = os.path.join(d, "compare_config.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if any(line.strip() == f"{name.lower()}: 1" for line in f):
                    return True
    return False


# -----------------------------------------------------------------------------
# Time to target (two-arm report)


def eval_points(evals: list[dict]) -> list[tuple]:
    """(step, train_elapsed, val_bpb) of the evals that have both numbers, in file (= step) order.

    An eval without train_elapsed cannot be placed on the time axis, so it takes no part in the
    time-to-target numbers.
    """
    return [(e.get("step"), e["train_elapsed"], e["val_bpb"]) for e in evals
            if _num(e.get("val_bpb")) is not None and _num(e.get("train_elapsed")) is not None]


def crossing(points: list[tuple], target: float) -> dict | None:
    """When a run's val bpb first reaches `target` (None if no eval is at or below it).

    Evals are discrete, so the crossing is only known to lie between the last eval above the
    target and the first at or below it: `first_eval_sec` is the latter's train_elapsed (what was
    observed: conservative), `interp_sec` the time where the straight line between the two evals
    meets the target (the estimate; equal to `first_eval_sec` when the eval hits the target exactly
    or is the run's first eval).
    """
    prev = None
    for step, t, bpb in points:
        if bpb <= target:
            interp = t if prev is None else prev[1] + (prev[2] - target) / (prev[2] - bpb) * (t - prev[1])
            return {"interp_sec": interp, "first_eval_sec": t, "step": step,
                    "prev_step": None if prev is None else prev[0], "prev_sec": None if prev is None else prev[1]}
        prev = (step, t, bpb)
    return None


def eval_interval(points: list[tuple]) -> tuple[float | None, float | None]:
    """(steps, seconds) between consecutive evals: the medians of the gaps.

    Medians, because the first gap holds the compile step and the last may be short (the final
    eval comes at the last step whatever --eval-every is).
    """
    if len(points) < 2:
        return None, None
    steps = [b[0] - a[0] for a, b in zip(points, points[1:]) if a[0] is not None and b[0] is not None]
    secs = [b[1] - a[1] for a, b in zip(points, points[1:])]
    return (statistics.median(steps) if steps else None), statistics.median(secs)


def time_to_target(full_evals: list[dict], dyn_evals: list[dict]) -> dict:
    """One seed's time to target: the train time the dynamic arm needs to reach the val bpb that the
    full arm ends at, against the full arm's own train time (both train_elapsed: compile included,
    evals excluded). `ratio` uses the interpolated crossing, `ratio_first_eval` the conservative one;
    both None when the full arm has no eval or the dynamic arm never reaches the target (then `best`
    is the dynamic arm's lowest val bpb).
    """
    full, dyn = eval_points(full_evals), eval_points(dyn_evals)
    dyn_steps, dyn_secs = eval_interval(dyn)
    out = {"target": None, "full_sec": None, "cross": None, "ratio": None, "ratio_first_eval": None,
           "best": min((p[2] for p in dyn), default=None), "full_evals": len(full),
           "dyn_interval_steps": dyn_steps, "dyn_interval_sec": dyn_secs}
    if not full:
        return out
    out["target"], out["full_sec"] = full[-1][2], full[-1][1]
    out["cross"] = crossing(dyn, out["target"])
    if out["cross"] is not None and out["full_sec"] > 0:
        out["ratio"] = out["cross"]["interp_sec"] / out["full_sec"]
        out["ratio_first_eval"] = out["cross"]["first_eval_sec"] / out["full_sec"]
    return out


def times_to_target(rows: list[dict], evals_by_run: dict) -> tuple[list[dict], list[str]]:
    """time_to_target of every seed with a successful run in both arms (with `seed`, and the two
    rows as `full_row` / `dyn_row`), and the seeds left out because an arm failed or is missing."""
    by = {}
    for r in rows:
        if r["seed"] is not None:
            by.setdefault(r["seed"], {})[r["schedule"]] = r
    out, skipped = [], []
    for seed in sorted(by, key=lambda s: int(s) if s.isdigit() else s):
        f, d = by[seed].get("full_update"), by[seed].get("dynamic_suffix")
        if f is None or d is None or f["status"] != "ok" or d["status"] != "ok":
            skipped.append(seed)
            continue
        t = time_to_target(evals_by_run.get(f["run_id"], []), evals_by_run.get(d["run_id"], []))
        # The same ratio with each arm's first step (the compile) left out of both times: what the
        # steps themselves cost. It tells a warm compile cache for one arm apart from a real saving.
        fc, dc = f["compile_sec"], d["compile_sec"]
        t["first_steps"] = (fc, dc)
        t["ratio_ex_first"] = None
        if t["cross"] is not None and fc is not None and dc is not None and t["full_sec"] > fc:
            t["ratio_ex_first"] = (t["cross"]["interp_sec"] - dc) / (t["full_sec"] - fc)
        out.append({"seed": seed, "full_row": f, "dyn_row": d, **t})
    return out, skipped


def median_ratio(ttt: list[dict], key: str = "ratio") -> float | None:
    """Median over seeds of a time-to-target ratio; a seed whose dynamic arm never reached the target
    counts as +inf (median_unreached_last)."""
    return median_unreached_last([t[key] for t in ttt if t["target"] is not None and t["full_sec"]])


def fill_target_columns(ttt: list[dict]) -> None:
    """The per-run target columns of both rows of each seed pair (the full row is the reference:
    its own final val bpb, its own train time, ratio 1.0)."""
    for t in ttt:
        if t["target"] is None:
            continue
        f, d = t["full_row"], t["dyn_row"]
        f["target_val_bpb"] = d["target_val_bpb"] = t["target"]
        f["time_to_target_sec"] = t["full_sec"]
        f["time_to_target_ratio"] = 1.0 if t["full_sec"] > 0 else None
        d["time_to_target_sec"] = None if t["cross"] is None else t["cross"]["interp_sec"]
        d["time_to_target_ratio"] = t["ratio"]


def target_section(ttt: list[dict], skipped: list[str], guard: Guard, no_freeze: bool) -> list[str]:
    """The "Time to target" lines of summary.md: a table per seed, the median, the precision; only the
    refusal when the guard refuses; the no-freeze statement beside the median when it applies."""
    md = ["", "## Time to target", "",
          "Train time (train_elapsed: step time incl. compile, excl. evals) that dynamic_suffix needs to reach the "
          "final val bpb of full_update of the same seed, as a fraction of full_update's train time. Interpolated: "
          "linear in time between the last eval above the target and the first at or below it; first eval: that "
          "eval's time (conservative, what was observed).", ""]
    if guard.refused:
        md.append("Not printed: the guard refused the comparison (see the top of this report).")
        return md
    if not ttt:
        md.append("No seed has a successful run in both arms: no time to target.")
        return md
    body = []
    for t in ttt:
        c = t["cross"]
        if t["target"] is None:
            dyn_cells = ["no target (full arm has no eval with train_elapsed)", NA]
        elif c is None:
            dyn_cells = [f"not reached (best {_r(t['best'], 6)} vs target {t['target']:.6f})", NA]
        else:
            dyn_cells = [f"{c['interp_sec']:.2f}", f"{c['first_eval_sec']:.2f} (step {c['step']})"]
        bracket = NA
        if c is not None and c["prev_sec"] is not None:
            bracket = f"steps {c['prev_step']}-{c['step']}, {c['prev_sec']:.2f}-{c['first_eval_sec']:.2f} s"
        first = " / ".join(_r(x, 2) for x in t["first_steps"])
        body.append([t["seed"], _r(t["target"], 6), _r(t["full_sec"], 2)] + dyn_cells
                    + [_r(t["ratio"], 4), _r(t["ratio_first_eval"], 4), bracket, first, _r(t["ratio_ex_first"], 4)])
    md.append(md_table(["seed", "target val bpb (full final)", "full time s", "dynamic time s (interpolated)",
                        "dynamic time s (first eval)", "ratio (interpolated)", "ratio (first eval)",
                        "crossing between evals", "first step s (full / dynamic)",
                        "ratio without first steps"], body))
    counted = [t for t in ttt if t["target"] is not None and t["full_sec"]]
    reached = sum(t["ratio"] is not None for t in counted)
    med, med_first = median_ratio(ttt), median_ratio(ttt, "ratio_first_eval")
    unreached = "" if reached == len(counted) else "; a seed that did not counts as slower than any that did"
    notes = [f"**Median time-to-target ratio over {len(counted)} seed(s): {_r(med, 4)}** (interpolated; "
             f"{_r(med_first, 4)} from first evals). The dynamic arm reached the target in {reached}/{len(counted)} "
             f"seeds{unreached}." + (f" {NO_FREEZE}." if no_freeze else "")]
    notes.append(f"Without each arm's first step (the compile) in either time: median ratio "
                 f"{_r(median_ratio(ttt, 'ratio_ex_first'), 4)}. The headline includes compile, a real cost; this "
                 "one shows what the steps cost.")
    uneven = [f"s{t['seed']}: {t['first_steps'][0]:.2f} s vs {t['first_steps'][1]:.2f} s" for t in counted
              if None not in t["first_steps"]
              and abs(t["first_steps"][0] - t["first_steps"][1]) > UNEVEN_COMPILE_FRAC * t["full_sec"]]
    if uneven:
        notes.append(f"**The arms' first steps differ by more than {UNEVEN_COMPILE_FRAC:.0%} of full time "
                     f"({'; '.join(uneven)}): one arm probably compiled from a warm cache. Compare the ratio "
                     "without first steps, or rerun with COMPILE_CACHE=per_run.**")
    steps = median_or_none(t["dyn_interval_steps"] for t in ttt)
    secs = median_or_none(t["dyn_interval_sec"] for t in ttt)
    notes.append(f"Precision is bounded by the dynamic arm's eval cadence: one eval every {fmt('steps', steps)} "
                 f"steps, {_r(secs, 2)} s of train_elapsed (medians of the gaps between its evals, median over "
                 "seeds); the crossing lies inside one such gap (column \"crossing between evals\").")
    if len(counted) < 3:
        notes.append("**Fewer than 3 seeds with both arms: the median is not the headline number yet.**")
    warn = []
    for t in ttt:
        if t["full_evals"] < 2:
            warn.append(f"s{t['seed']}: full arm has {t['full_evals']} eval(s) (< 2)")
        if t["dyn_interval_sec"] is None:
            warn.append(f"s{t['seed']}: dynamic arm has < 2 evals (no eval interval)")
        elif t["full_sec"] and t["dyn_interval_sec"] > SPARSE_EVAL_FRAC * t["full_sec"]:
            warn.append(f"s{t['seed']}: dynamic eval interval {t['dyn_interval_sec']:.2f} s > "
                        f"{SPARSE_EVAL_FRAC:.0%} of full time {t['full_sec']:.2f} s")
    if warn:
        notes.append(f"**Precision warning (evals too sparse; lower EVAL_EVERY): {'; '.join(warn)}.**")
    if skipped:
        notes.append(f"Seeds left out (an arm failed or is missing): {', '.join(skipped)}.")
    for n in notes:
        md += ["", n]
    return md




# -----------------------------------------------------------------------------
# Frontier report: the best full_update of any depth vs every feature arm, at equal step time


def arm_summary(variant: str, rows: list[dict]) -> dict:
    """One arm of one budget: its runs, the successful ones by seed, the median final val bpb."""
    ok = [r for r in rows if r["status"] == "ok"]
    first = rows[0]
    return {"variant": variant, "role": first["role"], "depth": first["depth"], "schedule": first["schedule"],
            "fraction": first["budget_fraction"] or 1.0, "rows": rows, "ok": ok,
            "failed": len(rows) - len(ok), "by_seed": {r["seed"]: r for r in ok if r["seed"] is not None},
            "final": median_or_none(r["final_val_bpb"] for r in ok),
            "steps": median_or_none(r["num_iterations"] for r in ok), "tokens": median_or_none(r["tokens"] for r in ok),
            "elapsed": median_or_none(r["elapsed_sec"] for r in ok)}


def against_best(arm: dict, best: dict, evals_by_run: dict) -> dict:
    """An arm against the best baseline, paired by seed: final val bpb minus the best baseline's, and
    the train time at which the arm's evals first reach the best baseline's final val bpb
    (interpolated between evals, as in the two-arm report), also as a fraction of the best
    baseline's train time. The best baseline against itself is the reference: 0 and its own time."""
    per_seed = []
    for seed in sorted(arm["by_seed"], key=seed_key):
        row, ref = arm["by_seed"][seed], best["by_seed"].get(seed)
        if ref is None or row["final_val_bpb"] is None or ref["final_val_bpb"] is None:
            continue
        target = ref["final_val_bpb"]
        if arm is best:
            sec = ref["elapsed_sec"]
        else:
            cross = crossing(eval_points(evals_by_run.get(row["run_id"], [])), target)
            sec = None if cross is None else cross["interp_sec"]
        ratio = sec / ref["elapsed_sec"] if sec is not None and ref["elapsed_sec"] else None
        per_seed.append({"seed": seed, "row": row, "target": target, "diff": row["final_val_bpb"] - target,
                         "sec": sec, "ratio": ratio, "best_sec": ref["elapsed_sec"]})
    diffs = [p["diff"] for p in per_seed]
    return {"per_seed": per_seed, "n": len(diffs), "median": median_or_none(diffs),
            "min": min(diffs, default=None), "max": max(diffs, default=None), "lower": sum(d < 0 for d in diffs),
            "ratio": median_unreached_last([p["ratio"] for p in per_seed]),
            "sec": median_unreached_last([p["sec"] for p in per_seed]),
            "reached": sum(p["sec"] is not None for p in per_seed)}


def frontier_groups(rows: list[dict], evals_by_run: dict) -> list[dict]:
    """Per reference budget: its arms, the best baseline, the best feature arm on the full budget,
    each arm against the best baseline (`vs`)."""
    out = []
    for budget, members in budget_groups([r for r in rows if r["role"] in FRONTIER_ROLES]).items():
        arms = [arm_summary(v, [r for r in members if r["variant"] == v])
                for v in dict.fromkeys(r["variant"] for r in members)]
        scored = [a for a in arms if a["final"] is not None]
        best = min((a for a in scored if a["role"] == "baseline"), key=lambda a: a["final"], default=None)
        best_feature = min((a for a in scored if a["role"] == "feature" and a["fraction"] == 1.0),
                           key=lambda a: a["final"], default=None)
        for a in arms:
            a["vs"] = against_best(a, best, evals_by_run) if best else None
        out.append({"budget": budget, "arms": arms, "best": best, "best_feature": best_feature})
    return out


def fill_frontier_targets(groups: list[dict]) -> None:
    """The target columns of every run: the best baseline's final val bpb of the same seed and budget,
    the time the run needed to reach it, and that time over the best baseline's train time."""
    for g in groups:
        for a in g["arms"]:
            for p in (a["vs"] or {}).get("per_seed", []):
                p["row"].update(target_val_bpb=p["target"], time_to_target_sec=p["sec"],
                                time_to_target_ratio=p["ratio"])


def _signed(v, digits=4) -> str:
    return NA if v is None else f"{v:+.{digits}f}"


def spread(vs: dict) -> str:
    """`+0.0123 [+0.0100, +0.0150], lower in 1/3 seeds`: median, min, max of the paired differences."""
    if not vs or not vs["n"]:
        return "no seed in common with the best baseline"
    return (f"{_signed(vs['median'])} [{_signed(vs['min'])}, {_signed(vs['max'])}], lower in "
            f"{vs['lower']}/{vs['n']} seeds")


def time_to_best(vs: dict) -> str:
    """The median time to the best baseline's final val bpb over seeds, or why there is none."""
    if not vs or not vs["n"]:
        return NA
    if vs["ratio"] is None:
        return f"not reached (reached in {vs['reached']}/{vs['n']} seeds)"
    return f"{vs['ratio']:.3f} x ({vs['sec']:.1f} s), reached in {vs['reached']}/{vs['n']} seeds"


def arm_label(a: dict) -> str:
    depth = "" if a["depth"] is None else f", depth {a['depth']}"
    return f"`{a['variant']}` ({a['schedule'] or 'schedule unknown'}{depth})"


def frontier_headline(groups: list[dict], guard: Guard) -> list[str]:
    """One line per budget: the best baseline, the best feature arm and its difference at equal time."""
    out = []
    for g in groups:
        b, f = g["best"], g["best_feature"]
        head = f"**Budget {_show(g['budget'])} s of step time per run:**"
        if guard.refused:
            out.append(f"{head} comparison refused (above).")
            continue
        if b is None:
            out.append(f"{head} no baseline with a final val bpb: no comparison.")
            continue
        line = f"{head} best baseline {arm_label(b)}, median final val bpb {b['final']:.4f} over {len(b['ok'])} seed(s)"
        if f is None:
            out.append(line + "; no feature arm on this budget.")
            continue
        vs = f["vs"]
        verdict = ("below the best baseline" if vs["median"] is not None and vs["median"] < 0
                   else "not below the best baseline")
        line += (f"; best feature arm {arm_label(f)}, {f['final']:.4f}: minus the best baseline at equal time "
                 f"**{spread(vs)}** ({verdict}); time to the best baseline's final val bpb: {time_to_best(vs)}.")
        if never_froze(f["ok"], f["schedule"]):
            line += f" {NO_FREEZE}."
        if vs["n"] and not vs["reached"] and all(a["fraction"] == 1.0 for a in g["arms"]):
            line += (" No shorter-budget runs (BUDGET_FRACTION) are needed for the reach-it-sooner question: no "
                     "feature arm reached the best baseline's final val bpb on the full budget.")
        out.append(line)
    return out


def frontier_section(g: dict, guard: Guard) -> list[str]:
    """summary.md's section of one budget: the arms' table, the per-seed table, the shorter budgets."""
    md = ["", f"## Budget {_show(g['budget'])} s of step time per run", "",
          "Every run's LR schedule spans elapsed / budget. Differences are the arm's final val bpb minus the best "
          "baseline's of the same seed (median [min, max] over seeds; negative = better than the best baseline). "
          "Time to target: the train time at which the arm's evals first reach the best baseline's final val bpb "
          "(interpolated between evals; more evals with EVAL_EVERY), over the best baseline's train time, median "
          "over seeds with \"not reached\" counted as slower than any seed that reached it.", ""]
    full = [a for a in g["arms"] if a["fraction"] == 1.0]
    short = [a for a in g["arms"] if a["fraction"] != 1.0]
    if guard.refused or g["best"] is None:
        md.append("Comparison not printed (see the top of this report); the arms' own numbers:")
        md += ["", md_table(["arm", "role", "depth", "schedule", "budget fraction", "runs", "median final val bpb",
                             "median steps", "blocks trained"],
                            [[a["variant"], a["role"], fmt("depth", a["depth"]), a["schedule"], f"{a['fraction']:g}",
                              f"{len(a['ok'])} ok" + (f", {a['failed']} failed" if a["failed"] else ""),
                              _r(a["final"], 4), fmt("steps", a["steps"]), blocks_note(a["ok"], a["schedule"])]
                             for a in g["arms"]])]
        return md
    best = g["best"]
    body = []
    for a in sorted(full, key=lambda a: (a["role"] != "baseline", a["final"] if a["final"] is not None else math.inf)):
        diff = "0 (the best baseline)" if a is best else spread(a["vs"])
        ttt = "1 (reference)" if a is best else time_to_best(a["vs"])
        if a is not best and never_froze(a["ok"], a["schedule"]):
            diff += " " + NO_FREEZE
        body.append([a["variant"], a["role"], fmt("depth", a["depth"]), a["schedule"],
                     f"{len(a['ok'])} ok" + (f", {a['failed']} failed" if a["failed"] else ""), _r(a["final"], 4),
                     diff, ttt, fmt("steps", a["steps"]), fmt("tokens", a["tokens"]),
                     blocks_note(a["ok"], a["schedule"])])
    md.append(md_table(["arm", "role", "depth", "schedule", "runs", "median final val bpb",
                        f"minus {best['variant']}: median [min, max]", f"time to {best['variant']}'s final (median)",
                        "median steps", "median tokens", "blocks trained"], body))
    if short:
        md += ["", f"### Shorter budgets (BUDGET_FRACTION) against {best['variant']} on the full budget", "",
               "Each of these arms ran with its LR schedule over a fraction of the budget; its final val bpb minus "
               f"the best baseline's final val bpb on the full {_show(g['budget'])} s (paired by seed). At or below 0 "
               "in a seed: the arm reached the best baseline's quality in that fraction of the time.", ""]
        rows = []
        for a in short:
            vs = a["vs"]
            at_or_below = sum(p["diff"] <= 0 for p in vs["per_seed"])
            cell = spread(vs) + (f" {NO_FREEZE}" if never_froze(a["ok"], a["schedule"]) else "")
            rows.append([a["variant"], f"{a['fraction']:g}", _show(a["ok"][0]["time_budget_sec"] if a["ok"] else None),
                         _r(a["final"], 4), cell, f"{at_or_below}/{vs['n']}", blocks_note(a["ok"], a["schedule"])])
        md.append(md_table(["arm", "budget fraction", "budget s", "median final val bpb",
                            f"minus {best['variant']} (full budget): median [min, max]", "at or below it in",
                            "blocks trained"], rows))
    md += ["", "### Per seed", ""]
    per = []
    for a in g["arms"]:
        for p in a["vs"]["per_seed"]:
            r = p["row"]
            per.append([a["variant"], p["seed"], fmt("final_val_bpb", r["final_val_bpb"]), _signed(p["diff"]),
                        _r(p["sec"], 2), _r(p["ratio"], 4), fmt("elapsed_sec", r["elapsed_sec"]),
                        fmt("num_iterations", r["num_iterations"]),
                        fmt("mean_trained_blocks", r["mean_trained_blocks"])])
    md.append(md_table(["arm", "seed", "final val bpb", f"minus {best['variant']}", "time to target s",
                        "time to target ratio", "train s", "steps", "mean trained blocks"], per))
    return md


def frontier_points(groups: list[dict]) -> list[tuple[float, float, str]]:
    """(budget, best baseline's median final val bpb, its arm) per budget: the frontier of full_update."""
    return [(g["budget"], g["best"]["final"], g["best"]["variant"]) for g in groups
            if g["budget"] is not None and g["best"] is not None]


# -----------------------------------------------------------------------------
# Plot (matplotlib, imported only here: the `compare` extra)

MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # 7 markers x 10 colours: 70 arms before a repeat


def _interp(t: float, pts: list[tuple[float, float]]) -> float:
    """A curve's value at time t, linear between its points (pts sorted by time, t inside them)."""
    xs = [p[0] for p in pts]
    i = bisect.bisect_left(xs, t)
    if i < len(xs) and xs[i] == t:
        return pts[i][1]
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (t - x0) / (x1 - x0)


def median_curve(runs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The median over seeds of an arm's curves, at every eval time of any seed inside the time range
    that all seeds cover (each seed's curve linear between its evals)."""
    runs = [r for r in runs if r]
    if len(runs) <= 1:
        return runs[0] if runs else []
    lo, hi = max(r[0][0] for r in runs), min(r[-1][0] for r in runs)
    grid = sorted({t for r in runs for t, _ in r if lo <= t <= hi})
    return [(t, statistics.median(_interp(t, r) for r in runs)) for t in grid]


def plot_curves(rows: list[dict], evals_by_run: dict) -> list[dict]:
    """One curve per arm and budget: its runs' (train_elapsed, val_bpb) points, seed by seed."""
    budgets = {reference_budget(r) for r in rows}
    curves = {}
    for r in rows:
        pts = sorted((t, b) for _, t, b in eval_points(evals_by_run.get(r["run_id"], [])))
        if not pts:
            continue
        key = (r["variant"], reference_budget(r))
        label = r["variant"] + (f" @ {_show(key[1])} s" if len(budgets) > 1 and key[1] is not None else "")
        c = curves.setdefault(key, {"label": label, "baseline": r["role"] in ("baseline", "full"), "runs": []})
        c["runs"].append(pts)
    return list(curves.values())


def plot_val_bpb(path: str, curves: list[dict], targets=(), frontier=(), title: str = "") -> str | None:
    """Write the val bpb vs train time PNG; None, or why it was not written.

    Left panel every eval, right panel the second half of the time axis zoomed (the step-0 eval,
    about ln(vocab) nats per token, squeezes the ends of the curves). Per arm: a thin line per seed
    and a thick median line with markers; arms differ in colour and marker, and baselines are solid
    while feature arms are dashed. targets: [(label, val_bpb, x_end or None)] drawn as dotted
    horizontal lines; frontier: [(budget, val_bpb, arm)] joined by a black line with stars.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[compare]'): no plot"
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), layout="constrained")
    colours = plt.get_cmap("tab10").colors
    t_max = max([p[0] for c in curves for r in c["runs"] for p in r] + [b for b, _, _ in frontier] + [1e-9])
    for ax, zoom in zip(axes, (False, True)):
        lo_t = TAIL_FROM * t_max if zoom else -math.inf
        ys = []
        for k, c in enumerate(curves):
            style = {"color": colours[k % len(colours)], "linestyle": "-" if c["baseline"] else "--"}
            for r in c["runs"]:
                pts = [p for p in r if p[0] >= lo_t]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.9, alpha=0.45, **style)
            med = [p for p in median_curve(c["runs"]) if p[0] >= lo_t]
            ys += [p[1] for r in c["runs"] for p in r if p[0] >= lo_t]
            n = len(c["runs"])
            ax.plot([p[0] for p in med], [p[1] for p in med], linewidth=2.6, marker=MARKERS[k % len(MARKERS)],
                    markersize=6, markevery=max(1, len(med) // 12),
                    label=f"{c['label']} (median of {n} seeds)" if n > 1 else f"{c['label']} (1 seed)", **style)
        for label, y, x_end in targets:
            ax.hlines(y, 0 if not zoom else lo_t, x_end if x_end else t_max, colors="black", linestyles=":",
                      linewidth=1.4, label=label)
            ys.append(y)
        if frontier:
            pts = [(b, y) for b, y, _ in frontier if b >= lo_t]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", linewidth=1.5, marker="*", markersize=14,
                    label="frontier: best full_update's median final val bpb per budget")
            ys += [p[1] for p in pts]
        if zoom and ys:
            pad = 0.05 * (max(ys) - min(ys)) or 0.01
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
            ax.set_xlim(lo_t, t_max * 1.02)
        ax.set_title("second half of the time axis (zoom)" if zoom else "every eval")
        ax.set_xlabel("train time, s (step time incl. compile, excl. evals)")
        ax.set_ylabel("val bpb (bits per byte)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -----------------------------------------------------------------------------
# Writing


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _r(v, digits=3) -> str:
    return NA if v is None else f"{v:.{digits}f}"


PER_RUN_FLAGS = ("--model-tag=", "--metrics-file=")


def flag_difference(cmd_a: str, cmd_b: str) -> tuple[list[str], list[str], str]:
    """Flags only in command a, only in command b, and the shared command.

    --model-tag and --metrics-file (per run by construction) are left out; so that the shared
    command holds no machine paths, they are shown as placeholders and the interpreter by its name.
    """
    def flags(cmd):
        toks = cmd.split()
        if toks:  # the interpreter: its name only (PYTHON may be a path on the machine)
            toks[0] = os.path.basename(toks[0])
        return [t for t in toks if not t.startswith(PER_RUN_FLAGS)]
    a, b = flags(cmd_a), flags(cmd_b)
    shared = [t for t in a if t in b] + ["--model-tag=<per run>", "--metrics-file=<per run>"]
    return [t for t in a if t not in b], [t for t in b if t not in a], " ".join(shared)


def _ticks(flags: list[str]) -> str:
    return " ".join(f"`{t}`" for t in flags) or "(none)"


def read_sources(source_dirs: list[str]) -> list[dict]:
    """The runs of every source dir, each tagged with its dir (`_dir`); a run_id twice is an error."""
    runs, where = [], {}
    for d in source_dirs:
        found = read_runs(d)
        if not found:
            raise SystemExit(f"compare_report: no runs.tsv and no *.metrics.jsonl in {d}")
        for run in found:
            if run["run_id"] in where:
                raise SystemExit(f"compare_report: run {run['run_id']} is in both {where[run['run_id']]} and {d}; "
                                 f"merge comparisons of different seeds or budgets")
            where[run["run_id"]] = d
            runs.append({**run, "_dir": d})
    return runs


def _dir_name(d: str) -> str:
    """A results dir by its name only: the report holds no machine paths."""
    return os.path.basename(os.path.normpath(d))


def header_lines(sources: list[str], rows: list[dict]) -> list[str]:
    """The configs of the source dirs, the seeds, the failed runs."""
    md = []
    if len(sources) > 1:
        md += [f"Merged from {len(sources)} results dirs: {', '.join(f'`{_dir_name(d)}`' for d in sources)}.", ""]
    for d in sources:
        config = os.path.join(d, "compare_config.txt")
        if os.path.exists(config):
            with open(config, encoding="utf-8") as f:
                md += ([f"`{_dir_name(d)}`:", ""] if len(sources) > 1 else []) \
                    + ["```", f.read().strip(), "```", ""]
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None}, key=seed_key)
    md.append(f"Seeds: {', '.join(seeds) or NA} ({len(seeds)})."
              + ("" if len(seeds) >= 3 else " **Fewer than 3 seeds: speed numbers only, no quality claim.**"))
    failed = [r["run_id"] for r in rows if r["status"] != "ok"]
    if failed:
        md.append(f"**Failed runs (left out of the medians): {', '.join(failed)}.**")
    return md


def medians_table(medians: list[dict]) -> list[str]:
    cols = ["num_iterations", "elapsed_sec", "compile_sec", "setup_sec", "avg_tok_per_sec", "max_tok_per_sec",
            "final_loss", "final_val_bpb", "min_val_bpb", "avg_step_peak_vram_mib", "peak_vram_mib",
            "mean_trained_blocks"]
    return ["", "## Per-arm medians over seeds", "",
            md_table(["variant", "schedule", "runs"] + cols,
                     [[m["variant"], m["schedule"], str(m["runs"])] + [fmt(c, m[c]) for c in cols] for m in medians])]


def two_arm_sections(rows: list[dict], runs: list[dict], evals_by_run: dict, guard: Guard) -> tuple[list[str], dict]:
    """The sections of a full_update vs dynamic_suffix report, and its numbers."""
    ttt, ttt_skipped = times_to_target(rows, evals_by_run)
    if not guard.refused:
        fill_target_columns(ttt)
    dyn_rows = [r for r in rows if r["schedule"] == "dynamic_suffix" and r["status"] == "ok"]
    no_freeze = never_froze(dyn_rows, "dynamic_suffix")
    md = ["", "## What each arm did", ""]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        arm = [r for r in rows if r["variant"] == variant and r["status"] == "ok"]
        if arm:
            md.append(f"- `{variant}` ({arm[0]['schedule']}): {blocks_note(arm, arm[0]['schedule'])}.")
    cmds = {r["run_id"]: r["_cmd"] for r in runs}
    full_run = next((r for r in rows if r["schedule"] == "full_update" and cmds.get(r["run_id"])), None)
    dyn_run = next((r for r in rows if r["schedule"] == "dynamic_suffix" and cmds.get(r["run_id"])), None)
    if full_run and dyn_run:
        only_full, only_dyn, shared = flag_difference(cmds[full_run["run_id"]], cmds[dyn_run["run_id"]])
        md += ["", f"Flags that differ between `{full_run['run_id']}` and `{dyn_run['run_id']}` "
                   "(apart from --model-tag and --metrics-file):",
               f"- full only: {_ticks(only_full)}", f"- dynamic only: {_ticks(only_dyn)}",
               "", "Shared flags:", "", "```", shared, "```"]
    md += target_section(ttt, ttt_skipped, guard, no_freeze)
    medians = arm_medians(rows)
    rat = ratios(medians)
    md += medians_table(medians)
    md += ["", "## dynamic vs full (of the medians)", ""]
    if guard.refused:
        md.append("Not printed: the guard refused the comparison (see the top of this report).")
    elif rat is None:
        md.append("One arm has no runs: no ratios.")
    else:
        if no_freeze:
            md += [NO_FREEZE + ".", ""]
        f_, d_ = rat["full"], rat["dynamic"]
        body = [[c, fmt(c, f_[c]), fmt(c, d_[c]), _r(v, 3)] for c, v in rat["ratio"].items()]
        md.append(md_table(["quantity", "full", "dynamic", "dynamic / full"], body))
        md += ["", md_table(["quantity", "full", "dynamic", "dynamic - full"],
                            [[c, fmt(c, f_[c]), fmt(c, d_[c]), _r(v, 4)] for c, v in rat["diff"].items()])]
        for col in ("final_val_bpb", "min_val_bpb"):
            pd = paired_diffs(rows, col)
            if pd:
                ds = [d for _, d in pd]
                md.append(f"\nPaired by seed, {col} dynamic - full: median {statistics.median(ds):+.4f}, "
                          f"range [{min(ds):+.4f}, {max(ds):+.4f}], dynamic lower in {sum(d < 0 for d in ds)}/{len(ds)} "
                          f"seeds ({', '.join(f's{s}: {d:+.4f}' for s, d in pd)}).")
    full_final = next((m["final_val_bpb"] for m in medians if m["schedule"] == "full_update"), None)
    targets = [] if guard.refused or full_final is None else [
        (f"target: full_update's median final val bpb {full_final:.4f}", full_final, None)]
    return md, {"medians": medians, "ratios": None if guard.refused else rat, "time_to_target": ttt,
                "time_to_target_median": None if guard.refused else median_ratio(ttt), "targets": targets,
                "frontier": []}


def frontier_sections(rows: list[dict], runs: list[dict], evals_by_run: dict, guard: Guard) -> tuple[list[str], dict]:
    """The sections of a frontier report, and its numbers."""
    groups = frontier_groups(rows, evals_by_run)
    if not guard.refused:
        fill_frontier_targets(groups)
    md = ["", "## Headline", ""] + [line for h in frontier_headline(groups, guard) for line in (h, "")]
    for g in groups:
        md += frontier_section(g, guard)
    # Each arm's flags against the best (else the first) baseline's, for runs of the same seed.
    ref = next((g["best"] for g in groups if g["best"]), None)
    ref = ref or next((a for g in groups for a in g["arms"] if a["role"] == "baseline" and a["ok"]), None)
    cmds = {r["run_id"]: r["_cmd"] for r in runs}
    lines = []
    for g in groups:
        for a in g["arms"]:
            if ref is None or a is ref or not a["ok"]:
                continue
            ref_run = next((ref["by_seed"][s] for s in a["by_seed"] if s in ref["by_seed"]), ref["ok"][0])
            run = a["by_seed"].get(ref_run["seed"], a["ok"][0])
            if cmds.get(run["run_id"]) and cmds.get(ref_run["run_id"]):
                only_ref, only_arm, _ = flag_difference(cmds[ref_run["run_id"]], cmds[run["run_id"]])
                lines.append(f"- `{a['variant']}`: {_ticks(only_arm)} instead of {_ticks(only_ref)}")
    if lines:
        md += ["", f"## Flags of each arm against `{ref['variant']}` (same seed; apart from --model-tag and "
                   "--metrics-file)", ""] + lines
    several = len(groups) > 1
    md += medians_table(arm_medians(rows, lambda r: r["variant"]
                                    + (f" @ {_show(reference_budget(r))} s" if several else "")))
    points = [] if guard.refused else frontier_points(groups)
    multi = len(points) > 1
    targets = [(f"target: {v} median final val bpb {y:.4f}" + (f" ({_show(b)} s)" if multi else ""), y,
                b if multi else None) for b, y, v in points]
    best = groups[-1]["best"] if groups else None
    return md, {"groups": groups, "best_baseline": None if best is None else best["variant"],
                "targets": targets, "frontier": points}


def write_report(results_dir: str, source_dirs: list[str] | None = None, allow_unequal: bool | None = None,
                 allow_few: bool | None = None) -> dict:
    """Write the report into results_dir, from the runs of source_dirs (default: results_dir).
    allow_unequal / allow_few: None reads ALLOW_UNEQUAL_SCHEDULES / ALLOW_FEW_EVAL_TOKENS (read_allow)."""
    sources = source_dirs or [results_dir]
    runs = read_sources(sources)
    rows, evals_by_run = [], {}
    for run in runs:
        run["_cmd"] = command_of(run["_dir"], run)
        m = read_metrics(os.path.join(run["_dir"], run.get("metrics_file") or ""))
        row = run_row(run, m)
        row["eval_wrapped"] = eval_wrapped(run["_dir"], run)
        rows.append(row)
        evals_by_run[row["run_id"]] = m["evals"]
    allow_unequal = read_allow("ALLOW_UNEQUAL_SCHEDULES", sources) if allow_unequal is None else allow_unequal
    allow_few = read_allow("ALLOW_FEW_EVAL_TOKENS", sources) if allow_few is None else allow_few
    frontier = any(r["role"] in FRONTIER_ROLES for r in rows)
    guard = build_guard(rows, frontier, allow_unequal, allow_few)
    sections, out = (frontier_sections if frontier else two_arm_sections)(rows, runs, evals_by_run, guard)

    with open(os.path.join(results_dir, "summary.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([fmt(c, r[c]) for c in COLUMNS])
    with open(os.path.join(results_dir, "val_bpb_vs_time.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "variant", "seed", "step", "train_elapsed", "val_bpb"])
        for r in rows:
            for e in evals_by_run.get(r["run_id"], []):
                w.writerow([r["run_id"], r["variant"], fmt("seed", r["seed"]), e.get("step"), e.get("train_elapsed"),
                            e.get("val_bpb")])
    curves = plot_curves(rows, evals_by_run)
    title = ("val bpb vs train time: full_update at each depth (solid) and feature arms (dashed)" if frontier
             else "val bpb vs train time: full_update (solid) vs dynamic_suffix (dashed)")
    why_no_plot = plot_val_bpb(os.path.join(results_dir, PLOT), curves, out["targets"], out["frontier"], title)

    md = ["# Frontier: full_update at every depth vs feature arms, equal step time" if frontier
          else "# full_update vs dynamic_suffix", ""]
    md += header_lines(sources, rows)
    md += [line for g in guard.lines() for line in ("", g)]
    md += sections
    md += ["", "## Runs (summary.csv)", "", md_table(COLUMNS, [[fmt(c, r[c]) for c in COLUMNS] for r in rows])]
    md += ["", "## Plot", ""]
    if why_no_plot:
        md.append(f"**{why_no_plot}.** The points are in `val_bpb_vs_time.csv`.")
    else:
        md += [f"![val bpb vs train time]({PLOT})", "",
               f"`{PLOT}`: val bpb against train_elapsed (step time incl. compile, excl. evals) at every eval; left "
               f"every eval, right the evals after {TAIL_FROM:g} of the longest run, zoomed. Thin lines: one per seed; "
               "thick lines with markers: the median over seeds. Solid: baselines; dashed: feature arms. "
               "Dotted: the target; black stars: the frontier. Points: `val_bpb_vs_time.csv`."]
    md += ["", "Column definitions: docs/compare.md."]
    with open(os.path.join(results_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return {"rows": rows, "guard": guard, "frontier": frontier, "plot_skipped": why_no_plot, **out}


# -----------------------------------------------------------------------------
# The evidence folder


RECORD_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_[A-Za-z0-9._-]+$")
RECORD_FILES = ["summary.md", "summary.csv", PLOT, "val_bpb_vs_time.csv"]


def portable_command(cmd: str) -> str:
    """A command without machine paths: the interpreter by its name, path-valued flags by file name."""
    toks = cmd.split()
    if toks:
        toks[0] = os.path.basename(toks[0])
    return " ".join(re.sub(r"^(--[\w-]+=)/\S*?([^/]+)$", r"\1\2", t) for t in toks)


def _portable_run_record(line: str) -> str:
    """A metrics JSONL line as the record keeps it: the run record's --metrics-file (an absolute
    path on the machine that ran it) as its file name; every other line as it is."""
    rec = json.loads(line) if line.strip() else None
    if not isinstance(rec, dict) or rec.get("kind") != "run":
        return line
    args = rec.get("args") or {}
    if args.get("metrics_file"):
        args["metrics_file"] = os.path.basename(args["metrics_file"])
    return json.dumps(rec) + "\n"


def write_record(record_dir: str, results_dir: str, runs: list[dict]) -> list[str]:
    """Copy the evidence of a comparison into record_dir (a new `YYYY-MM-DD_<what>` folder): the
    report, the plot, runs.tsv with portable commands, each run's metrics JSONL, and each source
    dir's provenance.txt and compare_config.txt. Returns the files written."""
    name = os.path.basename(os.path.normpath(record_dir))
    if not RECORD_NAME.match(name):
        raise SystemExit(f"compare_report: --record {record_dir}: name the folder YYYY-MM-DD_<what> "
                         "(e.g. records/2026-12-10_frontier_d6-d12_120s)")
    if os.path.isdir(record_dir) and os.listdir(record_dir):
        raise SystemExit(f"compare_report: --record {record_dir} exists and is not empty; "
                         "evidence is never overwritten")
    os.makedirs(record_dir, exist_ok=True)
    written = []

    def copy(src, dst_name):
        shutil.copyfile(src, os.path.join(record_dir, dst_name))
        written.append(dst_name)

    for f in RECORD_FILES:
        if os.path.exists(os.path.join(results_dir, f)):
            copy(os.path.join(results_dir, f), f)
    dirs = list(dict.fromkeys(r["_dir"] for r in runs))
    for f in ("provenance.txt", "compare_config.txt"):
        parts = []
        for d in dirs:
            if os.path.exists(os.path.join(d, f)):
                with open(os.path.join(d, f), encoding="utf-8") as fh:
                    text = fh.read().strip()
                parts.append(text if len(dirs) == 1 else f"== {_dir_name(d)} ==\n{text}")
        if parts:
            with open(os.path.join(record_dir, f), "w", encoding="utf-8") as fh:
                fh.write("\n\n".join(parts) + "\n")
            written.append(f)
    for r in runs:
        src = os.path.join(r["_dir"], r.get("metrics_file") or "")
        if r.get("metrics_file") and os.path.exists(src):
            name = os.path.basename(r["metrics_file"])
            with open(src, encoding="utf-8") as fi, open(os.path.join(record_dir, name), "w", encoding="utf-8") as fo:
                for line in fi:
                    fo.write(_portable_run_record(line))
            written.append(name)
    header = list(dict.fromkeys(k for r in runs for k in r if k is not None and not k.startswith("_")))
    with open(os.path.join(record_dir, "runs.tsv"), "w", encoding="utf-8") as fh:
        fh.write("\t".join(header) + "\n")
        for r in runs:
            vals = {**r, "command": portable_command(r.get("command") or "")}
            fh.write("\t".join(str(vals.get(k) or "") for k in header) + "\n")
    written.append("runs.tsv")
    return written


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m scripts.compare_report", description=__doc__.split("\n\n")[0])
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                   help="a results dir of runs/dynamic_suffix_compare.sh; several are merged with --out")
    p.add_argument("--out", default=None, help="write the merged report of several results dirs here")
    p.add_argument("--record", default=None,
                   help="copy the evidence (provenance, configs, runs.tsv, report, metrics JSONL, plot) to this "
                        "records/YYYY-MM-DD_<what> folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 for a usage problem (one line on stderr)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse has printed its one line (or the help)
        return int(e.code or 0)
    argv, opts = args.results_dirs, {k: v for k, v in (("--out", args.out), ("--record", args.record)) if v}
    if len(argv) > 1 and not args.out:
        print("compare_report: error: give one RESULTS_DIR, or several with --out MERGED_DIR "
              "(see python -m scripts.compare_report --help)", file=sys.stderr)
        return 2
    missing = [d for d in argv if not os.path.isdir(d)]
    if missing:
        print(f"compare_report: error: {', '.join(missing)}: not a directory", file=sys.stderr)
        return 2
    results_dir = opts.get("--out") or argv[0]
    os.makedirs(results_dir, exist_ok=True)
    out = write_report(results_dir, argv)
    with open(os.path.join(results_dir, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    n_ok = sum(r["status"] == "ok" for r in out["rows"])
    print(f"compare_report: {n_ok}/{len(out['rows'])} runs ok; wrote summary.csv, summary.md"
          f"{'' if out['plot_skipped'] else ', ' + PLOT} in {results_dir}")
    if out["plot_skipped"]:
        print(f"compare_report: WARNING: {out['plot_skipped']}", file=sys.stderr)
    if "--record" in opts:
        files = write_record(opts["--record"], results_dir, read_sources(argv))
        print(f"compare_report: evidence ({len(files)} files) in {opts['--record']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
