"""Planning a run from its validated flags: checks that need the world size or the disk, the
training horizon, the peak-memory estimate (checked against the device's free memory at every
start, and used by `--device-batch-size=auto`) and `--dry-run`'s report. (The flags themselves,
their validation and `--config` files are nanochat/config.py.)

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


def _data_horizon(args: argparse.Namespace, num_scaling_params: int, vocab_size: int) -> tuple[int, float]:
    """(target tokens of this model, the same ratio's tokens at d12), the scaling rules' reference."""
    with torch.device("meta"):  # shapes only: count d12 parameters without allocating
        d12 = GPT(model_config_from_args(args, vocab_size, depth=12))
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 10.5
    return int(ratio * num_scaling_params), ratio * scaling_params(d12.num_scaling_params())


def scaling_rule_batch(args: argparse.Namespace, num_scaling_params: int, vocab_size: int) -> int:
    """The auto total batch (tokens, a power of two) before it is rounded to whole micro-steps:
    the optimal batch grows as D^0.383 (Power Lines); 2^19 tokens is optimal at d12."""
    target_tokens, d_ref = _data_horizon(args, num_scaling_params, vocab_size)
    return 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))


def plan_horizon(args: argparse.Namespace, num_scaling_params: int, flops_per_token: float, vocab_size: int,
                 world_size: int) -> Horizon:
    """nanochat's scaling rules: auto batch size, number of steps (the first horizon flag set
    wins), weight decay scaled from the d12 reference."""
    target_tokens, d_ref = _data_horizon(args, num_scaling_params, vocab_size)
    per_step = args.device_batch_size * args.max_seq_len * world_size
    total_batch_size = args.total_batch_size
    auto = total_batch_size == -1
    if auto:
        total_batch_size = scaling_rule_batch(args, num_scaling_params, vocab_size)
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
    """Problems validate_args cannot see (it is pure and assumes nothing about the launch). With
    --device-batch-size=auto the batch arithmetic waits until the batch is chosen (`memory_check`)."""
    problems = [] if args.device_batch_size == "auto" else batch_run_problems(args, world_size)
    if args.metrics_file:
        parent = os.path.dirname(os.path.abspath(args.metrics_file))
        if not os.path.isdir(parent):
            problems.append(f"--metrics-file={args.metrics_file}: directory {parent} does not exist; create it first")
        elif os.path.isdir(args.metrics_file):
            problems.append(f"--metrics-file={args.metrics_file} is a directory; give a file name")
    return problems


def batch_run_problems(args: argparse.Namespace, world_size: int) -> list[str]:
    """The device batch against the total batch (whole accumulation steps) and one evaluation batch."""
    problems = []
    if args.total_batch_size > 0:
        problems += batch_problems(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    per_step = args.device_batch_size * args.max_seq_len * world_size
    if args.eval_every > 0 and args.eval_tokens < per_step:
        problems.append(f"--eval-tokens={args.eval_tokens} is less than one evaluation batch (device-batch-size * "
                        f"max-seq-len * world size = {per_step}); use --eval-tokens >= {per_step} or "
                        f"--eval-every=-1 to turn evaluation off")
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
        problems.append(f"{plan.steps_from} gives {plan.num_iterations:.3g} steps of {plan.total_batch_size:,} tokens, "
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
# peak memory estimate, checked against the device at every start

# Activations of the trained blocks, in values per token per model dim per layer (compute dtype):
# {recompute mode: (kept by every block until its backward, eager; the same compiled; held extra
# while one block is recomputed)}. Counted on this model with torch's MemTracker (eager, fp32;
# tests/test_memory.py checks them) and, compiled, with saved-tensor hooks on the regional graphs
# (18.1 / 10.0 / 1.04 on CPU; `none` keeps the eager 19, which reproduces the d12 anchor's peak).
# Without recompute a block keeps 19; `blocks` keeps the block's input (1) and, while one block is
# recomputed, its 19 again; `selective` keeps the six matmul outputs (q, k, v: 3; c_fc: 4; the two
# c_proj: 2), the attention output and the input (11 eager, 10 compiled) and recomputes the other
# ~8 of the block being differentiated (9 with temporaries).
RECOMPUTE_ACT_ELEMS = {"none": (19, 19, 0), "blocks": (1, 1, 19), "selective": (11, 10, 9)}
ACT_ELEMS_PER_TOKEN_DIM_LAYER = RECOMPUTE_ACT_ELEMS["none"][0]
# Bytes per element of the largest same-shape matrix group that Muon's step holds beyond the
# weights, gradients and momentum: the stacked fp32 update and the bf16 Newton-Schulz iterates.
# Measured 9.9-10.1 at d20, d26 and d28 (the optimizer-step peak of `blocks` at small batches).
MUON_TRANSIENT_BYTES = 10
# The estimate must fit the free memory with this fraction of itself to spare: what the estimate
# leaves out (cuBLAS workspaces, NCCL buffers, allocator rounding). With expandable segments (set
# by base_train) the allocator reserved at most 0.4 GiB (1.7 %) over the allocated peak within
# 1.3 GiB of a 24 GiB cap, where the estimate was 0.99-1.03x the peak.
FIT_MARGIN = 0.03
CPU_AUTO_BATCH = 32  # --device-batch-size=auto off CUDA: no free-memory number to fit against
# Device batches of at most this many tokens without recompute ran slower than selective
# recompute's larger batch on 24 GiB (d20-d28 at seq 2048: 1.02-1.12x; d12's 32k tokens: 0.95x).
SMALL_BATCH_TOKENS = 8192


def estimate_memory(cfg: GPTConfig, device_batch_size: int, *, compute_bytes: int = 2, compiled: bool = True,
                    lm_ce_backend: str = "baseline", lm_ce_chunk_size: int = 8192,
                    lm_ce_kernel: str = "inductor", recompute: str = "none",
                    sequences_per_rank: int = 0) -> dict[str, int]:
    """Estimated bytes on one device at the peak of a full (every block trains) training step.

    Static: parameters and gradients are fp32 (the model's master weights); AdamW (embedding,
    lm_head, scalars) keeps two fp32 moments, Muon (block matrices) one fp32 momentum. Under bf16
    autocast (`compute_bytes` = 2) the matmuls run on bf16 copies of the weights; a block's copies
    are held for its backward without recompute (and always eager, where autocast caches them),
    while a compiled block with recompute casts them again in its backward. Activations: per token,
    per layer, per model dim, in the compute dtype, `RECOMPUTE_ACT_ELEMS[recompute]`. The LM-head
    loss (docs/optimizations/lm_head_ce.md): baseline keeps the full (tokens x vocab) logits --
    about one compute-dtype copy when compiled, two with the Triton loss (`lm_ce_kernel="triton"`:
    logits and their gradient), about four fp32 copies at the peak when eager; chunked keeps an
    fp32 dW and dx plus (chunk x vocab) temporaries.

    The step has three candidate peaks and the estimate is the largest:
    - the head: every block's kept activations and the loss's logits. The block gradients exist
      then only when an earlier micro-step made them: `sequences_per_rank` // `device_batch_size`
      micro-steps per optimizer step; 0 (unknown) assumes more than one;
    - the blocks' backward, with what one recomputed block holds: when accumulating, every
      gradient and every kept activation; with one micro-step the blocks' gradients appear as
      their activations are freed, so the larger of the two ends (all kept activations, or all
      block gradients and the first block's activations);
    - the optimizer step: activations gone, Muon stacks the largest same-shape group and
      orthogonalises it (MUON_TRANSIENT_BYTES per element).
    Measured on an H100 capped at 24 GiB (seq 1024-4096, compiled, Triton loss; d12-d30, all three
    modes, records/2026-12-06_memory_24gib and records/2026-12-06_memory_24gib_grid). FP8 and
    frozen-prefix (dynamic_suffix) savings are not modelled: full steps peak.

    Returns the components of the head's peak, `backward_extra` (what the blocks' backward holds
    beyond them), `optimizer_peak` and 'peak'.
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
    kept_eager, kept_compiled, transient = RECOMPUTE_ACT_ELEMS[recompute]
    kept = kept_compiled if compiled else kept_eager
    accumulating = sequences_per_rank <= 0 or sequences_per_rank // device_batch_size > 1
    all_grads = 4 * total
    copied = counts["lm_head"] + (counts["transformer_matrices"] if recompute == "none" or not compiled else 0)
    out = {
        "params": 4 * total,
        "grads": all_grads if accumulating else 4 * counts["lm_head"],
        "optimizer_state": 8 * (counts["wte"] + counts["lm_head"] + counts["scalars"]) + 4 * counts["transformer_matrices"],
        "weight_copies": compute_bytes * copied if compute_bytes < 4 else 0,
        "activations": compute_bytes * n_tok * d * (kept * cfg.n_layer + 4),
    }
    if lm_ce_backend == "baseline":
        copies = 2 * compute_bytes if lm_ce_kernel == "triton" else (compute_bytes if compiled else 16)
        out["lm_head_loss"] = n_tok * vocab * copies
    else:
        chunk = min(lm_ce_chunk_size, n_tok)
        out["lm_head_loss"] = 4 * vocab * d + compute_bytes * n_tok * d + chunk * vocab * (2 * compute_bytes if compiled else 12)
    head_peak = sum(out.values())
    # Block gradients not yet counted at the head (none when accumulating) appear as the blocks'
    # activations are freed: the backward holds the larger end, all kept activations or all those
    # gradients with the first block's activations.
    block_acts = compute_bytes * n_tok * d * kept * cfg.n_layer
    late_grads = all_grads - out["grads"]
    out["backward_extra"] = (max(0, block_acts // cfg.n_layer + late_grads - block_acts)
                             + compute_bytes * n_tok * d * transient)
    backward_peak = head_peak - out["lm_head_loss"] + out["backward_extra"]
    out["optimizer_peak"] = (2 * all_grads + out["optimizer_state"]
                             + MUON_TRANSIENT_BYTES * max(muon_groups.values(), default=0))
    out["peak"] = max(head_peak, backward_peak, out["optimizer_peak"])
    return out


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def memory_options(args: argparse.Namespace, device_type: str, ce_kernel: str, sequences: int = 0) -> dict:
    """estimate_memory's keyword arguments for this run (an empty device type means CUDA);
    `sequences`: the sequences per rank of one optimizer step (`sequences_per_rank`; 0 unknown)."""
    return dict(compute_bytes=2 if device_type in ("cuda", "") else 4, compiled=not args.no_compile,
                lm_ce_backend=args.lm_ce_backend, lm_ce_chunk_size=args.lm_ce_chunk_size, lm_ce_kernel=ce_kernel,
                recompute=args.activation_checkpointing, sequences_per_rank=sequences)


def _describe(cfg: GPTConfig, batch: int, opts: dict) -> str:
    """The estimate's assumptions, in parentheses."""
    loss = f"{opts['lm_ce_backend']} CE" + (f", {opts['lm_ce_kernel']} loss kernel" if opts["lm_ce_backend"] == "baseline" else "")
    return (f"(device batch {batch} x {cfg.sequence_len}, {'bf16 autocast' if opts['compute_bytes'] == 2 else 'fp32'}, "
            f"{'compiled' if opts['compiled'] else 'eager'}, {loss}"
            + (f", recompute {opts['recompute']}" if opts["recompute"] != "none" else "") + ")")


def fits(peak: int, free_bytes: int) -> bool:
    """Whether an estimated peak fits the free memory with FIT_MARGIN to spare."""
    return peak * (1 + FIT_MARGIN) <= free_bytes


def largest_fitting(cfg: GPTConfig, candidates: list[int], opts: dict, free_bytes: int,
                    recompute: str | None = None) -> int | None:
    """The first of `candidates` (largest first) whose estimated peak fits `free_bytes`, with the
    recompute mode `recompute` instead of opts' when given; None if none does."""
    opts = opts if recompute is None else {**opts, "recompute": recompute}
    return next((b for b in candidates if fits(estimate_memory(cfg, b, **opts)["peak"], free_bytes)), None)


def sequences_per_rank(args: argparse.Namespace, cfg: GPTConfig, world_size: int) -> int:
    """Sequences one rank processes per optimizer step: --total-batch-size's, or the scaling
    rule's when it is auto (-1); 0 when --total-batch-size is not a whole number of sequences
    per rank (batch_problems reports that)."""
    per_seq = cfg.sequence_len * world_size
    if args.total_batch_size > 0:
        return args.total_batch_size // per_seq if args.total_batch_size % per_seq == 0 else 0
    with torch.device("meta"):
        n_scaling = scaling_params(GPT(cfg).num_scaling_params())
    return max(1, scaling_rule_batch(args, n_scaling, cfg.vocab_size) // per_seq)


def batch_candidates(args: argparse.Namespace, cfg: GPTConfig, world_size: int, limit: int | None = None) -> list[int]:
    """Device batches that keep the step's total batch, largest first: the powers of two up to
    the sequences per rank (and `limit`) that divide them (with an auto total, any power of two
    up to it: the total is then rounded to whole micro-steps)."""
    per_rank = sequences_per_rank(args, cfg, world_size)
    top = per_rank if limit is None else min(per_rank, limit)
    out, b = [], 1
    while b <= top:
        if args.total_batch_size <= 0 or per_rank % b == 0:
            out.append(b)
        b *= 2
    return out[::-1]


def auto_device_batch(args: argparse.Namespace, cfg: GPTConfig, world_size: int, free_bytes: int | None,
                      opts: dict) -> tuple[int | None, str]:
    """--device-batch-size=auto -> (batch, the log line saying why), or (None, the problem).

    With a free-memory number (CUDA): the largest candidate (`batch_candidates`) whose estimated
    peak fits. Without one (CPU, MPS): the sequences per rank, at most CPU_AUTO_BATCH."""
    per_rank = sequences_per_rank(args, cfg, world_size)
    candidates = batch_candidates(args, cfg, world_size)
    if not candidates:
        return None, (f"--device-batch-size=auto: --total-batch-size={args.total_batch_size} is not a whole number of "
                      f"sequences per rank (max-seq-len * world size = {cfg.sequence_len * world_size}); fix "
                      f"--total-batch-size or give --device-batch-size")
    if free_bytes is None:
        if per_rank <= CPU_AUTO_BATCH:
            batch = per_rank
        else:
            batch = next(b for b in candidates if b <= CPU_AUTO_BATCH)
        return batch, (f"device batch: auto -> {batch} (no device memory to fit against off CUDA: the batch per rank, "
                       f"{per_rank} sequences, at most {CPU_AUTO_BATCH}; --total-batch-size kept by gradient "
                       f"accumulation)")
    peaks = {b: estimate_memory(cfg, b, **opts)["peak"] for b in candidates}
    fitting = [b for b in candidates if fits(peaks[b], free_bytes)]
    if not fitting:
        return None, (f"--device-batch-size=auto: even batch 1 needs an estimated {_fmt_bytes(peaks[1])} "
                      f"{_describe(cfg, 1, opts)}, more than the device's free {_fmt_bytes(free_bytes)} with a "
                      f"{FIT_MARGIN:.0%} margin{_smaller_model_hint(opts)}")
    batch = fitting[0]
    bigger = [b for b in candidates if b > batch]
    why = f"; {bigger[-1]} would need an estimated {_fmt_bytes(peaks[bigger[-1]])}" if bigger else " (the whole batch per rank)"
    hint = ""
    if opts["recompute"] == "none" and batch <= SMALL_BATCH_TOKENS // cfg.sequence_len and bigger:
        # auto picks the batch, not the mode: a batch this small is where selective recompute's
        # larger batch measured faster (docs/optimizations/memory.md, "When recompute pays")
        if sel := largest_fitting(cfg, bigger, opts, free_bytes, recompute="selective"):
            hint = (f"; --activation-checkpointing=selective would fit batch {sel}, measured faster than a batch of "
                    f"{SMALL_BATCH_TOKENS:,} tokens or fewer without recompute (docs/optimizations/memory.md)")
    return batch, (f"device batch: auto -> {batch}, the largest power of two <= {per_rank} sequences per rank whose "
                   f"estimated peak, {_fmt_bytes(peaks[batch])}, fits the free {_fmt_bytes(free_bytes)} with a "
                   f"{FIT_MARGIN:.0%} margin{why}; --total-batch-size kept by gradient accumulation{hint}")


def _smaller_model_hint(opts: dict) -> str:
    hints = [] if opts["recompute"] == "blocks" else ["--activation-checkpointing=blocks"]
    if opts["lm_ce_backend"] == "baseline":
        hints.append("--lm-ce-backend=chunked")
    return f"; try {' or '.join(hints)}, or a smaller model" if hints else "; use a smaller model or shorter sequences"


def fit_report(args: argparse.Namespace, cfg: GPTConfig, world_size: int, free_bytes: int,
               opts: dict) -> tuple[str, str | None, int | None]:
    """The peak estimate of this run's batch next to the device's free memory.

    -> (line to log, problem or None, suggestion): the problem says the batch does not fit, names
    the largest --device-batch-size that does (the suggestion; None if none) and whether
    --activation-checkpointing=blocks would make the requested batch fit."""
    batch = args.device_batch_size
    peak = estimate_memory(cfg, batch, **opts)["peak"]
    line = (f"memory: estimated peak {_fmt_bytes(peak)} per device {_describe(cfg, batch, opts)}; free on the device "
            f"{_fmt_bytes(free_bytes)}")
    if fits(peak, free_bytes):
        return line + f": fits with a {FIT_MARGIN:.0%} margin", None, None
    suggestion = largest_fitting(cfg, batch_candidates(args, cfg, world_size, limit=batch - 1), opts, free_bytes)
    problem = (f"estimated peak memory {_fmt_bytes(peak)} per device {_describe(cfg, batch, opts)} does not fit the "
               f"device's free {_fmt_bytes(free_bytes)} with a {FIT_MARGIN:.0%} margin: ")
    if suggestion:
        problem += (f"use --device-batch-size={suggestion}, the largest that fits (--total-batch-size is kept by "
                    f"gradient accumulation; --device-batch-size=auto picks it)")
    else:
        problem += "no smaller --device-batch-size fits either"
    if opts["recompute"] != "blocks":
        with_blocks = estimate_memory(cfg, batch, **{**opts, "recompute": "blocks"})["peak"]
        verdict = "would fit" if fits(with_blocks, free_bytes) else "would not fit"
        problem += (f"; --activation-checkpointing=blocks {verdict} batch {batch} (estimated {_fmt_bytes(with_blocks)}, "
                    f"about one extra forward of the trained blocks per step)")
    if not suggestion and opts["lm_ce_backend"] == "baseline":
        problem += "; --lm-ce-backend=chunked also saves the (tokens x vocab) logits"
    return line, problem, suggestion


def free_device_memory(device, ddp: bool) -> int | None:
    """Free bytes on this rank's CUDA device, the smallest over the ranks under DDP (so every rank
    decides the same batch); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    if ddp:
        t = torch.tensor([free], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        free = int(t.item())
    return free


def auto_recompute(args: argparse.Namespace, cfg: GPTConfig, world_size: int, free_bytes: int | None,
                   opts: dict) -> tuple[str, str]:
    """--activation-checkpointing=auto -> (the mode, the log line saying why), before the device
    batch is resolved. With a fixed --device-batch-size: the cheapest mode (none, selective,
    blocks) whose estimate fits it. With --device-batch-size=auto: none when its largest fitting
    batch is the whole batch per rank or more than SMALL_BATCH_TOKENS; else selective when it fits
    a larger batch (measured faster there, docs/optimizations/memory.md); blocks only when nothing
    else fits. Off CUDA (no free-memory number): none."""
    if free_bytes is None:
        return "none", "activation checkpointing: auto -> none (no device memory to fit against off CUDA)"
    fixed = args.device_batch_size != "auto"
    candidates = [args.device_batch_size] if fixed else batch_candidates(args, cfg, world_size)
    largest = {m: largest_fitting(cfg, candidates, opts, free_bytes, recompute=m) for m in ("none", "selective", "blocks")}
    sizes = ", ".join(f"{m} {b or 'none'}" for m, b in largest.items())
    if fixed:
        mode = next((m for m, b in largest.items() if b), "none")
        why = (f"the cheapest mode whose estimated peak fits device batch {args.device_batch_size} in the free "
               f"{_fmt_bytes(free_bytes)}" if largest[mode] else "nothing fits (below)")
        return mode, f"activation checkpointing: auto -> {mode}, {why}"
    none, sel = largest["none"], largest["selective"]
    if none and (none == candidates[0] or none * cfg.sequence_len > SMALL_BATCH_TOKENS):
        mode, why = "none", f"its batch holds more than {SMALL_BATCH_TOKENS:,} tokens or the whole batch per rank"
    elif sel and sel > (none or 0):
        mode, why = "selective", (f"its larger batch measured faster than a batch of {SMALL_BATCH_TOKENS:,} tokens or "
                                  f"fewer without recompute (docs/optimizations/memory.md)")
    elif not any(largest.values()):
        mode, why = "none", "no mode fits even batch 1 (below)"
    elif none:
        mode, why = "none", "recompute fits no larger batch"
    else:
        mode, why = "blocks", "only blocks fits"
    return mode, (f"activation checkpointing: auto -> {mode}: {why}; the largest device batch that fits the free "
                  f"{_fmt_bytes(free_bytes)} per mode: {sizes}")


def memory_check(args: argparse.Namespace, cfg: GPTConfig, world_size: int, free_bytes: int | None,
                 opts: dict) -> tuple[list[str], list[str]]:
    """At every start, before the model is built: resolves --device-batch-size=auto (in `args`),
    checks the batch arithmetic the chosen batch makes, and, with a free-memory number (CUDA),
    compares the peak estimate with it. -> (lines to log, problems: the run must stop).
    --activation-checkpointing=auto is resolved (in `args`) first."""
    lines = []
    if args.activation_checkpointing == "auto":
        args.activation_checkpointing, line = auto_recompute(args, cfg, world_size, free_bytes, opts)
        opts = {**opts, "recompute": args.activation_checkpointing}
        lines.append(line)
    if args.device_batch_size == "auto":
        batch, line = auto_device_batch(args, cfg, world_size, free_bytes, opts)
        if batch is None:
            return lines, [line]
        args.device_batch_size = batch
        lines.append(line)
        if problems := batch_run_problems(args, world_size):
            return lines, problems
    if free_bytes is not None:
        line, problem, _ = fit_report(args, cfg, world_size, free_bytes, opts)
        lines.append(line)
        if problem:
            return lines, [problem]
    return lines, []


# ---------------------------------------------------------------------------------------------
# --dry-run


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def _dry_run_auto_batch(args: argparse.Namespace, cfg: GPTConfig, world_size: int, opts: dict) -> tuple[int | None, str]:
    """--device-batch-size=auto without a device: off CUDA the real rule; on CUDA the free memory
    is read only at start, so the plan uses the largest candidate and lists what each needs."""
    if opts["compute_bytes"] == 4:
        return auto_device_batch(args, cfg, world_size, None, opts)
    candidates = batch_candidates(args, cfg, world_size)
    if not candidates:
        return auto_device_batch(args, cfg, world_size, None, opts)
    needs = ", ".join(f"{b} -> {_fmt_bytes(estimate_memory(cfg, b, **opts)['peak'] * (1 + FIT_MARGIN))}"
                      for b in candidates)
    return candidates[0], (f"device batch: auto, chosen at start from the device's free memory (planned here with "
                           f"{candidates[0]}, the largest candidate); free memory each batch needs, {FIT_MARGIN:.0%} "
                           f"margin included: {needs}")


def dry_run_report(args: argparse.Namespace, sources: dict, device_type: str, world_size: int) -> tuple[str, list[str]]:
    """Everything a run would decide, without a device, data or weights. -> (report, problems).

    Reads the tokenizer (for the vocabulary size) and, when resuming, the checkpoint's meta.json
    (to check that it exists and that its model config matches); builds the model on the meta
    device only."""
    from nanochat.checkpoint import META_FILE, diff_model_config, step_dir  # noqa: PLC0415
    from nanochat.common import get_base_dir  # noqa: PLC0415
    from nanochat.tokenizer import get_tokenizer  # noqa: PLC0415
    problems = run_problems(args, world_size)
    asked = dict(vars(args))  # as given (--device-batch-size=auto is resolved below for planning)
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
    try:  # as base_train resolves it on the device (an empty --device-type means CUDA if present)
        ce_kernel = choose_ce_kernel(args.lm_ce_kernel, device_type or "cuda", args.lm_ce_backend, cfg.softcap)[0]
    except ValueError as e:
        return "", problems + [str(e)]
    opts = memory_options(args, device_type, ce_kernel, sequences_per_rank(args, cfg, world_size))
    auto_line = recompute_line = None
    if "auto" in (args.device_batch_size, args.activation_checkpointing):
        args = argparse.Namespace(**vars(args))  # resolved for planning; the caller's namespace keeps "auto"
    if args.activation_checkpointing == "auto":
        if opts["compute_bytes"] == 4:
            args.activation_checkpointing, recompute_line = auto_recompute(args, cfg, world_size, None, opts)
        else:
            args.activation_checkpointing = "none"
            recompute_line = ("activation checkpointing: auto, chosen at start from the device's free memory (planned "
                              "here with none)")
        opts = {**opts, "recompute": args.activation_checkpointing}
    if args.device_batch_size == "auto":
        args.device_batch_size, auto_line = _dry_run_auto_batch(args, cfg, world_size, opts)
        if args.device_batch_size is None:
            return "", problems + [auto_line]
        problems += batch_run_problems(args, world_size)
        if problems:
            return "", problems
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
    mem = estimate_memory(cfg, args.device_batch_size, **opts)

    width = max(len(k) for k in asked) + 2
    lines = ["dry run: flags validated; no device, data or weights touched",
             f"resolved config ({len(asked)} flags; source: cli, config file{' ' + args.config if args.config else ''}, or default):"]
    for k, v in asked.items():
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
    parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items() if k != "peak")
    lines += [x for x in (recompute_line, auto_line) if x]
    lines.append(f"estimated peak memory per device: {_fmt_bytes(mem['peak'])} {_describe(cfg, args.device_batch_size, opts)}"
                 f": {parts}")
    lines.append(resume_line)
    for n in notes:
        lines.append(f"note: {n}")
    lines.append("dry run OK: exiting without training")
    return "\n".join(lines), []
