"""Benchmark the LM-head cross-entropy backends on one CUDA GPU (the loss alone).

For N = batch * seq rows it times forward + backward of ``lm_head_loss`` for baseline and chunked,
and of the model's Triton loss (``triton``: the head matmul, then nanochat.softcap_ce's kernels on
the bf16 logits, as ``--lm-ce-kernel=triton`` runs it), eager and torch.compile'd, interleaved
(variant order rotates every repeat), and reports the median, tokens/s, the ratio to eager baseline and the peak memory (torch.cuda.max_memory_allocated
after a reset, with the inputs already allocated: "peak" includes x, W and their grads, "extra"
is peak minus what was allocated before the step). Then, for each variant, it finds the largest
batch that fits (doubling until torch.cuda.OutOfMemoryError, then bisection) with the rest of
the GPU empty. Compile time is reported apart from step time.

    python -m scripts.bench_lm_head                       # d12 shapes: 32 x 2048, 768, 32768
    python -m scripts.bench_lm_head --search none         # timings and memory only
    python -m scripts.bench_lm_head --chunk-size 8192 --variants chunked-eager,chunked-compile
    python -m scripts.bench_lm_head --seq 1024 --variants baseline-compile,triton-compile --search none

Note: compiled variants recompile for every batch size tried in the search (dynamic=False), and
the chunked graph unrolls N / chunk_size chunks (compile time grows with N), so the compiled
search is the slow part (minutes); cap it with --search-cap or skip it with --search eager.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from nanochat.gpt import reduce_row_losses
from nanochat.lm_head import lm_head_loss
from nanochat.softcap_ce import softcap_ce_rows

VARIANTS = ("baseline-eager", "chunked-eager", "baseline-compile", "chunked-compile", "triton-eager", "triton-compile")
GIB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("shapes")
    g.add_argument("--batch", type=int, default=32, help="sequences per step (N = batch * seq rows)")
    g.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    g.add_argument("--dim", type=int, default=768, help="model width D (768 = d12)")
    g.add_argument("--vocab", type=int, default=32768, help="vocabulary size V")
    g.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of x and W")
    g.add_argument("--softcap", type=float, default=15.0, help="logit softcap (as in the model)")
    g.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of targets set to -1")
    g = p.add_argument_group("loss")
    g.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk for the chunked backend")
    g.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=10, help="fwd+bwd steps per timed repeat")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (after compile)")
    g = p.add_argument_group("largest batch search")
    g.add_argument("--search", choices=("all", "eager", "none"), default="all",
                   help="which variants get the largest-batch search")
    g.add_argument("--search-cap", type=int, default=256,
                   help="stop doubling at this batch (reported as '>= cap' if it still fits)")
    args = p.parse_args(argv)
    problems = []
    for name in ("batch", "seq", "dim", "vocab", "chunk_size", "steps", "repeats", "search_cap"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        problems.append(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if any(v.startswith("triton") for v in args.variants) and args.softcap <= 0:
        problems.append("--softcap must be > 0 for the triton variants (the kernels rely on it)")
    if problems:
        p.error("; ".join(problems))
    return args


def make_fn(variant, args):
    """A fwd+bwd step for one variant; compiled variants compile the loss only (dynamic=False)."""
    backend, mode = variant.split("-")

    def loss_fn(x, w, t):
        if backend == "triton":  # as GPT._head_loss with lm_ce_kernel="triton"
            return reduce_row_losses(softcap_ce_rows(x @ w.t(), t, args.softcap), t, "mean")
        return lm_head_loss(x, w, t, softcap=args.softcap, backend=backend,
                            chunk_size=args.chunk_size, reduction="mean")

    if mode == "compile":
        loss_fn = torch.compile(loss_fn, dynamic=False)

    def step(x, w, t):
        loss = loss_fn(x, w, t)
        loss.backward()
        return loss
    return step


def make_inputs(batch, args, device):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n = batch * args.seq
    x = (torch.randn(n, args.dim, device=device, dtype=dtype)).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, device=device, dtype=dtype) * args.dim ** -0.5).requires_grad_()
    t = torch.randint(0, args.vocab, (n,), device=device)
    if args.ignore_frac > 0:
        t[torch.rand(n, device=device) < args.ignore_frac] = -1
    return x, w, t


def clear_grads(x, w):
    x.grad = None
    w.grad = None


def run_once(step, x, w, t):
    clear_grads(x, w)
    return step(x, w, t)


def free():
    gc.collect()
    torch.cuda.empty_cache()


def fits(variant, batch, args, device):
    """One fwd+bwd at this batch; False on CUDA OOM. Returns (ok, peak bytes)."""
    inputs = None
    try:
        step = make_fn(variant, args)
        inputs = make_inputs(batch, args, device)
        torch.cuda.reset_peak_memory_stats()
        run_once(step, *inputs)
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        return False, None
    finally:
        del inputs
        free()


def largest_batch(variant, args, device):
    """(largest batch that fits, capped?) by halving from --batch until one fits, else doubling up
    to --search-cap until one does not, then bisection to ~3 %."""
    ok = lambda b: fits(variant, b, args, device)[0]  # noqa: E731
    lo, hi = args.batch, None
    while lo >= 1 and not ok(lo):
        hi, lo = lo, lo // 2
    if lo < 1:
        return 0, False
    while hi is None:
        nxt = min(lo * 2, args.search_cap)
        if nxt <= lo:
            return lo, True
        if ok(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_lm_head: needs a CUDA GPU (torch.cuda.is_available() is False); this benchmark "
                 "measures GPU time and torch.cuda peak memory. Run it on the GPU machine.")
    device = torch.device("cuda")
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    torch.backends.cuda.matmul.allow_tf32 = True
    n = args.batch * args.seq
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
    print(f"N={n} rows ({args.batch} x {args.seq}), D={args.dim}, V={args.vocab}, {args.dtype}, "
          f"softcap={args.softcap}, chunk_size={args.chunk_size}, steps={args.steps}, repeats={args.repeats}")
    print(f"one fp32 (N, V) tensor = {n * args.vocab * 4 / GIB:.2f} GiB")

    # ---- timing and peak memory at --batch, interleaved
    x, w, t = make_inputs(args.batch, args, device)
    base_alloc = torch.cuda.memory_allocated()
    steps, compile_s, peak, losses = {}, {}, {}, {}
    for v in args.variants:
        steps[v] = make_fn(v, args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_once(steps[v], x, w, t)  # compile (if any) + first step
        torch.cuda.synchronize()
        compile_s[v] = time.perf_counter() - t0
        for _ in range(args.warmup):
            run_once(steps[v], x, w, t)
        clear_grads(x, w)
        free()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        losses[v] = run_once(steps[v], x, w, t).item()
        torch.cuda.synchronize()
        peak[v] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - before)
    times = {v: [] for v in args.variants}
    for r in range(args.repeats):
        order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
        for v in order:
            clear_grads(x, w)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                run_once(steps[v], x, w, t)
            end.record()
            torch.cuda.synchronize()
            times[v].append(start.elapsed_time(end) / 1000 / args.steps)
    del x, w, t
    free()

    ref = "baseline-eager" if "baseline-eager" in times else args.variants[0]
    ref_c = "baseline-compile" if "baseline-compile" in times else ref
    med = {v: statistics.median(times[v]) for v in args.variants}
    print(f"\ninputs (x, W, targets) = {base_alloc / GIB:.2f} GiB; ratios vs {ref} and vs {ref_c}")
    print(f"{'variant':<18}{'ms/step':>9}{'spread':>8}{'Mtok/s':>9}{'x'+ref[:8]:>11}{'x'+ref_c[:8]:>11}"
          f"{'peak GiB':>10}{'extra GiB':>11}{'1st step s':>11}{'loss':>9}")
    for v in args.variants:
        spread = (max(times[v]) - min(times[v])) / med[v] * 100
        print(f"{v:<18}{med[v] * 1e3:>9.2f}{spread:>7.1f}%{n / med[v] / 1e6:>9.2f}"
              f"{med[ref] / med[v]:>11.3f}{med[ref_c] / med[v]:>11.3f}"
              f"{peak[v][0] / GIB:>10.2f}{peak[v][1] / GIB:>11.2f}{compile_s[v]:>11.1f}{losses[v]:>9.4f}")
    print("(ratios > 1 mean faster than the reference; spread = (max - min) / median over repeats)")

    # ---- largest batch that fits
    if args.search == "none":
        return
    todo = [v for v in args.variants if args.search == "all" or v.endswith("eager")]
    print(f"\nlargest batch (x {args.seq} tokens) that fits, loss alone, search cap {args.search_cap}:")
    for v in todo:
        t0 = time.perf_counter()
        b, capped = largest_batch(v, args, device)
        note = f">= {b} (cap)" if capped else f"{b}"
        print(f"  {v:<18} {note:>12}   ({b * args.seq} rows, search {time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
