"""The training loop's state and its step clock.

`TrainState` is everything the loop carries from step to step that a resume must restore: it is
what a checkpoint stores under "loop_state". `StepClock` measures step time without a device sync
per step and turns it into the numbers the log prints (dt, ETA, steady tok/s).

How the clock measures a step. The clock runs from one loss read to the next. A step's loss is
normally read one step late, after the next step's work is queued: the host then waits for step
N's backward with step N's optimizer and all of step N+1 still queued, so a host hiccup (a slow
print, the OS) shorter than a step never leaves the GPU idle. The interval between two reads is
one step of device time. Before anything else uses the device (an evaluation, a checkpoint),
`stop()` waits for the queued work and books its time to the same totals, so totals and steady
tok/s count every second of device work and nothing else. The first step of each process
includes compilation: it is reported apart (`compile_sec`) and left out of steady tok/s.

A step's own time (its log line's dt, the median and slow-step statistics) comes from device
marks where there are some (CUDA events recorded as each loss is copied out): the device
timeline from the previous step's loss to this one's. Wall-clock intervals between reads are
right in sum but not step by step when the host cannot queue a whole step ahead (the launch
queue fills at d20+ with accumulation): the first late-read step after the clock starts then
shows nearly two steps and the last one before a stop nearly none (measured at d28: 1,376 and
28 ms against 700).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from nanochat.common import step_time_stats

# The train-loss EMA's decay, written as the literals 0.9 and 0.1 below: 1 - 0.9 is not 0.1 in
# floating point, and the logged EMA is part of what resume parity compares.


@dataclass
class TrainState:
    """Loop state; `state_dict()` is what a checkpoint stores. Times are seconds of step time:
    `train_elapsed` includes every first (compiling) step and is what --time-budget-sec spends;
    `total_training_time` leaves each process's first step out."""
    step: int = 0
    smooth_loss: float = 0.0  # EMA of the train loss, not yet debiased (see `loss_ema`)
    val_bpb: float | None = None
    min_val_bpb: float = math.inf
    train_elapsed: float = 0.0
    total_training_time: float = 0.0
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss, over all resumes
    nonfinite_streak: int = 0  # bad steps in a row up to now (--skip-nonfinite-steps counts across a resume)
    loss_ema_updates: int = 0  # values folded into smooth_loss: the debiasing divisor is 1 - 0.9**this

    def record_loss(self, step: int, loss: float) -> float:
        """Fold step `step`'s train loss into the EMA; return the debiased EMA."""
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        self.loss_ema_updates += 1
        return self.smooth_loss / (1 - 0.9 ** self.loss_ema_updates)

    def record_skipped_loss(self, step: int) -> None:
        """A skipped (non-finite) step feeds the EMA its own debiased value, so the EMA keeps one
        update per step; before any value exists there is nothing to feed."""
        if self.loss_ema_updates > 0:
            self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * self.smooth_loss / (1 - 0.9 ** self.loss_ema_updates)
            self.loss_ema_updates += 1

    def loss_ema(self) -> float | None:
        return self.smooth_loss / (1 - 0.9 ** self.loss_ema_updates) if self.loss_ema_updates > 0 else None

    def record_eval(self, val_bpb: float) -> None:
        self.val_bpb = val_bpb
        self.min_val_bpb = min(self.min_val_bpb, val_bpb)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_checkpoint(cls, meta: dict) -> "TrainState":
        """The state of a checkpoint's metadata. Checkpoints written before the loop state held the
        step and the non-finite counters kept them beside it; those are read too."""
        d = {k: meta[k] for k in ("nonfinite_skipped", "nonfinite_streak") if k in meta}
        d["loss_ema_updates"] = meta["step"]  # one update per step, unless the state says otherwise
        return cls.from_state_dict({**d, **meta["loop_state"], "step": meta["step"]})


class StepClock:
    """Step timing from loss read to loss read (see the module docstring).

    `sync`: waits for the device's queued work (torch.cuda.synchronize; a no-op on CPU).
    `now`: the time source (injectable for tests).
    `mark`: records a device mark now and returns it (`nanochat.common.device_mark`); marks have
    `elapsed_time(later)` in ms. None (CPU): a step's own time is its wall-clock interval."""

    def __init__(self, state: TrainState, *, sync: Callable[[], None], launch_time: float,
                 now: Callable[[], float] = time.time, mark: Callable[[], Any] | None = None):
        self.state = state
        self.sync = sync
        self.now = now
        self.mark = mark
        self.last_mark = None  # the device mark of the last loss read (or of the clock's start)
        self.launch_time = launch_time
        self.first_step = state.step
        self.t_mark: float | None = None  # the last loss read; None = stopped
        self.compile_sec: float | None = None  # this process's first step (compilation included)
        self.launch_sec: float | None = None  # launch to the end of the first step
        self.run_step_time = 0.0  # this process's steps after its first, with stop()'s tails
        self.step_times: list[float] = []  # those steps' intervals (count, median, slow steps)

    @property
    def running(self) -> bool:
        return self.t_mark is not None

    def start(self) -> bool:
        """Start the clock on an idle device if it is stopped. True if it was stopped: the step
        that follows has its loss read at once (its time is then not shared with the next step)."""
        if self.t_mark is not None:
            return False
        self.sync()
        self.t_mark = self.now()
        self.last_mark = self.mark() if self.mark else None
        return True

    def close_step(self, step: int, mark: Any = None) -> float:
        """Step `step`'s loss was just read (`mark`: the device mark recorded with its copy): its
        interval ends here. Returns the step's own time: device time from the previous mark when
        both marks exist, else the wall-clock interval; the first step's is wall-clock (it compiles)."""
        now = self.now()
        dt = now - self.t_mark
        self.t_mark = now
        own = dt if mark is None or self.last_mark is None else self.last_mark.elapsed_time(mark) / 1000
        self.last_mark = mark
        self.state.train_elapsed += dt
        if step == self.first_step:
            self.compile_sec = dt
            self.launch_sec = now - self.launch_time  # setup, any evaluation at this step, the first step
            return dt
        self.state.total_training_time += dt
        self.run_step_time += dt
        self.step_times.append(own)
        return own

    def close_skipped_step(self, mark: Any = None) -> None:
        """A skipped (non-finite) step: its time is spent but it is not a step of the statistics."""
        now = self.now()
        self.state.train_elapsed += now - self.t_mark
        self.t_mark = now
        self.last_mark = mark

    def stop(self) -> None:
        """Stop the clock: wait for the queued work (the last step's optimizer runs after the loss
        read that ended its interval) and book that time like the step it belongs to."""
        if self.t_mark is None:
            return
        self.sync()
        extra = self.now() - self.t_mark
        self.t_mark = None
        self.last_mark = None
        self.state.train_elapsed += extra
        if self.state.step == self.first_step + 1 and self.compile_sec is not None:  # the first step's tail
            self.compile_sec += extra
        else:
            self.state.total_training_time += extra
            self.run_step_time += extra

    def eta(self, step: int, num_iterations: int, time_budget: float | None) -> str:
        if time_budget:
            return f"{max(0.0, time_budget - self.state.train_elapsed) / 60:.1f}m of budget"
        if not self.step_times:
            return "-"
        return f"{(num_iterations - step - 1) * self.run_step_time / len(self.step_times) / 60:.1f}m"

    def steady_tok_per_sec(self, tokens_per_step: int) -> float:
        if self.run_step_time <= 0:
            return float("nan")
        return len(self.step_times) * tokens_per_step / self.run_step_time

    def stats(self, tokens_per_step: int) -> dict | None:
        return step_time_stats(self.step_times, tokens_per_step)
