"""FP8: the custom Float8Linear against an fp32 reference, the shared filter, flag validation,
the torchao backend, compiled training (the kernel must really run), the frozen-weight cache and
disable_fp8. All on CPU: torch._scaled_mm with float8 dtypes runs there."""
import argparse
import copy
import sys

import pytest
import torch
import torch.nn as nn

from nanochat import fp8
from nanochat.fp8 import (Float8Linear, Fp8Options, check_fp8_hardware, convert_to_fp8,
                          disable_fp8, fp8_filter, quantize_tensorwise, refresh_fp8_weight_caches,
                          set_fp8_weight_cache,
                          validate_fp8_options)

ON = dict(enabled=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# A tiny model with the GPT's module names: transformer.h.{i}.attn.c_q/c_k/c_v/c_proj,
# transformer.h.{i}.mlp.c_fc/c_proj, lm_head.
class _Attn(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class _Block(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.attn = _Attn(d, kv)
        self.mlp = _Mlp(d)

    def forward(self, x):
        a = self.attn
        x = x + a.c_proj(a.c_q(x) * 0.5 + a.c_v(x).repeat(1, 1, x.shape[-1] // a.c_v.out_features))
        return x + self.mlp(x) + a.c_k(x).sum(-1, keepdim=True)


class TinyGPT(nn.Module):
    def __init__(self, d=128, kv=64, n_layer=2, vocab=256):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([_Block(d, kv) for _ in range(n_layer)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        for b in self.transformer.h:
            x = b(x)
        return self.lm_head(x)


def _tiny(seed=0, std=0.05, **kw):
    torch.manual_seed(seed)
    m = TinyGPT(**kw)
    for p in m.parameters():
        nn.init.normal_(p, std=std)
    return m


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape", [(2, 32, 128, 64), (1, 50, 128, 256)])  # (B, T, K, N); 50 -> padding
def test_custom_fp8_linear_matches_fp32_reference(shape):
    """Error bounds: e4m3 keeps 3 mantissa bits (round-off <= 2^-4 relative, ~3.6 % RMS for a
    uniform mantissa), e5m2 keeps 2 (<= 2^-3, ~7 % RMS). The forward product of two e4m3 operands
    measures ~0.037 norm-relative error, dX and dW (e5m2 x e4m3) ~0.06. Bounds 0.06 / 0.10 leave
    headroom for seeds while still catching a wrong scale (off by 2x gives ~0.5-1.0)."""
    B, T, K, N = shape
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False)
    f = Float8Linear.from_linear(lin, Fp8Options(**ON))
    x = torch.randn(B, T, K, requires_grad=True)
    y = f(x)
    assert y.shape == (B, T, N) and y.dtype == torch.float32
    g = torch.randn_like(y)
    y.backward(g)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = lin.weight.detach().clone().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(g)
    assert rel_err(y, y_ref) < 0.06
    assert rel_err(x.grad, x_ref.grad) < 0.10
    assert lin.weight.grad.dtype == torch.float32
    assert rel_err(lin.weight.grad, w_ref.grad) < 0.10


def test_eager_step_calls_three_fp8_gemms():
    f = Float8Linear.from_linear(nn.Linear(64, 32, bias=False), Fp8Options(**ON))
    before = fp8.KERNEL_CALLS["scaled_mm"]
    f(torch.randn(16, 64, requires_grad=True)).sum().backward()
    assert fp8.KERNEL_CALLS["scaled_mm"] - before == 3  # out, dX, dW
    # no dX when the input needs no grad (e.g. the first layer after a frozen prefix)
    before = fp8.KERNEL_CALLS["scaled_mm"]
    f(torch.randn(16, 64)).sum().backward()
    assert fp8.KERNEL_CALLS["scaled_mm"] - before == 2


def test_options_fast_accum_bf16_weight_grad_and_traced_path():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(32, 128)
    g = torch.randn(32, 64)
    ref_y = x @ lin.weight.detach().t()
    ref_dw = g.t() @ x
    for kw in [dict(fast_accum=True), dict(weight_grad_bf16=True), dict(no_allow_in_graph=True)]:
        f = Float8Linear.from_linear(lin, Fp8Options(**ON, **kw))
        lin.weight.grad = None
        y = f(x)
        y.backward(g)
        assert rel_err(y, ref_y) < 0.06, kw
        assert lin.weight.grad.dtype == torch.float32  # accumulates into the fp32 master grad
        assert rel_err(lin.weight.grad, ref_dw) < 0.10, kw


def test_autocast_gives_bf16_output_and_fp32_weight_grad():
    lin = nn.Linear(128, 64, bias=False)
    f = Float8Linear.from_linear(lin, Fp8Options(**ON))
    x = torch.randn(2, 16, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = lin(x)
    assert rel_err(y, y_ref) < 0.06


def test_quantize_zero_and_saturation_are_finite():
    z, inv = quantize_tensorwise(torch.zeros(16, 16), fp8.E4M3)
    assert torch.isfinite(inv) and (z.float() == 0).all()
    big = torch.tensor([[1e30, -1e30, 1.0, 0.0]])
    q, inv = quantize_tensorwise(big, fp8.E5M2)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == fp8.E5M2_MAX
    f = Float8Linear.from_linear(nn.Linear(32, 32, bias=False), Fp8Options(**ON))
    x = torch.zeros(16, 32, requires_grad=True)
    f(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(f.weight.grad).all()


def test_both_layouts_are_one_quantisation():
    """The transposed FP8 copy is cast from the high-precision tensor, not by transposing the
    FP8 one: it must hold exactly the same values, with the same scale, row-major."""
    x = torch.randn(48, 80) * 5
    x[3, 7] = 1e4  # saturates nothing (the scale follows amax) but sets it
    for dtype in (fp8.E4M3, fp8.E5M2):
        q, q_t, inv = fp8._quantize_both_layouts(x, dtype)
        q_ref, inv_ref = quantize_tensorwise(x, dtype)
        assert q_t.shape == (80, 48) and q_t.is_contiguous() and q.is_contiguous()
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(q_t.view(torch.uint8), q_ref.t().contiguous().view(torch.uint8))
        assert torch.equal(inv, inv_ref)


def test_no_grad_forward_skips_the_transposed_copy(monkeypatch):
    """Frozen blocks (dynamic_suffix) run FP8 linears under no_grad: no backward will come, so
    the column-major copy of x for dW must not be made (autograd sets needs_input_grad even
    then, so the layer passes the grad mode in)."""
    calls = []
    real = fp8._quantize_both_layouts
    monkeypatch.setattr(fp8, "_quantize_both_layouts", lambda *a: calls.append(1) or real(*a))
    f = Float8Linear.from_linear(nn.Linear(32, 32, bias=False), Fp8Options(**ON))
    x = torch.randn(16, 32)
    with torch.no_grad():
        y_nograd = f(x)
    assert calls == []
    y = f(x)
    y.sum().backward()
    assert len(calls) == 2 and torch.equal(y.detach(), y_nograd)  # x in forward, the gradient in backward


# ----------------------------------------------------------------------------- filter/report
def test_filter_decisions():
    opts = Fp8Options(**ON, min_dim=64)
    assert fp8_filter(nn.Conv1d(16, 16, 1), "x", opts)[0] is False
    assert fp8_filter(nn.Linear(128, 128), "x", opts)[0] is False  # bias: custom can't
    assert fp8_filter(nn.Linear(128, 128), "x", Fp8Options(**ON, backend="torchao"))[0] is True
    assert fp8_filter(nn.Linear(128, 100, bias=False), "x", opts) == (
        False, "dims 128x100 not divisible by 16 (_scaled_mm needs it)")
    assert fp8_filter(nn.Linear(128, 32, bias=False), "x", opts)[0] is False  # min dim
    assert fp8_filter(nn.Linear(128, 64, bias=False), "x", opts)[0] is True
    lin = nn.Linear(128, 128, bias=False)
    assert fp8_filter(lin, "lm_head", opts)[0] is True
    assert fp8_filter(lin, "lm_head", Fp8Options(**ON, skip_lm_head=True))[0] is False
    qk = Fp8Options(**ON, skip_attn_qk=True)
    assert fp8_filter(lin, "transformer.h.0.attn.c_q", qk)[0] is False
    assert fp8_filter(lin, "transformer.h.3.attn.c_k", qk)[0] is False
    assert fp8_filter(lin, "transformer.h.0.attn.c_v", qk)[0] is True
    assert fp8_filter(lin, "transformer.h.0.attn.c_proj", qk)[0] is True
    inc = Fp8Options(**ON, include_regex=r"mlp\.")
    assert fp8_filter(lin, "transformer.h.0.mlp.c_fc", inc)[0] is True
    assert fp8_filter(lin, "transformer.h.0.attn.c_v", inc)[0] is False
    exc = Fp8Options(**ON, exclude_regex=r"h\.0\.")
    assert fp8_filter(lin, "transformer.h.0.mlp.c_fc", exc)[0] is False
    assert fp8_filter(lin, "transformer.h.1.mlp.c_fc", exc)[0] is True


def test_convert_report_counts_and_weight_identity():
    m = _tiny()  # per layer: c_q 128x128, c_k/c_v 128x64, c_proj 128x128, c_fc 128x512, c_proj 512x128
    weights = {n: p for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # built BEFORE the conversion
    rep = convert_to_fp8(m, Fp8Options(**ON, min_dim=128, skip_lm_head=True))
    assert rep.summary() == "FP8 (custom, tensorwise): converted 8/13 linears"
    skipped = dict(rep.skipped)
    assert "min(in=128, out=64) < --fp8-min-dim=128" in skipped["transformer.h.0.attn.c_k"]
    assert "--fp8-skip-lm-head" in skipped["lm_head"]
    assert isinstance(m.transformer.h[1].mlp.c_fc, Float8Linear)
    assert type(m.transformer.h[1].attn.c_v) is nn.Linear
    for n, p in m.named_parameters():
        assert p is weights[n]  # same Parameter objects, no copies
    details = rep.details()
    assert "fp8   transformer.h.0.mlp.c_fc" in details and "skip  lm_head" in details
    # the optimizer built before conversion still moves the weights the FP8 modules use
    before = m.transformer.h[0].mlp.c_fc.weight.detach().clone()
    m(torch.randn(1, 16, 128)).float().square().mean().backward()
    opt.step()
    assert not torch.equal(m.transformer.h[0].mlp.c_fc.weight, before)
    # converting again is a no-op
    assert convert_to_fp8(m, Fp8Options(**ON, min_dim=128)).converted == ["lm_head"]


# ----------------------------------------------------------------------------- validation
def test_validation_messages():
    assert validate_fp8_options(Fp8Options()) == []
    assert validate_fp8_options(Fp8Options(**ON)) == []
    assert validate_fp8_options(Fp8Options(**ON, backend="torchao", recipe="rowwise")) == []
    (msg,) = validate_fp8_options(Fp8Options(**ON, recipe="rowwise"))
    assert "--fp8-recipe=rowwise needs --fp8-backend=torchao" in msg
    probs = validate_fp8_options(Fp8Options(**ON, backend="torchao", fast_accum=True,
                                            weight_grad_bf16=True, no_allow_in_graph=True))
    assert len(probs) == 3
    assert all("only applies to --fp8-backend=custom" in p for p in probs)
    assert any("--fp8-fast-accum" in p for p in probs) and any("--fp8-no-allow-in-graph" in p for p in probs)
    (msg,) = validate_fp8_options(Fp8Options(**ON, include_regex="mlp("))
    assert msg.startswith("--fp8-include-regex='mlp(' is not a valid regular expression:")
    (msg,) = validate_fp8_options(Fp8Options(**ON, exclude_regex="[a"))
    assert "--fp8-exclude-regex" in msg
    (msg,) = validate_fp8_options(Fp8Options(backend="torchao", skip_lm_head=True))
    assert "--fp8-backend, --fp8-skip-lm-head given without --fp8" in msg
    assert len(validate_fp8_options(Fp8Options(**ON, backend="x", recipe="y"))) == 2
    with pytest.raises(ValueError, match="rowwise"):
        convert_to_fp8(_tiny(), Fp8Options(**ON, recipe="rowwise"))


def test_from_args_and_hardware_check():
    ns = argparse.Namespace(fp8=True, fp8_backend="torchao", fp8_recipe="rowwise", fp8_min_dim=64,
                            fp8_include_regex=None, other=1)
    o = Fp8Options.from_args(ns)
    assert (o.enabled, o.backend, o.recipe, o.min_dim, o.skip_lm_head) == (True, "torchao", "rowwise", 64, False)
    assert check_fp8_hardware("cpu") is None
    assert "not supported" in check_fp8_hardware("mps")
    if not torch.cuda.is_available():
        assert "no CUDA device" in check_fp8_hardware("cuda")


# ----------------------------------------------------------------------------- torchao
def test_torchao_conversion_matches_custom():
    pytest.importorskip("torchao.float8")
    opts = dict(min_dim=128, skip_attn_qk=True)
    m_ao, m_cu = _tiny(), _tiny()
    w = m_ao.lm_head.weight
    rep_ao = convert_to_fp8(m_ao, Fp8Options(**ON, backend="torchao", **opts))
    rep_cu = convert_to_fp8(m_cu, Fp8Options(**ON, backend="custom", **opts))
    assert rep_ao.summary() == "FP8 (torchao, tensorwise): converted 7/13 linears"
    assert rep_ao.converted == rep_cu.converted and rep_ao.skipped == rep_cu.skipped
    assert m_ao.lm_head.weight is w and type(m_ao.lm_head).__module__.startswith("torchao")
    x = torch.randn(2, 16, 128)
    y_ao, y_cu = m_ao(x), m_cu(x)
    y_ao.square().mean().backward()
    y_cu.square().mean().backward()
    # same tensorwise algorithm: outputs and grads agree far below the FP8 round-off itself
    assert rel_err(y_ao, y_cu) < 0.01
    assert rel_err(m_ao.lm_head.weight.grad, m_cu.lm_head.weight.grad) < 0.01
    # disable_fp8 swaps torchao modules for nn.Linear sharing the weight, then swaps back
    ao_mod = m_ao.lm_head
    with disable_fp8(m_ao):
        assert type(m_ao.lm_head) is nn.Linear and m_ao.lm_head.weight is w
        torch.testing.assert_close(m_ao.lm_head(x), x @ w.t(), rtol=0, atol=0)
    assert m_ao.lm_head is ao_mod


def test_torchao_rowwise_runs():
    pytest.importorskip("torchao.float8")
    m = _tiny(n_layer=1)
    rep = convert_to_fp8(m, Fp8Options(**ON, backend="torchao", recipe="rowwise", min_dim=64))
    assert rep.summary().startswith("FP8 (torchao, rowwise): converted 7/7")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(1, 16, 128))
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_torchao_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install torchao.*--fp8-backend=custom"):
        convert_to_fp8(_tiny(), Fp8Options(**ON, backend="torchao"))


# ----------------------------------------------------------------------------- compile
def _grads(model, x):
    for p in model.parameters():
        p.grad = None
    x.grad = None
    y = model(x)
    y.float().square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("traced", [False, True], ids=["custom_op", "no_allow_in_graph"])
def test_compiled_training_step_runs_fp8_kernel(traced):
    """The hazard: under compile an FP8 kernel that never runs. Here the default path must call
    the registered custom op at run time (counter + generated code), the traced path must put
    aten._scaled_mm itself into the compiled graphs, and both must match eager."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    m = _tiny(n_layer=1)
    rep = convert_to_fp8(m, Fp8Options(**ON, min_dim=64, no_allow_in_graph=traced))
    assert len(rep.converted) == 7
    x = torch.randn(2, 16, 128, requires_grad=True)
    y_eager, g_eager = _grads(m, x)
    compiled = torch.compile(m)
    before = fp8.KERNEL_CALLS["scaled_mm"]
    (y_comp, g_comp), codes = run_and_get_code(_grads, compiled, x)
    calls = fp8.KERNEL_CALLS["scaled_mm"] - before
    code = "\n".join(codes)
    if traced:
        # all 21 GEMMs (7 forward, 7 dX, 7 dW) are FP8 GEMMs that inductor calls directly
        assert calls == 0 and "nanochat_fp8" not in code
        assert code.count("extern_kernels._scaled_mm(") == 21
    else:
        # 7 forward GEMMs, 7 dW, 7 dX (x requires grad so every layer needs dX)
        assert calls == 21 and "nanochat_fp8" in code
        before = fp8.KERNEL_CALLS["scaled_mm"]
        _grads(compiled, x)  # cached graph, no recompile: the kernel still runs
        assert fp8.KERNEL_CALLS["scaled_mm"] - before == 21
    assert rel_err(y_comp, y_eager) < 1e-2
    for a, b in zip(g_comp, g_eager):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-2
    torch._dynamo.reset()


def test_compiled_forward_with_weight_cache():
    """fullgraph=True: the cached path must not graph-break (no `_version` read under compile)."""
    torch._dynamo.reset()
    f = Float8Linear.from_linear(nn.Linear(128, 64, bias=False), Fp8Options(**ON))
    x = torch.randn(32, 128)
    ref = f(x)
    f.freeze_weight_cache(True)
    cf = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cf(x), ref, rtol=0, atol=0)
        f.weight.mul_(2.0)  # e.g. a checkpoint load into a frozen layer
        assert f.weight_cache_is_stale()
        assert refresh_fp8_weight_caches(f) == 1 and not f.weight_cache_is_stale()
        torch.testing.assert_close(cf(x), 2 * ref, rtol=1e-2, atol=1e-2)
        w8, inv = f._w_cache
        f._w_cache = (torch.zeros_like(w8), inv)  # the compiled graph really reads the cache
        assert (cf(x) == 0).all()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- cache / disable
def test_frozen_weight_cache_reuse_and_invalidation():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    f = Float8Linear.from_linear(lin, Fp8Options(**ON))
    x = torch.randn(32, 128)
    ref = f(x)
    f.freeze_weight_cache(True)
    cached = f._w_cache
    assert cached is not None
    with torch.no_grad():
        torch.testing.assert_close(f(x), ref, rtol=0, atol=0)
        assert f._w_cache is cached  # reused, not re-quantized
    # the cached e4m3 weight is really what the forward uses
    with torch.no_grad():
        f._w_cache = (torch.zeros_like(cached[0]), cached[1])
        assert (f(x) == 0).all()
        f._w_cache = cached
    # an in-place update (optimizer step) bumps weight._version and invalidates the cache
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))
    y_new = f(x)
    assert f._w_cache is not cached
    f.freeze_weight_cache(False)
    assert f._w_cache is None
    torch.testing.assert_close(f(x), y_new, rtol=0, atol=0)
    # model-level helper on a subset of modules (e.g. the frozen prefix blocks)
    m = _tiny()
    convert_to_fp8(m, Fp8Options(**ON, min_dim=64))
    assert set_fp8_weight_cache(m, True, modules=[m.transformer.h[0]]) == 6
    assert m.transformer.h[0].mlp.c_fc._w_cache is not None and m.transformer.h[1].mlp.c_fc._w_cache is None
    assert set_fp8_weight_cache(m, False) == 13


def test_disable_fp8_matches_plain_linear():
    m = _tiny()
    plain = copy.deepcopy(m)
    convert_to_fp8(m, Fp8Options(**ON, min_dim=64))
    x = torch.randn(2, 16, 128)
    with disable_fp8(m):
        assert not any(isinstance(mod, Float8Linear) and mod.fp8_enabled for mod in m.modules())
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = m(x), plain(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert all(mod.fp8_enabled for mod in m.modules() if isinstance(mod, Float8Linear))
    assert not torch.equal(m(x), plain(x))  # FP8 again


# ----------------------------------------------------------------------------- GPU (sm_89+)
def _needs_fp8_gpu():
    if check_fp8_hardware("cuda") is not None:
        pytest.skip(check_fp8_hardware("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("traced", [False, True], ids=["custom_op", "no_allow_in_graph"])
def test_gpu_compiled_model_under_autocast(traced, monkeypatch):
    """cuBLASLt layout rules (row-major x col-major, dims % 16) hold for all three GEMMs, with
    T = 50 forcing the token padding; compiled FP8 == eager FP8; FP8 ~ bf16; no NaN.

    Compiled vs eager under bf16 autocast: inductor skips the bf16 rounding of intermediates
    that feed a quantization (fp32 -> bf16 -> fp32 is elided), so the amax and therefore every
    FP8 rounding decision can differ: measured ~4 % apart, i.e. independent FP8 noise, not a
    bug. `emulate_precision_casts` keeps those roundings, making compiled == eager testable."""
    _needs_fp8_gpu()
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "emulate_precision_casts", True)
    torch._dynamo.reset()
    m = _tiny(d=256, kv=128, std=0.02).cuda()
    convert_to_fp8(m, Fp8Options(**ON, min_dim=128, no_allow_in_graph=traced, fast_accum=True))
    x = torch.randn(4, 50, 256, device="cuda", requires_grad=True)

    def step(model):
        for p in model.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]

    y_e, g_e = step(m)
    assert y_e.dtype == torch.bfloat16
    before = fp8.KERNEL_CALLS["scaled_mm"]
    y_c, g_c = step(torch.compile(m))
    assert (fp8.KERNEL_CALLS["scaled_mm"] - before > 0) != traced
    with disable_fp8(m):
        y_b, g_b = step(m)
    errs = [rel_err(y_c, y_e)] + [rel_err(a, b) for a, b in zip(g_c, g_e)]
    vs_bf16 = [rel_err(y_e, y_b)] + [rel_err(a, b) for a, b in zip(g_e, g_b)]
    print(f"compiled vs eager max {max(errs):.4f}; fp8 vs bf16 max {max(vs_bf16):.4f}")
    assert all(torch.isfinite(g).all() for g in g_c)
    assert max(errs) < 1e-2
    assert max(vs_bf16) < 0.15
    torch._dynamo.reset()
