"""Every bad input and damaged file is one line from generate, base_eval and tok_train: usage
problems exit 2 (with "see --help" for argparse's own), missing or damaged files exit 1, never a
traceback. In-process, on a tiny checkpoint written by the test."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint as ck
from scripts import base_eval, generate, tok_train
from tests.helpers import ROOT
from tests.test_checkpoint import _flip, _rehash
from tests.tiny_checkpoint import STEP, make_tiny_checkpoint

SCRIPTS = {"generate": generate.main, "base_eval": base_eval.main, "tok_train": tok_train.main}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_tokenizer):
    return make_tiny_checkpoint(tmp_path_factory, tiny_tokenizer, name="entry_base")


@pytest.fixture
def base(pristine, tmp_path, monkeypatch):
    """A private copy of the tiny base dir (tests damage it) as NANOCHAT_BASE_DIR."""
    d = tmp_path / "base"
    shutil.copytree(pristine, d)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


def _exit(main, argv, capsys):
    """(exit code, stderr) of a script's main that must stop early."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -----------------------------------------------------------------------------
# usage errors: exit 2


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("argv, needle", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--max-tokens=x"], None),   # an int flag given text (each script has its own; see below)
])
def test_argparse_errors_are_one_line_with_the_way_to_help(name, argv, needle, capsys):
    if needle is None:
        flag = {"generate": "--max-tokens", "base_eval": "--eval-tokens", "tok_train": "--vocab-size"}[name]
        argv, needle = [f"{flag}=x"], f"argument {flag}"
    code, err = _exit(SCRIPTS[name], argv, capsys)
    line = _one_line(err)
    assert code == 2 and line.startswith(f"{name}: error: ") and needle in line
    assert line.endswith(f"(see python -m scripts.{name} --help)")


@pytest.mark.parametrize("name", ["generate", "base_eval"])
@pytest.mark.parametrize("tag", ["../..", "/etc", "..", ".", "a/b", "../../tmp/x"])
def test_model_tags_that_are_paths_are_refused(name, tag, base, capsys):
    code, err = _exit(SCRIPTS[name], [f"--model-tag={tag}", "--device-type=cpu"], capsys)
    assert code == 2 and _one_line(err) == (f"{name}: error: --model-tag={tag!r} must be a plain directory name "
                                            f"(letters, digits, '.', '_', '-'; not '.' or '..'), not a path")


def test_validation_problems_are_listed_together(capsys):
    code, err = _exit(generate.main, ["--top-k=0", "--temperature=-1", "--model-tag=../x"], capsys)
    assert code == 2 and err.count("\n  - ") == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["generate", "base_eval"])
def test_cuda_on_a_machine_without_it(name, base, capsys):
    code, err = _exit(SCRIPTS[name], ["--device-type=cuda", "--model-tag=tiny"], capsys)
    assert code == 2 and "no CUDA device" in _one_line(err)


# -----------------------------------------------------------------------------
# missing and damaged files: exit 1


def _step_dir(base, tag="tiny"):
    return base / "base_checkpoints" / tag / f"step_{STEP:06d}"


def _damage_model(base):
    _flip(_step_dir(base) / "model.pt", 1, 0)
    return "damaged checkpoint file", _step_dir(base) / "model.pt"


def _empty_meta(base):
    (_step_dir(base) / "meta.json").write_text("{}")
    _rehash(_step_dir(base).parent, STEP, "meta.json")
    return "damaged checkpoint metadata: missing 'model_config'", _step_dir(base) / "meta.json"


def _bad_config(base):
    path = _step_dir(base) / "meta.json"
    meta = json.loads(path.read_text())
    meta["model_config"]["n_head"] = "two"
    path.write_text(json.dumps(meta))
    _rehash(_step_dir(base).parent, STEP, "meta.json")
    return "'model_config'.'n_head' is 'two'", path


def _wrong_shapes(base):
    """model.pt of another width than meta.json says, as a mixed-up copy would give."""
    path = _step_dir(base) / "model.pt"
    state = torch.load(path, weights_only=True)
    state["lm_head.weight"] = torch.zeros(7, 3)
    del state["transformer.wte.weight"]
    torch.save(state, path)
    _rehash(_step_dir(base).parent, STEP, "model.pt")
    return ("does not match the model its meta.json describes: missing in checkpoint: transformer.wte.weight",
            _step_dir(base).parent)


def _no_such_tag(base):
    return "no complete checkpoint in", base / "base_checkpoints" / "nope"


def _bare_tensor(base):
    path = _step_dir(base) / "model.pt"
    torch.save(torch.zeros(3), path)
    _rehash(_step_dir(base).parent, STEP, "model.pt")
    return "holds Tensor, expected a dict", path


def _broken_tokenizer(base):
    path = base / "tokenizer" / "tokenizer.json"
    path.write_text("{broken")
    return "not valid JSON", path


def _missing_tokenizer(base):
    shutil.rmtree(base / "tokenizer")
    return "not found; train one with python -m scripts.tok_train", base / "tokenizer" / "tokenizer.json"


@pytest.mark.parametrize("name", ["generate", "base_eval"])
@pytest.mark.parametrize("damage", [_damage_model, _empty_meta, _bad_config, _wrong_shapes, _no_such_tag,
                                    _bare_tensor, _broken_tokenizer, _missing_tokenizer])
def test_damaged_or_missing_files_are_one_line_exit_1(name, damage, base, capsys):
    needle, path = damage(base)
    tag = "nope" if damage is _no_such_tag else "tiny"
    argv = [f"--model-tag={tag}", "--device-type=cpu"] + (["-p", "Hi"] if name == "generate" else ["--evals=bpb"])
    code, err = _exit(SCRIPTS[name], argv, capsys)
    line = _one_line(err)
    assert code == 1 and line.startswith(f"{name}: error: ") and needle in line and str(path) in line, line


def test_vocab_mismatch_with_the_tokenizer(base, capsys):
    from nanochat.tokenizer import train_tokenizer
    small = train_tokenizer(iter(["hello world, hello tokens"] * 50), 300)   # another, smaller tokenizer
    small.save(str(base / "tokenizer"))
    code, err = _exit(generate.main, ["--model-tag=tiny", "--device-type=cpu", "-p", "x"], capsys)
    assert code == 1 and f"differs from the tokenizer's {small.get_vocab_size()}" in _one_line(err)


def test_base_eval_with_a_damaged_token_bytes_file(base, capsys):
    path = base / "tokenizer" / "token_bytes.pt"
    path.write_bytes(path.read_bytes()[:30])
    code, err = _exit(base_eval.main, ["--model-tag=tiny", "--device-type=cpu", "--evals=bpb", "--eval-tokens=64",
                                       "--device-batch-size=1"], capsys)
    line = _one_line(err)
    assert code == 1 and str(path) in line and "python -m scripts.tok_train" in line


def test_a_real_process_prints_one_line_and_no_traceback(base):
    _damage_model(base)
    out = subprocess.run([sys.executable, "-m", "scripts.generate", "--model-tag=tiny", "--device-type=cpu", "-p", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("generate: error: damaged checkpoint file ")


# -----------------------------------------------------------------------------
# base_eval: nanochat's flag names


def test_nanochat_flag_names_map_onto_base_evals_options():
    args = base_eval.build_parser().parse_args(["--eval=core,bpb", "--max-per-task=5", "--split-tokens=4096"])
    assert (args.evals, args.core_max_per_task, args.eval_tokens) == ("core,bpb", 5, 4096)
    text = base_eval.build_parser().format_help()
    for flag in ("--eval ", "--max-per-task", "--split-tokens"):
        assert flag in text


def test_base_eval_runs_with_nanochat_flag_names(base, capsys):
    result = base_eval.main(["--model-tag=tiny", "--device-type=cpu", "--eval=bpb", "--split-tokens=128",
                             "--device-batch-size=2", "--max-per-task=1"])
    assert result["step"] == STEP and result["weights"] == "ema" and 0 < result["val_bpb"] < 30
    assert result["val_tokens"] == 128


# -----------------------------------------------------------------------------
# tok_train


def test_tok_train_damaged_data_is_one_line(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    (base / "base_data").mkdir(parents=True)
    for i in range(2):
        (base / "base_data" / f"shard_{i:05d}.parquet").write_bytes(b"not parquet")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    code, err = _exit(tok_train.main, ["--vocab-size=300", "--max-chars=1000"], capsys)
    line = _one_line(err)
    assert code == 1 and line.startswith("tok_train: error: ") and "shard_0000" in line


def test_tok_train_unwritable_output_is_one_line(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer").write_text("a file where the tokenizer directory belongs")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    code, err = _exit(tok_train.main, ["--vocab-size=300", "--max-chars=20000"], capsys)
    line = _one_line(err)
    assert code == 1 and f"{base / 'tokenizer'}: cannot create it" in line


def test_tok_train_without_rustbpe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "rustbpe", None)   # import fails as if not installed
    code, err = _exit(tok_train.main, ["--vocab-size=300", "--max-chars=1000"], capsys)
    assert code == 1 and "pip install rustbpe" in _one_line(err)


def test_checkpoint_module_and_scripts_agree_on_tags():
    assert ck.model_tag_problem("d12") is None and generate.validate_args(
        generate.build_parser().parse_args(["--model-tag=d12"])) == []
