"""Issue 10 end to end: config files (nanochat/config.py) and --dry-run (nanochat/plan.py), bad
inputs, NaN skipping and naming, loss-spike LR reduction, SIGTERM save + resume, retention, kill
during save, and the tokenizer's refusal of pickles. CPU, tiny models; e2e tests go through the
real entry points."""
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.config import build_parser, config_file_defaults, parse_with_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.plan import estimate_memory, model_config_from_args, plan_horizon, run_problems
from nanochat.tokenizer import Tokenizer, TokenizerError, get_token_bytes
from nanochat.train_state import TrainState
from scripts import base_train
from tests.helpers import ROOT, TINY, base_with_tokenizer, read_metrics, reseal, run, step_losses


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, tiny_tokenizer):
    return base_with_tokenizer(tmp_path_factory, "robust_base", tiny_tokenizer)


def ckpt_dir(base, tag):
    return os.path.join(base, "base_checkpoints", tag)


# ---------------------------------------------------------------------------------------------
# config files (unit)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_config_file_json_and_toml_with_either_key_spelling(tmp_path):
    parser = build_parser()
    path = write(tmp_path, "c.json", json.dumps({"depth": 6, "max-seq-len": 256, "--no-compile": True,
                                                 "matrix_lr": 1, "target_flops": "1e18", "fp8_include_regex": None}))
    values, problems = config_file_defaults(parser, path)
    assert problems == []
    assert values == {"depth": 6, "max_seq_len": 256, "no_compile": True, "matrix_lr": 1.0, "target_flops": 1e18,
                      "fp8_include_regex": None}
    assert isinstance(values["matrix_lr"], float)
    path = write(tmp_path, "c.toml", 'depth = 6\nlm_ce_backend = "chunked"\n"eval-every" = -1\n')
    values, problems = config_file_defaults(parser, path)
    assert problems == [] and values == {"depth": 6, "lm_ce_backend": "chunked", "eval_every": -1}


def test_config_file_problems_name_the_key_all_at_once(tmp_path):
    path = write(tmp_path, "bad.json", json.dumps({"depht": 3, "depth": "deep", "no_compile": 1, "lm_ce_backend": "fast",
                                                   "matrix_lr": True, "config": "x.json", "model": {"depth": 2}}))
    _, problems = config_file_defaults(build_parser(), path)
    text = "\n".join(problems)
    assert len(problems) == 7, problems
    assert "unknown key 'depht' (did you mean 'depth'?)" in text
    assert "'depth': 'deep' is not a valid int" in text
    assert "key 'no_compile' is a switch" in text
    assert "'fast' is not one of baseline, chunked" in text
    assert "key 'matrix_lr' needs a float" in text
    assert "unknown key 'config'" in text and "nested tables" in text
    assert all(p.startswith(f"--config={path}") for p in problems)


@pytest.mark.parametrize("name, text, needle", [
    ("missing.json", None, "file not found"),
    ("c.yaml", "depth: 3", "use a .json or .toml file"),
    ("c.json", "{depth: 3", "cannot parse"),
    ("c.toml", "depth = = 3", "cannot parse"),
    ("c.json", "[1, 2]", "top level must be a table"),
    ("c.json", '{"depth": 3, "--depth": 4}', "both set --depth"),
])
def test_config_file_unreadable(tmp_path, name, text, needle):
    path = str(tmp_path / name) if text is None else write(tmp_path, name, text)
    _, problems = config_file_defaults(build_parser(), path)
    assert len(problems) == 1 and needle in problems[0] and path in problems[0]


def test_cli_flags_override_the_config_file(tmp_path):
    path = write(tmp_path, "c.toml", "depth = 6\nmax_seq_len = 256\nno_compile = true\n")
    args, sources, problems = parse_with_config(build_parser(), [f"--config={path}", "--depth=3", "--seed=42"])
    assert problems == []
    assert (args.depth, args.max_seq_len, args.no_compile, args.aspect_ratio) == (3, 256, True, 64)
    assert sources["depth"] == "cli" and sources["seed"] == "cli"  # explicit, even when equal to the default
    assert sources["max_seq_len"] == "config" and sources["aspect_ratio"] == "default"


# ---------------------------------------------------------------------------------------------
# horizon and memory estimate (unit)


def test_plan_horizon_matches_the_tiny_run_and_auto_batch_is_a_multiple():
    args = build_parser().parse_args(TINY + ["--num-iterations=6"])
    plan = plan_horizon(args, 131_072, 8.847e5, 512, world_size=1)
    assert (plan.total_batch_size, plan.grad_accum_steps, plan.num_iterations, plan.total_tokens) == (512, 2, 6, 3072)
    assert abs(plan.weight_decay - 1.02188) < 1e-5  # what the tiny run logs
    args = build_parser().parse_args(["--depth=2", "--max-seq-len=64", "--device-batch-size=4"])
    plan = plan_horizon(args, 131_072, 8.847e5, 512, world_size=2)
    assert plan.auto_batch and plan.total_batch_size % (4 * 64 * 2) == 0
    assert plan.num_iterations == max(1, int(10.5 * 131_072) // plan.total_batch_size)


def test_memory_estimate_components():
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    m = estimate_memory(cfg, 4, compute_bytes=4, compiled=False)
    total = 163_844  # wte 32768 + matrices 98304 + lm_head 32768 + scalars 4
    assert m["params"] == m["grads"] == 4 * total
    assert m["optimizer_state"] == 8 * (32768 + 32768 + 4) + 4 * 98304
    assert m["weight_copies"] == 0  # fp32 compute: no autocast copies
    assert m["lm_head_loss"] == 256 * 512 * 16  # eager baseline: ~4 fp32 (tokens x vocab) tensors
    m2 = estimate_memory(cfg, 8, compute_bytes=4, compiled=False)
    assert m2["activations"] == 2 * m["activations"] and m2["params"] == m["params"]
    head = sum(v for k, v in m.items() if k not in ("peak", "backward_extra", "optimizer_peak"))
    assert m["peak"] == max(head, head - m["lm_head_loss"] + m["backward_extra"], m["optimizer_peak"])
    big = GPTConfig(sequence_len=1024, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768)
    base = estimate_memory(big, 32)
    chunked = estimate_memory(big, 32, lm_ce_backend="chunked")
    assert chunked["lm_head_loss"] < base["lm_head_loss"] < estimate_memory(big, 32, compiled=False)["lm_head_loss"]
    # the Triton loss keeps the logits' gradient beside the logits: one more (tokens x vocab) tensor
    triton = estimate_memory(big, 32, lm_ce_kernel="triton")
    assert triton["lm_head_loss"] == 2 * base["lm_head_loss"] and triton["peak"] > base["peak"]
    assert 13.5 < base["peak"] / 2 ** 30 < 16  # the d12 anchor measured 14.8 GiB (see estimate_memory)


def test_activation_estimate_matches_saved_tensors_on_cpu():
    """The per-layer constant is what autograd really saves (eager, fp32), within 15 %."""
    def saved_bytes(n_layer):
        torch.manual_seed(0)
        cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=128)
        model = GPT(cfg)
        model.init_weights()
        model.runtime.lm_ce_backend, model.runtime.lm_ce_chunk_size = "chunked", 64
        storages = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        idx = torch.randint(0, 512, (4, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
        return sum(v for k, v in storages.items() if k not in params), cfg
    (b2, cfg2), (b4, cfg4) = saved_bytes(2), saved_bytes(4)
    measured = b4 - b2
    est = (estimate_memory(cfg4, 4, compute_bytes=4, compiled=False)["activations"]
           - estimate_memory(cfg2, 4, compute_bytes=4, compiled=False)["activations"])
    assert abs(est - measured) / measured < 0.15, (est, measured)


def test_run_problems_eval_tokens_and_metrics_path(tmp_path):
    args = build_parser().parse_args(TINY + ["--eval-tokens=100", f"--metrics-file={tmp_path}/no/such/m.jsonl"])
    problems = run_problems(args, world_size=1)
    assert any("--eval-tokens=100 is less than one evaluation batch" in p and ">= 256" in p for p in problems)
    assert any("--metrics-file" in p and "does not exist" in p for p in problems)
    args = build_parser().parse_args(TINY + ["--eval-tokens=100", "--eval-every=-1"])
    assert run_problems(args, world_size=1) == []  # no evaluation, no constraint


def test_model_config_from_args_rounds_to_head_dim():
    args = build_parser().parse_args(["--depth=3", "--aspect-ratio=50", "--head-dim=64"])
    cfg = model_config_from_args(args, 1000)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size) == (192, 3, 3, 1000)


# ---------------------------------------------------------------------------------------------
# bad inputs: one line naming the flag, exit 2, no traceback (in-process main(): they all fail
# before any training)


BAD_INPUTS = [
    (["--depth=0"], "--depth=0"),
    (["--head-dim=63"], "--head-dim"),
    (["--window-pattern=SXL"], "--window-pattern"),
    (["--num-iterations=0"], "--num-iterations"),
    (["--warmup-ratio=0.7", "--warmdown-ratio=0.5"], "must not exceed 1"),
    (["--adam-beta1=1.0"], "--adam-beta1"),
    (["--matrix-lr=inf"], "--matrix-lr=inf must be a finite number"),
    (["--target-flops=nan"], "--target-flops"),
    (["--depth=4", "--block-update-schedule=dynamic_suffix", "--dyn-min-active-layers=3", "--dyn-max-active-layers=2"],
     "--dyn-min-active-layers (3) > --dyn-max-active-layers (2)"),
    (["--dyn-probe-every=5"], "only apply with --block-update-schedule=dynamic_suffix"),
    (["--fp8-include-regex=("], "--fp8-include-regex"),
    (["--model-tag=a/b"], "--model-tag"),
    (["--keep-last-k=0"], "--keep-last-k=0"),
    (["--resume-latest", "--resume-from-step=3"], "--resume-latest and --resume-from-step=3"),
    (["--debug-mem-every=0"], "--debug-mem-every=0"),
    (["--debug-max-nonfinite=0"], "--debug-max-nonfinite=0"),
    (["--skip-nonfinite-steps=0"], "--skip-nonfinite-steps=0"),
    (["--spike-window=10"], "--spike-window only apply with --auto-lr-reduction"),
    (["--auto-lr-reduction", "--spike-lr-factor=1.5"], "--spike-lr-factor=1.5"),
    (["--total-batch-size=1000"], "--total-batch-size=1000 is not a multiple"),
    (["--eval-tokens=100", "--eval-every=5"], "--eval-tokens=100 is less than one evaluation batch"),
    (["--metrics-file=/no/such/dir/m.jsonl"], "--metrics-file"),
    (["--config=/no/such/config.json"], "--config=/no/such/config.json: file not found"),
    (["--resume-from-step=7"], "--resume-from-step=7: no complete checkpoint for step 7"),
    (["--resume-latest"], "--resume-latest: no complete checkpoint"),
    (["--resume-latest", "--dry-run"], "--resume-latest: no complete checkpoint"),
    (["--lm-ce-backend=fast"], "--lm-ce-backend"),
    (["--lm-ce-kernel=triton"], "--lm-ce-kernel=triton cannot run: its kernels need a CUDA device"),
    (["--lm-ce-kernel=triton", "--lm-ce-backend=chunked"], "--lm-ce-kernel=triton cannot run: it computes the baseline"),
]


def call_main(argv, base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_train", *argv])
    with pytest.raises(SystemExit) as e:
        base_train.main()
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("argv, needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(argv, needle, trained_base, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    shutil.copytree(trained_base / "tokenizer", base / "tokenizer")  # no checkpoints in this base dir
    code, out = call_main(TINY + ["--num-iterations=4", "--eval-every=-1"] + argv, base, monkeypatch, capsys)
    errors = [line for line in out.err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in out.err
    assert len(errors) == 1 and needle in errors[0], out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_clear_line(trained_base, monkeypatch, capsys):
    argv = [a for a in TINY if not a.startswith("--device-type")] + ["--device-type=cuda", "--num-iterations=2"]
    code, out = call_main(argv, trained_base, monkeypatch, capsys)
    assert code == 2 and "--device-type=cuda but no CUDA device" in out.err and "Traceback" not in out.err


def test_config_file_bad_key_exits_2(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "c.json", json.dumps({"dpeth": 3}))
    code, out = call_main([f"--config={path}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "unknown key 'dpeth' (did you mean 'depth'?)" in out.err


# ---------------------------------------------------------------------------------------------
# --dry-run and config precedence (e2e)


def test_dry_run_prints_the_plan_and_touches_nothing(trained_base, tmp_path):
    cfg = write(tmp_path, "run.toml", "\n".join([
        "depth = 3", "aspect_ratio = 32", "head_dim = 32", "max_seq_len = 64", "device_batch_size = 4",
        "total_batch_size = 512", "num_iterations = 40", "no_compile = true", 'lm_ce_backend = "chunked"']))
    out = run(["-m", "scripts.base_train", f"--config={cfg}", "--depth=2", "--dry-run", "--device-type=cuda",
               "--model-tag=dry"], trained_base)
    text = out.stdout
    assert re.search(r"^  --depth\s+2  \[cli\]$", text, re.M)  # the command line beat the file's 3
    assert re.search(r"^  --num-iterations\s+40  \[config\]$", text, re.M)
    assert re.search(r"^  --seed\s+42  \[default\]$", text, re.M)
    assert "parameters: wte=32,768, transformer_matrices=98,304, lm_head=32,768, scalars=4, total=163,844" in text
    assert "FLOPs per token (training): 8.847e+05" in text
    assert "horizon: 40 steps x 512 tokens" in text
    assert "token budget (Chinchilla, 20 x 131.07k scaling params): 2.62M tokens; planned 20.48k" in text
    assert re.search(r"estimated peak memory per device: .* \(device batch 4 x 64, bf16 autocast, eager, chunked CE\)", text)
    assert "note: CUDA is not visible" in text or torch.cuda.is_available()
    assert "dry run OK" in text
    assert not os.path.exists(os.path.join(trained_base, "base_checkpoints", "dry"))
    assert not os.path.exists(os.path.join(trained_base, "base_data"))  # the data was never looked at


def test_dry_run_names_the_loss_kernel_and_counts_its_memory(trained_base):
    args = ["-m", "scripts.base_train", "--depth=2", "--max-seq-len=64", "--device-batch-size=4",
            "--total-batch-size=256", "--num-iterations=5", "--dry-run", "--device-type=cpu"]
    text = run(args, trained_base).stdout
    assert re.search(r"estimated peak memory per device: .* \(device batch 4 x 64, fp32, compiled, baseline CE, "
                     r"inductor loss kernel\)", text)
    out = run(args + ["--lm-ce-kernel=triton"], trained_base, check=False)
    assert out.returncode == 2 and "--lm-ce-kernel=triton cannot run: its kernels need a CUDA device" in out.stderr


# ---------------------------------------------------------------------------------------------
# non-finite steps, spikes, retention, kill during save, SIGTERM (e2e)


def test_skip_nonfinite_step_keeps_weights_and_spike_reduces_lr(trained_base, tmp_path):
    """Step 3's loss is NaN (fault injection): skipped, the weights and optimizer state after it are
    those before it; step 7's loss is 30x: a spike, every LR halves from there; the run finishes."""
    metrics = tmp_path / "m.jsonl"
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=10", "--eval-every=-1", "--save-every=1", "--warmdown-ratio=0",
               "--skip-nonfinite-steps=1", "--auto-lr-reduction", "--spike-window=3", "--spike-zscore=20",
               f"--metrics-file={metrics}", "--model-tag=skip"], trained_base, env={"NANOCHAT_FAULT_INJECT": "3:nan,7:30"})
    assert "step 00003 | non-finite loss (nan) | step skipped: no optimizer update (1 in a row" in out.stdout
    spike = [line for line in out.stdout.splitlines() if "loss spike" in line]
    assert len(spike) == 1 and "LR scale now x0.5" in spike[0]
    assert [(r["step"], r["lr_scale"]) for r in read_metrics(metrics, "lr_reduction")] == [(7, 0.5)]
    assert [(r["step"], r["skipped_total"]) for r in read_metrics(metrics, "skip")] == [(3, 1)]
    lrm = {r["step"]: r["lrm"] for r in read_metrics(metrics, "step")}
    assert sorted(lrm) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert lrm[6] == 1.0 and lrm[7] == 0.5
    d = ckpt_dir(trained_base, "skip")
    for f in ("model.pt", "optim_rank0.pt"):
        a = torch.load(os.path.join(d, "step_000003", f), weights_only=True)
        b = torch.load(os.path.join(d, "step_000004", f), weights_only=True)
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(flat_a, flat_b)), f
    summary = read_metrics(metrics)[-1]
    assert summary["kind"] == "summary" and summary["nonfinite_skipped"] == 1 and summary["lr_reductions"] == 1
    with open(os.path.join(d, "step_000010", "meta.json")) as f:
        meta = json.load(f)
    assert meta["auto_lr"]["lr_scale"] == 0.5 and TrainState.from_checkpoint(meta).nonfinite_skipped == 1  # resumable


def test_nonfinite_step_skipped_after_the_optimizer_was_queued(trained_base):
    """Without --debug-nan/--auto-lr-reduction the optimizer step is queued before the host reads the
    loss and is skipped by the optimizer itself: the weights and optimizer state after a NaN step
    are bit-identical to before it, and the bad-step streak is saved, so a resume keeps counting."""
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=5", "--eval-every=-1", "--save-every=1",
               "--skip-nonfinite-steps=2", "--model-tag=devskip"], trained_base, env={"NANOCHAT_FAULT_INJECT": "3:nan"})
    assert "step 00003 | non-finite loss (nan) | step skipped: no optimizer update (1 in a row" in out.stdout
    d = ckpt_dir(trained_base, "devskip")
    # (the optimizer's param_groups also hold this step's scheduled lr/momentum, set every step:
    # the tensors are what a skip must not touch)
    for f, part in (("model.pt", lambda sd: sd), ("optim_rank0.pt", lambda sd: sd["state"])):
        a = torch.utils._pytree.tree_leaves(part(torch.load(os.path.join(d, "step_000003", f), weights_only=True)))
        b = torch.utils._pytree.tree_leaves(part(torch.load(os.path.join(d, "step_000004", f), weights_only=True)))
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b)), f
    streaks = []
    for step in (3, 4, 5):
        with open(os.path.join(d, f"step_{step:06d}", "meta.json")) as fh:
            streaks.append(TrainState.from_checkpoint(json.load(fh)).nonfinite_streak)
    assert streaks == [0, 1, 0]  # saved after step 3 was skipped, reset by the good step 4


def test_debug_nan_names_the_tensor_and_too_many_bad_steps_stop(trained_base):
    """A NaN weight: every loss is NaN. --debug-nan names it; two steps are skipped, the third in a row
    stops the run (exit 1) without writing a checkpoint."""
    run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--eval-every=-1", "--model-tag=nanname"], trained_base)
    path = os.path.join(ckpt_dir(trained_base, "nanname"), "step_000002", "model.pt")
    state = torch.load(path, weights_only=True)
    state["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, path)
    reseal(path)
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=10", "--resume-latest", "--eval-every=-1",
               "--save-every=5", "--debug-nan", "--debug-max-nonfinite=2", "--skip-nonfinite-steps=2",
               "--model-tag=nanname"], trained_base, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "param lm_head.weight (shape 512x64: 1 NaN, 0 Inf of 32768)" in out.stdout
    assert out.stdout.count("step skipped") == 2 and "... and" in out.stdout
    assert "step 00004 | non-finite loss (nan)" in out.stdout
    assert "stopping without its optimizer update (3 in a row, --skip-nonfinite-steps=2)" in out.stdout
    assert sorted(os.listdir(ckpt_dir(trained_base, "nanname"))) == ["step_000002"]


def test_out_of_memory_is_one_line_with_what_to_change(trained_base, tmp_path):
    """A device OOM (simulated: the forward raises torch.OutOfMemoryError at step 2) ends the run
    with one line naming the knobs that help, exit 1, no traceback."""
    script = tmp_path / "oom.py"
    script.write_text(
        "import sys\n"
        "import torch\n"
        "from nanochat.gpt import GPT\n"
        "from scripts import base_train\n"
        "orig, calls = GPT.forward, [0]\n"
        "def forward(self, *a, **k):\n"
        "    calls[0] += 1\n"
        "    if torch.is_grad_enabled() and calls[0] > 4:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.\\nmore details')\n"
        "    return orig(self, *a, **k)\n"
        "GPT.forward = forward\n"
        "sys.argv = ['base_train', *sys.argv[1:]]\n"
        "base_train.cli()\n")
    out = run([str(script), *TINY, "--num-iterations=5", "--eval-every=-1", "--model-tag=oom"], trained_base,
              check=False, env={"PYTHONPATH": ROOT})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in line
    assert "--device-batch-size" in line and "--activation-checkpointing" in line and "--dry-run" in line


def test_keep_last_k_and_resume_latest_after_a_kill_during_save(trained_base, tmp_path):
    run(["-m", "scripts.base_train", *TINY, "--num-iterations=4", "--eval-every=-1", "--save-every=1",
         "--keep-last-k=2", "--model-tag=keep"], trained_base)
    d = ckpt_dir(trained_base, "keep")
    assert sorted(os.listdir(d)) == ["step_000003", "step_000004"]
    # A kill while saving step 5 leaves its temp dir; another writer left step 6 without DONE.
    shutil.copytree(os.path.join(d, "step_000004"), os.path.join(d, ".tmp_step_000005"))
    os.remove(os.path.join(d, ".tmp_step_000005", "DONE"))
    shutil.copytree(os.path.join(d, "step_000004"), os.path.join(d, "step_000006"))
    os.remove(os.path.join(d, "step_000006", "DONE"))
    metrics = tmp_path / "resumed.jsonl"
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=6", "--eval-every=-1", "--resume-latest",
               "--model-tag=keep", f"--metrics-file={metrics}"], trained_base)
    assert "resuming from step 4" in out.stdout and sorted(step_losses(metrics)) == [4, 5]
    assert sorted(os.listdir(d)) == ["step_000003", "step_000004", "step_000006"]  # temp dir cleaned, 6 replaced
    assert os.path.isfile(os.path.join(d, "step_000006", "DONE"))


def test_debug_flags_on_cpu_say_what_they_do(trained_base):
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=1", "--eval-every=-1", "--debug-anomaly",
               "--debug-mem-every=1", "--model-tag=dbg"], trained_base)
    assert "--debug-mem-every=1: per-phase peak memory" in out.stdout and "CUDA-only" in out.stdout
    assert "--debug-anomaly" in out.stdout and "slower" in out.stdout


def steps_written_so_far(path):
    """The steps in the --metrics-file of a run still writing it (a line not yet ended is left out)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    whole = text[:text.rfind("\n") + 1].splitlines()
    return [r["step"] for r in map(json.loads, whole) if r["kind"] == "step"]


def test_sigterm_finishes_the_step_saves_and_exits_0_then_resumes(trained_base, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(trained_base), "PYTHONUNBUFFERED": "1"}
    metrics = tmp_path / "first.jsonl"
    cmd = [sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations=100000", "--eval-every=-1",
           "--model-tag=sigterm", f"--metrics-file={metrics}"]
    # the output goes to files, not pipes: nobody reads it while the steps are awaited
    with open(tmp_path / "stdout.txt", "w") as out_f, open(tmp_path / "stderr.txt", "w") as err_f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and 1 not in steps_written_so_far(metrics):
            time.sleep(0.1)
        # a second run on the same checkpoint dir stops at once, in one line naming the first
        second = run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--model-tag=sigterm"], trained_base,
                     check=False)
        assert second.returncode == 1 and "in use by another run" in second.stderr, second.stderr[-2000:]
        assert f"pid {proc.pid}" in second.stderr and second.stderr.strip().count("\n") == 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stdout[-2000:] + err[-2000:]
    m = re.search(r"^received SIGTERM: stopped after step (\d+), checkpoint step (\d+) saved", stdout, re.M)
    assert m, stdout[-2000:]
    trained = [r["step"] for r in read_metrics(metrics, "step")]
    saved = int(m.group(2))
    assert trained == list(range(saved)) and int(m.group(1)) == saved - 1 and saved >= 2
    assert read_metrics(metrics)[-1]["kind"] == "summary"
    assert os.path.isfile(os.path.join(ckpt_dir(trained_base, "sigterm"), f"step_{saved:06d}", "DONE"))
    resumed = tmp_path / "resumed.jsonl"
    out = run(["-m", "scripts.base_train", *TINY, f"--num-iterations={saved + 2}", "--eval-every=-1", "--resume-latest",
               "--model-tag=sigterm", f"--metrics-file={resumed}"], trained_base)
    assert f"resuming from step {saved}" in out.stdout and sorted(step_losses(resumed)) == [saved, saved + 1]


# ---------------------------------------------------------------------------------------------
# loading never runs code: the tokenizer's files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_tokenizer_files_carrying_a_malicious_pickle_are_refused(trained_base, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(trained_base / "tokenizer", base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    marker = tmp_path / "pwned"
    # token_bytes.pt: a torch file whose pickle calls os.system
    torch.save({"token_bytes": _Payload(marker)}, base / "tokenizer" / "token_bytes.pt")
    with pytest.raises(TokenizerError, match="token_bytes.pt") as e:
        get_token_bytes()
    assert "os.system" in str(e.value) or "posix.system" in str(e.value) or "Unsupported global" in str(e.value)
    # tokenizer.json: a raw pickle where JSON belongs
    (base / "tokenizer" / "tokenizer.json").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(str(base / "tokenizer"))
    assert not marker.exists()  # nothing was executed


@pytest.mark.gpu
def test_loss_read_one_step_late_on_cuda(trained_base, tmp_path):
    """On CUDA a step's loss is read one step late (after the next step is queued). A NaN step is
    still skipped on the device and reported under its own step number, every other step is logged
    once, in order, with a positive step time; without --skip-nonfinite-steps the run stops there."""
    gpu = ["--device-type=cuda" if a == "--device-type=cpu" else a for a in TINY]
    metrics = tmp_path / "m.jsonl"
    out = run(["-m", "scripts.base_train", *gpu, "--num-iterations=8", "--eval-every=-1", "--skip-nonfinite-steps=1",
               f"--metrics-file={metrics}", "--model-tag=late"], trained_base, env={"NANOCHAT_FAULT_INJECT": "4:nan"})
    assert "step 00004 | non-finite loss (nan) | step skipped: no optimizer update (1 in a row" in out.stdout
    records = read_metrics(metrics)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 5, 6, 7] and all(r["dt"] > 0 for r in steps), steps
    assert [r["step"] for r in records if r["kind"] == "skip"] == [4]
    assert records[-1]["kind"] == "summary" and records[-1]["nonfinite_skipped"] == 1
    out = run(["-m", "scripts.base_train", *gpu, "--num-iterations=8", "--eval-every=-1", "--model-tag=late2"],
              trained_base, check=False, env={"NANOCHAT_FAULT_INJECT": "4:nan"})
    assert out.returncode == 1 and "step 00004 | non-finite loss (nan); stopping without its optimizer update" in out.stdout
    assert "Traceback" not in out.stderr
