"""Generate text from a base-model checkpoint (KV-cached, so each new token costs one position).

    python -m scripts.generate --model-tag=d12 --prompt="The capital of France is"
    python -m scripts.generate --prompt="Once upon a time" --temperature=0 --max-tokens=100   # greedy
    python -m scripts.generate --prompt="Hi" --num-samples=4 --temperature=1.0 --top-p=0.9 --seed=7

The prompt is encoded after a BOS token; generation stops at --max-tokens or when the model emits
BOS (a document boundary). With a seed the output is deterministic, and --no-kv-cache (re-running
the whole sequence every step, for checking) gives the same tokens. The checkpoint's weight EMA
is used when present unless --no-ema.
"""
from __future__ import annotations

import argparse
import sys
import time

from nanochat.common import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-tag", type=str, default=None,
                   help="checkpoint directory under base_checkpoints (default: the most recently written one)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = latest complete)")
    p.add_argument("--prompt", type=str, default="The capital of France is", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (-1 = disabled)")
    p.add_argument("--top-p", type=float, default=-1.0, help="nucleus sampling mass in (0, 1) (-1 = disabled)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt (one batch)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling generator")
    p.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps; empty = autodetect")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step (slow; for checking)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has a weight EMA")
    return p


def validate_args(args) -> list[str]:
    problems = []
    if args.max_tokens < 1:
        problems.append(f"--max-tokens={args.max_tokens} must be >= 1")
    if args.temperature < 0:
        problems.append(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k == 0 or args.top_k < -1:
        problems.append(f"--top-k={args.top_k} must be >= 1 or -1 (disabled)")
    if args.top_p != -1 and not 0 < args.top_p <= 1:
        problems.append(f"--top-p={args.top_p} must be in (0, 1] or -1 (disabled)")
    if args.num_samples < 1:
        problems.append(f"--num-samples={args.num_samples} must be >= 1")
    if args.step < -1:
        problems.append(f"--step={args.step} must be >= 0 or -1 (latest)")
    if args.device_type not in ("", "cuda", "cpu", "mps"):
        problems.append(f"--device-type={args.device_type!r} must be cuda, cpu, mps or empty (autodetect)")
    return problems


def fail(problems: list[str]) -> None:
    print("generate: error: " + "; ".join(problems), file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None):
    args = build_parser().parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems)
    from nanochat.engine import Engine, setup_inference  # noqa: PLC0415
    try:
        device, _, autocast_ctx, tokenizer, model, meta, weights = setup_inference(
            args.device_type, args.model_tag, args.step, use_ema=not args.no_ema)
    except UsageError as e:
        fail([str(e)])
    bos = tokenizer.get_bos_token_id()
    tokens = tokenizer.encode(args.prompt, prepend=bos)
    if len(tokens) + args.max_tokens > model.rotary_seq_len:
        fail([f"prompt ({len(tokens)} tokens) + --max-tokens={args.max_tokens} exceeds the model's rotary table "
              f"({model.rotary_seq_len} positions)"])
    print(f"# {meta['model_dir']} step {meta['step']} ({weights} weights), {len(tokens)} prompt tokens, "
          f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, seed {args.seed}", flush=True)
    engine = Engine(model, tokenizer)
    t0 = time.time()
    with autocast_ctx:
        outs = engine.generate_batch(tokens, args.max_tokens, num_samples=args.num_samples,
                                     temperature=args.temperature,
                                     top_k=args.top_k if args.top_k > 0 else None,
                                     top_p=args.top_p if args.top_p > 0 else None,
                                     seed=args.seed, use_cache=not args.no_kv_cache, stop_tokens=(bos,))
    dt = time.time() - t0
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(new), flush=True)
    n_new = sum(len(o) for o in outs)
    print(f"# {n_new} tokens in {dt:.2f}s ({n_new / max(dt, 1e-9):.1f} tok/s, "
          f"{'no ' if args.no_kv_cache else ''}KV cache)", flush=True)
    return outs


if __name__ == "__main__":
    main()
