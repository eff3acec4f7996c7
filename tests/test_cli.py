"""The command line: frozen --help, one-line errors, the runner's mapping of variables to flags."""
import os
import re
import subprocess
import sys

import pytest

from nanochat.config import build_parser, runner_env_mapping, validate_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "runs", "speedrun_small.sh")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def run(cmd, env=None, **kw):
    full_env = {**os.environ, "COLUMNS": "100", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=120, **kw)


def test_help_snapshot():
    """Each new or changed flag must be a deliberate diff of tests/snapshots/base_train_help.txt.
    Regenerate with: COLUMNS=100 python -m scripts.base_train --help > tests/snapshots/base_train_help.txt"""
    out = run([sys.executable, "-m", "scripts.base_train", "--help"])
    assert out.returncode == 0
    assert out.stdout == read("tests/snapshots/base_train_help.txt")


def test_every_runner_variable_maps_to_a_real_flag():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    mapping = runner_env_mapping(read("runs/speedrun_small.sh"))
    assert len(mapping) >= 20
    for env, flag in mapping:
        assert flag in flags, f"{env} maps to unknown flag {flag}"


def test_the_runners_choices_are_the_flags_choices():
    """A `choice_opt` line of the runner lists exactly its flag's choices (the schedules among them)."""
    actions = {s: a for a in build_parser()._actions for s in a.option_strings}
    lines = re.findall(r'^choice_opt \w+ (--[\w-]+) "([^"]*)"', read("runs/speedrun_small.sh"), re.M)
    assert "--block-update-schedule" in dict(lines)
    for flag, choices in lines:
        assert choices.split() == list(actions[flag].choices), flag


def defaults(**kw):
    args = build_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_defaults_are_valid():
    assert validate_args(defaults()) == []


@pytest.mark.parametrize("kw, needle", [
    (dict(depth=0), "--depth"),
    (dict(window_pattern="SXL"), "--window-pattern"),
    (dict(warmup_ratio=0.7, warmdown_ratio=0.5), "must not exceed 1"),
    (dict(num_iterations=-1, target_flops=-1, target_param_data_ratio=-1), "no training horizon"),
    (dict(adam_beta1=1.0), "--adam-beta1"),
    (dict(head_dim=63), "--head-dim"),
    (dict(model_tag="a/b"), "--model-tag"),
    (dict(muon_stack_chunk_size=-2), "--muon-stack-chunk-size"),
    (dict(device_type="tpu"), "--device-type"),
])
def test_validation_names_the_flag(kw, needle):
    problems = validate_args(defaults(**kw))
    assert any(needle in p for p in problems), problems


def test_all_problems_reported_at_once_with_exit_code_2_and_no_traceback():
    out = run([sys.executable, "-m", "scripts.base_train", "--depth=0", "--window-pattern=X", "--warmup-ratio=0.9"])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    for needle in ("--depth", "--window-pattern", "--warmup-ratio"):
        assert needle in out.stderr


def test_batch_arithmetic_error_suggests_valid_values(base_dir):
    out = run([sys.executable, "-m", "scripts.base_train", "--device-type=cpu", "--device-batch-size=4",
               "--max-seq-len=100", "--total-batch-size=1000", "--num-iterations=1"])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--total-batch-size=1000" in out.stderr and "800" in out.stderr and "1200" in out.stderr


def test_unknown_choice_is_one_line():
    out = run([sys.executable, "-m", "scripts.base_train", "--lm-ce-backend=fast"])
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--lm-ce-backend" in out.stderr


def test_runner_dry_run_maps_env_to_flags_and_extra_args_win():
    env = {"DRY_RUN": "1", "SKIP_SETUP": "1", "DEPTH": "6", "LM_CE_BACKEND": "chunked", "MUON_ACTIVE_ONLY_STACK": "1",
           "LM_CE_KERNEL": "inductor", "BASE_TRAIN_EXTRA_ARGS": "--depth=3 --eval-every=7"}
    out = run(["bash", RUNNER], env=env)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    assert "--depth=6" in cmd and "--lm-ce-backend=chunked" in cmd and "--muon-active-only-stack" in cmd
    assert "--lm-ce-kernel=inductor" in cmd
    assert cmd.index("--depth=6") < cmd.index("--depth=3"), "extra args must come last so they win"
    # argparse keeps the last value: confirm with the real parser.
    argv = cmd.split("scripts.base_train", 1)[1].split()
    assert build_parser().parse_args(argv).depth == 3


def test_runner_torchrun_command_passes_run_name_through():
    """torchrun would read --run=NAME as an abbreviation of its own --run-path ("ambiguous
    option"), so the runner ends torchrun's options with "--"; the script gets the rest."""
    out = run(["bash", RUNNER], env={"DRY_RUN": "1", "SKIP_SETUP": "1", "NPROC_PER_NODE": "2", "RUN_NAME": "abc"})
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    assert "-m torch.distributed.run" in cmd and "-m scripts.base_train -- " in cmd and "--run=abc" in cmd.split(" -- ", 1)[1]


@pytest.mark.parametrize("env, needle", [
    ({"LM_CE_BACKEND": "fast"}, "LM_CE_BACKEND"),
    ({"LM_CE_KERNEL": "fast"}, "LM_CE_KERNEL"),
    ({"DEPTH": "twelve"}, "DEPTH"),
    ({"MUON_ACTIVE_ONLY_STACK": "yes"}, "MUON_ACTIVE_ONLY_STACK"),
    ({"PREPARE_DATA": "maybe"}, "PREPARE_DATA"),
])
def test_runner_rejects_bad_env_values(env, needle):
    out = run(["bash", RUNNER], env={"DRY_RUN": "1", "SKIP_SETUP": "1", **env})
    assert out.returncode == 2
    assert needle in out.stderr
