"""Checkpoint save/load: round trip, crash atomicity, retention, safe loading, content hashes, the
meta.json schema, disk-full cleanup, the directory lock, resume reports."""
import base64
import errno
import hashlib
import json
import os
import pickle
import shlex
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass

import pytest
import torch

from nanochat import checkpoint as ck
from nanochat.checkpoint import (CheckpointError, check_state_dict_keys, diff_model_config, find_complete_steps,
                                 latest_complete_step, load_checkpoint, resolve_resume_step, save_checkpoint,
                                 set_aside_newer)


def _model_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "wte.weight": torch.randn(8, 4, generator=g),
        "h.0.attn.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(8, 4, generator=g),
        "rng_cpu": torch.get_rng_state(),
    }


def _optim_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4, generator=g),
                "exp_avg_sq": torch.rand(8, 4, generator=g)},
            1: {"momentum_buffer": torch.randn(4, 4, generator=g).to(torch.bfloat16), "count": 7},
        },
        "param_groups": [
            {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0, "fused": None,
             "kind": "adamw", "nesterov": True, "initial_lr": 0.02, "params": [0]},
            {"lr": 0.05, "momentum": 0.95, "ns_steps": 5, "kind": "muon", "shapes": [[4, 4]], "params": [1]},
        ],
    }


def resume_meta(step, model_config=None):
    """Metadata with every key that a training resume reads (the schema validate_meta checks)."""
    return {"step": step, "args": {"depth": 2, "run": "dummy"},
            "model_config": model_config or {"n_layer": 2, "n_embd": 4},
            "loop_state": {"smooth_loss": 3.25, "min_val_bpb": float("inf"), "val_bpb": None,
                           "total_training_time": 12.5, "train_elapsed": 13.0},
            "dataloader_states": [{"shard": 0, "row": 17}],
            "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
            "dynamic_suffix": None, "ema": None, "auto_lr": None, "nonfinite_skipped": 0, "nonfinite_streak": 0}


def _save(d, step, seed=0, **kw):
    return save_checkpoint(d, step, _model_state(seed), _optim_state(seed), resume_meta(step), **kw)


def _assert_equal(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def _rehash(d, step, *names):
    """Record the current hash of `names` in DONE, as a tool rewriting a checkpoint would, so a
    test reaches the checks behind the hash check."""
    done_path = os.path.join(d, f"step_{step:06d}", "DONE")
    done = json.loads(open(done_path).read())
    for name in names:
        done["sha256"][name] = ck.file_sha256(os.path.join(d, f"step_{step:06d}", name))
    with open(done_path, "w") as f:
        json.dump(done, f)


def _drop_hashes(d, step):
    """Make a checkpoint look like one saved before content hashes were recorded."""
    done_path = os.path.join(d, f"step_{step:06d}", "DONE")
    done = json.loads(open(done_path).read())
    del done["sha256"]
    with open(done_path, "w") as f:
        json.dump(done, f)


# ---------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    d = tmp_path / "ckpt"
    final = _save(d, 12)
    assert final == str(d / "step_000012")
    assert sorted(os.listdir(final)) == ["DONE", "meta.json", "model.pt", "optim_rank0.pt"]
    model, optim, meta = load_checkpoint(d, 12, "cpu")
    _assert_equal(model, _model_state(0))
    _assert_equal(optim, _optim_state(0))  # python floats/ints/bools/None/str/tuples survive
    assert model["h.0.attn.weight"].dtype == torch.bfloat16
    assert meta == resume_meta(12)
    model2, optim2, _ = load_checkpoint(d, 12, torch.device("cpu"), load_optimizer=False)
    assert optim2 is None and torch.equal(model2["wte.weight"], model["wte.weight"])
    assert find_complete_steps(d) == [12] and latest_complete_step(d) == 12
    assert not [n for n in os.listdir(d) if n.startswith(".")]


def test_optimizer_state_dict_of_real_optimizer(tmp_path):
    """A real torch optimizer's state_dict survives and loads back into a fresh optimizer."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, net.state_dict(), opt.state_dict(), resume_meta(1))
    model, optim, _ = load_checkpoint(tmp_path, 1, "cpu")
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3, betas=(0.8, 0.95))
    net2.load_state_dict(model)
    opt2.load_state_dict(optim)
    _assert_equal(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


class _Killed(BaseException):
    """Stands in for the process dying mid-save: nothing in save_checkpoint may catch it."""


def _save_failing_at(monkeypatch, call, exc):
    """Make the `call`-th torch.save raise `exc`."""
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save(d, 10, seed=1)
    _save_failing_at(monkeypatch, 2, _Killed())
    with pytest.raises(_Killed):
        _save(d, 20, seed=2)
    monkeypatch.undo()
    # the partial save is left behind, as a real kill would leave it, under this process's pid
    assert os.path.isdir(d / f".tmp_step_000020.{os.getpid()}")
    assert find_complete_steps(d) == [10] and latest_complete_step(d) == 10
    assert resolve_resume_step(d, "latest") == 10
    model, _, meta = load_checkpoint(d, 10, "cpu")
    _assert_equal(model, _model_state(1))
    assert meta["step"] == 10
    # A later successful save (another step) cleans up the stale temp dir.
    _save(d, 30, seed=3)
    assert find_complete_steps(d) == [10, 30]
    assert not [n for n in os.listdir(d) if n.startswith(".")]


@pytest.mark.parametrize("call", [1, 2])   # model.pt, then the optimizer shard
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.ENOSPC)])
def test_disk_full_removes_the_partial_save_and_names_the_intact_step(tmp_path, monkeypatch, call, exc):
    d = tmp_path / "ckpt"
    _save(d, 10, seed=1)
    _save_failing_at(monkeypatch, call, exc)
    with pytest.raises(CheckpointError) as ei:
        _save(d, 20, seed=2)
    monkeypatch.undo()
    msg = str(ei.value)
    assert msg.startswith(f"disk full while saving checkpoint step 20 to {d}") and "\n" not in msg
    assert "the previous checkpoint step 10 is intact" in msg
    assert sorted(os.listdir(d)) == ["step_000010"]   # no temp dir left
    _assert_equal(load_checkpoint(d, 10, "cpu")[0], _model_state(1))


def test_other_write_errors_and_a_first_save_say_so(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save_failing_at(monkeypatch, 1, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(CheckpointError, match=r"could not save checkpoint step 3 .*\(OSError: Input/output error\); "
                                              r"the partial save was removed and no earlier checkpoint exists"):
        _save(d, 3)
    assert os.listdir(d) == []


def test_crash_in_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save(d, 10, seed=1)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated crash in rename")))
    with pytest.raises(CheckpointError, match="simulated crash in rename.*previous checkpoint step 10 is intact"):
        _save(d, 20, seed=2)
    monkeypatch.undo()
    assert find_complete_steps(d) == [10] and sorted(os.listdir(d)) == ["step_000010"]


def test_temp_dirs_of_live_savers_are_left_alone(tmp_path):
    """Temp dirs carry the saver's pid: cleanup removes those of dead processes (and of older code,
    without a pid) but never one that a live process is still writing."""
    d = tmp_path / "ckpt"
    _save(d, 1)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name in (f".tmp_step_000002.{live.pid}", f".tmp_step_000002.{dead.pid}", ".tmp_step_000002",
                     f".old_step_000001.{dead.pid}"):
            (d / name).mkdir()
        _save(d, 3)
        assert sorted(os.listdir(d)) == [f".tmp_step_000002.{live.pid}", "step_000001", "step_000003"]
    finally:
        live.communicate(b"")


def test_overwrite_same_step(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save(d, 5, seed=1)
    _save(d, 5, seed=2)
    model, optim, _ = load_checkpoint(d, 5, "cpu")
    _assert_equal(model, _model_state(2))
    _assert_equal(optim, _optim_state(2))
    assert sorted(os.listdir(d)) == ["step_000005"]
    # Crash between moving the old dir aside and renaming the new one in: the old one comes back.
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated crash in rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(CheckpointError, match="simulated crash"):
        _save(d, 5, seed=3)
    monkeypatch.undo()
    assert find_complete_steps(d) == [5]
    _assert_equal(load_checkpoint(d, 5, "cpu")[0], _model_state(2))


def test_dir_without_done_is_ignored(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 1)
    _save(d, 2)
    os.remove(d / "step_000002" / "DONE")
    (d / "step_000003").mkdir()  # empty dir
    (d / "notes").mkdir()
    (d / "step_000004.bak").mkdir()
    assert find_complete_steps(d) == [1]
    assert latest_complete_step(d) == 1
    with pytest.raises(CheckpointError, match=r"step 2 .*available complete steps: 1"):
        load_checkpoint(d, 2, "cpu")
    assert find_complete_steps(tmp_path / "absent") == [] and latest_complete_step(tmp_path / "absent") is None


def test_keep_last_k(tmp_path):
    d = tmp_path / "ckpt"
    for s in (100, 200, 300, 400):
        _save(d, s, keep_last_k=2)
    assert find_complete_steps(d) == [300, 400]
    _save(d, 500)  # -1: keep everything
    assert find_complete_steps(d) == [300, 400, 500]
    # Saving an older step (resumed from an earlier checkpoint) never deletes what was just written.
    _save(d, 150, keep_last_k=1)
    assert find_complete_steps(d) == [150, 500]
    assert sorted(os.listdir(d)) == ["step_000150", "step_000500"]


def _make_payload(marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))
    return Payload()


@pytest.mark.skipif(sys.platform == "win32", reason="payload uses touch")
@pytest.mark.parametrize("how", ["raw_pickle", "torch_save"])
def test_malicious_pickle_is_refused(tmp_path, how):
    d = tmp_path / "ckpt"
    _save(d, 7)
    marker = tmp_path / "pwned"
    path = d / "step_000007" / "model.pt"
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps({"w": _make_payload(marker)}, protocol=2))
    else:
        torch.save({"w": _make_payload(marker)}, path)
    _rehash(d, 7, "model.pt")   # whoever planted it also fixed the manifest
    assert find_complete_steps(d) == [7]  # looks complete
    with pytest.raises(CheckpointError, match="refusing to load .*model.pt: not a plain tensor checkpoint") as ei:
        load_checkpoint(d, 7, "cpu")
    assert "\n" not in str(ei.value)
    if how == "raw_pickle":
        assert "system" in str(ei.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (proves this test is not vacuous).
    live = tmp_path / "live_marker"
    pickle.loads(pickle.dumps(_make_payload(live), protocol=2))
    assert live.exists()


@pytest.mark.parametrize("hashed", [True, False])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 0.5, 0.9])
def test_truncated_model_file(tmp_path, keep_fraction, hashed):
    d = tmp_path / "ckpt"
    _save(d, 3)
    if not hashed:   # an older checkpoint: the unpickler itself must report the damage
        _drop_hashes(d, 3)
    path = d / "step_000003" / "model.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    kind = "damaged checkpoint file" if hashed else "corrupt or truncated checkpoint file"
    with pytest.raises(CheckpointError, match=kind) as ei:
        load_checkpoint(d, 3, "cpu", warn=lambda m: None)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("hashed", [True, False])
def test_garbage_model_file(tmp_path, hashed):
    d = tmp_path / "ckpt"
    _save(d, 3)
    if not hashed:
        _drop_hashes(d, 3)
    path = d / "step_000003" / "model.pt"
    path.write_bytes(b"not a checkpoint at all " * 10)
    with pytest.raises(CheckpointError, match=r"(damaged|corrupt|not a plain tensor checkpoint)") as ei:
        load_checkpoint(d, 3, "cpu", warn=lambda m: None)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_truncated_optimizer_and_meta_files(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 3)
    opt = d / "step_000003" / "optim_rank0.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"damaged checkpoint file .*optim_rank0\.pt"):
        load_checkpoint(d, 3, "cpu")
    load_checkpoint(d, 3, "cpu", load_optimizer=False)  # the model alone still loads
    meta = d / "step_000003" / "meta.json"
    meta.write_text('{"step": 3, "args": {')
    with pytest.raises(CheckpointError, match=r"meta\.json"):
        load_checkpoint(d, 3, "cpu", load_optimizer=False)


@pytest.mark.parametrize("bad, key", [
    ({"loop": {"rng": torch.zeros(3)}}, "['loop']['rng']"),
    ({"args": {"depths": [1, 2, object()]}}, "['args']['depths'][2]"),
    ({"controller": {1: 0.5}}, "['controller'] has non-str key 1"),
])
def test_non_json_meta_names_the_key(tmp_path, bad, key):
    d = tmp_path / "ckpt"
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(d, 1, _model_state(), _optim_state(), {"step": 1, **bad})
    assert key in str(ei.value) and str(ei.value).startswith("meta")
    assert find_complete_steps(d) == [] and not (d.exists() and os.listdir(d))  # nothing written


def test_unloadable_state_refused_at_save(tmp_path):
    class Custom:
        pass
    state = _optim_state()
    state["state"][0]["thing"] = Custom()
    with pytest.raises(CheckpointError, match=r"optimizer_state \(rank 0\)\['state'\]\[0\]\['thing'\] .*Custom"):
        save_checkpoint(tmp_path, 1, _model_state(), state, {"step": 1})
    assert find_complete_steps(tmp_path) == []


def test_resolve_resume_step(tmp_path):
    d = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume_step(d, "latest")
    for s in (10, 20):
        _save(d, s)
    assert resolve_resume_step(d, "latest") == 20
    assert resolve_resume_step(d, 10) == 10 and resolve_resume_step(d, "10") == 10
    assert resolve_resume_step(d, -1) is None
    with pytest.raises(CheckpointError, match=r"step 15 .*available complete steps: 10, 20"):
        resolve_resume_step(d, 15)
    with pytest.raises(CheckpointError, match="available complete steps: 10, 20"):
        load_checkpoint(d, 15, "cpu")
    with pytest.raises(CheckpointError, match="'latest'"):
        resolve_resume_step(d, "newest")
    with pytest.raises(CheckpointError, match=">= 0"):
        resolve_resume_step(d, -5)


def test_multi_rank_protocol_with_threads(tmp_path):
    """Two 'ranks' in threads share a barrier: shards per rank, DONE only after both wrote."""
    d = tmp_path / "ckpt"
    world = 2
    tb = threading.Barrier(world, timeout=30)
    calls = [0] * world
    errors = []

    def run(rank):
        def barrier():
            calls[rank] += 1
            tb.wait()
        try:
            save_checkpoint(d, 4, _model_state() if rank == 0 else None, _optim_state(seed=rank),
                            resume_meta(4) if rank == 0 else None, rank=rank, world_size=world, barrier=barrier,
                            keep_last_k=2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            tb.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == [3, 3]
    assert sorted(os.listdir(d / "step_000004")) == ["DONE", "meta.json", "model.pt", "optim_rank0.pt",
                                                     "optim_rank1.pt"]
    assert json.loads((d / "step_000004" / "DONE").read_text())["world_size"] == 2
    for r in range(world):
        _, optim, _ = load_checkpoint(d, 4, "cpu", rank=r, world_size=world)
        _assert_equal(optim, _optim_state(seed=r))
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        load_checkpoint(d, 4, "cpu", rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="no optimizer state for rank 2"):
        load_checkpoint(d, 4, "cpu", rank=2)
    with pytest.raises(ValueError, match="barrier"):
        save_checkpoint(d, 5, _model_state(), _optim_state(), resume_meta(5), rank=0, world_size=2)


def test_diff_model_config():
    saved = {"n_layer": 4, "n_embd": 64, "window_pattern": "SSSL", "betas": [0.8, 0.95], "old": 1}

    @dataclass
    class Cfg:
        n_layer: int = 2
        n_embd: int = 64
        window_pattern: str = "L"
        betas: tuple = (0.8, 0.95)  # tuple vs JSON list: equal
        new: int = 3

    assert diff_model_config(saved, Cfg()) == [
        "n_layer: checkpoint 4, run 2",
        "window_pattern: checkpoint 'SSSL', run 'L'",
        "old: checkpoint 1, run <absent>",
        "new: checkpoint <absent>, run 3",
    ]
    assert diff_model_config(saved, dict(saved)) == []


def test_check_state_dict_keys_depth_change():
    def net(depth, width=4):
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    saved = net(3).state_dict()
    assert check_state_dict_keys(saved, net(3)) == []
    assert check_state_dict_keys(saved, net(2)) == [
        "unexpected in checkpoint: 2.weight (checkpoint shape [4, 4])",
        "unexpected in checkpoint: 2.bias (checkpoint shape [4])",
    ]
    assert check_state_dict_keys(saved, net(4)) == [
        "missing in checkpoint: 3.weight (run shape [4, 4])",
        "missing in checkpoint: 3.bias (run shape [4])",
    ]
    lines = check_state_dict_keys(saved, net(3, width=8))
    assert "shape mismatch: 0.weight: checkpoint [4, 4], run [8, 8]" in lines and len(lines) == 6
    compiled_keys = {"_orig_mod." + k: v for k, v in saved.items()}
    lines = check_state_dict_keys(compiled_keys, net(3))
    assert "_orig_mod." in lines[-1] and "uncompiled" in lines[-1]


def test_step_dir_name():
    assert os.path.basename(ck.step_dir("x", 42)) == "step_000042"
    assert os.path.basename(ck.step_dir("x", 1234567)) == "step_1234567"


def test_resuming_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path):
    """After a rewind, retention and "latest" must see the resumed run's checkpoints, not the
    abandoned run's later ones; those are kept (renamed), never deleted."""
    d = tmp_path / "ckpt"
    for s in (200, 400, 600, 800):
        _save(d, s)
    moved = set_aside_newer(d, 400)
    assert find_complete_steps(d) == [200, 400]
    assert sorted(os.path.basename(p) for p in moved) == ["abandoned_step_000600", "abandoned_step_000800"]
    _save(d, 500, keep_last_k=2)
    _save(d, 600, keep_last_k=2)
    assert find_complete_steps(d) == [500, 600]
    assert resolve_resume_step(d, "latest") == 600
    assert os.path.isdir(d / "abandoned_step_000800")
    # A second rewind past an already abandoned step keeps both copies.
    assert os.path.basename(set_aside_newer(d, 500)[0]) == "abandoned_step_000600.1"


# ---------------------------------------------------------------------------------------------
# content hashes


def test_manifest_records_the_hash_of_every_file(tmp_path):
    final = _save(tmp_path, 2)
    done = json.loads(open(os.path.join(final, "DONE")).read())
    files = sorted(n for n in os.listdir(final) if n != "DONE")
    assert sorted(done["sha256"]) == files == ["meta.json", "model.pt", "optim_rank0.pt"]
    for name in files:
        assert done["sha256"][name] == hashlib.sha256(open(os.path.join(final, name), "rb").read()).hexdigest()


def _flip(path, n_bytes, seed):
    """Invert `n_bytes` distinct bytes of a file at seeded positions."""
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(data), generator=g)[:n_bytes].tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.pt", "optim_rank0.pt", "meta.json"])
@pytest.mark.parametrize("n_bytes", [1, 16])
def test_flipped_bytes_are_caught_and_the_file_named(tmp_path, name, n_bytes):
    d = tmp_path / "ckpt"
    _save(d, 4)
    path = d / "step_000004" / name
    for seed in range(3):   # several positions: header, tensor data, the end
        _flip(path, n_bytes, seed)
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(d, 4, "cpu")
        msg = str(ei.value)
        assert msg.startswith(f"damaged checkpoint file {path}: its sha256") and "\n" not in msg
        _flip(path, n_bytes, seed)   # flipping back restores the file
        load_checkpoint(d, 4, "cpu")


def test_generation_load_does_not_read_the_optimizer_shards(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 4)
    _flip(d / "step_000004" / "optim_rank0.pt", 1, 0)
    model, optim, _ = load_checkpoint(d, 4, "cpu", load_optimizer=False)
    assert optim is None and torch.equal(model["wte.weight"], _model_state()["wte.weight"])


def test_checkpoint_without_hashes_loads_with_one_warning_line(tmp_path, capsys):
    d = tmp_path / "ckpt"
    _save(d, 4)
    _drop_hashes(d, 4)
    model, optim, _ = load_checkpoint(d, 4, "cpu")
    _assert_equal(model, _model_state())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"WARNING: checkpoint {d / 'step_000004'} records no content hashes")
    seen = []
    load_checkpoint(d, 4, "cpu", warn=seen.append)   # callers can route it (e.g. to their log)
    load_checkpoint(d, 4, "cpu", rank=1, warn=seen.append, load_optimizer=False)   # rank 0 only
    assert len(seen) == 1 and not capsys.readouterr().err


@pytest.mark.parametrize("done", ["[1, 2]", '{"step": 4, "sha256": {"model.pt": "xyz"}}', '{"world_size": "two"}'])
def test_damaged_manifest_is_named(tmp_path, done):
    d = tmp_path / "ckpt"
    _save(d, 4)
    (d / "step_000004" / "DONE").write_text(done)
    with pytest.raises(CheckpointError, match=r"DONE: damaged checkpoint manifest"):
        load_checkpoint(d, 4, "cpu")


# ---------------------------------------------------------------------------------------------
# the meta.json schema and the state files


def _rewrite_meta(d, step, meta_or_text):
    path = d / f"step_{step:06d}" / "meta.json"
    path.write_text(meta_or_text if isinstance(meta_or_text, str) else json.dumps(meta_or_text))
    _rehash(d, step, "meta.json")
    return path


def _without(key):
    m = resume_meta(4)
    del m[key]
    return m


@pytest.mark.parametrize("meta, needle", [
    ({}, "missing 'step'; missing 'model_config'; missing 'loop_state'; missing 'rng'; missing 'dataloader_states'"),
    (_without("loop_state"), "missing 'loop_state'"),
    ({**resume_meta(4), "step": "abc"}, "'step' is 'abc', expected an integer >= 0"),
    ({**resume_meta(4), "rng": {"cpu": "%%%not base64"}}, "'rng'.'cpu' is not valid base64"),
    ({**resume_meta(4), "rng": {"cpu": "AAEC"}}, "'rng'.'cpu' decodes to 3 bytes"),
    ({**resume_meta(4), "model_config": [2, 4]}, "'model_config' is a list, expected a non-empty object"),
    ({**resume_meta(4), "loop_state": {**resume_meta(4)["loop_state"], "smooth_loss": "x"}},
     "'loop_state'.'smooth_loss' is 'x', expected a number"),
    ({**resume_meta(4), "loop_state": {"step": 1.5}}, "'loop_state'.'step' is 1.5, expected an integer >= 0"),
    ({**resume_meta(4), "dataloader_states": {"0": 1}}, "'dataloader_states' is an object, expected a list"),
    ({**resume_meta(4), "ema": [1]}, "'ema' is a list, expected an object or null"),
    ({**resume_meta(4), "nonfinite_streak": -1}, "'nonfinite_streak' is -1, expected an integer >= 0"),
    ({**resume_meta(4), "step": 5}, "'step' is 5, but the directory is step 4"),
    ([1, 2], "the file holds a list, expected an object"),
])
def test_damaged_meta_is_one_line_naming_file_and_field(tmp_path, meta, needle):
    d = tmp_path / "ckpt"
    _save(d, 4)
    path = _rewrite_meta(d, 4, meta)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(d, 4, "cpu")
    msg = str(ei.value)
    assert msg.startswith(f"{path}: damaged checkpoint metadata: ") and needle in msg and "\n" not in msg


def test_meta_tolerates_new_keys_and_generation_needs_only_the_model_config(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 4)
    _rewrite_meta(d, 4, {**resume_meta(4), "schedule": {"name": "full_update"}, "loop": {"x": 1}, "new": [1]})
    assert load_checkpoint(d, 4, "cpu")[2]["loop"] == {"x": 1}
    _rewrite_meta(d, 4, {"model_config": {"n_layer": 2}})
    load_checkpoint(d, 4, "cpu", load_optimizer=False)   # eval/generation: the resume keys are not needed
    with pytest.raises(CheckpointError, match="missing 'loop_state'"):
        load_checkpoint(d, 4, "cpu")
    with pytest.raises(CheckpointError, match="missing 'model_config'"):
        ck.validate_meta({"step": 1}, "m.json", required=("model_config",))
    ck.validate_meta(resume_meta(4), "m.json")


@pytest.mark.parametrize("name, obj, needle", [
    ("model.pt", torch.zeros(3), "holds Tensor, expected a dict of parameter name -> tensor"),
    ("model.pt", {"w": [1, 2]}, "entry 'w' is a list, expected a tensor"),
    ("optim_rank0.pt", [1, 2], "holds a list, expected an optimizer state_dict"),
    ("optim_rank0.pt", {"state": {}}, "'param_groups' is missing, expected a list"),
])
def test_state_files_of_the_wrong_kind_are_named(tmp_path, name, obj, needle):
    d = tmp_path / "ckpt"
    _save(d, 4)
    path = d / "step_000004" / name
    torch.save(obj, path)
    _rehash(d, 4, name)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(d, 4, "cpu")
    assert str(ei.value).startswith(f"{path}: ") and needle in str(ei.value)


# ---------------------------------------------------------------------------------------------
# the directory lock

_HOLDER = textwrap.dedent("""
    import sys
    from nanochat.checkpoint import CheckpointError, lock_checkpoint_dir
    try:
        lock = lock_checkpoint_dir(sys.argv[1])
    except CheckpointError as e:
        print("ERROR", e, flush=True)
        sys.exit(1)
    print("LOCKED", flush=True)
    if sys.argv[2] == "hold":
        sys.stdin.read()   # hold until the test closes stdin
""")


def _locker(d, mode):
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(d), mode], cwd=ck.__file__.rsplit("/nanochat/", 1)[0],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(ck.fcntl is None, reason="no flock on this platform")
def test_a_second_run_on_the_same_dir_is_refused_with_the_holders_pid(tmp_path):
    d = tmp_path / "ckpt"
    holder = _locker(d, "hold")
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        second = _locker(d, "try")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 1
        assert out.strip() == (f"ERROR checkpoint dir {d} is in use by another run (pid {holder.pid}); "
                               f"wait for it to finish, stop it, or use another model tag")
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            ck.lock_checkpoint_dir(d)   # this process too
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (d / ".lock").exists()   # released at exit, file removed
    lock = ck.lock_checkpoint_dir(d)
    try:
        assert lock.held and (d / ".lock").read_text().strip() == str(os.getpid())
        assert ck.lock_checkpoint_dir(str(d)) is lock   # the holding process may ask again
        other = _locker(d, "try")
        assert other.communicate(timeout=60)[0].startswith(f"ERROR checkpoint dir {d} is in use by another run "
                                                           f"(pid {os.getpid()})")
    finally:
        lock.release()
    assert not (d / ".lock").exists()
    lock.release()   # idempotent


@pytest.mark.skipif(ck.fcntl is None, reason="no flock on this platform")
def test_a_killed_holder_leaves_the_dir_free(tmp_path):
    d = tmp_path / "ckpt"
    holder = _locker(d, "hold")
    assert holder.stdout.readline().strip() == "LOCKED"
    holder.kill()
    holder.wait()
    holder.stdin.close()
    holder.stdout.close()
    assert (d / ".lock").exists()   # the stale file stays, its flock is gone
    with ck.lock_checkpoint_dir(d) as lock:
        assert lock.held
    assert not (d / ".lock").exists()


def test_no_flock_means_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "fcntl", None)
    lock = ck.lock_checkpoint_dir(tmp_path / "ckpt")
    assert not lock.held
    lock.release()


def test_lock_and_saves_share_the_dir(tmp_path):
    d = tmp_path / "ckpt"
    with ck.lock_checkpoint_dir(d):
        for s in (1, 2, 3):
            _save(d, s, keep_last_k=2)
        assert sorted(os.listdir(d)) == [".lock", "step_000002", "step_000003"]


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("tag", ["d12", "my.run_2-b", "..x", None, ""])
def test_plain_model_tags_pass(tag):
    assert ck.model_tag_problem(tag) is None


@pytest.mark.parametrize("tag", ["..", ".", "../..", "/abs/path", "a/b", "a\\b", "sp ace", "d12\n"])
def test_path_like_model_tags_are_refused(tag):
    assert "must be a plain directory name" in ck.model_tag_problem(tag)


def test_format_mismatch():
    lines = [f"line {i}" for i in range(10)]
    assert ck.format_mismatch(lines[:2]) == "line 0; line 1"
    assert ck.format_mismatch(lines, limit=3) == "line 0; line 1; line 2; ... and 7 more"
