# temporary probe (to be deleted): dump inductor code for the chunked loss on CUDA
import torch, sys
from nanochat.lm_head import lm_head_loss
N, D, V, C = 65536, 768, 32768, 4096
x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
t = torch.randint(0, V, (N,), device="cuda")
f = torch.compile(lambda x, w, t: lm_head_loss(x, w, t, softcap=15.0, backend="chunked", chunk_size=C), dynamic=False)
f(x, w, t).backward()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); b = torch.cuda.memory_allocated()
x.grad = w.grad = None
l = f(x, w, t); torch.cuda.synchronize(); print("fwd peak extra GiB", (torch.cuda.max_memory_allocated() - b) / 2**30)
l.backward(); torch.cuda.synchronize(); print("fwd+bwd peak extra GiB", (torch.cuda.max_memory_allocated() - b) / 2**30)
a = torch.randn(4096, 32768, device="cuda", dtype=torch.bfloat16); bm = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
acc = torch.zeros(32768, 768, device="cuda")
try:
    r = torch.addmm(acc, a.t(), bm, out_dtype=torch.float32); print("eager addmm out_dtype ok", r.dtype, (r - a.t().float() @ bm.float()).abs().max().item())
    g = torch.compile(lambda acc, a, b: torch.addmm(acc, a.t(), b, out_dtype=torch.float32), fullgraph=True)
    r2 = g(acc, a, bm); print("compiled addmm out_dtype ok", (r2 - r).abs().max().item())
    for fn, name in [(lambda: torch.addmm(acc, a.t(), bm, out_dtype=torch.float32), "addmm_dtype"), (lambda: acc + (a.t() @ bm).float(), "mm+add"), (lambda: a.t() @ bm, "mm only")]:
        for _ in range(3): fn()
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True); s.record()
        for _ in range(20): fn()
        e.record(); torch.cuda.synchronize(); print(name, s.elapsed_time(e) / 20, "ms")
except Exception as ex:
    print("addmm out_dtype FAILED", type(ex).__name__, str(ex)[:300])
