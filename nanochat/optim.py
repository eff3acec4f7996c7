"""MuonAdamW: one optimizer object, AdamW for embeddings/lm_head/scalars, Muon for block matrices.

Contract that the dynamic-suffix schedule relies on: **a parameter whose `.grad` is None gets no
update and its optimizer state is left exactly as it was** (AdamW step count and moments, Muon
momentum buffer). Frozen means frozen; nothing decays in the background.

Muon (momentum + orthogonalisation): for each group of same-shaped matrices, the (Nesterov)
momentum-smoothed gradients are stacked into one (k, m, n) batch and orthogonalised together with
the Polar Express iteration in bf16, then applied with cautious weight decay (decay only the
coordinates where the update and the weight agree in sign). The elementwise work before and after
the Polar Express GEMMs is two compiled functions on CUDA (`fuse_elementwise`): a few fused kernels
instead of ~15 eager passes over every matrix (about 3 ms less per d12 step on an H100).
In one process each group's matrices and momentum buffers live in one packed tensor each (`_Pack`:
the parameters and the state entries are views of it), so when the active matrices are a
contiguous run of the group (every full step, and every dynamic-suffix step) those functions read
and write them in place instead of stacking copies and writing them back (about 1 ms less).
Two knobs shape the stacking:

* `active_only_stack=True` stacks only parameters that have gradients; False stacks the whole
  group with zeros standing in for missing gradients (wasted work, identical results) -- the A/B
  baseline for frozen-prefix steps.
* `stack_chunk_size=K > 0` orthogonalises the stack in chunks of exactly K matrices (the last
  padded with zeros), so a compiled orthogonaliser always sees the same shapes. Without chunking
  the compiled orthogonaliser marks the stack dimension dynamic instead; either way the number of
  active blocks can change every step without recompiling.

Under torchrun (world size W > 1) the optimizer state is **sharded** (ZeRO-2 style, as nanochat's
distributed optimizers do): every rank stores and computes only what it owns, and the gradient
averaging is folded into the sharding, so the bytes on the wire equal one all-reduce:

* AdamW matrices (embedding, lm_head) own row slices: reduce-scatter the gradient, update the
  rank's rows with the rank's slice of the moments, all-gather the rows.
* Muon matrix i of a group belongs to rank i % W, fixed for the whole run (a dynamic-suffix step
  trains a varying subset, and a matrix's momentum must stay where it lives). The active matrices
  are reduce-scattered to their owners (padded so every rank receives the same count), each rank
  orthogonalises only its own, and the new weights are all-gathered.
* Tiny tensors (the per-layer scalars) are all-reduced and updated on every rank.

The update of each matrix depends only on its own gradient and state, so sharded results equal the
single-process ones (tested with 2 gloo ranks). `reduce_grads()` all-reduces every gradient early
for a caller that must read the averaged gradients first (the dynamic-suffix relevance); the next
`step(reduce_grads=False)` then takes its shards from the averaged gradients without communicating.
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

# AdamW tensors smaller than this (per rank) are replicated instead of sharded: for the per-layer
# scalars a collective each would cost more than the update itself.
_MIN_SHARD_NUMEL = 1024


def _unit(X: torch.Tensor, dims) -> torch.Tensor:
    """Scale each matrix to Frobenius norm just under 1, so its spectral norm is <= 1."""
    return X / (X.norm(dim=dims, keepdim=True) * 1.02 + 1e-6)


def _polar_express(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The Polar Express iteration on normalised, wide matrices X: (..., m, n), m <= n."""
    for a, b, c in _POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        # B = b*A + c*A@A and X = a*X + B@X as baddbmm: the scale-and-add runs in the GEMM's
        # epilogue (fp32 accumulate, one rounding) instead of as separate passes over memory.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.dim() == 3 else torch.addmm(X, B, X, beta=a)
    return X


def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in G: (..., m, n), in `dtype`
    (bf16 in training; fp32 makes CPU regression tests independent of the CPU's bf16 GEMM rounding)."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    X = _polar_express(_unit(X.mT if tall else X, (-2, -1)), steps)  # the wide orientation: X X^T is small
    return X.mT if tall else X


def _muon_prepare(grads: torch.Tensor, bufs: torch.Tensor, momentum: torch.Tensor, ok: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Everything Muon does before the Polar Express GEMMs, on (k, m*n) stacks of flattened
    gradients and momentum buffers: Nesterov momentum (new buffer = lerp(buf, g, 1 - m), written
    into `bufs` in place; direction = lerp(g, new buffer, m)), the cast to `dtype` and `_unit`.
    Returns the directions.

    With `ok` (the device-side skip flag, False = skip) non-finite gradients are zeroed and the
    buffers do not move when `ok` is False. Flat stacks on purpose: compiled, this is two fused
    kernels instead of ~8 eager passes, and one graph serves every matrix shape. `bufs` may be a
    view of the optimizer's packed buffer (then nothing is copied back) or a stack (the caller
    copies it back). `momentum` is a 0-dim tensor, not a float: a Python float that changes every
    step made the compiled graph recompile each step, or (in one variant we tried on torch 2.13)
    silently keep its first value."""
    if ok is not None:
        grads = torch.where(ok, grads, 0.0)
        new_bufs = bufs.lerp(grads, (1 - momentum) * ok.to(bufs.dtype))
    else:
        new_bufs = bufs.lerp(grads, 1 - momentum)
    bufs.copy_(new_bufs)
    return _unit(grads.lerp(new_bufs, momentum).to(dtype), -1)


def _muon_apply(weights: torch.Tensor, update: torch.Tensor, ok: torch.Tensor | None, decay: torch.Tensor | None,
                step_size: torch.Tensor) -> None:
    """Everything Muon does after the Polar Express GEMMs, written into the (k, m*n) `weights`
    in place (a view of the packed weights, or a stack the caller copies back), from the
    orthogonalised directions (same shape and layout, `dtype`): cautious weight decay by the factor `decay`
    (= lr * weight_decay; None = no decay) on the coordinates where the update and the weight agree
    in sign, then the update times `step_size` (= lr * shape scale). 0-dim tensors, as in
    `_muon_prepare`. With `ok` False the update, and so the decay, is zero."""
    update = update.to(weights.dtype)
    if ok is not None:
        update = update * ok.to(weights.dtype)
    new = weights
    if decay is not None:
        new = new - new * ((update * new) > 0) * decay
    weights.copy_(new - update * step_size)


class _Pack:
    """One Muon group's matrices and momentum buffers in two contiguous tensors, (K, m, n) and
    (K, m*n): the parameters are views of `weights`, the momentum buffers in the optimizer state
    views of `bufs`. A step whose active matrices are a contiguous run of the group (every
    full_update step; a dynamic-suffix step too, since the group lists the blocks in depth order)
    reads and writes them in place. Without it each step stacks the buffers and weights into fresh
    tensors and copies them back: four extra passes over every matrix, ~1 ms per step at d12."""

    def __init__(self, params: list):
        self.weights = torch.stack([p.detach() for p in params])
        self.bufs = self.weights.new_zeros((len(params), self.weights[0].numel()))
        self.row = {id(p): i for i, p in enumerate(params)}
        self.w_rows, self.b_rows = list(self.weights.unbind(0)), list(self.bufs.unbind(0))
        for p, w in zip(params, self.w_rows):
            p.data = w

    def rows(self, active: list, state) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weights, bufs) views for `active` if they are a contiguous run of the group, else None.
        Re-points what no longer lives in the pack (a parameter whose `.data` was replaced, a
        momentum buffer that `load_state_dict` put in place or that does not exist yet), so a
        write through the views always lands in the real parameter and state."""
        s = self.row.get(id(active[0]))
        if s is None or any(self.row.get(id(p)) != s + j for j, p in enumerate(active)):
            return None
        for p, w, b in zip(active, self.w_rows[s:], self.b_rows[s:]):
            if p.data_ptr() != w.data_ptr():
                w.copy_(p.detach())
                p.data = w
            buf = state[p].get("momentum_buffer")
            if buf is not None and buf.data_ptr() == b.data_ptr():
                continue
            if buf is None:
                b.zero_()
            else:
                b.copy_(buf.reshape(-1))
            state[p]["momentum_buffer"] = b.view(p.shape)
        k = len(active)
        return self.weights[s:s + k], self.bufs[s:s + k]


class _Comm:
    """The few collectives the sharded step needs, with the same semantics on NCCL and gloo (gloo
    has no reduce-scatter, AVG or all-gather-into-tensor: it gets all-reduce + slice and a list
    all-gather, the same numbers with more traffic; it only serves CPU tests)."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.nccl = dist.get_backend() == "nccl"

    def all_reduce_avg(self, t: torch.Tensor) -> None:
        if self.nccl:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        else:
            dist.all_reduce(t)
            t /= self.world

    def all_reduce_avg_flat(self, tensors: list[torch.Tensor]) -> None:
        """Average `tensors` in place with one collective per dtype (few large messages instead
        of one per tensor); dtypes in a fixed order, so every rank issues the same sequence."""
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])
            self.all_reduce_avg(flat)
            torch._foreach_copy_(same, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in same]), same)])

    def reduce_scatter_avg(self, full: torch.Tensor) -> torch.Tensor:
        """full: (W * n, ...) with rank q's part at rows [q*n, (q+1)*n) -> this rank's part, averaged."""
        n = full.size(0) // self.world
        if self.nccl:
            out = full.new_empty((n, *full.shape[1:]))
            dist.reduce_scatter_tensor(out, full.contiguous(), op=dist.ReduceOp.AVG)
            return out
        full = full.clone()
        self.all_reduce_avg(full)
        return full[self.rank * n:(self.rank + 1) * n]

    def all_gather_rows(self, full: torch.Tensor) -> None:
        """full: (W * n, ...), this rank's rows already filled in; fills in every other rank's rows
        in place (NCCL all-gathers in place when the input is the rank's own slice of the output)."""
        n = full.size(0) // self.world
        mine = full[self.rank * n:(self.rank + 1) * n]
        if self.nccl:
            dist.all_gather_into_tensor(full, mine)
            return
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.contiguous())
        full.copy_(torch.cat(parts))


def _replace_state(state, dst: torch.Tensor, entries: dict) -> None:
    """state[dst] becomes a copy of `entries`. Tensors go into dst's existing ones where shape and
    dtype match (a packed Muon buffer is a view of its group's storage, and writing through it
    keeps the two in step); otherwise they are cloned. Empty `entries` removes dst's state."""
    old = state.get(dst, {})
    new = {}
    for k, v in entries.items():
        cur = old.get(k)
        if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape \
                and cur.dtype == v.dtype:
            new[k] = cur.copy_(v)
        else:
            new[k] = v.clone() if isinstance(v, torch.Tensor) else v
    if new:
        state[dst] = new
    else:
        state.pop(dst, None)


def _no_duck_shapes():
    """While compiling the fused Muon functions: do not guard on equal sizes being equal (a square
    group would otherwise compile its own graphs beside the rectangular ones)."""
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(use_duck_shape=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MuonAdamW(torch.optim.Optimizer):
    """param_groups carry `kind` = 'adamw' (lr, betas, eps, weight_decay) or 'muon' (lr,
    momentum, weight_decay). The trainer sets `lr` every step from `initial_lr` times its LR
    schedule, and Muon's `momentum` from its warmup; weight decay is constant (applied times lr).

    Every rank must build the groups with the same parameters in the same order, and in every
    step the same parameters must have gradients on every rank (the dynamic-suffix trainer checks
    that the ranks agree on the trained suffix)."""

    def __init__(self, groups: list[dict], *, active_only_stack: bool = True, stack_chunk_size: int = 0,
                 compile_orthogonalize: bool = False, compile_backend="inductor", fused_adamw: bool | None = None,
                 fuse_elementwise: bool | None = None, pack: bool | None = None):
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
        self._polar = torch.compile(_polar_express, dynamic=False, backend=compile_backend) if compile_orthogonalize \
            else _polar_express
        self.ortho_dtype = torch.bfloat16  # fp32 in CPU regression tests (bf16 GEMM rounding differs by CPU)
        # Muon's elementwise work around the GEMMs (momentum, cast, normalisation; decay, update)
        # compiled into a few fused kernels: eager it is ~15 passes over every matrix, ~4 ms per
        # step at d12 on an H100. Default: on when the parameters are on CUDA. dynamic=True: one
        # graph serves every stack size and matrix shape, and the learning rate, momentum and decay
        # are graph inputs, so their per-step changes never recompile.
        if fuse_elementwise is None:
            fuse_elementwise = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self.fuse_elementwise = fuse_elementwise
        compile_ew = (lambda f: torch.compile(f, dynamic=True, backend=compile_backend)) if fuse_elementwise \
            else (lambda f: f)
        self._prepare, self._apply = compile_ew(_muon_prepare), compile_ew(_muon_apply)
        self._fused_adamw = fused_adamw
        self._skip = None  # this step's device-side skip flag (see step)
        # Packed storage (see _Pack); default on for one process. Under torchrun each rank owns
        # every W-th matrix of a group, which is not a contiguous run, so the sharded step stacks.
        if pack is None:
            pack = not _distributed()
        self._packs = {id(g): _Pack(g["params"]) for g in self.param_groups if g["kind"] == "muon"} if pack else {}

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, reduce_grads: bool = True, skip_if: torch.Tensor | None = None):
        """One update. `reduce_grads=False` when the caller already called `reduce_grads()` this
        step (to read the averaged gradients first), so they are not reduced twice.

        `skip_if`: a 0-dim bool tensor on the parameters' device; where it is True the step is a
        no-op: weights, moments, momenta and step counts stay exactly as they were, even if the
        gradients hold NaN/Inf. On CUDA this is decided on the device (fused AdamW's `found_inf`,
        a masked Muon update), so the trainer need not wait for the loss before queueing the
        step: that host sync left the GPU idle while the optimizer was being launched. Without
        fused AdamW (the CPU default) the flag is read on the host instead. Under torchrun it must
        be the same on every rank (the trainer derives it from the all-reduced loss)."""
        self._skip = None
        if skip_if is not None:
            if self._fused(skip_if.device):
                self._skip = skip_if
            elif bool(skip_if):
                return
        if not _distributed():
            for group in self.param_groups:
                if group["kind"] == "adamw":
                    params = [p for p in group["params"] if p.grad is not None]
                    self._adamw_update(group, params, [p.grad for p in params], params)
                else:
                    active = [p for p in group["params"] if p.grad is not None]
                    self._muon_update(group, group["params"], active, [p.grad for p in active])
            return
        self._sharded_step(_Comm(), reduce=reduce_grads)

    def _fused(self, device: torch.device) -> bool:
        return self._fused_adamw if self._fused_adamw is not None else device.type == "cuda"

    @torch.no_grad()
    def reduce_grads(self):
        """Average the existing gradients over all ranks in place (a no-op outside torchrun). Every
        rank must hold gradients for the same parameters: tensors are paired by position."""
        if not _distributed():
            return
        _Comm().all_reduce_avg_flat([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])

    @torch.no_grad()
    def copy_state(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give each destination parameter an exact copy of its source's optimizer state (Muon
        momentum buffer; AdamW step, exp_avg, exp_avg_sq), for schedules that duplicate a block
        into another (depth growth): the copy then continues from the source's momentum instead of
        from zero. `pairs`: (source, destination) parameters of one group. The weights are the
        caller's to copy. A source without state yet leaves its destination without state (both
        then start from zeros, as a fresh parameter does).

        Under torchrun this is a collective: every rank calls it with the same pairs in the same
        order. A Muon matrix's momentum lives only on its owner (rank i % W, see `_muon_sharded`),
        so when source and destination have different owners the source's owner broadcasts the
        buffer (zeros if it has none). AdamW state needs no communication: the per-layer scalars
        are replicated, and a row-sharded matrix's slice has the same rows on every rank for every
        parameter of its shape, so each rank copies its own slice."""
        where = {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        W, r = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        for src, dst in pairs:
            if id(src) not in where or id(dst) not in where:
                raise ValueError("copy_state: both parameters of a pair must belong to this optimizer")
            (group, i), (dst_group, j) = where[id(src)], where[id(dst)]
            if group is not dst_group:
                raise ValueError(f"copy_state: source and destination are in different groups "
                                 f"({group.get('name')!r}, {dst_group.get('name')!r})")
            if group["kind"] == "muon" and i % W != j % W:
                owner = i % W
                buf = self.state[src].get("momentum_buffer") if r == owner else None
                msg = buf.clone() if buf is not None else torch.zeros_like(src)
                dist.broadcast(msg, src=owner)
                if r == j % W:
                    _replace_state(self.state, dst, {"momentum_buffer": msg})
            elif group["kind"] == "adamw" or r == i % W:
                _replace_state(self.state, dst, self.state[src] if src in self.state else {})

    # -------------------------------------------------------------- sharded
    def _sharded_step(self, comm: _Comm, reduce: bool):
        """Reduce-scatter (or, with `reduce=False`, slice the already averaged gradients), update
        what this rank owns, all-gather the new weights. Collectives run in the same order on
        every rank: groups in order, parameters in order."""
        W, r = comm.world, comm.rank
        small = []  # (group, params) updated on every rank from all-reduced gradients
        for group in self.param_groups:
            active = [p for p in group["params"] if p.grad is not None]
            if not active:
                continue
            if group["kind"] == "adamw":
                shardable = [p.size(0) % W == 0 and p.numel() // W >= _MIN_SHARD_NUMEL for p in active]
                shard = [p for p, ok in zip(active, shardable) if ok]
                rest = [p for p, ok in zip(active, shardable) if not ok]
                if rest:
                    small.append((group, rest))
                for p in shard:
                    rows = p.size(0) // W
                    g = comm.reduce_scatter_avg(p.grad) if reduce else p.grad[r * rows:(r + 1) * rows]
                    self._adamw_update(group, [p.data[r * rows:(r + 1) * rows]], [g], [p])
                    comm.all_gather_rows(p.data)
            else:
                self._muon_sharded(group, active, comm, reduce)
        if small:
            if reduce:  # one all-reduce for all of them
                comm.all_reduce_avg_flat([p.grad for _, ps in small for p in ps])
            for group, ps in small:
                self._adamw_update(group, ps, [p.grad for p in ps], ps)

    def _muon_sharded(self, group, active: list, comm: _Comm, reduce: bool):
        """Matrix i of the group lives on rank i % W. Rank q's active matrices travel as rows
        [q*k, q*k + n_q) of one (W*k, m, n) stack, k = the largest n_q (zero-padded), so one
        reduce-scatter brings each rank its own gradients and one all-gather brings back everyone's
        new weights."""
        W, r = comm.world, comm.rank
        index = {id(p): i for i, p in enumerate(group["params"])}
        owned_by = [[p for p in active if index[id(p)] % W == q] for q in range(W)]
        k = max(len(ps) for ps in owned_by)  # rows per rank, zero-padded
        mine = owned_by[r]
        if reduce:
            zeros = torch.zeros_like(active[0].grad)
            rows = [g for q in range(W) for g in [p.grad for p in owned_by[q]] + [zeros] * (k - len(owned_by[q]))]
            grads = list(comm.reduce_scatter_avg(torch.stack(rows))[:len(mine)].unbind(0))
        else:
            grads = [p.grad for p in mine]
        owned_all = [p for i, p in enumerate(group["params"]) if i % W == r]
        new = self._muon_update(group, owned_all, mine, grads, write_back=False)
        full = active[0].new_zeros((W * k, *active[0].shape))
        if new is not None:
            full[r * k:r * k + len(mine)] = new
        comm.all_gather_rows(full)
        params = [p for q in range(W) for p in owned_by[q]]
        values = [full[q * k + j] for q in range(W) for j in range(len(owned_by[q]))]
        torch._foreach_copy_(params, values)

    # -------------------------------------------------------------- updates
    def _adamw_update(self, group, params: list, grads: list, keys: list):
        """AdamW on `params` (whole parameters or this rank's row slice of them) with `grads`;
        `keys` are the nn.Parameters whose state entries hold the moments (slice-shaped when sharded)."""
        if not params:
            return
        device = params[0].device
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p, key in zip(params, keys):
            state = self.state[key]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        fused = self._fused(device)
        beta1, beta2 = group["betas"]
        # found_inf (fused only): the kernel leaves everything untouched and undoes the step count.
        found_inf = self._skip.float() if self._skip is not None else None
        adam_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=not fused, fused=fused, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False, capturable=False, differentiable=False, grad_scale=None, found_inf=found_inf,
        )

    def _muon_update(self, group, all_params: list, active: list, grads: list, write_back: bool = True):
        """Muon on the `active` matrices (a subset of `all_params`, which are the group's matrices
        this rank owns) with their `grads`. Writes the new weights into the parameters, or with
        `write_back=False` returns them as one (k, m, n) stack (None if nothing is active)."""
        if not active:
            return None
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        k, (m, n) = len(active), active[0].shape
        pack = self._packs.get(id(group)) if write_back else None
        views = pack.rows(active, self.state) if pack is not None and (k > 1 or not self._pads()) else None
        if views is None:  # stacks: fresh tensors, copied back at the end
            for p in active:
                self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            bufs = [self.state[p]["momentum_buffer"] for p in active]
            # (as views, `[:]`, like the packed ones: dynamo guards on a view's base, so a fresh
            # tensor would compile graphs of its own)
            weights = self._pad(torch.stack(active))[:]
            buf_stack = self._pad(torch.stack([b.view(-1) for b in bufs]))[:]
        else:
            weights, buf_stack = views
        ok = None if self._skip is None else ~self._skip
        # Hyper-parameters as 0-dim device tensors (see _muon_prepare); torch.full launches a fill
        # with the value as a kernel argument: no host-to-device copy, no sync.
        dev = active[0].device
        momentum = torch.full((), momentum, device=dev)
        decay = torch.full((), lr * wd, device=dev) if wd != 0.0 else None
        step_size = torch.full((), lr * max(1.0, m / n) ** 0.5, device=dev)
        with _no_duck_shapes():
            X = self._prepare(self._pad(torch.stack([g.view(-1) for g in grads])), buf_stack, momentum, ok,
                              self.ortho_dtype)
        if views is None:
            torch._foreach_copy_(bufs, list(buf_stack[:k].view(-1, m, n).unbind(0)))
        X = X.view(-1, m, n)
        X = X.mT if m > n else X  # the wide orientation, where the Gram matrix X X^T is the small one
        if self.active_only_stack or k == len(all_params):
            X = self._polar_stack(X)
        else:
            # Whole group, zeros for the frozen members: same results, more work. (Indexing with
            # the row list costs a host-to-device copy and a gather: only done when rows are missing.)
            index = {id(p): i for i, p in enumerate(active)}
            rows = [i for i, p in enumerate(all_params) if id(p) in index]
            full = X.new_zeros((len(all_params), *X.shape[1:]))
            full[rows] = X[:k]
            X = self._pad(self._polar_stack(full)[rows])
        # Flat (k, m*n) operands: one compiled graph for every matrix shape. A tall group's update
        # comes back in the wide orientation; making it contiguous costs one small bf16 copy
        # (~0.05 ms at d12) and saves compiling a second graph for its strides (~1.5 s, cold).
        update = X.mT.contiguous() if m > n else X
        with _no_duck_shapes():
            self._apply(weights.view(weights.size(0), -1), update.view(update.size(0), -1), ok, decay, step_size)
        if views is not None:
            return None
        if not write_back:
            return weights[:k]
        torch._foreach_copy_(active, list(weights[:k].unbind(0)))
        return None

    def _pads(self) -> bool:
        return self.fuse_elementwise or self._compiled

    def _pad(self, stack: torch.Tensor) -> torch.Tensor:
        """A lone matrix gets a zero partner when anything it goes through is compiled: dynamo
        specialises size-1 dimensions, and a one-block suffix would otherwise compile graphs of its
        own mid-run (callers slice the results back to the real count; zeros stay zeros)."""
        if stack.size(0) == 1 and self._pads():
            return torch.cat([stack, torch.zeros_like(stack)])
        return stack

    def _polar_stack(self, stack: torch.Tensor) -> torch.Tensor:
        """The Polar Express GEMMs on a (k, m, n) stack of normalised directions."""
        K = self.stack_chunk_size
        if K <= 0:
            if self._compiled:
                # The number of stacked matrices changes whenever the trained suffix does; a symbolic
                # stack dimension gives one compiled graph per matrix shape instead of one per count
                # (each recompile would stall the run 2-7 s on an H100).
                k = stack.size(0)
                stack = self._pad(stack)
                torch._dynamo.maybe_mark_dynamic(stack, 0)
                return self._polar(stack)[:k]
            return self._polar(stack)
        k = stack.size(0)
        pad = (-k) % K
        if pad:
            stack = torch.cat([stack, stack.new_zeros((pad, *stack.shape[1:]))])
        out = [self._polar(chunk) for chunk in stack.split(K)]
        return torch.cat(out)[:k]
