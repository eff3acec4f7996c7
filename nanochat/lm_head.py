"""LM-head + softcapped cross-entropy, with a backend that never materialises the full logits.

The model's last step is ``loss = CE(softcap * tanh((x @ W^T) / softcap), targets)`` over
N = B*T rows and a vocabulary of V columns. Written naively (the ``baseline`` backend) autograd
keeps several (N, V) tensors alive: the bf16 logits, their fp32 copy, the tanh output, the
log-softmax and, in backward, the fp32 and bf16 gradients of the logits. At d12 with device batch
32 x 2048 tokens and V = 32768 one fp32 (N, V) tensor is 8 GiB; it is the usual cause of OOM in
nanochat-like repos (see docs/optimizations/lm_head_ce.md for the full memory model).

The ``chunked`` backend walks over row chunks of ``chunk_size`` tokens. For each chunk its
forward computes the chunk's logits (matmul in the input dtype, softcap / logsumexp in fp32), the
chunk's loss AND the gradient of the loss w.r.t. the chunk's logits, which it immediately turns
into the chunk's rows of dL/dx and a contribution to dL/dW. Only (chunk_size, V) temporaries ever
exist. Backward then has nothing left to do but multiply the saved dx / dW by the incoming scalar
``grad_output``: the logits matmul is never recomputed, so the FLOPs are the same as the
baseline's (one forward matmul, two backward matmuls, all done in forward).

Gradients are exact (the full softmax, no filtering of small probabilities); they match
``F.cross_entropy`` to floating-point rounding, which the tests check in float64.

``reduction='none'`` gets a per-row ``grad_output`` that is only known in backward, so that path
saves only the per-row logsumexp (N floats) and recomputes each chunk's logits in backward:
one extra head matmul (4 instead of 3: +33 % head FLOPs), still no (N, V) tensor.

FP8: the chunked path takes a plain weight tensor and uses it as it is (bf16 in training). An
lm_head converted to FP8 (``nanochat/fp8.py``) is not used by the chunked path: pass its
high-precision ``weight``. The head matmul then runs in bf16.

Vocabulary padding: if the model pads its lm_head to a multiple of 64 rows, pass
``weight[:vocab_size]`` (a view; autograd routes its gradient back into the padded parameter),
so that padded columns never enter the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("baseline", "chunked")
REDUCTIONS = ("mean", "sum", "none")


# -----------------------------------------------------------------------------------------------
# Shared helpers

def _softcap(logits32: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits -> softcap * tanh(logits / softcap) (identity when softcap is None or <= 0)."""
    if softcap is None or softcap <= 0:
        return logits32
    return softcap * torch.tanh(logits32 / softcap)


def lm_head_logits(x: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Full softcapped logits in fp32, for inference and evaluation.

    x: (..., D) in any float dtype; weight: (V, D), a plain tensor (see the FP8 note in the module
    docstring). Returns (..., V) float32 (float64 for float64 x). The matmul runs in the inputs'
    dtype, the softcap in fp32.
    """
    return _softcap((x @ weight.t()).to(_acc_dtype(x.dtype)), softcap)


def _validate(x, weight, targets, softcap, backend, chunk_size, reduction):
    problems = []
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {BACKENDS}, got {backend!r}")
    if reduction not in REDUCTIONS:
        problems.append(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        problems.append(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    if softcap is not None and not isinstance(softcap, (int, float)):
        problems.append(f"softcap must be a float (<= 0 or None disables it), got {type(softcap).__name__}")
    if weight.dim() != 2:
        problems.append(f"weight must be (V, D), got shape {tuple(weight.shape)}")
    elif x.shape[-1] != weight.shape[1]:
        problems.append(f"x's last dim {x.shape[-1]} != weight's D {weight.shape[1]}")
    if tuple(x.shape[:-1]) != tuple(targets.shape):
        problems.append(f"targets shape {tuple(targets.shape)} must equal x's leading shape {tuple(x.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        problems.append(f"targets must be an integer tensor, got {targets.dtype}")
    if problems:
        raise ValueError("lm_head_loss: " + "; ".join(problems))


def reduce_row_loss(row_loss: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """row_loss: (N,) fp32 with zeros at ignored rows. 'mean' divides by max(n_valid, 1) so that an
    all-ignored batch gives a finite 0, not F.cross_entropy's NaN."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / n_valid.clamp(min=1).to(total.dtype)


# -----------------------------------------------------------------------------------------------
# Baseline: the whole (N, V) logits, autograd does the rest

def _baseline_loss(x2, weight, t1, softcap, reduction, ignore_index):
    logits = lm_head_logits(x2, weight, softcap)  # (N, V) fp32
    row_loss = F.cross_entropy(logits, t1, ignore_index=ignore_index, reduction="none")
    n_valid = (t1 != ignore_index).sum()
    return reduce_row_loss(row_loss, n_valid, reduction)


# -----------------------------------------------------------------------------------------------
# Chunked: per-chunk pieces

def _acc_dtype(dtype):
    """Dtype of the softmax math: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(xc, weight, softcap):
    """xc: (C, D) -> (capped fp32 logits (C, V), tanh (C, V) fp32 or None)."""
    z = (xc @ weight.t()).to(_acc_dtype(xc.dtype))
    if softcap is None or softcap <= 0:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, th


def _chunk_targets(tc, ignore_index):
    """tc: (C,) -> (valid (C,) bool, safe targets (C, 1) int64 with ignored rows pointing at 0)."""
    valid = tc != ignore_index
    safe = torch.where(valid, tc, torch.zeros_like(tc)).long().unsqueeze(1)
    return valid, safe


def _iota(logits):
    """(1, V) column indices on logits' device."""
    return torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)


def _chunk_row_loss(logits, valid, safe):
    """(logsumexp (C,), per-row loss (C,) with 0 at ignored rows) of one chunk's capped logits.

    Under torch.compile the target logit is picked with a masked row sum instead of gather: both
    are reductions over the chunk that inductor computes in one kernel right after the chunk's
    matmul. With gather (and scatter_add in _grad_logits), inductor inlines the pick into the
    final torch.cat of the losses and keeps every chunk's logits buffers alive until the end: 12 GiB
    above the inputs at d12 (batch 32, chunk 4096) on an H100, 2.8 GiB with this form. Same value
    exactly: the sum has one nonzero term. tests/test_lm_head.py compiles this path.
    """
    lse = torch.logsumexp(logits, dim=1)
    if torch.compiler.is_compiling():
        picked = torch.where(_iota(logits) == safe, logits, torch.zeros_like(logits)).sum(1)
    else:
        picked = logits.gather(1, safe).squeeze(1)
    return lse, torch.where(valid, lse - picked, torch.zeros_like(lse))


def _grad_logits(logits, th, lse, safe, row_scale, dtype):
    """d loss / d (pre-softcap logits) for one chunk, cast to the matmul dtype.

    logits: (C, V) fp32 capped logits; th: tanh (or None); lse: (C,) logsumexp;
    safe: (C, 1) targets; row_scale: (C,) fp32, 0 on ignored rows (folds in 1/n_valid for 'mean'
    or the per-row grad_output for 'none'). Returns (C, V) in ``dtype``.
    """
    g = torch.exp(logits - lse.unsqueeze(1))  # softmax
    if torch.compiler.is_compiling():
        # iota compare fuses into the surrounding pointwise kernel; inductor lowers scatter_add
        # as a copy of the whole (C, V) fp32 tensor plus a scatter kernel
        g = g - (_iota(g) == safe).to(g.dtype)
    else:
        g = g.scatter_add(1, safe, torch.full_like(safe, -1, dtype=g.dtype))  # - onehot
    g = g * row_scale.unsqueeze(1)
    if th is not None:
        g = g * (1.0 - th * th)  # d(softcap * tanh(z / softcap)) / dz
    return g.to(dtype)


def _chunk_bounds(n, chunk_size):
    """Static python list of (start, end) row ranges; the last chunk may be short."""
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _chunked_forward_only(x2, weight, t1, softcap, chunk_size, reduction, ignore_index):
    """No gradients needed (eval / no_grad): per-chunk loss only, no dx / dW work."""
    n_valid = (t1 != ignore_index).sum()
    losses = []
    for s, e in _chunk_bounds(x2.shape[0], chunk_size):
        logits, _ = _chunk_logits(x2[s:e], weight, softcap)
        valid, safe = _chunk_targets(t1[s:e], ignore_index)
        losses.append(_chunk_row_loss(logits, valid, safe)[1])
    return reduce_row_loss(torch.cat(losses), n_valid, reduction)


class _ChunkedCEScalar(torch.autograd.Function):
    """'mean' / 'sum': loss and both gradients in one pass over the chunks; backward only scales.

    Saved for backward: dx (N, D) in x's dtype and dW (V, D) in fp32. Nothing of size V per row.
    """

    @staticmethod
    def forward(ctx, x2, weight, t1, softcap, chunk_size, reduction, ignore_index, need_dx, need_dw):
        n = x2.shape[0]
        valid_all = t1 != ignore_index
        n_valid = valid_all.sum()
        acc = _acc_dtype(x2.dtype)
        if reduction == "mean":
            scale = 1.0 / n_valid.clamp(min=1).to(acc)
        else:
            scale = torch.ones((), dtype=acc, device=x2.device)
        losses, dx_chunks = [], []
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        for s, e in _chunk_bounds(n, chunk_size):
            xc = x2[s:e]
            logits, th = _chunk_logits(xc, weight, softcap)
            valid, safe = _chunk_targets(t1[s:e], ignore_index)
            lse, row_loss = _chunk_row_loss(logits, valid, safe)
            losses.append(row_loss)
            if need_dx or need_dw:
                row_scale = valid.to(acc) * scale
                gz = _grad_logits(logits, th, lse, safe, row_scale, x2.dtype)  # (C, V)
                del logits, th
                if need_dx:
                    dx_chunks.append(gz @ weight)  # (C, D) in x's dtype
                if need_dw:
                    # bf16 x bf16 matmul (fp32 accumulate inside), summed across chunks in fp32
                    dw = dw + (gz.t() @ xc).to(acc)
        loss = reduce_row_loss(torch.cat(losses), n_valid, reduction)
        dx = torch.cat(dx_chunks) if need_dx else None
        ctx.save_for_backward(dx, dw)
        ctx.need_dx, ctx.need_dw = need_dx, need_dw
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        gx = gw = None
        if ctx.need_dx:
            gx = dx * grad_out.to(dx.dtype)
        if ctx.need_dw:
            gw = (dw * grad_out.to(dw.dtype)).to(ctx.w_dtype)
        return gx, gw, None, None, None, None, None, None, None


class _ChunkedCENone(torch.autograd.Function):
    """'none': per-row losses. grad_output is per row and only known in backward, so backward
    recomputes each chunk's logits (one extra head matmul). Saved: x, W, targets, lse (N,) fp32."""

    @staticmethod
    def forward(ctx, x2, weight, t1, softcap, chunk_size, ignore_index):
        losses, lses = [], []
        for s, e in _chunk_bounds(x2.shape[0], chunk_size):
            logits, _ = _chunk_logits(x2[s:e], weight, softcap)
            valid, safe = _chunk_targets(t1[s:e], ignore_index)
            lse, row_loss = _chunk_row_loss(logits, valid, safe)
            losses.append(row_loss)
            lses.append(lse)
        ctx.save_for_backward(x2, weight, t1, torch.cat(lses))
        ctx.softcap, ctx.chunk_size, ctx.ignore_index = softcap, chunk_size, ignore_index
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, t1, lse_all = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _acc_dtype(x2.dtype)
        dx_chunks = []
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        for s, e in _chunk_bounds(x2.shape[0], ctx.chunk_size):
            xc = x2[s:e]
            logits, th = _chunk_logits(xc, weight, ctx.softcap)
            valid, safe = _chunk_targets(t1[s:e], ctx.ignore_index)
            row_scale = valid.to(acc) * grad_out[s:e].to(acc)
            gz = _grad_logits(logits, th, lse_all[s:e], safe, row_scale, x2.dtype)
            del logits, th
            if need_dx:
                dx_chunks.append(gz @ weight)
            if need_dw:
                dw = dw + (gz.t() @ xc).to(acc)
        gx = torch.cat(dx_chunks) if need_dx else None
        gw = dw.to(weight.dtype) if need_dw else None
        return gx, gw, None, None, None, None


def _chunked_loss(x2, weight, t1, softcap, chunk_size, reduction, ignore_index):
    need_dx = torch.is_grad_enabled() and x2.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    if not (need_dx or need_dw):
        return _chunked_forward_only(x2, weight, t1, softcap, chunk_size, reduction, ignore_index)
    if reduction == "none":
        return _ChunkedCENone.apply(x2, weight, t1, softcap, chunk_size, ignore_index)
    return _ChunkedCEScalar.apply(x2, weight, t1, softcap, chunk_size, reduction, ignore_index,
                                  need_dx, need_dw)


# -----------------------------------------------------------------------------------------------
# Public entry point

def lm_head_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    backend: str = "baseline",
    chunk_size: int = 4096,
    reduction: str = "mean",
    ignore_index: int = -1,
) -> torch.Tensor:
    """Cross-entropy of the softcapped LM head: CE(softcap * tanh((x @ W^T) / softcap), targets).

    x: (N, D) or (B, T, D), any float dtype (bf16 in training); weight: (V, D), a plain tensor
    (an FP8-converted lm_head is NOT used by the chunked backend: pass its bf16 weight);
    targets: x's leading shape, integer, ``ignore_index`` marks rows without a target.
    backend: 'baseline' (full fp32 logits, autograd) or 'chunked' (``chunk_size`` rows at a time,
    never an (N, V) tensor, same FLOPs for 'mean'/'sum').
    reduction: 'mean' over non-ignored rows (0, not NaN, when all are ignored), 'sum', or 'none'
    (fp32 losses shaped like targets, 0 at ignored rows).
    Returns a float32 tensor (float64 for float64 inputs).
    """
    _validate(x, weight, targets, softcap, backend, chunk_size, reduction)
    x2 = x.reshape(-1, x.shape[-1])
    t1 = targets.reshape(-1)
    if backend == "baseline":
        out = _baseline_loss(x2, weight, t1, softcap, reduction, ignore_index)
    else:
        out = _chunked_loss(x2, weight, t1, softcap, chunk_size, reduction, ignore_index)
    if reduction == "none":
        out = out.reshape(targets.shape)
    return out
