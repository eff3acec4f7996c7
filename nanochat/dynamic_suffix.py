"""Dynamic-suffix block updates: the controller that decides, step by step, which suffix of the
transformer blocks trains.

What the model does
-------------------
``GPT.forward(idx, targets, active_start=a)`` runs blocks ``[0, a)`` under ``torch.no_grad()``
(the *frozen prefix*: forward only, no activations kept, no backward) and blocks ``[a, n)``
normally (the *active suffix*). ``a = 0`` is an ordinary full update.

What this module does
---------------------
``DynamicSuffixController`` owns the schedule and nothing else; it has no GPU assumptions and is
unit-tested on CPU. The trainer calls it like this::

    ctl = DynamicSuffixController(cfg, n_layer, num_iterations)
    for step in range(start_step, num_iterations):
        a = ctl.active_start(step)                 # 0 on full steps; records the step's stats
        loss = model(x, y, active_start=a); loss.backward()
        if ctl.is_full_step(step):                 # full step: measure relevance
            scores = ctl.block_scores([list(b.parameters()) for b in model.transformer.h])
            ctl.update(step, scores)               # the one host sync of the step
        optimizer.step(); model.zero_grad(set_to_none=True)
        if (line := ctl.log_line(step)): print0(line)

``block_scores`` must run AFTER ``backward()`` and BEFORE ``optimizer.step()`` / ``zero_grad``:
the seed system read the gradients after its optimizer hooks had freed them and measured all
zeros, so its "relevance" never meant anything. An all-zero measurement is reported as a warning
here, never silently used.

Schedule
--------
A step is a *full* step (``active_start = 0``) when, checked in this order:

* ``step < warmup_steps``                                    -> ``'warmup'``
* ``step < freeze_start``                                    -> ``'pre_freeze'``
  (``freeze_start = freeze_start_step`` if it is ``>= 0`` else
  ``round(freeze_start_frac * num_iterations)``; never below ``warmup_steps``)
* ``refresh_every > 0 and step % refresh_every == 0``        -> ``'refresh'``
* ``probe_every > 0 and step % probe_every == 0``            -> ``'probe'``
* no valid relevance has been measured yet                   -> ``'probe'``

otherwise it is a ``'suffix'`` step and trains the suffix chosen at the last measurement.

Relevance and the choice of suffix
----------------------------------
On every full step the per-block relevance is measured from the live gradients:

* ``grad_ratio``:       ``||g_b|| / (||W_b|| + eps)``, norms over all of block b's parameters
  jointly (a relative update-pressure measure, independent of the block's weight scale);
* ``saliency_abs_gp``:  ``sum |g_b * W_b|`` over block b (first-order Taylor estimate of how much
  the loss would change if the block's weights were removed).

A parameter whose ``.grad`` is ``None`` counts as a zero gradient (it still counts in ``||W_b||``).
The scores are folded into a per-block EMA (``ema = d * ema + (1 - d) * s``; the first measurement
initialises it). The EMA is normalised to sum 1 and the active suffix is the SMALLEST suffix,
counting from the top block down, whose cumulative relevance reaches ``relevance_threshold``;
that count is then clamped to ``[min_active_layers, max_active_layers or n_layer]`` and
``active_start = n_layer - n_active``. So relevance concentrated at the top trains few blocks,
uniform relevance trains many, relevance concentrated at the bottom trains all of them.

The seed system's cap (``depth/2``) bound on every step, so its "selector" never selected. The
controller therefore counts, over suffix steps, how often the cap bound (the threshold alone
wanted more layers) and how often the floor bound; ``log_line`` prints both so a run that is
really a static "train the top half" schedule says so.

Non-finite or negative scores are not folded into the EMA (they would poison it for good); an
invalid measurement or an all-zero EMA selects the full model (``n_active = n_layer``) and records
a warning string (``stats()['warnings']``, ``pop_warnings()``) instead of crashing.

Frozen semantics (implemented by the trainer and optimizer, stated here once)
---------------------------------------------------------------------------
On a suffix step with ``active_start = a``:

* Prefix block parameters (all matrices of blocks ``[0, a)``) receive NO update and their optimizer
  state (Muon momentum buffers, AdamW ``exp_avg``/``exp_avg_sq``) is left exactly as it was: it is
  neither decayed nor applied. Their ``.grad`` is ``None`` (the prefix ran under ``no_grad``) and
  the optimizer must skip such parameters rather than treat them as zero gradients: with momentum
  a zero gradient still moves the weights (``m = beta*m + 0`` keeps pushing) and weight decay still
  shrinks them, which is how the seed system's "frozen" layers kept moving.
* The per-layer scalars (``resid_lambda``, ``x0_lambda``) are parameters *of each block* in
  ``nanochat/gpt.py`` (not one vector for the whole model), so a prefix block's scalars get
  ``.grad = None`` like its matrices and are skipped by the optimizer the same way, step counter
  included. (``prefix_mask`` remains for models that keep the scalars in one vector.)
* The token embedding, the lm_head and the suffix blocks' scalars still train. The
  lm_head sits after the suffix, so it always has a gradient. The embedding is reached although
  the residual stream is detached at the suffix boundary: every block mixes in the embedded input
  through the skip ``x = resid_lambda * x + x0_lambda * x0``, so each suffix block carries a
  gradient back to ``x0`` and hence to ``wte``. (Its gradient is therefore smaller than on a full
  step: only the suffix blocks' x0 paths contribute. That is the intended approximation.)

Why: "frozen" must mean the same thing for every parameter and every flag combination, so that a
suffix step is exactly "a full step restricted to the suffix" and resume / A-B comparisons are
reproducible.

Cost model
----------
With per-block forward cost ``F`` and backward cost ``B = k F`` (``k ~= 2``), a step that freezes
a fraction ``p`` of the blocks costs (blocks only; embedding, lm_head and loss not counted)

    C_dyn / C_full ~= 1 - p * k / (1 + k)

because the prefix still pays its forward ``F`` but skips ``B``. ``predicted_step_cost`` returns
this fraction. Freezing 3/6/9 of 12 blocks predicts 0.83/0.67/0.50 (measured on an H100 with
each block compiled once: 0.86/0.73/0.60, the head and loss being the unmodelled fixed cost).
Probe and refresh steps are full steps; ``stats()['predicted_cost_mean']`` averages the model over
all recorded steps so a run's predicted speed-up can be compared with the measured one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch

__all__ = [
    "DynamicSuffixConfig",
    "DynamicSuffixController",
    "STEP_KINDS",
    "FULL_STEP_KINDS",
    "RELEVANCE_METRICS",
    "predicted_step_cost",
    "prefix_mask",
    "block_relevance_scores",
]

RELEVANCE_METRICS = ("grad_ratio", "saliency_abs_gp")
FULL_STEP_KINDS = ("warmup", "pre_freeze", "probe", "refresh")
STEP_KINDS = FULL_STEP_KINDS + ("suffix",)
_STATE_VERSION = 1
_MAX_WARNINGS = 20  # keep the last few warning strings; the count is kept in full


def _flag(field: str) -> str:
    """CLI flag for a config field: ``min_active_layers`` -> ``--dyn-min-active-layers``."""
    return "--dyn-" + field.replace("_", "-")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


@dataclass
class DynamicSuffixConfig:
    """The ``--dyn-*`` flags of ``scripts/base_train.py`` (field ``x_y`` is flag ``--dyn-x-y``)."""

    prefix: ClassVar[str] = "dyn"
    warmup_steps: int = 20           # full updates for the first N steps
    probe_every: int = 25            # full-update probe step period (<= 0 disables)
    refresh_every: int = 100         # periodic full-update refresh period (<= 0 disables)
    relevance_metric: str = "grad_ratio"  # 'grad_ratio' | 'saliency_abs_gp'
    relevance_threshold: float = 0.9  # cumulative relevance the active suffix must reach, in (0, 1]
    min_active_layers: int = 1       # floor on the active suffix size (>= 1)
    max_active_layers: int = 0       # cap on the active suffix size (0 = no cap)
    freeze_start_step: int = -1      # first step that may be a suffix step (-1 = use the fraction)
    freeze_start_frac: float = 0.1   # freeze start as a fraction of num_iterations, in [0, 1)
    ema_decay: float = 0.9           # relevance EMA decay, in [0, 1)
    eps: float = 1e-8                # denominator guard of grad_ratio (> 0)
    log_every: int = 50              # log_line period (<= 0 disables)

    @classmethod
    def from_args(cls, args: Any) -> "DynamicSuffixConfig":
        """Build from an argparse namespace with ``dyn_<field>`` attributes (missing -> default)."""
        kw = {}
        for f in dataclasses.fields(cls):
            name = f"{cls.prefix}_{f.name}"
            if hasattr(args, name):
                kw[f.name] = getattr(args, name)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, n_layer: int) -> list[str]:
        """All problems with these flags for a model of ``n_layer`` blocks, as one line each,
        naming the CLI flag. Empty list = valid. Never raises."""
        p: list[str] = []
        if not _is_int(n_layer) or n_layer < 1:
            p.append(f"--depth ({n_layer!r}) must be an integer >= 1")
            n_layer = None  # skip the depth comparisons below
        for name in ("warmup_steps", "probe_every", "refresh_every", "min_active_layers",
                     "max_active_layers", "freeze_start_step", "log_every"):
            if not _is_int(getattr(self, name)):
                p.append(f"{_flag(name)} ({getattr(self, name)!r}) must be an integer")
        for name in ("relevance_threshold", "freeze_start_frac", "ema_decay", "eps"):
            if not _is_real(getattr(self, name)):
                p.append(f"{_flag(name)} ({getattr(self, name)!r}) must be a finite number")
        if self.relevance_metric not in RELEVANCE_METRICS:
            p.append(f"{_flag('relevance_metric')} ({self.relevance_metric!r}) must be one of "
                     f"{', '.join(RELEVANCE_METRICS)}")
        if _is_int(self.warmup_steps) and self.warmup_steps < 0:
            p.append(f"{_flag('warmup_steps')} ({self.warmup_steps}) must be >= 0")
        if _is_real(self.relevance_threshold) and not (0.0 < self.relevance_threshold <= 1.0):
            p.append(f"{_flag('relevance_threshold')} ({self.relevance_threshold}) must be in (0, 1]")
        mn, mx = self.min_active_layers, self.max_active_layers
        if _is_int(mn):
            if mn < 1:
                p.append(f"{_flag('min_active_layers')} ({mn}) must be >= 1")
            elif n_layer is not None and mn > n_layer:
                p.append(f"{_flag('min_active_layers')} ({mn}) exceeds --depth ({n_layer})")
        if _is_int(mx):
            if mx < 0:
                p.append(f"{_flag('max_active_layers')} ({mx}) must be >= 0 (0 = no cap)")
            elif n_layer is not None and mx > n_layer:
                p.append(f"{_flag('max_active_layers')} ({mx}) exceeds --depth ({n_layer}); "
                         f"use 0 for no cap")
        if _is_int(mn) and _is_int(mx) and mx > 0 and mn >= 1 and mn > mx:
            p.append(f"{_flag('min_active_layers')} ({mn}) > {_flag('max_active_layers')} ({mx})")
        if _is_int(self.freeze_start_step) and self.freeze_start_step < -1:
            p.append(f"{_flag('freeze_start_step')} ({self.freeze_start_step}) must be >= 0, "
                     f"or -1 to use {_flag('freeze_start_frac')}")
        if _is_real(self.freeze_start_frac) and not (0.0 <= self.freeze_start_frac < 1.0):
            p.append(f"{_flag('freeze_start_frac')} ({self.freeze_start_frac}) must be in [0, 1)")
        if _is_real(self.ema_decay) and not (0.0 <= self.ema_decay < 1.0):
            p.append(f"{_flag('ema_decay')} ({self.ema_decay}) must be in [0, 1)")
        if _is_real(self.eps) and not self.eps > 0:
            p.append(f"{_flag('eps')} ({self.eps}) must be > 0")
        return p


def predicted_step_cost(n_active: int, n_layer: int, k: float = 2.0) -> float:
    """Predicted cost of a step that trains the top ``n_active`` of ``n_layer`` blocks, as a
    fraction of a full step's block cost: ``1 - p * k / (1 + k)`` with frozen fraction
    ``p = (n_layer - n_active) / n_layer`` and backward = ``k`` x forward. Blocks only."""
    if n_layer <= 0:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    n_active = min(max(int(n_active), 0), n_layer)
    p = (n_layer - n_active) / n_layer
    return 1.0 - p * k / (1.0 + k)


def prefix_mask(active_start: int, n_layer: int, device: Any = None) -> torch.Tensor:
    """Bool tensor of shape (n_layer,): True for frozen prefix layers ``[0, active_start)``.
    For masking the per-layer scalar vectors' updates; built on ``device`` without a host sync."""
    return torch.arange(n_layer, device=device) < int(active_start)


def _norm_list(tensors: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """fp32 norms of each tensor (one fused foreach launch where available)."""
    if not tensors:
        return []
    try:
        return list(torch._foreach_norm(tensors, ord, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch without dtype=, or unsupported mix
        return [torch.linalg.vector_norm(t, ord, dtype=torch.float32) for t in tensors]


def block_relevance_scores(block_params: Sequence[Iterable[torch.Tensor]], metric: str = "grad_ratio",
                           eps: float = 1e-8) -> torch.Tensor:
    """Per-block relevance from live gradients, as a 1-D fp32 tensor of length ``len(block_params)``
    on the parameters' device. No host sync (no ``.item()``/``.cpu()``/``.tolist()``).

    ``block_params[b]`` is the list of block b's parameters (depth order). A parameter whose
    ``.grad`` is None contributes a zero gradient.
      grad_ratio:      ||g_b|| / (||W_b|| + eps), both norms over all of block b's params jointly
      saliency_abs_gp: sum |g_b * W_b|
    """
    if metric not in RELEVANCE_METRICS:
        raise ValueError(f"unknown relevance metric {metric!r}; expected one of {RELEVANCE_METRICS}")
    blocks = [list(ps) for ps in block_params]
    device = next((p.device for ps in blocks for p in ps), torch.device("cpu"))
    zero = None
    out: list[torch.Tensor] = []
    with torch.no_grad():
        if metric == "grad_ratio":
            # two fused launches over all blocks: grad norms and weight norms
            flat_w = [p.detach() for ps in blocks for p in ps]
            flat_g = [p.grad.detach() for ps in blocks for p in ps if p.grad is not None]
            w_norms = _norm_list(flat_w, 2)
            g_norms = _norm_list(flat_g, 2)
            wi = gi = 0
            for ps in blocks:
                nw = len(ps)
                ng = sum(1 for p in ps if p.grad is not None)
                if nw == 0 or ng == 0:
                    if zero is None:
                        zero = torch.zeros((), dtype=torch.float32, device=device)
                    out.append(zero)
                else:
                    wn = torch.linalg.vector_norm(torch.stack(w_norms[wi:wi + nw]))
                    gn = torch.linalg.vector_norm(torch.stack(g_norms[gi:gi + ng]))
                    out.append(gn / (wn + eps))
                wi += nw
                gi += ng
        else:
            # per block, so the temporary g*W is at most one block's size
            for ps in blocks:
                prods = [p.grad.detach() * p.detach() for p in ps if p.grad is not None]
                if not prods:
                    if zero is None:
                        zero = torch.zeros((), dtype=torch.float32, device=device)
                    out.append(zero)
                else:
                    out.append(torch.stack(_norm_list(prods, 1)).sum())
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=device)
        return torch.stack(out).to(torch.float32)


class DynamicSuffixController:
    """Schedule + relevance EMA + suffix choice + honest statistics; see the module docstring.

    Public API:
      is_full_step(step) -> bool            step_kind(step) -> str (one of STEP_KINDS)
      active_start(step, record=True) -> int (records the step's stats once per step)
      block_scores(block_params) -> Tensor  update(step, scores) -> None
      stats() -> dict                       log_line(step) -> str | None
      state_dict() -> dict (JSON-able)      load_state_dict(d)
    """

    def __init__(self, config: DynamicSuffixConfig, n_layer: int, num_iterations: int):
        problems = config.validate(n_layer)
        if problems:
            raise ValueError("invalid dynamic_suffix configuration:\n  " + "\n  ".join(problems))
        self.config = config
        self.n_layer = int(n_layer)
        self.num_iterations = int(num_iterations)
        c = config
        if c.freeze_start_step >= 0:
            fs = c.freeze_start_step
        else:
            fs = int(round(c.freeze_start_frac * max(self.num_iterations, 0)))
        self.freeze_start = max(int(fs), int(c.warmup_steps))
        self.lo = int(c.min_active_layers)
        self.hi = int(c.max_active_layers) if c.max_active_layers > 0 else self.n_layer
        self._reset_state()
        if self.num_iterations > 0 and self.freeze_start >= self.num_iterations:
            self._warn(f"freeze start ({self.freeze_start}) >= num_iterations ({self.num_iterations}): "
                       f"every step is a full update; dynamic_suffix will not save anything")

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        n = self.n_layer
        self.ema: list[float] | None = None      # per-block relevance EMA (raw scale)
        self.last_scores: list[float] | None = None  # last raw measurement
        self.n_measurements = 0                   # valid measurements folded into the EMA
        self.n_invalid_measurements = 0
        self.n_active_chosen = n                  # current choice (after clamping)
        self.n_threshold_choice = n               # what the threshold alone chose
        self.choice_cap_bound = False
        self.choice_floor_bound = False
        self.choices_total = 0                    # number of re-choices (updates)
        self.choices_cap_bound = 0
        self.choices_floor_bound = 0
        # per-step statistics (recorded by active_start)
        self.last_recorded_step = -1
        self.steps_recorded = 0
        self.full_steps = {k: 0 for k in FULL_STEP_KINDS}
        self.suffix_steps = 0
        self.suffix_cap_bound = 0
        self.suffix_floor_bound = 0
        self.suffix_hist = [0] * (n + 1)          # suffix_hist[n_active] = count of suffix steps
        self.sum_active_all = 0
        self.sum_active_suffix = 0
        self.sum_pred_cost = 0.0
        self.warnings: list[str] = []
        self.n_warnings = 0

    def _warn(self, msg: str) -> None:
        self.n_warnings += 1
        self.warnings.append(msg)
        del self.warnings[:-_MAX_WARNINGS]

    def pop_warnings(self) -> list[str]:
        """Warnings recorded since the last call (for the trainer to print)."""
        w, self.warnings = self.warnings, []
        return w

    # ------------------------------------------------------------------ schedule
    @property
    def has_relevance(self) -> bool:
        return self.ema is not None

    def step_kind(self, step: int) -> str:
        """'warmup' | 'pre_freeze' | 'refresh' | 'probe' | 'suffix' (see the module docstring)."""
        c = self.config
        if step < c.warmup_steps:
            return "warmup"
        if step < self.freeze_start:
            return "pre_freeze"
        if c.refresh_every > 0 and step % c.refresh_every == 0:
            return "refresh"
        if c.probe_every > 0 and step % c.probe_every == 0:
            return "probe"
        if not self.has_relevance:
            return "probe"
        return "suffix"

    def is_full_step(self, step: int) -> bool:
        return self.step_kind(step) != "suffix"

    @property
    def chosen_active_start(self) -> int:
        """The suffix start used on suffix steps (from the last measurement)."""
        return self.n_layer - self.n_active_chosen

    def active_start(self, step: int, record: bool = True) -> int:
        """0 on full steps, else the chosen suffix start. With ``record`` (the trainer's call) the
        step enters the statistics, once per step: a repeated or earlier step is not recounted."""
        kind = self.step_kind(step)
        a = 0 if kind != "suffix" else self.chosen_active_start
        if record and step > self.last_recorded_step:
            self._record(step, kind, self.n_layer - a)
        return a

    def _record(self, step: int, kind: str, n_active: int) -> None:
        self.last_recorded_step = int(step)
        self.steps_recorded += 1
        self.sum_active_all += n_active
        self.sum_pred_cost += predicted_step_cost(n_active, self.n_layer)
        if kind == "suffix":
            self.suffix_steps += 1
            self.sum_active_suffix += n_active
            self.suffix_hist[n_active] += 1
            self.suffix_cap_bound += int(self.choice_cap_bound)
            self.suffix_floor_bound += int(self.choice_floor_bound)
        else:
            self.full_steps[kind] += 1

    # ------------------------------------------------------------------ relevance
    def block_scores(self, block_params: Sequence[Iterable[torch.Tensor]]) -> torch.Tensor:
        """Relevance of each block from the live grads (call after backward, before optimizer
        step / zero_grad). 1-D fp32 tensor of length n_layer on the params' device; no host sync."""
        blocks = list(block_params)
        if len(blocks) != self.n_layer:
            raise ValueError(f"block_scores: got {len(blocks)} blocks, the controller has n_layer={self.n_layer}")
        return block_relevance_scores(blocks, self.config.relevance_metric, self.config.eps)

    def update(self, step: int, scores: torch.Tensor | Sequence[float]) -> None:
        """Fold one measurement into the EMA and re-choose the suffix. Exactly one host transfer
        (``scores.tolist()``). Must be called on a full step."""
        if not self.is_full_step(step):
            raise ValueError(f"update() at step {step}, a suffix step: the frozen prefix has no "
                             f"gradients, so relevance can only be measured on full steps")
        if isinstance(scores, torch.Tensor):
            vals = scores.detach().reshape(-1).tolist()  # the one device -> host transfer
        else:
            vals = [float(v) for v in scores]
        vals = [float(v) for v in vals]
        if len(vals) != self.n_layer:
            raise ValueError(f"update: got {len(vals)} scores, expected n_layer={self.n_layer}")
        self.last_scores = vals
        if not all(math.isfinite(v) and v >= 0.0 for v in vals):
            self.n_invalid_measurements += 1
            self._warn(f"step {step}: non-finite or negative block relevance {_fmt(vals)}; "
                       f"not folded into the EMA, training the full model until a valid measurement")
            self._set_choice(self.n_layer, self.n_layer, cap=False, floor=False)
            return
        d = self.config.ema_decay
        if self.ema is None:
            self.ema = list(vals)
        else:
            self.ema = [d * e + (1.0 - d) * v for e, v in zip(self.ema, vals)]
        self.n_measurements += 1
        self._choose(step)

    def normalized_relevance(self) -> list[float] | None:
        """The EMA normalised to sum 1 (None before the first measurement or if it sums to 0)."""
        if self.ema is None:
            return None
        tot = math.fsum(self.ema)
        if not (math.isfinite(tot) and tot > 0.0):
            return None
        return [e / tot for e in self.ema]

    def _choose(self, step: int) -> None:
        n = self.n_layer
        rel = self.normalized_relevance()
        if rel is None:
            self._warn(f"step {step}: all-zero (or non-finite) relevance EMA; training the full model. "
                       f"Are gradients read after optimizer.step()/zero_grad()?")
            self._set_choice(n, n, cap=False, floor=False)
            return
        thr = float(self.config.relevance_threshold)
        n_thr = n
        cum = []
        for j in range(1, n + 1):  # top-j blocks: rel[n-j:]
            cum.append(rel[n - j])
            if math.fsum(cum) >= thr - 1e-12:
                n_thr = j
                break
        n_active = min(max(n_thr, self.lo), self.hi)
        self._set_choice(n_active, n_thr, cap=n_thr > self.hi, floor=n_thr < self.lo)

    def _set_choice(self, n_active: int, n_thr: int, cap: bool, floor: bool) -> None:
        self.n_threshold_choice = int(n_thr)
        self.n_active_chosen = int(n_active)
        self.choice_cap_bound = bool(cap)
        self.choice_floor_bound = bool(floor)
        self.choices_total += 1
        self.choices_cap_bound += int(cap)
        self.choices_floor_bound += int(floor)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """JSON-serialisable statistics for logs and the run summary."""
        n = self.n_layer
        ss = self.suffix_steps
        return {
            "n_layer": n,
            "freeze_start": self.freeze_start,
            "relevance_metric": self.config.relevance_metric,
            "steps": self.steps_recorded,
            "suffix_steps": ss,
            "full_steps": dict(self.full_steps),
            "full_steps_total": sum(self.full_steps.values()),
            "active_start": self.chosen_active_start,
            "n_active": self.n_active_chosen,
            "n_active_threshold_choice": self.n_threshold_choice,
            "cap": self.hi,
            "floor": self.lo,
            "suffix_cap_bound": self.suffix_cap_bound,
            "suffix_floor_bound": self.suffix_floor_bound,
            "suffix_cap_bound_frac": self.suffix_cap_bound / ss if ss else 0.0,
            "suffix_floor_bound_frac": self.suffix_floor_bound / ss if ss else 0.0,
            "choices": self.choices_total,
            "choices_cap_bound": self.choices_cap_bound,
            "choices_floor_bound": self.choices_floor_bound,
            "suffix_n_active_hist": {str(k): v for k, v in enumerate(self.suffix_hist) if v},
            "mean_active_layers_all": self.sum_active_all / self.steps_recorded if self.steps_recorded else float(n),
            "mean_active_layers_suffix": self.sum_active_suffix / ss if ss else None,
            "predicted_cost_mean": self.sum_pred_cost / self.steps_recorded if self.steps_recorded else 1.0,
            "measurements": self.n_measurements,
            "invalid_measurements": self.n_invalid_measurements,
            "relevance": self.normalized_relevance(),
            "relevance_ema": None if self.ema is None else list(self.ema),
            "last_scores": _json_floats(self.last_scores),
            "n_warnings": self.n_warnings,
            "warnings": list(self.warnings),
        }

    def log_line(self, step: int) -> str | None:
        """A compact status line every ``log_every`` steps (None otherwise)."""
        le = self.config.log_every
        if le <= 0 or step % le != 0:
            return None
        n, ss = self.n_layer, self.suffix_steps
        cap = 100.0 * self.suffix_cap_bound / ss if ss else 0.0
        flo = 100.0 * self.suffix_floor_bound / ss if ss else 0.0
        mean_all = self.sum_active_all / self.steps_recorded if self.steps_recorded else float(n)
        mean_suf = f"{self.sum_active_suffix / ss:.2f}" if ss else "-"
        rel = self.normalized_relevance()
        rel_s = "-" if rel is None else "[" + " ".join(f"{r:.2f}" for r in rel) + "]"
        return (f"dyn: step {step} {self.step_kind(step)} | active {self.n_active_chosen}/{n} "
                f"(start {self.chosen_active_start}, threshold alone {self.n_threshold_choice}) | "
                f"cap bound {cap:.0f}% floor {flo:.0f}% of {ss} suffix steps | "
                f"mean active {mean_all:.2f} all / {mean_suf} suffix | rel {rel_s}")

    # ------------------------------------------------------------------ checkpointing
    _SCALARS = ("n_measurements", "n_invalid_measurements", "n_active_chosen", "n_threshold_choice",
                "choice_cap_bound", "choice_floor_bound", "choices_total", "choices_cap_bound",
                "choices_floor_bound", "last_recorded_step", "steps_recorded", "suffix_steps",
                "suffix_cap_bound", "suffix_floor_bound", "sum_active_all", "sum_active_suffix",
                "sum_pred_cost", "n_warnings")

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state (floats, ints, lists, strings)."""
        d: dict[str, Any] = {"version": _STATE_VERSION, "n_layer": self.n_layer,
                             "config": self.config.to_dict()}
        for k in self._SCALARS:
            d[k] = getattr(self, k)
        d["ema"] = None if self.ema is None else [float(v) for v in self.ema]
        d["last_scores"] = _json_floats(self.last_scores)  # non-finite -> None (strict JSON)
        d["full_steps"] = dict(self.full_steps)
        d["suffix_hist"] = list(self.suffix_hist)
        d["warnings"] = list(self.warnings)
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore ``state_dict()`` output (also after a JSON round trip). The controller's own
        config (from the resumed run's flags) is kept; the saved config is informational."""
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"dynamic_suffix state version {d.get('version')!r} != {_STATE_VERSION}")
        if int(d["n_layer"]) != self.n_layer:
            raise ValueError(f"dynamic_suffix state is for n_layer={d['n_layer']}, model has {self.n_layer}")
        self._reset_state()
        for k in self._SCALARS:
            cur = getattr(self, k)
            setattr(self, k, type(cur)(d[k]))
        self.ema = None if d["ema"] is None else [float(v) for v in d["ema"]]
        self.last_scores = None if d["last_scores"] is None else \
            [math.nan if v is None else float(v) for v in d["last_scores"]]
        self.full_steps = {k: int(d["full_steps"].get(k, 0)) for k in FULL_STEP_KINDS}
        self.suffix_hist = [int(v) for v in d["suffix_hist"]]
        self.warnings = [str(w) for w in d["warnings"]]
        # the cap/floor of the resumed flags apply from the next choice; keep the saved one as is
        self.n_active_chosen = min(max(self.n_active_chosen, 1), self.n_layer)


def _json_floats(vals: Sequence[float] | None) -> list | None:
    """Floats for strict JSON: non-finite values (which only an invalid measurement holds) -> None."""
    if vals is None:
        return None
    return [float(v) if math.isfinite(v) else None for v in vals]


def _fmt(vals: Sequence[float]) -> str:
    return "[" + " ".join(f"{v:.3g}" for v in vals) + "]"
