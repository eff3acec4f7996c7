"""`layer_drop`: random subnetworks that grow to the full depth (progressive layer dropping, after
PLD, Zhang & He 2020, and RaPTr, Panigrahi et al. 2024).

On each step every block except the first and the last is left out of the step (`StepPlan.skip`:
identity on the residual stream, no forward, no backward) with probability p(progress), where p
falls linearly from `--drop-rate-start` at progress 0 to 0 at progress `--drop-full-depth-at`;
from then on every step trains the full model. progress = elapsed / time budget when the horizon
is a time budget (rank 0's clock, which the trainer gives every rank), else step / num_iterations.
The first block (it turns the embedding into the stream every later block reads) and the last
(the head reads its output) always run, as in PLD.

Compute is cheap early, when the model is far from any optimum and a shallower random subnetwork
makes almost the same progress per step, and no block goes without updates for long: each middle
block trains on a fraction 1 - p of the early steps and on every step of the second part.

Semantics
---------
* Which blocks a step skips is a pure function of (`ctx.seed`, step) and the drop rate: a CPU
  `torch.Generator` seeded with a hash of both. Every torchrun rank draws the same blocks, and a
  resumed run draws what the straight run drew, without any RNG state in the checkpoint.
* A skipped block gets no gradient (`.grad` stays None), so MuonAdamW leaves its weights, its
  scalars and its optimizer state exactly as they were (optim.py's contract; tested): no momentum
  is applied, no weight decay, no AdamW step counted. It resumes from that state when next drawn.
* Nothing is rescaled. Dropout-style stochastic depth divides kept outputs by the keep rate or
  scales them at inference; here the drop rate reaches 0 well before the end, so the model that is
  evaluated is the one the last steps trained, and the residual stream of a pre-norm transformer
  tolerates a missing block without a correction. `--drop-mode=fixed` keeps the number of skipped
  blocks at its expected value on every step (stochastic rounding), a random subset as in RaPTr,
  for an even step time; `bernoulli` draws each block independently, as in PLD.
* Learning rates, the LR schedule and Muon momentum are untouched.

Prediction (written before any GPU measurement)
-----------------------------------------------
Step cost from the research note, C = f + (1 - f)(1 - d), d = the skipped fraction of block work
(no forward-only blocks here, q = 0), f = 0.28 at d12 and 0.03 at d20. With the defaults
(rate 0.5, full depth at 0.5) the expected skipped fraction is d(t) = 0.5 (1 - 2t) (n - 2) / n for
progress t < 0.5: the first step costs 0.70 of a full one at d12 and 0.56 at d20.

* Step horizon: mean C = 0.925 (d12), 0.891 (d20).
* Time budget (the frontier's terms): the cheap early steps buy 1.094x the steps of full_update at
  d12 and 1.157x at d20 (effective C = 0.914 and 0.864).

To beat full_update at equal time the schedule must reach the target loss within 1.094x
full_update's step count at d12 (1.157x at d20): the early subnetwork steps must be at least
~91 % (d12) / ~86 % (d20) as useful as full steps. The frontier at a 2-minute budget is d12 or
smaller, where the best case is about 9 % more steps, i.e. a few thousandths of a bpb. Expected:
time to target between 0.95 and 1.05 of full_update at d12, inside the seed noise; the gain can
only show at d20 and longer horizons, which the frontier does not reward at this budget.
Not modelled: skipped blocks also skip their Muon work (part of f, a small gain), and a
non-contiguous set of trained matrices cannot use Muon's packed in-place path (~1 ms per step at
d12, a small loss); the two roughly cancel.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from nanochat.schedules.base import (BlockSchedule, FlagConfig, ScheduleContext, StepPlan, check_horizon,
                                     horizon_progress, range_problem, warm_window_variants)

DROP_MODES = ("bernoulli", "fixed")


@dataclass
class LayerDropConfig(FlagConfig):
    """The `--drop-*` flags."""

    prefix: ClassVar[str] = "drop"
    rate_start: float = 0.5       # drop probability of each middle block at progress 0, in [0, 1]
    full_depth_at: float = 0.5    # progress at which the rate reaches 0 (full depth after), in (0, 1]
    mode: str = "bernoulli"       # 'bernoulli' (each block independently) | 'fixed' (expected count)

    def validate(self, n_layer: int) -> list[str]:
        """Every problem with these flags for a model of `n_layer` blocks, one line each."""
        problems = [range_problem("--drop-rate-start", self.rate_start, 0.0, 1.0),
                    range_problem("--drop-full-depth-at", self.full_depth_at, 0.0, 1.0, lo_open=True)]
        if self.mode not in DROP_MODES:
            problems.append(f"--drop-mode ({self.mode!r}) must be one of {', '.join(DROP_MODES)}")
        if isinstance(n_layer, int) and n_layer < 3:
            problems.append(f"--block-update-schedule=layer_drop keeps the first and the last block, so it "
                            f"needs --depth >= 3 (got {n_layer})")
        return [p for p in problems if p]


def step_seed(seed: int, step: int, salt: str) -> int:
    """A 63-bit generator seed from (seed, step): the same on every rank and in every process
    (Python's own `hash` of a string changes from process to process)."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------- the schedule
class LayerDropSchedule(BlockSchedule):
    name = "layer_drop"
    varies = True

    def __init__(self, ctx: ScheduleContext, config: LayerDropConfig):
        super().__init__(ctx)
        check_horizon(ctx, self.name)
        self.config = config
        self.skip_counts = [0] * self.n_layer  # steps each block was left out of
        self.full_depth_step: int | None = None  # the first step at drop rate 0
        self._rate = 0.0

    def drop_rate(self, progress: float) -> float:
        """p(progress): linear from --drop-rate-start at 0 to 0 at --drop-full-depth-at."""
        c = self.config
        return 0.0 if progress >= c.full_depth_at else c.rate_start * (1.0 - progress / c.full_depth_at)

    def skipped(self, step: int, rate: float) -> tuple[int, ...]:
        """The blocks step `step` leaves out at drop rate `rate` (sorted): a pure function of
        (ctx.seed, step, rate)."""
        middle = self.n_layer - 2
        if rate <= 0.0 or middle <= 0:
            return ()
        gen = torch.Generator().manual_seed(step_seed(self.ctx.seed, step, self.name))
        if self.config.mode == "bernoulli":
            draws = torch.rand(middle, generator=gen).tolist()
            return tuple(i + 1 for i, u in enumerate(draws) if u < rate)
        expected = rate * middle  # fixed: floor or ceil of the expected count, unbiased
        count = int(expected) + int(torch.rand((), generator=gen).item() < expected - int(expected))
        return tuple(sorted(i + 1 for i in torch.randperm(middle, generator=gen)[:count].tolist()))

    def plan(self, step: int, elapsed: float) -> StepPlan:
        self._rate = self.drop_rate(horizon_progress(self.ctx, step, elapsed))
        return StepPlan(skip=self.skipped(step, self._rate))

    def before_step(self, step: int, elapsed: float) -> StepPlan:
        new = step > self.last_recorded_step
        plan = super().before_step(step, elapsed)
        if new:
            for i in plan.skip:
                self.skip_counts[i] += 1
            if self._rate == 0.0 and self.full_depth_step is None:
                self.full_depth_step = step
        return plan

    def warm_up(self, x, y, autocast_ctx) -> None:
        warm_window_variants(self.ctx, {0, self.n_layer - 1}, x, y, autocast_ctx)

    def after_step(self, step: int, plan: StepPlan) -> list[str]:
        if step == self.full_depth_step:
            before = max(1, self.steps - 1)  # the steps recorded before this one
            return [f"layer_drop: full depth from step {step} on ({sum(self.skip_counts) / before:.2f} blocks "
                    f"skipped per step before it)"]
        return []

    def describe(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def stats(self) -> dict:
        base = super().stats()
        return {**base, "mean_skipped_blocks": self.n_layer - base["mean_trained_blocks"],
                "skip_counts": list(self.skip_counts), "full_depth_step": self.full_depth_step}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skip_counts": list(self.skip_counts), "full_depth_step": self.full_depth_step}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.skip_counts = [int(c) for c in d["skip_counts"]]
        self.full_depth_step = d["full_depth_step"]
