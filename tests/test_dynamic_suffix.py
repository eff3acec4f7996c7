"""Dynamic-suffix controller: schedule, relevance formulas, host-sync discipline, suffix choice
(that it MOVES with relevance, unlike the seed system's), cap/floor accounting, state round trip."""
import argparse
import json
import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.dynamic_suffix import (
    DynamicSuffixConfig,
    DynamicSuffixController,
    STEP_KINDS,
    block_relevance_scores,
    predicted_step_cost,
    prefix_mask,
)


def make(n_layer=12, num_iterations=1000, **kw):
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("freeze_start_step", 0)
    kw.setdefault("ema_decay", 0.0)
    return DynamicSuffixController(DynamicSuffixConfig(**kw), n_layer, num_iterations)


def measure(ctl, step, scores):
    """Simulate a full step's measurement (the trainer's block_scores + update)."""
    assert ctl.is_full_step(step), ctl.step_kind(step)
    ctl.update(step, torch.as_tensor(scores, dtype=torch.float32))


# ------------------------------------------------------------------ schedule

def test_step_kinds_warmup_pre_freeze_probe_refresh():
    ctl = make(num_iterations=200, warmup_steps=5, freeze_start_step=10, probe_every=7, refresh_every=20)
    assert ctl.freeze_start == 10
    assert [ctl.step_kind(s) for s in range(5)] == ["warmup"] * 5
    assert [ctl.step_kind(s) for s in range(5, 10)] == ["pre_freeze"] * 5
    # no relevance measured yet: every step is a full (probe) step
    assert ctl.step_kind(11) == "probe" and ctl.active_start(11, record=False) == 0
    measure(ctl, 10, [1.0] * 12)
    assert ctl.step_kind(11) == "suffix"
    assert ctl.step_kind(14) == "probe"
    assert ctl.step_kind(20) == "refresh"
    assert ctl.step_kind(21) == "probe"
    assert ctl.step_kind(40) == "refresh"
    assert ctl.step_kind(140) == "refresh"  # both periods: refresh is reported
    for s in range(200):
        k = ctl.step_kind(s)
        assert k in STEP_KINDS
        assert ctl.is_full_step(s) == (k != "suffix")
        if k != "suffix":
            assert ctl.active_start(s, record=False) == 0
        else:
            assert ctl.active_start(s, record=False) == ctl.chosen_active_start


def test_freeze_start_fraction_and_at_least_warmup():
    ctl = make(num_iterations=100, warmup_steps=3, freeze_start_step=-1, freeze_start_frac=0.25)
    assert ctl.freeze_start == 25
    assert ctl.step_kind(24) == "pre_freeze"
    ctl = make(num_iterations=100, warmup_steps=40, freeze_start_step=-1, freeze_start_frac=0.25)
    assert ctl.freeze_start == 40
    assert ctl.step_kind(39) == "warmup"
    ctl = make(num_iterations=100, warmup_steps=40, freeze_start_step=10)
    assert ctl.freeze_start == 40
    ctl = make(num_iterations=100, warmup_steps=0, freeze_start_step=-1, freeze_start_frac=0.0)
    assert ctl.freeze_start == 0


def test_disabled_periods():
    ctl = make(probe_every=0, refresh_every=-1)
    measure(ctl, 0, [1.0] * 12)
    assert all(ctl.step_kind(s) == "suffix" for s in range(1, 500))
    ctl = make(probe_every=0, refresh_every=10)
    measure(ctl, 0, [1.0] * 12)
    assert [s for s in range(1, 50) if ctl.is_full_step(s)] == [10, 20, 30, 40]


def test_freeze_start_past_horizon_warns():
    ctl = make(num_iterations=10, warmup_steps=20)
    assert ctl.stats()["n_warnings"] == 1
    assert "every step is a full update" in ctl.pop_warnings()[0]


# ------------------------------------------------------------------ the selector moves

TOP = [0.01] * 10 + [1.0, 1.0]       # top 2 blocks hold 0.952 of the relevance
UNIFORM = [1.0] * 12                 # 0.9 * 12 = 10.8 -> 11 blocks
BOTTOM = [10.0] + [0.01] * 11        # only the full model reaches 0.9


def test_selector_moves_with_relevance():
    ctl = make(relevance_threshold=0.9, probe_every=1)
    measure(ctl, 0, TOP)
    assert ctl.n_active_chosen == 2 and ctl.chosen_active_start == 10
    measure(ctl, 1, UNIFORM)
    assert ctl.n_active_chosen == 11 and ctl.chosen_active_start == 1
    measure(ctl, 2, BOTTOM)
    assert ctl.n_active_chosen == 12 and ctl.chosen_active_start == 0
    measure(ctl, 3, TOP)
    assert ctl.n_active_chosen == 2
    # a middle case: relevance concentrated in the top 5 blocks
    measure(ctl, 4, [0.0] * 7 + [1.0] * 5)
    assert ctl.n_active_chosen == 5
    # no clamping happened in any of these choices
    assert ctl.stats()["choices_cap_bound"] == 0 and ctl.stats()["choices_floor_bound"] == 0


def test_selector_moves_with_ema_smoothing():
    """With an EMA the choice moves gradually and monotonically from few layers to many."""
    ctl = make(ema_decay=0.95, probe_every=1)
    measure(ctl, 0, TOP)
    seq = [ctl.n_active_chosen]
    for s in range(1, 200):
        measure(ctl, s, UNIFORM)
        seq.append(ctl.n_active_chosen)
    assert seq[0] == 2 and seq[-1] == 11
    assert seq == sorted(seq) and len(set(seq)) >= 3


def test_threshold_one_and_exact_boundaries():
    ctl = make(relevance_threshold=1.0)
    measure(ctl, 0, [0.0] * 9 + [1.0, 1.0, 1.0])
    assert ctl.n_active_chosen == 3  # the zero-relevance bottom 9 are not needed for 100 %
    ctl = make(n_layer=4, relevance_threshold=0.5)
    measure(ctl, 0, [0.25, 0.25, 0.25, 0.25])
    assert ctl.n_active_chosen == 2  # cumulative 0.5 exactly reaches 0.5


def test_cap_and_floor_binding_are_counted():
    ctl = make(max_active_layers=3, probe_every=10, refresh_every=0)
    measure(ctl, 0, UNIFORM)  # threshold alone wants 11
    assert ctl.n_active_chosen == 3 and ctl.n_threshold_choice == 11 and ctl.choice_cap_bound
    for s in range(0, 10):
        ctl.active_start(s)
    measure(ctl, 10, TOP)  # threshold wants 2: cap does not bind
    assert ctl.n_active_chosen == 2 and not ctl.choice_cap_bound
    for s in range(10, 20):
        ctl.active_start(s)
    st = ctl.stats()
    assert st["suffix_steps"] == 18 and st["full_steps"]["probe"] == 2
    assert st["suffix_cap_bound"] == 9 and st["suffix_floor_bound"] == 0
    assert st["suffix_cap_bound_frac"] == pytest.approx(0.5)
    assert st["suffix_n_active_hist"] == {"2": 9, "3": 9}
    assert st["mean_active_layers_suffix"] == pytest.approx(2.5)
    assert st["mean_active_layers_all"] == pytest.approx((9 * 3 + 9 * 2 + 2 * 12) / 20)
    assert st["predicted_cost_mean"] == pytest.approx(
        (9 * predicted_step_cost(3, 12) + 9 * predicted_step_cost(2, 12) + 2) / 20)
    json.dumps(st)

    ctl = make(min_active_layers=4)
    measure(ctl, 0, TOP)
    assert ctl.n_active_chosen == 4 and ctl.n_threshold_choice == 2 and ctl.choice_floor_bound
    for s in range(1, 6):
        ctl.active_start(s)
    st = ctl.stats()
    assert st["suffix_floor_bound"] == 5 and st["suffix_cap_bound"] == 0


def test_active_start_records_each_step_once():
    ctl = make()
    measure(ctl, 0, TOP)
    for _ in range(3):
        assert ctl.active_start(0) == 0
        assert ctl.active_start(1) == 10
    assert ctl.active_start(1, record=False) == 10
    st = ctl.stats()
    assert st["steps"] == 2 and st["suffix_steps"] == 1 and st["full_steps"]["refresh"] == 1


# ------------------------------------------------------------------ relevance formulas

def _tiny_blocks():
    a = torch.tensor([3.0, 4.0], requires_grad=True)
    b = torch.tensor([12.0], requires_grad=True)
    a.grad = torch.tensor([0.0, 2.0])
    b.grad = torch.tensor([1.5])
    c = torch.tensor([[-2.0, 1.0]], requires_grad=True)  # grad None
    d = torch.tensor([2.0], requires_grad=True)
    d.grad = torch.tensor([-3.0])
    e = torch.tensor([5.0], requires_grad=True)           # whole block without grads
    return [[a, b], [c, d], [e], []]


def test_grad_ratio_formula():
    scores = block_relevance_scores(_tiny_blocks(), "grad_ratio", eps=1e-8)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    # block 0: ||g|| = sqrt(0 + 4 + 2.25) = 2.5, ||W|| = sqrt(9 + 16 + 144) = 13
    # block 1: ||g|| = 3 (c has no grad = zero), ||W|| = sqrt(4 + 1 + 4) = 3
    expect = [2.5 / (13 + 1e-8), 3.0 / (3.0 + 1e-8), 0.0, 0.0]
    assert scores.tolist() == pytest.approx(expect, rel=1e-6)
    eps_big = block_relevance_scores(_tiny_blocks(), "grad_ratio", eps=1.0)
    assert eps_big.tolist() == pytest.approx([2.5 / 14, 3.0 / 4, 0.0, 0.0], rel=1e-6)


def test_saliency_formula():
    scores = block_relevance_scores(_tiny_blocks(), "saliency_abs_gp")
    # block 0: |3*0| + |4*2| + |12*1.5| = 26; block 1: c no grad, |2*-3| = 6
    assert scores.tolist() == pytest.approx([26.0, 6.0, 0.0, 0.0], rel=1e-6)


def test_mixed_dtypes_score_in_fp32():
    w = torch.tensor([3.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    w.grad = torch.tensor([0.5, 0.0], dtype=torch.bfloat16)
    v = torch.tensor([12.0], requires_grad=True)
    v.grad = torch.tensor([1.0])
    r = block_relevance_scores([[w, v]], "grad_ratio")
    s = block_relevance_scores([[w, v]], "saliency_abs_gp")
    assert r.dtype == s.dtype == torch.float32
    assert r.tolist() == pytest.approx([math.sqrt(1.25) / 13], rel=1e-3)
    assert s.tolist() == pytest.approx([13.5], rel=1e-3)


def test_controller_block_scores_uses_config_metric():
    ctl = make(n_layer=4, relevance_metric="saliency_abs_gp")
    assert ctl.block_scores(_tiny_blocks()).tolist() == pytest.approx([26.0, 6.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="n_layer=4"):
        ctl.block_scores(_tiny_blocks()[:3])


def test_scores_from_a_real_backward_and_the_freed_grads_bug():
    """Scores read before zero_grad are positive; read after (the seed system's bug) they are all
    zero, and the controller then trains the full model and says why."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
    x = torch.randn(4, 8)
    for blk in blocks:
        x = torch.tanh(blk(x))
    x.square().mean().backward()
    params = [list(b.parameters()) for b in blocks]
    ctl = make(n_layer=3, probe_every=1)
    for metric in ("grad_ratio", "saliency_abs_gp"):
        assert (block_relevance_scores(params, metric) > 0).all()
    measure(ctl, 0, ctl.block_scores(params))
    assert ctl.pop_warnings() == []
    blocks.zero_grad(set_to_none=True)
    measure(ctl, 1, ctl.block_scores(params))  # all zero
    ctl2 = make(n_layer=3)
    measure(ctl2, 0, ctl2.block_scores(params))
    assert ctl2.n_active_chosen == 3 and ctl2.chosen_active_start == 0
    w = ctl2.pop_warnings()
    assert len(w) == 1 and "all-zero" in w[0] and "zero_grad" in w[0]


# ------------------------------------------------------------------ host syncs

_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


class _CountLocalScalar(TorchDispatchMode):
    """Counts aten._local_scalar_dense, the op behind every .item()-style device->host read."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("metric", ["grad_ratio", "saliency_abs_gp"])
def test_block_scores_does_no_host_sync(monkeypatch, metric):
    blocks = _tiny_blocks()
    ctl = make(n_layer=4, relevance_metric=metric)

    def boom(*a, **k):
        raise AssertionError("host sync inside block_scores")

    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, boom)
    with _CountLocalScalar() as mode:
        out = ctl.block_scores(blocks)
    monkeypatch.undo()
    assert mode.n == 0
    assert isinstance(out, torch.Tensor) and out.shape == (4,) and out.dtype == torch.float32


@pytest.mark.parametrize("metric", ["grad_ratio", "saliency_abs_gp"])
def test_block_scores_runs_on_meta_tensors(metric):
    """Meta tensors have no data: any data-dependent host read would fail here."""
    blocks = []
    for _ in range(3):
        ps = []
        for shape in [(4, 4), (4,)]:
            p = torch.nn.Parameter(torch.empty(shape, device="meta"))
            p.grad = torch.empty(shape, device="meta")
            ps.append(p)
        blocks.append(ps)
    out = block_relevance_scores(blocks, metric)
    assert out.device.type == "meta" and out.shape == (3,) and out.dtype == torch.float32


def test_update_does_exactly_one_host_transfer(monkeypatch):
    ctl = make(n_layer=4, probe_every=1)
    scores = block_relevance_scores(_tiny_blocks(), "grad_ratio") + 0.1
    calls = []
    for name in _SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with _CountLocalScalar() as mode:
        ctl.update(0, scores)
        ctl.update(1, scores)
    monkeypatch.undo()
    assert calls == ["tolist", "tolist"], calls
    assert mode.n == 0
    assert ctl.n_measurements == 2


def test_update_refuses_suffix_steps():
    ctl = make()
    measure(ctl, 0, TOP)
    assert ctl.step_kind(1) == "suffix"
    with pytest.raises(ValueError, match="suffix step"):
        ctl.update(1, torch.ones(12))
    with pytest.raises(ValueError, match="expected n_layer=12"):
        ctl.update(0, torch.ones(11))


# ------------------------------------------------------------------ non-finite relevance

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_relevance_trains_full_model_and_keeps_ema(bad):
    ctl = make(ema_decay=0.5, probe_every=1)
    measure(ctl, 0, TOP)
    ema_before = list(ctl.ema)
    assert ctl.n_active_chosen == 2
    measure(ctl, 1, [1.0] * 11 + [bad])
    assert ctl.ema == ema_before  # not poisoned
    assert ctl.n_active_chosen == 12 and ctl.step_kind(2) == "probe"
    assert ctl.chosen_active_start == 0
    w = ctl.pop_warnings()
    assert len(w) == 1 and "non-finite" in w[0]
    st = ctl.stats()
    assert st["invalid_measurements"] == 1
    json.dumps(st, allow_nan=False)  # strict JSON: the bad values are stored as null
    blob = json.loads(json.dumps(ctl.state_dict(), allow_nan=False))
    again = make(ema_decay=0.5, probe_every=1)
    again.load_state_dict(blob)
    assert again.n_active_chosen == 12 and again.ema == ctl.ema
    measure(ctl, 2, TOP)  # a valid measurement restores the choice
    assert ctl.n_active_chosen == 2


def test_non_finite_first_measurement_keeps_steps_full():
    ctl = make()
    measure(ctl, 0, [float("nan")] * 12)
    assert not ctl.has_relevance
    assert ctl.step_kind(1) == "probe" and ctl.active_start(1) == 0


# ------------------------------------------------------------------ checkpoint state

def _scores_for(step):
    """Deterministic per-step relevance whose mass sits in a varying number of top blocks."""
    rng = random.Random(step)
    top = rng.randint(1, 12)
    return [rng.random() * (5.0 if i >= 12 - top else 0.2) for i in range(12)]


def _drive(ctl, steps):
    """A scripted training loop; returns the per-step decisions."""
    out = []
    for step in steps:
        a = ctl.active_start(step)
        kind = ctl.step_kind(step)
        if ctl.is_full_step(step):
            ctl.update(step, torch.tensor(_scores_for(step)))
        out.append((step, kind, a, ctl.n_active_chosen))
        ctl.log_line(step)
    return out


RESUME_CFG = dict(warmup_steps=3, freeze_start_step=5, probe_every=4, refresh_every=10,
                  ema_decay=0.7, max_active_layers=9, min_active_layers=2)


def test_state_dict_json_round_trip_resumes_exactly():
    straight = make(num_iterations=60, **RESUME_CFG)
    full_run = _drive(straight, range(0, 60))
    assert len({a for _, k, a, _ in full_run if k == "suffix"}) >= 2  # choices really varied

    for cut in (17, 30, 33):  # cut after a full step and after suffix steps
        first = make(num_iterations=60, **RESUME_CFG)
        part1 = _drive(first, range(0, cut))
        blob = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        resumed = make(num_iterations=60, **RESUME_CFG)
        resumed.load_state_dict(blob)
        assert resumed.state_dict() == first.state_dict()
        assert resumed.stats() == first.stats()
        part2 = _drive(resumed, range(cut, 60))
        assert part1 + part2 == full_run
        assert resumed.stats() == straight.stats()
        assert resumed.state_dict() == straight.state_dict()


def test_load_state_dict_rejects_other_depth():
    a = make(n_layer=12)
    b = make(n_layer=6)
    with pytest.raises(ValueError, match="n_layer=12"):
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))


# ------------------------------------------------------------------ logging

def test_log_line_period_and_content():
    ctl = make(log_every=5, max_active_layers=3)
    measure(ctl, 0, UNIFORM)
    for s in range(0, 11):
        ctl.active_start(s)
    assert ctl.log_line(3) is None
    line = ctl.log_line(10)
    assert line.startswith("dyn: step 10")
    assert "active 3/12 (start 9, threshold alone 11)" in line
    assert "cap bound 100% floor 0%" in line and "rel [" in line
    assert make(log_every=0).log_line(0) is None


# ------------------------------------------------------------------ validation

def test_validate_default_is_clean():
    assert DynamicSuffixConfig().validate(12) == []
    assert DynamicSuffixConfig(max_active_layers=12, min_active_layers=12).validate(12) == []


def test_validate_messages_name_the_flags():
    cfg = DynamicSuffixConfig(min_active_layers=5, max_active_layers=3)
    assert cfg.validate(12) == ["--dyn-min-active-layers (5) > --dyn-max-active-layers (3)"]
    cfg = DynamicSuffixConfig(min_active_layers=20)
    assert cfg.validate(12) == ["--dyn-min-active-layers (20) exceeds --depth (12)"]
    bad = DynamicSuffixConfig(relevance_threshold=0.0, relevance_metric="foo", min_active_layers=0,
                              max_active_layers=-1, freeze_start_step=-2, freeze_start_frac=1.0,
                              ema_decay=1.0, eps=0.0, warmup_steps=-3)
    problems = bad.validate(12)
    joined = "\n".join(problems)
    for flag in ("--dyn-relevance-threshold (0.0)", "--dyn-relevance-metric ('foo')",
                 "--dyn-min-active-layers (0)", "--dyn-max-active-layers (-1)",
                 "--dyn-freeze-start-step (-2)", "--dyn-freeze-start-frac (1.0)",
                 "--dyn-ema-decay (1.0)", "--dyn-eps (0.0)", "--dyn-warmup-steps (-3)"):
        assert flag in joined, (flag, problems)
    assert len(problems) == 9
    assert DynamicSuffixConfig(relevance_threshold=1.5).validate(12) == [
        "--dyn-relevance-threshold (1.5) must be in (0, 1]"]
    assert "--dyn-max-active-layers (16) exceeds --depth (12)" in \
        DynamicSuffixConfig(max_active_layers=16).validate(12)[0]
    assert "must be a finite number" in DynamicSuffixConfig(relevance_threshold=float("nan")).validate(12)[0]
    assert "must be an integer" in DynamicSuffixConfig(probe_every=2.5).validate(12)[0]


def test_constructor_reports_all_problems():
    with pytest.raises(ValueError) as ei:
        DynamicSuffixController(DynamicSuffixConfig(min_active_layers=20, ema_decay=2.0), 12, 100)
    msg = str(ei.value)
    assert "--dyn-min-active-layers (20)" in msg and "--dyn-ema-decay (2.0)" in msg


def test_from_args():
    ns = argparse.Namespace(dyn_warmup_steps=7, dyn_relevance_metric="saliency_abs_gp",
                            dyn_max_active_layers=4, unrelated=1)
    cfg = DynamicSuffixConfig.from_args(ns)
    assert cfg.warmup_steps == 7 and cfg.relevance_metric == "saliency_abs_gp"
    assert cfg.max_active_layers == 4 and cfg.probe_every == 25


# ------------------------------------------------------------------ helpers

def test_predicted_step_cost():
    assert predicted_step_cost(12, 12) == 1.0
    got = [predicted_step_cost(12 - f, 12) for f in (3, 6, 9)]
    assert got == pytest.approx([5 / 6, 2 / 3, 1 / 2])
    assert predicted_step_cost(0, 12) == pytest.approx(1 / 3)
    assert predicted_step_cost(6, 12, k=1.0) == pytest.approx(0.75)


def test_prefix_mask():
    assert prefix_mask(3, 5).tolist() == [True, True, True, False, False]
    assert prefix_mask(0, 3).tolist() == [False] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["grad_ratio", "saliency_abs_gp"])
def test_block_scores_no_sync_on_cuda(metric):
    """On a real GPU: block_scores runs under sync-debug mode 'error'; update syncs once."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(4)]).cuda().bfloat16()
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    for blk in blocks:
        x = torch.tanh(blk(x))
    x.float().square().mean().backward()
    params = [list(b.parameters()) for b in blocks]
    params[0][1].grad = None  # a missing grad too
    ctl = make(n_layer=4, relevance_metric=metric)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = ctl.block_scores(params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert scores.device.type == "cuda" and scores.dtype == torch.float32 and scores.shape == (4,)
    cpu_params = []
    for ps in params:
        cps = []
        for p in ps:
            q = p.detach().cpu().requires_grad_()
            q.grad = None if p.grad is None else p.grad.cpu()
            cps.append(q)
        cpu_params.append(cps)
    ref = block_relevance_scores(cpu_params, metric)
    assert scores.cpu().tolist() == pytest.approx(ref.tolist(), rel=1e-3)
    with pytest.warns(UserWarning, match="synchroniz") as rec:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ctl.update(0, scores)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in rec if "synchroniz" in str(w.message)]) == 1
    assert ctl.has_relevance and all(v > 0 for v in ctl.last_scores[1:])
