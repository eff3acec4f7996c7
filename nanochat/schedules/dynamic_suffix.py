"""`dynamic_suffix` as a block-update schedule: the relevance controller of
`nanochat/dynamic_suffix.py` behind the `BlockSchedule` interface.

Most steps train only a suffix of blocks, chosen from a per-block relevance EMA measured on
periodic full steps (probes). The controller is pure Python and tested on CPU; this adapter adds
what touches the device: relevance from the live gradients (rank-averaged under torchrun, as one
process with accumulation would measure them), the freeze start from the clock under a time
budget, and compiling the frozen-prefix graph in the first step.
"""
from __future__ import annotations

from nanochat.schedules.base import BlockSchedule, ScheduleContext, StepPlan
from nanochat.dynamic_suffix import DynamicSuffixConfig, DynamicSuffixController

_NOT_SET = 10 ** 9  # freeze start before the clock has set it (time budgets)


class DynamicSuffixSchedule(BlockSchedule):
    name = "dynamic_suffix"
    varies = True

    def __init__(self, ctx: ScheduleContext, config: DynamicSuffixConfig):
        super().__init__(ctx)
        self.config = config
        self.controller = DynamicSuffixController(config, ctx.n_layer, ctx.num_iterations)
        # Under a time budget the step count is unknown, so --dyn-freeze-start-frac is a fraction of
        # the budget: the freeze starts at the first step after that much step time.
        self.freeze_by_clock = bool(ctx.time_budget) and config.freeze_start_step < 0
        if self.freeze_by_clock:
            self.controller.freeze_start = _NOT_SET
        self._scores = None

    def plan(self, step: int, elapsed: float) -> StepPlan:
        ctl = self.controller
        self._scores = None  # a measurement of a step that was skipped (non-finite) is dropped
        if self.freeze_by_clock and ctl.freeze_start == _NOT_SET \
                and elapsed >= self.config.freeze_start_frac * self.ctx.time_budget:
            ctl.freeze_start = max(step, self.config.warmup_steps)
        return StepPlan(active_start=ctl.active_start(step), measure=ctl.is_full_step(step))

    def warm_up(self, x, y, autocast_ctx) -> None:
        self._warm_frozen_prefix(x, y, autocast_ctx)

    def after_backward(self, step: int, plan: StepPlan) -> bool:
        if not plan.measure:
            return False
        reduced = False
        if self.ctx.ddp:
            self.ctx.optimizer.reduce_grads()
            reduced = True
        scores = self.controller.block_scores(self.ctx.model.block_params())
        if self.ctx.ddp:  # identical already; averaging makes sure all controllers see the same bits
            import torch.distributed as dist  # noqa: PLC0415
            dist.all_reduce(scores)
            scores /= self.ctx.world_size
        self._scores = scores
        return reduced

    def after_step(self, step: int, plan: StepPlan) -> list[str]:
        if self._scores is None:
            return []
        scores, self._scores = self._scores, None
        self.controller.update(step, scores)  # the one host sync, after the optimizer is queued
        return [f"dynamic_suffix warning: {w}" for w in self.controller.pop_warnings()]

    def log_line(self, step: int) -> str | None:
        return self.controller.log_line(step)

    def describe(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def stats(self) -> dict:
        return {**super().stats(), "dynamic_suffix": self.controller.stats()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "controller": self.controller.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.controller.load_state_dict(d["controller"])

    def load_checkpoint_meta(self, meta: dict) -> None:
        # Checkpoints written before the schedule interface kept the controller's state alone.
        if not meta.get("schedule") and meta.get("dynamic_suffix"):
            ctl = self.controller
            ctl.load_state_dict(meta["dynamic_suffix"])
            self.last_recorded_step = ctl.last_recorded_step
            self.steps, self.sum_trained = ctl.steps_recorded, ctl.sum_active_all
            self.full_steps = sum(ctl.full_steps.values()) + ctl.suffix_hist[self.n_layer]
        else:
            super().load_checkpoint_meta(meta)
