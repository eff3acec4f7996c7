"""End to end through the real entry points: tok_train -> base_train, resume parity, checkpoints."""
import os
import re
import shutil

import pytest
import torch

from tests.helpers import TINY, base_with_tokenizer, read_metrics, reseal, run, step_losses


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, tiny_tokenizer):
    """A base dir holding the shared tiny tokenizer (training reads the embedded sample)."""
    return base_with_tokenizer(tmp_path_factory, "e2e_base", tiny_tokenizer)


def test_tiny_training_learns_and_saves(trained_base, tmp_path):
    metrics = tmp_path / "learn.jsonl"
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=30", "--eval-every=15", "--model-tag=learn",
               f"--metrics-file={metrics}"], trained_base)
    evals = read_metrics(metrics, "eval")
    bpb = [r["val_bpb"] for r in evals]
    assert [r["step"] for r in evals] == [0, 15, 30] and bpb[-1] < bpb[0] - 0.2, bpb
    assert "EMBEDDED SAMPLE" in out.stdout  # no shards downloaded: the fallback is announced
    ckpt = os.path.join(trained_base, "base_checkpoints", "learn", "step_000030")
    assert os.path.exists(os.path.join(ckpt, "DONE"))
    summary = read_metrics(metrics)[-1]
    assert summary["kind"] == "summary" and summary["steps"] == summary["steps_this_run"] == 30
    assert sorted(step_losses(metrics)) == list(range(30))
    assert re.search(r"^step times: median [\d.]+ms \([\d,]+ tok/s\); \d+ steps above 1.25x", out.stdout, re.M)
    assert re.search(r"done \d+\.\ds after launch\)", out.stdout)
    # the run says which loss it uses, and why (the Triton kernels need CUDA)
    assert "lm-head loss: baseline, inductor kernel (auto: the Triton kernel does not apply, its kernels need a CUDA device" in out.stdout


def test_resume_parity_2n_straight_vs_n_resume_n(trained_base, tmp_path):
    """2N steps straight vs N steps + save + resume + N: identical losses and identical weights."""
    n = 6
    run(["-m", "scripts.base_train", *TINY, f"--num-iterations={2 * n}", f"--save-every={n}",
         "--eval-every=-1", "--model-tag=parity", f"--metrics-file={tmp_path / 'straight.jsonl'}"], trained_base)
    ckpt_dir = os.path.join(trained_base, "base_checkpoints", "parity")
    ref_final = torch.load(os.path.join(ckpt_dir, f"step_{2 * n:06d}", "model.pt"), weights_only=True)
    shutil.rmtree(os.path.join(ckpt_dir, f"step_{2 * n:06d}"))
    run(["-m", "scripts.base_train", *TINY, f"--num-iterations={2 * n}", f"--resume-from-step={n}",
         "--eval-every=-1", "--model-tag=parity", f"--metrics-file={tmp_path / 'resumed.jsonl'}"], trained_base)
    a, b = step_losses(tmp_path / "straight.jsonl"), step_losses(tmp_path / "resumed.jsonl")
    assert sorted(a) == list(range(2 * n)) and sorted(b) == list(range(n, 2 * n))
    assert {k: a[k] for k in b} == b
    got_final = torch.load(os.path.join(ckpt_dir, f"step_{2 * n:06d}", "model.pt"), weights_only=True)
    for k in ref_final:
        assert torch.equal(ref_final[k], got_final[k]), k


def test_resume_missing_step_and_wrong_depth_are_clear_errors(trained_base):
    run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--eval-every=-1", "--model-tag=mismatch"], trained_base)
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=4", "--resume-from-step=3", "--eval-every=-1",
               "--model-tag=mismatch"], trained_base, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "available" in out.stderr and "2" in out.stderr
    deeper = [a if not a.startswith("--depth") else "--depth=3" for a in TINY]
    out = run(["-m", "scripts.base_train", *deeper, "--num-iterations=4", "--resume-from-step=2", "--eval-every=-1",
               "--model-tag=mismatch"], trained_base, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "n_layer: checkpoint 2, run 3" in out.stderr


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=2"], tmp_path, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tok_train" in out.stderr


def test_a_corrupt_train_shard_is_one_line_naming_the_file(tmp_path_factory, tiny_tokenizer):
    """A train shard whose footer is intact but whose data pages are garbage is found only when its
    row group is read: base_train stops with one line that names the file, no traceback."""
    base = base_with_tokenizer(tmp_path_factory, "corrupt_base", tiny_tokenizer)
    data_dir = os.path.join(base, "base_data")
    os.makedirs(data_dir)
    from nanochat.dataset import SAMPLE_DIR
    for name in sorted(os.listdir(SAMPLE_DIR)):
        if name.endswith(".parquet"):
            shutil.copy(os.path.join(SAMPLE_DIR, name), data_dir)
    train_shard = os.path.join(data_dir, "shard_00000.parquet")
    raw = bytearray(open(train_shard, "rb").read())
    for k in range(4, min(len(raw) - 4096, 200_000)):
        raw[k] ^= 0xFF
    with open(train_shard, "wb") as f:
        f.write(bytes(raw))
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=2"], base, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "shard_00000.parquet" in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr  # one line


DYN = ["--block-update-schedule=dynamic_suffix", "--dyn-warmup-steps=2", "--dyn-probe-every=3",
       "--dyn-refresh-every=-1", "--dyn-relevance-threshold=0.5", "--dyn-log-every=1"]


def test_dynamic_suffix_trains_a_suffix_and_resumes_exactly(trained_base, tmp_path):
    """Suffix steps really freeze a prefix, and resume restores the controller (2N vs N + N)."""
    n = 6
    tiny = [a if not a.startswith("--depth") else "--depth=4" for a in TINY]
    straight_metrics, resumed_metrics = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    straight = run(["-m", "scripts.base_train", *tiny, *DYN, f"--num-iterations={2 * n}", f"--save-every={n}",
                    "--eval-every=-1", "--model-tag=dynparity", f"--metrics-file={straight_metrics}"], trained_base)
    steps = read_metrics(straight_metrics, "step")
    assert [r["step"] for r in steps] == list(range(2 * n))
    active = [r["active_layers"] for r in steps]
    assert min(active) < 4, active  # some steps trained only a suffix
    assert "dynamic_suffix stats:" in straight.stdout
    summary = read_metrics(straight_metrics)[-1]
    assert summary["kind"] == "summary" and "dynamic_suffix" in summary
    assert summary["schedule_stats"]["mean_trained_blocks"] == pytest.approx(sum(active) / len(active))
    run(["-m", "scripts.base_train", *tiny, *DYN, f"--num-iterations={2 * n}", f"--resume-from-step={n}",
         "--eval-every=-1", "--model-tag=dynparity", f"--metrics-file={resumed_metrics}"], trained_base)
    a, b = step_losses(straight_metrics), step_losses(resumed_metrics)
    assert sorted(b) == list(range(n, 2 * n)) and {k: a[k] for k in b} == b
    assert active[n:] == [r["active_layers"] for r in read_metrics(resumed_metrics, "step")]


def test_dyn_flags_without_the_schedule_are_rejected(trained_base):
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--dyn-probe-every=5"], trained_base, check=False)
    assert out.returncode == 2 and "--dyn-probe-every" in out.stderr and "dynamic_suffix" in out.stderr
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--block-update-schedule=dynamic_suffix",
               "--dyn-min-active-layers=3", "--dyn-max-active-layers=2"], trained_base, check=False)
    assert out.returncode == 2 and "--dyn-min-active-layers" in out.stderr and "Traceback" not in out.stderr


def test_nonfinite_loss_never_reaches_the_optimizer(trained_base):
    """A NaN in the weights gives a NaN loss: the run stops before optimizer.step and leaves the
    last good checkpoint untouched (no new checkpoint is written)."""
    run(["-m", "scripts.base_train", *TINY, "--num-iterations=2", "--eval-every=-1", "--model-tag=nan"], trained_base)
    ckpt = os.path.join(trained_base, "base_checkpoints", "nan", "step_000002")
    state = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    good = {k: v.clone() for k, v in state.items()}
    state["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, os.path.join(ckpt, "model.pt"))
    reseal(os.path.join(ckpt, "model.pt"))
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=4", "--resume-from-step=2", "--save-every=1",
               "--eval-every=-1", "--model-tag=nan"], trained_base, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "non-finite loss" in out.stdout and "Traceback" not in out.stderr
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["step_000002"]
    after = torch.load(os.path.join(ckpt, "model.pt"), weights_only=True)
    for k in good:
        if k != "lm_head.weight":
            assert torch.equal(after[k], good[k]), k


def test_eval_tokens_beyond_the_split_stop_at_its_end(trained_base, tmp_path):
    """An --eval-tokens far beyond the val split evaluates the split once (with one warning)
    instead of re-reading it for hours; the eval record says how many tokens were measured."""
    metrics = tmp_path / "m.jsonl"
    out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=1", "--eval-every=1", "--eval-tokens=17179869184",
               "--model-tag=evalcap", f"--metrics-file={metrics}"], trained_base, timeout=240)
    assert out.stdout.count("WARNING: evaluation wrapped around the val split") == 1
    assert len(read_metrics(metrics, "eval")) == 2 and "it stops there" in out.stdout
