"""runs/dynamic_suffix_compare.sh and scripts/compare_report.py: two-arm and frontier report numbers,
the guards (unequal schedules, too few eval tokens, a block schedule that never froze), the
matplotlib plot, the evidence folder, the runner's DRY_RUN commands and validation, and real
end-to-end runs on a tiny CPU config (two-arm, and frontier)."""
import csv
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from scripts import compare_report as cr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "runs", "dynamic_suffix_compare.sh")
# Variables that the caller's shell could leak into the runner and change what it does.
LEAKY = re.compile(r"^(DYN_|SEED|SEEDS|MODEL_TAG|METRICS_FILE|LOG_FILE|USE_FP8|FP8_|BLOCK_UPDATE_SCHEDULE|"
                   r"NUM_ITERATIONS|FULL_NUM_ITERATIONS|DYNAMIC_NUM_ITERATIONS|TIME_BUDGET_SEC|"
                   r"DYNAMIC_TIME_BUDGET_SEC|EVAL_|ARMS|BASELINE_DEPTHS|BUDGET_FRACTION|ALLOW_|RECORD_DIR|"
                   r"COMPILE_CACHE|MAX_RUNS|RESUME|REPORT|DROP_|GROWTH_|"
                   r"BASE_TRAIN_EXTRA_ARGS|RESULTS_DIR|WARMUP_STEPS|KEEP_CHECKPOINTS|DRY_RUN|SKIP_SETUP|"
                   r"PREPARE_DATA|DEPTH|NPROC_PER_NODE)")


# -----------------------------------------------------------------------------
# Synthetic metrics files


def write_run(d, run_id, schedule, seed, dts, losses, active, evals, peaks=None, batch=1000, run=None,
              schedule_stats=None):
    """A metrics JSONL like base_train's: an optional run record, step records, eval records (step,
    val_bpb), a summary (with `schedule_stats` when given)."""
    path = os.path.join(d, f"{run_id}.metrics.jsonl")
    elapsed = 0.0
    lines = [] if run is None else [{"kind": "run", **run}]
    ev = dict(evals)
    for step, (dt, loss, act) in enumerate(zip(dts, losses, active)):
        if step in ev:
            lines.append({"kind": "eval", "step": step, "val_bpb": ev[step], "train_elapsed": elapsed,
                          "tokens": step * batch})
        elapsed += dt
        lines.append({"kind": "step", "step": step, "loss": loss, "loss_ema": loss, "lrm": 1.0, "dt": dt,
                      "tok_per_sec": batch / dt, "mfu": None,
                      "step_peak_mib": None if peaks is None else peaks[step], "active_layers": act,
                      "train_elapsed": elapsed, "tokens": (step + 1) * batch})
    n = len(dts)
    lines.append({"kind": "eval", "step": n, "val_bpb": ev[n], "train_elapsed": elapsed, "tokens": n * batch})
    lines.append({"kind": "summary", "steps": n, "steps_this_run": n, "train_elapsed": elapsed,
                  "first_step_sec": dts[0], "steady_tok_per_sec": (n - 1) * batch / sum(dts[1:]),
                  "peak_mib": None if peaks is None else max(peaks), "final_val_bpb": ev[n],
                  "min_val_bpb": min(ev.values()), "final_loss_ema": losses[-1], "tokens": n * batch,
                  "schedule": schedule})
    if schedule_stats is not None:
        lines[-1]["schedule_stats"] = schedule_stats
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return elapsed


@pytest.fixture
def synthetic(tmp_path):
    """Two arms x two seeds, 40 steps each; known answers in the returned dict."""
    d = str(tmp_path)
    manifest = ["run_id\tvariant\tschedule\tseed\torder\ttime_budget_sec\twall_sec\texit_code\tmetrics_file\tlog_file\tcommand"]
    base = "python -m scripts.base_train --depth=4 --num-iterations=40 --seed={s} --model-tag=t_{r} --metrics-file=/x/{r}.m"
    order = 0
    expect = {}
    for seed, full_dt, dyn_dt, full_bpb, dyn_bpb in [(1, 0.5, 0.4, 1.50, 1.48), (2, 0.25, 0.2, 1.60, 1.61)]:
        for variant, schedule, dt, bpb in [("full", "full_update", full_dt, full_bpb),
                                           ("dynamic", "dynamic_suffix", dyn_dt, dyn_bpb)]:
            run_id = f"{variant}_s{seed}"
            dts = [3.0] + [dt] * 38 + [dt / 2]  # compile step, steady steps, one fast step
            losses = [5.0] * 38 + [2.0, 4.0]  # last 5% of 40 steps = 2 steps: mean 3.0
            active = [4] * 40 if variant == "full" else [4] * 10 + [2] * 29 + [1]
            peaks = [100.0 + (k % 2) * 10 for k in range(40)]  # mean 105, max 110
            elapsed = write_run(d, run_id, schedule, seed, dts, losses, active,
                                {0: 3.0, 20: bpb + 0.2, 40: bpb}, peaks)
            order += 1
            wall = elapsed + 7.0
            cmd = base.format(s=seed, r=run_id) + ("" if variant == "full" else
                                                   " --block-update-schedule=dynamic_suffix --dyn-warmup-steps=5")
            manifest.append(f"{run_id}\t{variant}\t{schedule}\t{seed}\t{order}\t\t{wall}\t0\t{run_id}.metrics.jsonl\t"
                            f"{run_id}.log\t{cmd}")
            expect[run_id] = {"elapsed": elapsed, "avg": 39 * 1000 / (38 * dt + dt / 2), "max": 1000 / (dt / 2),
                              "bpb": bpb}
    with open(os.path.join(d, "runs.tsv"), "w") as f:
        f.write("\n".join(manifest) + "\n")
    return d, expect


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_columns_and_per_run_numbers(synthetic):
    d, expect = synthetic
    cr.write_report(d)
    with open(os.path.join(d, "summary.csv"), newline="") as f:
        header = next(csv.reader(f))
    assert header[:12] == ["variant", "schedule", "num_iterations", "elapsed_sec", "max_tok_per_sec", "avg_tok_per_sec",
                           "final_loss", "min_val_bpb", "avg_step_peak_vram_mib", "peak_vram_mib", "active_layers_mean",
                           "active_layers_range"]
    for c in ("seed", "tokens", "compile_sec", "setup_sec", "final_val_bpb"):
        assert c in header
    assert header[-3:] == ["target_val_bpb", "time_to_target_sec", "time_to_target_ratio"]  # appended last
    rows = {r["run_id"]: r for r in read_csv(os.path.join(d, "summary.csv"))}
    assert set(rows) == set(expect)
    for run_id, e in expect.items():
        r = rows[run_id]
        assert r["status"] == "ok" and r["num_iterations"] == "40" and r["tokens"] == "40000"
        assert float(r["elapsed_sec"]) == pytest.approx(e["elapsed"], abs=0.01)
        assert float(r["compile_sec"]) == pytest.approx(3.0)
        assert float(r["setup_sec"]) == pytest.approx(7.0, abs=0.01)  # wall - train_elapsed
        assert float(r["avg_tok_per_sec"]) == pytest.approx(e["avg"], abs=0.1)  # excludes the first step
        assert float(r["max_tok_per_sec"]) == pytest.approx(e["max"], abs=0.1)
        assert float(r["final_loss"]) == pytest.approx(3.0)  # mean raw loss of the last 5% of steps
        assert float(r["final_val_bpb"]) == pytest.approx(e["bpb"])
        assert float(r["min_val_bpb"]) == pytest.approx(e["bpb"])
        assert float(r["avg_step_peak_vram_mib"]) == pytest.approx(105.0)
        assert float(r["peak_vram_mib"]) == pytest.approx(110.0)
    assert rows["full_s1"]["active_layers_range"] == "4-4" and float(rows["full_s1"]["active_layers_mean"]) == 4.0
    assert rows["dynamic_s2"]["active_layers_range"] == "1-4"
    assert float(rows["dynamic_s2"]["active_layers_mean"]) == pytest.approx((40 + 58 + 1) / 40, abs=0.005)


def test_report_medians_ratios_and_markdown(synthetic):
    d, expect = synthetic
    out = cr.write_report(d)
    med = {m["variant"]: m for m in out["medians"]}
    assert med["full"]["runs"] == 2 and med["dynamic"]["runs"] == 2
    full_avg = (expect["full_s1"]["avg"] + expect["full_s2"]["avg"]) / 2  # median of two = their mean
    dyn_avg = (expect["dynamic_s1"]["avg"] + expect["dynamic_s2"]["avg"]) / 2
    assert med["full"]["avg_tok_per_sec"] == pytest.approx(full_avg)
    assert out["ratios"]["ratio"]["avg_tok_per_sec"] == pytest.approx(dyn_avg / full_avg)
    full_el = (expect["full_s1"]["elapsed"] + expect["full_s2"]["elapsed"]) / 2
    dyn_el = (expect["dynamic_s1"]["elapsed"] + expect["dynamic_s2"]["elapsed"]) / 2
    assert out["ratios"]["ratio"]["elapsed_sec"] == pytest.approx(dyn_el / full_el)
    assert out["ratios"]["diff"]["final_val_bpb"] == pytest.approx((1.48 + 1.61) / 2 - (1.50 + 1.60) / 2)
    assert dict(cr.paired_diffs(out["rows"], "final_val_bpb")) == {"1": pytest.approx(-0.02), "2": pytest.approx(0.01)}
    md = open(os.path.join(d, "summary.md")).read()
    assert "## Per-arm medians over seeds" in md and "dynamic / full" in md
    assert f"| avg_tok_per_sec | {full_avg:.1f} | {dyn_avg:.1f} | {dyn_avg / full_avg:.3f} |" in md
    assert "Fewer than 3 seeds" in md
    assert "dynamic lower in 1/2 seeds" in md
    assert "- dynamic only: `--block-update-schedule=dynamic_suffix` `--dyn-warmup-steps=5`" in md
    assert "- full only: (none)" in md
    assert "/x/" not in md  # per-run paths are left out of the shared command
    # What each arm did: the dynamic arm's mean of active_layers (no schedule_stats in these files).
    assert "- `full` (full_update): every step trained all 4 blocks." in md
    assert "- `dynamic` (dynamic_suffix): 2.48 of 4 blocks trained per step (median over runs); fewer than all blocks trained in 60/80 steps." in md
    assert "Refused" not in md and "ALLOW_UNEQUAL_SCHEDULES" not in md  # same --num-iterations=40 in both arms
    assert len(read_csv(os.path.join(d, "val_bpb_vs_time.csv"))) == 4 * 3


def test_report_without_manifest_and_with_a_failed_run(tmp_path):
    d = str(tmp_path)
    write_run(d, "full_s7", "full_update", 7, [1.0, 0.5, 0.5], [5, 4, 3], [2, 2, 2], {0: 3.0, 3: 2.0})
    with open(os.path.join(d, "dynamic_s7.metrics.jsonl"), "w") as f:  # crashed: one step, a torn line
        f.write(json.dumps({"kind": "step", "step": 0, "loss": 5.0, "loss_ema": 5.0, "lrm": 1.0, "dt": 1.0,
                            "tok_per_sec": 1000.0, "mfu": None, "step_peak_mib": None, "active_layers": 2,
                            "train_elapsed": 1.0, "tokens": 1000}) + "\n{\"kind\": \"st")
    out = cr.write_report(d)
    rows = {r["run_id"]: r for r in out["rows"]}
    assert rows["full_s7"]["status"] == "ok" and rows["full_s7"]["seed"] == "7"
    assert rows["full_s7"]["setup_sec"] is None and rows["full_s7"]["peak_vram_mib"] is None  # no wall time; CPU
    assert rows["dynamic_s7"]["status"] == "failed" and rows["dynamic_s7"]["max_tok_per_sec"] is None
    text = open(os.path.join(d, "summary.csv")).read()
    assert "NA" in text
    assert "Failed runs" in open(os.path.join(d, "summary.md")).read()
    assert cr.main([d]) == 0
    assert cr.main([os.path.join(d, "missing")]) == 2


def test_report_counts_the_last_attempt_of_a_resumed_run(tmp_path):
    d = str(tmp_path)
    write_run(d, "full_s1", "full_update", 1, [1.0, 0.5, 0.5], [5, 4, 3], [2, 2, 2], {0: 3.0, 3: 2.0})
    (tmp_path / "runs.tsv").write_text(
        MANIFEST_HEADER + "full_s1\tfull\tfull_update\t1\t1\t\t3.0\t137\tfull_s1.metrics.jsonl\t\t\"python\" -m x\n"
        + "full_s1\tfull\tfull_update\t1\t2\t\t5.0\t0\tfull_s1.metrics.jsonl\t\tpython -m x\n")
    rows = cr.write_report(d)["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["setup_sec"] == pytest.approx(5.0 - 2.0)


# -----------------------------------------------------------------------------
# Time to target


def ttt_dir(tmp_path, pairs):
    """A results dir of seed pairs: [(seed, (full_dts, full_evals, full_exit), (dyn_dts, dyn_evals, dyn_exit))].

    train_elapsed of an eval at step k = sum of the first k step times (as write_run records it).
    Both arms' commands give the same --time-budget-sec: equal LR schedules, so the guard allows
    the comparison.
    """
    d = str(tmp_path)
    manifest = MANIFEST_HEADER
    order = 0
    for seed, *arms in pairs:
        arm_names = [("full", "full_update"), ("dynamic", "dynamic_suffix")]
        for (variant, schedule), (dts, evals, exit_code) in zip(arm_names, arms):
            run_id = f"{variant}_s{seed}"
            n = len(dts)
            elapsed = write_run(d, run_id, schedule, seed, dts, [3.0] * n, [2] * n, evals)
            order += 1
            manifest += (f"{run_id}\t{variant}\t{schedule}\t{seed}\t{order}\t\t{elapsed + 5.0}\t{exit_code}\t"
                         f"{run_id}.metrics.jsonl\t{run_id}.log\tpython -m scripts.base_train --seed={seed} "
                         "--time-budget-sec=12\n")
    (tmp_path / "runs.tsv").write_text(manifest)
    return d


# Full arm: 10 steps, the first (compile) 2.0 s, then 1.0 s each: full_time = 11.0 s at the step-10 eval.
FULL_10 = ([2.0] + [1.0] * 9, {0: 3.0, 5: 2.0, 10: 1.5}, 0)
# Dynamic arm: 20 steps, 2.0 s then 0.5 s each: evals at steps 0/5/10/15/20 at 0/4.0/6.5/9.0/11.5 s.
DYN_DTS = [2.0] + [0.5] * 19


def test_time_to_target_interpolates_between_evals(tmp_path):
    d = ttt_dir(tmp_path, [(1, FULL_10, (DYN_DTS, {0: 3.0, 5: 2.0, 10: 1.6, 15: 1.4, 20: 1.3}, 0))])
    out = cr.write_report(d)
    (t,) = out["time_to_target"]
    assert t["target"] == 1.5 and t["full_sec"] == pytest.approx(11.0)
    # Between step 10 (6.5 s, 1.6) and step 15 (9.0 s, 1.4): 1.5 is halfway, so 6.5 + 0.5 * 2.5 = 7.75 s.
    assert t["cross"]["interp_sec"] == pytest.approx(7.75) and t["cross"]["first_eval_sec"] == pytest.approx(9.0)
    assert t["ratio"] == pytest.approx(7.75 / 11.0) and t["ratio_first_eval"] == pytest.approx(9.0 / 11.0)
    assert out["time_to_target_median"] == pytest.approx(7.75 / 11.0)
    assert (t["dyn_interval_steps"], t["dyn_interval_sec"]) == (5, pytest.approx(2.5))
    rows = {r["run_id"]: r for r in read_csv(os.path.join(d, "summary.csv"))}
    assert [rows["full_s1"][c] for c in cr.TARGET_COLUMNS] == ["1.500000", "11.00", "1.0000"]
    assert [rows["dynamic_s1"][c] for c in cr.TARGET_COLUMNS] == ["1.500000", "7.75", "0.7045"]
    md = open(os.path.join(d, "summary.md")).read()
    assert "## Time to target" in md
    assert "| 1 | 1.500000 | 11.00 | 7.75 | 9.00 (step 15) | 0.7045 | 0.8182 | steps 10-15, 6.50-9.00 s |" in md
    assert "**Median time-to-target ratio over 1 seed(s): 0.7045** (interpolated; 0.8182 from first evals)" in md
    assert "one eval every 5 steps, 2.50 s of train_elapsed" in md
    # 2.5 s between evals > 10% of 11 s: the precision warning names the seed.
    assert "s1: dynamic eval interval 2.50 s > 10% of full time 11.00 s" in md
    assert "full arm has" not in md  # 3 evals in the full arm: not sparse
    # Without the first steps (2.0 s each): (7.75 - 2) / (11 - 2).
    assert t["ratio_ex_first"] == pytest.approx(5.75 / 9.0)
    assert "| steps 10-15, 6.50-9.00 s | 2.00 / 2.00 | 0.6389 |" in md
    assert "median ratio 0.6389" in md and "warm cache" not in md


def test_time_to_target_names_a_warm_compile_for_one_arm(tmp_path):
    """The dynamic arm's first step took 0.2 s instead of 2.0 (its compile came from a warm cache):
    the headline ratio drops, the ratio without first steps does not, and the report says so."""
    warm = [0.2] + [0.5] * 19
    d = ttt_dir(tmp_path, [(1, FULL_10, (warm, {0: 3.0, 5: 2.0, 10: 1.6, 15: 1.4, 20: 1.3}, 0))])
    (t,) = cr.write_report(d)["time_to_target"]
    assert t["ratio"] == pytest.approx(5.95 / 11.0)
    assert t["ratio_ex_first"] == pytest.approx(5.75 / 9.0)  # as with equal first steps
    md = open(os.path.join(d, "summary.md")).read()
    assert "s1: 2.00 s vs 0.20 s" in md and "COMPILE_CACHE=per_run" in md


def test_time_to_target_crossing_exactly_at_an_eval(tmp_path):
    d = ttt_dir(tmp_path, [(1, FULL_10, (DYN_DTS, {0: 3.0, 5: 2.0, 10: 1.5, 15: 1.4, 20: 1.3}, 0))])
    (t,) = cr.write_report(d)["time_to_target"]
    assert t["cross"]["step"] == 10
    assert t["cross"]["interp_sec"] == pytest.approx(6.5) and t["cross"]["first_eval_sec"] == pytest.approx(6.5)
    assert t["ratio"] == pytest.approx(6.5 / 11.0) == t["ratio_first_eval"]
    # The run's first eval already at or below the target: no earlier eval to interpolate from.
    assert cr.crossing([(0, 0.0, 1.0), (5, 3.0, 0.9)], 1.2) == {"interp_sec": 0.0, "first_eval_sec": 0.0, "step": 0,
                                                                 "prev_step": None, "prev_sec": None}


def test_time_to_target_not_reached(tmp_path):
    # Full arm with only its final eval: sparse (< 2 evals) is warned about.
    full = ([2.0] + [1.0] * 9, {10: 1.5}, 0)
    d = ttt_dir(tmp_path, [(1, full, (DYN_DTS, {0: 3.0, 5: 2.0, 10: 1.7, 15: 1.55, 20: 1.58}, 0))])
    out = cr.write_report(d)
    (t,) = out["time_to_target"]
    assert t["cross"] is None and t["ratio"] is None and t["best"] == 1.55
    assert out["time_to_target_median"] is None
    rows = {r["run_id"]: r for r in read_csv(os.path.join(d, "summary.csv"))}
    assert [rows["dynamic_s1"][c] for c in cr.TARGET_COLUMNS] == ["1.500000", "NA", "NA"]
    md = open(os.path.join(d, "summary.md")).read()
    assert "| not reached (best 1.550000 vs target 1.500000) | NA | NA | NA | NA |" in md
    assert "**Median time-to-target ratio over 1 seed(s): NA**" in md and "reached the target in 0/1 seeds" in md
    assert "s1: full arm has 1 eval(s) (< 2)" in md


def test_time_to_target_median_over_3_seeds_and_a_failed_full_arm_skipped(tmp_path):
    # Dynamic arm: 20 steps of 0.5 s, an eval every step, val bpb 2.0 - k/16 (exact in binary) at k * 0.5 s.
    dyn = ([0.5] * 20, {k: 2.0 - k / 16 for k in range(21)}, 0)

    def full(target, exit_code=0):  # 10 steps of 1.0 s: full_time 10.0 s
        return [1.0] * 10, {0: 3.0, 10: target}, exit_code

    d = ttt_dir(tmp_path, [(1, full(1.625), dyn),    # reached at step 6 (3.0 s): 0.3
                           (2, full(1.25), dyn),     # step 12 (6.0 s): 0.6
                           (3, full(1.53125), dyn),  # between step 7 (3.5 s, 1.5625) and 8 (4.0 s, 1.5): 3.75 s
                           (4, full(1.4, exit_code=1), dyn)])  # full arm failed: seed left out
    out = cr.write_report(d)
    by = {t["seed"]: t for t in out["time_to_target"]}
    assert sorted(by) == ["1", "2", "3"]
    assert [by[s]["ratio"] for s in "123"] == [pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.375)]
    assert [by[s]["ratio_first_eval"] for s in "123"] == [pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.4)]
    assert out["time_to_target_median"] == pytest.approx(0.375)
    rows = {r["run_id"]: r for r in read_csv(os.path.join(d, "summary.csv"))}
    assert [rows["dynamic_s3"][c] for c in cr.TARGET_COLUMNS] == ["1.531250", "3.75", "0.3750"]
    assert [rows[r][c] for r in ("full_s4", "dynamic_s4") for c in cr.TARGET_COLUMNS] == ["NA"] * 6
    md = open(os.path.join(d, "summary.md")).read()
    assert "**Median time-to-target ratio over 3 seed(s): 0.3750** (interpolated; 0.4000 from first evals)" in md
    assert "reached the target in 3/3 seeds." in md
    assert "one eval every 1 steps, 0.50 s of train_elapsed" in md
    assert "Precision warning" not in md  # 0.5 s between evals <= 10% of 10 s; 2 full evals
    assert "Seeds left out (an arm failed or is missing): 4." in md
    assert "Fewer than 3 seeds with both arms" not in md
    # A seed that never reached the target counts as slower than every seed that did.
    seeds = [{"target": 1.0, "full_sec": 1.0, "ratio": r} for r in (0.5, None, 0.7)]
    assert cr.median_ratio(seeds) == 0.7 and cr.median_ratio(seeds[:2]) is None


def test_merge_of_per_seed_results_dirs_equals_one_dir(tmp_path):
    """Seeds run as separate runner calls (one results dir each) merge into the report of one dir."""
    dyn = ([0.5] * 20, {k: 2.0 - k / 16 for k in range(21)}, 0)
    seeds = [(1, ([1.0] * 10, {0: 3.0, 10: 1.625}, 0), dyn), (2, ([1.0] * 10, {0: 3.0, 10: 1.25}, 0), dyn),
             (3, ([1.0] * 10, {0: 3.0, 10: 1.53125}, 0), dyn)]
    (tmp_path / "all").mkdir()
    one = cr.write_report(ttt_dir(tmp_path / "all", seeds))
    parts = []
    for seed in seeds:
        (tmp_path / f"s{seed[0]}").mkdir()
        parts.append(ttt_dir(tmp_path / f"s{seed[0]}", [seed]))
    merged = str(tmp_path / "merged")
    assert cr.main(parts + ["--out", merged]) == 0
    md = open(os.path.join(merged, "summary.md")).read()
    assert "Merged from 3 results dirs" in md
    assert "**Median time-to-target ratio over 3 seed(s): 0.3750**" in md
    assert one["time_to_target_median"] == pytest.approx(0.375)
    assert read_csv(os.path.join(merged, "summary.csv")) == read_csv(os.path.join(tmp_path / "all", "summary.csv"))
    # the same run in two dirs, several dirs without --out, a missing dir: one clear error each
    with pytest.raises(SystemExit, match="full_s1 is in both"):
        cr.write_report(merged, [parts[0], parts[0]])
    assert cr.main(parts) == 2
    assert cr.main(parts[:1] + [str(tmp_path / "nope"), "--out", merged]) == 2
    assert cr.main(parts + ["--out"]) == 2


# -----------------------------------------------------------------------------
# Guards in the two-arm report


def test_two_arm_unequal_steps_and_a_dynamic_arm_that_never_froze(tmp_path):
    """DEPTH=2, 2 seeds, full 20 steps vs dynamic 24 steps, the dynamic arm never froze a block: its
    "gain" is its longer LR schedule. The report refuses the ratio; with the override it prints it
    under a headline that says so, and the no-freeze statement next to it."""
    d = str(tmp_path)
    manifest = MANIFEST_HEADER
    for seed in (1, 2):
        for variant, schedule, n in (("full", "full_update", 20), ("dynamic", "dynamic_suffix", 24)):
            run_id = f"{variant}_s{seed}"
            evals = {k: 3.0 - 1.5 * k / 24 for k in range(0, n, 4)}
            evals[n] = 3.0 - 1.5 * n / 24
            elapsed = write_run(d, run_id, schedule, seed, [0.5] * n, [3.0] * n, [2] * n, evals)
            manifest += (f"{run_id}\t{variant}\t{schedule}\t{seed}\t1\t\t{elapsed + 1}\t0\t{run_id}.metrics.jsonl\t\t"
                         f"python -m scripts.base_train --depth=2 --num-iterations={n} --seed={seed}\n")
    (tmp_path / "runs.tsv").write_text(manifest)
    out = cr.write_report(d, allow_unequal=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert out["guard"].refused and out["time_to_target_median"] is None and out["ratios"] is None
    assert "**Refused: the compared runs' LR schedules or token budgets differ" in md
    assert "`num_iterations` 20 (full); 24 (dynamic)" in md and "`token_budget` 20000 (full); 24000 (dynamic)" in md
    assert "Median time-to-target ratio" not in md and "dynamic / full" not in md
    assert "- `dynamic` (dynamic_suffix): **no block was ever frozen** (every step trained all 2 blocks)." in md
    assert all(r["time_to_target_ratio"] == "NA" for r in read_csv(os.path.join(d, "summary.csv")))

    out = cr.write_report(d, allow_unequal=True)
    md = open(os.path.join(d, "summary.md")).read()
    assert out["time_to_target_median"] == pytest.approx(20 * 0.5 / (20 * 0.5))  # reached exactly at step 20
    assert "**ALLOW_UNEQUAL_SCHEDULES=1: the compared runs' LR schedules or token budgets differ" in md
    line = next(x for x in md.splitlines() if x.startswith("**Median time-to-target ratio"))
    assert "**no block was ever frozen: every step trained all blocks" in line  # next to the ratio
    assert cr.NO_FREEZE in md.split("## dynamic vs full (of the medians)")[1]


def test_horizon_from_the_run_record_wins_over_the_command(tmp_path):
    """The run record states the resolved horizon; the command's flags are only the fallback."""
    rec = {"horizon": {"time_budget_sec": 30.0, "num_iterations": -1, "total_batch_size": 1000, "lr_schedule": "time",
                       "warmup_ratio": 0.0, "warmdown_ratio": 0.5, "final_lr_frac": 0.1}, "eval_tokens": 2048}
    h = cr.run_horizon(rec, {"steps": 10}, "python -m scripts.base_train --time-budget-sec=60 --warmdown-ratio=0.3")
    assert h == {"lr_schedule": "time", "time_budget_sec": 30.0, "num_iterations": None, "token_budget": None,
                 "warmup_ratio": 0.0, "warmdown_ratio": 0.5, "final_lr_frac": 0.1, "eval_tokens": 2048}
    h = cr.run_horizon(None, {"steps": 10, "tokens": 5000}, "python -m x --warmdown-ratio 0.3 --eval-tokens=4096")
    assert h == {"lr_schedule": "steps", "time_budget_sec": None, "num_iterations": 10, "token_budget": 5000,
                 "warmup_ratio": 0.0, "warmdown_ratio": 0.3, "final_lr_frac": 0.0, "eval_tokens": 4096}


def test_trained_blocks_prefers_schedule_stats_then_active_layers():
    steps = [{"active_layers": a} for a in (4, 4, 2, 2)]
    b = cr.trained_blocks(steps, {"schedule_stats": {"mean_trained_blocks": 2.5, "n_layer": 4}}, None, None)
    assert (b["mean_trained_blocks"], b["n_layer"], b["frozen_steps"], b["all_blocks"]) == (2.5, 4, 2, False)
    b = cr.trained_blocks(steps, {}, {"n_layer": 4}, None)
    assert (b["mean_trained_blocks"], b["all_blocks"]) == (3.0, False)
    b = cr.trained_blocks([{"active_layers": 6}] * 3, {"dynamic_suffix": {"n_layer": 6}}, None, None)
    assert b["all_blocks"] is True and b["frozen_steps"] == 0
    assert cr.trained_blocks([], {}, None, 4)["all_blocks"] is None  # nothing known: no claim either way


# -----------------------------------------------------------------------------
# Frontier report on synthetic metrics

BUDGET = 10.0
DT = 0.5  # every run: 0.5 s per step, so 20 steps on the 10 s budget, 16 on 0.8 of it
# arm: (role, depth, schedule, budget fraction, {seed: final val bpb}, active_layers per step, schedule_stats)
ARMS = {
    "base_d2": ("baseline", 2, "full_update", 1.0, {1: 1.50, 2: 1.46, 3: 1.52}, 2, None),
    "base_d4": ("baseline", 4, "full_update", 1.0, {1: 1.45, 2: 1.47, 3: 1.44}, 4, None),  # best by the median
    "base_d6": ("baseline", 6, "full_update", 1.0, {1: 1.60, 2: 1.58, 3: 1.62}, 6, None),
    "dyn_d6": ("feature", 6, "dynamic_suffix", 1.0, {1: 1.43, 2: 1.46, 3: 1.42}, 5,
               {"mean_trained_blocks": 4.5, "n_layer": 6}),
    "stuck_d4": ("feature", 4, "dynamic_suffix", 1.0, {1: 1.44, 2: 1.48, 3: 1.43}, 4, None),  # never froze
    "dyn_d6_f0.8": ("feature", 6, "dynamic_suffix", 0.8, {1: 1.45, 2: 1.48, 3: 1.44}, 5, None),
}


def bpb_at(k, n, final):
    """The synthetic curves: val bpb falls linearly from 3.0 at step 0 to `final` at step n."""
    return 3.0 - (3.0 - final) * k / n


def frontier_dir(path, arms=ARMS, horizon=None, eval_tokens=1_048_576, seeds=(1, 2, 3)):
    """A frontier results dir as the runner writes it: runs.tsv with role, depth and budget_fraction;
    per run a metrics JSONL with a run record (its horizon, updated by horizon[arm] if given), step
    records, an eval every 5 steps and at the end, and a summary."""
    os.makedirs(path, exist_ok=True)
    manifest = MANIFEST_HEADER.rstrip("\n") + "\trole\tdepth\tbudget_fraction\n"
    order = 0
    for seed in seeds:
        for arm, (role, depth, schedule, frac, finals, active, stats) in arms.items():
            run_id = f"{arm}_t{BUDGET:g}_s{seed}"
            budget = BUDGET * frac
            n = round(budget / DT)
            evals = {k: bpb_at(k, n, finals[seed]) for k in range(0, n + 1, 5)}
            evals[n] = finals[seed]
            run = {"args": {"metrics_file": f"/x/{run_id}.metrics.jsonl"}, "depth": depth, "n_layer": depth, "schedule": schedule, "eval_tokens": eval_tokens,
                   "horizon": {"time_budget_sec": budget, "num_iterations": -1, "total_batch_size": 1000,
                               "lr_schedule": "time", "warmup_ratio": 0.0, "warmdown_ratio": 0.4, "final_lr_frac": 0.0,
                               **(horizon or {}).get(arm, {})}}
            elapsed = write_run(path, run_id, schedule, seed, [DT] * n, [3.0] * n, [active] * n, evals, run=run,
                                schedule_stats=stats)
            order += 1
            flags = "" if role == "baseline" else " --block-update-schedule=dynamic_suffix"
            cmd = (f"/usr/bin/python3 -m scripts.base_train --depth={depth} --seed={seed} --time-budget-sec={budget:g}"
                   f" --num-iterations=-1{flags} --metrics-file=/x/{run_id}.metrics.jsonl")
            manifest += (f"{run_id}\t{arm}\t{schedule}\t{seed}\t{order}\t{budget:g}\t{elapsed + 3}\t0\t"
                         f"{run_id}.metrics.jsonl\t{run_id}.log\t{cmd}\t{role}\t{depth}\t{frac:g}\n")
    with open(os.path.join(path, "runs.tsv"), "w") as f:
        f.write(manifest)
    return str(path)


def test_frontier_best_baseline_paired_differences_and_time_to_target(tmp_path):
    d = frontier_dir(tmp_path)
    out = cr.write_report(d, allow_unequal=False, allow_few=False)
    assert out["frontier"] and not out["guard"].refused
    (g,) = out["groups"]
    assert g["budget"] == BUDGET
    assert g["best"]["variant"] == "base_d4"  # lowest median (1.45), though base_d2 is lower in seed 2
    assert g["best_feature"]["variant"] == "dyn_d6"
    arms = {a["variant"]: a for a in g["arms"]}
    vs = arms["dyn_d6"]["vs"]
    assert [p["diff"] for p in vs["per_seed"]] == [pytest.approx(-0.02), pytest.approx(-0.01), pytest.approx(-0.02)]
    assert (vs["median"], vs["min"], vs["max"], vs["lower"], vs["n"]) == (
        pytest.approx(-0.02), pytest.approx(-0.02), pytest.approx(-0.01), 3, 3)
    # Time to the best baseline's final val bpb of the same seed: the linear curve meets it at step
    # 20 * (3 - target) / (3 - final), i.e. that many steps of 0.5 s (the interpolation is exact here).
    for p in vs["per_seed"]:
        final = ARMS["dyn_d6"][4][int(p["seed"])]
        expect = DT * 20 * (3.0 - p["target"]) / (3.0 - final)
        assert p["sec"] == pytest.approx(expect) and p["ratio"] == pytest.approx(expect / BUDGET)
    stuck = arms["stuck_d4"]["vs"]
    assert stuck["reached"] == 2 and [p["sec"] is None for p in stuck["per_seed"]] == [False, True, False]
    assert arms["base_d4"]["vs"]["ratio"] == 1.0  # the reference

    md = open(os.path.join(d, "summary.md")).read()
    assert md.startswith("# Frontier: full_update at every depth vs feature arms, equal step time")
    assert ("best baseline `base_d4` (full_update, depth 4), median final val bpb 1.4500 over 3 seed(s); best feature "
            "arm `dyn_d6` (dynamic_suffix, depth 6), 1.4300: minus the best baseline at equal time "
            "**-0.0200 [-0.0200, -0.0100], lower in 3/3 seeds** (below the best baseline)") in md
    row = next(x for x in md.splitlines() if x.startswith("| stuck_d4 |"))
    assert "**no block was ever frozen: every step trained all blocks" in row  # beside its difference
    assert "reached in 2/3 seeds" in row
    assert "| 4.50 of 6 blocks trained per step (median over runs); fewer than all blocks trained in 60/60 steps |" in md
    assert "every step trained all 4 blocks |" in next(x for x in md.splitlines() if x.startswith("| base_d4 |"))
    short = next(x for x in md.splitlines() if x.startswith("| dyn_d6_f0.8 |"))
    assert short.startswith("| dyn_d6_f0.8 | 0.8 | 8 | 1.4500 | +0.0000 [+0.0000, +0.0100], lower in 0/3 seeds | 2/3 |")
    assert "Refused" not in md and "ALLOW_" not in md
    rows = {r["run_id"]: r for r in read_csv(os.path.join(d, "summary.csv"))}
    r = rows["dyn_d6_t10_s1"]
    assert (r["role"], r["depth"], r["lr_schedule"], r["time_budget_sec"], r["budget_fraction"]) == (
        "feature", "6", "time", "10", "1")
    assert (r["mean_trained_blocks"], r["n_layer"], r["eval_tokens"]) == ("4.50", "6", "1048576")
    assert r["target_val_bpb"] == "1.450000" and float(r["time_to_target_ratio"]) == pytest.approx(
        DT * 20 * 1.55 / 1.57 / BUDGET, abs=1e-4)
    assert rows["base_d4_t10_s2"]["time_to_target_ratio"] == "1.0000"


def test_frontier_refuses_unequal_schedules_unless_allowed(tmp_path, monkeypatch):
    d = frontier_dir(tmp_path / "a", horizon={"dyn_d6": {"warmdown_ratio": 0.5}})
    out = cr.write_report(d, allow_unequal=False, allow_few=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert out["guard"].refused
    assert ("**Refused: the compared runs' LR schedules or token budgets differ, so no ratio or difference is printed"
            in md)
    assert "`warmdown_ratio` 0.4 (base_d2, base_d4, base_d6, stuck_d4); 0.5 (dyn_d6)" in md
    assert "minus base_d4" not in md and "best feature arm" not in md
    assert "comparison refused (above)" in md
    assert all(r["target_val_bpb"] == "NA" for r in read_csv(os.path.join(d, "summary.csv")))

    out = cr.write_report(d, allow_unequal=True, allow_few=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert not out["guard"].refused and "minus base_d4" in md
    assert md.index("**ALLOW_UNEQUAL_SCHEDULES=1: the compared runs' LR schedules") < md.index("## Headline")
    # The override also comes from the environment or from the runner's compare_config.txt.
    monkeypatch.setenv("ALLOW_UNEQUAL_SCHEDULES", "1")
    assert not cr.write_report(d)["guard"].refused
    monkeypatch.delenv("ALLOW_UNEQUAL_SCHEDULES")
    assert cr.write_report(d)["guard"].refused
    (tmp_path / "a" / "compare_config.txt").write_text("mode: frontier\nallow_unequal_schedules: 1\n")
    assert not cr.write_report(d)["guard"].refused

    # A step-scheduled run in a frontier comparison, and a fraction arm of another shape.
    d = frontier_dir(tmp_path / "b", horizon={"base_d2": {"lr_schedule": "steps", "time_budget_sec": None,
                                                          "num_iterations": 20},
                                              "dyn_d6_f0.8": {"final_lr_frac": 0.1}})
    cr.write_report(d, allow_unequal=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert "`lr_schedule` steps in base_d2_t10_s1 (a frontier comparison needs a time budget in every run)" in md
    assert "dyn_d6_f0.8_t10_s1: `final_lr_frac` differ from the full-budget runs'" in md


def test_frontier_refuses_few_eval_tokens_unless_allowed(tmp_path):
    d = frontier_dir(tmp_path, eval_tokens=65_536)
    out = cr.write_report(d, allow_unequal=False, allow_few=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert out["guard"].refused and "**Refused: val bpb measured on fewer than 1,048,576 tokens (base_d2_t10_s1: 65,536" in md
    out = cr.write_report(d, allow_unequal=False, allow_few=True)
    md = open(os.path.join(d, "summary.md")).read()
    assert not out["guard"].refused
    assert "**ALLOW_FEW_EVAL_TOKENS=1: val bpb measured on fewer than 1,048,576 tokens" in md
    # A two-arm report does not ask for 1M eval tokens (its docs say what it needs).
    assert not cr.build_guard([], frontier=False, allow_unequal=False, allow_few=False).refused


def test_frontier_headline_says_when_no_shorter_budget_is_needed(tmp_path):
    """No fraction runs and no feature arm reaching the best baseline on the full budget: the
    headline says that the 0.8-budget question is answered; with a fraction arm it does not."""
    arms = {k: v for k, v in ARMS.items() if k in ("base_d2", "base_d4")}
    arms["drop_d4"] = ("feature", 4, "layer_drop", 1.0, {1: 1.50, 2: 1.52, 3: 1.49}, 3, None)
    d = frontier_dir(tmp_path / "a", arms=arms)
    cr.write_report(d, allow_unequal=False, allow_few=False)
    assert "No shorter-budget runs (BUDGET_FRACTION) are needed" in open(os.path.join(d, "summary.md")).read()
    d = frontier_dir(tmp_path / "b")  # dyn_d6 reaches the best baseline, and a fraction arm ran
    cr.write_report(d, allow_unequal=False, allow_few=False)
    assert "No shorter-budget runs" not in open(os.path.join(d, "summary.md")).read()


def test_report_names_runs_whose_evaluation_reached_the_end_of_the_val_split(tmp_path):
    d = frontier_dir(tmp_path)
    with open(os.path.join(d, "base_d2_t10_s1.log"), "w") as f:
        f.write(cr.WRAP_WARNING + " after 9 batches: it stops there\n")
    cr.write_report(d, allow_unequal=False, allow_few=False)
    md = open(os.path.join(d, "summary.md")).read()
    assert "**Evaluation reached the end of the val split in: base_d2_t10_s1." in md and "more than once" not in md


def test_frontier_over_several_budgets_and_merged_dirs(tmp_path):
    """Two budgets (two runner calls, merged): one section and one headline line per budget; the
    frontier is the best baseline per budget."""
    global BUDGET
    small = {k: v for k, v in ARMS.items() if k in ("base_d2", "base_d4", "dyn_d6")}
    d10 = frontier_dir(tmp_path / "t10", arms=small)
    try:
        BUDGET = 20.0
        d20 = frontier_dir(tmp_path / "t20", arms={k: (*v[:4], {s: b - 0.1 for s, b in v[4].items()}, *v[5:])
                                                   for k, v in small.items()})
    finally:
        BUDGET = 10.0
    out_dir = str(tmp_path / "merged")
    assert cr.main([d10, d20, "--out", out_dir]) == 0
    out = cr.write_report(out_dir, [d10, d20])
    assert [g["budget"] for g in out["groups"]] == [10.0, 20.0]
    assert out["frontier"] == [(10.0, pytest.approx(1.45), "base_d4"), (20.0, pytest.approx(1.35), "base_d4")]
    md = open(os.path.join(out_dir, "summary.md")).read()
    assert "## Budget 10 s of step time per run" in md and "## Budget 20 s of step time per run" in md
    assert md.count("**Budget ") == 2 and "Refused" not in md


# -----------------------------------------------------------------------------
# Plot (matplotlib)


def png_size(path):
    """(width, height) of a PNG file, after checking its signature and first chunk."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_is_a_valid_png_with_medians_targets_and_frontier(tmp_path):
    pytest.importorskip("matplotlib")
    d = frontier_dir(tmp_path)
    out = cr.write_report(d, allow_unequal=False, allow_few=False)
    assert out["plot_skipped"] is None
    w, h = png_size(os.path.join(d, cr.PLOT))
    assert w >= 1200 and h >= 600
    md = open(os.path.join(d, "summary.md")).read()
    assert f"![val bpb vs train time]({cr.PLOT})" in md
    assert out["targets"] == [("target: base_d4 median final val bpb 1.4500", pytest.approx(1.45), None)]
    curves = cr.plot_curves(out["rows"], {r["run_id"]: cr.read_metrics(os.path.join(d, f"{r['run_id']}.metrics.jsonl"))["evals"]
                                          for r in out["rows"]})
    assert [c["label"] for c in curves] == list(ARMS) and all(len(c["runs"]) == 3 for c in curves)
    assert [c["baseline"] for c in curves] == [True, True, True, False, False, False]
    # Directly: several curves, a target per budget and a frontier of two budgets.
    path = str(tmp_path / "direct.png")
    runs = [[(0.0, 3.0), (5.0, 2.0), (10.0, 1.5)], [(0.0, 3.0), (4.0, 2.2), (10.0, 1.4)]]
    assert cr.plot_val_bpb(path, [{"label": f"arm{k}", "baseline": k < 5, "runs": runs} for k in range(12)],
                           [("target a", 1.45, 10.0), ("target b", 1.35, 20.0)],
                           [(10.0, 1.45, "base_d4"), (20.0, 1.35, "base_d4")], title="t") is None
    assert png_size(path)[0] > 0


def test_median_curve_over_seeds():
    a = [(0.0, 3.0), (2.0, 2.0), (4.0, 1.0)]
    b = [(0.0, 3.0), (3.0, 1.5), (5.0, 1.0)]
    c = [(0.0, 2.0), (4.0, 1.2)]
    assert cr.median_curve([a]) == a
    # Grid: every eval time inside [0, 4], the range all three cover. At 4.0: a 1.0, b 1.25 (between
    # its evals at 3.0 and 5.0), c 1.2: median 1.2.
    assert cr.median_curve([a, b, c]) == [(0.0, 3.0), (2.0, 2.0), (3.0, pytest.approx(1.5)), (4.0, pytest.approx(1.2))]


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    d = frontier_dir(tmp_path)
    out = cr.write_report(d, allow_unequal=False, allow_few=False)
    assert "matplotlib is not installed" in out["plot_skipped"] and not os.path.exists(os.path.join(d, cr.PLOT))
    assert "**matplotlib is not installed" in open(os.path.join(d, "summary.md")).read()


# -----------------------------------------------------------------------------
# The evidence folder


def test_record_copies_the_evidence_without_machine_paths(tmp_path):
    d = frontier_dir(tmp_path / "res")
    (tmp_path / "res" / "provenance.txt").write_text("== call ==\ncommit: abc123\ngpu: NVIDIA H100\n")
    (tmp_path / "res" / "compare_config.txt").write_text("mode: frontier\n")
    (tmp_path / "res" / "base_d2_t10_s1.log").write_text("not evidence\n")
    rec = tmp_path / "records" / "2026-12-10_frontier_tiny"
    assert cr.main([d, "--record", str(rec)]) == 0
    names = set(os.listdir(rec))
    metrics = {f"{a}_t10_s{s}.metrics.jsonl" for a in ARMS for s in (1, 2, 3)}
    assert {"summary.md", "summary.csv", "val_bpb_vs_time.csv", "runs.tsv", "provenance.txt",
            "compare_config.txt"} | metrics <= names
    assert "base_d2_t10_s1.log" not in names
    tsv = (rec / "runs.tsv").read_text()
    assert "/x/" not in tsv and "/usr/bin" not in tsv
    assert "python3 -m scripts.base_train --depth=2 --seed=1 --time-budget-sec=10" in tsv
    assert "--metrics-file=base_d2_t10_s1.metrics.jsonl" in tsv
    assert "commit: abc123" in (rec / "provenance.txt").read_text()
    for m in metrics:  # the run record's metrics path is the file's name; every other line as it was
        src, got = (tmp_path / "res" / m).read_text().splitlines(), (rec / m).read_text().splitlines()
        assert "/x/" not in (rec / m).read_text() and json.loads(got[0])["args"]["metrics_file"] == m
        assert got[1:] == src[1:]
    # The record is itself a results dir: the report reads it as it is.
    assert cr.write_report(str(rec), allow_unequal=False, allow_few=False)["groups"][0]["best"]["variant"] == "base_d4"
    with pytest.raises(SystemExit, match="not empty"):
        cr.write_record(str(rec), d, cr.read_sources([d]))
    with pytest.raises(SystemExit, match="YYYY-MM-DD_<what>"):
        cr.write_record(str(tmp_path / "frontier"), d, cr.read_sources([d]))
    assert cr.main([d, "--record"]) == 2


# -----------------------------------------------------------------------------
# The runner: DRY_RUN commands and validation


def runner(env_extra, tmp_path, timeout=60):
    env = {k: v for k, v in os.environ.items() if not LEAKY.match(k)}
    env.update({"DRY_RUN": "1", "RESULTS_DIR": str(tmp_path / "res"), "PYTHON": sys.executable}, **env_extra)
    return subprocess.run(["bash", RUNNER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def commands(stdout):
    """{run_id: [flags after `-m scripts.base_train`]} in printed order."""
    out = {}
    for m in re.finditer(r"^dynamic_suffix_compare\.sh: command\[([^\]]+)\]: (.*)$", stdout, re.M):
        toks = m.group(2).split()
        out[m.group(1)] = toks[toks.index("scripts.base_train") + 1:]
    return out


def per_run_free(flags):
    return {f for f in flags if not f.startswith(("--model-tag=", "--metrics-file="))}


def test_dry_run_both_arms_differ_only_in_schedule(tmp_path):
    p = runner({"DYN_WARMUP_STEPS": "5", "DYN_RELEVANCE_THRESHOLD": "0.8", "SEEDS": "1 2 3"}, tmp_path)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    assert list(cmds) == ["warmup", "full_s1", "dynamic_s1", "dynamic_s2", "full_s2", "full_s3", "dynamic_s3"]
    for s in ("1", "2", "3"):
        full, dyn = cmds[f"full_s{s}"], cmds[f"dynamic_s{s}"]
        assert "--block-update-schedule=dynamic_suffix" in dyn and "--block-update-schedule=full_update" in full
        assert "--dyn-warmup-steps=5" in dyn and "--dyn-relevance-threshold=0.8" in dyn
        assert not [f for f in full if f.startswith("--dyn-")]
        assert per_run_free(full) ^ per_run_free(dyn) == {
            "--block-update-schedule=full_update", "--block-update-schedule=dynamic_suffix",
            "--dyn-warmup-steps=5", "--dyn-relevance-threshold=0.8"}
        assert f"--seed={s}" in full and f"--seed={s}" in dyn
        assert any(f.startswith("--metrics-file=") and f.endswith(f"full_s{s}.metrics.jsonl") for f in full)
    tags = [f for c in cmds.values() for f in c if f.startswith("--model-tag=")]
    assert len(set(tags)) == len(tags)  # distinct checkpoint dirs
    assert "--fp8" not in cmds["full_s1"] and not [f for f in cmds["full_s1"] if f.startswith("--time-budget-sec")]
    assert "--num-iterations=2" in cmds["warmup"] and "--eval-every=-1" in cmds["warmup"]
    assert not [f for f in cmds["warmup"] if f.startswith(("--dyn-", "--metrics-file"))]
    assert not os.path.exists(tmp_path / "res")  # DRY_RUN writes nothing


def test_dry_run_fp8_time_budget_and_iterations(tmp_path):
    p = runner({"USE_FP8_COMPARE": "1", "FP8_BACKEND_COMPARE": "torchao", "FP8_RECIPE_COMPARE": "rowwise",
                "TIME_BUDGET_SEC": "30", "WARMUP_STEPS": "0"}, tmp_path)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    assert list(cmds) == ["full_fp8_s42", "dynamic_fp8_s42"]
    for c in cmds.values():
        assert {"--fp8", "--fp8-backend=torchao", "--fp8-recipe=rowwise", "--time-budget-sec=30",
                "--num-iterations=-1"} <= set(c)
    p = runner({"FULL_NUM_ITERATIONS": "520", "DYNAMIC_NUM_ITERATIONS": "650", "WARMUP_STEPS": "0",
                "EVAL_TOKENS": "1048576", "ALLOW_UNEQUAL_SCHEDULES": "1"}, tmp_path)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    assert "--num-iterations=520" in cmds["full_s42"] and "--num-iterations=650" in cmds["dynamic_s42"]
    for c in cmds.values():
        assert "--eval-every=104" in c and "--eval-tokens=1048576" in c and "--fp8" not in c
        assert not [f for f in c if f.startswith("--time-budget-sec")]
    p = runner({"TIME_BUDGET_SEC": "60", "DYNAMIC_NUM_ITERATIONS": "900", "WARMUP_STEPS": "0"}, tmp_path)
    cmds = commands(p.stdout)
    assert "--num-iterations=900" in cmds["dynamic_s42"] and "--num-iterations=-1" in cmds["full_s42"]


def test_dry_run_dynamic_time_budget_only_for_the_dynamic_arm(tmp_path):
    """Time to target with the dynamic arm's schedule sized to full_update's time: full_update keeps
    its fixed steps and no budget, the dynamic arm gets the budget (steps only a cap)."""
    p = runner({"FULL_NUM_ITERATIONS": "520", "DYNAMIC_TIME_BUDGET_SEC": "133", "WARMUP_STEPS": "0"}, tmp_path)
    assert p.returncode == 2 and "ALLOW_UNEQUAL_SCHEDULES=1" in p.stderr  # steps vs time: refused by default
    p = runner({"FULL_NUM_ITERATIONS": "520", "DYNAMIC_TIME_BUDGET_SEC": "133", "WARMUP_STEPS": "0",
                "ALLOW_UNEQUAL_SCHEDULES": "1"}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "dynamic over a 133s step-time budget" in p.stdout
    cmds = commands(p.stdout)
    assert "--num-iterations=520" in cmds["full_s42"]
    assert not [f for f in cmds["full_s42"] if f.startswith("--time-budget-sec")]
    assert {"--time-budget-sec=133", "--num-iterations=-1"} <= set(cmds["dynamic_s42"])
    for c in cmds.values():
        assert "--eval-every=26" in c   # 520 / 20: the same fine eval interval in both arms
    p = runner({"FULL_NUM_ITERATIONS": "520", "DYNAMIC_TIME_BUDGET_SEC": "133", "DYNAMIC_NUM_ITERATIONS": "900",
                "EVAL_EVERY": "25", "WARMUP_STEPS": "0", "ALLOW_UNEQUAL_SCHEDULES": "1"}, tmp_path)
    cmds = commands(p.stdout)
    assert {"--num-iterations=900", "--eval-every=25"} <= set(cmds["dynamic_s42"])


def test_dry_run_per_run_compile_caches(tmp_path):
    p = runner({"COMPILE_CACHE": "per_run", "WARMUP_STEPS": "0"}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "compile caches: empty for every recorded run" in p.stdout
    assert "compile caches" not in runner({"WARMUP_STEPS": "0"}, tmp_path).stdout


@pytest.mark.parametrize("env, message", [
    ({"SEEDS": "1 x"}, "SEEDS: 'x'"),
    ({"SEEDS": "3 3"}, "listed twice"),
    ({"USE_FP8_COMPARE": "yes"}, "USE_FP8_COMPARE=yes must be 0 or 1"),
    ({"USE_FP8_COMPARE": "1", "FP8_BACKEND_COMPARE": "cuda"}, "FP8_BACKEND_COMPARE=cuda"),
    ({"FP8_RECIPE_COMPARE": "rowwise"}, "need USE_FP8_COMPARE=1"),
    ({"TIME_BUDGET_SEC": "0"}, "TIME_BUDGET_SEC: '0'"),
    ({"TIME_BUDGET_SEC": "soon"}, "TIME_BUDGET_SEC: 'soon'"),
    ({"DYNAMIC_TIME_BUDGET_SEC": "-3"}, "DYNAMIC_TIME_BUDGET_SEC=-3"),
    ({"DYNAMIC_TIME_BUDGET_SEC": "60", "TIME_BUDGET_SEC": "60"}, "are exclusive"),
    ({"FULL_NUM_ITERATIONS": "-5"}, "FULL_NUM_ITERATIONS=-5"),
    ({"SEED": "1"}, "use SEEDS"),
    ({"USE_FP8": "1"}, "use USE_FP8_COMPARE"),
    ({"BASE_TRAIN_EXTRA_ARGS": "--dyn-eps=1e-6"}, "DYN_*"),
    ({"WARMUP_STEPS": "-1"}, "WARMUP_STEPS"),
    ({"COMPILE_CACHE": "cold"}, "COMPILE_CACHE=cold must be shared or per_run"),
    ({"DYN_RELEVANCE_METRIC": "bogus"}, "DYN_RELEVANCE_METRIC=bogus"),  # rejected by speedrun_small.sh
    ({"DEPTH": "deep"}, "DEPTH=deep"),
    # Unequal LR schedules in the two-arm mode: the longer schedule would win by itself.
    ({"FULL_NUM_ITERATIONS": "20", "DYNAMIC_NUM_ITERATIONS": "24"}, "ALLOW_UNEQUAL_SCHEDULES=1"),
    ({"DYNAMIC_NUM_ITERATIONS": "24"}, "FULL_NUM_ITERATIONS=default and DYNAMIC_NUM_ITERATIONS=24"),
    # Frontier mode
    ({"BASELINE_DEPTHS": "2 4"}, "needs TIME_BUDGET_SEC"),
    ({"ARMS": "dyn_d4:--depth=4", "TIME_BUDGET_SEC": "30"}, "needs BASELINE_DEPTHS"),
    ({"BASELINE_DEPTHS": "2 x", "TIME_BUDGET_SEC": "30"}, "BASELINE_DEPTHS: 'x'"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30 30"}, "TIME_BUDGET_SEC: 30 is listed twice"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "dyn"}, "is not name:flags"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "dyn:--block-update-schedule=dynamic_suffix"},
     "arm dyn needs --depth=N"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "base_d4:--depth=4"}, "names the baselines"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "a:--depth=2;a:--depth=4"}, "arm a is listed twice"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "a:--depth=2 --seed=3"}, "arm a has --seed=3"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "a:--depth=2 --warmdown-ratio=0.5"},
     "its LR schedule would differ"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "EVAL_TOKENS": "65536"}, "ALLOW_FEW_EVAL_TOKENS=1"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "DEVICE_BATCH_SIZE": "24", "MAX_SEQ_LEN": "1024"},
     "evaluates 1032192 tokens (whole batches of 24576): set EVAL_TOKENS=1056768"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "EVAL_TOKENS": "1050000", "ARMS": "a:--depth=2 --device-batch-size=4"},
     "would evaluate different numbers of val tokens"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "DEPTH": "4"}, "DEPTH is set"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "DYN_WARMUP_STEPS": "5"}, "schedule flags belong to an arm"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "DROP_RATE_START": "0.5"}, "DROP_RATE_START is set"),
    ({"GROWTH_AT": "0.3"}, "give other schedules' flags to a frontier arm"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "BUDGET_FRACTION": "0.8"}, "BUDGET_FRACTION needs feature arms"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "ARMS": "a:--depth=2", "BUDGET_FRACTION": "1"},
     "BUDGET_FRACTION: '1'"),
    ({"BUDGET_FRACTION": "0.8"}, "BUDGET_FRACTION needs frontier mode"),
    ({"BASELINE_DEPTHS": "2", "TIME_BUDGET_SEC": "30", "RECORD_DIR": "records/frontier"}, "YYYY-MM-DD_<what>"),
])
def test_invalid_env_exits_2_with_a_clear_message(tmp_path, env, message):
    p = runner(env, tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_invalid_env_reports_every_problem_and_refuses_a_used_results_dir(tmp_path):
    p = runner({"SEEDS": "a", "USE_FP8_COMPARE": "2", "TIME_BUDGET_SEC": "-1"}, tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n  - ") == 3
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "runs.tsv").write_text("run_id\n")
    p = runner({}, tmp_path)
    assert p.returncode == 2 and "already holds a comparison" in p.stderr and "RESUME=1" in p.stderr
    p = runner({"RESUME": "1", "RESULTS_DIR": ""}, tmp_path)
    assert p.returncode == 2 and "RESUME=1 needs the RESULTS_DIR" in p.stderr


MANIFEST_HEADER = "run_id\tvariant\tschedule\tseed\torder\ttime_budget_sec\twall_sec\texit_code\tmetrics_file\tlog_file\tcommand\n"


def test_dry_run_resume_skips_done_runs_and_checks_their_commands(tmp_path):
    env = {"SEEDS": "1 2", "WARMUP_STEPS": "0", "NUM_ITERATIONS": "10"}
    first = runner(env, tmp_path).stdout
    planned = commands(first)
    full_s1 = re.search(r"command\[full_s1\]: (.*)", first).group(1)
    res = tmp_path / "res"
    res.mkdir()
    # full_s1 done, dynamic_s1 failed (runs again); the old metrics dir differs (results dir moved).
    moved = full_s1.replace(str(res), "/elsewhere/res")
    (res / "runs.tsv").write_text(MANIFEST_HEADER + f"full_s1\tfull\tfull_update\t1\t1\t\t9.0\t0\tm\tl\t{moved}\n"
                                  + "dynamic_s1\tdynamic\tdynamic_suffix\t1\t2\t\t9.0\t1\tm\tl\tx\n")
    p = runner({**env, "RESUME": "1"}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "skip[full_s1]: done" in p.stdout
    assert list(commands(p.stdout)) == ["dynamic_s1", "dynamic_s2", "full_s2"]
    assert commands(p.stdout)["dynamic_s2"] == planned["dynamic_s2"]
    p = runner({**env, "RESUME": "1", "MAX_RUNS": "1"}, tmp_path)
    assert list(commands(p.stdout)) == ["dynamic_s1"] and "2 run(s) left" in p.stdout
    p = runner({**env, "RESUME": "1", "NUM_ITERATIONS": "20"}, tmp_path)  # not the first call's settings
    assert p.returncode == 2 and "different command" in p.stderr and "--num-iterations=10" in p.stderr
    p = runner({**env, "RESUME": "1", "SEEDS": "2"}, tmp_path)
    assert p.returncode == 2 and "do not plan" in p.stderr
    p = runner({**env, "RESUME": "1", "SEEDS": "1 2 3"}, tmp_path)  # the plan may grow: a seed added
    assert p.returncode == 0, p.stderr
    assert "skip[full_s1]: done" in p.stdout and list(commands(p.stdout))[-2:] == ["full_s3", "dynamic_s3"]


def test_runner_and_docs_document_every_column():
    text = open(RUNNER).read()
    for col in cr.COLUMNS:
        assert col in text, col
    docs = open(os.path.join(ROOT, "docs", "compare.md")).read()
    for col in cr.COLUMNS:
        assert f"| `{col}` |" in docs, col  # a row of the column definitions table


# -----------------------------------------------------------------------------
# End to end on CPU: tokenizer, warm-up, 2 seeds x 2 arms, report


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp_base")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size=512", "--max-chars=2000000"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return base


@pytest.mark.slow
def test_compare_end_to_end_tiny_cpu(tiny_base, tmp_path):
    env = {"DRY_RUN": "0", "NANOCHAT_BASE_DIR": str(tiny_base), "SKIP_SETUP": "1", "PREPARE_DATA": "0",
           "SEEDS": "1 2", "WARMUP_STEPS": "1", "NUM_ITERATIONS": "8", "EVAL_EVERY": "4",
           "DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "MAX_SEQ_LEN": "64", "DEVICE_BATCH_SIZE": "4",
           "TOTAL_BATCH_SIZE": "512", "EVAL_TOKENS": "2048",
           "DYN_WARMUP_STEPS": "2", "DYN_PROBE_EVERY": "3", "DYN_FREEZE_START_STEP": "2", "DYN_MAX_ACTIVE_LAYERS": "1"}
    # Two calls, as under a per-command time limit: 3 runs, then RESUME=1 does the last one.
    p = runner({**env, "MAX_RUNS": "3"}, tmp_path, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "1 run(s) left" in p.stdout
    # (per-run compile caches change the environment, not the command: RESUME accepts them)
    p = runner({**env, "RESUME": "1", "WARMUP_STEPS": "0", "COMPILE_CACHE": "per_run"}, tmp_path, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "skip[dynamic_s2]: done" in p.stdout and list(commands(p.stdout)) == ["full_s2"]
    res = tmp_path / "res"
    assert not list((res / "compile_cache").glob("*"))  # each run's cache is removed after it
    rows = read_csv(res / "summary.csv")
    assert [r["run_id"] for r in rows] == ["full_s1", "dynamic_s1", "dynamic_s2", "full_s2"]  # alternated
    for r in rows:
        assert r["status"] == "ok" and r["num_iterations"] == "8" and r["tokens"] == str(8 * 512)
        assert float(r["setup_sec"]) > 0 and float(r["wall_sec"]) > float(r["elapsed_sec"]) > 0
        assert float(r["final_val_bpb"]) > 0 and r["peak_vram_mib"] == "NA"  # CPU: no CUDA memory
        assert (res / f"{r['run_id']}.log").exists() and (res / f"{r['run_id']}.metrics.jsonl").exists()
    by = {r["run_id"]: r for r in rows}
    assert by["full_s1"]["active_layers_range"] == "2-2" and by["dynamic_s1"]["active_layers_range"] == "1-2"
    assert by["full_s1"]["schedule"] == "full_update" and by["dynamic_s2"]["schedule"] == "dynamic_suffix"
    md = (res / "summary.md").read_text()
    assert "dynamic / full" in md and sys.executable not in md  # no machine paths in the table
    if (res / cr.PLOT).exists():  # matplotlib installed
        assert png_size(res / cr.PLOT)[0] > 0
    assert not (res / "warmup.metrics.jsonl").exists() and (res / "warmup.log").exists()
    ckpts = tiny_base / "base_checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # KEEP_CHECKPOINTS=0: every run's checkpoint removed


# -----------------------------------------------------------------------------
# The runner in frontier mode: DRY_RUN commands

FRONTIER_ENV = {"TIME_BUDGET_SEC": "30", "BASELINE_DEPTHS": "2 4", "SEEDS": "1 2", "WARMUP_STEPS": "1",
                "ARMS": "dyn_d4:--depth=4 --block-update-schedule=dynamic_suffix --dyn-relevance-threshold=0.4; "
                        "fp8_d2: --depth 2 --fp8",
                "BUDGET_FRACTION": "0.8", "EVAL_EVERY": "10"}


def test_dry_run_frontier_arms_budgets_and_order(tmp_path):
    p = runner(FRONTIER_ENV, tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    seed1 = ["base_d2_t30_s1", "base_d4_t30_s1", "dyn_d4_t30_s1", "dyn_d4_f0.8_t30_s1", "fp8_d2_t30_s1",
             "fp8_d2_f0.8_t30_s1"]
    assert list(cmds) == ["warmup"] + seed1 + [i.replace("_s1", "_s2") for i in reversed(seed1)]  # alternated
    for run_id, c in cmds.items():
        if run_id == "warmup":
            continue
        flags = set(c)
        budget = "24" if "_f0.8_" in run_id else "30"
        assert {f"--time-budget-sec={budget}", "--num-iterations=-1", "--eval-tokens=1048576", "--eval-every=10",
                f"--seed={run_id[-1]}"} <= flags, run_id
        assert any(f.startswith("--metrics-file=") and f.endswith(f"{run_id}.metrics.jsonl") for f in c)
        assert len([f for f in c if f.startswith("--depth")]) == 1  # the arm's depth, once
    assert "--depth=2" in cmds["base_d2_t30_s1"] and "--block-update-schedule=full_update" in cmds["base_d4_t30_s2"]
    dyn = cmds["dyn_d4_t30_s1"]
    assert {"--depth=4", "--block-update-schedule=dynamic_suffix", "--dyn-relevance-threshold=0.4"} <= set(dyn)
    assert "--block-update-schedule=full_update" not in dyn and "--fp8" not in dyn
    assert {"--depth=2", "--fp8"} <= set(cmds["fp8_d2_t30_s2"])
    assert not [f for f in cmds["base_d2_t30_s1"] if f.startswith("--dyn-")]
    assert {"--depth=2", "--num-iterations=1", "--eval-every=-1"} <= set(cmds["warmup"])  # the first baseline's depth
    assert "compile caches: empty for every recorded run" in p.stdout  # per_run by default here
    # Several budgets: every arm at each; fewer eval tokens only with the override.
    p = runner({**FRONTIER_ENV, "TIME_BUDGET_SEC": "30 60", "SEEDS": "1", "BUDGET_FRACTION": "", "ARMS": "a:--depth=2",
                "EVAL_TOKENS": "2048", "ALLOW_FEW_EVAL_TOKENS": "1", "WARMUP_STEPS": "0"}, tmp_path)
    assert p.returncode == 0, p.stderr
    cmds = commands(p.stdout)
    assert list(cmds) == ["base_d2_t30_s1", "base_d4_t30_s1", "a_t30_s1", "base_d2_t60_s1", "base_d4_t60_s1", "a_t60_s1"]
    assert "--time-budget-sec=60" in cmds["a_t60_s1"] and "--eval-tokens=2048" in cmds["a_t60_s1"]
    assert "ALLOW_FEW_EVAL_TOKENS=1" in p.stdout


# -----------------------------------------------------------------------------
# End to end on CPU: a tiny frontier run (2 baseline depths, 1 feature arm, 1 seed, a few seconds each)


@pytest.mark.slow
def test_frontier_end_to_end_tiny_cpu(tiny_base, tmp_path):
    record = tmp_path / "records" / "2026-01-01_frontier_tiny"
    env = {"DRY_RUN": "0", "NANOCHAT_BASE_DIR": str(tiny_base), "SKIP_SETUP": "1", "PREPARE_DATA": "0",
           "SEEDS": "1", "WARMUP_STEPS": "0", "TIME_BUDGET_SEC": "3", "BASELINE_DEPTHS": "1 2", "EVAL_EVERY": "4",
           "ARMS": "dyn_d2:--depth=2 --block-update-schedule=dynamic_suffix --dyn-warmup-steps=1 --dyn-probe-every=3 "
                   "--dyn-freeze-start-step=1 --dyn-max-active-layers=1",
           "ASPECT_RATIO": "32", "HEAD_DIM": "32", "MAX_SEQ_LEN": "64", "DEVICE_BATCH_SIZE": "4",
           "TOTAL_BATCH_SIZE": "256", "EVAL_TOKENS": "2048", "ALLOW_FEW_EVAL_TOKENS": "1", "COMPILE_CACHE": "shared",
           "RECORD_DIR": str(record)}
    p = runner(env, tmp_path, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = tmp_path / "res"
    rows = {r["run_id"]: r for r in read_csv(res / "summary.csv")}
    assert set(rows) == {"base_d1_t3_s1", "base_d2_t3_s1", "dyn_d2_t3_s1"}
    for r in rows.values():
        assert r["status"] == "ok" and r["lr_schedule"] == "time" and r["time_budget_sec"] == "3"
        assert float(r["elapsed_sec"]) >= 3.0 and float(r["final_val_bpb"]) > 0
    assert rows["base_d1_t3_s1"]["role"] == "baseline" and rows["dyn_d2_t3_s1"]["depth"] == "2"
    md = (res / "summary.md").read_text()
    assert "**ALLOW_FEW_EVAL_TOKENS=1: val bpb measured on fewer than 1,048,576 tokens" in md
    assert "best baseline `base_d" in md and "Fewer than 3 seeds" in md and "Refused" not in md
    prov = (res / "provenance.txt").read_text()
    assert "BASELINE_DEPTHS='1 2'" in prov and re.search(r"^commit: [0-9a-f]{40}", prov, re.M) and "gpu: " in prov
    assert "allow_few_eval_tokens: 1" in (res / "compare_config.txt").read_text()
    names = set(os.listdir(record))
    assert {"summary.md", "summary.csv", "runs.tsv", "provenance.txt", "compare_config.txt",
            "dyn_d2_t3_s1.metrics.jsonl"} <= names
    assert str(tmp_path) not in (record / "runs.tsv").read_text()
    if cr.PLOT in names:
        assert png_size(record / cr.PLOT)[0] > 0
