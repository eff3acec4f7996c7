"""Softcapped cross-entropy over bf16 logits in two Triton kernels (CUDA only).

The loss of the model's head is ``CE(cap * tanh(z / cap), targets)`` over N rows of V bf16 logits
``z``. Compiled by inductor it is two memory-sized passes over the (N, V) logits (one in forward,
one in backward) whose time on the H100 is set by arithmetic, not by memory: every element pays
for ``libdevice.tanh`` and ``libdevice.exp`` (several instructions each), and the forward keeps a
running maximum for the log-sum-exp. Two facts make a cheaper kernel possible:

- The softcap bounds every logit to [-cap, cap], so ``exp(c - cap)`` lies in [e^(-2 cap), 1]
  (about [1e-13, 1] for cap = 15): the log-sum-exp needs no running maximum and one pass.
- ``tanh.approx.f32`` is a single hardware instruction (relative error about 2^-11). The input is
  a bf16 logit whose own rounding error (2^-9 relative) is four times larger, so the approximation
  adds nothing a bf16 model can see. ``exp`` uses ``ex2.approx`` likewise.

Forward writes the per-row loss and log-sum-exp (N floats each); backward re-reads the bf16
logits and writes their bf16 gradient ``(softmax - onehot) * g * (1 - tanh^2)`` (the chain rule
through the softcap). The matmuls around it stay cuBLAS's, so nothing inductor could have fused
is lost: the logits arrive from a GEMM and their gradient leaves into two GEMMs.

Registered as an opaque ``torch.library.custom_op`` (with fake implementations for tracing and an
autograd formula): torch.compile calls it between the GEMMs without a graph break, and the kernels
are built by Triton's own JIT at the first call. (As a ``triton_op``, which inductor re-generates
and builds in its worker processes, the compile fails on the H100 with torch 2.11; there is nothing
to fuse it with anyway.)

Memory: the backward allocates the (N, V) gradient while the saved logits are still alive, one
(N, V) bf16 tensor more at the peak than inductor's loss (+1.96 GiB at the d12 anchor). Writing
the gradient over the logits instead removes that but also the speed-up (dev/LOG.md), so it is
not done.

Rows whose target is -1 (the repo's ignore index) get loss 0 and gradient 0.

Building the two kernels (Triton's JIT, in the process that first launches them) takes 1.0-1.2 s
on an H100; `prebuild_in_background` moves that out of the first training step into a child
process that runs while the trainer loads its data.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tempfile

import torch

KERNELS = ("auto", "triton", "inductor")
# Triton ships with CUDA builds of torch, not with CPU-only ones. It is imported only when a kernel
# first runs, so that CPU runs never load it.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
# One launch configuration: the fastest of six tried on an H100 at V = 32768.
_BLOCK, _WARPS = 4096, 8


def choose_kernel(requested: str, device_type: str, ce_backend: str, softcap: float | None,
                  capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """(kernel, reason) for the baseline head's loss: 'triton' (this module) or 'inductor' (the
    loss written in PyTorch and compiled, or run eagerly). ValueError, with the fix, when an
    explicit 'triton' cannot run here. `capability`: the CUDA device's compute capability, when
    known (``tanh.approx.f32`` needs 7.5 or newer)."""
    if requested not in KERNELS:
        raise ValueError(f"--lm-ce-kernel={requested!r} must be one of {', '.join(KERNELS)}")
    why_not = None
    if ce_backend != "baseline":
        why_not = f"it computes the baseline backend's loss (--lm-ce-backend={ce_backend} has its own)"
    elif device_type != "cuda":
        why_not = f"its kernels need a CUDA device (this run is on {device_type})"
    elif not _HAVE_TRITON:
        why_not = "Triton is not importable (a CPU-only torch build?)"
    elif capability is not None and tuple(capability) < (7, 5):
        why_not = (f"its hardware tanh needs CUDA compute capability 7.5 or newer "
                   f"(this GPU has {capability[0]}.{capability[1]})")
    elif softcap is None or softcap <= 0:
        why_not = "it needs the logit softcap (which bounds the logits)"
    if requested == "triton":
        if why_not:
            raise ValueError(f"--lm-ce-kernel=triton cannot run: {why_not}; use --lm-ce-kernel=auto")
        return "triton", "requested explicitly"
    if requested == "inductor":
        return "inductor", "requested explicitly"
    if why_not:
        return "inductor", f"auto: the Triton kernel does not apply, {why_not}"
    return "triton", "auto: CUDA with Triton; one pass each way over the logits, hardware tanh"


def _kernels():
    return importlib.import_module("nanochat.softcap_ce_kernels")


@torch.library.custom_op("nanochat::softcap_ce_fwd", mutates_args=())
def _fwd_op(z: torch.Tensor, targets: torch.Tensor, cap: float, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = z.shape
    loss = torch.empty(N, device=z.device, dtype=torch.float32)
    lse = torch.empty(N, device=z.device, dtype=torch.float32)
    _kernels().ce_fwd_kernel[(N,)](z, targets, loss, lse, V, z.stride(0), cap, 1.0 / cap,
                         BLOCK=_BLOCK, FAST=fast, num_warps=_WARPS)
    return loss, lse


@_fwd_op.register_fake
def _(z, targets, cap, fast):
    return z.new_empty(z.shape[0], dtype=torch.float32), z.new_empty(z.shape[0], dtype=torch.float32)


@torch.library.custom_op("nanochat::softcap_ce_bwd", mutates_args=())
def _bwd_op(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
            cap: float, fast: bool) -> torch.Tensor:
    N, V = z.shape
    dz = torch.empty_like(z)
    _kernels().ce_bwd_kernel[(N,)](z, targets, lse, grad_rows, dz, V, z.stride(0), dz.stride(0), cap, 1.0 / cap,
                         BLOCK=_BLOCK, FAST=fast, num_warps=_WARPS)
    return dz


@_bwd_op.register_fake
def _(z, targets, lse, grad_rows, cap, fast):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, targets, cap, fast = inputs
    ctx.save_for_backward(z, targets, output[1])
    ctx.cap, ctx.fast = cap, fast


def _backward(ctx, grad_loss, grad_lse):
    z, targets, lse = ctx.saved_tensors
    grad_rows = grad_loss.float().contiguous()
    return _bwd_op(z, targets, lse, grad_rows, ctx.cap, ctx.fast), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def softcap_ce_rows(z: torch.Tensor, targets: torch.Tensor, cap: float, fast: bool = True) -> torch.Tensor:
    """Per-row loss (N,) fp32 of ``CE(cap * tanh(z / cap), targets)`` for bf16/fp16/fp32 logits z
    (N, V) with a unit stride along V; rows with target -1 give 0. Targets must lie in [0, V) or
    be -1; others are not checked on the device and give the row's log-sum-exp as its loss. CUDA +
    Triton only (see `choose_kernel`). ``fast=False`` computes tanh from ``exp`` (accurate to ~1e-7
    absolute) instead of the hardware approximation; it also runs under ``TRITON_INTERPRET=1`` on
    CPU, which the tests use."""
    if not _HAVE_TRITON:
        raise RuntimeError("softcap_ce_rows needs Triton (a CUDA build of torch)")
    if cap <= 0:
        raise ValueError(f"softcap_ce_rows needs a positive softcap (it bounds the logits), got {cap}")
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits must be (N, V) with unit stride along V, got shape {tuple(z.shape)} "
                         f"strides {z.stride()}")
    return _fwd_op(z, targets.contiguous(), float(cap), bool(fast))[0]


def prebuild_in_background(device: torch.device) -> subprocess.Popen | None:
    """Start a child process that builds both kernels into Triton's on-disk cache, so that the first
    training step finds them there instead of building them itself (1.0-1.2 s of the first step on
    an H100). The child launches them once on tiny
    tensors with the training call's dtypes, launch configuration and 16-divisible sizes (what
    Triton specialises a build on), so its cache entry is the one the trainer looks up. It holds a
    CUDA context (a few hundred MiB) for a few seconds while the trainer loads; if it fails, the
    trainer builds the kernels in its first step as before (`prebuild_failed` says so). None where
    the kernels cannot run (no CUDA device, no Triton)."""
    if device.type != "cuda" or not _HAVE_TRITON:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _spawn(["-m", "nanochat.softcap_ce", "--prebuild", str(index)])


def _spawn(args: list[str]) -> subprocess.Popen:
    """`python <args>` in the background, its stderr kept in a temporary file (`.stderr_file`). A
    file, not a pipe: a child that wrote more than a pipe holds would block (with its CUDA
    context) until someone read it."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err)
    proc.stderr_file = err
    return proc


def prebuild_failed(proc: subprocess.Popen | None) -> str | None:
    """None if the background build succeeded or is still running (or there was none), else a
    one-line note with the child's last error line."""
    if proc is None or proc.poll() is None or proc.returncode == 0:
        return None
    proc.stderr_file.seek(0)
    err = proc.stderr_file.read().decode(errors="replace").strip().splitlines()
    return (f"the background build of the Triton loss kernels failed (exit {proc.returncode}"
            + (f": {err[-1]}" if err else "") + "); the first step built them instead")


def _prebuild(index: int) -> None:
    """The child of `prebuild_in_background`: one forward and one backward launch."""
    device = torch.device("cuda", index)
    z = torch.zeros(2, 64, device=device, dtype=torch.bfloat16)  # V and the row stride divisible by 16
    targets = torch.zeros(2, device=device, dtype=torch.long)
    _, lse = _fwd_op(z, targets, 15.0, True)  # (the softcap is a run-time argument: any value builds the same)
    _bwd_op(z, targets, lse, torch.ones(2, device=device), 15.0, True)
    torch.cuda.synchronize(device)


if __name__ == "__main__" and sys.argv[1:2] == ["--prebuild"]:
    _prebuild(int(sys.argv[2]))
