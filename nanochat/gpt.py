"""The GPT: nanochat's architecture with a trainable-suffix forward.

Architecture (nanochat): rotary position embeddings, QK-norm, ReLU² MLP, untied token embedding
and lm_head, RMSNorm without parameters (also right after the embedding), no biases, a tanh logit
softcap, grouped-query attention (`n_kv_head`), a sliding-window pattern tiled over the layers
(L = full context, S = half context; the last layer is always L), and two learnable scalars per
layer that mix the residual stream with the normalised embedding `x0` before each block:
`x = resid_lambda * x + x0_lambda * x0`.

`forward(idx, targets, active_start=a)` runs blocks [0, a) under `no_grad` and detaches the
activation at the boundary, so backward work and activation memory exist only for blocks
[a, n_layer). With a = 0 it is exactly the full model. The per-layer scalars live *inside* each
block (not in one vector for the whole model) so that a frozen block's scalars get `grad=None`
and are left alone by the optimizer, exactly like its matrices: no masking needed anywhere.

Compilation is regional (`compile_regions`): each block is compiled on its own and the head
(final norm + lm_head + softcap + loss) is a separate region. All blocks share one graph per
(grad mode, window, input-requires-grad) variant, so changing `active_start` never compiles
anything new after the first few steps, and the first compile is a fraction of a whole-model one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanochat.attention import attention
from nanochat.common import print0
from nanochat.lm_head import lm_head_loss, reduce_row_loss
from nanochat.softcap_ce import softcap_ce_rows


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"
    softcap: float = 15.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class ModelRuntime:
    """How the model computes, as opposed to what it is (GPTConfig): chosen per run and per device,
    never saved in checkpoints. Given to `GPT(config, runtime)`; `eval_mode` swaps in a copy with
    another attention backend for variable-length inference."""
    compute_dtype: torch.dtype = torch.float32  # activations (bf16 on CUDA); weights stay fp32
    attn_backend: str = "sdpa"  # nanochat.attention: sdpa | flex | cudnn | fa3
    lm_ce_backend: str = "baseline"  # nanochat.lm_head: baseline (full logits) | chunked
    lm_ce_chunk_size: int = 4096  # rows per chunk of the chunked cross-entropy
    lm_ce_kernel: str = "inductor"  # baseline backend's loss: inductor | triton (nanochat.softcap_ce, CUDA)
    activation_checkpointing: str = "none"  # trained blocks' activations: none | blocks | selective (RECOMPUTE_MODES)


def validate_window_pattern(pattern: str) -> str | None:
    """Return a problem description for an invalid `--window-pattern`, else None."""
    if not pattern or any(c not in "SL" for c in pattern.upper()):
        return f"--window-pattern={pattern!r} must be a non-empty string of S and L (e.g. 'L' or 'SSSL')"
    return None


def layer_windows(config: GPTConfig) -> list[int]:
    """Attention window per layer (-1 = full causal). The pattern is tiled over the layers;
    S means half the context; the last layer always sees the full context."""
    pattern = config.window_pattern.upper()
    windows = []
    for i in range(config.n_layer):
        c = pattern[i % len(pattern)]
        windows.append(config.sequence_len // 2 if c == "S" else -1)
    windows[-1] = -1
    return windows


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x1, x2) = (x[..., :d], x[..., d:]) to (x1 c + x2 s, x2 c - x1 s).

    x: (B, T, H, D); cos = [c, c] and sin = [s, -s]: (1, T, 1, D) (GPT._rotary_tables). Written as
    ``x * cos + roll(x, d) * sin``, the same products and sums as the two-halves form, element
    for element, but without slices and a cat: compiled with the QK-norm, the slice/cat form made
    a fused backward kernel one of whose launch configurations took ~8 s to build (the largest
    single cost of the first step on an H100, docs/optimizations/throughput.md section 10)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, window: int, backend: str, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        if kv_cache is not None:  # inference: append k/v to this layer's cache, attend over all of it
            y = kv_cache.attend(q, k, v, window)
        else:
            y = attention(q, k, v, window, backend)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


# Activation recompute of the trained blocks (`ModelRuntime.activation_checkpointing`):
#   none       every block keeps what its backward needs (~19 values per token per model dim, measured)
#   blocks     a block keeps only its input; backward runs its forward again (one extra forward)
#   selective  the matmul and attention outputs are kept (~11 per token per dim); the cheap ops
#              between them (norms, rotary, ReLU², residual adds, casts) are recomputed
RECOMPUTE_MODES = ("none", "blocks", "selective")


def _keeps_expensive_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective recompute policy: save GEMM and attention outputs, recompute everything else.
    Ops outside aten (the FP8 GEMM custom op, FA3, flex attention) are kept too: they are the
    expensive kernels, and recomputing one would cost what `blocks` costs without its memory."""
    name = str(op)
    if op in _SAVED_OPS or "attention" in name or not name.startswith("aten."):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten._scaled_mm.default}
# One object for every call, so that dynamo sees the same context_fn each time.
_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _keeps_expensive_outputs)


class Block(nn.Module):
    """One transformer layer, including its two residual-mixing scalars."""

    def __init__(self, config: GPTConfig, window: int):
        super().__init__()
        self.window = window
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)
        self.resid_lambda = nn.Parameter(torch.ones(1))
        self.x0_lambda = nn.Parameter(torch.zeros(1))

    def forward(self, x, x0, cos, sin, backend: str, kv_cache=None, recompute: str = "none"):
        """`recompute` (RECOMPUTE_MODES): how backward gets this block's activations. The
        checkpoint sits inside the block's compiled region, so dynamo traces it as one graph
        whose partitioner recomputes what it must; outside, dynamo would be running under the
        checkpoint's saved-tensor hooks. The block draws no random numbers, so the RNG state is
        not saved and restored around the recompute."""
        if recompute == "none" or kv_cache is not None:
            return self._forward(x, x0, cos, sin, backend, kv_cache)
        # (blocks passes no context_fn at all: dynamo accepts only a traceable one, not the default's)
        selective = {"context_fn": _SELECTIVE_CONTEXT} if recompute == "selective" else {}
        return checkpoint(self._forward, x, x0, cos, sin, backend, use_reentrant=False, preserve_rng_state=False,
                          **selective)

    def _forward(self, x, x0, cos, sin, backend: str, kv_cache=None):
        x = self.resid_lambda.to(x.dtype) * x + self.x0_lambda.to(x.dtype) * x0
        x = x + self.attn(norm(x), cos, sin, self.window, backend, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, runtime: ModelRuntime | None = None):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.config = config
        windows = layer_windows(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, w) for w in windows]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training context so that generation can run longer.
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.head_dim
        cos, sin = self._rotary_tables(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.runtime = runtime if runtime is not None else ModelRuntime()
        self._head_fn = self._head_loss
        self._compiled = False

    # ------------------------------------------------------------------ init
    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()  # (seq_len, head_dim / 2)
        # Full-width tables for apply_rotary_emb's roll form: [c, c] and [s, -s].
        return torch.cat([cos, cos], -1)[None, :, None, :], torch.cat([sin, -sin], -1)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialise every tensor (the model is built on the meta device, then `to_empty`).

        Embedding N(0, 1) because it is normalised right away; lm_head tiny so the initial
        logits are near uniform; block input projections uniform with std 1/sqrt(d); output
        projections zero so each block starts as the identity on the residual stream."""
        cfg = self.config
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0) * cfg.n_embd ** -0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -bound, bound)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            block.resid_lambda.fill_(1.0)
            block.x0_lambda.fill_(0.1)
        cos, sin = self._rotary_tables(self.rotary_seq_len, cfg.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # ------------------------------------------------------------- counting
    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by role (nanochat's scaling laws use transformer_matrices + lm_head)."""
        wte = self.transformer.wte.weight.numel()
        lm_head = self.lm_head.weight.numel()
        matrices = sum(p.numel() for n, p in self.transformer.h.named_parameters() if p.dim() == 2)
        scalars = sum(p.numel() for n, p in self.transformer.h.named_parameters() if p.dim() < 2)
        total = sum(p.numel() for p in self.parameters())
        assert total == wte + lm_head + matrices + scalars
        return {"wte": wte, "transformer_matrices": matrices, "lm_head": lm_head,
                "scalars": scalars, "total": total}

    def _attn_flops_per_layer(self) -> list[int]:
        cfg = self.config
        head_dim = cfg.head_dim
        out = []
        for w in layer_windows(cfg):
            span = cfg.sequence_len if w < 0 else min(w, cfg.sequence_len)
            out.append(12 * cfg.n_head * head_dim * span)  # QK^T and AV, fwd+bwd (6 * 2 matmuls)
        return out

    def estimate_flops(self, active_start: int = 0, skip: tuple[int, ...] = ()) -> int:
        """Training FLOPs per token, counted as nanochat does: 6 per matmul parameter (embedding
        and scalars excluded) plus attention. With `active_start` = a, the frozen prefix does
        forward work only (2 per parameter, 1/3 of its attention), which is the honest count of
        useful work for MFU on suffix steps; blocks in `skip` do no work at all."""
        counts = self.num_scaling_params()
        attn = self._attn_flops_per_layer()
        per_block = [sum(p.numel() for p in b.parameters() if p.dim() == 2) for b in self.transformer.h]
        flops = 6 * counts["lm_head"]
        for i, (nb, fa) in enumerate(zip(per_block, attn)):
            if i in skip:
                continue
            if i < active_start:
                flops += 2 * nb + fa // 3
            else:
                flops += 6 * nb + fa
        return int(flops)

    # ------------------------------------------------------------ optimizer
    def param_groups(self, *, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay,
                     adam_betas=(0.8, 0.95)) -> list[dict]:
        """Optimizer groups: AdamW for embedding, lm_head and scalars, Muon for block matrices
        (one group per matrix shape so they can be stacked and orthogonalised together).

        AdamW learning rates scale with 1/sqrt(d_model / 768) (they were tuned at d=768)."""
        d_scale = (self.config.n_embd / 768) ** -0.5
        blocks = self.transformer.h
        groups = [
            dict(kind="adamw", name="lm_head", params=[self.lm_head.weight],
                 lr=unembedding_lr * d_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", name="wte", params=[self.transformer.wte.weight],
                 lr=embedding_lr * d_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", name="resid_lambdas", params=[b.resid_lambda for b in blocks],
                 lr=scalar_lr * 0.01, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", name="x0_lambdas", params=[b.x0_lambda for b in blocks],
                 lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        ]
        by_shape: dict[tuple, list] = {}
        for b in blocks:
            for p in b.parameters():
                if p.dim() == 2:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape, params in sorted(by_shape.items()):
            groups.append(dict(kind="muon", name=f"muon_{shape[0]}x{shape[1]}", params=params,
                               lr=matrix_lr, momentum=0.95, weight_decay=weight_decay))
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one group"
        return groups

    def block_params(self) -> list[list[nn.Parameter]]:
        """Parameters of each block in depth order (for the dynamic-suffix relevance)."""
        return [list(b.parameters()) for b in self.transformer.h]

    # --------------------------------------------------------------- compile
    def compile_regions(self, **compile_kwargs):
        """Regional compilation: every block and the head are compiled separately (in place, so
        state_dict keys are unchanged). Identical blocks share compiled code, which makes the
        first compile short and a new `active_start` free.

        AOTAutograd normally compiles a region's backward lazily, at its first backward call, where
        a compiler failure would surface from `loss.backward()` after the forward already ran. With
        `force_non_lazy_backward_lowering` (process-wide) the backward is compiled together with
        the forward, so a failure of either raises from the region's forward call, where
        `_run_region` can fall back to eager before anything has run (same total compile work)."""
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            functorch_config.force_non_lazy_backward_lowering = True
        inductor_settings()
        for block in self.transformer.h:
            block.compile(**compile_kwargs)
        self._head_fn = torch.compile(self._head_loss, **compile_kwargs)
        self._compiled = True

    def _run_region(self, call):
        """Run one compiled region. If compiling it fails, say so loudly, switch every region back
        to eager (they share code, so the others would fail the same way) and run it eagerly: a
        compile failure happens before the region executes, so the retry has no side effects."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (only compiler failures are handled, the rest re-raised)
            if not (self._compiled and type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))):
                raise
            first_line = (str(e).strip().splitlines() or [""])[0]
            print0(f"WARNING: torch.compile failed ({type(e).__name__}: {first_line}); "
                   f"running the model EAGERLY from now on (slower). Pass --no-compile to skip compiling.")
            for block in self.transformer.h:
                block._compiled_call_impl = None  # what nn.Module.compile() set
            self._head_fn = self._head_loss
            self._compiled = False
            return call()

    # --------------------------------------------------------------- forward
    def _head_loss(self, x, targets, loss_reduction: str):
        x = norm(x)
        if self.runtime.lm_ce_backend == "baseline":
            # Through the module so that an FP8-converted lm_head is used.
            logits = self.lm_head(x)
            if self.runtime.lm_ce_kernel == "triton":
                rows = softcap_ce_rows(logits.view(-1, logits.size(-1)), targets.reshape(-1), self.config.softcap)
                return reduce_row_losses(rows, targets, loss_reduction)
            logits = self.config.softcap * torch.tanh(logits.float() / self.config.softcap)
            return lm_head_loss_from_logits(logits, targets, loss_reduction)
        return lm_head_loss(x, self.lm_head.weight, targets, softcap=self.config.softcap,
                            backend=self.runtime.lm_ce_backend, chunk_size=self.runtime.lm_ce_chunk_size,
                            reduction=loss_reduction)

    def forward(self, idx, targets=None, active_start: int = 0, loss_reduction: str = "mean", kv_cache=None,
                skip: tuple[int, ...] = ()):
        """idx, targets: (B, T) int64. Returns the loss if targets are given, else fp32 logits.

        Blocks [0, active_start) run without autograd; the boundary activation is detached.
        Blocks in `skip` are left out of this call entirely (the residual stream passes them
        unchanged), which is how layer-dropping schedules train a shallower network on a step;
        since each block is its own compiled region, leaving some out compiles nothing new.
        With `kv_cache` (a `nanochat.engine.KVCache`), `idx` continues the cached sequence: rotary
        positions start at `kv_cache.pos`, every layer appends its k/v to the cache and attends
        over all of it (windows on absolute positions), and the blocks run eager (their compiled
        graphs were specialised to the training shapes). Inference only: logits are returned."""
        B, T = idx.shape
        n = self.config.n_layer
        if not 0 <= active_start <= n:
            raise ValueError(f"active_start={active_start} must be in [0, {n}]")
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.rotary_seq_len:
            raise ValueError(f"sequence length {pos + T} exceeds the rotary table ({self.rotary_seq_len})")
        cos = self.cos[:, pos:pos + T].to(self.runtime.compute_dtype)
        sin = self.sin[:, pos:pos + T].to(self.runtime.compute_dtype)
        x0 = norm(self.transformer.wte(idx).to(self.runtime.compute_dtype))
        # A distinct tensor for the residual stream: if block 0 received the same tensor as `x` and
        # `x0`, dynamo would guard on that aliasing and compile a second copy of the block graph
        # just for block 0 (measured: 3 instead of 2 graphs in the first step). The copy is ~48 MB
        # at the anchor shape, about 30 us.
        x = x0.clone()
        blocks = self.transformer.h
        if kv_cache is not None:
            if targets is not None or active_start != 0 or skip:
                raise ValueError("kv_cache is for inference: no targets, active_start=0, no skipped blocks")
            for i, block in enumerate(blocks):
                x = block.forward(x, x0, cos, sin, self.runtime.attn_backend, kv_cache=kv_cache.layer(i))
            kv_cache.advance(T)
            logits = self.lm_head(norm(x)).float()
            return self.config.softcap * torch.tanh(logits / self.config.softcap)
        if active_start > 0:
            # Detached inputs: the prefix blocks then see exactly what an evaluation forward sees
            # (no grad mode, nothing requiring grad) and reuse its compiled graph.
            x, x0_frozen = x.detach(), x0.detach()
            with torch.no_grad():
                for i in range(active_start):
                    if i not in skip:
                        block = blocks[i]
                        x = self._run_region(lambda: block(x, x0_frozen, cos, sin, self.runtime.attn_backend))
        # Recompute only where autograd records: an evaluation forward then passes the same
        # arguments as the frozen prefix and shares its compiled graph.
        recompute = self.runtime.activation_checkpointing if torch.is_grad_enabled() else "none"
        for i in range(active_start, n):
            if i not in skip:
                block = blocks[i]
                x = self._run_region(lambda: block(x, x0, cos, sin, self.runtime.attn_backend, recompute=recompute))
        if targets is None:
            logits = self.lm_head(norm(x)).float()
            return self.config.softcap * torch.tanh(logits / self.config.softcap)
        return self._run_region(lambda: self._head_fn(x, targets, loss_reduction))


def inductor_settings() -> None:
    """Process-wide inductor settings for this repo's compiled code (the model's regions and the
    optimizer's fused Muon functions). Pointwise kernels get one launch configuration instead of
    several that are each compiled and then benchmarked at the first call: on an empty cache that
    cost ~3 s of a d12 first step on the H100 for no measurable step time (65.03 vs 64.99 ms)."""
    import torch._inductor.config as inductor_config
    inductor_config.triton.autotune_pointwise = False


def start_compile_workers() -> None:
    """Start inductor's pool of kernel-compiling worker processes now rather than at the first
    compile. Each worker imports torch before it can build a Triton kernel (seconds on a cold
    machine); started at launch, that overlaps with loading the tokenizer, building the model and
    the first batch instead of adding to the first step. No-op where inductor would compile in
    the main process (one compile thread, or no Triton)."""
    from torch._inductor.async_compile import maybe_warm_pool
    maybe_warm_pool()


def lm_head_loss_from_logits(logits, targets, reduction: str = "mean"):
    """Cross-entropy over (already softcapped, fp32) logits with ignore_index=-1; a mean over
    zero valid targets is 0 rather than NaN, so an all-ignored batch never poisons a step."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")
    return reduce_row_losses(loss, targets, reduction)


def reduce_row_losses(loss, targets, reduction: str):
    """Per-token losses (N,) with 0 at ignored (-1) targets -> the requested reduction ('none'
    keeps the targets' shape); the rule itself is nanochat.lm_head.reduce_row_loss."""
    if reduction == "none":
        return loss.view_as(targets)
    return reduce_row_loss(loss, (targets != -1).sum(), reduction)
