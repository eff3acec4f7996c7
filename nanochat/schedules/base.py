"""The block-update schedule interface: which blocks a training step runs and trains.

A schedule answers one question per step, `before_step(step, elapsed) -> StepPlan`: the blocks
that run forward only (`active_start`, a frozen prefix), the blocks left out of the step entirely
(`skip`, identity on the residual stream) and whether the schedule reads this step's gradients
(`measure`). The trainer runs the plan and calls three hooks around the step:

    plan = schedule.before_step(step, elapsed)     # FP8 caches and rank agreement handled here
    loss = model(x, y, active_start=plan.active_start, skip=plan.skip); loss.backward()
    reduced = schedule.after_backward(step, plan)  # live gradients, before the optimizer
    optimizer.step(reduce_grads=not reduced)
    for line in schedule.after_step(step, plan): print0(line)   # may sync with the host

`full_update` is this class as it is: every block trains every step. A new schedule is one file
with a subclass of `BlockSchedule` that overrides `plan` (and the hooks it needs), one entry in
`REGISTRY` (`nanochat/schedules/__init__.py`) and its flags in `ScheduleFlags`
(`nanochat/config.py`); the trainer has no schedule-specific code.

What the base class does for every schedule, so that no schedule can get it wrong:
- **FP8 frozen-weight caches.** A forward-only block's weights cannot change until it trains
  again, so with the custom FP8 backend they are quantised once per freeze period instead of on
  every micro-step (`set_fp8_weight_cache`); the caches follow `active_start`.
- **Rank agreement.** Under torchrun every rank must run the same plan (the sharded optimizer
  pairs tensors by position). Each rank's plan is encoded as a vector v; after one all-reduce of
  (v, v*v), all ranks agree iff sum(v)^2 == W * sum(v*v) elementwise. Schedules whose plan is
  always the full model skip the check.
- **Honest statistics.** Every step's trained-block count is recorded, so the run summary says
  what the schedule actually did (`stats()["mean_trained_blocks"]`); the A/B report refuses to
  credit a speed-up to a schedule that never left a block out.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from nanochat.fp8 import set_fp8_weight_cache


@dataclass(frozen=True)
class StepPlan:
    """What one training step runs. `active_start`: blocks [0, a) run forward only (no_grad);
    `skip`: sorted block indices left out entirely; `measure`: `after_backward` reads gradients,
    so the step's loss is read at once (the next plan may depend on it)."""
    active_start: int = 0
    skip: tuple[int, ...] = ()
    measure: bool = False

    def trained_blocks(self, n_layer: int) -> int:
        """Blocks that get gradients on this step."""
        return n_layer - self.active_start - sum(1 for i in self.skip if i >= self.active_start)

    def key(self) -> tuple[int, tuple[int, ...]]:
        """What determines the step's work (for per-plan caches such as FLOPs)."""
        return self.active_start, self.skip


@dataclass
class ScheduleContext:
    """What a schedule may use; built once by the trainer."""
    model: torch.nn.Module
    n_layer: int
    num_iterations: int
    time_budget: float | None = None  # seconds of step time when the horizon is a time budget
    fp8: bool = False
    compiled: bool = False
    ddp: bool = False
    world_size: int = 1
    device: Any = "cpu"
    optimizer: Any = None  # MuonAdamW: `reduce_grads()` when a schedule reads gradients under DDP
    seed: int = 0
    extra: dict = field(default_factory=dict)


class BlockSchedule:
    """The interface and `full_update`, its trivial implementation: every block, every step."""

    name = "full_update"
    varies = False  # True when plans can leave blocks out: rank agreement and the step line's "active"

    def __init__(self, ctx: ScheduleContext):
        self.ctx = ctx
        self.n_layer = ctx.n_layer
        self._fp8_frozen: int | None = None  # the active_start whose frozen-prefix FP8 caches are live
        self.steps = 0
        self.sum_trained = 0
        self.full_steps = 0
        self.last_recorded_step = -1

    # ------------------------------------------------------------------ the choice
    def plan(self, step: int, elapsed: float) -> StepPlan:
        """This step's plan (override). `elapsed`: seconds of step time so far (rank 0's clock)."""
        return StepPlan()

    def before_step(self, step: int, elapsed: float) -> StepPlan:
        plan = self.plan(step, elapsed)
        if step > self.last_recorded_step:  # a repeated step (after a skipped NaN step) counts once
            self.last_recorded_step = step
            trained = plan.trained_blocks(self.n_layer)
            self.steps += 1
            self.sum_trained += trained
            self.full_steps += int(trained == self.n_layer)
        if self.ctx.fp8:
            self._follow_fp8(plan.active_start)
        if self.ctx.ddp and self.varies:
            self._check_ranks_agree(step, plan)
        return plan

    # ------------------------------------------------------------------ hooks
    def warm_up(self, x: torch.Tensor, y: torch.Tensor, autocast_ctx) -> None:
        """Called once, in the first (compiling) step when the model is compiled: run the graph
        variants that later plans need, so they compile here instead of stalling a later step.
        full_update needs none."""

    def after_backward(self, step: int, plan: StepPlan) -> bool:
        """Live gradients, before the optimizer step and zero_grad. Return True if this hook
        already averaged the gradients across ranks (the optimizer then skips its reduce)."""
        return False

    def after_step(self, step: int, plan: StepPlan) -> list[str]:
        """After the optimizer step is queued; host syncs are allowed (the step's loss has been
        read when `plan.measure`). Returns lines for the log (warnings)."""
        return []

    def log_line(self, step: int) -> str | None:
        return None

    def describe(self) -> dict:
        """The schedule's settings, logged at the start."""
        return {"name": self.name}

    def stats(self) -> dict:
        """Summary of what the schedule did (JSON): every schedule reports the mean trained blocks."""
        mean = self.sum_trained / self.steps if self.steps else float(self.n_layer)
        return {"name": self.name, "n_layer": self.n_layer, "steps": self.steps, "mean_trained_blocks": mean,
                "full_steps": self.full_steps, "every_step_full": self.full_steps == self.steps}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "sum_trained": self.sum_trained,
                "full_steps": self.full_steps, "last_recorded_step": self.last_recorded_step}

    def load_checkpoint_meta(self, meta: dict) -> None:
        """Restore the schedule from a checkpoint's metadata (a no-op for a fresh start)."""
        if meta.get("schedule"):
            self.load_state_dict(meta["schedule"])

    def load_state_dict(self, d: dict) -> None:
        if d.get("name", self.name) != self.name:
            raise ValueError(f"the checkpoint's block-update schedule is {d.get('name')!r}, this run's is "
                             f"{self.name!r}")
        self.steps, self.sum_trained = int(d["steps"]), int(d["sum_trained"])
        self.full_steps, self.last_recorded_step = int(d["full_steps"]), int(d["last_recorded_step"])

    # ------------------------------------------------------------------ shared machinery
    def _follow_fp8(self, active_start: int) -> None:
        if active_start == self._fp8_frozen:
            return
        model = self.ctx.model
        set_fp8_weight_cache(model, False)
        if active_start:
            set_fp8_weight_cache(model, True, modules=list(model.transformer.h[:active_start]))
        self._fp8_frozen = active_start

    def _warm_frozen_prefix(self, x: torch.Tensor, y: torch.Tensor, autocast_ctx) -> None:
        """Compile the frozen-prefix variants (prefix under no_grad, a boundary input that needs no
        grad) in the first step; with FP8 the prefix also runs from its weight caches. Without this
        the first suffix step stalls on the compile (seconds on an H100 with a cold cache)."""
        model = self.ctx.model
        warm_start = self.n_layer - 1
        if self.ctx.fp8:  # before_step turns these caches off again for this step's plan
            set_fp8_weight_cache(model, True, modules=list(model.transformer.h[:warm_start]))
            self._fp8_frozen = warm_start
        with autocast_ctx:
            model(x, y, active_start=warm_start).backward()
        model.zero_grad(set_to_none=True)

    def _check_ranks_agree(self, step: int, plan: StepPlan) -> None:
        n = self.n_layer
        v = [float(plan.active_start)] + [float(i in plan.skip) for i in range(n)]
        t = torch.tensor(v + [a * a for a in v], dtype=torch.float64, device=self.ctx.device)
        torch.distributed.all_reduce(t)
        s, sq = t[:n + 1].tolist(), t[n + 1:].tolist()
        w = self.ctx.world_size
        if any(a * a != w * b for a, b in zip(s, sq)):
            raise RuntimeError(f"step {step}: the ranks chose different {self.name} plans (this rank: active_start "
                               f"{plan.active_start}, skip {list(plan.skip)}); their schedules diverged, so the "
                               f"sharded optimizer would mix different blocks")


# ---------------------------------------------------------------------------------------------
# helpers for schedules whose plans follow the run's progress, and their flags


def horizon_progress(ctx: ScheduleContext, step: int, elapsed: float) -> float:
    """How far the run is: elapsed / time budget under a time budget (`elapsed` is rank 0's clock,
    the same on every rank), else step / num_iterations."""
    if ctx.time_budget:
        return elapsed / ctx.time_budget
    return step / ctx.num_iterations


def check_horizon(ctx: ScheduleContext, name: str) -> None:
    """A progress-driven schedule needs a horizon to measure progress against."""
    if not ctx.time_budget and ctx.num_iterations <= 0:
        raise ValueError(f"{name} needs a horizon (--num-iterations or a time budget) to measure progress")


def range_problem(flag: str, value: Any, lo: float, hi: float, *, integer: bool = False,
                  lo_open: bool = False, hi_open: bool = False) -> str | None:
    """One line naming `flag` if `value` is not a finite number (an integer with `integer`) in the
    interval from lo to hi (open at an end with lo_open / hi_open), else None."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        return f"{flag} ({value!r}) must be {kind}"
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        return f"{flag} ({value}) must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return None


def warm_window_variants(ctx: ScheduleContext, always_run: set[int], x, y, autocast_ctx) -> None:
    """Compile every attention-window variant of the block graph in the first step. Each window
    (S, L) is its own compiled variant; a step that leaves out every block of one window would
    otherwise meet that variant later and stall on its compile. Runs one full forward and backward
    when the blocks that always run do not cover every window; otherwise nothing."""
    blocks = ctx.model.transformer.h
    if {b.window for b in blocks} <= {blocks[i].window for i in always_run}:
        return
    with autocast_ctx:
        ctx.model(x, y).backward()
    ctx.model.zero_grad(set_to_none=True)


class FlagConfig:
    """A schedule's flags as a dataclass: field `x_y` is flag `--<prefix>-x-y`, attribute
    `<prefix>_x_y` of the parsed flags."""

    prefix: ClassVar[str]

    @classmethod
    def from_args(cls, args: Any):
        """From parsed flags (missing attributes keep their default)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, f"{cls.prefix}_{n}") for n in names if hasattr(args, f"{cls.prefix}_{n}")})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
