"""Pretrain a base model.

    python -m scripts.base_train --depth=12 --max-seq-len=1024 --device-batch-size=32 --total-batch-size=32768
    torchrun --nproc_per_node=2 -m scripts.base_train ...

CPU example (tiny, minutes):
    python -m scripts.base_train --device-type=cpu --depth=4 --max-seq-len=256 --device-batch-size=8 \
        --total-batch-size=2048 --num-iterations=100 --eval-every=25 --eval-tokens=16384

The script reads top to bottom: args -> compute init -> model -> compile -> horizon and
hyper-parameter scaling -> optimizer -> data -> resume -> loop. Reusable pieces live in nanochat/
and are tested there; this file only wires them.
"""
import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse
import base64
import gc
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch._dynamo

from nanochat.attention import select_attention_backend
from nanochat.checkpoint import (CheckpointError, check_state_dict_keys, diff_model_config,
                                 load_checkpoint, save_checkpoint)
from nanochat.cli import batch_problems, fail
from nanochat.common import (UsageError, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, print0, run_provenance)
from nanochat.dataloader import build_loader
from nanochat.dynamic_suffix import DynamicSuffixConfig, DynamicSuffixController
from nanochat.evaluation import evaluate_bpb
from nanochat.fp8 import (Fp8Options, check_fp8_hardware, convert_to_fp8, disable_fp8, refresh_fp8_weight_caches,
                          set_fp8_weight_cache, validate_fp8_options)
from nanochat.gpt import GPT, GPTConfig, validate_window_pattern
from nanochat.optim import MuonAdamW
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# nanochat tuned its defaults at d12 with 2^19-token batches; the auto batch size and the weight
# decay scale from there (see "Horizon" in main()).
B_REF = 2 ** 19
_DYN = DynamicSuffixConfig()  # the controller's defaults are the flags' defaults


# -----------------------------------------------------------------------------
# Flags: the one place where each flag's name, default and meaning live.
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.base_train",
        description="Pretrain a nanochat GPT. All flags are validated before any GPU work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("logging")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name; 'dummy' disables wandb")
    g = p.add_argument_group("runtime")
    g.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps; empty = autodetect")
    g.add_argument("--seed", type=int, default=42, help="seed for weight init (the data order is fixed)")
    g.add_argument("--no-compile", action="store_true", help="run eager (no torch.compile); for debugging or CPU")
    g = p.add_argument_group("model architecture")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of --head-dim)")
    g.add_argument("--head-dim", type=int, default=128, help="target attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    g.add_argument("--window-pattern", type=str, default="L",
                   help="sliding-window pattern tiled over layers: L = full context, S = half context (e.g. SSSL); the last layer is always L")
    g = p.add_argument_group("training horizon (the first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (-1 = disabled)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="derive num_iterations to reach this many training FLOPs (-1 = disabled)")
    g.add_argument("--target-param-data-ratio", type=float, default=10.5,
                   help="derive num_iterations so that tokens = ratio * scaling params (Chinchilla = 20; -1 = disabled)")
    g.add_argument("--time-budget-sec", type=float, default=-1.0,
                   help="train for this many seconds of step time (compile included, eval and saving excluded); the LR schedule "
                        "follows elapsed/budget and --num-iterations, if given, is only a cap (-1 = disabled)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step; lower it (16, 8, ...) on OOM")
    g.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step across all devices; must be a multiple of device-batch-size * max-seq-len * world size (-1 = auto from scaling laws)")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW learning rate of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate of the lm_head")
    g.add_argument("--weight-decay", type=float, default=0.2, help="cautious weight decay of the Muon matrices")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate of the block matrices")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW learning rate of the per-layer scalars (resid/x0 lambdas)")
    g.add_argument("--adam-beta1", type=float, default=0.8, help="AdamW beta1 for embedding/unembedding")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2 for embedding/unembedding")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps for linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.4, help="fraction of steps for the final linear LR warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="final LR as a fraction of the initial LR")
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from the checkpoint of this step (-1 = start fresh)")
    g = p.add_argument_group("fp8 training (nanochat/fp8.py)")
    g.add_argument("--fp8", action="store_true", help="train the block linears (and lm_head unless skipped) in FP8; needs CUDA capability >= 8.9 (runs slowly on CPU for testing)")
    g.add_argument("--fp8-backend", type=str, default="custom", choices=["custom", "torchao"],
                   help="custom: our tensorwise Float8 linear (torch._scaled_mm via a registered custom op); torchao: torchao.float8")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["tensorwise", "rowwise"],
                   help="scaling recipe; rowwise (more accurate, slower) needs --fp8-backend=torchao")
    g.add_argument("--fp8-min-dim", type=int, default=128, help="skip linears whose smaller dimension is below this")
    g.add_argument("--fp8-skip-lm-head", action="store_true", help="keep the lm_head in bf16")
    g.add_argument("--fp8-skip-attn-qk", action="store_true", help="keep the attention q and k projections in bf16")
    g.add_argument("--fp8-fast-accum", action="store_true", help="custom backend: fast (lower-precision) accumulation in the forward GEMM")
    g.add_argument("--fp8-weight-grad-bf16", action="store_true", help="custom backend: weight gradients in bf16 (default fp32)")
    g.add_argument("--fp8-no-allow-in-graph", action="store_true",
                   help="custom backend: let inductor trace torch._scaled_mm instead of calling our registered custom op")
    g.add_argument("--fp8-include-regex", type=str, default=None, help="convert only linears whose qualified name matches (re.search)")
    g.add_argument("--fp8-exclude-regex", type=str, default=None, help="never convert linears whose qualified name matches (re.search)")
    g.add_argument("--fp8-log-modules", action="store_true", help="print every converted and skipped linear with the reason")
    g = p.add_argument_group("block-update schedule (dynamic suffix; see nanochat/dynamic_suffix.py)")
    g.add_argument("--block-update-schedule", type=str, default="full_update", choices=["full_update", "dynamic_suffix"],
                   help="full_update trains every block each step; dynamic_suffix trains only a relevance-chosen suffix of blocks on most steps")
    g.add_argument("--dyn-warmup-steps", type=int, default=_DYN.warmup_steps, help="full-update steps at the start")
    g.add_argument("--dyn-probe-every", type=int, default=_DYN.probe_every,
                   help="a full-update probe step (measures relevance, re-chooses the suffix) every N steps (<= 0 disables)")
    g.add_argument("--dyn-refresh-every", type=int, default=_DYN.refresh_every,
                   help="a full-update refresh step every N steps, so the frozen prefix never goes stale (<= 0 disables)")
    g.add_argument("--dyn-relevance-metric", type=str, default=_DYN.relevance_metric, choices=["grad_ratio", "saliency_abs_gp"],
                   help="per-block relevance: grad_ratio = |g|/(|W|+eps); saliency_abs_gp = sum |g*W|")
    g.add_argument("--dyn-relevance-threshold", type=float, default=_DYN.relevance_threshold,
                   help="train the smallest top-down suffix whose share of the relevance EMA reaches this, in (0, 1]")
    g.add_argument("--dyn-min-active-layers", type=int, default=_DYN.min_active_layers, help="floor on the number of trained blocks")
    g.add_argument("--dyn-max-active-layers", type=int, default=_DYN.max_active_layers,
                   help="cap on the number of trained blocks (0 = no cap); the log says how often it binds")
    g.add_argument("--dyn-freeze-start-step", type=int, default=_DYN.freeze_start_step,
                   help="first step that may freeze a prefix (-1 = use --dyn-freeze-start-frac)")
    g.add_argument("--dyn-freeze-start-frac", type=float, default=_DYN.freeze_start_frac,
                   help="freeze start as a fraction of the steps (used when --dyn-freeze-start-step is -1)")
    g.add_argument("--dyn-ema-decay", type=float, default=_DYN.ema_decay, help="decay of the per-block relevance EMA, in [0, 1)")
    g.add_argument("--dyn-eps", type=float, default=_DYN.eps, help="denominator guard of grad_ratio (> 0)")
    g.add_argument("--dyn-log-every", type=int, default=_DYN.log_every,
                   help="print the controller's line (active suffix, cap/floor binding, relevance) every N steps (<= 0 disables)")
    g = p.add_argument_group("muon optimizer")
    g.add_argument("--muon-active-only-stack", action="store_true",
                   help="orthogonalise only matrices that have gradients (frozen blocks are skipped instead of stacked as zeros)")
    g.add_argument("--muon-stack-chunk-size", type=int, default=0,
                   help="orthogonalise stacked matrices in fixed-size chunks (padded) so compiled steps never recompile (0 = no chunking)")
    g = p.add_argument_group("lm-head cross-entropy")
    g.add_argument("--lm-ce-backend", type=str, default="baseline", choices=["baseline", "chunked"],
                   help="baseline materialises the full fp32 logits; chunked never does (exact grads, far less memory)")
    g.add_argument("--lm-ce-chunk-size", type=int, default=8192, help="rows (tokens) per chunk of the chunked cross-entropy")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps and at the end (-1 = disabled)")
    g.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens of the validation split per evaluation")
    g.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    g = p.add_argument_group("output")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default: d{depth})")
    g.add_argument("--metrics-file", type=str, default="",
                   help="append one JSON line per step and per evaluation, and a final summary line, to this file (empty = off)")
    return p


def validate_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags, each naming the flag(s) and the fix. Pure: no GPU, no I/O."""
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    need(args.device_type in ("", "cuda", "cpu", "mps"), f"--device-type={args.device_type!r} must be cuda, cpu, mps or empty (autodetect)")
    need(args.depth >= 1, f"--depth={args.depth} must be >= 1")
    need(args.aspect_ratio >= 1, f"--aspect-ratio={args.aspect_ratio} must be >= 1")
    need(args.head_dim >= 2 and args.head_dim % 2 == 0, f"--head-dim={args.head_dim} must be an even number >= 2 (rotary embeddings rotate pairs)")
    need(args.max_seq_len >= 2, f"--max-seq-len={args.max_seq_len} must be >= 2")
    wp = validate_window_pattern(args.window_pattern)
    if wp:
        problems.append(wp)
    need(args.num_iterations == -1 or args.num_iterations >= 1, f"--num-iterations={args.num_iterations} must be >= 1 or -1 (disabled)")
    need(args.target_flops == -1 or args.target_flops > 0, f"--target-flops={args.target_flops} must be > 0 or -1 (disabled)")
    need(args.target_param_data_ratio == -1 or args.target_param_data_ratio > 0,
         f"--target-param-data-ratio={args.target_param_data_ratio} must be > 0 or -1 (disabled)")
    need(args.num_iterations > 0 or args.target_flops > 0 or args.target_param_data_ratio > 0 or args.time_budget_sec > 0,
         "no training horizon: set --num-iterations, --target-flops, --target-param-data-ratio or --time-budget-sec")
    need(args.device_batch_size >= 1, f"--device-batch-size={args.device_batch_size} must be >= 1")
    need(args.total_batch_size == -1 or args.total_batch_size >= 1, f"--total-batch-size={args.total_batch_size} must be >= 1 or -1 (auto)")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
        v = getattr(args, name)
        need(v >= 0 and v == v, f"--{name.replace('_', '-')}={v} must be a number >= 0")
    need(args.weight_decay >= 0, f"--weight-decay={args.weight_decay} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name)
        need(0 <= v < 1, f"--{name.replace('_', '-')}={v} must be in [0, 1)")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        v = getattr(args, name)
        need(0 <= v <= 1, f"--{name.replace('_', '-')}={v} must be in [0, 1]")
    need(args.warmup_ratio + args.warmdown_ratio <= 1,
         f"--warmup-ratio ({args.warmup_ratio}) + --warmdown-ratio ({args.warmdown_ratio}) must not exceed 1")
    need(args.resume_from_step == -1 or args.resume_from_step >= 0, f"--resume-from-step={args.resume_from_step} must be >= 0 or -1")
    need(args.time_budget_sec == -1 or args.time_budget_sec > 0, f"--time-budget-sec={args.time_budget_sec} must be > 0 or -1 (disabled)")
    problems += validate_fp8_options(Fp8Options.from_args(args))
    if args.block_update_schedule == "dynamic_suffix":
        problems += DynamicSuffixConfig.from_args(args).validate(args.depth)
    else:
        changed = [f"--{a.dest.replace('_', '-')}" for a in build_parser()._actions
                   if a.dest.startswith("dyn_") and getattr(args, a.dest) != a.default]
        need(not changed, f"{', '.join(changed)} only apply with --block-update-schedule=dynamic_suffix")
    need(args.muon_stack_chunk_size >= 0, f"--muon-stack-chunk-size={args.muon_stack_chunk_size} must be >= 0 (0 = no chunking)")
    need(args.lm_ce_chunk_size >= 1, f"--lm-ce-chunk-size={args.lm_ce_chunk_size} must be >= 1")
    need(args.eval_every == -1 or args.eval_every >= 1, f"--eval-every={args.eval_every} must be >= 1 or -1 (disabled)")
    need(args.eval_tokens >= 1, f"--eval-tokens={args.eval_tokens} must be >= 1")
    need(args.save_every == -1 or args.save_every >= 1, f"--save-every={args.save_every} must be >= 1 or -1 (only at the end)")
    if args.model_tag is not None:
        need(re.fullmatch(r"[A-Za-z0-9._-]+", args.model_tag) is not None,
             f"--model-tag={args.model_tag!r} may only contain letters, digits, '.', '_' and '-'")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems)
    return args



def main():
    # -----------------------------------------------------------------------------
    # Arguments: parsed and validated before anything touches a device.
    args = parse_args()
    user_config = vars(args).copy()

    # -----------------------------------------------------------------------------
    # Compute init
    device_type = args.device_type or autodetect_device_type()
    _, _, _, world_size = get_dist_info()
    problems = batch_problems(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size) \
        if args.total_batch_size > 0 else []
    if problems:
        fail(problems)
    try:
        ddp, rank, local_rank, world_size, device = compute_init(device_type)
    except UsageError as e:
        fail([str(e)])
    master = rank == 0
    if args.fp8:
        hw_problem = check_fp8_hardware(device_type)
        if hw_problem:
            fail([hw_problem])
        if device_type == "cpu":
            print0("WARNING: --fp8 on CPU emulates FP8 GEMMs slowly; use it for testing only")
    torch.manual_seed(args.seed)
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else (lambda: 0)
    compute_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    autocast_ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    peak_flops = get_peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    provenance = run_provenance()
    print0(f"run: {json.dumps(provenance)}")
    print0(f"args: {json.dumps(user_config)}")
    wandb_run = init_wandb(args.run, {**user_config, **provenance}, master)

    # -----------------------------------------------------------------------------
    # Tokenizer and model
    try:
        tokenizer = get_tokenizer()
    except Exception as e:  # noqa: BLE001 (missing/corrupt tokenizer: one clear line)
        fail([f"{e}"])
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()


    def build_config(depth: int) -> GPTConfig:
        model_dim = ((depth * args.aspect_ratio + args.head_dim - 1) // args.head_dim) * args.head_dim
        n_head = model_dim // args.head_dim
        return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                         n_kv_head=n_head, n_embd=model_dim, window_pattern=args.window_pattern)


    model_config = build_config(args.depth)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    model.compute_dtype = compute_dtype
    model.lm_ce_backend = args.lm_ce_backend
    model.lm_ce_chunk_size = args.lm_ce_chunk_size
    attn_backend, attn_reason = select_attention_backend(device_type, args.window_pattern, compute_dtype)
    model.attn_backend = attn_backend
    print0(f"model: {json.dumps(asdict(model_config))}")
    print0(f"attention backend: {attn_backend} ({attn_reason})")
    param_counts = model.num_scaling_params()
    print0("parameters: " + ", ".join(f"{k}={v:,}" for k, v in param_counts.items()))
    flops_per_token = model.estimate_flops()
    print0(f"FLOPs per token (training): {flops_per_token:.3e}")

    # -----------------------------------------------------------------------------
    # Checkpoint directory and resume (model weights are loaded before compile)
    base_dir = get_base_dir()
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", model_tag)
    resuming = args.resume_from_step != -1
    if resuming:
        try:
            model_state, optim_state, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                             load_optimizer=True, rank=rank)
        except CheckpointError as e:
            fail([str(e)])
        mismatch = diff_model_config(meta["model_config"], asdict(model_config)) + check_state_dict_keys(model_state, model)
        if mismatch:
            shown = mismatch[:8] + ([f"... and {len(mismatch) - 8} more"] if len(mismatch) > 8 else [])
            fail([f"checkpoint {checkpoint_dir} step {args.resume_from_step} does not match this run "
                  f"(same --depth/--aspect-ratio/--head-dim/--max-seq-len/--window-pattern and tokenizer needed): " + "; ".join(shown)])
        model.load_state_dict(model_state, strict=True)
        del model_state
        print0(f"resuming from step {args.resume_from_step} of {checkpoint_dir}")

    # -----------------------------------------------------------------------------
    # FP8: convert linears in place (weights are shared, so checkpoints and the optimizer are unaffected)
    if args.fp8:
        fp8_opts = Fp8Options.from_args(args)
        if args.lm_ce_backend == "chunked" and not fp8_opts.skip_lm_head:
            fp8_opts.skip_lm_head = True
            print0("FP8: lm_head kept in bf16 because --lm-ce-backend=chunked reads its weight directly")
        fp8_report = convert_to_fp8(model, fp8_opts)
        print0(fp8_report.summary())
        if fp8_opts.log_modules:
            print0(fp8_report.details())

    # -----------------------------------------------------------------------------
    # Compile: regional (each block and the head separately); see nanochat/gpt.py for why.
    if not args.no_compile:
        if device_type == "cpu":
            print0("note: compiling on CPU is slow to start; pass --no-compile for quick CPU runs")
        # Fail loudly instead of silently falling back to eager if something recompiles too often.
        for knob in ("recompile_limit", "cache_size_limit"):  # name differs across torch versions
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        model.compile_regions(dynamic=False)

    # -----------------------------------------------------------------------------
    # Horizon, batch size and hyper-parameter scaling (nanochat's scaling rules)
    num_scaling_params = param_counts["transformer_matrices"] + param_counts["lm_head"]
    with torch.device("meta"):  # shapes only: count d12 parameters without allocating
        d12 = GPT(build_config(12))
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 10.5
    target_tokens = int(ratio * num_scaling_params)
    D_REF = ratio * (d12.num_scaling_params()["transformer_matrices"] + d12.num_scaling_params()["lm_head"])
    del d12
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        # Optimal batch grows as D^0.383 (Power Lines); 2^19 tokens is optimal at d12.
        predicted = B_REF * (target_tokens / D_REF) ** 0.383
        total_batch_size = 2 ** round(math.log2(predicted))
        per_step = args.device_batch_size * args.max_seq_len * world_size
        total_batch_size = max(per_step, (total_batch_size // per_step) * per_step)
        print0(f"auto total batch size: {total_batch_size:,} tokens")
    grad_accum_steps = total_batch_size // (args.device_batch_size * args.max_seq_len * world_size)
    # Learning rates are used as given. (nanochat multiplies them by sqrt(B / 2^19); at the d12
    # anchor config, B = 32k, that cost 0.046 val bpb after 520 steps on an H100: 1.4696 vs 1.4240,
    # see docs/benchmarks.md.) Weight decay keeps nanochat's horizon/batch scaling.
    weight_decay = args.weight_decay * (total_batch_size / B_REF) ** 0.5 * (D_REF / target_tokens)
    time_budget = args.time_budget_sec if args.time_budget_sec > 0 else None
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif time_budget:
        num_iterations = 10 ** 9  # the clock ends the run
    elif args.target_flops > 0:
        num_iterations = max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
    else:
        num_iterations = max(1, target_tokens // total_batch_size)
    total_tokens = total_batch_size * num_iterations
    if time_budget:
        print0(f"horizon: {time_budget:.0f}s of step time (compile included)"
               + (f", at most {num_iterations:,} steps" if args.num_iterations > 0 else ""))
    else:
        print0(f"horizon: {num_iterations:,} steps x {total_batch_size:,} tokens = {total_tokens:,} tokens "
               f"({total_tokens / num_scaling_params:.2f} tokens/param; {flops_per_token * total_tokens:.3e} FLOPs)")
    print0(f"batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {grad_accum_steps} accum steps; "
           f"weight decay {weight_decay:.5f}")

    # -----------------------------------------------------------------------------
    # Optimizer
    optimizer = MuonAdamW(
        model.param_groups(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                           matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
                           weight_decay=weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2)),
        active_only_stack=args.muon_active_only_stack, stack_chunk_size=args.muon_stack_chunk_size,
        compile_orthogonalize=(not args.no_compile and device_type == "cuda"),
    )
    if resuming:
        optimizer.load_state_dict(optim_state)
        del optim_state


    def lr_multiplier_time(progress: float) -> float:
        """The same warmup / constant / warmdown shape over elapsed/budget instead of steps."""
        if progress < args.warmup_ratio:
            return max(progress / args.warmup_ratio, 1e-3)
        if progress <= 1 - args.warmdown_ratio:
            return 1.0
        left = max(0.0, 1 - progress) / args.warmdown_ratio
        return left + (1 - left) * args.final_lr_frac

    def lr_multiplier(it: int) -> float:
        warmup = round(args.warmup_ratio * num_iterations)
        warmdown = round(args.warmdown_ratio * num_iterations)
        if it < warmup:
            return (it + 1) / warmup
        if it <= num_iterations - warmdown:
            return 1.0
        progress = (num_iterations - it) / warmdown
        return progress + (1 - progress) * args.final_lr_frac


    def muon_momentum(it: int) -> float:
        frac = min(it / 300, 1)
        return (1 - frac) * 0.85 + frac * 0.95


    # -----------------------------------------------------------------------------
    # Block-update schedule: None = every block trains every step.
    dyn = None
    if args.block_update_schedule == "dynamic_suffix":
        dyn = DynamicSuffixController(DynamicSuffixConfig.from_args(args), model_config.n_layer, num_iterations)
        if resuming:
            dyn.load_state_dict(meta["dynamic_suffix"])
        if time_budget and args.dyn_freeze_start_step < 0:
            dyn.freeze_start = 10 ** 9  # set from the clock once --dyn-freeze-start-frac of the budget has passed
        print0(f"dynamic_suffix: {json.dumps(dyn.config.to_dict())}")

    # -----------------------------------------------------------------------------
    # Data
    # `consumed_state` is where the last *trained-on* batch ended: that is what a checkpoint stores,
    # because the batch already prefetched into (x, y) has not been used yet.
    consumed_state = meta["dataloader_states"][rank] if resuming else None
    train_loader = build_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
                                rank=rank, world_size=world_size, resume_state=consumed_state)
    x, y, loader_state = next(train_loader)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))

    # -----------------------------------------------------------------------------
    # Loop state
    if resuming:
        step = meta["step"]
        loop = meta["loop_state"]
        smooth_loss, min_val_bpb, val_bpb = loop["smooth_loss"], loop["min_val_bpb"], loop["val_bpb"]
        total_training_time, train_elapsed = loop["total_training_time"], loop["train_elapsed"]
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"]["cpu"])), dtype=torch.uint8))
    else:
        step, smooth_loss, min_val_bpb, val_bpb = 0, 0.0, float("inf"), None
        total_training_time = 0.0  # step time excluding each process's first (compiling) step
        train_elapsed = 0.0  # all step time, compile included: what --time-budget-sec spends
    first_step = step
    compile_sec = None
    peak_step_mem = []
    metrics = open(args.metrics_file, "a", encoding="utf-8") if (args.metrics_file and master) else None

    def log_metrics(record: dict) -> None:
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def gather_loader_states() -> list:
        """Each rank reads its own row groups, so every rank's loader position is saved."""
        if not ddp:
            return [consumed_state]
        states = [None] * world_size
        torch.distributed.all_gather_object(states, consumed_state)
        return states

    def checkpoint_meta(loader_states: list) -> dict:
        return {
            "step": step,
            "args": user_config,
            "model_config": asdict(model_config),
            "provenance": provenance,
            "total_batch_size": total_batch_size,
            "num_iterations": num_iterations,
            "dataloader_states": loader_states,
            "loop_state": {"smooth_loss": smooth_loss, "min_val_bpb": min_val_bpb, "val_bpb": val_bpb,
                           "total_training_time": total_training_time, "train_elapsed": train_elapsed},
            "dynamic_suffix": dyn.state_dict() if dyn else None,
            "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
        }

    def budget_spent() -> bool:
        """Rank 0's clock decides for every rank, so all ranks stop on the same step."""
        if not time_budget:
            return False
        flag = torch.tensor(float(train_elapsed >= time_budget), device=device)
        if ddp:
            torch.distributed.broadcast(flag, 0)
        return bool(flag.item())

    barrier = torch.distributed.barrier if ddp else None
    frozen_fp8 = None  # the active_start whose frozen-prefix FP8 weight caches are live
    while True:
        last_step = step == num_iterations or budget_spent()

        # --- evaluation (full model, FP8 off: bf16 numbers comparable across runs) -----
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            val_loader = build_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=device,
                                      rank=rank, world_size=world_size)
            t_eval = time.time()
            with disable_fp8(model):
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes, autocast_ctx)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f} | {eval_steps * args.device_batch_size * args.max_seq_len * world_size:,} tokens in {time.time() - t_eval:.1f}s")
            log_metrics({"kind": "eval", "step": step, "val_bpb": val_bpb, "train_elapsed": train_elapsed,
                         "tokens": step * total_batch_size})
            wandb_run.log({"step": step, "val/bpb": val_bpb, "total_training_time": total_training_time})
            model.train()

        # --- checkpoint -----------------------------------------------------------
        if last_step or (step > first_step and args.save_every > 0 and step % args.save_every == 0):
            save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer.state_dict(),
                            checkpoint_meta(gather_loader_states()),
                            rank=rank, world_size=world_size, barrier=barrier)
            print0(f"saved checkpoint step {step} to {checkpoint_dir}")

        if last_step:
            break

        # --- one optimizer step ---------------------------------------------------
        synchronize()
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        if dyn and time_budget and dyn.freeze_start == 10 ** 9 and train_elapsed >= args.dyn_freeze_start_frac * time_budget:
            dyn.freeze_start = max(step, args.dyn_warmup_steps)
        active_start = dyn.active_start(step) if dyn else 0
        if args.fp8 and active_start != frozen_fp8:
            # Frozen prefix weights do not change until the next full step: quantise them once per
            # freeze period instead of every micro-step (custom backend; a no-op for torchao).
            set_fp8_weight_cache(model, False)
            if active_start:
                set_fp8_weight_cache(model, True, modules=list(model.transformer.h[:active_start]))
            frozen_fp8 = active_start
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y, active_start=active_start)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
            consumed_state = loader_state
            x, y, loader_state = next(train_loader)  # prefetch while the GPU works
        train_loss = (loss_sum / grad_accum_steps).item()  # the one host sync of the step
        if not math.isfinite(train_loss):
            # Never let a non-finite loss reach the optimizer: stop, the last checkpoint stays intact.
            print0(f"step {step:05d} | non-finite loss ({train_loss}); stopping before the optimizer step. "
                   f"The last saved checkpoint is untouched.")
            compute_cleanup()
            sys.exit(1)
        scores = None
        if dyn and dyn.is_full_step(step):
            # Relevance from the live gradients (before the optimizer step and zero_grad), on device.
            scores = dyn.block_scores(model.block_params())
            if ddp:  # ranks must agree on the next active_start: average their local measurements
                torch.distributed.all_reduce(scores)
                scores /= world_size
        lrm = lr_multiplier_time(train_elapsed / time_budget) if time_budget else lr_multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if scores is not None:
            dyn.update(step, scores)  # one host sync, after the optimizer work has been queued
            for w in dyn.pop_warnings():
                print0(f"dynamic_suffix warning: {w}")
        synchronize()
        dt = time.time() - t0

        # --- logging --------------------------------------------------------------
        train_elapsed += dt
        if step == first_step:
            compile_sec = dt
        else:
            total_training_time += dt
        step_mem = max_memory() / 2**20
        peak_step_mem.append(step_mem)
        mem = f" | mem {step_mem:,.0f}MiB" if device_type == "cuda" else ""
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        tok_per_sec = total_batch_size / dt
        # MFU counts the work done: a frozen prefix does forward-only FLOPs.
        step_flops = model.estimate_flops(active_start) if active_start else flops_per_token
        mfu_value = 100 * step_flops * tok_per_sec / (peak_flops * world_size) if peak_flops else None
        mfu = f" | mfu {mfu_value:.1f}%" if mfu_value is not None else ""
        active = f" | active {model_config.n_layer - active_start}/{model_config.n_layer}" if dyn else ""
        done = step - first_step
        if time_budget:
            eta = f"{max(0.0, time_budget - train_elapsed) / 60:.1f}m of budget"
        else:
            eta = f"{(num_iterations - step - 1) * total_training_time / done / 60:.1f}m" if done > 0 else "-"
        horizon = "" if time_budget and args.num_iterations <= 0 else f"/{num_iterations}"
        print0(f"step {step:05d}{horizon} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.1f}ms | "
               f"tok/s {tok_per_sec:,.0f}{mfu}{mem}{active} | eta {eta}")
        log_metrics({"kind": "step", "step": step, "loss": train_loss, "loss_ema": debiased, "lrm": lrm, "dt": dt,
                     "tok_per_sec": tok_per_sec, "mfu": mfu_value, "step_peak_mib": step_mem if device_type == "cuda" else None,
                     "active_layers": model_config.n_layer - active_start, "train_elapsed": train_elapsed,
                     "tokens": (step + 1) * total_batch_size})
        if dyn and (line := dyn.log_line(step)):
            print0(line)
        if step % 100 == 0:
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})
        step += 1
        if step == first_step + 1:
            # Python's cyclic GC scans the big object graph of compiled code for little gain; freeze
            # what exists after the first step and collect by hand rarely (as nanochat does).
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    # -----------------------------------------------------------------------------
    # Summary
    steady = step - first_step - 1
    steady_tok = steady * total_batch_size / total_training_time if total_training_time > 0 else float("nan")
    peak_mem = f"{max(peak_step_mem or [0]):,.0f}MiB" if device_type == "cuda" else "n/a (cpu)"
    print0(f"done: {step - first_step} steps | training time {total_training_time:.1f}s excluding first step "
           f"({compile_sec or 0:.1f}s incl. compile) | steady tok/s {steady_tok:,.0f} | peak memory {peak_mem} | "
           f"min val bpb " + (f"{min_val_bpb:.4f}" if math.isfinite(min_val_bpb) else "n/a (no eval)"))
    summary = {"kind": "summary", "steps": step, "steps_this_run": step - first_step, "train_elapsed": train_elapsed,
               "first_step_sec": compile_sec, "steady_tok_per_sec": steady_tok,
               "peak_mib": max(peak_step_mem) if (peak_step_mem and device_type == "cuda") else None,
               "final_val_bpb": val_bpb, "min_val_bpb": min_val_bpb if math.isfinite(min_val_bpb) else None,
               "final_loss_ema": smooth_loss / (1 - 0.9 ** step) if step > 0 else None,
               "tokens": step * total_batch_size, "schedule": args.block_update_schedule}
    if dyn:
        summary["dynamic_suffix"] = dyn.stats()
        print0(f"dynamic_suffix stats: {json.dumps(dyn.stats())}")
    log_metrics(summary)
    if metrics:
        metrics.close()
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
