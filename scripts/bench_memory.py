"""Peak memory and speed of training steps per activation-recompute mode, on a card emulated to
--memory-gib (24 by default): the measured side of docs/optimizations/memory.md.

    python -m scripts.bench_memory --depths=12,20 --seq-lens=2048 --batches=4,8,16,32 \\
        --modes=none,selective,blocks --memory-gib=24

Each (depth, sequence length, batch, mode) builds the model as base_train does (bf16 autocast,
regional compile, the Triton softcapped CE, MuonAdamW) with `torch.cuda.set_per_process_memory_fraction`
capping the caching allocator at --memory-gib, runs --warmup + --steps full training steps on random
tokens, and reports the peak allocated memory, the median step time and tok/s, next to
`nanochat.plan.estimate_memory`'s prediction and whether that prediction would have let base_train
start. A step that does not fit is reported as OOM. The cap covers what PyTorch allocates; the
CUDA context and cuBLAS workspaces are outside it, so a real 24 GiB card has a little less.
The table is printed as markdown, ready for memory.md.
"""
import argparse
import gc
import statistics
import sys
import time

import torch
import torch._dynamo

from nanochat.gpt import GPT, RECOMPUTE_MODES, ModelRuntime
from nanochat.optim import MuonAdamW
from nanochat.plan import estimate_memory, fits, model_config_from_args

GiB = 2 ** 30


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="12,20", help="comma-separated --depth values")
    p.add_argument("--seq-lens", default="2048", help="comma-separated --max-seq-len values")
    p.add_argument("--batches", default="4,8,16,32", help="comma-separated --device-batch-size values")
    p.add_argument("--modes", default=",".join(RECOMPUTE_MODES), help="comma-separated --activation-checkpointing modes")
    p.add_argument("--memory-gib", type=float, default=24.0, help="emulated card size (GiB); <= 0 = the whole device")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--lm-ce-kernel", default="triton", choices=["triton", "inductor"])
    p.add_argument("--no-compile", action="store_true", help="eager blocks (compiled by default, as base_train)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def model_config(args, depth: int, seq: int):
    """The GPTConfig base_train would build for --depth=depth --max-seq-len=seq."""
    shape = argparse.Namespace(depth=depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=seq,
                               window_pattern=args.window_pattern)
    return model_config_from_args(shape, args.vocab_size)


def run_variant(args, depth: int, seq: int, batch: int, mode: str, device) -> dict:
    """One variant's measurements: peak GiB and median step seconds, or oom=True."""
    cfg = model_config(args, depth, seq)
    runtime = ModelRuntime(compute_dtype=torch.bfloat16, lm_ce_kernel=args.lm_ce_kernel, activation_checkpointing=mode)
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
        x = torch.randint(0, args.vocab_size, (batch, seq), device=device)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, x)
            loss.backward()
            opt.step()
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
        return {"oom": False, "peak": torch.cuda.max_memory_allocated() / GiB, "step": statistics.median(times)}
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
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = total if args.memory_gib <= 0 else min(total, int(args.memory_gib * GiB))
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    print(f"device {torch.cuda.get_device_name(device)}, allocator capped at {cap / GiB:.1f} GiB of "
          f"{total / GiB:.1f}; {'eager' if args.no_compile else 'regional compile'}, bf16, {args.lm_ce_kernel} CE",
          flush=True)
    rows = []
    for depth in ints(args.depths):
        for seq in ints(args.seq_lens):
            for batch in ints(args.batches):
                for mode in args.modes.split(","):
                    est = estimate_memory(model_config(args, depth, seq), batch, compiled=not args.no_compile,
                                          lm_ce_kernel=args.lm_ce_kernel, recompute=mode)["peak"]
                    r = run_variant(args, depth, seq, batch, mode, device)
                    rows.append((depth, seq, batch, mode, est / GiB, fits(est, cap), r))
                    print(f"d{depth} seq {seq} batch {batch} {mode}: "
                          + ("OOM" if r["oom"] else f"peak {r['peak']:.2f} GiB, {r['step'] * 1000:.1f} ms"),
                          flush=True)
    print(f"\n| depth | seq | batch | recompute | estimate GiB | estimate fits {cap / GiB:.0f} GiB | peak GiB "
          f"| step ms | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth, seq, batch, mode, est, ok, r in rows:
        measured = "OOM | - | -" if r["oom"] else f"{r['peak']:.2f} | {r['step'] * 1000:.1f} | {batch * seq / r['step']:,.0f}"
        print(f"| {depth} | {seq} | {batch} | {mode} | {est:.2f} | {'yes' if ok else 'no'} | {measured} |")


if __name__ == "__main__":
    main()
