"""nanochat.lm_head: both backends against F.cross_entropy on softcapped logits (loss and the
gradients of x and W), ignored targets, all-ignored batches, ragged chunk sizes, every reduction,
bf16, and a fullgraph torch.compile of the chunked path."""
import time

import pytest
import torch
import torch.nn.functional as F

from nanochat.lm_head import BACKENDS, lm_head_logits, lm_head_loss

SOFTCAP = 15.0


def reference(x, w, t, reduction, softcap=SOFTCAP):
    """The textbook definition, in x's dtype (float64 in most tests)."""
    logits = x.reshape(-1, x.shape[-1]) @ w.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    out = F.cross_entropy(logits, t.reshape(-1), ignore_index=-1, reduction=reduction)
    return out.reshape(t.shape) if reduction == "none" else out


def make(n=37, d=16, v=50, dtype=torch.float64, ignore_frac=0.2, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    # scale so that many logits reach the softcap's curved region
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3).to(dtype)
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -1
    if lead is not None:
        x, t = x.reshape(*lead, d), t.reshape(*lead)
    return x.requires_grad_(), w.requires_grad_(), t


def loss_and_grads(fn, x, w, t, reduction, grad_out=None):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, t)
    if grad_out is None:
        loss.backward()
    else:
        loss.backward(grad_out)
    return loss.detach(), x.grad, w.grad


def ours(backend, reduction, chunk_size=8, softcap=SOFTCAP):
    return lambda x, w, t: lm_head_loss(x, w, t, softcap=softcap, backend=backend,
                                        chunk_size=chunk_size, reduction=reduction)


def close(a, b, dtype):
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}[dtype]
    torch.testing.assert_close(a, b, **tol)


# ---- exactness against F.cross_entropy ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cross_entropy(dtype, backend, reduction):
    x, w, t = make(dtype=dtype)
    go = torch.randn(t.shape, dtype=dtype) if reduction == "none" else None
    ref = loss_and_grads(lambda a, b, c: reference(a, b, c, reduction), x, w, t, reduction, go)
    got = loss_and_grads(ours(backend, reduction, chunk_size=8), x, w, t, reduction, go)
    for r, g in zip(ref, got):
        close(g, r, dtype)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 64, 4096])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunk_sizes(chunk_size, reduction):
    """Chunk sizes that divide N=37 (1, 37), do not (5, 8, 36), or exceed it (64, 4096); V=50 is not
    a multiple of any of them."""
    x, w, t = make(n=37, v=50)
    go = torch.randn(t.shape, dtype=torch.float64) if reduction == "none" else None
    ref = loss_and_grads(lambda a, b, c: reference(a, b, c, reduction), x, w, t, reduction, go)
    got = loss_and_grads(ours("chunked", reduction, chunk_size), x, w, t, reduction, go)
    for r, g in zip(ref, got):
        close(g, r, torch.float64)


def test_grad_output_scaling():
    """A non-unit scalar grad_output (e.g. loss / grad_accum_steps) scales both gradients."""
    x, w, t = make()
    ref = loss_and_grads(lambda a, b, c: reference(a, b, c, "mean") * 0.37, x, w, t, "mean")
    got = loss_and_grads(lambda a, b, c: ours("chunked", "mean")(a, b, c) * 0.37, x, w, t, "mean")
    for r, g in zip(ref, got):
        close(g, r, torch.float64)


def test_batched_shape_and_none_shape():
    x, w, t = make(n=24, lead=(3, 8))
    for backend in BACKENDS:
        out = lm_head_loss(x, w, t, softcap=SOFTCAP, backend=backend, chunk_size=5, reduction="none")
        assert out.shape == (3, 8)
        close(out, reference(x, w, t, "none"), torch.float64)
        assert (out[t == -1] == 0).all()
        scalar = lm_head_loss(x, w, t, softcap=SOFTCAP, backend=backend, chunk_size=5)
        assert scalar.shape == ()
        close(scalar, reference(x, w, t, "mean"), torch.float64)


def test_no_softcap():
    x, w, t = make()
    for sc in (None, 0.0):
        got = loss_and_grads(ours("chunked", "mean", softcap=sc), x, w, t, "mean")
        ref = loss_and_grads(lambda a, b, c: reference(a, b, c, "mean", softcap=None), x, w, t, "mean")
        for r, g in zip(ref, got):
            close(g, r, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_finite_zero(backend, reduction):
    """F.cross_entropy gives NaN for a mean over zero targets; ours gives 0 and zero gradients."""
    x, w, t = make(n=13)
    t = torch.full_like(t, -1)
    go = torch.randn(t.shape, dtype=torch.float64) if reduction == "none" else None
    loss, gx, gw = loss_and_grads(ours(backend, reduction, chunk_size=4), x, w, t, reduction, go)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (gx == 0).all() and (gw == 0).all()


def test_only_one_input_requires_grad():
    x, w, t = make()
    for need_x in (True, False):
        xx = x.detach().clone().requires_grad_(need_x)
        ww = w.detach().clone().requires_grad_(not need_x)
        lm_head_loss(xx, ww, t, softcap=SOFTCAP, backend="chunked", chunk_size=8).backward()
        rx, rw = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        reference(rx, rw, t, "mean").backward()
        if need_x:
            assert ww.grad is None
            close(xx.grad, rx.grad, torch.float64)
        else:
            assert xx.grad is None
            close(ww.grad, rw.grad, torch.float64)


def test_no_grad_forward_only():
    x, w, t = make()
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            got = lm_head_loss(x, w, t, softcap=SOFTCAP, backend="chunked", chunk_size=8, reduction=reduction)
            assert not got.requires_grad
            close(got, reference(x, w, t, reduction), torch.float64)


def test_logits_helper():
    x, w, _ = make(dtype=torch.float32)
    logits = lm_head_logits(x, w, SOFTCAP)
    assert logits.dtype == torch.float32 and logits.shape == (37, 50)
    assert logits.abs().max() <= SOFTCAP
    lb = lm_head_logits(x.bfloat16(), w.bfloat16(), SOFTCAP)
    assert lb.dtype == torch.float32


# ---- bf16 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_fp32_reference(backend):
    """bf16 inputs (matmuls in bf16, softmax math in fp32) vs the fp32 definition on the same
    bf16-rounded values. Both backends round the logits and their gradient to bf16 once."""
    x, w, t = make(n=64, d=32, v=300, dtype=torch.float32)
    x, w = x.detach().bfloat16(), w.detach().bfloat16()
    ref = loss_and_grads(lambda a, b, c: reference(a.float(), b.float(), c, "mean"), x, w, t, "mean")
    got = loss_and_grads(ours(backend, "mean", chunk_size=24), x, w, t, "mean")
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-2)
    for r, g in zip(ref[1:], got[1:]):
        torch.testing.assert_close(g.float(), r.float(), rtol=5e-2, atol=5e-3 * r.abs().max().item())


def test_bf16_chunked_matches_baseline():
    x, w, t = make(n=64, d=32, v=300, dtype=torch.bfloat16)
    base = loss_and_grads(ours("baseline", "mean"), x, w, t, "mean")
    chunk = loss_and_grads(ours("chunked", "mean", chunk_size=24), x, w, t, "mean")
    torch.testing.assert_close(chunk[0], base[0], rtol=1e-5, atol=1e-5)
    for b, c in zip(base[1:], chunk[1:]):
        torch.testing.assert_close(c.float(), b.float(), rtol=2e-2, atol=2e-3 * b.abs().max().item())


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(backend="fused"), "backend must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), "chunk_size must be a positive int"),
])
def test_validation(kwargs, needle):
    x, w, t = make()
    with pytest.raises(ValueError, match=needle):
        lm_head_loss(x, w, t, softcap=SOFTCAP, **kwargs)


def test_validation_reports_all_problems_and_shapes():
    x, w, t = make()
    with pytest.raises(ValueError) as e:
        lm_head_loss(x, w[:, :3], t[:5], softcap=SOFTCAP, backend="x", reduction="y")
    msg = str(e.value)
    for needle in ("backend", "reduction", "last dim", "targets shape"):
        assert needle in msg


# ---- torch.compile -----------------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self, d, v, reduction):
        super().__init__()
        self.lm_head = torch.nn.Linear(d, v, bias=False, dtype=torch.float32)
        self.reduction = reduction

    def forward(self, x, t):
        return lm_head_loss(x, self.lm_head.weight, t, softcap=SOFTCAP, backend="chunked",
                            chunk_size=24, reduction=self.reduction)


def test_compiled_fullgraph_matches_eager():
    """The chunked autograd.Function traces into one graph (fullgraph=True: no graph breaks) and
    gives eager's loss and gradients, forward and backward, for a scalar and a per-row reduction."""
    torch._dynamo.reset()
    t0 = time.time()
    for reduction in ("mean", "none"):
        torch.manual_seed(0)
        head = _Head(32, 100, reduction)
        x0 = torch.randn(2, 40, 32) * 3  # N=80 rows, chunk 24 -> 4 ragged chunks
        t = torch.randint(0, 100, (2, 40))
        t[0, :7] = -1
        go = torch.randn(2, 40) if reduction == "none" else torch.tensor(1.0)
        results = []
        for fn in (head, torch.compile(head, fullgraph=True, dynamic=False)):
            head.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_()
            loss = fn(x, t)
            loss.backward(go)
            results.append((loss.detach(), x.grad, head.lm_head.weight.grad.clone()))
        for e, c in zip(*results):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    print(f"compile test took {time.time() - t0:.1f}s")


# ---- memory: no (N, V) tensor ever exists ------------------------------------------------------

class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_never_materialises_full_logits(reduction):
    n, d, v, chunk = 96, 8, 200, 16
    x, w, t = make(n=n, d=d, v=v, dtype=torch.float32)
    largest = {}
    for backend in BACKENDS:
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with _LargestTensor() as mode:
            loss = lm_head_loss(xx, ww, t, softcap=SOFTCAP, backend=backend, chunk_size=chunk,
                                reduction=reduction)
            loss.backward(torch.ones_like(loss))
        largest[backend] = mode.largest
    assert largest["baseline"] == n * v
    assert largest["chunked"] == chunk * v
