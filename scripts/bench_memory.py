"""Peak memory and speed of training steps per activation-recompute mode, on a card emulated to
--memory-gib (24 by default): the measured side of docs/optimizations/memory.md.

    python -m scripts.bench_memory --depths=12,20 --seq-lens=2048 --batches=4,8,16 \\
        --modes=none,selective,blocks --memory-gib=24
    python -m scripts.bench_memory --variants=20:none:4,20:blocks:16 --memory-gib=24

Each (depth, sequence length, device batch, mode) builds the model as base_train does (bf16
autocast, regional compile, the Triton softcapped CE, MuonAdamW) with
`torch.cuda.set_per_process_memory_fraction` capping the caching allocator at --memory-gib, and
times optimizer steps of --total-batch-size tokens on random tokens: total / (batch x seq)
micro-steps of forward and backward, then one optimizer step, as base_train's gradient
accumulation does (so a small device batch pays its extra micro-steps, not extra optimizer steps).
It reports the peak allocated and reserved memory, the static bytes per parameter (weights,
gradients, optimizer state: what stays allocated between backward and zero_grad once the
activations are gone), the median step time and tok/s, next to `nanochat.plan.estimate_memory`'s
prediction, whether that prediction lets base_train start, and which batch `--device-batch-size=auto`
would pick for that depth and mode (`auto` column). A step that does not fit is reported as OOM.
A second table gives, per depth and sequence length, the mode and batch that
`--activation-checkpointing=auto --device-batch-size=auto` picks with --free-gib free (a real card
of --memory-gib shows about that much after the CUDA context) and its tok/s against the fastest
measured row.
The cap covers what PyTorch allocates; the CUDA context and cuBLAS workspaces are outside it, so a
real 24 GiB card has ~0.5 GiB less. The table is printed as markdown, ready for memory.md.
"""
import os

# the caching allocator as base_train configures it (set before torch starts CUDA): without
# expandable segments, fragmentation reserves up to ~4 GiB more at d28 and OOMs settings that train
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import statistics
import sys
import time

import torch
import torch._dynamo

from nanochat.gpt import GPT, RECOMPUTE_MODES, ModelRuntime
from nanochat.optim import MuonAdamW
from nanochat.plan import (auto_device_batch, auto_recompute, batch_candidates, estimate_memory, fits, largest_fitting,
                           memory_options, model_config_from_args)

GiB = 2 ** 30


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="12,20", help="comma-separated --depth values")
    p.add_argument("--seq-lens", default="2048", help="comma-separated --max-seq-len values")
    p.add_argument("--batches", default="4,8,16", help="comma-separated --device-batch-size values")
    p.add_argument("--modes", default=",".join(RECOMPUTE_MODES), help="comma-separated --activation-checkpointing modes")
    p.add_argument("--variants", default="", help="comma-separated depth:mode:batch triples, measured in this order at "
                   "the first --seq-lens value, instead of the --depths x --batches x --modes grid")
    p.add_argument("--total-batch-size", type=int, default=32768, help="tokens per optimizer step (gradient accumulation)")
    p.add_argument("--memory-gib", type=float, default=24.0, help="emulated card size (GiB); <= 0 = the whole device")
    p.add_argument("--free-gib", type=float, default=None, help="free memory the auto picks are made for "
                   "(default: the cap - 0.6, what a real card of that size shows free after the CUDA context)")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--lm-ce-kernel", default="triton", choices=["triton", "inductor"])
    p.add_argument("--no-compile", action="store_true", help="eager blocks (compiled by default, as base_train)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps after the compiling one")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def model_config(args, depth: int, seq: int):
    """The GPTConfig base_train would build for --depth=depth --max-seq-len=seq."""
    shape = argparse.Namespace(depth=depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=seq,
                               window_pattern=args.window_pattern)
    return model_config_from_args(shape, args.vocab_size)


def variants(args) -> list[tuple[int, int, int, str]]:
    """(depth, seq, batch, mode) in measuring order: --variants, else the grid."""
    if args.variants:
        out = []
        for v in args.variants.split(","):
            depth, mode, batch = v.split(":")
            if mode not in RECOMPUTE_MODES:
                raise SystemExit(f"bench_memory: --variants: {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
            out.append((int(depth), ints(args.seq_lens)[0], int(batch), mode))
        return out
    return [(d, t, b, m) for d in ints(args.depths) for t in ints(args.seq_lens) for b in ints(args.batches)
            for m in args.modes.split(",")]


def accumulation(args, seq: int, batch: int) -> int:
    """Micro-steps per optimizer step, as base_train derives them from --total-batch-size."""
    if args.total_batch_size % (seq * batch):
        raise SystemExit(f"bench_memory: --total-batch-size={args.total_batch_size} is not a multiple of "
                         f"batch {batch} x seq {seq}")
    return args.total_batch_size // (seq * batch)


def train_args(args, seq: int, mode: str = "auto") -> argparse.Namespace:
    """The flags base_train would see for a variant, with --device-batch-size=auto at this total batch."""
    return argparse.Namespace(total_batch_size=args.total_batch_size, max_seq_len=seq, device_batch_size="auto",
                              activation_checkpointing=mode, no_compile=args.no_compile, lm_ce_backend="baseline",
                              lm_ce_chunk_size=8192)


def estimate_options(args, seq: int, mode: str) -> dict:
    """estimate_memory's keyword arguments for a variant, as base_train makes them."""
    return memory_options(train_args(args, seq, mode), "cuda", args.lm_ce_kernel, args.total_batch_size // seq)


def auto_batch(args, cfg, seq: int, mode: str, cap: int) -> int | None:
    """What --device-batch-size=auto picks with `cap` bytes free (None: nothing fits)."""
    return largest_fitting(cfg, batch_candidates(train_args(args, seq), cfg, 1), estimate_options(args, seq, mode), cap)


def auto_pick(args, cfg, seq: int, free: int) -> tuple[str, int | None]:
    """(mode, batch) that --activation-checkpointing=auto --device-batch-size=auto picks with `free` bytes free."""
    shape = train_args(args, seq)
    mode, _ = auto_recompute(shape, cfg, 1, free, estimate_options(args, seq, "none"))
    batch, _ = auto_device_batch(shape, cfg, 1, free, estimate_options(args, seq, mode))
    return mode, batch


def auto_table(args, rows: list, free: int) -> None:
    """Per (depth, seq): the auto pick's measured tok/s against the fastest measured row."""
    print(f"\n| depth | seq | auto picks ({free / GiB:.1f} GiB free) | tok/s | fastest measured | tok/s | auto / fastest |")
    print("|---|---|---|---|---|---|---|")
    for depth, seq in dict.fromkeys((r[0], r[1]) for r in rows):
        mode, batch = auto_pick(args, model_config(args, depth, seq), seq, free)
        measured = {(b, m): r["tokens"] / r["step"] for d, t, b, m, *_, r in rows
                    if (d, t) == (depth, seq) and not r["oom"]}
        if not measured:
            continue
        (fb, fm), fast = max(measured.items(), key=lambda kv: kv[1])
        got = measured.get((batch, mode))
        print(f"| {depth} | {seq} | {mode} {batch} | {f'{got:,.0f}' if got else 'not measured'} | {fm} {fb} | {fast:,.0f} "
              f"| {f'{got / fast:.3f}' if got else '-'} |")


def run_variant(args, depth: int, seq: int, batch: int, mode: str, device) -> dict:
    """One variant's measurements: peak GiB, static bytes per parameter, median optimizer-step
    seconds; or oom=True."""
    cfg = model_config(args, depth, seq)
    runtime = ModelRuntime(compute_dtype=torch.bfloat16, lm_ce_kernel=args.lm_ce_kernel, activation_checkpointing=mode)
    accum = accumulation(args, seq, batch)
    model = opt = None
    try:
        with torch.device("meta"):
            model = GPT(cfg, runtime)
        model.to_empty(device=device)
        model.init_weights()
        if not args.no_compile:
            model.compile_regions(dynamic=False)
        opt = MuonAdamW(model.param_groups(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5,
                                           weight_decay=0.2))
        n_params = sum(p.numel() for p in model.parameters())
        x = torch.randint(0, args.vocab_size, (batch, seq), device=device)
        static = []

        def step():
            for _ in range(accum):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, x)
                (loss / accum).backward()
            opt.step()
            static.append(torch.cuda.memory_allocated())  # weights, grads, optimizer state; activations freed
            model.zero_grad(set_to_none=True)

        for _ in range(1 + args.warmup):  # the first step compiles
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.time()
            step()
            torch.cuda.synchronize()
            times.append(time.time() - t0)
        return {"oom": False, "peak": torch.cuda.max_memory_allocated() / GiB,
                "reserved": torch.cuda.max_memory_reserved() / GiB, "static": static[-1] / n_params,
                "step": statistics.median(times), "tokens": accum * batch * seq}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        model = opt = None
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def main(argv=None) -> None:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench_memory: needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    cap = total if args.memory_gib <= 0 else min(total, int(args.memory_gib * GiB))
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    print(f"device {torch.cuda.get_device_name(device)}, allocator capped at {cap / GiB:.1f} GiB of "
          f"{total / GiB:.1f}; {'eager' if args.no_compile else 'regional compile'}, bf16, {args.lm_ce_kernel} CE, "
          f"{args.total_batch_size:,} tokens per optimizer step", flush=True)
    rows = []
    for depth, seq, batch, mode in variants(args):
        cfg = model_config(args, depth, seq)
        est = estimate_memory(cfg, batch, **estimate_options(args, seq, mode))["peak"]
        t0 = time.time()
        r = run_variant(args, depth, seq, batch, mode, device)
        rows.append((depth, seq, batch, mode, est / GiB, fits(est, cap), auto_batch(args, cfg, seq, mode, cap) == batch, r))
        print(f"d{depth} seq {seq} batch {batch} {mode}: "
              + ("OOM" if r["oom"] else f"peak {r['peak']:.2f} GiB (estimate {est / GiB:.2f}), "
                 f"{r['step'] * 1000:.1f} ms per optimizer step") + f" [{time.time() - t0:.0f} s]", flush=True)
    print(f"\n| depth | seq | batch | recompute | auto | estimate GiB | estimate fits {cap / GiB:.0f} GiB | peak GiB "
          f"| estimate / peak | reserved GiB | static B/param | step ms | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for depth, seq, batch, mode, est, ok, auto, r in rows:
        measured = ("OOM | - | - | - | - | -" if r["oom"] else
                    f"{r['peak']:.2f} | {est / r['peak']:.3f} | {r['reserved']:.2f} | {r['static']:.1f} | "
                    f"{r['step'] * 1000:.1f} | {r['tokens'] / r['step']:,.0f}")
        print(f"| {depth} | {seq} | {batch} | {mode} | {'auto' if auto else ''} | {est:.2f} | {'yes' if ok else 'no'} "
              f"| {measured} |")
    auto_table(args, rows, int(cap - 0.6 * GiB if args.free_gib is None else args.free_gib * GiB))


if __name__ == "__main__":
    main()
