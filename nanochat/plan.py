"""Planning a run from its validated flags: checks that need the world size or the disk, the
training horizon, `--dry-run`'s report and its peak-memory estimate. (The flags themselves, their
validation and `--config` files are nanochat/config.py.)

The horizon (batch size, number of steps, weight decay scaling) is computed here, by the same
function for the real run and for ``--dry-run``, so the two can never disagree; the bounds it
checks (steps, accumulation) are the ones that only the derived numbers can break.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from nanochat.config import MAX_GRAD_ACCUM, MAX_TOTAL_BATCH, batch_problems, model_dim
from nanochat.gpt import GPT, GPTConfig
from nanochat.softcap_ce import choose_kernel as choose_ce_kernel

# nanochat tuned its defaults at d12 with 2^19-token batches; the auto batch size and the weight
# decay scale from there.
B_REF = 2 ** 19
CHINCHILLA_TOKENS_PER_PARAM = 20
MAX_STEPS = 10 ** 9  # also the step count of a pure time budget, whose clock ends the run


# ---------------------------------------------------------------------------------------------
# model shape and horizon (shared by the run and --dry-run)


def model_config_from_args(args: argparse.Namespace, vocab_size: int, depth: int | None = None) -> GPTConfig:
    """GPTConfig from the flags: model_dim = depth * aspect_ratio rounded up to a multiple of head_dim."""
    depth = args.depth if depth is None else depth
    width = model_dim(depth, args.aspect_ratio, args.head_dim)
    n_head = width // args.head_dim
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=width, window_pattern=args.window_pattern)


def scaling_params(counts: dict) -> int:
    """nanochat's scaling-law parameter count: block matrices + lm_head (no embedding, no scalars)."""
    return counts["transformer_matrices"] + counts["lm_head"]


@dataclass
class Horizon:
    total_batch_size: int  # tokens per optimizer step, all ranks
    auto_batch: bool  # total_batch_size came from the scaling rule (--total-batch-size=-1)
    grad_accum_steps: int
    num_iterations: int  # 10**9 under a pure time budget (the clock ends the run)
    time_budget: float | None
    target_tokens: int  # ratio * scaling params (the data horizon the scaling rules assume)
    weight_decay: float  # --weight-decay scaled for batch size and horizon
    total_tokens: int  # total_batch_size * num_iterations
    steps_from: str = "--num-iterations"  # the flag that set num_iterations


def plan_horizon(args: argparse.Namespace, num_scaling_params: int, flops_per_token: float, vocab_size: int,
                 world_size: int) -> Horizon:
    """nanochat's scaling rules: auto batch size, number of steps (the first horizon flag set
    wins), weight decay scaled from the d12 reference."""
    with torch.device("meta"):  # shapes only: count d12 parameters without allocating
        d12 = GPT(model_config_from_args(args, vocab_size, depth=12))
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 10.5
    target_tokens = int(ratio * num_scaling_params)
    d_ref = ratio * scaling_params(d12.num_scaling_params())
    per_step = args.device_batch_size * args.max_seq_len * world_size
    total_batch_size = args.total_batch_size
    auto = total_batch_size == -1
    if auto:
        # Optimal batch grows as D^0.383 (Power Lines); 2^19 tokens is optimal at d12.
        predicted = B_REF * (target_tokens / d_ref) ** 0.383
        total_batch_size = 2 ** round(math.log2(predicted))
        total_batch_size = max(per_step, (total_batch_size // per_step) * per_step)
    grad_accum_steps = total_batch_size // per_step
    # Learning rates are used as given. (nanochat multiplies them by sqrt(B / 2^19); at the d12
    # anchor config, B = 32k, that cost 0.046 val bpb after 520 steps on an H100: 1.4696 vs 1.4240,
    # see docs/benchmarks.md.) Weight decay keeps nanochat's horizon/batch scaling.
    weight_decay = args.weight_decay * (total_batch_size / B_REF) ** 0.5 * (d_ref / target_tokens)
    time_budget = args.time_budget_sec if args.time_budget_sec > 0 else None
    if args.num_iterations > 0:
        num_iterations, steps_from = args.num_iterations, "--num-iterations"
    elif time_budget:
        num_iterations, steps_from = MAX_STEPS, "--time-budget-sec"  # the clock ends the run
    elif args.target_flops > 0:
        num_iterations = max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
        steps_from = "--target-flops"
    else:
        num_iterations, steps_from = max(1, target_tokens // total_batch_size), "--target-param-data-ratio"
    return Horizon(total_batch_size, auto, grad_accum_steps, num_iterations, time_budget, target_tokens,
                   weight_decay, total_batch_size * num_iterations, steps_from)


# ---------------------------------------------------------------------------------------------
# checks that need the world size, the disk or the checkpoint directory


def run_problems(args: argparse.Namespace, world_size: int) -> list[str]:
    """Problems validate_args cannot see (it is pure and assumes nothing about the launch)."""
    problems = []
    if args.total_batch_size > 0:
        problems += batch_problems(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    per_step = args.device_batch_size * args.max_seq_len * world_size
    if args.eval_every > 0 and args.eval_tokens < per_step:
        problems.append(f"--eval-tokens={args.eval_tokens} is less than one evaluation batch (device-batch-size * "
                        f"max-seq-len * world size = {per_step}); use --eval-tokens >= {per_step} or "
                        f"--eval-every=-1 to turn evaluation off")
    if args.metrics_file:
        parent = os.path.dirname(os.path.abspath(args.metrics_file))
        if not os.path.isdir(parent):
            problems.append(f"--metrics-file={args.metrics_file}: directory {parent} does not exist; create it first")
        elif os.path.isdir(args.metrics_file):
            problems.append(f"--metrics-file={args.metrics_file} is a directory; give a file name")
    return problems


def resolve_resume(args: argparse.Namespace, checkpoint_dir: str) -> tuple[int | None, str | None]:
    """(step to resume from or None, problem or None) for --resume-from-step / --resume-latest."""
    from nanochat.checkpoint import CheckpointError, latest_complete_step, resolve_resume_step  # noqa: PLC0415
    if args.resume_latest:
        step = latest_complete_step(checkpoint_dir)
        if step is None:
            return None, (f"--resume-latest: no complete checkpoint in {checkpoint_dir} (a step_NNNNNN directory "
                          f"with DONE); start without --resume-latest, or check --model-tag / NANOCHAT_BASE_DIR")
        return step, None
    if args.resume_from_step == -1:
        return None, None
    try:
        return resolve_resume_step(checkpoint_dir, args.resume_from_step), None
    except CheckpointError as e:
        return None, f"--resume-from-step={args.resume_from_step}: {e}"


def horizon_problems(resume_step: int | None, plan: Horizon) -> list[str]:
    """What the derived horizon breaks: a resumed step past it would never meet
    `step == num_iterations`; a derived step count or an auto batch size past the bounds would run
    (or build its per-micro-step streams) practically forever."""
    problems = []
    if plan.steps_from in ("--target-flops", "--target-param-data-ratio") and plan.num_iterations > MAX_STEPS:
        problems.append(f"{plan.steps_from} gives {plan.num_iterations:,} steps of {plan.total_batch_size:,} tokens, "
                        f"more than {MAX_STEPS:,}; lower {plan.steps_from} or raise --total-batch-size")
    if plan.auto_batch and (plan.total_batch_size > MAX_TOTAL_BATCH or plan.grad_accum_steps > MAX_GRAD_ACCUM):
        problems.append(f"the auto batch size is {plan.total_batch_size:,} tokens ({plan.grad_accum_steps:,} "
                        f"accumulation steps), more than 2**40 tokens or {MAX_GRAD_ACCUM:,} steps; set "
                        f"--total-batch-size, or raise --device-batch-size")
    if resume_step is not None and resume_step > plan.num_iterations:
        problems.append(f"resuming from step {resume_step}, but the run ends at step {plan.num_iterations}; "
                        f"raise --num-iterations (or the other horizon flags) above {resume_step}")
    return problems


# ---------------------------------------------------------------------------------------------
# peak memory estimate

# Saved-for-backward activations of one block, in elements per token per model dim: counted with
# saved-tensor hooks on this model (eager: 19.06 at d=128 and d=256), and it reproduces the d12
# anchor's measured peak (14.8 GiB, compiled, bf16: see the module docstring of estimate_memory).
ACT_ELEMS_PER_TOKEN_DIM_LAYER = 19


def estimate_memory(cfg: GPTConfig, device_batch_size: int, *, compute_bytes: int = 2, compiled: bool = True,
                    lm_ce_backend: str = "baseline", lm_ce_chunk_size: int = 8192,
                    lm_ce_kernel: str = "inductor") -> dict[str, int]:
    """Estimated bytes on one device during a full (every block trains) training step.

    Parameters and gradients are fp32 (the model's master weights); AdamW (embedding, lm_head,
    scalars) keeps two fp32 moments, Muon (block matrices) one fp32 momentum. Under bf16 autocast
    (`compute_bytes` = 2) the matmul weights also get bf16 copies. Activations: 19 saved elements
    per token, per layer, per model dim (measured), in the compute dtype. The LM-head loss (see
    docs/optimizations/lm_head_ce.md): baseline keeps the full (tokens x vocab) logits -- about one
    compute-dtype copy when compiled, two with the Triton loss (`lm_ce_kernel="triton"`: logits and
    their gradient, nanochat/softcap_ce.py), about four fp32 copies at the peak when eager; chunked keeps
    an fp32 dW and dx plus (chunk x vocab) temporaries. Sanity check against the d12 anchor (bf16,
    compiled, baseline CE, batch 32 x 1024, vocab 32768; a reference nanochat measured 14.8 GiB
    on an H100): this gives 14.8 GiB; this repo measured 13.9 GiB, and 15.8 GiB with the Triton
    loss (estimate 16.8 GiB). FP8 and frozen-prefix (dynamic_suffix) savings are not modelled:
    full steps peak.

    Returns the components and 'peak' (their sum, or the optimizer step's peak if larger).
    """
    with torch.device("meta"):
        model = GPT(cfg)
    counts = model.num_scaling_params()
    muon_groups: dict[tuple, int] = {}
    for block in model.transformer.h:
        for p in block.parameters():
            if p.dim() == 2:
                muon_groups[tuple(p.shape)] = muon_groups.get(tuple(p.shape), 0) + p.numel()
    del model
    total = counts["total"]
    n_tok = device_batch_size * cfg.sequence_len
    d, vocab = cfg.n_embd, cfg.vocab_size
    out = {
        "params": 4 * total,
        "grads": 4 * total,
        "optimizer_state": 8 * (counts["wte"] + counts["lm_head"] + counts["scalars"]) + 4 * counts["transformer_matrices"],
        "weight_copies": (compute_bytes * (counts["transformer_matrices"] + counts["lm_head"]) if compute_bytes < 4 else 0),
        "activations": compute_bytes * n_tok * d * (ACT_ELEMS_PER_TOKEN_DIM_LAYER * cfg.n_layer + 4),
    }
    if lm_ce_backend == "baseline":
        copies = 2 * compute_bytes if lm_ce_kernel == "triton" else (compute_bytes if compiled else 16)
        out["lm_head_loss"] = n_tok * vocab * copies
    else:
        chunk = min(lm_ce_chunk_size, n_tok)
        out["lm_head_loss"] = 4 * vocab * d + compute_bytes * n_tok * d + chunk * vocab * (2 * compute_bytes if compiled else 12)
    step_peak = sum(out.values())
    # Optimizer step: activations are gone; Muon stacks the largest same-shape group (~4 fp32 copies).
    opt_peak = out["params"] + out["grads"] + out["optimizer_state"] + 16 * max(muon_groups.values(), default=0)
    out["peak"] = max(step_peak, opt_peak)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


# ---------------------------------------------------------------------------------------------
# --dry-run


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def dry_run_report(args: argparse.Namespace, sources: dict, device_type: str, world_size: int) -> tuple[str, list[str]]:
    """Everything a run would decide, without a device, data or weights. -> (report, problems).

    Reads the tokenizer (for the vocabulary size) and, when resuming, the checkpoint's meta.json
    (to check that it exists and that its model config matches); builds the model on the meta
    device only."""
    from nanochat.checkpoint import META_FILE, diff_model_config, step_dir  # noqa: PLC0415
    from nanochat.common import get_base_dir  # noqa: PLC0415
    from nanochat.tokenizer import get_tokenizer  # noqa: PLC0415
    problems = run_problems(args, world_size)
    try:
        vocab_size = get_tokenizer().get_vocab_size()
    except Exception as e:  # noqa: BLE001 (missing/corrupt tokenizer: the same one line as a real run)
        return "", problems + [str(e)]
    cfg = model_config_from_args(args, vocab_size)
    with torch.device("meta"):
        model = GPT(cfg)
    counts = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    n_scaling = scaling_params(counts)
    plan = plan_horizon(args, n_scaling, flops_per_token, vocab_size, world_size)

    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    resume_step, problem = resolve_resume(args, checkpoint_dir)
    resume_line = "resume: no (fresh start)"
    problems += horizon_problems(resume_step, plan)
    if problem:
        problems.append(problem)
    elif resume_step is not None:
        try:
            with open(os.path.join(step_dir(checkpoint_dir, resume_step), META_FILE), encoding="utf-8") as f:
                saved = json.load(f)["model_config"]
            mismatch = diff_model_config(saved, asdict(cfg))
        except (OSError, ValueError, KeyError) as e:
            mismatch = [f"cannot read its {META_FILE}: {type(e).__name__}: {e}"]
        if mismatch:
            problems.append(f"checkpoint {checkpoint_dir} step {resume_step} does not match this run: " + "; ".join(mismatch))
        resume_line = f"resume: step {resume_step} of {checkpoint_dir} (model config matches)"
    if problems:
        return "", problems

    notes = []
    if device_type == "cuda" and not torch.cuda.is_available():
        notes.append("CUDA is not visible on this machine: the real run needs it (planning only)")
    if args.fp8 and not (device_type == "cuda" and not torch.cuda.is_available()):
        from nanochat.fp8 import check_fp8_hardware  # noqa: PLC0415 (reads the capability; no allocation)
        if hw := check_fp8_hardware(device_type):
            return "", [hw]
    on_gpu = device_type in ("cuda", "")
    compute_bytes = 2 if on_gpu else 4
    compiled = not args.no_compile
    try:  # as base_train resolves it on the device (an empty --device-type means CUDA if present)
        ce_kernel = choose_ce_kernel(args.lm_ce_kernel, device_type or "cuda", args.lm_ce_backend, cfg.softcap)[0]
    except ValueError as e:
        return "", [str(e)]
    mem = estimate_memory(cfg, args.device_batch_size, compute_bytes=compute_bytes, compiled=compiled,
                          lm_ce_backend=args.lm_ce_backend, lm_ce_chunk_size=args.lm_ce_chunk_size,
                          lm_ce_kernel=ce_kernel)

    width = max(len(k) for k in vars(args)) + 2
    lines = ["dry run: flags validated; no device, data or weights touched",
             f"resolved config ({len(vars(args))} flags; source: cli, config file{' ' + args.config if args.config else ''}, or default):"]
    for k, v in vars(args).items():
        lines.append(f"  --{k.replace('_', '-'):<{width}} {json.dumps(v)}  [{sources.get(k, 'default')}]")
    lines.append(f"model: {json.dumps(asdict(cfg))}")
    lines.append("parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items())
                 + f"; scaling params (matrices + lm_head) = {n_scaling:,}")
    lines.append(f"FLOPs per token (training): {flops_per_token:.3e}")
    auto = " (auto from the scaling rule)" if plan.auto_batch else ""
    lines.append(f"batch: {plan.total_batch_size:,} tokens per step{auto} = {args.device_batch_size} x {args.max_seq_len} "
                 f"x {world_size} ranks x {plan.grad_accum_steps} accum steps; weight decay {plan.weight_decay:.5f}")
    budget = CHINCHILLA_TOKENS_PER_PARAM * n_scaling
    if plan.time_budget and args.num_iterations <= 0:
        lines.append(f"horizon: {plan.time_budget:.0f}s of step time (steps unknown until it runs)")
        lines.append(f"token budget (Chinchilla, {CHINCHILLA_TOKENS_PER_PARAM} x scaling params): {_fmt_tokens(budget)} "
                     f"tokens; planned tokens depend on the speed")
    else:
        cap = f" (at most; --time-budget-sec={plan.time_budget:.0f}s may end it earlier)" if plan.time_budget else ""
        lines.append(f"horizon: {plan.num_iterations:,} steps x {plan.total_batch_size:,} tokens = "
                     f"{_fmt_tokens(plan.total_tokens)} tokens{cap}; {flops_per_token * plan.total_tokens:.3e} FLOPs")
        lines.append(f"token budget (Chinchilla, {CHINCHILLA_TOKENS_PER_PARAM} x {_fmt_tokens(n_scaling)} scaling params): "
                     f"{_fmt_tokens(budget)} tokens; planned {_fmt_tokens(plan.total_tokens)} = "
                     f"{plan.total_tokens / budget:.3g}x the budget ({plan.total_tokens / n_scaling:.1f} tokens/param)")
    dtype = "bf16 autocast" if compute_bytes == 2 else "fp32"
    parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items() if k != "peak")
    lines.append(f"estimated peak memory per device: {_fmt_bytes(mem['peak'])} (device batch {args.device_batch_size} x "
                 f"{args.max_seq_len}, {dtype}, {'compiled' if compiled else 'eager'}, {args.lm_ce_backend} CE"
                 f"{', ' + ce_kernel + ' loss kernel' if args.lm_ce_backend == 'baseline' else ''}): {parts}")
    lines.append(resume_line)
    for n in notes:
        lines.append(f"note: {n}")
    lines.append("dry run OK: exiting without training")
    return "\n".join(lines), []
