"""FP8 training for the model's Linear layers: one module filter, two backends.

Backends (`--fp8-backend`):
- `custom`: `Float8Linear` below. Dynamic *tensorwise* scaling, e4m3 for activations and
  weights, e5m2 for output gradients, all three GEMMs (out, dX, dW) through `torch._scaled_mm`.
- `torchao`: `torchao.float8.convert_to_float8_training` with a tensorwise or rowwise recipe.

Both use `fp8_filter` to decide which layers convert, and both return an `Fp8Report`.

How the custom backend interacts with `torch.compile` (the hazard: an `allow_in_graph`
autograd.Function that guards its kernel with a real-tensor check never runs the kernel under
compile, and the layer silently computes something else):
- default path: `_Fp8LinearFn` (an autograd.Function) is traced by dynamo like any other
  autograd.Function, so the scaling math (amax, scale, saturating cast) is visible to inductor
  and fuses. The three FP8 GEMMs are the registered custom op `nanochat_fp8::scaled_mm`
  (`torch.library.Library` definition + `register_fake`), which compile keeps as an opaque node of the
  graph and calls at run time. Its Python implementation bumps `KERNEL_CALLS`, so a test can
  prove that the kernel ran in a compiled forward+backward.
- `--fp8-no-allow-in-graph`: the same autograd.Function, but the GEMMs call
  `torch._scaled_mm` directly, so dynamo traces all the way down to `aten._scaled_mm` and
  inductor picks the GEMM implementation itself (extern cuBLAS, or its own template under
  max-autotune). Numerically identical; no custom op involved, so `KERNEL_CALLS` does not move.

`_scaled_mm` layout rules (cuBLASLt): first operand row-major, second column-major, every
dimension a multiple of 16, scales are fp32 *dequantisation* factors (amax / fp8_max).
In/out features are made multiples of 16 by the filter; the token dimension is zero-padded to a
multiple of 16 when needed (zero rows change neither the amax nor dW).
"""
from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # activations and weights: more mantissa
E5M2 = torch.float8_e5m2  # output gradients: more range
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
E5M2_MAX = torch.finfo(E5M2).max  # 57344.0
AMAX_EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale, never inf * 0 = NaN

BACKENDS = ("custom", "torchao")
RECIPES = ("tensorwise", "rowwise")


# ----------------------------------------------------------------------------- options
@dataclass
class Fp8Options:
    """The `--fp8*` flags (see docs/spec feature_flags). Field defaults are the flag defaults."""

    enabled: bool = False  # --fp8
    backend: str = "custom"  # --fp8-backend
    recipe: str = "tensorwise"  # --fp8-recipe (rowwise: torchao only)
    min_dim: int = 128  # --fp8-min-dim: skip layers with min(in, out) below this
    skip_lm_head: bool = False  # --fp8-skip-lm-head
    skip_attn_qk: bool = False  # --fp8-skip-attn-qk
    fast_accum: bool = False  # --fp8-fast-accum (custom; forward GEMM only)
    weight_grad_bf16: bool = False  # --fp8-weight-grad-bf16 (custom; default fp32 dW)
    no_allow_in_graph: bool = False  # --fp8-no-allow-in-graph (custom; see module docstring)
    include_regex: str | None = None  # --fp8-include-regex (re.search on the module name)
    exclude_regex: str | None = None  # --fp8-exclude-regex
    log_modules: bool = False  # --fp8-log-modules: print Fp8Report.details()

    @classmethod
    def from_args(cls, args) -> "Fp8Options":
        """Build from an argparse namespace with attributes fp8, fp8_backend, fp8_recipe, ...
        (missing attributes keep their defaults)."""
        kw = {}
        for f in fields(cls):
            attr = "fp8" if f.name == "enabled" else f"fp8_{f.name}"
            if hasattr(args, attr):
                kw[f.name] = getattr(args, attr)
        for name in ("include_regex", "exclude_regex"):  # "" from a runner env var = unset
            if kw.get(name) == "":
                kw[name] = None
        return cls(**kw)


_FLAG_NAMES = {f: "--fp8-" + f.replace("_", "-") for f in (
    "backend", "recipe", "min_dim", "skip_lm_head", "skip_attn_qk", "fast_accum",
    "weight_grad_bf16", "no_allow_in_graph", "include_regex", "exclude_regex", "log_modules")}
_CUSTOM_ONLY = ("fast_accum", "weight_grad_bf16", "no_allow_in_graph")


def validate_fp8_options(opts: Fp8Options) -> list[str]:
    """All user-facing problems with the FP8 flags (empty list = valid). Never raises."""
    problems: list[str] = []
    if not opts.enabled:
        defaults = Fp8Options()
        given = [_FLAG_NAMES[n] for n in _FLAG_NAMES if getattr(opts, n) != getattr(defaults, n)]
        if given:
            problems.append(f"{', '.join(given)} given without --fp8; add --fp8 or drop them")
        return problems
    if opts.backend not in BACKENDS:
        problems.append(f"--fp8-backend={opts.backend!r} must be one of {', '.join(BACKENDS)}")
    if opts.recipe not in RECIPES:
        problems.append(f"--fp8-recipe={opts.recipe!r} must be one of {', '.join(RECIPES)}")
    if opts.backend == "custom" and opts.recipe == "rowwise":
        problems.append("--fp8-recipe=rowwise needs --fp8-backend=torchao "
                        "(the custom backend implements tensorwise scaling only)")
    if opts.backend == "torchao":
        for name in _CUSTOM_ONLY:
            if getattr(opts, name):
                problems.append(f"{_FLAG_NAMES[name]} only applies to --fp8-backend=custom; "
                                f"torchao would ignore it, so drop it or use --fp8-backend=custom")
    if not isinstance(opts.min_dim, int) or opts.min_dim < 0:
        problems.append(f"--fp8-min-dim={opts.min_dim!r} must be a non-negative integer")
    for name in ("include_regex", "exclude_regex"):
        pattern = getattr(opts, name)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"{_FLAG_NAMES[name]}={pattern!r} is not a valid regular expression: {e}")
    return problems


def check_fp8_hardware(device_type: str) -> str | None:
    """A user-facing error if FP8 cannot run on this device type, else None.

    CPU returns None: `torch._scaled_mm` runs there (slowly) so the FP8 paths are testable; the
    caller should warn that CPU FP8 is for testing only."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "--fp8 with --device-type=cuda but no CUDA device is visible"
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            name = torch.cuda.get_device_name()
            return (f"--fp8 needs an NVIDIA GPU with compute capability >= 8.9 (Ada, Hopper or "
                    f"newer); {name} is sm_{cap[0]}{cap[1]}. Drop --fp8 (bf16 is used then).")
        return None
    if device_type == "cpu":
        return None
    return f"--fp8 is not supported on device type {device_type!r}; use CUDA (sm_89+) or drop --fp8"


# ----------------------------------------------------------------------------- filter
_QK_RE = re.compile(r"(^|\.)attn\.c_[qk]$")


def fp8_filter(module: nn.Module, fqn: str, opts: Fp8Options) -> tuple[bool, str]:
    """(convert?, reason). The one rule both backends use; reasons are shown by --fp8-log-modules."""
    if not isinstance(module, nn.Linear):
        return False, "not an nn.Linear"
    if opts.backend == "custom" and module.bias is not None:
        return False, "has a bias (the custom backend converts bias-free linears only)"
    n_in, n_out = module.in_features, module.out_features
    if n_in % 16 or n_out % 16:
        return False, f"dims {n_in}x{n_out} not divisible by 16 (_scaled_mm needs it)"
    if min(n_in, n_out) < opts.min_dim:
        return False, f"min(in={n_in}, out={n_out}) < --fp8-min-dim={opts.min_dim}"
    if opts.skip_lm_head and (fqn == "lm_head" or fqn.endswith(".lm_head")):
        return False, "lm_head skipped (--fp8-skip-lm-head)"
    if opts.skip_attn_qk and _QK_RE.search(fqn):
        return False, "attention q/k skipped (--fp8-skip-attn-qk)"
    if opts.include_regex is not None and not re.search(opts.include_regex, fqn):
        return False, f"does not match --fp8-include-regex={opts.include_regex!r}"
    if opts.exclude_regex is not None and re.search(opts.exclude_regex, fqn):
        return False, f"matches --fp8-exclude-regex={opts.exclude_regex!r}"
    return True, f"{n_in}x{n_out}"


# ----------------------------------------------------------------------------- kernels
KERNEL_CALLS = {"scaled_mm": 0}  # bumped by the custom op's real implementation (not by fakes)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major storage (a no-op if it already is)."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def _scaled_mm_kernel(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) in FP8. a: (M, K) fp8, b: (K, N) fp8, scales: () fp32.
    Returns (M, N) out_dtype. Layouts are fixed up here, so compile may pass any strides."""
    KERNEL_CALLS["scaled_mm"] += 1
    return torch._scaled_mm(a.contiguous(), _col_major(b), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=out_dtype, use_fast_accum=use_fast_accum)


# The op is defined with the low-level `torch.library.Library` API rather than the
# `torch.library.custom_op` decorator: both give compile an opaque graph node, but the decorator's
# wrapper layers cost several times the host time per call (on CPU ~28 us against 7-13 us over a
# plain `torch._scaled_mm` call), and a d12 step with every linear in FP8 makes 219 of these calls
# while the GPU waits.
_LIB = torch.library.Library("nanochat_fp8", "DEF")
_LIB.define("scaled_mm(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype, "
            "bool use_fast_accum) -> Tensor")
for _key in ("CPU", "CUDA"):
    _LIB.impl("scaled_mm", _scaled_mm_kernel, _key)


@torch.library.register_fake("nanochat_fp8::scaled_mm")
def _(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


fp8_scaled_mm = torch.ops.nanochat_fp8.scaled_mm.default


def _traced_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    """The --fp8-no-allow-in-graph GEMM: plain aten._scaled_mm that dynamo traces into."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


def _scale_for(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """() fp32 quantisation scale fp8_max / amax(|x|), amax floored at AMAX_EPS."""
    return torch.finfo(dtype).max / x.abs().amax().float().clamp(min=AMAX_EPS)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating scaled cast. The clamp matters: a plain `.to(float8)` of a value just above the
    max gives NaN for e4m3fn (it has no inf), and rounding in a fused kernel can push
    amax * scale slightly above fp8_max."""
    fp8_max = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def quantize_tensorwise(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic tensorwise scaling with a saturating cast.

    Returns (x_fp8, inv_scale) with x ~= x_fp8.float() * inv_scale; inv_scale is a () fp32 tensor
    (the dequantisation factor `_scaled_mm` wants)."""
    scale = _scale_for(x, dtype)
    return _cast(x, scale, dtype), scale.reciprocal()


def _quantize_both_layouts(x: torch.Tensor, dtype: torch.dtype):
    """(x_fp8 row-major, x_fp8^T row-major, inv_scale) for a 2-D x, one scale for both.

    `_scaled_mm` wants its first operand row-major and its second column-major, so each FP8
    operand that appears in two GEMMs in different roles needs both layouts. Casting x and x^T
    from the high-precision tensor (instead of transposing the FP8 copy afterwards) lets inductor
    write both from one read of x, and saves the separate transpose pass; the values are
    identical either way."""
    scale = _scale_for(x, dtype)
    return _cast(x, scale, dtype), _cast(x.t(), scale, dtype).contiguous(), scale.reciprocal()


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class _Fp8LinearFn(torch.autograd.Function):
    """y = x @ W^T with all three GEMMs in FP8 (tensorwise scales).

    forward:  y  = x_e4m3 (M,K)  @ W_e4m3^T (K,N)             -> out_dtype (bf16 under autocast)
    backward: dX = g_e5m2 (M,N)  @ W_e4m3   (N,K)             -> x.dtype
              dW = g_e5m2^T (N,M) @ x_e4m3  (M,K)             -> fp32 (bf16 if weight_grad_bf16)
    The FP8 copies of x (column-major, as dW wants it) and W are saved for backward (half the
    memory of bf16 activations); x and the output gradient are cast to FP8 in both layouts
    straight from their high-precision values (`_quantize_both_layouts`)."""

    @staticmethod
    def forward(ctx, x2d, weight, w_fp8, w_inv, out_dtype, fast_accum, weight_grad_bf16, use_custom_op, keep_for_dw):
        # x2d: (M, K) with M % 16 == 0; weight: (N, K) master weight; w_fp8/w_inv: cached or None.
        # keep_for_dw: a backward will want dW. The caller decides, because forward itself always
        # runs with grad disabled and needs_input_grad is also set under no_grad (frozen blocks).
        mm = fp8_scaled_mm if use_custom_op else _traced_scaled_mm
        if w_fp8 is None:
            w_fp8, w_inv = quantize_tensorwise(weight, E4M3)
        if keep_for_dw:
            # dW's second operand is x column-major: (x^T row-major).t(), cast in the same pass.
            x_fp8, x_t_fp8, x_inv = _quantize_both_layouts(x2d, E4M3)
            x_saved = x_t_fp8.t()
        else:
            x_fp8, x_inv = quantize_tensorwise(x2d, E4M3)
            x_saved = None
        out = mm(x_fp8, w_fp8.t(), x_inv, w_inv, out_dtype, fast_accum)
        ctx.save_for_backward(x_saved, x_inv, w_fp8, w_inv)
        ctx.x_dtype = x2d.dtype
        ctx.w_dtype = weight.dtype
        ctx.weight_grad_bf16 = weight_grad_bf16
        ctx.use_custom_op = use_custom_op
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_cm, x_inv, w_fp8, w_inv = ctx.saved_tensors
        mm = fp8_scaled_mm if ctx.use_custom_op else _traced_scaled_mm
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            g_fp8, g_t_fp8, g_inv = _quantize_both_layouts(grad_out, E5M2)
            dw_dtype = torch.bfloat16 if ctx.weight_grad_bf16 else torch.float32
            grad_w = mm(g_t_fp8, x_cm, g_inv, x_inv, dw_dtype, False)
            grad_w = grad_w.to(ctx.w_dtype)  # accumulates into the fp32 master .grad
        else:
            g_fp8, g_inv = quantize_tensorwise(grad_out, E5M2)
        if ctx.needs_input_grad[0]:
            # second operand (N, K) must be column-major: transpose-copy of the row-major W.
            grad_x = mm(g_fp8, w_fp8.t().contiguous().t(), g_inv, w_inv, ctx.x_dtype, False)
        return grad_x, grad_w, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- module
class Float8Linear(nn.Linear):
    """Drop-in for a bias-free nn.Linear whose matmuls run in FP8 (custom backend).

    Shares the original `weight` Parameter (same object: optimizers built before or after the
    conversion keep updating it). Input of any leading shape (..., in_features).

    Output dtype: the autocast dtype when autocast is on (like nn.Linear under autocast), else
    the input dtype. `self.fp8_enabled = False` (see `disable_fp8`) makes it a plain nn.Linear.

    Frozen-weight cache: `freeze_weight_cache(True)` quantizes the weight once and reuses the
    e4m3 copy + scale on every forward until `freeze_weight_cache(False)`. If the weight is
    modified in place meanwhile (`weight._version` changes), an eager forward rebuilds the
    cache; compiled code cannot see `_version`, so call `refresh_fp8_weight_caches` after such
    a change (see `_cached_weight`). Use it for layers the trainer has frozen for a while."""

    def __init__(self, in_features: int, out_features: int, *, fast_accum: bool = False,
                 weight_grad_bf16: bool = False, use_custom_op: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.fast_accum = fast_accum
        self.weight_grad_bf16 = weight_grad_bf16
        self.use_custom_op = use_custom_op
        self.fp8_enabled = True
        self._w_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._w_cache_version = -1

    @classmethod
    def from_linear(cls, linear: nn.Linear, opts: Fp8Options) -> "Float8Linear":
        if linear.bias is not None:
            raise ValueError("Float8Linear supports bias-free linears only")
        new = cls(linear.in_features, linear.out_features, fast_accum=opts.fast_accum,
                  weight_grad_bf16=opts.weight_grad_bf16, use_custom_op=not opts.no_allow_in_graph,
                  device="meta")
        new.weight = linear.weight  # the same Parameter object, no copy
        new.train(linear.training)
        return new

    # -- frozen-weight cache
    @torch.no_grad()
    def _refresh_weight_cache(self) -> None:
        self._w_cache = quantize_tensorwise(self.weight, E4M3)
        self._w_cache_version = self.weight._version

    def freeze_weight_cache(self, frozen: bool = True) -> None:
        """Quantize the weight now and reuse it (frozen=True), or drop the cache (False).
        Call from eager code (the trainer, at freeze/unfreeze time), not inside compiled code."""
        if frozen:
            self._refresh_weight_cache()
        else:
            self._w_cache, self._w_cache_version = None, -1

    def weight_cache_is_stale(self) -> bool:
        return self._w_cache is not None and self._w_cache_version != self.weight._version

    def _cached_weight(self):
        """(w_fp8, w_inv) from the cache, or (None, None) to quantize on the fly.

        Eager: a stale cache (weight modified in place since it was built) is rebuilt here.
        Compiled: `weight._version` is not traceable (reading it graph-breaks, or fails under
        fullgraph; guarding on its value would also give every block its own graph under
        regional compilation), so compiled code trusts the cache. Whoever modifies a frozen
        weight in place must call `refresh_fp8_weight_caches(model)` or `freeze_weight_cache`
        afterwards; the eager path and that helper check `_version`."""
        cache = self._w_cache
        if cache is None:
            return None, None
        if not torch.compiler.is_compiling() and self._w_cache_version != self.weight._version:
            self._refresh_weight_cache()
            cache = self._w_cache
        return cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight)
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            out_dtype = x.dtype
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        m = x2d.shape[0]
        x2d = _pad_rows(x2d)
        w_fp8, w_inv = self._cached_weight()
        out = _Fp8LinearFn.apply(x2d, self.weight, w_fp8, w_inv, out_dtype, self.fast_accum,
                                 self.weight_grad_bf16, self.use_custom_op,
                                 torch.is_grad_enabled() and self.weight.requires_grad)
        if out.shape[0] != m:
            out = out[:m]
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        path = "custom_op" if self.use_custom_op else "traced"
        return (f"{super().extra_repr()}, fp8=tensorwise, gemm={path}, fast_accum={self.fast_accum}, "
                f"weight_grad_bf16={self.weight_grad_bf16}")


# ----------------------------------------------------------------------------- conversion
@dataclass
class Fp8Report:
    """Which linears were converted (names) and which were skipped (name, reason)."""

    backend: str
    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # converted name -> shape note

    @property
    def total(self) -> int:
        return len(self.converted) + len(self.skipped)

    def summary(self) -> str:
        return f"FP8 ({self.backend}, {self.recipe}): converted {len(self.converted)}/{self.total} linears"

    def details(self) -> str:
        lines = [self.summary()]
        lines += [f"  fp8   {name} ({self.reasons.get(name, '')})" for name in self.converted]
        lines += [f"  skip  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _linear_decisions(model: nn.Module, opts: Fp8Options) -> list[tuple[str, nn.Module, bool, str]]:
    out = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and fqn:
            ok, why = fp8_filter(mod, fqn, opts)
            out.append((fqn, mod, ok, why))
    return out


def _import_torchao_float8():
    try:
        import torchao.float8 as ao_fp8
    except ImportError as e:
        raise ImportError("--fp8-backend=torchao needs torchao: `pip install torchao` "
                          "(or use --fp8-backend=custom)") from e
    return ao_fp8


def convert_to_fp8(model: nn.Module, opts: Fp8Options) -> Fp8Report:
    """Swap the Linear modules that pass `fp8_filter` for FP8 ones, in place. Weight Parameters
    keep their identity. Already-converted modules are left alone (and not counted)."""
    problems = validate_fp8_options(opts)
    if problems:
        raise ValueError("; ".join(problems))
    report = Fp8Report(backend=opts.backend, recipe=opts.recipe)
    decisions = [d for d in _linear_decisions(model, opts) if not _is_fp8_module(d[1])]
    if opts.backend == "custom":
        for fqn, mod, ok, why in decisions:
            if ok:
                _set_submodule(model, fqn, Float8Linear.from_linear(mod, opts))
    else:
        ao_fp8 = _import_torchao_float8()
        config = ao_fp8.Float8LinearConfig.from_recipe_name(opts.recipe)
        wanted = {fqn for fqn, _, ok, _ in decisions if ok}
        ao_fp8.convert_to_float8_training(model, config=config,
                                          module_filter_fn=lambda mod, fqn: fqn in wanted)
    # Report what actually happened, not what was asked for.
    for fqn, _, ok, why in decisions:
        if _is_fp8_module(model.get_submodule(fqn)):
            report.converted.append(fqn)
            report.reasons[fqn] = why
        else:
            report.skipped.append((fqn, why if not ok else "not converted by the backend"))
    return report


def _torchao_float8_linear_cls():
    mod = sys.modules.get("torchao.float8.float8_linear")  # never import torchao just to check
    return getattr(mod, "Float8Linear", None) if mod is not None else None


def _is_fp8_module(mod: nn.Module) -> bool:
    ao_cls = _torchao_float8_linear_cls()
    return isinstance(mod, Float8Linear) or (ao_cls is not None and isinstance(mod, ao_cls))


@contextlib.contextmanager
def disable_fp8(model: nn.Module):
    """Run every converted linear as a plain (bf16 under autocast) nn.Linear inside the block;
    used for evaluation and sampling. Custom modules flip `fp8_enabled`; torchao modules are
    swapped for nn.Linear modules sharing the same weight and swapped back on exit."""
    flipped, swapped = [], []
    ao_cls = _torchao_float8_linear_cls()
    try:
        for fqn, mod in list(model.named_modules()):
            if isinstance(mod, Float8Linear):
                if mod.fp8_enabled:
                    mod.fp8_enabled = False
                    flipped.append(mod)
            elif ao_cls is not None and isinstance(mod, ao_cls) and fqn:
                plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
                plain.weight = mod.weight
                if mod.bias is not None:
                    plain.bias = mod.bias
                plain.train(mod.training)
                _set_submodule(model, fqn, plain)
                swapped.append((fqn, mod))
        yield model
    finally:
        for mod in flipped:
            mod.fp8_enabled = True
        for fqn, mod in swapped:
            _set_submodule(model, fqn, mod)


def set_fp8_weight_cache(model: nn.Module, frozen: bool, modules: list[nn.Module] | None = None) -> int:
    """Turn the frozen-weight cache on/off for every custom Float8Linear under `modules` (default:
    the whole model), e.g. the blocks the dynamic-suffix schedule just froze. Returns the count."""
    n = 0
    for root in (modules if modules is not None else [model]):
        for mod in root.modules():
            if isinstance(mod, Float8Linear):
                mod.freeze_weight_cache(frozen)
                n += 1
    return n


def refresh_fp8_weight_caches(model: nn.Module) -> int:
    """Rebuild every frozen-weight cache whose weight changed in place since it was built
    (checks `weight._version`; eager, cheap). Returns how many were rebuilt. Call it after
    loading a checkpoint or any other in-place write to frozen weights when running compiled."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Float8Linear) and mod.weight_cache_is_stale():
            mod._refresh_weight_cache()
            n += 1
    return n
