"""`depth_growth`: train a shallow network first, then grow it to full depth by duplicating its
blocks (depth stacking, after Gong et al. 2019, MIDAS and Gstack 2024).

Until progress `--growth-at` only every `--growth-factor`-th block runs (blocks 0, g, 2g, ...) and
the last block; the others are left out of every step (`StepPlan.skip`: identity on the residual
stream, no work at all). At the first step whose progress reaches `--growth-at` each left-out
block becomes a copy of the nearest trained block before it, weights and optimizer state both,
and from then on every block trains on every step. progress = elapsed / time budget under a time
budget (rank 0's clock, the same on every rank), else step / num_iterations.

Which block is copied where
---------------------------
The shallow network is the full one with identity gaps, so every block keeps its position (and
the attention window of that position) and nothing is re-indexed at growth. Each gap is filled
with a copy of the block just below it (factor 2: 0 0 2 2 4 4 ...). Order matters: a block is
trained on the residual stream at its own depth, and its copy placed right after it reads that
stream plus one more update from the same block, close to what the block learned on. Stacking
the whole shallow stack on top of itself (Gong et al.'s order) would feed copies of the bottom
blocks with top-of-stream features they never saw; MIDAS duplicates middle blocks for a related
reason. The windows follow positions, so with a mixed `--window-pattern` a copy may sit at a
window other than its source's; the anchor pattern `L` has one window.

Growth is not function-preserving: a duplicated block applies its update twice, so the loss is
expected to jump at growth and recover within a few dozen steps (the copies start from trained
weights rather than from an identity-like initialisation, which is the point).

What is copied, once
--------------------
At the growth step (in `before_step`, at a step boundary: the previous optimizer step is queued
before, the next forward after, on the same stream) for every (source, copy) block pair:
* every parameter (the four/six matrices and the two residual scalars), in place, so compiled
  regions, FP8 modules (they share the weight tensors) and Muon's packed storage keep pointing
  at the same tensors; live FP8 weight caches are rebuilt afterwards;
* the optimizer state (`MuonAdamW.copy_state`): Muon momentum buffers; AdamW step count and
  moments of the scalars. Under torchrun a matrix's Muon momentum lives only on its owning rank,
  so the owner broadcasts it when the copy belongs to another rank (a collective; every rank
  reaches it at the same step because the plans, checked across ranks by `before_step`, differ
  between the shallow and the grown model);
* the weight EMA's shadow, when the trainer passes it as `ctx.extra["ema"]`; otherwise the EMA of
  a copy would start from its never-trained initial weights.
`grown` and the growth step are in `state_dict`, so a resume after growth never copies again and
a resume before it copies at the same step as the straight run.
During the shallow phase the left-out blocks get no gradient, so the optimizer leaves them and
their state alone (they have none until growth gives them their source's).

Prediction (written before any GPU measurement)
-----------------------------------------------
Step cost from the research note, C = f + (1 - f)(1 - d), d = the skipped fraction of block work,
f = 0.28 at d12 and 0.03 at d20. Defaults (factor 2, growth at 0.3): the shallow model trains 7 of
12 blocks at d12 (0 2 4 6 8 10 11; d = 0.42, step cost 0.70) and 11 of 20 at d20 (d = 0.45,
step cost 0.56), for the first 30 % of the horizon.

* Step horizon: mean C = 0.910 (d12), 0.869 (d20).
* Time budget (the frontier's terms): 1.129x the steps of full_update at d12, 1.232x at d20
  (effective C = 0.886 and 0.811).

To beat full_update at equal time the grown model must reach the target loss within 1.129x
full_update's step count at d12 (1.232x at d20), growth spike included: the shallow phase plus the
recovery after growth may cost at most that many extra steps. The published 1.4-1.55x come from
horizons of billions of tokens; at a 2-minute d12 budget the shallow phase lasts ~36 s and the
growth spike is a larger share of the run. Expected: time to target 0.92-1.05 of full_update at
d12 (a gain only if the copies recover within ~50 steps), more likely a gain at d20. The frontier
judges d12: a d20 gain counts only if grown d20 beats full d12 at the same time, which needs far
more than 1.2x.
Not modelled: the shallow phase's trained matrices are every other one of each group, not a
contiguous run, so Muon cannot use its packed in-place path (~1 ms per step at d12), partly offset
by the skipped blocks' Muon work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nanochat.fp8 import refresh_fp8_weight_caches
from nanochat.schedules.base import (BlockSchedule, FlagConfig, ScheduleContext, StepPlan, check_horizon,
                                     horizon_progress, range_problem, warm_window_variants)


@dataclass
class DepthGrowthConfig(FlagConfig):
    """The `--growth-*` flags."""

    prefix: ClassVar[str] = "growth"
    at: float = 0.3    # progress at which the shallow model grows to full depth, in (0, 1)
    factor: int = 2    # the shallow model runs every factor-th block (and the last), in [2, depth - 1]

    def validate(self, n_layer: int) -> list[str]:
        """Every problem with these flags for a model of `n_layer` blocks, one line each."""
        problems = [range_problem("--growth-at", self.at, 0.0, 1.0, lo_open=True, hi_open=True)]
        if isinstance(n_layer, int) and n_layer < 3:
            problems.append(f"--block-update-schedule=depth_growth needs --depth >= 3 so that the shallow "
                            f"model leaves a block out (got {n_layer})")
        else:
            problems.append(range_problem("--growth-factor", self.factor, 2, max(2, n_layer - 1), integer=True))
        return [p for p in problems if p]


def shallow_blocks(n_layer: int, factor: int) -> tuple[int, ...]:
    """The blocks the shallow model trains: 0, factor, 2*factor, ... and the last."""
    return tuple(sorted(set(range(0, n_layer, factor)) | {n_layer - 1}))


def growth_sources(n_layer: int, factor: int) -> dict[int, int]:
    """{left-out block: the trained block it becomes a copy of} (the nearest trained one before it)."""
    trained = shallow_blocks(n_layer, factor)
    return {i: max(t for t in trained if t < i) for i in range(n_layer) if i not in trained}


class DepthGrowthSchedule(BlockSchedule):
    name = "depth_growth"
    varies = True

    def __init__(self, ctx: ScheduleContext, config: DepthGrowthConfig):
        super().__init__(ctx)
        check_horizon(ctx, self.name)
        if ctx.optimizer is None:
            raise ValueError("depth_growth copies optimizer state at growth: build its ScheduleContext with "
                             "the optimizer")
        self.config = config
        self.trained = shallow_blocks(self.n_layer, config.factor)
        self.sources = growth_sources(self.n_layer, config.factor)
        self.shallow_skip = tuple(sorted(self.sources))
        self.grown = False
        self.growth_step: int | None = None

    def plan(self, step: int, elapsed: float) -> StepPlan:
        if self.grown or horizon_progress(self.ctx, step, elapsed) >= self.config.at:
            return StepPlan()
        return StepPlan(skip=self.shallow_skip)

    def before_step(self, step: int, elapsed: float) -> StepPlan:
        # The plan (and under torchrun its cross-rank check) comes first: the copy below is a
        # collective, and ranks that disagreed about growing would otherwise hang in it.
        plan = super().before_step(step, elapsed)
        if not self.grown and not plan.skip:
            self.grow(step)
        return plan

    @torch.no_grad()
    def grow(self, step: int) -> None:
        """Copy each trained block into the left-out blocks after it: weights, optimizer state and
        weight-EMA shadow (see the module docstring). Called once, at a step boundary."""
        blocks = self.ctx.model.transformer.h
        pairs = []
        for dst, src in self.sources.items():
            src_params, dst_params = dict(blocks[src].named_parameters()), dict(blocks[dst].named_parameters())
            if src_params.keys() != dst_params.keys():
                raise RuntimeError(f"depth_growth: blocks {src} and {dst} have different parameters")
            for name, p in src_params.items():
                dst_params[name].copy_(p)
                pairs.append((p, dst_params[name]))
        self.ctx.optimizer.copy_state(pairs)
        ema = self.ctx.extra.get("ema")
        if ema is not None:
            index = {id(p): k for k, p in enumerate(ema.params)}
            for src, dst in pairs:
                ema.shadow[index[id(dst)]].copy_(ema.shadow[index[id(src)]])
        if self.ctx.fp8:
            refresh_fp8_weight_caches(self.ctx.model)
        self.grown, self.growth_step = True, step

    def warm_up(self, x, y, autocast_ctx) -> None:
        warm_window_variants(self.ctx, set(self.trained), x, y, autocast_ctx)

    def after_step(self, step: int, plan: StepPlan) -> list[str]:
        if step == self.growth_step:
            copies = " ".join(f"{src}->{dst}" for dst, src in self.sources.items())
            return [f"depth_growth: grew from {len(self.trained)} to {self.n_layer} blocks at step {step} "
                    f"(copied {copies}: weights and optimizer state)"]
        return []

    def describe(self) -> dict:
        return {"name": self.name, **self.config.to_dict(), "shallow_blocks": list(self.trained)}

    def stats(self) -> dict:
        base = super().stats()
        return {**base, "grown": self.grown, "growth_step": self.growth_step,
                "shallow_trained_blocks": len(self.trained), "shallow_steps": base["steps"] - base["full_steps"]}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "grown": self.grown, "growth_step": self.growth_step}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.grown, self.growth_step = bool(d["grown"]), d["growth_step"]
