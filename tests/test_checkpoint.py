"""Checkpoint save/load: round trip, crash atomicity, retention, safe loading, resume reports."""
import json
import os
import pickle
import shlex
import sys
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


def _meta(step):
    return {"step": step, "args": {"depth": 2, "run": "dummy"}, "model_config": {"n_layer": 2, "n_embd": 4},
            "loop": {"smooth_loss": 3.25, "total_time": 12.5}, "dataloader": {"shard": 0, "row": 17},
            "rng": {"python": [3, [1, 2, 3], None], "torch_cpu_b64": "AAEC"}}


def _save(d, step, seed=0, **kw):
    return save_checkpoint(d, step, _model_state(seed), _optim_state(seed), _meta(step), **kw)


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
    assert meta == _meta(12)
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
    save_checkpoint(tmp_path, 1, net.state_dict(), opt.state_dict(), {"step": 1})
    model, optim, _ = load_checkpoint(tmp_path, 1, "cpu")
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3, betas=(0.8, 0.95))
    net2.load_state_dict(model)
    opt2.load_state_dict(optim)
    _assert_equal(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save(d, 10, seed=1)
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated crash"):
        _save(d, 20, seed=2)
    monkeypatch.undo()
    assert os.path.isdir(d / ".tmp_step_000020")  # the partial save is left behind, like a real kill
    assert find_complete_steps(d) == [10] and latest_complete_step(d) == 10
    assert resolve_resume_step(d, "latest") == 10
    model, _, meta = load_checkpoint(d, 10, "cpu")
    _assert_equal(model, _model_state(1))
    assert meta["step"] == 10
    # A later successful save (another step) cleans up the stale temp dir.
    _save(d, 30, seed=3)
    assert find_complete_steps(d) == [10, 30]
    assert not [n for n in os.listdir(d) if n.startswith(".")]


def test_crash_in_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    _save(d, 10, seed=1)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated crash in rename")))
    with pytest.raises(OSError, match="simulated crash"):
        _save(d, 20, seed=2)
    monkeypatch.undo()
    assert find_complete_steps(d) == [10]
    # the temp dir of the crashed save even holds DONE, yet is not a checkpoint
    assert os.path.isfile(d / ".tmp_step_000020" / "DONE")


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
    with pytest.raises(OSError, match="simulated crash"):
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


@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 0.5, 0.9])
def test_truncated_model_file(tmp_path, keep_fraction):
    d = tmp_path / "ckpt"
    _save(d, 3)
    path = d / "step_000003" / "model.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match=r"model\.pt") as ei:
        load_checkpoint(d, 3, "cpu")
    assert str(path) in str(ei.value)


def test_garbage_model_file(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 3)
    path = d / "step_000003" / "model.pt"
    path.write_bytes(b"not a checkpoint at all " * 10)
    with pytest.raises(CheckpointError, match=r"(corrupt|not a plain tensor checkpoint)") as ei:
        load_checkpoint(d, 3, "cpu")
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_truncated_optimizer_and_meta_files(tmp_path):
    d = tmp_path / "ckpt"
    _save(d, 3)
    opt = d / "step_000003" / "optim_rank0.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated .*optim_rank0\.pt"):
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
                            _meta(4) if rank == 0 else None, rank=rank, world_size=world, barrier=barrier,
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
        save_checkpoint(d, 5, _model_state(), _optim_state(), _meta(5), rank=0, world_size=2)


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
