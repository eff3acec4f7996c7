"""MuonAdamW: one optimizer object, AdamW for embeddings/lm_head/scalars, Muon for block matrices.

Contract that the dynamic-suffix schedule relies on: **a parameter whose `.grad` is None gets no
update and its optimizer state is left exactly as it was** (AdamW step count and moments, Muon
momentum buffer). Frozen means frozen; nothing decays in the background.

Muon (momentum + orthogonalisation): for each group of same-shaped matrices, the (Nesterov)
momentum-smoothed gradients are stacked into one (k, m, n) batch and orthogonalised together with
the Polar Express iteration in bf16, then applied with cautious weight decay (decay only the
coordinates where the update and the weight agree in sign). Two knobs shape the stacking:

* `active_only_stack=True` stacks only parameters that have gradients; False stacks the whole
  group with zeros standing in for missing gradients (wasted work, identical results) -- the A/B
  baseline for frozen-prefix steps.
* `stack_chunk_size=K > 0` orthogonalises the stack in chunks of exactly K matrices (the last
  padded with zeros), so a compiled orthogonaliser always sees the same shapes. Without chunking
  the compiled orthogonaliser marks the stack dimension dynamic instead; either way the number of
  active blocks can change every step without recompiling.

In a torchrun job the optimizer all-reduces (averages) the existing gradients once per step, so
gradient accumulation needs no communication until the end. `reduce_grads()` does it early for
a caller that must read the averaged gradients (the dynamic-suffix relevance measurement), then
`step(reduce_grads=False)`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim.adam import adam as adam_functional  # AdamW = Adam with decoupled weight decay

# Polar Express coefficients (Amsel et al., 2025): five odd-polynomial steps that push all
# singular values of a normalised matrix towards 1 faster than the classic quintic Newton-Schulz.
_POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in G: (..., m, n), in bf16.

    Works on the wide orientation (m <= n) so that the Gram matrix X X^T is the small one."""
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in _POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class MuonAdamW(torch.optim.Optimizer):
    """param_groups carry `kind` = 'adamw' (lr, betas, eps, weight_decay) or 'muon' (lr,
    momentum, weight_decay). The trainer sets `lr` every step from `initial_lr` times its LR
    schedule, and Muon's `momentum` from its warmup; weight decay is constant (applied times lr)."""

    def __init__(self, groups: list[dict], *, active_only_stack: bool = True, stack_chunk_size: int = 0,
                 compile_orthogonalize: bool = False, compile_backend="inductor", fused_adamw: bool | None = None):
        defaults = dict(lr=0.0, weight_decay=0.0)
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g.get("kind") not in ("adamw", "muon"):
                raise ValueError(f"param group {g.get('name')!r} needs kind 'adamw' or 'muon'")
            g.setdefault("initial_lr", g["lr"])
            if g["kind"] == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"muon group {g.get('name')!r} must hold matrices of one shape, got {shapes}")
        if stack_chunk_size < 0:
            raise ValueError("stack_chunk_size must be >= 0 (0 = no chunking)")
        self.active_only_stack = active_only_stack
        self.stack_chunk_size = stack_chunk_size
        self._compiled = compile_orthogonalize
        self._ortho = torch.compile(orthogonalize, dynamic=False, backend=compile_backend) if compile_orthogonalize \
            else orthogonalize
        self._fused_adamw = fused_adamw

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, reduce_grads: bool = True):
        """One update. `reduce_grads=False` when the caller already called `reduce_grads()` this
        step (to read the averaged gradients first), so they are not reduced twice."""
        if reduce_grads:
            self.reduce_grads()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
            else:
                self._muon_step(group)

    @torch.no_grad()
    def reduce_grads(self):
        """Average the existing gradients over all ranks in place (a no-op outside torchrun). Every
        rank must hold gradients for the same parameters: tensors are paired by position."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        # One flat buffer per dtype: few large collectives instead of one per parameter.
        for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG if flat.is_cuda else dist.ReduceOp.SUM)
            if not flat.is_cuda:  # gloo has no AVG
                flat /= dist.get_world_size()
            offset = 0
            for g in same:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n

    def _adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].device
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        fused = self._fused_adamw if self._fused_adamw is not None else device.type == "cuda"
        beta1, beta2 = group["betas"]
        adam_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=not fused, fused=fused, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False, capturable=False, differentiable=False, grad_scale=None, found_inf=None,
        )

    def _muon_step(self, group):
        all_params = group["params"]
        active = [p for p in all_params if p.grad is not None]
        if not active:
            return
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        bufs = []
        for p in active:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in active]
        # Nesterov momentum: buf <- m*buf + (1-m)*g ; update direction = (1-m)*g + m*buf.
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        directions = torch._foreach_lerp(grads, bufs, momentum)

        if self.active_only_stack:
            stack = torch.stack(directions)
            rows = list(range(len(active)))
        else:
            # Whole group, zeros for the frozen members: same results, more work.
            index = {id(p): i for i, p in enumerate(active)}
            full = [directions[index[id(p)]] if id(p) in index else torch.zeros_like(p) for p in all_params]
            stack = torch.stack(full)
            rows = [i for i, p in enumerate(all_params) if id(p) in index]
        ortho = self._orthogonalize_stack(stack)[rows]

        m, n = active[0].shape
        scale = max(1.0, m / n) ** 0.5
        update = ortho.to(active[0].dtype)
        weights = torch.stack(active)
        if wd != 0.0:
            # Cautious weight decay: only where the update and the weight have the same sign.
            mask = (update * weights) > 0
            weights.sub_(weights * mask * (lr * wd))
        weights.sub_(update, alpha=lr * scale)
        torch._foreach_copy_(active, list(weights.unbind(0)))

    def _orthogonalize_stack(self, stack: torch.Tensor) -> torch.Tensor:
        K = self.stack_chunk_size
        if K <= 0:
            if self._compiled:
                # The number of stacked matrices changes whenever the trained suffix does; a symbolic
                # stack dimension gives one compiled graph per matrix shape instead of one per count
                # (a 2-7 s recompile stall each time a new count appeared, measured on an H100).
                # Dynamo specialises a dimension of size 1, so a lone matrix is padded to two.
                if stack.size(0) == 1:
                    return self._ortho(torch.cat([stack, torch.zeros_like(stack)]))[:1]
                torch._dynamo.maybe_mark_dynamic(stack, 0)
            return self._ortho(stack)
        k = stack.size(0)
        pad = (-k) % K
        if pad:
            stack = torch.cat([stack, stack.new_zeros((pad, *stack.shape[1:]))])
        out = [self._ortho(chunk) for chunk in stack.split(K)]
        return torch.cat(out)[:k]
