"""runs/speedrun_small.sh in everyday use: mistyped variables, the wandb aliases, the default
metrics file and the end-of-run report (nanochat.runner_env, nanochat.run_report)."""
import json
import os
import re
import subprocess
import sys

import pytest

from nanochat import run_report
from nanochat.runner_env import DEFAULT_PREFIXES, message, runner_names, unknown_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "runs", "speedrun_small.sh")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def dry_run(env, base=None):
    """The runner in DRY_RUN with `env` on top of an environment cleared of the runner's variables."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(DEFAULT_PREFIXES + ("WANDB_", "RUN_NAME", "MODEL_TAG", "METRICS_FILE", "REPORT"))}
    clean.update({"DRY_RUN": "1", "SKIP_SETUP": "1", "PYTHON": sys.executable, **env})
    if base is not None:
        clean["NANOCHAT_BASE_DIR"] = str(base)
    return subprocess.run(["bash", RUNNER], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def command(out):
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("speedrun_small.sh: command: "), out.stdout
    return line.split("scripts.base_train", 1)[1].split()


# -----------------------------------------------------------------------------
# Mistyped variables


def test_typo_is_one_line_with_did_you_mean_and_nothing_runs():
    out = dry_run({"NUM_ITERS": "5"})
    assert out.returncode == 2
    assert out.stderr.strip() == "speedrun_small.sh: error: unknown variable NUM_ITERS; did you mean NUM_ITERATIONS?"
    assert "command:" not in out.stdout


def test_all_typos_in_one_line():
    out = dry_run({"DYN_WARMUP": "5", "FP8_BACKND": "torchao", "LM_CE_CHUNK": "4", "MUON_STACK": "1"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for typo, meant in [("DYN_WARMUP", "DYN_WARMUP_STEPS"), ("FP8_BACKND", "FP8_BACKEND"),
                        ("LM_CE_CHUNK", "LM_CE_CHUNK_SIZE")]:
        assert f"{typo} (did you mean {meant}?)" in lines[0]
    assert "MUON_STACK" in lines[0]


@pytest.mark.parametrize("env", [
    {"MAX_JOBS": "4", "WANDB_API_KEY": "x", "WANDB_RUN_ID": "abc", "TIME_STYLE": "iso", "OMP_NUM_THREADS": "2"},
    # The compare script runs this runner with its own variables still set.
    {"FP8_BACKEND_COMPARE": "torchao", "USE_FP8_COMPARE": "1", "DYNAMIC_TIME_BUDGET_SEC": "9"},
    {"TOK_VOCAB_SIZE": "512", "NUM_SHARDS": "2", "EVAL_TOKENS": "4096", "REPORT_SAMPLES": "0", "DEVICE_BATCH_SIZE": "4"},
])
def test_known_and_unrelated_variables_pass(env):
    out = dry_run(env)
    assert out.returncode == 0, out.stderr


def test_every_documented_variable_is_known():
    """The mapping lines (what docs/feature_flags.md's table is generated from) and the runner
    controls listed there are all known names."""
    known = runner_names(read("runs/speedrun_small.sh"))
    doc = read("docs/feature_flags.md")
    table = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| `--", doc, re.M)
    controls = re.findall(r"`([A-Z][A-Z0-9_]*)(?:=[^`]*)?`", doc.split("Runner controls:", 1)[1])
    assert len(table) >= 20 and {"SKIP_SETUP", "NUM_SHARDS", "BASE_TRAIN_EXTRA_ARGS"} <= set(controls)
    assert set(table) | set(controls) <= known
    try:  # the docs generator's parser, wherever it lives now
        from nanochat.config import runner_env_mapping
    except ImportError:
        from nanochat.cli import runner_env_mapping
    assert {env for env, _ in runner_env_mapping(read("runs/speedrun_small.sh"))} <= known


def test_unknown_variables_unit():
    known = {"NUM_ITERATIONS", "EVAL_EVERY"}
    env = {"NUM_ITERS": "1", "EVAL_EVERY": "2", "PATH": "/bin", "EVAL_ZZZZZZZZZZ": "1", "DYN_X": "1"}
    got = unknown_variables(env, known, accepted={"DYN_X"})
    assert got == [("EVAL_ZZZZZZZZZZ", None), ("NUM_ITERS", "NUM_ITERATIONS")]
    assert message("r.sh", got[1:]) == "r.sh: error: unknown variable NUM_ITERS; did you mean NUM_ITERATIONS?"
    assert runner_names('opt A_B --a-b\n  flag C --c\nX=${D_E:-1}\n: "${F:=2}"\necho ${G} ${H[@]}') == {
        "A_B", "C", "D_E", "F"}


# -----------------------------------------------------------------------------
# wandb aliases, the default metrics file


def test_wandb_run_maps_to_run():
    assert "--run=abc" in command(dry_run({"WANDB_RUN": "abc"}))
    assert "--run=abc" in command(dry_run({"WANDB_RUN": "abc", "RUN_NAME": "abc"}))
    assert "--run=xyz" in command(dry_run({"RUN_NAME": "xyz"}))


def test_wandb_run_and_run_name_conflict():
    out = dry_run({"WANDB_RUN": "a", "RUN_NAME": "b"})
    assert out.returncode == 2 and "WANDB_RUN=a" in out.stderr and "RUN_NAME=b" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


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


# -----------------------------------------------------------------------------
# Less noise, more progress: the sample banner once per runner, a line per downloaded shard


def test_sample_banner_is_one_line_after_a_runner_step_showed_it(base_dir, monkeypatch, capsys):
    from nanochat import dataset
    monkeypatch.setattr(dataset, "_BANNER_SHOWN", False)
    monkeypatch.setenv(dataset.SAMPLE_BANNER_ENV, "1")
    assert dataset.resolve_data_dir() == dataset.SAMPLE_DIR
    dataset.resolve_data_dir()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "USING THE EMBEDDED SAMPLE" in out and "!!!" not in out


def test_download_prints_a_line_per_shard(tmp_path, monkeypatch, capsys):
    from nanochat import dataset

    def fake_shard(index, dest_dir, base_url, max_attempts=5, timeout=60.0):
        path = os.path.join(dest_dir, dataset.shard_name(index))
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(b"x" * 2_000_000)
        return path

    monkeypatch.setattr(dataset, "download_shard", fake_shard)
    dataset.download(0, "climbmix", dest_dir=str(tmp_path))  # the val shard only
    capsys.readouterr()
    paths = dataset.download(2, "climbmix", workers=2, dest_dir=str(tmp_path))
    val = dataset.shard_name(dataset.CLIMBMIX_NUM_SHARDS - 1)
    assert [os.path.basename(p) for p in paths] == [val, "shard_00000.parquet", "shard_00001.parquet"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == ["[1/3", "[2/3", "[3/3"]
    assert sum(f"{val}: already present" in ln for ln in lines) == 1
    assert sum("shard_00001.parquet: 2 MB" in ln for ln in lines) == 1


def test_sigterm_to_the_runner_under_torchrun_saves_and_exits_0(tmp_path_factory, tiny_tokenizer):
    """SIGTERM to the runner reaches the torchrun workers, not torchrun: every rank finishes its step
    and saves, and the runner exits 0 with no traceback (torchrun signalled itself exits 1)."""
    import signal
    import time

    from tests.helpers import base_with_tokenizer
    base = base_with_tokenizer(tmp_path_factory, "sigterm_runner", tiny_tokenizer)
    log = tmp_path_factory.mktemp("sigterm_log") / "train.log"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "SKIP_SETUP": "1", "PREPARE_DATA": "0", "REPORT": "0",
           "NPROC_PER_NODE": "2", "DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "MAX_SEQ_LEN": "64",
           "DEVICE_BATCH_SIZE": "4", "TOTAL_BATCH_SIZE": "512", "NUM_ITERATIONS": "100000", "EVAL_EVERY": "-1",
           "MODEL_TAG": "sigterm", "LOG_FILE": str(log), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["bash", RUNNER], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (log.exists() and re.search(r"^step 00001/", log.read_text(), re.M)):
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out and "Traceback" not in out, out[-3000:]
    saved = re.search(r"checkpoint step (\d+) saved", out)
    assert saved and os.path.isfile(os.path.join(base, "base_checkpoints", "sigterm", f"step_{int(saved.group(1)):06d}",
                                                 "DONE"))
