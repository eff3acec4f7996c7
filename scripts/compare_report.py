"""Summarise a `runs/dynamic_suffix_compare.sh` results dir (docs/compare.md defines every number).

    python -m scripts.compare_report RESULTS_DIR
    python -m scripts.compare_report RESULTS_DIR [RESULTS_DIR ...] --out MERGED_DIR

The second form merges comparisons that ran as separate calls of the runner (e.g. one seed per
job on a machine that limits a command's time) into one report in MERGED_DIR, read from the
source dirs in place; a run_id (e.g. `full_s1`) may occur in only one of them.

Reads `runs.tsv` (one line per run, written by the runner: seed, run order, the run's wall time,
exit code, command) and each run's `--metrics-file` JSONL (base_train's step / eval / summary
records). Without `runs.tsv` it falls back to every `*.metrics.jsonl` in the dir (no wall time, so
no setup_sec). Writes:

- `summary.csv`: one row per run (COLUMNS);
- `summary.md`: time to target (the headline: per seed, the train time dynamic_suffix needs to reach
  full_update's final val bpb, as a fraction of full_update's train time; median over seeds), per-arm
  medians over seeds, ratios dynamic/full of those medians, the per-seed paired val bpb differences,
  the flags in which the arms' commands differ, every run's row;
- `val_bpb_vs_time.png` (+ `val_bpb_vs_time_tail.png`, the second half of the time axis zoomed,
  and `val_bpb_vs_time.csv`, the plotted points): val bpb against train_elapsed for every run, drawn by the small PNG renderer below (matplotlib is not a
  dependency of the project; the renderer needs only zlib and struct).
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import struct
import sys
import zlib

SPEC_COLUMNS = ["variant", "schedule", "num_iterations", "elapsed_sec", "max_tok_per_sec", "avg_tok_per_sec",
                "final_loss", "min_val_bpb", "avg_step_peak_vram_mib", "peak_vram_mib", "active_layers_mean",
                "active_layers_range"]
TARGET_COLUMNS = ["target_val_bpb", "time_to_target_sec", "time_to_target_ratio"]  # filled per seed pair
COLUMNS = (SPEC_COLUMNS + ["seed", "tokens", "compile_sec", "setup_sec", "final_val_bpb", "wall_sec", "status",
                           "run_id"] + TARGET_COLUMNS)
NUMERIC = ["num_iterations", "elapsed_sec", "max_tok_per_sec", "avg_tok_per_sec", "final_loss", "min_val_bpb",
           "avg_step_peak_vram_mib", "peak_vram_mib", "active_layers_mean", "tokens", "compile_sec", "setup_sec",
           "final_val_bpb", "wall_sec"]
DIGITS = {"elapsed_sec": 2, "max_tok_per_sec": 1, "avg_tok_per_sec": 1, "final_loss": 6, "min_val_bpb": 6,
          "avg_step_peak_vram_mib": 2, "peak_vram_mib": 2, "active_layers_mean": 2, "compile_sec": 2,
          "setup_sec": 2, "final_val_bpb": 6, "wall_sec": 2, "target_val_bpb": 6, "time_to_target_sec": 2,
          "time_to_target_ratio": 4}
FINAL_LOSS_FRAC = 0.05  # final_loss = mean raw train loss of the last 5% of steps (at least one step)
NA = "NA"
TAIL_FROM = 0.5  # val_bpb_vs_time_tail.png: evals at train_elapsed >= this fraction of the longest run
SPARSE_EVAL_FRAC = 0.1  # precision warning: the dynamic arm's eval interval exceeds this fraction of full_time
UNEVEN_COMPILE_FRAC = 0.05  # warning: the arms' first steps (compile) differ by more than this fraction of full_time


# -----------------------------------------------------------------------------
# Reading


def read_metrics(path: str) -> tuple[list[dict], list[dict], dict | None]:
    """(step records, eval records, last summary record) of one metrics JSONL file.

    A run that crashed may leave a truncated last line: unparsable lines are skipped, not fatal.
    """
    steps, evals, summary = [], [], None
    if not os.path.exists(path):
        return steps, evals, summary
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = rec.get("kind")
            if kind == "step":
                steps.append(rec)
            elif kind == "eval":
                evals.append(rec)
            elif kind == "summary":
                summary = rec
    return steps, evals, summary


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


# -----------------------------------------------------------------------------
# One run -> one row


def run_row(run: dict, steps: list[dict], evals: list[dict], summary: dict | None) -> dict:
    """The summary.csv row of one run (None = not available, written as NA)."""
    schedule = (summary or {}).get("schedule") or run.get("schedule") or ""
    variant = run.get("variant") or {"full_update": "full", "dynamic_suffix": "dynamic"}.get(schedule, schedule)
    exit_code = run.get("exit_code", "")
    status = "ok" if summary is not None and exit_code in ("", "0") else "failed"
    row = {c: None for c in COLUMNS}
    row.update(run_id=run.get("run_id", ""), variant=variant, schedule=schedule, seed=run.get("seed") or None,
               status=status, wall_sec=_num(run.get("wall_sec")))
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


def arm_medians(rows: list[dict]) -> list[dict]:
    """Per variant: the median over its successful runs (seeds) of every numeric column."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        arm = [r for r in rows if r["variant"] == variant and r["status"] == "ok"]
        m = {"variant": variant, "schedule": next(r["schedule"] for r in rows if r["variant"] == variant),
             "runs": len(arm), "failed": sum(r["variant"] == variant and r["status"] != "ok" for r in rows)}
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
    counts as +inf (slower than any seed that did), so leaving it out cannot flatter the median.
    None if there are no seeds or the median is such a seed."""
    vals = [math.inf if t[key] is None else t[key] for t in ttt if t["target"] is not None and t["full_sec"]]
    m = statistics.median(vals) if vals else None
    return m if m is not None and math.isfinite(m) else None


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


def target_section(ttt: list[dict], skipped: list[str]) -> list[str]:
    """The "Time to target" lines of summary.md: a table per seed, the median, the precision."""
    md = ["", "## Time to target", "",
          "Train time (train_elapsed: step time incl. compile, excl. evals) that dynamic_suffix needs to reach the "
          "final val bpb of full_update of the same seed, as a fraction of full_update's train time. Interpolated: "
          "linear in time between the last eval above the target and the first at or below it; first eval: that "
          "eval's time (conservative, what was observed).", ""]
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
             f"seeds{unreached}."]
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


PER_RUN_FLAGS = ("--model-tag=", "--metrics-file=")


def flag_difference(cmd_full: str, cmd_dyn: str) -> tuple[list[str], list[str], str]:
    """Flags only in the full arm's command, only in the dynamic arm's, and the shared command.

    --model-tag and --metrics-file (per run by construction) are left out; so that the shared
    command holds no machine paths, they are shown as placeholders and the interpreter by its name.
    """
    def flags(cmd):
        toks = cmd.split()
        if toks:  # the interpreter: its name only (PYTHON may be a path on the machine)
            toks[0] = os.path.basename(toks[0])
        return [t for t in toks if not t.startswith(PER_RUN_FLAGS)]
    a, b = flags(cmd_full), flags(cmd_dyn)
    shared = [t for t in a if t in b] + ["--model-tag=<per run>", "--metrics-file=<per run>"]
    return [t for t in a if t not in b], [t for t in b if t not in a], " ".join(shared)


# -----------------------------------------------------------------------------
# PNG line plot (no matplotlib): RGB canvas, lines, markers, a 3x5 bitmap font.

_FONT = {  # 3 columns x 5 rows per glyph, row-major
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "_": "000000000000111", " ": "000000000000000",
    "/": "001001010100100", "(": "010100100100010", ")": "010001001001010", "=": "000111000111000",
    ":": "000010000010000",
}
PALETTES = {  # full_update runs in blues/greens, dynamic_suffix runs in reds/oranges
    "full_update": [(31, 119, 180), (23, 190, 207), (44, 160, 44), (57, 73, 171), (0, 90, 90)],
    "dynamic_suffix": [(214, 39, 40), (255, 127, 14), (148, 103, 189), (227, 119, 194), (140, 86, 75)],
    "": [(80, 80, 80), (188, 189, 34)],
}


class Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def set(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(rgb)

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb) -> None:
        for y in range(max(0, y0), min(self.h, y1 + 1)):
            for x in range(max(0, x0), min(self.w, x1 + 1)):
                self.set(x, y, rgb)

    def line(self, x0: float, y0: float, x1: float, y1: float, rgb, width: int = 2) -> None:
        n = max(1, int(2 * max(abs(x1 - x0), abs(y1 - y0))))
        for k in range(n + 1):
            x = round(x0 + (x1 - x0) * k / n)
            y = round(y0 + (y1 - y0) * k / n)
            self.rect(x, y, x + width - 1, y + width - 1, rgb)

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for k, bit in enumerate(glyph):
                if bit == "1":
                    cx, cy = x + (k % 3) * scale, y + (k // 3) * scale
                    self.rect(cx, cy, cx + scale - 1, cy + scale - 1, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w: 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def text_width(s: str, scale: int = 2) -> int:
    return 4 * scale * len(s) - scale


def nice_ticks(lo: float, hi: float, n: int = 6) -> tuple[list[float], int]:
    """Round tick values (1, 2 or 5 x 10^k apart) inside [lo, hi], and the decimals to print them."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + k * step for k in range(n + 2) if first + k * step <= hi + 1e-9 * step]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def render_line_plot(series: list[dict], width: int = 900, height: int = 560, x_label: str = "",
                     y_label: str = "", title: str = "") -> tuple[bytes, dict]:
    """PNG bytes of a line plot, and the axis ranges drawn.

    series: [{"label": str, "color": (r, g, b), "points": [(x, y), ...]}]. Points are joined by
    lines and marked by small squares; round-numbered ticks on both axes; a legend (colour swatch
    + label) at the top right of the plot area.
    """
    c = Canvas(width, height)
    left, right, top, bottom = 80, 20, 40, 60
    pw, ph = width - left - right, height - top - bottom
    pts = [p for s in series for p in s["points"]]
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    else:
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = 0.05 * (y1 - y0) if y1 > y0 else 0.5
    y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (pw - 1)

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * (ph - 1)

    grid, axis = (225, 225, 225), (0, 0, 0)
    xt, xd = nice_ticks(x0, x1)
    yt, yd = nice_ticks(y0, y1)
    for v in xt:
        gx = round(sx(v))
        c.line(gx, top, gx, top + ph - 1, grid, 1)
        c.text(gx - text_width(f"{v:.{xd}f}") // 2, top + ph + 8, f"{v:.{xd}f}")
    for v in yt:
        gy = round(sy(v))
        c.line(left, gy, left + pw - 1, gy, grid, 1)
        c.text(left - 8 - text_width(f"{v:.{yd}f}"), gy - 5, f"{v:.{yd}f}")
    c.line(left, top, left, top + ph - 1, axis, 1)
    c.line(left, top + ph - 1, left + pw - 1, top + ph - 1, axis, 1)
    if x_label:
        c.text(left + (pw - text_width(x_label)) // 2, height - 24, x_label)
    if y_label:
        c.text(8, 12, y_label)
    if title:
        c.text(left + (pw - text_width(title)) // 2, 12, title)
    for s in series:
        p = [(sx(x), sy(y)) for x, y in s["points"]]
        for (ax, ay), (bx, by) in zip(p, p[1:]):
            c.line(ax, ay, bx, by, s["color"], 2)
        for x, y in p:
            c.rect(round(x) - 2, round(y) - 2, round(x) + 3, round(y) + 3, s["color"])
    lx = left + pw - 10 - max([text_width(s["label"]) for s in series] or [0]) - 30
    for k, s in enumerate(series):
        ly = top + 10 + 16 * k
        c.rect(lx, ly + 3, lx + 20, ly + 5, s["color"])
        c.text(lx + 28, ly, s["label"])
    return c.png(), {"x": (x0, x1), "y": (y0, y1)}


def plot_series(rows: list[dict], evals_by_run: dict) -> list[dict]:
    """One series per run (val bpb against train_elapsed), coloured by schedule."""
    used = {}
    series = []
    for r in rows:
        pts = [(e["train_elapsed"], e["val_bpb"]) for e in evals_by_run.get(r["run_id"], [])
               if _num(e.get("val_bpb")) is not None and _num(e.get("train_elapsed")) is not None]
        if not pts:
            continue
        pal = PALETTES.get(r["schedule"], PALETTES[""])
        k = used.get(r["schedule"], 0)
        used[r["schedule"]] = k + 1
        label = f"{r['variant']} s{r['seed']}" if r["seed"] is not None else r["run_id"]
        series.append({"label": label, "color": pal[k % len(pal)], "points": pts, "run_id": r["run_id"]})
    return series


# -----------------------------------------------------------------------------
# Writing


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _r(v, digits=3) -> str:
    return NA if v is None else f"{v:.{digits}f}"


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
                                 f"merge comparisons of different seeds")
            where[run["run_id"]] = d
            runs.append({**run, "_dir": d})
    return runs


def write_report(results_dir: str, source_dirs: list[str] | None = None) -> dict:
    """Write the report into results_dir, from the runs of source_dirs (default: results_dir)."""
    sources = source_dirs or [results_dir]
    runs = read_sources(sources)
    rows, evals_by_run = [], {}
    for run in runs:
        steps, evals, summary = read_metrics(os.path.join(run["_dir"], run.get("metrics_file") or ""))
        row = run_row(run, steps, evals, summary)
        rows.append(row)
        evals_by_run[row["run_id"]] = evals

    ttt, ttt_skipped = times_to_target(rows, evals_by_run)
    fill_target_columns(ttt)
    with open(os.path.join(results_dir, "summary.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([fmt(c, r[c]) for c in COLUMNS])

    medians = arm_medians(rows)
    rat = ratios(medians)
    series = plot_series(rows, evals_by_run)
    png, ranges = render_line_plot(series, x_label="train_elapsed s (step time incl. compile)",
                                   y_label="val bpb", title="val bpb vs train time")
    with open(os.path.join(results_dir, "val_bpb_vs_time.png"), "wb") as f:
        f.write(png)
    # The step-0 eval (~ln(vocab) nats) squeezes the end of the curves: the second half, zoomed.
    t_max = max((p[0] for s in series for p in s["points"]), default=0.0)
    tail = [{**s, "points": [p for p in s["points"] if p[0] >= TAIL_FROM * t_max]} for s in series]
    tail = [s for s in tail if s["points"]]
    tail_png, tail_ranges = render_line_plot(tail, x_label="train_elapsed s (second half)", y_label="val bpb",
                                             title="val bpb vs train time: second half")
    with open(os.path.join(results_dir, "val_bpb_vs_time_tail.png"), "wb") as f:
        f.write(tail_png)
    with open(os.path.join(results_dir, "val_bpb_vs_time.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "variant", "seed", "step", "train_elapsed", "val_bpb"])
        for r in rows:
            for e in evals_by_run.get(r["run_id"], []):
                w.writerow([r["run_id"], r["variant"], fmt("seed", r["seed"]), e.get("step"), e.get("train_elapsed"),
                            e.get("val_bpb")])

    md = ["# full_update vs dynamic_suffix", ""]
    if len(sources) > 1:
        md += [f"Merged from {len(sources)} results dirs: {', '.join(f'`{d}`' for d in sources)}.", ""]
    for d in sources:
        config = os.path.join(d, "compare_config.txt")
        if os.path.exists(config):
            with open(config, encoding="utf-8") as f:
                md += ([f"`{d}`:", ""] if len(sources) > 1 else []) + ["```", f.read().strip(), "```", ""]
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None}, key=lambda s: int(s) if s.isdigit() else s)
    md.append(f"Seeds: {', '.join(seeds) or NA} ({len(seeds)})."
              + ("" if len(seeds) >= 3 else " **Fewer than 3 seeds: speed numbers only, no quality claim.**"))
    failed = [r["run_id"] for r in rows if r["status"] != "ok"]
    if failed:
        md.append(f"**Failed runs (left out of the medians): {', '.join(failed)}.**")
    cmds = {r.get("run_id"): command_of(r["_dir"], r) for r in runs}
    full_run = next((r for r in rows if r["schedule"] == "full_update" and cmds.get(r["run_id"])), None)
    dyn_run = next((r for r in rows if r["schedule"] == "dynamic_suffix" and cmds.get(r["run_id"])), None)
    if full_run and dyn_run:
        only_full, only_dyn, shared = flag_difference(cmds[full_run["run_id"]], cmds[dyn_run["run_id"]])
        md += ["", f"Flags that differ between `{full_run['run_id']}` and `{dyn_run['run_id']}` "
                   "(apart from --model-tag and --metrics-file):",
               f"- full only: {' '.join(f'`{t}`' for t in only_full) or '(none)'}",
               f"- dynamic only: {' '.join(f'`{t}`' for t in only_dyn) or '(none)'}",
               "", "Shared flags:", "", "```", shared, "```"]

    md += target_section(ttt, ttt_skipped)
    med_cols = ["num_iterations", "elapsed_sec", "compile_sec", "setup_sec", "avg_tok_per_sec", "max_tok_per_sec",
                "final_loss", "final_val_bpb", "min_val_bpb", "avg_step_peak_vram_mib", "peak_vram_mib",
                "active_layers_mean"]
    md += ["", "## Per-arm medians over seeds", "",
           md_table(["variant", "schedule", "runs"] + med_cols,
                    [[m["variant"], m["schedule"], str(m["runs"])] + [fmt(c, m[c]) for c in med_cols] for m in medians])]
    md += ["", "## dynamic vs full (of the medians)", ""]
    if rat is None:
        md.append("One arm has no runs: no ratios.")
    else:
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
    md += ["", "## Runs (summary.csv)", "",
           md_table(COLUMNS, [[fmt(c, r[c]) for c in COLUMNS] for r in rows])]
    md += ["", "## Plot", "", "![val bpb vs train time](val_bpb_vs_time.png)",
           "![val bpb vs train time, second half](val_bpb_vs_time_tail.png)", "",
           f"`val_bpb_vs_time.png`: x = train_elapsed (s, step time incl. compile, excl. eval) from "
           f"{ranges['x'][0]:.2f} to {ranges['x'][1]:.2f}; y = val bpb from {ranges['y'][0]:.4f} to "
           f"{ranges['y'][1]:.4f}. `val_bpb_vs_time_tail.png`: the evals at train_elapsed >= {TAIL_FROM:g} x "
           f"{t_max:.2f} s, x from {tail_ranges['x'][0]:.2f} to {tail_ranges['x'][1]:.2f}, y from "
           f"{tail_ranges['y'][0]:.4f} to {tail_ranges['y'][1]:.4f}. Points: `val_bpb_vs_time.csv`. Colours:"]
    md += [f"- `#{s['color'][0]:02x}{s['color'][1]:02x}{s['color'][2]:02x}` {s['run_id']}" for s in series]
    if not series:
        md.append("- (no eval points in any run: nothing plotted)")
    md += ["", "Column definitions: docs/compare.md."]
    with open(os.path.join(results_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return {"rows": rows, "medians": medians, "ratios": rat, "series": series, "time_to_target": ttt,
            "time_to_target_median": median_ratio(ttt)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    out_dir = None
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            print("compare_report: error: --out needs a directory", file=sys.stderr)
            return 2
        out_dir, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if not argv or (len(argv) > 1 and out_dir is None):
        print("compare_report: error: give one RESULTS_DIR, or several with --out MERGED_DIR", file=sys.stderr)
        return 2
    missing = [d for d in argv if not os.path.isdir(d)]
    if missing:
        print(f"compare_report: error: {', '.join(missing)}: not a directory", file=sys.stderr)
        return 2
    results_dir = out_dir or argv[0]
    os.makedirs(results_dir, exist_ok=True)
    out = write_report(results_dir, argv)
    with open(os.path.join(results_dir, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    n_ok = sum(r["status"] == "ok" for r in out["rows"])
    print(f"compare_report: {n_ok}/{len(out['rows'])} runs ok; wrote summary.csv, summary.md, val_bpb_vs_time.png "
          f"in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
