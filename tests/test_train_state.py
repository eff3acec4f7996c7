"""The loop state (`TrainState`: train-loss EMA and its debiasing, checkpoint round trips, old
checkpoint metadata) and the step clock (`StepClock`), driven by a fake time source and a
counting sync so that every booked second is known exactly."""
import json
import math

import pytest

from nanochat.train_state import StepClock, TrainState


class FakeTime:
    """A time source the test moves by hand (`advance`), or by `tick` seconds on every read (for
    code that reads the time itself, such as the step runner)."""

    def __init__(self, t=100.0, tick=0.0):
        self.t, self.tick = t, tick

    def __call__(self):
        now = self.t
        self.t += self.tick
        return now

    def advance(self, dt):
        self.t += dt


class CountingSync:
    """Stands in for torch.cuda.synchronize: the clock must call it only where it says it does."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def make_clock(step=0, launch_time=90.0):
    state = TrainState(step=step)
    now, sync = FakeTime(), CountingSync()
    return StepClock(state, sync=sync, launch_time=launch_time, now=now), now, sync


def run_steps(clock, now, durations):
    """Steps of the given device durations closed as the runner closes them (loss read, then the
    step counter moves on)."""
    for dt in durations:
        now.advance(dt)
        clock.close_step(clock.state.step)
        clock.state.step += 1


def closed_form_ema(losses):
    """The debiased EMA after `losses` (decay 0.9), written as the weighted mean it estimates."""
    k = len(losses)
    weighted = sum(0.1 * 0.9 ** (k - 1 - i) * loss for i, loss in enumerate(losses))
    return weighted / (1 - 0.9 ** k)


# --------------------------------------------------------------------------- TrainState: the loss EMA
def test_record_loss_debiasing_matches_the_closed_form():
    losses = [5.0, 4.0, 4.5, 3.25, 3.0, 2.75]
    state = TrainState()
    assert state.loss_ema() is None  # no step yet
    for step, loss in enumerate(losses):
        debiased = state.record_loss(step, loss)
        assert debiased == pytest.approx(closed_form_ema(losses[:step + 1]), rel=1e-12)
        state.step = step + 1
        assert state.loss_ema() == pytest.approx(debiased, rel=1e-12)
    assert TrainState().record_loss(0, 7.0) == pytest.approx(7.0, rel=1e-12)


def test_record_skipped_loss_keeps_the_debiasing_exact():
    """A skipped step feeds the EMA its own debiased value: the debiased EMA does not move, and
    the raw EMA equals what feeding that value as a loss gives."""
    state, fed = TrainState(), TrainState()
    for step, loss in enumerate([5.0, 4.0, 3.5]):
        state.record_loss(step, loss)
        fed.record_loss(step, loss)
    before = state.smooth_loss / (1 - 0.9 ** 3)
    state.record_skipped_loss(3)
    fed.record_loss(3, before)
    assert state.smooth_loss == pytest.approx(fed.smooth_loss, rel=1e-12)
    state.step = 4
    assert state.loss_ema() == pytest.approx(before, rel=1e-12)
    # the next real loss is debiased by the full step count, as if the skip had been that value
    assert state.record_loss(4, 2.0) == pytest.approx(closed_form_ema([5.0, 4.0, 3.5, before, 2.0]), rel=1e-12)


def test_a_skipped_first_step_keeps_the_debiasing_exact():
    state = TrainState()
    state.record_skipped_loss(0)  # step 0 was not finite: there is no EMA value to feed yet
    assert state.record_loss(1, 3.0) == pytest.approx(3.0)  # the only finite loss so far


# --------------------------------------------------------------------------- TrainState: checkpoints
def test_state_dict_round_trip_also_through_json():
    state = TrainState(step=7, smooth_loss=1.25, train_elapsed=12.5, total_training_time=10.0,
                       nonfinite_skipped=2, nonfinite_streak=1)
    state.record_eval(1.5)
    state.record_eval(1.75)  # the minimum is kept
    assert (state.val_bpb, state.min_val_bpb) == (1.75, 1.5)
    for d in (state.state_dict(), json.loads(json.dumps(state.state_dict()))):
        assert TrainState.from_state_dict(d) == state
    fresh = json.loads(json.dumps(TrainState().state_dict()))  # min_val_bpb inf and val_bpb None survive JSON
    assert TrainState.from_state_dict(fresh) == TrainState()
    assert math.isinf(TrainState.from_state_dict(fresh).min_val_bpb)
    # keys of a newer (or older) writer that this version does not know are ignored
    assert TrainState.from_state_dict({**state.state_dict(), "future_field": 3}) == state


def test_from_checkpoint_reads_new_and_old_metadata():
    state = TrainState(step=5, smooth_loss=2.0, nonfinite_skipped=3, nonfinite_streak=1)
    assert TrainState.from_checkpoint({"step": 5, "loop_state": state.state_dict()}) == state
    # Older checkpoints: no step in loop_state, the non-finite counters beside it.
    old_loop = {k: v for k, v in state.state_dict().items()
                if k not in ("step", "nonfinite_skipped", "nonfinite_streak")}
    old = {"step": 5, "loop_state": old_loop, "nonfinite_skipped": 3, "nonfinite_streak": 1}
    assert TrainState.from_checkpoint(old) == state
    # the oldest: no counters at all -> zero
    assert TrainState.from_checkpoint({"step": 5, "loop_state": old_loop}) == \
        TrainState(step=5, smooth_loss=2.0)


# --------------------------------------------------------------------------- StepClock
def test_start_syncs_only_when_stopped():
    clock, now, sync = make_clock()
    assert not clock.running
    assert clock.start() is True and sync.calls == 1 and clock.running and clock.t_mark == now.t
    assert clock.start() is False and sync.calls == 1  # already running: no sync, the mark stays
    clock.stop()
    assert sync.calls == 2 and not clock.running
    clock.stop()  # stopped already: nothing to wait for
    assert sync.calls == 2


def test_first_step_is_compile_and_launch_time_later_steps_are_steady():
    clock, now, sync = make_clock()
    clock.start()
    run_steps(clock, now, [5.0, 1.0, 2.0, 1.5])
    assert clock.compile_sec == 5.0 and clock.launch_sec == 100.0 + 5.0 - 90.0
    assert clock.step_times == [1.0, 2.0, 1.5] and clock.run_step_time == 4.5
    assert clock.state.total_training_time == 4.5 and clock.state.train_elapsed == 9.5
    assert sync.calls == 1  # the start only: no sync per step while the clock runs
    assert clock.steady_tok_per_sec(300) == pytest.approx(3 * 300 / 4.5)
    assert clock.stats(300)["median_step_sec"] == 1.5


def test_a_resumed_process_counts_its_own_first_step():
    clock, now, _ = make_clock(step=40)
    clock.start()
    run_steps(clock, now, [3.0, 1.0])
    assert clock.first_step == 40 and clock.compile_sec == 3.0 and clock.step_times == [1.0]


def test_stop_books_the_first_steps_tail_to_compile_time():
    clock, now, sync = make_clock()
    clock.start()
    run_steps(clock, now, [5.0])
    now.advance(0.5)  # the first step's optimizer, still queued when its loss was read
    clock.stop()
    assert sync.calls == 2 and clock.compile_sec == 5.5
    assert clock.run_step_time == 0.0 and clock.state.total_training_time == 0.0
    assert clock.state.train_elapsed == 5.5


def test_stop_books_a_later_tail_to_the_totals():
    clock, now, _ = make_clock()
    clock.start()
    run_steps(clock, now, [5.0, 1.0])
    now.advance(0.25)
    clock.stop()
    assert clock.compile_sec == 5.0 and clock.step_times == [1.0]
    assert clock.run_step_time == 1.25 and clock.state.total_training_time == 1.25
    assert clock.state.train_elapsed == 6.25
    now.advance(30.0)  # an evaluation while stopped: not step time
    assert clock.start() is True
    run_steps(clock, now, [1.0])
    assert clock.state.train_elapsed == 7.25 and clock.step_times == [1.0, 1.0]


def test_close_skipped_step_adds_to_train_elapsed_only():
    clock, now, _ = make_clock()
    clock.start()
    run_steps(clock, now, [5.0])
    now.advance(2.0)
    clock.close_skipped_step()
    assert clock.state.train_elapsed == 7.0 and clock.t_mark == now.t
    assert clock.step_times == [] and clock.run_step_time == 0.0 and clock.state.total_training_time == 0.0
    assert clock.compile_sec == 5.0


def test_eta_for_a_step_horizon_and_a_time_budget():
    clock, now, _ = make_clock()
    clock.start()
    assert clock.eta(0, 100, None) == "-"  # no steady step measured yet
    run_steps(clock, now, [5.0, 2.0, 4.0])  # steady mean 3 s
    assert clock.eta(2, 22, None) == f"{19 * 3.0 / 60:.1f}m"  # steps 3..21 left
    assert clock.eta(21, 22, None) == "0.0m"
    assert clock.eta(2, 22, 611.0) == f"{(611.0 - 11.0) / 60:.1f}m of budget"
    assert clock.eta(2, 22, 5.0) == "0.0m of budget"  # spent: never negative


def test_steady_tok_per_sec_without_steady_steps_is_nan():
    clock, now, _ = make_clock()
    assert math.isnan(clock.steady_tok_per_sec(100)) and clock.stats(100) is None
    clock.start()
    run_steps(clock, now, [5.0])
    assert math.isnan(clock.steady_tok_per_sec(100))


class FakeMark:
    """A device mark at a time on a fake device timeline (seconds); elapsed_time in ms, as CUDA's."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, later):
        return (later.t - self.t) * 1000


def test_device_marks_give_each_step_its_own_time_where_wall_intervals_shift():
    """A host that cannot queue a whole step ahead reads step k's loss late, when the device is
    already near the end of step k+1: wall intervals between reads are right in sum but the first
    late-read step shows ~2 steps and the last ~none (seen on an H100 at d28). The device marks,
    recorded as each loss is copied out, give every step its own 0.7 s; the totals stay wall-clock."""
    device = {"t": 0.0}
    state = TrainState()
    now = FakeTime()
    clock = StepClock(state, sync=lambda: None, launch_time=90.0, now=now, mark=lambda: FakeMark(device["t"]))
    clock.start()
    # step 0 (read at once, compiles 10 s), then a restart after the first step (the runner settles there)
    now.advance(10.0); device["t"] += 10.0
    assert clock.close_step(0, FakeMark(device["t"])) == pytest.approx(10.0)
    state.step = 1
    clock.stop()
    clock.start()
    # step 1 read at once; steps 2-4 read late, each while step k+1 is queued, with the device
    # 0.05 s short of the end of step k+1; step 5 read at the stop. Device: 0.7 s a step.
    end = {k: 10.0 + 0.7 * k for k in range(1, 6)}  # device time at the end of step k
    reads = {1: end[1], 2: end[3] - 0.05, 3: end[4] - 0.05, 4: end[5] - 0.05, 5: end[5]}  # wall time of each read
    walls, shown, t = [], [], 10.0
    for k in range(1, 6):
        walls.append(reads[k] - t)
        now.advance(reads[k] - t)
        t = reads[k]
        shown.append(clock.close_step(k, FakeMark(end[k])))
    assert walls == pytest.approx([0.7, 1.35, 0.7, 0.7, 0.05])  # what the log showed before
    assert shown == pytest.approx([0.7] * 5) and clock.step_times == pytest.approx([0.7] * 5)
    wall = 5 * 0.7  # what the wall clock booked for steps 1-5: the same total
    assert clock.run_step_time == pytest.approx(wall) and state.total_training_time == pytest.approx(wall)


def test_without_device_marks_the_step_time_is_the_wall_interval():
    clock, now, _ = make_clock()
    clock.start()
    run_steps(clock, now, [5.0, 0.3, 0.4])
    assert clock.step_times == pytest.approx([0.3, 0.4]) and clock.last_mark is None
    skipped = TrainState()
    c2 = StepClock(skipped, sync=lambda: None, launch_time=0.0, now=FakeTime(), mark=lambda: FakeMark(0.0))
    c2.start()
    c2.close_skipped_step(FakeMark(1.0))  # a skipped step moves the mark on: the next step starts there
    assert c2.last_mark.t == 1.0
    c2.stop()
    assert c2.last_mark is None
