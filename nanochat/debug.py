"""Run-time guards and debugging aids for the training loop.

Everything here is a small object or function with no GPU-only assumption, so it is unit-tested on
CPU (`tests/test_debug.py`); `scripts/base_train.py` only wires it.

* :func:`nonfinite_tensors` -- which tensors of a list hold NaN/Inf. The common (all finite) case
  costs one fused reduction over the whole list (``torch._foreach_norm``) and **one** host sync;
  the per-tensor work that finds the names only runs on failure. An fp32 L2 norm can overflow to
  inf for huge but finite values, so a non-finite norm is confirmed with an exact ``isfinite``
  check before a tensor is named (no false alarms; NaN always propagates through the norm, so no
  misses either).
* :class:`NonFiniteGuard` -- the policy for a step whose loss (or, with ``--debug-nan``, whose
  gradients) are not finite: stop before ``optimizer.step`` (the default), or skip the step
  (``--skip-nonfinite-steps=N``: gradients dropped, no optimizer update, the step and its batch
  still count toward the horizon) and stop once more than N steps in a row were bad. A run of bad
  steps that long means the weights or the optimizer state are broken, not one batch; skipping
  for ever would only burn compute.
* :class:`LossSpikeDetector` -- ``--auto-lr-reduction``: a loss more than ``zscore`` standard
  deviations above the mean of the last ``window`` (finite, non-spike) losses multiplies every
  learning rate by ``factor`` from that step on, at most ``max_reductions`` times. Spikes are
  kept out of the window so that one spike does not hide the next. State is checkpointed.
* :class:`PhaseMemory` -- ``--debug-mem-every=N``: CUDA peak memory per phase (forward,
  backward, optimizer) every N steps. The caching allocator counts on the host when a kernel is
  *queued*, so no synchronisation is needed; the peak counters are reset between phases.
* :class:`GracefulStop` -- SIGTERM/SIGINT set a flag; the loop finishes its step, saves a
  checkpoint and exits 0. A second signal aborts at once (default behaviour restored).
* :func:`fault_injection_from_env` -- a test hook: ``NANOCHAT_FAULT_INJECT="3:nan,9:50"``
  multiplies the loss of step 3 by NaN and of step 9 by 50 (before backward), so the NaN and spike
  paths are exercised end to end through the real script. Unset, it costs nothing.
"""
from __future__ import annotations

import math
import os
import signal
from collections import deque
from collections.abc import Sequence

import torch

FAULT_ENV = "NANOCHAT_FAULT_INJECT"


# ---------------------------------------------------------------------------------------------
# non-finite detection


def describe_nonfinite(name: str, t: torch.Tensor) -> str:
    """'name (shape 4x8: 3 NaN, 1 Inf of 32)'; only called on failure (it syncs)."""
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    shape = "x".join(map(str, t.shape)) or "scalar"
    return f"{name} (shape {shape}: {nan} NaN, {inf} Inf of {t.numel()})"


def nonfinite_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """Descriptions of the tensors in `named` that hold NaN or Inf ([] when all are finite).

    One fused on-device reduction and one host sync when everything is finite; names are only
    worked out on failure. Non-floating tensors are ignored.
    """
    named = [(n, t) for n, t in named if t is not None and t.is_floating_point() and t.numel() > 0]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named], 2, dtype=torch.float32)
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return []
    return [describe_nonfinite(name, t) for (name, t), n in zip(named, norms)
            if not bool(torch.isfinite(n)) and not bool(torch.isfinite(t).all())]


def format_names(names: list[str], max_names: int) -> str:
    """At most `max_names` of `names`, then '... and K more'."""
    shown = names[:max_names]
    more = f"; ... and {len(names) - max_names} more" if len(names) > max_names else ""
    return "; ".join(shown) + more


class NonFiniteGuard:
    """Decides what a step with a non-finite loss (or gradients) does: skip it or stop the run.

    `named_params`: the model's ``named_parameters()`` (gradients are read from them).
    `debug_nan`: also check every gradient before the step and every parameter after it, and name
    the offending tensors (at most `max_names`). `max_skips`: -1 = never skip (stop at the first
    bad step); N >= 1 = skip up to N bad steps in a row, stop at the (N+1)-th.
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], *, debug_nan: bool = False,
                 max_names: int = 10, max_skips: int = -1):
        self.named_params = list(named_params)
        self.debug_nan = debug_nan
        self.max_names = max_names
        self.max_skips = max_skips
        self.consecutive = 0  # bad steps in a row, up to now
        self.skipped = 0  # skipped steps in total (this process)

    def _grads(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"grad {n}", p.grad) for n, p in self.named_params if p.grad is not None]

    def _params(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"param {n}", p) for n, p in self.named_params]

    def check_before_step(self, loss: float) -> str | None:
        """None if the step may go ahead, else what is wrong (naming tensors under --debug-nan).

        `loss` is the step's (already synced) mean loss; the gradient check (debug_nan only)
        is one more fused reduction and sync."""
        bad_grads = nonfinite_tensors(self._grads()) if self.debug_nan else []
        if math.isfinite(loss) and not bad_grads:
            return None
        what = f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite gradients"
        if self.debug_nan:
            culprits = nonfinite_tensors(self._params()) + bad_grads
            if culprits:
                what += f" | non-finite tensors ({len(culprits)}): {format_names(culprits, self.max_names)}"
            else:
                what += " | every parameter and gradient is finite: the forward pass overflowed"
        return what

    def check_after_step(self) -> str | None:
        """debug_nan only: parameters that the optimizer step made non-finite (None if fine)."""
        if not self.debug_nan:
            return None
        bad = nonfinite_tensors(self._params())
        if not bad:
            return None
        return f"non-finite parameters after the optimizer step ({len(bad)}): {format_names(bad, self.max_names)}"

    def on_bad_step(self) -> bool:
        """Count a bad step; True = skip it, False = stop the run."""
        self.consecutive += 1
        if self.max_skips > 0 and self.consecutive <= self.max_skips:
            self.skipped += 1
            return True
        return False

    def on_good_step(self) -> None:
        self.consecutive = 0


# ---------------------------------------------------------------------------------------------
# loss spikes -> learning-rate reduction


class LossSpikeDetector:
    """z-score spike detection over a window of recent losses; each spike scales the LR down.

    ``update(step, loss)`` returns a log line when it acted (else None); ``lr_scale`` multiplies
    every group's learning rate. Detection starts once the window is full.
    """

    def __init__(self, window: int = 50, zscore: float = 6.0, factor: float = 0.5, max_reductions: int = 5):
        if window < 2 or zscore <= 0 or not 0 < factor < 1 or max_reductions < 1:
            raise ValueError("need window >= 2, zscore > 0, 0 < factor < 1, max_reductions >= 1")
        self.window, self.zscore, self.factor, self.max_reductions = window, zscore, factor, max_reductions
        self.history: deque[float] = deque(maxlen=window)
        self.lr_scale = 1.0
        self.reductions = 0
        self.spikes = 0

    def update(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return None  # the non-finite guard deals with these
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / (self.window - 1))
            z = (loss - mean) / max(std, 1e-6 * max(abs(mean), 1.0))
            if z > self.zscore:
                self.spikes += 1
                head = (f"step {step:05d} | loss spike: {loss:.4f} is {z:.1f} std above the mean of the last "
                        f"{self.window} losses ({mean:.4f} +- {std:.4f})")
                if self.reductions >= self.max_reductions:
                    return f"{head}; LR left at x{self.lr_scale:.4g} (already reduced {self.reductions} times)"
                self.reductions += 1
                self.lr_scale *= self.factor
                return f"{head}; auto LR reduction {self.reductions}/{self.max_reductions}: LR scale now x{self.lr_scale:.4g}"
        self.history.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history), "lr_scale": self.lr_scale, "reductions": self.reductions,
                "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(v) for v in state["history"]), maxlen=self.window)
        self.lr_scale = float(state["lr_scale"])
        self.reductions = int(state["reductions"])
        self.spikes = int(state.get("spikes", 0))


# ---------------------------------------------------------------------------------------------
# per-phase memory


class PhaseMemory:
    """--debug-mem-every: CUDA peak memory of each phase (forward, backward, optimizer) of a step.

    ``start(step)`` arms it on every `every`-th step; ``end(phase)`` records the peak since the
    previous mark (max over micro-steps) and resets the counter; ``report()`` gives the line.
    Off (every <= 0) or off CUDA every call is a no-op: ``unavailable_message`` says so once.
    """

    def __init__(self, every: int, device_type: str):
        self.every = every
        self.enabled = every > 0 and device_type == "cuda"
        self.active = False
        self.step = -1
        self.peaks: dict[str, int] = {}

    @staticmethod
    def unavailable_message(every: int, device_type: str) -> str | None:
        if every > 0 and device_type != "cuda":
            return (f"--debug-mem-every={every}: per-phase peak memory is measured with the CUDA caching "
                    f"allocator, so it is CUDA-only; this run is on {device_type}: no memory report "
                    f"(training continues)")
        return None

    def start(self, step: int) -> None:
        self.active = self.enabled and step % self.every == 0
        if self.active:
            self.step = step
            self.peaks = {}
            torch.cuda.reset_peak_memory_stats()

    def end(self, phase: str) -> None:
        if self.active:
            self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def step_peak(self) -> int:
        """Peak bytes of the whole step when armed (the phases' max), else 0."""
        return max(self.peaks.values()) if self.active and self.peaks else 0

    def report(self) -> str | None:
        if not self.active:
            return None
        mib = 2 ** 20
        phases = " | ".join(f"{k} peak {v / mib:,.0f}MiB" for k, v in self.peaks.items())
        return (f"step {self.step:05d} | memory: {phases} | allocated now {torch.cuda.memory_allocated() / mib:,.0f}MiB"
                f" | reserved {torch.cuda.memory_reserved() / mib:,.0f}MiB")


# ---------------------------------------------------------------------------------------------
# graceful stop on SIGTERM / SIGINT


class GracefulStop:
    """Install with ``install()``; ``requested`` turns true on the first SIGTERM/SIGINT.

    The handler only records the signal (printing from a handler can deadlock on the stdout
    lock); the training loop checks the flag between steps. A second signal restores the
    default handlers and re-delivers itself: Ctrl-C twice still kills a stuck run.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "GracefulStop":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def _handler(self, signum, frame):  # noqa: ARG002 (signal API)
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


# ---------------------------------------------------------------------------------------------
# fault injection (tests)


def fault_injection_from_env(environ: dict | None = None) -> dict[int, float]:
    """{step: loss multiplier} from $NANOCHAT_FAULT_INJECT ('3:nan,9:50'); {} when unset.

    A malformed value raises ValueError naming the variable."""
    text = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
    out: dict[int, float] = {}
    if not text:
        return out
    for item in text.split(","):
        try:
            step, factor = item.split(":")
            out[int(step)] = float(factor)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected comma-separated STEP:FACTOR items "
                             f"such as '3:nan,9:50'") from None
    return out


def any_rank(flag: bool, device: torch.device, ddp: bool) -> bool:
    """True if `flag` is true on any rank (a MAX all-reduce under torchrun, else `flag`)."""
    if not ddp:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())

