"""Attention backends vs the fp32 eager reference, the window convention, and backend selection."""
import pytest
import torch

from nanochat import attention as A

# CPU FlexAttention runs uncompiled in these tests on purpose (compiling takes ~20 s on 2 cores).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

T = 19  # odd, not a multiple of any block size
WINDOWS = [-1, 1, 3, T // 2, T, T + 5]
HEADS = [(4, 2), (4, 4), (4, 1)]  # (H, Hkv)


def _qkv(B=2, T=T, H=4, Hkv=2, D=8, dtype=torch.float32, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, T, h, D, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    q, k, v = mk(H), mk(Hkv), mk(Hkv)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _fwd_bwd(backend, q, k, v, window):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = A.attention(q, k, v, window, backend)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    (out.float() * upstream.float()).sum().backward()
    return out, q.grad, k.grad, v.grad


# -----------------------------------------------------------------------------
# window convention


@pytest.mark.parametrize("window", WINDOWS)
def test_window_mask_counts_exactly_w_keys_including_self(window):
    m = A.window_mask(T, window)
    for i in range(T):
        allowed = m[i].nonzero().flatten().tolist()
        w = T if window == -1 else window
        expected = list(range(max(0, i - w + 1), i + 1))  # keys in (i - w, i]
        assert allowed == expected, (i, allowed, expected)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("window", [1, 3, -1])
def test_backends_attend_to_exactly_the_window(backend, window):
    """q = 0 gives uniform weights over allowed keys; v = one-hot(position) exposes them."""
    B, H, D = 1, 2, T
    q = torch.zeros(B, T, H, D)
    k = torch.randn(B, T, H, D)
    v = torch.eye(T).view(1, T, 1, T).expand(B, T, H, T).contiguous()
    out = A.attention(q, k, v, window, backend)[0, :, 0]  # (T, T): row i = weights over keys
    for i in range(T):
        n = i + 1 if window == -1 else min(window, i + 1)
        expected = torch.zeros(T)
        expected[i - n + 1: i + 1] = 1.0 / n
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_window_raises(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window"):
        A.attention(q, k, v, bad, "eager")


# -----------------------------------------------------------------------------
# backends vs the eager reference (CPU, float32, tight tolerance)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("window", WINDOWS)
def test_sdpa_matches_eager_forward_and_grads(window, H, Hkv):
    q, k, v = _qkv(H=H, Hkv=Hkv)
    ref = _fwd_bwd("eager", q, k, v, window)
    got = _fwd_bwd("sdpa", q, k, v, window)
    assert got[0].shape == (2, T, H, 8) and got[0].is_contiguous()
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("window", WINDOWS)
def test_flex_matches_eager_forward_on_cpu(window, H, Hkv):
    """CPU FlexAttention has no backward in torch; the forward still checks mask + GQA mapping."""
    q, k, v = _qkv(H=H, Hkv=Hkv)
    with torch.no_grad():
        ref = A.attention(q, k, v, window, "eager")
        got = A.attention(q, k, v, window, "flex")
    assert got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def _fake_fa3(q, k, v, causal, window_size):
    """FA3 semantics: key j visible to query i iff i - left <= j <= i + right (left=-1: unbounded)."""
    assert causal and q.shape[2] % k.shape[2] == 0
    B, T, H, D = q.shape
    left, right = window_size
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    mask = j <= i
    if left >= 0:
        mask &= j >= i - left
    g = H // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = (qf @ kf.transpose(-2, -1)) / D ** 0.5
    y = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vf
    return y.transpose(1, 2).to(q.dtype), None  # (out, lse) like older FA3 builds


@pytest.mark.parametrize("window", WINDOWS)
def test_fa3_window_size_conversion_with_fake_kernel(monkeypatch, window):
    calls = []

    def fake(*a, **kw):
        calls.append(kw["window_size"])
        return _fake_fa3(*a, **kw)

    monkeypatch.setattr(A, "_fa3_func", lambda: fake)
    q, k, v = _qkv()
    torch.testing.assert_close(A.attention(q, k, v, window, "fa3"), A.attention(q, k, v, window, "eager"))
    assert calls == [(-1, -1) if window in (-1, T, T + 5) else (window - 1, 0)]


def test_bf16_sdpa_close_to_eager():
    q, k, v = _qkv(dtype=torch.bfloat16)
    for window in (-1, 3):
        got = A.attention(q, k, v, window, "sdpa")
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), A.attention(q, k, v, window, "eager").float(),
                                   atol=3e-2, rtol=3e-2)


def test_compiled_sdpa_window_matches_eager_without_graph_breaks():
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: A.attention(q, k, v, 3, "sdpa"), fullgraph=True, dynamic=False)
    torch.testing.assert_close(f(q, k, v), A.attention(q, k, v, 3, "eager"), atol=2e-5, rtol=1e-5)


def test_block_mask_and_sdpa_mask_are_cached():
    A.prepare_attention("flex", T, [3, -1, T], "cpu")
    assert A.get_block_mask(T, 3, "cpu") is A.get_block_mask(T, 3, torch.device("cpu"))
    assert A.get_block_mask(T, T, "cpu") is A.get_block_mask(T, -1, "cpu")  # >= T means full causal
    A.prepare_attention("sdpa", T, [3], "cpu")
    assert A._cached_window_mask(T, 3, torch.device("cpu")) is A._cached_window_mask(T, 3, torch.device("cpu"))


def test_shape_errors():
    q, k, v = _qkv(H=4, Hkv=3)
    with pytest.raises(ValueError, match="multiple"):
        A.attention(q, k, v, -1, "sdpa")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="B, T, Hkv, D"):
        A.attention(q, k[:, :-1], v[:, :-1], -1, "sdpa")


# -----------------------------------------------------------------------------
# selection


@pytest.fixture
def hw(monkeypatch):
    """Fake hardware: hw(fa3=bool, cap=(9, 0) | None, flex=bool, cudnn=bool, cudnn_probe=None | str)."""
    def set_(fa3=False, cap=(9, 0), flex=True, cudnn=False, cudnn_probe=None):
        monkeypatch.setattr(A, "fa3_importable", lambda: fa3)
        monkeypatch.setattr(A, "_cudnn_frontend_problem", lambda: None if cudnn else "ModuleNotFoundError: cudnn")
        monkeypatch.setattr(A, "_cudnn_window_probe", lambda head_dim, dtype: cudnn_probe)
        monkeypatch.setattr(A, "cuda_capability", lambda: cap)
        monkeypatch.setattr(A, "flex_importable", lambda: flex)
    return set_


@pytest.mark.parametrize(
    "fa3,cap,flex,pattern,dtype,expected",
    [
        (True, (9, 0), True, "L", torch.bfloat16, "fa3"),
        (True, (9, 0), True, "SSSL", torch.bfloat16, "fa3"),
        (True, (9, 0), True, "SSSL", torch.float32, "flex"),  # FA3 is bf16-only
        (True, (8, 0), True, "SSSL", torch.bfloat16, "flex"),  # Ampere: no FA3
        (True, (8, 0), True, "L", torch.bfloat16, "sdpa"),
        (False, (9, 0), True, "L", torch.bfloat16, "sdpa"),
        (False, (9, 0), True, "SSSL", torch.bfloat16, "flex"),
        (False, (9, 0), True, "S", torch.bfloat16, "flex"),
        (False, (9, 0), False, "SSSL", torch.bfloat16, "sdpa"),  # no flex: masked SDPA, slow
        (False, (9, 0), True, "LLLL", "bf16", "sdpa"),
    ],
)
def test_select_cuda(hw, fa3, cap, flex, pattern, dtype, expected):
    hw(fa3=fa3, cap=cap, flex=flex)
    backend, reason = A.select_attention_backend("cuda", pattern, dtype)
    assert backend == expected
    assert isinstance(reason, str) and reason.strip()


@pytest.mark.parametrize(
    "fa3,cap,pattern,dtype,expected",
    [
        (False, (9, 0), "SSSL", torch.bfloat16, "cudnn"),  # cuDNN windows beat flex when importable
        (False, (8, 0), "SSSL", torch.bfloat16, "cudnn"),
        (False, (9, 0), "L", torch.bfloat16, "sdpa"),       # no window: plain SDPA is_causal
        (True, (9, 0), "SSSL", torch.bfloat16, "fa3"),      # FA3 still first
        (False, (9, 0), "SSSL", torch.float32, "flex"),     # cuDNN fused attention is bf16/fp16 only
        (False, (7, 5), "SSSL", torch.bfloat16, "flex"),    # pre-Ampere: no cuDNN fused attention
    ],
)
def test_select_cuda_with_cudnn_frontend(hw, fa3, cap, pattern, dtype, expected):
    hw(fa3=fa3, cap=cap, flex=True, cudnn=True)
    backend, reason = A.select_attention_backend("cuda", pattern, dtype)
    assert backend == expected
    assert isinstance(reason, str) and reason.strip()


@pytest.mark.parametrize("device_type", ["cpu", "mps"])
@pytest.mark.parametrize("pattern", ["L", "SSSL"])
def test_select_non_cuda_is_sdpa_even_with_fa3(hw, device_type, pattern):
    hw(fa3=True, cap=(9, 0), flex=True)
    backend, reason = A.select_attention_backend(device_type, pattern, torch.bfloat16)
    assert backend == "sdpa" and reason


def test_cudnn_that_imports_but_fails_its_test_call_falls_back_to_flex(hw):
    """An importable frontend whose graph cannot be built (old libcudnn, unsupported head dim) must
    not be chosen by auto, and an explicit request must fail with the reason, before training."""
    hw(cudnn=True, cudnn_probe="cudnnGraphNotSupportedError: no engine")
    backend, reason = A.select_attention_backend("cuda", "SSSL", torch.bfloat16, head_dim=128)
    assert backend == "flex" and "no engine" in reason and "head dim 128" in reason
    with pytest.raises(ValueError, match="no engine"):
        A.select_attention_backend("cuda", "SSSL", torch.bfloat16, requested="cudnn", head_dim=128)
    # without a head dim (callers that only ask what is installed) no test call is made
    assert A.select_attention_backend("cuda", "SSSL", torch.bfloat16)[0] == "cudnn"


def test_flex_reason_says_why_cudnn_was_not_used(hw):
    hw(cudnn=False)
    backend, reason = A.select_attention_backend("cuda", "SSSL", torch.bfloat16)
    assert backend == "flex" and "ModuleNotFoundError: cudnn" in reason


def test_select_real_cpu():
    backend, reason = A.select_attention_backend("cpu", "SSSL", torch.float32)
    assert backend == "sdpa" and "mask" in reason


def test_select_explicit_requests(hw):
    hw(fa3=True, cap=(9, 0), flex=True)
    assert A.select_attention_backend("cuda", "SSSL", torch.bfloat16, requested="sdpa")[0] == "sdpa"
    assert A.select_attention_backend("cuda", "SSSL", torch.bfloat16, requested="flex")[0] == "flex"
    assert A.select_attention_backend("cuda", "L", torch.bfloat16, requested="fa3")[0] == "fa3"
    assert A.select_attention_backend("cpu", "SSSL", torch.float32, requested="eager")[0] == "eager"


@pytest.mark.parametrize(
    "hwargs,device_type,dtype,requested,match",
    [
        ({}, "cuda", torch.bfloat16, "flash", "unknown attention backend 'flash'"),
        ({"fa3": False}, "cuda", torch.bfloat16, "fa3", "flash_attn_interface"),
        ({"fa3": True, "cap": (8, 0)}, "cuda", torch.bfloat16, "fa3", "Hopper"),
        ({"fa3": True}, "cuda", torch.float32, "fa3", "bfloat16"),
        ({"fa3": True}, "cpu", torch.bfloat16, "fa3", "CUDA"),
        ({}, "cpu", torch.float32, "flex", "no backward"),
        ({"flex": False}, "cuda", torch.bfloat16, "flex", "flex_attention"),
        ({"cudnn": False}, "cuda", torch.bfloat16, "cudnn", "nvidia-cudnn-frontend"),
        ({"cudnn": True}, "cpu", torch.bfloat16, "cudnn", "CUDA"),
        ({"cudnn": True}, "cuda", torch.float32, "cudnn", "bf16/fp16"),
    ],
)
def test_select_unavailable_request_raises(hw, hwargs, device_type, dtype, requested, match):
    hw(**hwargs)
    with pytest.raises(ValueError, match=match):
        A.select_attention_backend(device_type, "SSSL", dtype, requested=requested)


@pytest.mark.parametrize("pattern", ["", "SXL", None])
def test_select_bad_pattern_raises(pattern):
    with pytest.raises(ValueError, match="pattern"):
        A.select_attention_backend("cpu", pattern, torch.float32)


def test_attention_unknown_backend_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attention(q, k, v, -1, "flash")


# -----------------------------------------------------------------------------
# GPU only (run on the GPU machine)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("window", [-1, 1, 64, 200, 256])
def test_cuda_backends_match_eager(backend, window, H, Hkv):
    q, k, v = _qkv(B=2, T=256, H=H, Hkv=Hkv, D=64, dtype=torch.bfloat16, device="cuda")
    ref = _fwd_bwd("eager", q, k, v, window)
    got = _fwd_bwd(backend, q, k, v, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("window", [-1, 1, 37, 64, 200, 256])
def test_cuda_cudnn_window_matches_eager(window, H, Hkv):
    if not A.cudnn_frontend_importable():
        pytest.skip(f"nvidia-cudnn-frontend not importable: {A._cudnn_frontend_problem()}")
    q, k, v = _qkv(B=2, T=256, H=H, Hkv=Hkv, D=64, dtype=torch.bfloat16, device="cuda")
    ref = _fwd_bwd("eager", q, k, v, window)
    got = _fwd_bwd("cudnn", q, k, v, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_cuda_cudnn_probe_and_auto_selection():
    if not A.cudnn_frontend_importable():
        pytest.skip(f"nvidia-cudnn-frontend not importable: {A._cudnn_frontend_problem()}")
    assert A._cudnn_window_probe(128, torch.bfloat16) is None
    assert A.select_attention_backend("cuda", "SSSL", torch.bfloat16, head_dim=128)[0] in ("fa3", "cudnn")


@pytest.mark.gpu
def test_cuda_cudnn_window_inside_compiled_function():
    """The op is registered with a fake kernel and autograd: one graph, no break, same numbers."""
    if not A.cudnn_frontend_importable():
        pytest.skip(f"nvidia-cudnn-frontend not importable: {A._cudnn_frontend_problem()}")
    q, k, v = _qkv(B=2, T=256, H=4, Hkv=4, D=128, dtype=torch.bfloat16, device="cuda")
    eager = _fwd_bwd("cudnn", q, k, v, 128)
    f = torch.compile(lambda q, k, v: A.attention(q, k, v, 128, "cudnn"), fullgraph=True)
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = f(q2, k2, v2)
    g = torch.Generator().manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, q2.grad, k2.grad, v2.grad), eager):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_cuda_flex_inside_compiled_function():
    q, k, v = _qkv(B=1, T=256, H=4, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda")
    A.prepare_attention("flex", 256, [64, -1], "cuda")
    f = torch.compile(lambda q, k, v: A.attention(q, k, v, 64, "flex"), fullgraph=True)
    torch.testing.assert_close(f(q, k, v).float(), A.attention(q, k, v, 64, "eager").float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [-1, 1, 64, 256])
def test_cuda_fa3_matches_eager(window):
    if not (A.fa3_importable() and (A.cuda_capability() or (0,))[0] == 9):
        pytest.skip("FA3 (flash_attn_interface) on Hopper not available")
    q, k, v = _qkv(B=2, T=256, H=4, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda")
    ref = _fwd_bwd("eager", q, k, v, window)
    got = _fwd_bwd("fa3", q, k, v, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")
