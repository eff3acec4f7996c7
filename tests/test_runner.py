"""runs/speedrun_small.sh in everyday use: the default metrics file and the end-of-run report
(nanochat.run_report)."""
import json
import os
import subprocess
import sys

import pytest

from nanochat import run_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "runs", "speedrun_small.sh")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def dry_run(env, base=None):
    """The runner in DRY_RUN with `env` on top of an environment cleared of the runner's variables."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DYN_", "FP8_", "LM_CE_", "MUON_", "NUM_", "EVAL_", "DEVICE_", "DEPTH", "RUN_NAME", "MODEL_TAG", "METRICS_FILE", "REPORT", "BASE_TRAIN"))}
    clean.update({"DRY_RUN": "1", "SKIP_SETUP": "1", "PYTHON": sys.executable, **env})
    if base is not None:
        clean["NANOCHAT_BASE_DIR"] = str(base)
    return subprocess.run(["bash", RUNNER], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def command(out):
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("speedrun_small.sh: command: "), out.stdout
    return line.split("scripts.base_train", 1)[1].split()


# -----------------------------------------------------------------------------
# The default metrics file


def test_default_metrics_file_is_in_the_run_dir(tmp_path):
    cmd = command(dry_run({"DEPTH": "3"}, tmp_path))
    assert f"--metrics-file={tmp_path}/base_checkpoints/d3/metrics.jsonl" in cmd
    # the tag base_train will use: the last --model-tag, else d<the last --depth>
    cmd = command(dry_run({"MODEL_TAG": "mine", "BASE_TRAIN_EXTRA_ARGS": "--depth 5 --model-tag other"}, tmp_path))
    assert f"--metrics-file={tmp_path}/base_checkpoints/other/metrics.jsonl" in cmd
    cmd = command(dry_run({"BASE_TRAIN_EXTRA_ARGS": "--depth=5"}, tmp_path))
    assert f"--metrics-file={tmp_path}/base_checkpoints/d5/metrics.jsonl" in cmd
    # given by the user, or no report: no default
    assert [f for f in command(dry_run({"METRICS_FILE": "m.jsonl"}, tmp_path)) if "metrics" in f] == ["--metrics-file=m.jsonl"]
    assert not [f for f in command(dry_run({"REPORT": "0"}, tmp_path)) if "metrics" in f]
    assert not os.path.exists(tmp_path / "base_checkpoints")  # DRY_RUN writes nothing


def test_bad_report_values():
    assert dry_run({"REPORT": "yes"}).returncode == 2
    assert dry_run({"REPORT_SAMPLES": "-1"}).returncode == 2


# -----------------------------------------------------------------------------
# The end report


def write_metrics(path, *records, partial_tail=False):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if partial_tail:
            f.write('{"kind": "step", "st')


def test_report_reads_the_last_summary(tmp_path):
    m = tmp_path / "metrics.jsonl"
    old = {"kind": "summary", "steps": 10, "final_val_bpb": 2.0, "min_val_bpb": 1.9, "train_elapsed": 5.0}
    new = {"kind": "summary", "steps": 300, "final_val_bpb": 1.23456, "min_val_bpb": 1.2, "train_elapsed": 754.2}
    write_metrics(m, old, {"kind": "eval", "step": 300, "val_bpb": 1.3}, new, partial_tail=True)
    s = run_report.read_summary(str(m))
    assert s["steps"] == 300
    assert run_report.metrics_line(s, str(m)) == "val bpb: final 1.2346, min 1.2000 after 300 steps (12.6 min of training)"
    no_eval = {**new, "final_val_bpb": None, "min_val_bpb": None, "train_elapsed": 3.0}
    assert run_report.metrics_line(no_eval, "m").startswith("val bpb: n/a (no evaluation ran")
    assert run_report.read_summary(str(tmp_path / "missing.jsonl")) is None
    assert "no summary line in" in run_report.metrics_line(None, "missing.jsonl")


def test_report_main_prints_checkpoint_and_next_commands(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base with space"
    ckpt = base / "base_checkpoints" / "d4"
    (ckpt / "step_000300").mkdir(parents=True)
    for name in ("DONE", "meta.json", "model.pt"):  # what makes a checkpoint complete
        (ckpt / "step_000300" / name).write_text("{}")
    write_metrics(ckpt / "metrics.jsonl", {"kind": "summary", "steps": 300, "final_val_bpb": 1.5,
                                           "min_val_bpb": 1.4, "train_elapsed": 30.0})
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    assert run_report.main([f"--metrics-file={ckpt / 'metrics.jsonl'}", f"--checkpoint-dir={ckpt}", "--model-tag=d4",
                            "--samples=0", "--eval-args=--device-type=cpu --evals=bpb"]) == 0
    out = capsys.readouterr().out
    assert "val bpb: final 1.5000, min 1.4000 after 300 steps (30.0s of training)" in out
    assert f"checkpoint: {ckpt / 'step_000300'} (step 300)" in out
    prefix = f"NANOCHAT_BASE_DIR='{base}' "
    assert f"  {prefix}python -m scripts.generate --model-tag=d4 --prompt 'Once upon a time'" in out
    assert f"  {prefix}python -m scripts.base_eval --model-tag=d4 --device-type=cpu --evals=bpb" in out
    assert "samples" not in out


def test_sample_command_uses_flags_generate_has():
    from scripts.generate import build_parser
    args = build_parser().parse_args(run_report.sample_argv("d4", 3)[2:])
    assert (args.model_tag, args.num_samples, args.max_tokens) == ("d4", 3, 48)
