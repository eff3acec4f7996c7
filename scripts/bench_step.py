"""Time one training step of the real model on random tokens, for several variants in ONE process.

    python -m scripts.bench_step --depth=12 --max-seq-len=1024 --device-batch-size=32
    python -m scripts.bench_step --active-starts=0,3,6,9 --compile=regional,whole --profile
    python -m scripts.bench_step --fp8=off,custom,torchao --profile
    python -m scripts.bench_step --muon-fuse=off,on --profile
    python -m scripts.bench_step --muon-pack=off,on --profile

For each (compile mode, orthogonaliser mode, FP8 backend, Muon fusion and packing, active_start) it
reports the time of the first call (and of its forward+backward alone: the rest is the optimizer's
compile), the median step time over --steps timed steps (after --warmup), tok/s and peak memory;
with --profile it also prints the top CUDA kernels of a full step, GPU time per kernel category and
per phase (forward, backward, optimizer). Steps include the optimizer (MuonAdamW, with base_train's
device-side NaN skip), as in training. Prefix-freezing ratios are reported against active_start=0
of the same compile mode.
"""
import argparse
import itertools
import statistics
import sys
import time

import torch
import torch._dynamo

from nanochat.attention import select_attention_backend
from nanochat.fp8 import Fp8Options, convert_to_fp8
from nanochat.gpt import GPT, GPTConfig, ModelRuntime, inductor_settings
from nanochat.optim import MuonAdamW


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", type=str, default="L")
    p.add_argument("--attn-backend", type=str, default="sdpa")
    p.add_argument("--lm-ce-backend", type=str, default="baseline")
    p.add_argument("--ce-kernel", type=str, default="triton",
                   help="comma-separated: triton (nanochat.softcap_ce's kernels; base_train's default on CUDA), "
                        "inductor (the loss in PyTorch, compiled): the baseline head's softcapped CE")
    p.add_argument("--active-starts", type=str, default="0", help="comma-separated active_start values")
    p.add_argument("--compile", type=str, default="regional", help="comma-separated: regional, whole, none")
    p.add_argument("--muon-active-only-stack", action="store_true")
    p.add_argument("--ortho", type=str, default="eager",
                   help="comma-separated: compiled, eager (the Muon orthogonaliser; each gets its own model)")
    p.add_argument("--fp8", type=str, default="off",
                   help="comma-separated: off, custom, custom-traced (= --fp8-no-allow-in-graph), torchao "
                        "(FP8 linears, tensorwise, base_train's default filter)")
    p.add_argument("--muon-fuse", type=str, default="on",
                   help="comma-separated: on (Muon's elementwise work compiled into fused kernels, the default "
                        "on CUDA), off (eager)")
    p.add_argument("--muon-pack", type=str, default="on",
                   help="comma-separated: on (Muon's matrices and momenta in packed per-group storage, updated in "
                        "place; the single-process default), off (stacked and copied back every step)")
    p.add_argument("--fp8-exclude-regex", type=str, default=None, help="as base_train's flag")
    p.add_argument("--fp8-fast-accum", action="store_true", help="as base_train's flag (custom backend)")
    p.add_argument("--fp8-weight-grad-bf16", action="store_true", help="as base_train's flag (custom backend)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="print the top CUDA kernels of a step, GPU time per kernel category and per phase")
    p.add_argument("--compile-times", action="store_true",
                   help="after the first variant's first call, print where compile time went (dynamo's phase timers)")
    return p.parse_args()


def build(args, device, compile_ortho=True, fp8="off", muon_fuse=True, muon_pack=True, ce_kernel="triton"):
    dim = ((args.depth * args.aspect_ratio + args.head_dim - 1) // args.head_dim) * args.head_dim
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                    n_head=dim // args.head_dim, n_kv_head=dim // args.head_dim, n_embd=dim,
                    window_pattern=args.window_pattern)
    # validates the name and registers what the backend needs (e.g. the cuDNN op) before tracing
    attn_backend, _ = select_attention_backend(device.type, args.window_pattern, torch.bfloat16,
                                               requested=args.attn_backend, head_dim=args.head_dim)
    runtime = ModelRuntime(compute_dtype=torch.bfloat16, attn_backend=attn_backend,
                           lm_ce_backend=args.lm_ce_backend, lm_ce_kernel=ce_kernel)
    with torch.device("meta"):
        model = GPT(cfg, runtime)
    model.to_empty(device=device)
    model.init_weights()
    if fp8 != "off":
        opts = Fp8Options(enabled=True, backend=fp8.split("-")[0], no_allow_in_graph=fp8.endswith("-traced"),
                          exclude_regex=args.fp8_exclude_regex, fast_accum=args.fp8_fast_accum,
                          weight_grad_bf16=args.fp8_weight_grad_bf16)
        if args.lm_ce_backend == "chunked":
            opts.skip_lm_head = True  # as base_train: the chunked CE reads the weight directly
        print(convert_to_fp8(model, opts).summary(), flush=True)
    opt = MuonAdamW(model.param_groups(unembedding_lr=0.001, embedding_lr=0.07, matrix_lr=0.005, scalar_lr=0.1,
                                       weight_decay=0.05), active_only_stack=args.muon_active_only_stack,
                    compile_orthogonalize=compile_ortho, fuse_elementwise=muon_fuse, pack=muon_pack)
    return model, opt


def print_phases(step, steps=10):
    """Median GPU time of forward, backward and optimizer (+ zero_grad), from CUDA events that
    `step` records between its phases: with the GPU saturated, each difference is that phase's GPU time."""
    phases = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(steps):
        ev = [torch.cuda.Event(enable_timing=True)]
        ev[0].record()

        def mark():
            ev.append(torch.cuda.Event(enable_timing=True))
            ev[-1].record()
        step(mark)
        torch.cuda.synchronize()
        for i, k in enumerate(phases):
            phases[k].append(ev[i].elapsed_time(ev[i + 1]))
    print("phase GPU ms (median of %d): " % steps
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases.items()), flush=True)


KERNEL_CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("attention", ("flash", "fmha", "cudnn", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm80", "matmul", "splitk")),
    ("triton (fused pointwise/reductions)", ("triton",)),
    ("memcpy/memset", ("memcpy", "memset")),
)


def print_categories(prof, steps):
    """GPU time per step summed over kernel categories (by kernel name)."""
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other (aten kernels)")
        totals[cat] = totals.get(cat, 0.0) + us / 1000 / steps
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:40s} {ms:8.2f} ms/step", flush=True)
    print(f"  {'total':40s} {sum(totals.values()):8.2f} ms/step", flush=True)


def main():
    args = parse()
    if not torch.cuda.is_available():
        print("bench_step: needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    rows = []
    variants = list(itertools.product(*(getattr(args, a).split(",") for a in
                                        ("compile", "ortho", "fp8", "muon_fuse", "muon_pack", "ce_kernel"))))
    for mode, ortho, fp8, fuse, pack, ce_kernel in variants:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, opt = build(args, device, compile_ortho=(ortho == "compiled"), fp8=fp8, muon_fuse=fuse == "on",
                           muon_pack=pack == "on", ce_kernel=ce_kernel)
        name = (f"{mode}/{ortho}" + ("" if fp8 == "off" else f"/fp8-{fp8}")
                + ("" if fuse == "on" else "/muon-eager") + ("" if pack == "on" else "/unpacked")
                + ("" if ce_kernel == "triton" else f"/ce-{ce_kernel}"))
        fwd = model
        if mode == "regional":
            model.compile_regions(dynamic=False)
        elif mode == "whole":
            inductor_settings()  # as compile_regions
            fwd = torch.compile(model, dynamic=False)
        base = None
        for a in [int(s) for s in args.active_starts.split(",")]:
            def step(mark=lambda: None):  # mark() after forward, backward and optimizer
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fwd(x, y, active_start=a)
                mark()
                loss.backward()
                mark()
                opt.step(skip_if=~torch.isfinite(loss.detach()))  # as base_train: the device-side NaN skip
                model.zero_grad(set_to_none=True)
                mark()
                return loss
            torch.cuda.synchronize()
            t0 = time.time()
            marks = []  # the first call: model and optimizer compile separately
            step(lambda: (torch.cuda.synchronize(), marks.append(time.time())))
            first, first_model = marks[2] - t0, marks[1] - t0
            if args.compile_times and not rows:
                from torch._dynamo.utils import compile_times
                print(compile_times(repr="str", aggregate=True), flush=True)
            for _ in range(args.warmup):
                step()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.time()
                step()
                torch.cuda.synchronize()
                times.append(time.time() - t0)
            med = statistics.median(times)
            base = base or med
            rows.append((name, a, first, first_model, med * 1000, B * T / med, med / base,
                         torch.cuda.max_memory_allocated() / 2**30))
            print(f"{name} active_start={a:2d}: first call {first:6.1f}s (model {first_model:.1f}s), "
                  f"median {med * 1000:7.2f} ms", flush=True)
            if args.profile and a == 0:
                print_phases(step)
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
                print_categories(prof, steps=3)
        model = opt = fwd = None  # free this compile mode's model before building the next
        torch.cuda.empty_cache()
    print(f"\n{'variant':36s} {'active':>6s} {'first_s':>8s} {'model_s':>8s} {'step_ms':>8s} {'tok/s':>10s} "
          f"{'vs_a0':>6s} {'peak_GiB':>8s}")
    for name, a, first, first_model, ms, tps, ratio, mem in rows:
        print(f"{name:36s} {a:6d} {first:8.1f} {first_model:8.1f} {ms:8.2f} {tps:10,.0f} {ratio:6.3f} {mem:8.2f}")


if __name__ == "__main__":
    main()
