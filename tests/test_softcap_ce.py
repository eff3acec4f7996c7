"""nanochat.softcap_ce: the Triton softcapped cross-entropy against float64 PyTorch.

On CPU the kernels run in Triton's interpreter (in a subprocess: TRITON_INTERPRET is read when
the kernels are defined), with the exact tanh; the hardware tanh and the compiled model path need
a GPU. CPU-only torch has no Triton: the interpreter test uses an importable one, or one
installed apart with `pip install --target DIR triton` and named by NANOCHAT_TRITON_PATH=DIR (as
.ci/run does; installed into the test environment itself, Triton would change what other tests
see, e.g. it prints nanobind leak reports at exit)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import softcap_ce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 15.0


def _reference(z, t, w):
    """float64 per-row loss of CE(cap * tanh(z / cap), t) (ignore_index=-1) and the gradient of
    sum(rows * w) w.r.t. z."""
    zd = z.detach().double().requires_grad_()
    rows = F.cross_entropy(CAP * torch.tanh(zd / CAP), t, ignore_index=-1, reduction="none")
    (rows * w.double()).sum().backward()
    return rows.detach(), zd.grad


def _check(device, fast, V, dtype=torch.bfloat16, loss_tol=1e-4, grad_tol=1e-2):
    torch.manual_seed(0)
    N = 7
    z = (torch.randn(N, V, device=device) * 12).to(dtype).requires_grad_()  # many logits near the cap
    t = torch.randint(0, V, (N,), device=device)
    t[3] = -1
    w = torch.randn(N, device=device)  # a per-row upstream gradient, as reduction="none" gives
    rows = softcap_ce.softcap_ce_rows(z, t, CAP, fast=fast)
    ref_rows, ref_grad = _reference(z, t, w)
    assert rows.dtype == torch.float32 and rows[3].item() == 0.0
    assert torch.allclose(rows.double(), ref_rows, rtol=loss_tol, atol=loss_tol), (rows, ref_rows)
    (rows * w).sum().backward()
    assert z.grad.dtype == dtype
    assert z.grad[3].abs().max().item() == 0.0
    err = ((z.grad.double() - ref_grad).norm() / ref_grad.norm()).item()
    assert err < grad_tol, err


INTERPRETED = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from nanochat import softcap_ce
import test_softcap_ce as T
softcap_ce._BLOCK = 64
T._check("cpu", fast=False, V=300)          # V not a multiple of the block: masked tail
T._check("cpu", fast=False, V=128, dtype=torch.float32, loss_tol=1e-5, grad_tol=1e-5)
# torch.compile traces the op through its fake implementations and calls it between the matmuls
z = torch.randn(5, 200, dtype=torch.float64).requires_grad_()
t = torch.tensor([0, 5, -1, 199, 7])
f = lambda z: softcap_ce.softcap_ce_rows(z, t, T.CAP, fast=False).sum()
g_eager, = torch.autograd.grad(f(z), z)
g_comp, = torch.autograd.grad(torch.compile(f, fullgraph=True)(z), z)
assert torch.allclose(g_eager, g_comp)
print("ok")
"""


def test_interpreted_kernels_match_float64():
    extra = os.environ.get("NANOCHAT_TRITON_PATH", "")
    if not extra and importlib.util.find_spec("triton") is None:
        pytest.skip("no Triton: set NANOCHAT_TRITON_PATH to a `pip install --target` of triton")
    code = INTERPRETED.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    path = os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_rejects_bad_input():
    if not softcap_ce._HAVE_TRITON:
        with pytest.raises(RuntimeError, match="needs Triton"):
            softcap_ce.softcap_ce_rows(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), CAP)
        return
    with pytest.raises(ValueError, match="positive softcap"):
        softcap_ce.softcap_ce_rows(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="unit stride"):
        softcap_ce.softcap_ce_rows(torch.zeros(4, 2).t(), torch.zeros(2, dtype=torch.long), CAP)


def test_choose_kernel(monkeypatch):
    choose = softcap_ce.choose_kernel
    monkeypatch.setattr(softcap_ce, "_HAVE_TRITON", True)  # as if Triton were importable
    assert choose("auto", "cuda", "baseline", CAP)[0] == "triton"
    assert choose("triton", "cuda", "baseline", CAP) == ("triton", "requested explicitly")
    assert choose("inductor", "cuda", "baseline", CAP) == ("inductor", "requested explicitly")
    for device, backend, cap, why in [("cpu", "baseline", CAP, "need a CUDA device"),
                                      ("cuda", "chunked", CAP, "--lm-ce-backend=chunked has its own"),
                                      ("cuda", "baseline", 0.0, "needs the logit softcap")]:
        kernel, reason = choose("auto", device, backend, cap)
        assert kernel == "inductor" and why in reason
        with pytest.raises(ValueError, match="cannot run: .*use --lm-ce-kernel=auto"):
            choose("triton", device, backend, cap)
    assert choose("auto", "cuda", "baseline", CAP, capability=(9, 0))[0] == "triton"
    kernel, reason = choose("auto", "cuda", "baseline", CAP, capability=(7, 0))  # e.g. a V100
    assert kernel == "inductor" and "compute capability 7.5 or newer (this GPU has 7.0)" in reason
    with pytest.raises(ValueError, match="compute capability"):
        choose("triton", "cuda", "baseline", CAP, capability=(7, 0))
    monkeypatch.setattr(softcap_ce, "_HAVE_TRITON", False)
    kernel, reason = choose("auto", "cuda", "baseline", CAP)
    assert kernel == "inductor" and "Triton is not importable" in reason
    with pytest.raises(ValueError, match="must be one of"):
        choose("fast", "cuda", "baseline", CAP)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True])
def test_gpu_kernels_match_float64(fast):
    # the hardware tanh (relative error ~2^-11) is below the bf16 input's own rounding
    _check("cuda", fast=fast, V=32768 + 64 * 3, loss_tol=2e-3 if fast else 1e-4, grad_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_model_head_triton_matches_inductor(reduction):
    """The compiled model's head with the Triton CE against inductor's, same weights and batch."""
    from nanochat.gpt import GPT, GPTConfig, ModelRuntime
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    results = {}
    for kernel in ("inductor", "triton"):
        torch.manual_seed(0)
        model = GPT(cfg, ModelRuntime(compute_dtype=torch.bfloat16, lm_ce_kernel=kernel)).cuda()
        model.init_weights()
        model.compile_regions(dynamic=False)
        idx = torch.randint(0, 512, (4, 64), device="cuda")
        tgt = torch.randint(0, 512, (4, 64), device="cuda")
        tgt[0, :5] = -1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, tgt, loss_reduction=reduction)
        loss.float().sum().backward()
        assert model._compiled, "compiling the head failed and the model fell back to eager"
        results[kernel] = (loss.detach().float(), model.lm_head.weight.grad.float(),
                           model.transformer.wte.weight.grad.float())
    (l0, *g0), (l1, *g1) = results["inductor"], results["triton"]
    assert torch.allclose(l0, l1, rtol=2e-3, atol=2e-3)
    for a, b in zip(g0, g1):
        assert ((a - b).norm() / a.norm()).item() < 2e-2


def test_prebuild_is_skipped_off_cuda_and_a_failure_is_one_note():
    assert softcap_ce.prebuild_in_background(torch.device("cpu")) is None
    assert softcap_ce.prebuild_failed(None) is None
    ok = softcap_ce._spawn(["-c", "pass"])
    ok.wait()
    assert softcap_ce.prebuild_failed(ok) is None
    # more stderr than a pipe holds: the child must not block on it
    bad = softcap_ce._spawn(["-c", "import sys; sys.stderr.write('x' * 200000 + '\\nno GPU here\\n'); sys.exit(3)"])
    assert bad.wait(timeout=60) == 3
    note = softcap_ce.prebuild_failed(bad)
    assert note == ("the background build of the Triton loss kernels failed (exit 3: no GPU here); "
                    "the first step built them instead")


@pytest.mark.gpu
def test_gpu_prebuild_fills_the_cache_the_training_call_uses(tmp_path):
    """After the background build, the training-sized call (V = 32768) builds nothing new: Triton's
    cache directory gets no new entry."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    pre = subprocess.run([sys.executable, "-m", "nanochat.softcap_ce", "--prebuild", "0"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    before = set(os.listdir(tmp_path))
    assert before
    code = ("import torch\nfrom nanochat.softcap_ce import softcap_ce_rows\n"
            "z = torch.randn(64, 32768, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
            "t = torch.randint(0, 32768, (64,), device='cuda')\n"
            "softcap_ce_rows(z, t, 15.0).mean().backward(); torch.cuda.synchronize()\n")
    use = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert use.returncode == 0, use.stderr[-2000:]
    assert set(os.listdir(tmp_path)) == before
