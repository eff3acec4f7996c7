"""Unit tests of nanochat/debug.py: non-finite detection and policy, spike detector, per-phase
memory probe (CPU behaviour), graceful stop, fault-injection parsing. All CPU, all fast."""
import json
import os
import signal

import pytest
import torch

from nanochat.debug import (GracefulStop, LossSpikeDetector, NonFiniteGuard, PhaseMemory, fault_injection_from_env,
                            format_names, nonfinite_tensors)
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import MuonAdamW


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model


# ---------------------------------------------------------------------------------------------
# nonfinite_tensors


def test_all_finite_is_empty():
    assert nonfinite_tensors([("a", torch.randn(3, 4)), ("b", torch.randn(5, dtype=torch.bfloat16))]) == []
    assert nonfinite_tensors([]) == []


def test_names_nan_and_inf_with_counts():
    a, b, c = torch.randn(2, 3), torch.randn(4), torch.randn(5, dtype=torch.bfloat16)
    b[1] = float("nan")
    c[0], c[3] = float("inf"), float("-inf")
    bad = nonfinite_tensors([("a", a), ("b", b), ("c", c)])
    assert bad == ["b (shape 4: 1 NaN, 0 Inf of 4)", "c (shape 5: 0 NaN, 2 Inf of 5)"]


def test_huge_but_finite_values_are_not_reported():
    """Their fp32 L2 norm overflows to inf; the exact check on the slow path clears them."""
    assert nonfinite_tensors([("big", torch.full((16,), 1e30))]) == []


def test_none_and_integer_tensors_are_ignored():
    assert nonfinite_tensors([("none", None), ("ints", torch.arange(4)), ("empty", torch.empty(0))]) == []


def test_format_names_truncates():
    assert format_names(["a", "b", "c"], 2) == "a; b; ... and 1 more"
    assert format_names(["a"], 5) == "a"


# ---------------------------------------------------------------------------------------------
# NonFiniteGuard


def test_guard_passes_finite_steps_and_reports_nan_loss():
    model = tiny_model()
    guard = NonFiniteGuard(model.named_parameters())
    assert guard.check_before_step(1.5) is None
    assert guard.check_before_step(float("nan")).startswith("non-finite loss (nan)")
    assert guard.check_after_step() is None  # without --debug-nan the parameters are not checked


def test_guard_debug_nan_names_the_poisoned_parameter_and_gradients():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    guard = NonFiniteGuard(model.named_parameters(), debug_nan=True, max_names=2)
    msg = guard.check_before_step(float("nan"))
    assert "param lm_head.weight (shape 64x32: 1 NaN" in msg
    assert msg.index("param lm_head.weight") < msg.index("grad ")  # parameters first: they are the cause
    assert "... and" in msg  # capped at max_names
    assert "param lm_head.weight" in guard.check_after_step()


def test_guard_debug_nan_catches_nonfinite_gradients_with_a_finite_loss():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    guard = NonFiniteGuard(model.named_parameters(), debug_nan=True)
    assert guard.check_before_step(3.0) is None
    model.transformer.h[1].mlp.c_fc.weight.grad[0, 0] = float("inf")
    msg = guard.check_before_step(3.0)
    assert msg.startswith("non-finite gradients") and "grad transformer.h.1.mlp.c_fc.weight" in msg


def test_guard_skip_policy_counts_consecutive_bad_steps():
    guard = NonFiniteGuard([], max_skips=2)
    assert guard.on_bad_step() and guard.on_bad_step()
    assert not guard.on_bad_step()  # the third in a row stops the run
    guard = NonFiniteGuard([], max_skips=2)
    assert guard.on_bad_step()
    guard.on_good_step()
    assert guard.on_bad_step() and guard.on_bad_step() and guard.skipped == 3
    assert not NonFiniteGuard([], max_skips=-1).on_bad_step()  # default: stop at the first


def test_injected_nan_never_reaches_the_optimizer():
    """The loop's contract in miniature: a NaN loss -> skip -> weights and optimizer state unchanged."""
    model = tiny_model()
    opt = MuonAdamW(model.param_groups(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.02, scalar_lr=0.1,
                                       weight_decay=0.0))
    guard = NonFiniteGuard(model.named_parameters(), debug_nan=True, max_skips=1)
    idx = torch.randint(0, 64, (2, 16))
    for factor in (1.0, float("nan")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt_before = [v.clone() for s in opt.state.values() for v in s.values()]
        loss = model(idx, idx) * factor
        loss.backward()
        if guard.check_before_step(loss.item()) is None:
            guard.on_good_step()
            opt.step()
            changed = True
        else:
            assert guard.on_bad_step()
            changed = False
        model.zero_grad(set_to_none=True)
        same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert same != changed
    opt_after = [v for s in opt.state.values() for v in s.values()]
    assert len(opt_after) == len(opt_before) > 0  # the good step made optimizer state ...
    assert all(torch.equal(a, b) for a, b in zip(opt_before, opt_after))  # ... the NaN step left it alone


# ---------------------------------------------------------------------------------------------
# LossSpikeDetector


def noisy(n, base=3.0):
    g = torch.Generator().manual_seed(0)
    return [base + 0.05 * float(torch.randn((), generator=g)) for _ in range(n)]


def test_spike_detector_ignores_noise_and_acts_on_a_spike():
    det = LossSpikeDetector(window=20, zscore=6, factor=0.5)
    assert all(det.update(i, v) is None for i, v in enumerate(noisy(100)))
    assert det.lr_scale == 1.0
    line = det.update(100, 6.0)
    assert "loss spike" in line and "LR scale now x0.5" in line and det.reductions == 1
    assert 6.0 not in det.history  # spikes stay out of the window
    assert det.update(101, 6.0) is not None and det.lr_scale == 0.25  # so the next spike is seen too


def test_spike_detector_waits_for_a_full_window_and_caps_reductions():
    det = LossSpikeDetector(window=10, zscore=6, factor=0.5, max_reductions=2)
    assert det.update(0, 3.0) is None and det.update(1, 100.0) is None  # window not full yet
    det = LossSpikeDetector(window=10, zscore=6, factor=0.5, max_reductions=2)
    for i, v in enumerate(noisy(10)):
        det.update(i, v)
    det.update(10, 50.0), det.update(11, 50.0)
    line = det.update(12, 50.0)
    assert "LR left at x0.25" in line and det.lr_scale == 0.25 and det.spikes == 3
    assert det.update(13, float("nan")) is None  # non-finite losses belong to the NaN guard


def test_spike_detector_state_round_trips_through_json():
    det = LossSpikeDetector(window=5)
    for i, v in enumerate(noisy(5) + [9.0]):
        det.update(i, v)
    other = LossSpikeDetector(window=5)
    other.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert other.state_dict() == det.state_dict()
    assert other.update(6, 3.01) == det.update(6, 3.01)


def test_spike_detector_rejects_bad_settings():
    for kw in (dict(window=1), dict(zscore=0), dict(factor=1.0), dict(max_reductions=0)):
        with pytest.raises(ValueError):
            LossSpikeDetector(**kw)


# ---------------------------------------------------------------------------------------------
# PhaseMemory, GracefulStop, fault injection


def test_phase_memory_is_cuda_only_and_says_so():
    assert "CUDA-only" in PhaseMemory.unavailable_message(5, "cpu")
    assert PhaseMemory.unavailable_message(-1, "cpu") is None
    assert PhaseMemory.unavailable_message(5, "cuda") is None
    probe = PhaseMemory(1, "cpu")
    probe.start(0)
    probe.end("forward")
    assert probe.report() is None and probe.step_peak() == 0


@pytest.mark.gpu
def test_phase_memory_reports_each_phase_on_cuda():
    probe = PhaseMemory(2, "cuda")
    probe.start(1)
    assert probe.report() is None  # not an armed step
    probe.start(2)
    x = torch.randn(1024, 1024, device="cuda")
    probe.end("forward")
    y = x @ x
    probe.end("backward")
    del x, y
    probe.end("optimizer")
    line = probe.report()
    assert "forward peak" in line and "backward peak" in line and "optimizer peak" in line
    assert probe.peaks["backward"] >= probe.peaks["forward"] > 0


def test_graceful_stop_sets_a_flag_then_a_second_signal_goes_through():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        stop = GracefulStop(signals=(signal.SIGUSR1,)).install()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1" and seen == []
        os.kill(os.getpid(), signal.SIGUSR1)  # second: the previous handler is back and gets it
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_fault_injection_env_parsing():
    assert fault_injection_from_env({}) == {}
    got = fault_injection_from_env({"NANOCHAT_FAULT_INJECT": "3:nan, 9:50"})
    assert set(got) == {3, 9} and got[9] == 50.0 and got[3] != got[3]
    with pytest.raises(ValueError, match="NANOCHAT_FAULT_INJECT"):
        fault_injection_from_env({"NANOCHAT_FAULT_INJECT": "3"})
