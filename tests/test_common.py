"""nanochat.common.ScalarReader: the loss read that does not wait for the optimizer."""
import pytest
import torch

from nanochat.common import ScalarReader


def test_reads_the_value_at_start_on_cpu():
    r = ScalarReader("cpu")
    t = torch.tensor(2.5)
    r.start(t)
    t.add_(1.0)  # later work does not change what was read
    assert r.result() == 2.5
    r.start(torch.tensor(float("nan")))
    assert r.result() != r.result()  # NaN comes through as NaN


@pytest.mark.gpu
def test_result_does_not_wait_for_work_queued_after_start():
    r = ScalarReader("cuda")
    t = torch.tensor(3.25, device="cuda")
    torch.cuda._sleep(1000)  # load the kernel now: lazy module loading can synchronize the device
    r.start(t)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued behind the read
    after = torch.cuda.Event()
    after.record()
    assert r.result() == 3.25
    assert not after.query()  # the host got the value while the long kernel still ran
    torch.cuda.synchronize()


def test_step_time_stats_median_and_slow_steps():
    from nanochat.common import step_time_stats
    assert step_time_stats([], 1000) is None
    times = [0.065] * 20 + [0.095, 0.090]  # two stalls, as seen on the H100
    s = step_time_stats(times, 32768)
    assert s["median_step_sec"] == 0.065 and abs(s["median_tok_per_sec"] - 32768 / 0.065) < 1e-6
    assert s["slow_steps"] == 2 and abs(s["slow_excess_sec"] - 0.055) < 1e-12
    assert step_time_stats([0.065] * 5, 1)["slow_steps"] == 0
