"""The Triton kernels of nanochat/softcap_ce.py (see its docstring for what they compute and why).

A module of their own so that importing nanochat never imports Triton: softcap_ce loads this one
at the first kernel launch. Triton resolves the helpers a kernel calls through the module's
globals, so the kernels must live at module level."""
import triton
import triton.language as tl


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # exact to ~1e-7 absolute, which is what the loss needs; runs in Triton's interpreter
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def ce_fwd_kernel(z_ptr, t_ptr, loss_ptr, lse_ptr, V, stride, cap, inv_cap,
                  BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(t_ptr + row)
    base = z_ptr + row * stride
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pick = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        c = cap * _tanh(z * inv_cap, FAST)
        acc += tl.where(mask, tl.exp2((c - cap) * 1.4426950408889634), 0.0)
        pick += tl.where(cols == target, c, 0.0)
    lse = tl.log(tl.sum(acc, axis=0)) + cap
    loss = tl.where(target == -1, 0.0, lse - tl.sum(pick, axis=0))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def ce_bwd_kernel(z_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, V, stride, dstride, cap, inv_cap,
                  BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(target == -1, 0.0, tl.load(g_ptr + row))
    base = z_ptr + row * stride
    out = dz_ptr + row * dstride
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        th = _tanh(z * inv_cap, FAST)
        p = tl.exp2((cap * th - lse) * 1.4426950408889634)
        dc = (p - tl.where(cols == target, 1.0, 0.0)) * g
        tl.store(out + cols, (dc * (1.0 - th * th)).to(dz_ptr.dtype.element_ty), mask=mask)
