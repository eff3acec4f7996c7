"""nanochat.common: ScalarReader (the loss read that does not wait for the optimizer), step time
stats, init_wandb."""
import sys

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


@pytest.mark.gpu
def test_the_reads_events_time_the_device_work_between_loss_copies():
    """The step clock's marks (nanochat.train_state): the event each read records with its copy
    times the device work between two copies, whatever the host does meanwhile."""
    from nanochat.common import device_mark
    first, second = ScalarReader("cuda"), ScalarReader("cuda")
    t = torch.tensor(1.0, device="cuda")
    torch.cuda._sleep(1000)  # load the kernel first (lazy loading can synchronize)
    start = device_mark()
    torch.cuda._sleep(50_000_000)
    first.start(t)
    torch.cuda._sleep(50_000_000)
    second.start(t)
    assert first.result() == second.result() == 1.0
    a, b = start.elapsed_time(first.event), first.event.elapsed_time(second.event)
    assert a > 5 and b > 5 and 0.5 < a / b < 2  # ms: the same sleep on each side


def test_step_time_stats_median_and_slow_steps():
    from nanochat.common import step_time_stats
    assert step_time_stats([], 1000) is None
    times = [0.065] * 20 + [0.095, 0.090]  # two stalls, as seen on the H100
    s = step_time_stats(times, 32768)
    assert s["median_step_sec"] == 0.065 and abs(s["median_tok_per_sec"] - 32768 / 0.065) < 1e-6
    assert s["slow_steps"] == 2 and abs(s["slow_excess_sec"] - 0.055) < 1e-12
    assert step_time_stats([0.065] * 5, 1)["slow_steps"] == 0


# -----------------------------------------------------------------------------
# wandb: a fake module in sys.modules stands in for the real package (never imported here)


class FakeWandb:
    """Records init/log/finish like wandb; `runs` keeps every run by id, as the server would."""

    def __init__(self, fail_init=False, fail_log=False):
        self.fail_init, self.fail_log = fail_init, fail_log
        self.runs, self.inits = {}, []

    def init(self, project=None, name=None, id=None, resume=None, **kw):
        self.inits.append({"project": project, "name": name, "id": id, "resume": resume, **kw})
        if self.fail_init:
            raise RuntimeError("not logged in")
        run_id = id or f"run{len(self.runs)}"
        if run_id not in self.runs:
            self.runs[run_id] = FakeRun(run_id, self)
        return self.runs[run_id]


class FakeConfig(dict):
    def update(self, d, allow_val_change=False):
        if not allow_val_change and any(k in self and self[k] != v for k, v in d.items()):
            raise ValueError("Attempted to change value of key")
        super().update(d)


class FakeRun:
    def __init__(self, run_id, module):
        self.id, self.module = run_id, module
        self.config, self.logged, self.finished = FakeConfig(), [], False

    def log(self, data, step=None):
        if self.module.fail_log:
            raise ConnectionError("network down")
        self.logged.append(data)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(**kw):
        mod = FakeWandb(**kw)
        monkeypatch.setitem(sys.modules, "wandb", mod)
        return mod
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return install


def test_wandb_off_for_dummy_and_non_master(fake_wandb):
    from nanochat.common import DummyWandb, init_wandb
    mod = fake_wandb()
    for run in (init_wandb("dummy", {}, True), init_wandb("x", {}, False)):
        assert isinstance(run, DummyWandb) and run.id is None
        run.log({"a": 1}, step=3)
        run.finish()
    assert mod.inits == []  # never touched


def test_wandb_project_logs_every_key_and_resumes_by_id(fake_wandb, monkeypatch):
    from nanochat.common import DEFAULT_WANDB_PROJECT, init_wandb
    mod = fake_wandb()
    run = init_wandb("d12", {"depth": 12, "resume_from_step": -1}, True)
    assert mod.inits[-1]["project"] == DEFAULT_WANDB_PROJECT and mod.inits[-1]["name"] == "d12"
    record = {"step": 5, "train/loss": 3.2, "dyn/active_layers": 7, "lr": {"matrix": 0.02}, "note": None}
    run.log(record)
    run.finish()
    saved_id = run.id  # what base_train stores in its checkpoints
    assert saved_id and mod.runs[saved_id].logged == [record] and mod.runs[saved_id].finished

    monkeypatch.setenv("WANDB_PROJECT", "speedups")
    resumed = init_wandb("d12", {"depth": 12, "resume_from_step": 5}, True, run_id=saved_id)
    assert mod.inits[-1]["project"] == "speedups"
    assert mod.inits[-1]["id"] == saved_id and mod.inits[-1]["resume"] == "allow"
    assert resumed.id == saved_id and mod.runs[saved_id].config["resume_from_step"] == 5  # changed value accepted
    resumed.log({"step": 6})
    assert mod.runs[saved_id].logged == [record, {"step": 6}]  # one run, continued


def test_wandb_failures_are_never_fatal(fake_wandb, capsys):
    from nanochat.common import DummyWandb, init_wandb
    fake_wandb(fail_init=True)
    run = init_wandb("d12", {}, True)
    assert isinstance(run, DummyWandb) and "wandb unavailable" in capsys.readouterr().out
    mod = fake_wandb(fail_log=True)
    run = init_wandb("d12", {}, True)
    run.log({"a": 1})
    run.log({"a": 2})
    assert capsys.readouterr().out.count("wandb log failed") == 1  # warned once
    run.finish()
    assert mod.runs[run.id].finished


def test_wandb_missing_package_is_a_warning(monkeypatch, capsys):
    from nanochat.common import DummyWandb, init_wandb
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert isinstance(init_wandb("d12", {}, True), DummyWandb)
    assert "wandb is not installed" in capsys.readouterr().out


def test_mps_requested_without_mps_is_a_usage_error(monkeypatch):
    import pytest
    import torch

    from nanochat.common import UsageError, compute_init
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device-type=mps but MPS is not available"):
        compute_init("mps")
