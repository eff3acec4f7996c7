"""Cast a 2-D tensor to FP8 in both memory layouts in one pass: a Triton kernel for CUDA.

Why it exists: an FP8 GEMM on Hopper (`torch._scaled_mm`) takes its first operand row-major and
its second column-major, so every activation and output gradient of an FP8 linear is needed in
both layouts (x row-major for the forward GEMM, x column-major for dW; the gradient row-major for
dX, transposed for dW). Left to inductor, the cast fuses into the producing kernel, but the
transposed copy is written with poorly coalesced stores. The H100 profile of a d12 step showed
the MLP input's norm + cast kernel at 310 us per layer, where its data moves in about 40 us, and
the cast of the head's (tokens x vocab) gradient at 3.0 ms for about 1.3 ms of traffic.

This kernel reads (BLOCK x BLOCK) tiles of the high-precision tensor once and writes the FP8 tile
twice, row-major and transposed (Triton stages the transposed tile through shared memory, so both
stores are coalesced). The values are those of `(x.float() * scale).clamp(-max, max).to(fp8)`
(round to nearest even, NaN stays NaN), which a GPU test checks bit for bit.

It is a `torch.library.triton_op`, so `torch.compile` calls the kernel inside compiled regions.
`cast_both_layouts` is None where Triton is missing (CPU-only installs); `nanochat.fp8` then uses
the plain torch expression.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None

BLOCK = 128  # tile edge: 128 fp8 bytes per stored row segment in both layouts
NUM_WARPS = 8

cast_both_layouts = None

if triton is not None:
    @triton.jit
    def _cast_both_kernel(x_ptr, scale_ptr, y_ptr, yt_ptr, M, N, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        rows = rm[:, None].to(tl.int64)
        cols = rn[None, :].to(tl.int64)
        v = tl.load(x_ptr + rows * N + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
        y = tl.clamp(v, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows * N + cols, y, mask=mask)
        tl.store(yt_ptr + tl.trans(cols) * M + tl.trans(rows), tl.trans(y), mask=tl.trans(mask))

    @torch.library.triton_op("nanochat_fp8::cast_both_layouts", mutates_args=())
    def cast_both_layouts(x: torch.Tensor, scale: torch.Tensor,
                          fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (M, N) contiguous, any float dtype; scale: () fp32 quantisation scale.
        Returns (y (M, N), y^T (N, M)), both row-major, fp8_dtype."""
        m, n = x.shape
        y = torch.empty((m, n), dtype=fp8_dtype, device=x.device)
        yt = torch.empty((n, m), dtype=fp8_dtype, device=x.device)
        grid = (triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))
        torch.library.wrap_triton(_cast_both_kernel)[grid](
            x, scale, y, yt, m, n, FP8_MAX=torch.finfo(fp8_dtype).max, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return y, yt
