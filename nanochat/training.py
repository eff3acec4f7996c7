"""One training step and what it needs: the LR schedule, the batch stream, the metrics log, the
validation evaluator and the step runner that ties model, optimizer, schedule and clock together.

`scripts/base_train.py` builds these objects and runs the loop (evaluate, save, step, log);
everything here is plain objects with no global state, tested on CPU.

The step (`StepRunner.train_step`), in order:
 1. start the clock if it is stopped; ask the block schedule for this step's plan;
 2. forward + backward over the gradient-accumulation micro-batches, prefetching the next batch;
 3. queue the loss's copy to the host, then (only where a flag needs the loss first) read it;
 4. the schedule's after-backward hook (live gradients), the LR, the optimizer step, which is
    skipped on the device when the loss is not finite, so a NaN never reaches the weights;
 5. read the previous step's loss (one step late) and log it; read this step's loss now instead
    where something needs it before the next step.
"""
from __future__ import annotations

import itertools
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nanochat.common import ScalarReader, print0
from nanochat.debug import any_rank, format_names, nonfinite_tensors
from nanochat.evaluation import evaluate_bpb
from nanochat.schedules.base import BlockSchedule, StepPlan
from nanochat.train_state import StepClock, TrainState


class TrainingStopped(Exception):
    """The run must stop with `exit_code`; `message` is printed (rank 0) as the run's last line.
    The last saved checkpoint is untouched."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# learning rate


@dataclass
class LRSchedule:
    """Warmup / constant / warmdown multiplier of every group's initial LR, over steps, or over
    elapsed step time when the horizon is a time budget (then no arm of a comparison can win by a
    longer or later schedule: every run's warmdown ends at its budget)."""
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    num_iterations: int
    time_budget: float | None = None

    def __call__(self, step: int, elapsed: float) -> float:
        if self.time_budget:
            return self._of_progress(elapsed / self.time_budget)
        warmup = round(self.warmup_ratio * self.num_iterations)
        warmdown = round(self.warmdown_ratio * self.num_iterations)
        if step < warmup:
            return (step + 1) / warmup
        if step <= self.num_iterations - warmdown:
            return 1.0
        progress = (self.num_iterations - step) / warmdown
        return progress + (1 - progress) * self.final_lr_frac

    def _of_progress(self, progress: float) -> float:
        if progress < self.warmup_ratio:
            return max(progress / self.warmup_ratio, 1e-3)
        if progress <= 1 - self.warmdown_ratio:
            return 1.0
        left = max(0.0, 1 - progress) / self.warmdown_ratio
        return left + (1 - left) * self.final_lr_frac

    def describe(self) -> dict:
        return {"lr_schedule": "time" if self.time_budget else "steps", "time_budget_sec": self.time_budget,
                "num_iterations": self.num_iterations, "warmup_ratio": self.warmup_ratio,
                "warmdown_ratio": self.warmdown_ratio, "final_lr_frac": self.final_lr_frac}


def muon_momentum(step: int) -> float:
    """Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps (nanochat)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------------------------
# batches, metrics, evaluation


class Batches:
    """The training batch stream. `consumed` is where the last *trained-on* batch ended: that is
    what a checkpoint stores, because the batch already prefetched into (x, y) is not used yet."""

    def __init__(self, loader, consumed_state: Any = None):
        self.loader = loader
        self.consumed = consumed_state
        self.x, self.y, self._state = next(loader)

    def advance(self) -> None:
        """The current (x, y) has been trained on; prefetch the next while the device works."""
        self.consumed = self._state
        self.x, self.y, self._state = next(self.loader)


class MetricsLog:
    """`--metrics-file` JSON lines (rank 0) and wandb, written in one place."""

    def __init__(self, path: str, master: bool, wandb_run: Any, wandb_every: int = 100):
        self.file = open(path, "a", encoding="utf-8") if (path and master) else None
        self.wandb_run = wandb_run
        self.wandb_every = wandb_every

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def wandb(self, record: dict) -> None:
        self.wandb_run.log(record)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        self.wandb_run.finish()


class ValEvaluator:
    """Validation bpb on the same rows every time: they are tokenized once, at the first call, and
    kept on the device (16 bytes per token; 8 MiB at 524,288 tokens). A loader made per evaluation
    would keep tokenizing ahead in its thread afterwards, and its GIL use slows the training steps
    that follow."""

    def __init__(self, make_loader: Callable[[], Any], steps: int, token_bytes: torch.Tensor, autocast_ctx=None):
        self.make_loader = make_loader
        self.steps = steps
        self.token_bytes = token_bytes
        self.autocast_ctx = autocast_ctx if autocast_ctx is not None else nullcontext()
        self.batches = None

    def __call__(self, model) -> float:
        if self.batches is None:
            loader = self.make_loader()
            self.batches = [b[:2] for b in itertools.islice(loader, self.steps)]  # fewer if the split ends first
            loader.close()
        return evaluate_bpb(model, iter(self.batches), len(self.batches), self.token_bytes, self.autocast_ctx)


# ---------------------------------------------------------------------------------------------
# the step


@dataclass
class StepRecord:
    """A step whose loss is not read yet (or just read): what its log line needs."""
    step: int
    plan: StepPlan
    lrm: float
    reader: ScalarReader
    mark: Any = None  # the device mark recorded with its loss's copy (the step clock's, CUDA only)
    mem_mib: float = 0.0
    lines: list[str] = field(default_factory=list)


@dataclass
class RunInfo:
    """Fixed facts of the run that the step and its log line need."""
    device_type: str
    device: Any
    ddp: bool
    world_size: int
    grad_accum_steps: int
    total_batch_size: int
    num_iterations: int
    time_budget: float | None
    show_horizon: bool  # print "/num_iterations" after the step number
    compiled: bool
    peak_flops: float | None


class StepRunner:
    """Runs training steps and closes them on the clock; see the module docstring for the order.

    Everything the loop changes lives in `state` (TrainState) and `clock` (StepClock); the
    objects passed in (model, optimizer, schedule, guard, ...) keep their own state."""

    def __init__(self, info: RunInfo, *, model, optimizer, schedule: BlockSchedule, batches: Batches,
                 state: TrainState, clock: StepClock, lr: LRSchedule, metrics: MetricsLog, guard, mem_probe,
                 autocast_ctx, ema=None, spikes=None, fault_inject: dict | None = None, debug_nan: bool = False):
        self.info = info
        self.model, self.optimizer, self.schedule, self.batches = model, optimizer, schedule, batches
        self.state, self.clock, self.lr, self.metrics = state, clock, lr, metrics
        self.guard, self.mem_probe, self.autocast_ctx = guard, mem_probe, autocast_ctx
        self.ema, self.spikes = ema, spikes
        self.fault_inject = fault_inject or {}
        self.debug_nan = debug_nan
        self.params = [p for group in optimizer.param_groups for p in group["params"]]  # each parameter once
        self.readers = (ScalarReader(info.device), ScalarReader(info.device))  # steps N and N+1 in flight
        self.pending: StepRecord | None = None  # the step whose loss is read one step late
        self.peak_step_mem = 0.0  # MiB, the largest per-step peak of this process
        self.flops_by_plan: dict = {}  # training FLOPs per token by plan, for MFU
        self.n_layer = model.config.n_layer
        self._cuda = info.device_type == "cuda"
        self._max_memory = torch.cuda.max_memory_allocated if self._cuda else (lambda: 0)

    # ------------------------------------------------------------------ clock helpers
    def budget_spent(self) -> bool:
        """Rank 0's clock is every rank's clock (called once per step): all ranks stop on the same
        step and use the same time-based LR and schedule decisions, so weights stay equal."""
        if not self.info.time_budget:
            return False
        if self.info.ddp:
            clock = torch.tensor(self.state.train_elapsed, dtype=torch.float64, device=self.info.device)
            torch.distributed.broadcast(clock, 0)
            self.state.train_elapsed = clock.item()
        return self.state.train_elapsed >= self.info.time_budget

    def settle(self) -> None:
        """Read any pending loss and stop the clock on an idle device (before an evaluation or a
        save uses it)."""
        self.finish_pending()
        self.clock.stop()

    # ------------------------------------------------------------------ one step
    def train_step(self) -> None:
        info, state, model, schedule, b = self.info, self.state, self.model, self.schedule, self.batches
        step = state.step
        clock_was_stopped = self.clock.start()  # the first step, or after an evaluation
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        if info.compiled and step == self.clock.first_step:
            schedule.warm_up(b.x, b.y, self.autocast_ctx)
        plan = schedule.before_step(step, state.train_elapsed)
        loss_sum = torch.zeros((), device=info.device)
        self.mem_probe.start(step)  # --debug-mem-every: per-phase peaks (a no-op on most steps)
        for _ in range(info.grad_accum_steps):
            with self.autocast_ctx:
                loss = model(b.x, b.y, active_start=plan.active_start, skip=plan.skip)
            self.mem_probe.end("forward")
            if step in self.fault_inject:
                loss = loss * self.fault_inject[step]
            loss_sum += loss.detach()
            (loss / info.grad_accum_steps).backward()
            self.mem_probe.end("backward")
            b.advance()
        if info.ddp:  # the logged loss is the mean over every rank's micro-batches
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= info.world_size
        loss_mean = loss_sum / info.grad_accum_steps
        reader = self.readers[step % 2]
        reader.start(loss_mean)  # its copy to the host goes ahead of the optimizer's kernels

        # The loss reaches the host before the optimizer step only where a flag needs it there
        # (--debug-nan checks and names gradients, --auto-lr-reduction sets this step's LR from it).
        # Otherwise the step is queued first and skipped on the device if the loss is not finite.
        train_loss = None
        if self.debug_nan or self.spikes:
            train_loss = loss_mean.item()
            problem = self.guard.check_before_step(train_loss)
            # (any_rank is a collective: every rank calls it, whatever its own answer)
            if info.ddp and self.guard.max_skips > 0 and any_rank(problem is not None, info.device, info.ddp) \
                    and not problem:
                problem = "non-finite gradients on another rank"  # every rank must skip together
            if problem:
                self.bad_step(step, problem, train_loss, reader.event)
                state.step += 1
                return
        grads_reduced = schedule.after_backward(step, plan)
        lrm = self._set_lr(step, train_loss)
        self.optimizer.step(reduce_grads=not grads_reduced, skip_if=~torch.isfinite(loss_mean))
        # Host work that needs no result goes here, while the device still runs the step (setting
        # .grad directly is ~50x cheaper than nn.Module.zero_grad's parameter walk).
        for p in self.params:
            p.grad = None
        self.finish_pending()  # the previous step's loss, read one step late
        rec = StepRecord(step, plan, lrm, reader, reader.event)
        # Read this step's loss now where something needs it before the next step: the first step
        # after the clock started (its time is the compile time), a measuring schedule step (the
        # next plan depends on it), the EMA and --debug-mem-every (both act on this step's result),
        # and --debug-nan / --auto-lr-reduction (read before the optimizer). Off CUDA every op has
        # finished when it returns: a late read would only book the next step's time to this one.
        read_late = not (not self._cuda or clock_was_stopped or train_loss is not None or plan.measure
                         or self.ema or self.mem_probe.active)
        if not read_late:
            if train_loss is None:
                train_loss = reader.result()  # the host sync of this step, with the optimizer queued
                if problem := self.guard.check_before_step(train_loss):  # the step above was a no-op
                    self.bad_step(step, problem, train_loss, reader.event)
                    state.step += 1
                    return
            self._good_step()
            if self.ema:
                self.ema.update()
            self.mem_probe.end("optimizer")
            if after := self.guard.check_after_step():  # --debug-nan: the update itself went non-finite
                raise TrainingStopped(f"step {step:05d} | {after}; stopping (an optimizer step cannot be undone). "
                                      f"The last saved checkpoint is untouched.")
        for line in schedule.after_step(step, plan):
            print0(line)
        rec.mem_mib = max(self._max_memory(), self.mem_probe.step_peak()) / 2**20
        rec.lines = [line for line in (schedule.log_line(step), self.mem_probe.report()) if line]
        if read_late:
            self.pending = rec
        else:
            self.log_step(rec, train_loss)
        state.step += 1

    def _set_lr(self, step: int, train_loss: float | None) -> float:
        lrm = self.lr(step, self.state.train_elapsed)
        if self.spikes:  # --auto-lr-reduction: a loss spike scales every LR down from this step on
            if line := self.spikes.update(step, train_loss):
                print0(line)
                self.metrics.write({"kind": "lr_reduction", "step": step, "loss": train_loss,
                                    "lr_scale": self.spikes.lr_scale})
            if self.info.ddp:  # rank 0's detector decides, so every rank uses the same learning rates
                scale = torch.tensor(self.spikes.lr_scale, dtype=torch.float64, device=self.info.device)
                torch.distributed.broadcast(scale, 0)
                self.spikes.lr_scale = scale.item()
            lrm *= self.spikes.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        return lrm

    # ------------------------------------------------------------------ closing steps
    def _good_step(self) -> None:
        self.guard.on_good_step()
        self.state.nonfinite_streak = self.guard.consecutive

    def finish_pending(self) -> None:
        """Read the pending step's loss (one step late) and close it."""
        if self.pending is None:
            return
        rec, self.pending = self.pending, None
        train_loss = rec.reader.result()
        if problem := self.guard.check_before_step(train_loss):  # its optimizer step was skipped on the device
            self.bad_step(rec.step, problem, train_loss, rec.mark)
            return
        self._good_step()
        self.log_step(rec, train_loss)

    def bad_step(self, k: int, problem: str, loss: float, mark: Any = None) -> None:
        """Step k was not finite and never changed the weights (its optimizer update was not made,
        or was skipped on the device): count it (--skip-nonfinite-steps) or stop the run."""
        skip = self.guard.on_bad_step()
        self.state.nonfinite_streak = self.guard.consecutive
        limit = self.guard.max_skips  # --skip-nonfinite-steps
        if not skip:
            in_a_row = f" ({self.guard.consecutive} in a row, --skip-nonfinite-steps={limit})" if limit > 0 else ""
            raise TrainingStopped(f"step {k:05d} | {problem}; stopping without its optimizer update{in_a_row}. "
                                  f"The last saved checkpoint is untouched.")
        self.model.zero_grad(set_to_none=True)
        self.clock.close_skipped_step(mark)
        self.state.record_skipped_loss(k)
        self.state.nonfinite_skipped += 1
        print0(f"step {k:05d} | {problem} | step skipped: no optimizer update ({self.guard.consecutive} in a row, "
               f"limit {limit}; {self.state.nonfinite_skipped} skipped in total)")
        self.metrics.write({"kind": "skip", "step": k, "loss": loss, "problem": problem,
                            "skipped_total": self.state.nonfinite_skipped})

    def log_step(self, rec: StepRecord, train_loss: float) -> None:
        """Close step rec.step on the clock (its loss was just read) and print/record it."""
        info, k, plan = self.info, rec.step, rec.plan
        dt = self.clock.close_step(k, rec.mark)
        self.peak_step_mem = max(self.peak_step_mem, rec.mem_mib)
        debiased = self.state.record_loss(k, train_loss)
        tok_per_sec = info.total_batch_size / dt
        # MFU counts the work done: a frozen prefix does forward-only FLOPs, a skipped block none.
        if plan.key() not in self.flops_by_plan:  # walks the parameters: once per plan, not per step
            self.flops_by_plan[plan.key()] = self.model.estimate_flops(plan.active_start, plan.skip)
        flops = self.flops_by_plan[plan.key()]
        mfu = 100 * flops * tok_per_sec / (info.peak_flops * info.world_size) if info.peak_flops else None
        trained = plan.trained_blocks(self.n_layer)
        horizon = f"/{info.num_iterations}" if info.show_horizon else ""
        print0(f"step {k:05d}{horizon} | loss {debiased:.4f} | lrm {rec.lrm:.2f} | dt {dt * 1000:.1f}ms | "
               f"tok/s {tok_per_sec:,.0f}" + (f" | mfu {mfu:.1f}%" if mfu is not None else "")
               + (f" | mem {rec.mem_mib:,.0f}MiB" if self._cuda else "")
               + (f" | active {trained}/{self.n_layer}" if self.schedule.varies else "")
               + f" | eta {self.clock.eta(k, info.num_iterations, info.time_budget)}")
        record = {"kind": "step", "step": k, "loss": train_loss, "loss_ema": debiased, "lrm": rec.lrm, "dt": dt,
                  "tok_per_sec": tok_per_sec, "mfu": mfu, "step_peak_mib": rec.mem_mib if self._cuda else None,
                  "active_layers": trained, "train_elapsed": self.state.train_elapsed,
                  "tokens": (k + 1) * info.total_batch_size}
        self.metrics.write(record)
        for line in rec.lines:  # made when the step ran (the schedule's and the memory lines)
            print0(line)
        if self.metrics.wandb_every > 0 and k % self.metrics.wandb_every == 0:
            logged = {"loss": debiased, "raw_loss": train_loss, "lrm": rec.lrm, "tok_per_sec": tok_per_sec, "dt": dt,
                      "mfu": mfu, "active_layers": trained, "train_elapsed": self.state.train_elapsed}
            self.metrics.wandb({"step": k, **{f"train/{key}": v for key, v in logged.items() if v is not None}})

    # ------------------------------------------------------------------ checkpoints
    def check_weights_finite(self) -> None:
        """Weights holding NaN/Inf are never saved: the run stops so the latest checkpoint stays a
        good one (one fused reduction and sync per save)."""
        bad = nonfinite_tensors(list(self.model.named_parameters()))
        if bad:
            raise TrainingStopped(f"step {self.state.step:05d} | not saving a checkpoint: non-finite parameters "
                                  f"({len(bad)}): {format_names(bad, self.guard.max_names)}. "
                                  f"The last saved checkpoint is untouched.")

    def loader_states(self) -> list:
        """Each rank reads its own data streams, so every rank's loader position is saved."""
        if not self.info.ddp:
            return [self.batches.consumed]
        states = [None] * self.info.world_size
        torch.distributed.all_gather_object(states, self.batches.consumed)
        return states


def summary_record(runner: StepRunner, schedule_name: str) -> dict:
    """The run's final JSON line (--metrics-file): what the report and the A/B tooling read."""
    state, clock, info = runner.state, runner.clock, runner.info
    stats = clock.stats(info.total_batch_size)
    sched = runner.schedule.stats()
    record = {"kind": "summary", "steps": state.step, "steps_this_run": state.step - clock.first_step,
              "train_elapsed": state.train_elapsed, "first_step_sec": clock.compile_sec,
              "launch_to_first_step_end_sec": clock.launch_sec,
              "steady_tok_per_sec": clock.steady_tok_per_sec(info.total_batch_size),
              "peak_mib": runner.peak_step_mem if info.device_type == "cuda" else None,
              "final_val_bpb": state.val_bpb, "min_val_bpb": state.min_val_bpb if math.isfinite(state.min_val_bpb) else None,
              "final_loss_ema": state.loss_ema(), "tokens": state.step * info.total_batch_size,
              "schedule": schedule_name, "step_times": stats,
              "schedule_stats": {k: v for k, v in sched.items() if k != "dynamic_suffix"},
              "nonfinite_skipped": state.nonfinite_skipped,
              "lr_reductions": runner.spikes.reductions if runner.spikes else 0}
    if "dynamic_suffix" in sched:
        record["dynamic_suffix"] = sched["dynamic_suffix"]
    return record
