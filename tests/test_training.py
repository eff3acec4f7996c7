"""The training core on CPU: the LR schedule, Muon's momentum warmup, the batch stream, the metrics
log, the validation evaluator, `StepRunner.train_step` on a tiny GPT with the real MuonAdamW (as
scripts/base_train.py wires them: non-finite steps skipped or stopping the run, the run summary),
the block-schedule interface (`StepPlan`, `BlockSchedule`, rank agreement over 2 gloo ranks) and
`DynamicSuffixSchedule`'s measure-then-update hook order."""
import copy
import json
import math
from contextlib import nullcontext

import pytest
import torch

from nanochat.debug import NonFiniteGuard, PhaseMemory
from nanochat.dynamic_suffix import DynamicSuffixConfig
from nanochat.schedules.base import BlockSchedule, ScheduleContext, StepPlan
from nanochat.schedules.dynamic_suffix import DynamicSuffixSchedule
from nanochat.train_state import StepClock, TrainState
from nanochat.training import (Batches, LRSchedule, MetricsLog, RunInfo, StepRunner, TrainingStopped, ValEvaluator,
                               muon_momentum, summary_record)

from tests.test_gpt import batch, make_model
from tests.test_schedules import make_opt
from tests.test_train_state import FakeTime

N_LAYER = 2
ACCUM = 2  # micro-batches per step: the logged loss is their mean
B, T = 2, 32
TOKENS = ACCUM * B * T


def loader(start=0):
    """The trainer's loader contract: (x, y, state after this batch) for ever."""
    i = start
    while True:
        x, y = batch(seed=i, B=B, T=T)
        yield x, y, {"batches": i + 1}
        i += 1


class FakeWandb:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, record):
        self.logged.append(record)

    def finish(self):
        self.finished = True


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def make_runner(tmp_path, *, schedule=None, skip_nonfinite_steps=-1, fault_inject=None, num_iterations=4):
    """A StepRunner as base_train builds it, on a tiny CPU GPT: MuonAdamW from the model's groups,
    the non-finite guard, an idle memory probe, a clock that ticks 1 s per read (so every step
    is 1 s), metrics to tmp_path/metrics.jsonl and a fake wandb logging every step.
    `schedule(model, optimizer)` builds the block schedule (default: full_update)."""
    model = make_model(n_layer=N_LAYER)
    opt = make_opt(model)
    ctx = ScheduleContext(model=model, n_layer=N_LAYER, num_iterations=num_iterations, optimizer=opt)
    sched = schedule(ctx) if schedule else BlockSchedule(ctx)
    state = TrainState()
    info = RunInfo(device_type="cpu", device="cpu", ddp=False, world_size=1, grad_accum_steps=ACCUM,
                   total_batch_size=TOKENS, num_iterations=num_iterations, time_budget=None, show_horizon=True,
                   compiled=False, peak_flops=None)
    metrics = MetricsLog(str(tmp_path / "metrics.jsonl"), True, FakeWandb(), wandb_every=1)
    guard = NonFiniteGuard(list(model.named_parameters()), max_skips=skip_nonfinite_steps)
    return StepRunner(info, model=model, optimizer=opt, schedule=sched, batches=Batches(loader()), state=state,
                      clock=StepClock(state, sync=lambda: None, launch_time=0.0, now=FakeTime(t=10.0, tick=1.0)),
                      lr=LRSchedule(0.0, 0.5, 0.0, num_iterations), metrics=metrics, guard=guard,
                      mem_probe=PhaseMemory(0, "cpu"), autocast_ctx=nullcontext(), fault_inject=fault_inject)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- learning rate
def test_step_lr_schedule_boundaries():
    lr = LRSchedule(warmup_ratio=0.1, warmdown_ratio=0.4, final_lr_frac=0.2, num_iterations=100)
    # warmup over steps 0..9, constant through step 60 = 100 - 40, then linear to final_lr_frac at 100
    assert [lr(s, 0.0) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr(10, 0.0) == 1.0 and lr(60, 0.0) == 1.0
    assert lr(61, 0.0) == pytest.approx(39 / 40 + (1 / 40) * 0.2)
    assert lr(80, 0.0) == pytest.approx(0.5 + 0.5 * 0.2)
    assert lr(99, 0.0) == pytest.approx(1 / 40 + (39 / 40) * 0.2)
    assert lr(100, 0.0) == pytest.approx(0.2)
    assert lr(30, 1e9) == 1.0  # a step horizon ignores the clock
    flat = LRSchedule(0.0, 0.0, 0.0, 10)  # no warmup, no warmdown
    assert [flat(s, 0.0) for s in range(11)] == [1.0] * 11


def test_time_lr_schedule_follows_elapsed_over_budget():
    lr = LRSchedule(warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.0, num_iterations=10 ** 9,
                    time_budget=200.0)
    assert lr(0, 0.0) == 1e-3  # never zero at the very start
    assert lr(0, 10.0) == pytest.approx(0.5) and lr(10 ** 6, 10.0) == pytest.approx(0.5)  # the step is ignored
    assert lr(5, 20.0) == 1.0 and lr(5, 100.0) == 1.0
    assert lr(5, 150.0) == pytest.approx(0.5) and lr(5, 200.0) == 0.0
    assert lr(5, 250.0) == 0.0  # past the budget: held at final_lr_frac
    frac = LRSchedule(0.0, 0.5, 0.25, 10 ** 9, time_budget=100.0)
    assert frac(0, 75.0) == pytest.approx(0.5 + 0.5 * 0.25) and frac(0, 100.0) == pytest.approx(0.25)


def test_lr_schedule_describe():
    assert LRSchedule(0.1, 0.4, 0.2, 100).describe() == {
        "lr_schedule": "steps", "time_budget_sec": None, "num_iterations": 100, "warmup_ratio": 0.1,
        "warmdown_ratio": 0.4, "final_lr_frac": 0.2}
    timed = LRSchedule(0.0, 0.5, 0.0, -1, time_budget=60.0).describe()
    assert timed["lr_schedule"] == "time" and timed["time_budget_sec"] == 60.0


def test_muon_momentum_warms_up_over_300_steps():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10 ** 6) == pytest.approx(0.95)


# --------------------------------------------------------------------------- batches, metrics, evaluation
def test_batches_consumed_lags_the_prefetched_batch_by_one():
    b = Batches(loader(), consumed_state="resumed-at")
    x0, _ = batch(seed=0, B=B, T=T)
    assert torch.equal(b.x, x0) and b.consumed == "resumed-at"  # batch 0 is prefetched, not trained on
    b.advance()
    assert b.consumed == {"batches": 1} and torch.equal(b.x, batch(seed=1, B=B, T=T)[0])
    b.advance()
    assert b.consumed == {"batches": 2}


@pytest.mark.parametrize("master", [True, False])
def test_metrics_log_writes_json_lines_on_master_only(tmp_path, master):
    path = tmp_path / "m.jsonl"
    run = FakeWandb()
    log = MetricsLog(str(path), master, run)
    log.write({"kind": "step", "step": 0, "loss": 3.5})
    log.write({"kind": "eval", "step": 0, "val_bpb": 1.25})
    log.wandb({"step": 0, "train/loss": 3.5})
    log.close()
    assert run.logged == [{"step": 0, "train/loss": 3.5}] and run.finished
    if master:
        assert read_metrics(path) == [{"kind": "step", "step": 0, "loss": 3.5},
                                      {"kind": "eval", "step": 0, "val_bpb": 1.25}]
        assert log.file is None
        log.close()  # twice is harmless
    else:
        assert not path.exists()
    assert MetricsLog("", True, FakeWandb()).file is None  # no --metrics-file


def test_val_evaluator_reads_its_rows_once():
    made = []

    def make_loader():
        made.append(loader(start=100))
        return made[-1]

    model = make_model(n_layer=N_LAYER)
    evaluate = ValEvaluator(make_loader, steps=2, token_bytes=torch.ones(256, dtype=torch.int64))
    first = evaluate(model)
    assert evaluate(model) == first and len(made) == 1  # the same rows, tokenized once
    assert made[0].gi_frame is None  # the loader was closed
    assert 0 < first < 2 * math.log2(256)  # bits per (one-byte) token near log2(V) at init


# --------------------------------------------------------------------------- StepRunner
def test_train_step_advances_the_step_and_logs_the_loss(tmp_path, capsys):
    runner = make_runner(tmp_path)
    before = copy.deepcopy(runner.model)
    with torch.no_grad():  # the logged loss is the mean over the step's micro-batches
        want = sum(before(*batch(seed=i, B=B, T=T)).item() for i in range(ACCUM)) / ACCUM
    w0 = weights(runner.model)
    runner.train_step()
    assert runner.state.step == 1 and not same(weights(runner.model), w0)
    assert all(p.grad is None for p in runner.model.parameters())
    assert runner.batches.consumed == {"batches": ACCUM}  # both micro-batches trained on
    runner.train_step()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in recs] == [("step", 0), ("step", 1)]
    assert recs[0]["loss"] == pytest.approx(want, rel=1e-5) and recs[0]["loss_ema"] == pytest.approx(want, rel=1e-5)
    assert recs[1]["dt"] == 1.0 and recs[1]["tok_per_sec"] == TOKENS and recs[1]["tokens"] == 2 * TOKENS
    assert recs[1]["active_layers"] == N_LAYER and recs[1]["mfu"] is None and recs[1]["step_peak_mib"] is None
    # the LR of the step was set from the schedule: warmdown over the last 2 of 4 steps -> 1.0 at steps 0-2
    assert recs[1]["lrm"] == 1.0
    assert all(g["lr"] == g["initial_lr"] for g in runner.optimizer.param_groups)
    assert {g["momentum"] for g in runner.optimizer.param_groups if g["kind"] == "muon"} == {muon_momentum(1)}
    assert [r["step"] for r in runner.metrics.wandb_run.logged] == [0, 1]
    assert runner.metrics.wandb_run.logged[0]["train/raw_loss"] == recs[0]["loss"]
    assert "step 00001/4 | loss" in capsys.readouterr().out
    assert runner.clock.compile_sec == 1.0 and runner.clock.step_times == [1.0]


def test_a_non_finite_step_is_skipped_without_touching_the_weights(tmp_path):
    runner = make_runner(tmp_path, skip_nonfinite_steps=1, fault_inject={1: float("nan")})
    runner.train_step()
    w1 = weights(runner.model)
    optim_state = copy.deepcopy(runner.optimizer.state_dict()["state"])
    loss0 = runner.state.loss_ema()
    runner.train_step()  # step 1: NaN loss
    assert same(weights(runner.model), w1)
    after = runner.optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][n], v) for k, s in optim_state.items() for n, v in s.items() if torch.is_tensor(v))
    assert runner.state.step == 2 and runner.state.nonfinite_skipped == 1 and runner.state.nonfinite_streak == 1
    assert runner.state.loss_ema() == pytest.approx(loss0, rel=1e-12)  # the skip left the debiased EMA as it was
    assert runner.clock.step_times == [] and runner.state.train_elapsed == 2.0  # spent, not a steady step
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[-1]["kind"] == "skip" and recs[-1]["step"] == 1 and math.isnan(recs[-1]["loss"])
    assert "non-finite loss" in recs[-1]["problem"] and recs[-1]["skipped_total"] == 1
    runner.train_step()  # a good step ends the streak and trains again
    assert runner.state.nonfinite_streak == 0 and not same(weights(runner.model), w1)
    assert [r["kind"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["step", "skip", "step"]


def test_a_non_finite_step_stops_the_run_when_skipping_is_off(tmp_path):
    runner = make_runner(tmp_path, skip_nonfinite_steps=-1, fault_inject={1: float("nan")})
    runner.train_step()
    w1 = weights(runner.model)
    with pytest.raises(TrainingStopped, match=r"step 00001 \| non-finite loss \(nan\); stopping without its "
                                              r"optimizer update\. The last saved checkpoint is untouched") as e:
        runner.train_step()
    assert e.value.exit_code == 1 and same(weights(runner.model), w1)
    assert [r["kind"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["step"]


def test_summary_record_of_a_full_update_run(tmp_path):
    runner = make_runner(tmp_path)
    for _ in range(3):  # as base_train's loop: the clock stops after the first step (1 s tail) and restarts
        runner.train_step()
        if runner.state.step == 1:
            runner.settle()
    runner.finish_pending()
    s = summary_record(runner, "full_update")
    assert s["schedule_stats"] == {"name": "full_update", "n_layer": N_LAYER, "steps": 3,
                                   "mean_trained_blocks": N_LAYER, "full_steps": 3, "every_step_full": True}
    assert s["kind"] == "summary" and s["steps"] == s["steps_this_run"] == 3 and s["tokens"] == 3 * TOKENS
    assert s["first_step_sec"] == 2.0 and s["launch_to_first_step_end_sec"] == 11.0  # the tail is compile time
    assert s["steady_tok_per_sec"] == TOKENS and s["step_times"]["median_step_sec"] == 1.0
    assert s["final_loss_ema"] == runner.state.loss_ema() and s["min_val_bpb"] is None
    assert s["nonfinite_skipped"] == 0 and s["lr_reductions"] == 0 and s["peak_mib"] is None
    assert "dynamic_suffix" not in s
    json.dumps(s)  # the summary is a JSON line


# --------------------------------------------------------------------------- StepPlan / BlockSchedule
def plan_ctx(n_layer=4, **kw):
    """A schedule context for plans only (choosing plans never touches the model)."""
    return ScheduleContext(model=None, n_layer=n_layer, num_iterations=10, **kw)


class SkipOddSteps(BlockSchedule):
    """A schedule that leaves block 1 out on odd steps (or runs `plans[step]` when given)."""
    name = "skip_odd"
    varies = True

    def __init__(self, ctx, plans=None):
        super().__init__(ctx)
        self.plans = plans

    def plan(self, step, elapsed):
        if self.plans is not None:
            return self.plans[step]
        return StepPlan(skip=(1,)) if step % 2 else StepPlan()


def test_step_plan_trained_blocks_and_key():
    assert StepPlan().trained_blocks(4) == 4 and StepPlan().key() == (0, ())
    assert StepPlan(active_start=1).trained_blocks(4) == 3
    assert StepPlan(skip=(1, 2)).trained_blocks(4) == 2
    # a skipped block inside the frozen prefix trains no more than a frozen one: not subtracted twice
    assert StepPlan(active_start=2, skip=(0, 3)).trained_blocks(4) == 1
    # measuring changes no work, so per-plan caches (FLOPs) share the key
    assert StepPlan(active_start=1, skip=(2,), measure=True).key() == StepPlan(active_start=1, skip=(2,)).key()


def test_full_update_stats_every_step_full_and_each_step_counted_once():
    sched = BlockSchedule(plan_ctx())
    assert sched.stats() == {"name": "full_update", "n_layer": 4, "steps": 0, "mean_trained_blocks": 4.0,
                             "full_steps": 0, "every_step_full": True}
    for step in (0, 1, 1, 2, 0):  # a repeated (or earlier) step is not recounted
        assert sched.before_step(step, 0.0) == StepPlan()
    st = sched.stats()
    assert st["steps"] == 3 and st["full_steps"] == 3 and st["every_step_full"] and st["mean_trained_blocks"] == 4.0
    assert sched.last_recorded_step == 2
    assert not sched.varies and sched.describe() == {"name": "full_update"}
    assert sched.after_backward(0, StepPlan()) is False and sched.after_step(0, StepPlan()) == []
    assert sched.log_line(0) is None


def test_a_schedule_that_skips_blocks_reports_fewer_trained_blocks():
    sched = SkipOddSteps(plan_ctx())
    plans = [sched.before_step(step, 0.0) for step in range(4)]
    assert [p.skip for p in plans] == [(), (1,), (), (1,)]
    st = sched.stats()
    assert st["mean_trained_blocks"] == 3.5 < 4 and st["full_steps"] == 2 and not st["every_step_full"]


def test_schedule_state_dict_round_trip_and_name_check():
    sched = SkipOddSteps(plan_ctx())
    for step in range(5):
        sched.before_step(step, 0.0)
    saved = json.loads(json.dumps(sched.state_dict()))
    resumed = SkipOddSteps(plan_ctx())
    resumed.load_checkpoint_meta({"schedule": saved})
    assert resumed.stats() == sched.stats() and resumed.last_recorded_step == 4
    resumed.before_step(4, 0.0)  # the checkpoint's last step is not recounted
    assert resumed.stats() == sched.stats()
    fresh = SkipOddSteps(plan_ctx())
    fresh.load_checkpoint_meta({})  # a fresh start
    assert fresh.stats()["steps"] == 0
    with pytest.raises(ValueError, match="the checkpoint's block-update schedule is 'skip_odd', this run's is "
                                         "'full_update'"):
        BlockSchedule(plan_ctx()).load_state_dict(saved)


def _agree_worker(rank, world, init_file):
    """Rank r's plans: equal on steps 0 and 2, active_start differs on step 1, and on step 3 the
    same number of skipped blocks but not the same ones (caught elementwise, not by the sums)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plans = [StepPlan(skip=(2,)), StepPlan(active_start=rank), StepPlan(active_start=1), StepPlan(skip=(1 + rank,))]
        sched = SkipOddSteps(plan_ctx(ddp=True, world_size=world), plans)
        for step, diverged in enumerate([False, True, False, True]):
            if diverged:
                with pytest.raises(RuntimeError, match=f"step {step}: the ranks chose different skip_odd plans"):
                    sched.before_step(step, 0.0)
            else:
                assert sched.before_step(step, 0.0) == plans[step]
    finally:
        dist.destroy_process_group()


def test_check_ranks_agree_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_agree_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)  # a failed assert fails the spawn


# --------------------------------------------------------------------------- DynamicSuffixSchedule
def dynamic_suffix(ctx):
    """Step 0 is a full (warmup) step that measures; from step 1 every step trains the chosen
    suffix unless it has no measurement yet (then it is a probe)."""
    config = DynamicSuffixConfig(warmup_steps=1, freeze_start_step=1, probe_every=0, refresh_every=0,
                                 relevance_threshold=0.5, ema_decay=0.0, log_every=0)
    return DynamicSuffixSchedule(ctx, config)


def trace_measurement(runner):
    """Record, in order, when the controller scores the blocks (with whether every block parameter
    still holds its gradient), when the optimizer steps and when the controller updates."""
    events, ctl, opt = [], runner.schedule.controller, runner.optimizer
    scores, update, step = ctl.block_scores, ctl.update, opt.step

    def block_scores(block_params):
        block_params = list(block_params)
        events.append(("block_scores", all(p.grad is not None for ps in block_params for p in ps)))
        return scores(block_params)

    ctl.block_scores = block_scores
    ctl.update = lambda s, sc: (events.append(("update", s)), update(s, sc))[1]
    opt.step = lambda **kw: (events.append(("optimizer", None)), step(**kw))[1]
    return events


def test_dynamic_suffix_measures_after_backward_and_updates_after_the_step(tmp_path):
    runner = make_runner(tmp_path, schedule=dynamic_suffix)
    events = trace_measurement(runner)
    sched = runner.schedule
    assert sched.controller.chosen_active_start == 0
    runner.train_step()  # step 0: warmup, a full step that measures
    assert events == [("block_scores", True), ("optimizer", None), ("update", 0)]
    assert sched.controller.n_measurements == 1 and sched.controller.chosen_active_start > 0  # the suffix moved
    events.clear()
    runner.train_step()  # step 1: a suffix step, nothing measured
    assert events == [("optimizer", None)]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["active_layers"] for r in recs] == [N_LAYER, N_LAYER - sched.controller.chosen_active_start]
    s = summary_record(runner, sched.name)
    assert s["schedule_stats"]["mean_trained_blocks"] < N_LAYER and s["dynamic_suffix"]["measurements"] == 1


def test_dynamic_suffix_drops_the_measurement_of_a_skipped_step(tmp_path):
    """Step 0 measures NaN gradients, then is skipped (its after_step never runs); the next plan
    drops those scores: the controller never sees them, and step 1 (a probe) measures afresh."""
    runner = make_runner(tmp_path, schedule=dynamic_suffix, skip_nonfinite_steps=2, fault_inject={0: float("nan")})
    events = trace_measurement(runner)
    runner.train_step()
    assert events == [("block_scores", True), ("optimizer", None)] and runner.schedule._scores is not None
    assert runner.schedule.plan(1, 0.0).measure and runner.schedule._scores is None
    events.clear()
    runner.train_step()
    assert events == [("block_scores", True), ("optimizer", None), ("update", 1)]
    ctl = runner.schedule.controller
    assert ctl.n_measurements == 1 and ctl.n_invalid_measurements == 0 and ctl.chosen_active_start > 0


def test_dynamic_suffix_load_checkpoint_meta_old_and_new_formats():
    model = make_model(n_layer=N_LAYER)
    ctx = ScheduleContext(model=model, n_layer=N_LAYER, num_iterations=10)
    sched = dynamic_suffix(ctx)
    for step in range(4):
        plan = sched.before_step(step, 0.0)
        if plan.measure:
            sched.controller.update(step, [1.0, 3.0])
    assert sched.controller.chosen_active_start == 1
    controller_state = json.loads(json.dumps(sched.controller.state_dict()))
    # Before the schedule interface a checkpoint kept the controller's state alone.
    old = dynamic_suffix(ctx)
    old.load_checkpoint_meta({"dynamic_suffix": controller_state})
    assert old.controller.state_dict() == controller_state and old.last_recorded_step == 3
    old.before_step(3, 0.0)  # the checkpoint's last step is not recounted
    assert old.controller.stats() == sched.controller.stats()
    new = dynamic_suffix(ctx)
    new.load_checkpoint_meta({"schedule": json.loads(json.dumps(sched.state_dict()))})
    assert new.stats() == sched.stats()
    with pytest.raises(ValueError, match="'dynamic_suffix', this run's is 'full_update'"):
        BlockSchedule(ctx).load_checkpoint_meta({"schedule": sched.state_dict()})


def test_dynamic_suffix_old_format_resume_keeps_the_whole_runs_schedule_stats():
    ctx = ScheduleContext(model=None, n_layer=N_LAYER, num_iterations=10)
    sched = dynamic_suffix(ctx)
    for step in range(4):
        if sched.before_step(step, 0.0).measure:
            sched.controller.update(step, [1.0, 3.0])
    old = dynamic_suffix(ctx)
    old.load_checkpoint_meta({"dynamic_suffix": sched.controller.state_dict()})
    old.before_step(4, 0.0)
    st = old.stats()
    assert st["steps"] == st["dynamic_suffix"]["steps"] == 5
    assert st["mean_trained_blocks"] == pytest.approx(st["dynamic_suffix"]["mean_active_layers_all"])
