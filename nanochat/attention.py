"""Causal (optionally sliding-window) attention with several backends and one function that picks.

Layout (the FA3 layout, so the model never transposes for the fast path):

    q: (B, T, H, D)      k, v: (B, T, Hkv, D)  with H % Hkv == 0 (GQA)      out: (B, T, H, D)

Query head h reads key/value head ``h // (H // Hkv)`` (the convention shared by FA3, SDPA's
``enable_gqa`` and FlexAttention's ``enable_gqa``). The softmax scale is always ``D ** -0.5``.

Window convention (every backend implements exactly this):

    window == -1 or window >= T : full causal, query i attends to keys 0..i
    window == w >= 1            : query i attends to keys j with  i - w < j <= i,
                                  i.e. the w most recent positions *including itself*
                                  (fewer near the start of the sequence).
    window == 0 or < -1         : ValueError.

So ``window=1`` is "attend to self only", and FA3's ``window_size=(w - 1, 0)`` is the same set.

Backends
--------
* ``fa3``   FlashAttention-3 (``flash_attn_interface``), Hopper + bf16 only. Fastest, native windows.
* ``sdpa``  ``F.scaled_dot_product_attention``. Full causal uses ``is_causal=True`` (flash/cuDNN
            kernels). Windows use an explicit boolean mask, which forces the slow masked kernels
            (the "sliding windows without FA3 run 10x slower" trap), so ``auto`` avoids it on CUDA.
* ``cudnn`` cuDNN's fused attention with its native sliding window (a diagonal band), through the
            optional ``nvidia-cudnn-frontend`` package's ``torch.ops.cudnn.sdpa_fwd`` (a registered
            custom op with autograd and a fake kernel, so it sits inside compiled regions). The
            'S' layers skip everything outside the band at cuDNN's speed; the 'L' layers use SDPA's
            is_causal kernels (cuDNN on Hopper as well). CUDA only.
* ``flex``  FlexAttention with a cached sliding-window ``BlockMask`` for the 'S' layers:
            fully-masked tiles are skipped, so windowed layers cost ~window/T of full attention;
            the 'L' layers use SDPA's is_causal kernels. Needs ``torch.compile`` to be fast;
            outside a compiled model we compile ``flex_attention`` once, lazily.
            On CPU, torch has no FlexAttention backward, so ``auto`` never picks it there.
* ``eager`` Plain matmul + mask + softmax in fp32. The test reference; O(T^2) memory.

``select_attention_backend`` picks one backend for the whole run (simpler to reason about and to
log) and says why; ``attention`` dispatches to it.
"""
from __future__ import annotations

import functools
import importlib
import math

import torch
import torch.nn.functional as F

BACKENDS = ("fa3", "cudnn", "flex", "sdpa", "eager")

# SDPA grew enable_gqa in torch 2.5; keep a repeat_interleave fallback so older builds stay correct.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


# -----------------------------------------------------------------------------
# Window helpers


def normalize_window(window: int, T: int) -> int:
    """Return -1 for full causal (window -1 or >= T), else the window w (1 <= w < T)."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"attention window must be an int (-1 = full causal, or >= 1), got {window!r}")
    if window == -1 or window >= T:
        return -1
    if window < 1:
        raise ValueError(f"attention window must be -1 (full causal) or >= 1, got {window}")
    return window


def window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i (row) may attend to key j (column)."""
    w = normalize_window(window, T)
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(T, device=device).unsqueeze(0)
    mask = j <= i
    if w > 0:
        mask = mask & (i - j < w)
    return mask


_SDPA_MASKS: dict = {}


def _cached_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # no global-dict side effects inside a dynamo trace
        return window_mask(T, window, device)
    key = (T, window, str(device))
    m = _SDPA_MASKS.get(key)
    if m is None:
        m = _SDPA_MASKS[key] = window_mask(T, window, device)
    return m


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (B, T, H, D) tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, T, Hkv, D) matching q{tuple(q.shape)}, "
                         f"got k{tuple(k.shape)} v{tuple(v.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"number of query heads {H} must be a multiple of kv heads {k.shape[2]}")


# -----------------------------------------------------------------------------
# Backends. All take and return the (B, T, H, D) layout.


def attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """Reference: fp32 matmul + boolean mask + softmax. Returns q.dtype, contiguous (B, T, H, D)."""
    _check_shapes(q, k, v)
    B, T, H, D = q.shape
    group = H // k.shape[2]
    qf = q.float().transpose(1, 2)                                    # (B, H, T, D)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)    # (B, H, T, D)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-2, -1)) * (1.0 / math.sqrt(D))       # (B, H, T, T)
    scores = scores.masked_fill(~window_mask(T, window, q.device), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vf                            # (B, H, T, D)
    return y.transpose(1, 2).contiguous().to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """SDPA: is_causal=True for full causal (fast kernels), explicit boolean mask for windows."""
    _check_shapes(q, k, v)
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    w = normalize_window(window, T)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H*, T, D)
    kwargs = {}
    if Hkv != H:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(H // Hkv, dim=1)
            vt = vt.repeat_interleave(H // Hkv, dim=1)
    if w == -1:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kwargs)
    else:
        mask = _cached_window_mask(T, w, q.device)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kwargs)
    return y.transpose(1, 2).contiguous()


_BLOCK_MASKS: dict = {}
_COMPILED_FLEX = None


def _flex_module():
    from torch.nn.attention import flex_attention as fa  # torch >= 2.5
    return fa


def _sliding_mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if window < 0:
            return causal
        return causal & (q_idx - kv_idx < window)
    return mask_mod


def get_block_mask(T: int, window: int, device):
    """The FlexAttention BlockMask for (T, window, device), built once and cached.

    Call it before ``torch.compile``-ing the model (e.g. ``prepare_attention``) so the compiled
    graph finds the mask in the cache instead of tracing its construction.
    """
    w = normalize_window(window, T)
    key = (T, w, str(torch.device(device)))
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        fa = _flex_module()
        bm = fa.create_block_mask(_sliding_mask_mod(w), None, None, T, T, device=device)
        _BLOCK_MASKS[key] = bm
    return bm


def _flex_fn(device_type: str):
    """flex_attention itself inside a dynamo trace; otherwise a once-compiled copy on CUDA.

    On CPU we call it uncompiled: compiling takes ~20 s there and only the forward exists anyway.
    """
    global _COMPILED_FLEX
    fa = _flex_module()
    if torch.compiler.is_compiling() or device_type != "cuda":
        return fa.flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(fa.flex_attention, dynamic=False)
    return _COMPILED_FLEX


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """FlexAttention with a cached sliding-window BlockMask (masked tiles skipped) for sliding
    layers; full-causal layers go to SDPA's is_causal kernels, which skip the masked half just as
    well and are faster than flex's generated kernels (on an H100 at seq 2048, SSSL with flex on
    every layer runs at 0.62x the tok/s of L on SDPA)."""
    _check_shapes(q, k, v)
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    if normalize_window(window, T) == -1:
        return attention_sdpa(q, k, v, window)
    block_mask = get_block_mask(T, window, q.device)
    fn = _flex_fn(q.device.type)
    y = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
           block_mask=block_mask, enable_gqa=(Hkv != H))
    return y.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=1)
def _fa3_func():
    import flash_attn_interface  # FA3 (Hopper build); imported only when the fa3 backend is used
    return flash_attn_interface.flash_attn_func


def attention_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """FlashAttention-3: native (B, T, H, D) layout, GQA and windows; window_size=(w-1, 0)."""
    T = q.shape[1]
    w = normalize_window(window, T)
    window_size = (-1, -1) if w == -1 else (w - 1, 0)
    out = _fa3_func()(q, k, v, causal=True, window_size=window_size)
    return out[0] if isinstance(out, tuple) else out   # some FA3 versions also return the LSE


@functools.lru_cache(maxsize=1)
def _register_cudnn_op() -> None:
    """Import nvidia-cudnn-frontend (>= 1.32), which registers ``torch.ops.cudnn.sdpa_fwd``/``_bwd``."""
    importlib.import_module("cudnn.sdpa.fwd.torch_op")


def attention_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1) -> torch.Tensor:
    """cuDNN fused attention with a native sliding window for 'S' layers; SDPA is_causal for 'L'.

    cuDNN's left band bound is a length: it admits keys j > i - bound, so ``window_left = w`` is
    exactly this module's "w most recent keys including self". GQA is native (H_k < H_q).
    """
    _check_shapes(q, k, v)
    T, D = q.shape[1], q.shape[3]
    w = normalize_window(window, T)
    if w == -1:
        return attention_sdpa(q, k, v, window)
    if not torch.compiler.is_compiling():
        _register_cudnn_op()  # import once, outside any trace (dynamo cannot trace an import)
    y, _lse = torch.ops.cudnn.sdpa_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), D ** -0.5,
                                       is_causal=True, window_left=w)
    return y.transpose(1, 2).contiguous()  # no copy: the op gives O the memory layout of Q


_IMPLS = {"fa3": attention_fa3, "cudnn": attention_cudnn, "flex": attention_flex, "sdpa": attention_sdpa,
          "eager": attention_eager}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = -1,
              backend: str = "sdpa") -> torch.Tensor:
    """Causal attention. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D); see module docstring.

    ``backend`` is a name from ``BACKENDS``, normally the one ``select_attention_backend`` chose.
    """
    impl = _IMPLS.get(backend)
    if impl is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return impl(q, k, v, window)


# -----------------------------------------------------------------------------
# Availability probes (module-level functions so tests can monkeypatch them)


@functools.lru_cache(maxsize=1)
def _fa3_importable_cached() -> bool:
    try:
        _fa3_func()
        return True
    except Exception:  # ImportError, or a broken build raising at import time
        return False


def fa3_importable() -> bool:
    return _fa3_importable_cached()


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


@functools.lru_cache(maxsize=1)
def _cudnn_frontend_problem() -> str | None:
    try:
        _register_cudnn_op()
        return None
    except Exception as e:  # ImportError, or a frontend built against another cuDNN
        return _one_line(e)


def cudnn_frontend_importable() -> bool:
    return _cudnn_frontend_problem() is None


@functools.lru_cache(maxsize=None)
def _cudnn_window_probe(head_dim: int, dtype: torch.dtype) -> str | None:
    """Run one tiny windowed forward + backward on the current GPU; None if it works, else why not.

    Importing the frontend does not prove that the installed cuDNN builds this graph (an old
    libcudnn, a head dim it has no kernel for); finding out here lets ``auto`` fall back to flex
    with the reason in the log instead of failing inside the first compiled step."""
    try:
        x = torch.randn(1, 128, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        attention_cudnn(x, x, x, 64).float().sum().backward()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # cuDNN graph build / support-check errors come in several types
        return _one_line(e)


def flex_importable() -> bool:
    try:
        _flex_module()
        return True
    except Exception:
        return False


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r} for attention backend selection")


def _unavailable_reason(backend: str, device_type: str, dtype: torch.dtype,
                        head_dim: int | None = None) -> str | None:
    """None if `backend` can run (forward and backward) here, else why not. With `head_dim`, the
    cudnn backend is also tried once on the GPU (``_cudnn_window_probe``)."""
    if backend == "fa3":
        if device_type != "cuda":
            return f"fa3 needs a CUDA device, got device_type={device_type!r}"
        if not fa3_importable():
            return "fa3 needs the flash_attn_interface package (FlashAttention-3), which is not importable"
        cap = cuda_capability()
        if cap is None or cap[0] != 9:
            return f"fa3 needs a Hopper GPU (compute capability 9.x), found {cap}"
        if dtype != torch.bfloat16:
            return f"fa3 is used only with bfloat16, got {dtype}"
        return None
    if backend == "cudnn":
        if device_type != "cuda":
            return f"cudnn needs a CUDA device, got device_type={device_type!r}"
        if not cudnn_frontend_importable():
            return ("cudnn needs torch.ops.cudnn.sdpa_fwd from the nvidia-cudnn-frontend package "
                    "(pip install --no-deps 'nvidia-cudnn-frontend>=1.32'), which is not importable: "
                    f"{_cudnn_frontend_problem()}")
        cap = cuda_capability()
        if cap is None or cap < (8, 0):
            return f"cudnn fused attention needs compute capability >= 8.0, found {cap}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"cudnn fused attention runs bf16/fp16 only, got {dtype}"
        if head_dim is not None:
            problem = _cudnn_window_probe(head_dim, dtype)
            if problem is not None:
                return f"a test call of cuDNN's windowed attention (head dim {head_dim}) failed: {problem}"
        return None
    if backend == "flex":
        if not flex_importable():
            return f"flex needs torch.nn.attention.flex_attention (torch >= 2.5), torch is {torch.__version__}"
        if device_type != "cuda":
            return f"flex has no backward pass on {device_type} in torch {torch.__version__}; use sdpa or eager"
        return None
    if backend in ("sdpa", "eager"):
        return None
    raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")


def select_attention_backend(device_type: str, window_pattern: str, dtype,
                             requested: str = "auto", head_dim: int | None = None) -> tuple[str, str]:
    """Pick ONE attention backend for the run; return (backend, human-readable reason).

    ``window_pattern`` is the per-layer pattern of 'L' (full causal) and 'S' (sliding window)
    layers, e.g. "L" or "SSSL". ``requested`` is 'auto' or a backend name; an explicit name is
    honoured if it can run here, else ValueError explains why not. ``head_dim`` (the model's)
    lets the cudnn backend be test-called once on the GPU before it is chosen.

    auto on CUDA: fa3 (Hopper + bf16 + importable) > sdpa when every layer is 'L' (is_causal flash
    / cuDNN kernels) > cudnn when any layer slides and nvidia-cudnn-frontend is importable (cuDNN's
    native window; faster than flex, docs/optimizations/throughput.md "Sliding windows") > flex
    (skips masked tiles; its 'L' layers run SDPA is_causal) > masked sdpa (slow, warned).
    auto elsewhere: sdpa (is_causal for 'L', boolean mask for 'S'; flex has no CPU backward).
    """
    if not isinstance(window_pattern, str) or not window_pattern or set(window_pattern.upper()) - {"S", "L"}:
        raise ValueError(f"window pattern must be a non-empty string of 'S' and 'L', got {window_pattern!r}")
    dtype = _parse_dtype(dtype)
    has_short = "S" in window_pattern.upper()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of "
                             f"{', '.join(BACKENDS)}")
        why_not = _unavailable_reason(requested, device_type, dtype, head_dim)
        if why_not is not None:
            raise ValueError(f"attention backend {requested!r} is not available: {why_not}")
        return requested, f"requested explicitly ({requested})"

    if device_type == "cuda":
        if _unavailable_reason("fa3", device_type, dtype) is None:
            return "fa3", "flash_attn_interface importable on Hopper with bf16: FA3 native sliding windows"
        if not has_short:
            return "sdpa", f"full-causal pattern {window_pattern}: SDPA flash/cuDNN kernels (is_causal=True)"
        cudnn_why_not = _unavailable_reason("cudnn", device_type, dtype, head_dim)
        if cudnn_why_not is None:
            return "cudnn", (f"sliding windows in pattern {window_pattern} without FA3: cuDNN's native sliding "
                             "window (nvidia-cudnn-frontend) for the S layers, SDPA is_causal for the L layers")
        if _unavailable_reason("flex", device_type, dtype) is None:
            return "flex", (f"sliding windows in pattern {window_pattern} without FA3 or cuDNN windows "
                            f"({cudnn_why_not}): FlexAttention skips masked blocks in the S layers, L layers "
                            "use SDPA is_causal")
        return "sdpa", (f"sliding windows in pattern {window_pattern} without FA3 or FlexAttention: SDPA with an "
                        "explicit mask (correct but much slower)")
    if not has_short:
        return "sdpa", f"full-causal pattern {window_pattern} on {device_type}: SDPA is_causal=True"
    return "sdpa", (f"sliding windows on {device_type}: SDPA with a boolean window mask "
                    f"(FlexAttention has no {device_type} backward)")


def prepare_attention(backend: str, T: int, windows, device) -> None:
    """Build per-run caches before compiling the model (flex block masks / SDPA window masks)."""
    device = torch.device(device)
    for w in set(windows):
        if backend == "flex" and normalize_window(w, T) != -1:
            get_block_mask(T, w, device)
        elif backend == "cudnn":
            _register_cudnn_op()  # before the model is traced
        elif backend == "sdpa" and normalize_window(w, T) != -1:
            _cached_window_mask(T, normalize_window(w, T), device)
