"""Exponential moving average of the weights, for evaluation.

    ema <- ema + (1 - d_t) * (w - ema),   d_t = min(decay, (1 + t) / (10 + t))

where t is the number of updates made before this one (0 for the first). The warm-up factor
(as in TensorFlow's ExponentialMovingAverage with `num_updates`) keeps the average from being
dominated by the random initialisation in short runs: d_0 = 0.1, d_9 = 0.53, d_t reaches 0.999 after
about 9,000 updates. The shadow copy is fp32 on the model's device (one fused
`torch._foreach_lerp_` per optimizer step) whatever the parameters' dtype.

Evaluation swaps the EMA weights into the model in place (`swapped_in`), so compiled regions,
FP8 modules and the optimizer keep pointing at the same tensors, and swaps the training weights
back bit-exactly afterwards.

Checkpoints: the shadow tensors are stored in the same `model.pt` as the weights, under the key
prefix `EMA_PREFIX` ("_ema." + parameter name), and the update count in meta.json
(`meta["ema"] = {"decay", "num_updates"}`). `split_ema_state` separates them again before
`load_state_dict`. Without `--ema-decay` nothing is added, so the layout is unchanged.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

EMA_PREFIX = "_ema."


def split_ema_state(state: Mapping) -> tuple[dict, dict]:
    """A saved model state -> (model state, EMA state keyed by parameter name; {} if none)."""
    model_state, ema_state = {}, {}
    for k, v in state.items():
        if k.startswith(EMA_PREFIX):
            ema_state[k[len(EMA_PREFIX):]] = v
        else:
            model_state[k] = v
    return model_state, ema_state


class WeightEMA:
    """fp32 shadow of every trainable parameter of `model` (by name, so checkpoints are portable)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step."""
        weight = 1.0 - self.current_decay()
        src = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, src, weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module | None = None):
        """Inside the block the parameters hold the EMA weights; on exit the training weights
        are copied back exactly. (`model` is accepted for symmetry; the parameters are known.)"""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    # -- checkpoints -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{EMA_PREFIX + name: fp32 shadow}: merged into the saved model state."""
        return {EMA_PREFIX + n: s for n, s in zip(self.names, self.shadow)}

    def meta(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates}

    @torch.no_grad()
    def load(self, ema_state: Mapping[str, torch.Tensor], meta: Mapping | None) -> None:
        """Restore from `split_ema_state(...)[1]` and `meta["ema"]`; names must match exactly."""
        missing = [n for n in self.names if n not in ema_state]
        extra = [n for n in ema_state if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
        for n, s in zip(self.names, self.shadow):
            src = ema_state[n]
            if tuple(src.shape) != tuple(s.shape):
                raise ValueError(f"EMA state {n}: shape {tuple(src.shape)}, model {tuple(s.shape)}")
            s.copy_(src)
        if meta:
            self.num_updates = int(meta.get("num_updates", 0))
