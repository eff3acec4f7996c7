"""nanochat/config.py: the flags as dataclasses, the parser generated from them, config files, the
generated docs, and the bounds that refuse absurd sizes in one line before anything is built."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import types

import pytest

from nanochat.config import (GROUPS, MAX_GRAD_ACCUM, ScheduleFlags, TrainConfig, batch_problems, build_parser,
                             feature_flags_doc, parse_args, parse_with_config, validate_args)
from nanochat.dynamic_suffix import DynamicSuffixConfig
from nanochat.plan import MAX_STEPS, horizon_problems, plan_horizon
from tests.helpers import ROOT, TINY, base_with_tokenizer, run


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def section_fields():
    return [(cls, f) for cls in TrainConfig.section_types() for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------------------------------------
# the parser is the dataclasses


def test_every_field_is_a_flag_with_its_help_default_and_choices():
    actions = {a.dest: a for a in build_parser()._actions}
    assert len(actions) - 1 == len(section_fields())  # every flag is a field (and -h)
    for cls, f in section_fields():
        a = actions[f.name]
        assert a.option_strings == ["--" + f.name.replace("_", "-")]
        assert a.help and a.help == f.metadata["help"], f.name
        assert a.default == f.default and a.choices == f.metadata["choices"], f.name
        assert (f.metadata["group"] or cls.GROUP) in GROUPS


def test_generated_help_equals_the_snapshot(monkeypatch):
    """Regenerate with: COLUMNS=100 python -m scripts.base_train --help > tests/snapshots/base_train_help.txt"""
    monkeypatch.setenv("COLUMNS", "100")
    assert build_parser().format_help() == read("tests/snapshots/base_train_help.txt")


def test_feature_flags_doc_is_up_to_date():
    """Regenerate with: python -m nanochat.config --markdown > docs/feature_flags.md"""
    assert read("docs/feature_flags.md") == feature_flags_doc(read("runs/speedrun_small.sh"))


def test_typed_access_and_the_flat_namespace_round_trip():
    args = build_parser().parse_args(["--matrix-lr=0.05", "--fp8", "--dyn-warmup-steps=3", "--model-tag=x"])
    cfg = TrainConfig.from_args(args)
    assert cfg.optim.matrix_lr == 0.05 and cfg.fp8.fp8 and cfg.output.model_tag == "x"
    assert cfg.schedule.dynamic().warmup_steps == 3 and cfg.fp8.options().enabled
    assert vars(cfg.to_args()) == vars(args)  # same dests, same order
    assert vars(TrainConfig().to_args()) == vars(build_parser().parse_args([]))


def test_dyn_defaults_are_the_controllers():
    assert ScheduleFlags().dynamic() == DynamicSuffixConfig()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--depht=3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "unrecognized arguments: --depht=3" in err and "(see python -m scripts.base_train --help)" in err


# ---------------------------------------------------------------------------------------------
# config files


NON_DEFAULT = ["--depth=6", "--max-seq-len=256", "--no-compile", "--matrix-lr=0.05", "--fp8", "--fp8-backend=torchao",
               "--fp8-include-regex=mlp", "--lm-ce-backend=chunked", "--lm-ce-chunk-size=1024", "--eval-every=-1",
               "--model-tag=rt", "--auto-lr-reduction", "--spike-window=9", "--block-update-schedule=dynamic_suffix",
               "--dyn-relevance-threshold=0.5", "--num-iterations=30"]


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize("ext", ["json", "toml"])
def test_config_file_round_trip(tmp_path, ext):
    """A run's flags, written as a config file and read back, give the same TrainConfig."""
    want = TrainConfig.from_args(build_parser().parse_args(NON_DEFAULT))
    values = {k: v for k, v in vars(want.to_args()).items() if k != "config"}
    path = tmp_path / f"run.{ext}"
    path.write_text(json.dumps(values) if ext == "json" else _toml(values))
    args, sources = parse_args([f"--config={path}"], with_sources=True)
    got = TrainConfig.from_args(args)
    assert got.run.config == str(path)
    got.run.config = ""
    assert got == want
    assert sources["depth"] == "config" and sources["config"] == "cli" and sources["seed"] == "config"


def test_toml_falls_back_to_tomli_else_says_use_json(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("depth = 6\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", types.SimpleNamespace(load=lambda f: {"depth": 7}))
    args, _, problems = parse_with_config(build_parser(), [f"--config={path}"])
    assert problems == [] and args.depth == 7
    monkeypatch.setitem(sys.modules, "tomli", None)
    _, _, problems = parse_with_config(build_parser(), [f"--config={path}"])
    assert problems == [f"--config={path}: TOML needs Python >= 3.11 (tomllib); use a .json file"]


# ---------------------------------------------------------------------------------------------
# bounds: one line naming the flag, before anything is built


def problems_for(*argv):
    return validate_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("argv, needle", [
    (["--seed=-1"], "--seed=-1 must be in [0, 2**63 - 1]"),
    ([f"--seed={2 ** 63}"], "must be in [0, 2**63 - 1]"),
    (["--depth=1025"], "--depth=1025 must be <= 1024"),
    (["--depth=100000"], "--depth=100000 must be <= 1024"),
    (["--aspect-ratio=100000"], "model_dim = --depth * --aspect-ratio rounded up to a multiple of --head-dim = 2,000,000"),
    ([f"--head-dim={2 ** 40}"], "must be <= 65,536"),
    (["--max-seq-len=1048577"], "--max-seq-len=1048577 must be <= 1,048,576"),
    (["--device-batch-size=2097152", "--max-seq-len=2048"], "tokens per micro-step must be <= 2**31"),
    ([f"--total-batch-size={2 ** 40 + 1}"], "must be <= 2**40 tokens per step"),
    ([f"--eval-tokens={2 ** 34 + 1}"], "--eval-tokens=17179869185 must be <= 2**34"),
    (["--model-tag=.."], "--model-tag='..' must be a plain name"),
    (["--model-tag=."], "--model-tag='.' must be a plain name"),
    (["--model-tag=../x"], "--model-tag='../x' may only contain"),
    (["--model-tag=a/b"], "--model-tag='a/b' may only contain"),
])
def test_bounds_are_one_problem_naming_the_flag(argv, needle):
    problems = problems_for(*argv)
    assert len(problems) == 1 and needle in problems[0], problems
    assert "\n" not in problems[0]


def test_bounds_allow_the_largest_sizes():
    assert problems_for("--seed=0", f"--seed={2 ** 63 - 1}") == []
    assert problems_for("--depth=1024", "--aspect-ratio=64", "--head-dim=128", "--max-seq-len=1048576",
                        "--device-batch-size=2048", f"--total-batch-size={2 ** 40}", f"--eval-tokens={2 ** 34}") == []


def test_grad_accumulation_is_bounded():
    assert batch_problems(MAX_GRAD_ACCUM * 2048, 1, 2048, 1) == []
    (p,) = batch_problems(2 ** 40, 1, 2, 1)
    assert f"{2 ** 39:,} accumulation steps" in p and "at most 1,000,000" in p
    assert batch_problems(2 ** 40, 1, 2, 2 ** 20) == []  # the same batch over many ranks is fine


def test_derived_step_count_and_auto_batch_are_bounded():
    args = build_parser().parse_args(TINY + ["--target-flops=1e30"])
    plan = plan_horizon(args, 131_072, 8.847e5, 512, world_size=1)
    (p,) = horizon_problems(None, plan)
    assert plan.num_iterations > MAX_STEPS and p.startswith("--target-flops gives ") and "lower --target-flops" in p
    # the auto batch grows with the model (relative to d12); one token per micro-step makes it many steps
    args = build_parser().parse_args(["--depth=2", "--max-seq-len=2", "--device-batch-size=1", "--num-iterations=9"])
    plan = plan_horizon(args, 10 ** 15, 6e15, 512, world_size=1)
    (p,) = horizon_problems(None, plan)
    assert plan.grad_accum_steps > MAX_GRAD_ACCUM and p.startswith("the auto batch size is") and "--total-batch-size" in p
    budget = plan_horizon(build_parser().parse_args(TINY + ["--time-budget-sec=60"]), 131_072, 8.847e5, 512, 1)
    assert budget.num_iterations == MAX_STEPS and horizon_problems(None, budget) == []


@pytest.mark.parametrize("argv, needle", [
    (["--dry-run", "--depth=100000"], "--depth=100000 must be <= 1024"),
    (["--seed=-5"], "--seed=-5 must be in"),
    (["--model-tag=.."], "--model-tag='..' must be a plain name"),
    ([f"--total-batch-size={2 ** 41}"], "must be <= 2**40"),
])
def test_bounds_through_the_cli_exit_2_in_one_line(argv, needle, tmp_path):
    t0 = time.time()
    out = run(["-m", "scripts.base_train", "--device-type=cpu", *argv], tmp_path, check=False)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(errors) == 1 and needle in errors[0], out.stderr
    assert time.time() - t0 < 60  # refused before any model is built


def test_dry_run_refuses_a_derived_step_count_past_the_bound(tmp_path_factory, tiny_tokenizer):
    base = base_with_tokenizer(tmp_path_factory, "config_bounds", tiny_tokenizer)
    out = run(["-m", "scripts.base_train", *TINY, "--target-flops=1e30", "--dry-run"], base, check=False)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(errors) == 1 and "--target-flops gives" in errors[0], out.stderr


def test_validate_args_takes_any_flat_namespace():
    ns = argparse.Namespace(**vars(TrainConfig().to_args()))
    ns.depth = 0
    assert validate_args(ns) == ["--depth=0 must be >= 1"]


def test_torchao_backend_without_torchao_is_one_line_before_anything_is_built(monkeypatch):
    import importlib.util

    from nanochat.config import build_parser, validate_args
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    problems = validate_args(build_parser().parse_args(["--fp8", "--fp8-backend=torchao"]))
    assert len(problems) == 1 and "pip install" in problems[0] and "--fp8-backend=custom" in problems[0]
    assert validate_args(build_parser().parse_args(["--fp8"])) == []  # the custom backend needs nothing more
