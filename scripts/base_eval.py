"""Evaluate a base-model checkpoint: validation bits per byte and the CORE metric.

    python -m scripts.base_eval --model-tag=d12                     # latest step, bpb + CORE
    python -m scripts.base_eval --model-tag=d12 --step=520 --evals=core --core-max-per-task=500
    python -m scripts.base_eval --model-tag=d12 --eval=core,bpb --max-per-task=100 --split-tokens=524288
    torchrun --nproc_per_node=2 -m scripts.base_eval --model-tag=d12

Upstream nanochat's spellings work too: --eval (= --evals), --max-per-task (= --core-max-per-task)
and --split-tokens (= --eval-tokens; bpb here is measured on the val split only).

The model is rebuilt from the checkpoint's meta.json and loaded with nanochat.checkpoint (never
executing code); when the checkpoint holds a weight EMA it is evaluated unless --no-ema. It runs
the full model, eager, in bf16 autocast on CUDA (fp32 on CPU), the same view of the model that
training's evaluations use. CORE reads $NANOCHAT_BASE_DIR/eval_bundle (see nanochat/core_eval.py),
downloading nanochat's bundle when online. The last line is `base_eval: {json}` with every number
and its time, so runs can be compared by script.
"""
from __future__ import annotations

import json
import time

import torch

from nanochat.checkpoint import CheckpointError, model_tag_problem
from nanochat.common import UsageError, compute_cleanup, get_dist_info, print0
from nanochat.dataset import DataError
from nanochat.tokenizer import TokenizerError
from nanochat.usage import OneLineParser, die, fail

EVALS = ("bpb", "core", "sample")
PROG = "python -m scripts.base_eval"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="nanochat spellings: --eval = --evals, --max-per-task = --core-max-per-task, "
                             "--split-tokens = --eval-tokens (val split only).")
    p.add_argument("--model-tag", type=str, default=None,
                   help="checkpoint directory name under base_checkpoints (none: the most recently written one)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = latest complete)")
    p.add_argument("--evals", "--eval", dest="evals", type=str, default="bpb,core",
                   help=f"comma-separated subset of {','.join(EVALS)} (--eval: nanochat's name)")
    p.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps; empty = autodetect")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward for val bpb")
    p.add_argument("--eval-tokens", "--split-tokens", dest="eval_tokens", type=int, default=40 * 524288,
                   help="validation tokens for bpb (--split-tokens: nanochat's name)")
    p.add_argument("--core-max-per-task", "--max-per-task", dest="core_max_per_task", type=int, default=-1,
                   help="examples per CORE task (-1 = all; --max-per-task: nanochat's name)")
    p.add_argument("--bundle-dir", type=str, default="", help="CORE eval bundle directory (empty = $NANOCHAT_BASE_DIR/eval_bundle)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if the checkpoint has a weight EMA")
    return p


def validate_args(args) -> list[str]:
    problems = []
    if problem := model_tag_problem(args.model_tag):
        problems.append(problem)
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad or not evals:
        problems.append(f"--evals={args.evals!r}: choose a comma-separated subset of {','.join(EVALS)}")
    if args.device_type not in ("", "cuda", "cpu", "mps"):
        problems.append(f"--device-type={args.device_type!r} must be cuda, cpu, mps or empty (autodetect)")
    if args.step < -1:
        problems.append(f"--step={args.step} must be >= 0 or -1 (latest)")
    if args.device_batch_size < 1:
        problems.append(f"--device-batch-size={args.device_batch_size} must be >= 1")
    if args.eval_tokens < 1:
        problems.append(f"--eval-tokens={args.eval_tokens} must be >= 1")
    if args.core_max_per_task == 0 or args.core_max_per_task < -1:
        problems.append(f"--core-max-per-task={args.core_max_per_task} must be >= 1 or -1 (all)")
    return problems


def main(argv=None):
    args = build_parser().parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems, PROG)
    try:
        return run(args)
    except UsageError as e:
        fail([str(e)], PROG)
    except (CheckpointError, TokenizerError, DataError) as e:
        die(str(e), PROG)


def run(args) -> dict:
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    from nanochat.engine import eval_mode, setup_inference  # noqa: PLC0415
    from nanochat.tokenizer import get_token_bytes  # noqa: PLC0415
    device, world_size, autocast_ctx, tokenizer, model, meta, weights = setup_inference(
        args.device_type, args.model_tag, args.step, use_ema=not args.no_ema)
    ddp, rank = world_size > 1, get_dist_info()[1]
    seq_len = model.config.sequence_len
    print0(f"base_eval: {meta['model_dir']} step {meta['step']} ({weights} weights), device {device}, evals {evals}")
    result = {"model_dir": meta["model_dir"], "step": meta["step"], "weights": weights, "device": str(device)}

    if "bpb" in evals:
        from nanochat.dataloader import build_eval_loader  # noqa: PLC0415
        from nanochat.evaluation import evaluate_bpb  # noqa: PLC0415
        steps = max(1, args.eval_tokens // (args.device_batch_size * seq_len * world_size))
        loader = build_eval_loader(tokenizer, args.device_batch_size, seq_len, "val", device=device,
                                   rank=rank, world_size=world_size)
        t0 = time.time()
        with eval_mode(model):
            token_bytes = get_token_bytes(device=device, vocab_size=tokenizer.get_vocab_size())
            bpb = evaluate_bpb(model, loader, steps, token_bytes, autocast_ctx)
        result.update(val_bpb=bpb, val_tokens=steps * args.device_batch_size * seq_len * world_size,
                      bpb_seconds=time.time() - t0)
        print0(f"val bpb {bpb:.4f} on {result['val_tokens']:,} tokens in {result['bpb_seconds']:.1f}s")

    if "core" in evals:
        from nanochat.core_eval import ensure_eval_bundle, evaluate_core  # noqa: PLC0415
        bundle = None
        if rank == 0:
            bundle = ensure_eval_bundle(args.bundle_dir or None, log=print0)
        if ddp:
            torch.distributed.barrier()
            if rank != 0:
                bundle = ensure_eval_bundle(args.bundle_dir or None, download=False, log=lambda *a: None)
        if bundle:
            with eval_mode(model, eager=True):  # variable lengths: no flex recompiles (see engine.uncompiled)
                core = evaluate_core(model, tokenizer, bundle, device, args.core_max_per_task, max_seq_len=seq_len,
                                     autocast_ctx=autocast_ctx, log=print0)
            result.update(core=core["core"], core_centered=core["centered"], core_accuracy=core["accuracy"],
                          core_examples=core["examples"], core_seconds=core["seconds"])
            print0(f"CORE {core['core']:.4f} ({len(core['centered'])} tasks, {sum(core['examples'].values()):,} "
                   f"examples) in {core['seconds']:.1f}s")
        else:
            result["core"] = None

    if "sample" in evals and rank == 0:
        from nanochat.engine import sample_prompts  # noqa: PLC0415
        with eval_mode(model, eager=True):
            samples = sample_prompts(model, tokenizer, autocast_ctx=autocast_ctx)
        for s in samples:
            print0(f"sample | {s!r}")
        result["samples"] = samples

    print0("base_eval: " + json.dumps(result))
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()
