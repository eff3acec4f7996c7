"""Validation bits-per-byte.

bpb is tokenizer-independent: the summed cross-entropy (nats) over the evaluated tokens divided
by ln(2) times the number of UTF-8 bytes those target tokens decode to. Special tokens (BOS) have
0 bytes and are excluded from both sums, so a model is not rewarded for predicting document
boundaries. In a torchrun job the sums are all-reduced before dividing.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, autocast_ctx=None) -> float:
    """model(x, y, loss_reduction='none') -> per-token nats; batches yields (x, y, ...) tuples."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        if autocast_ctx is not None:
            with autocast_ctx:
                loss = model(x, y, loss_reduction="none")
        else:
            loss = model(x, y, loss_reduction="none")
        loss = loss.reshape(-1).double()
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y)).double()
        counted = nbytes > 0
        total_nats += (loss * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    nb = total_bytes.item()
    if nb == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * nb)
