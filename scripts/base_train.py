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
                                 load_checkpoint, save_checkpoint, set_aside_newer)
from nanochat.common import (ScalarReader, UsageError, autodetect_device_type, compute_cleanup, compute_init,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, print0, run_provenance,
                             step_time_stats)
from nanochat.config import build_parser, parse_args, validate_args  # noqa: F401 (re-exported)
from nanochat.core_eval import BundleError, ensure_eval_bundle, evaluate_core, load_bundle
from nanochat.dataloader import build_eval_loader, build_train_loader, train_resume_state
from nanochat.dataset import DataError
from nanochat.debug import (GracefulStop, LossSpikeDetector, NonFiniteGuard, PhaseMemory, any_rank,
                            fault_injection_from_env, format_names, nonfinite_tensors)
from nanochat.dynamic_suffix import DynamicSuffixConfig, DynamicSuffixController
from nanochat.ema import WeightEMA, split_ema_state
from nanochat.engine import eval_mode, sample_prompts
from nanochat.evaluation import evaluate_bpb
from nanochat.fp8 import (Fp8Options, check_fp8_hardware, convert_to_fp8, set_fp8_weight_cache,
                          validate_fp8_options)
from nanochat.gpt import GPT, GPTConfig, start_compile_workers, validate_window_pattern
from nanochat.optim import MuonAdamW
from nanochat.plan import (dry_run_report, horizon_problems, model_config_from_args, plan_horizon, resolve_resume,
                           run_problems, scaling_params)
from nanochat.softcap_ce import KERNELS as CE_KERNELS
from nanochat.softcap_ce import choose_kernel as choose_ce_kernel, prebuild_failed, prebuild_in_background
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.usage import fail


def main():
    t_launch = time.time()
    # -----------------------------------------------------------------------------
    # Arguments: parsed and validated before anything touches a device.
    args, sources = parse_args(with_sources=True)
    user_config = vars(args).copy()
    if args.config:
        print0(f"config: {sum(s == 'config' for s in sources.values())} flag values from {args.config} "
               f"(flags on the command line override it)")

    # -----------------------------------------------------------------------------
    # Compute init
    device_type = args.device_type or autodetect_device_type()
    _, _, _, world_size = get_dist_info()
    if args.dry_run:  # plan only: the model is built on the meta device; no GPU, no data
        report, problems = dry_run_report(args, sources, device_type, world_size)
        if problems:
            fail(problems)
        print0(report)
        return
    problems = run_problems(args, world_size)  # batch arithmetic, eval tokens, output paths
    if problems:
        fail(problems)
    try:
        ddp, rank, local_rank, world_size, device = compute_init(device_type)
    except UsageError as e:
        fail([str(e)])
    master = rank == 0
    if device_type == "cuda" and not args.no_compile:
        start_compile_workers()  # they start up while the tokenizer, model and data load
    try:
        capability = torch.cuda.get_device_capability(device) if device_type == "cuda" else None
        ce_kernel, ce_reason = choose_ce_kernel(args.lm_ce_kernel, device_type, args.lm_ce_backend,
                                                GPTConfig.softcap, capability)
    except ValueError as e:
        fail([str(e)])
    # The Triton loss kernels build in a child process meanwhile (one per machine is enough: the
    # cache is on disk); the first step then loads them instead of building them.
    ce_prebuild = prebuild_in_background(torch.device(device)) if ce_kernel == "triton" and local_rank == 0 else None
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
        return model_config_from_args(args, vocab_size, depth)  # shared with --dry-run


    model_config = build_config(args.depth)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    model.compute_dtype = compute_dtype
    model.lm_ce_backend = args.lm_ce_backend
    model.lm_ce_chunk_size = args.lm_ce_chunk_size
    model.lm_ce_kernel = ce_kernel
    attn_backend, attn_reason = select_attention_backend(device_type, args.window_pattern, compute_dtype,
                                                         head_dim=model_config.head_dim)
    model.attn_backend = attn_backend
    print0(f"model: {json.dumps(asdict(model_config))}")
    print0(f"attention backend: {attn_backend} ({attn_reason})")
    print0(f"lm-head loss: {args.lm_ce_backend}" + (f", {model.lm_ce_kernel} kernel ({ce_reason})"
                                                   if args.lm_ce_backend == "baseline" else ""))
    param_counts = model.num_scaling_params()
    print0("parameters: " + ", ".join(f"{k}={v:,}" for k, v in param_counts.items()))
    flops_per_token = model.estimate_flops()
    print0(f"FLOPs per token (training): {flops_per_token:.3e}")

    # -----------------------------------------------------------------------------
    # Checkpoint directory and resume (model weights are loaded before compile)
    base_dir = get_base_dir()
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", model_tag)
    resume_step, problem = resolve_resume(args, checkpoint_dir)  # --resume-from-step N or --resume-latest
    if problem:
        fail([problem])
    if resume_step is not None:
        args.resume_from_step = resume_step  # --resume-latest resolved (user_config keeps what was asked)
    resuming = args.resume_from_step != -1
    if resuming:
        try:
            # Under torchrun MuonAdamW's state is sharded (each rank owns a part, nanochat/optim.py):
            # every rank loads its own file, so a resume needs the world size that saved it.
            model_state, optim_state, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                             load_optimizer=True, rank=rank, world_size=world_size)
        except CheckpointError as e:
            fail([str(e)])
        model_state, saved_ema_state = split_ema_state(model_state)  # EMA tensors ride along in model.pt
        mismatch = diff_model_config(meta["model_config"], asdict(model_config)) + check_state_dict_keys(model_state, model)
        if mismatch:
            shown = mismatch[:8] + ([f"... and {len(mismatch) - 8} more"] if len(mismatch) > 8 else [])
            fail([f"checkpoint {checkpoint_dir} step {args.resume_from_step} does not match this run "
                  f"(same --depth/--aspect-ratio/--head-dim/--max-seq-len/--window-pattern and tokenizer needed): " + "; ".join(shown)])
        model.load_state_dict(model_state, strict=True)
        del model_state
        print0(f"resuming from step {args.resume_from_step} of {checkpoint_dir}")
        if master:  # later checkpoints belong to the run being rewound: keep them, out of the way
            for path in set_aside_newer(checkpoint_dir, args.resume_from_step):
                print0(f"set aside {path} (newer than the resumed step; not used for --resume-latest or retention)")
        if ddp:
            torch.distributed.barrier()

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
    num_scaling_params = scaling_params(param_counts)
    plan = plan_horizon(args, num_scaling_params, flops_per_token, vocab_size, world_size)  # shared with --dry-run
    total_batch_size, grad_accum_steps, weight_decay = plan.total_batch_size, plan.grad_accum_steps, plan.weight_decay
    time_budget, num_iterations, total_tokens = plan.time_budget, plan.num_iterations, plan.total_tokens
    if plan.auto_batch:
        print0(f"auto total batch size: {total_batch_size:,} tokens")
    problems = horizon_problems(args.resume_from_step if resuming else None, plan)
    if problems:
        fail(problems)
    if time_budget:
        print0(f"horizon: {time_budget:.0f}s of step time (compile included)"
               + (f", at most {num_iterations:,} steps" if args.num_iterations > 0 else ""))
    else:
        print0(f"horizon: {num_iterations:,} steps x {total_batch_size:,} tokens = {total_tokens:,} tokens "
               f"({total_tokens / num_scaling_params:.2f} tokens/param; {flops_per_token * total_tokens:.3e} FLOPs)")
        print0(f"token budget (Chinchilla, 20 x scaling params): {20 * num_scaling_params:,} tokens; planned "
               f"{total_tokens:,} = {total_tokens / (20 * num_scaling_params):.3g}x")
    print0(f"batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {grad_accum_steps} accum steps; "
           f"weight decay {weight_decay:.5f}")

    # -----------------------------------------------------------------------------
    # Optimizer
    optimizer = MuonAdamW(
        model.param_groups(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                           matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
                           weight_decay=weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2)),
        active_only_stack=args.muon_active_only_stack, stack_chunk_size=args.muon_stack_chunk_size,
        # Eager on purpose: each Polar Express step is two cuBLAS GEMMs with the scale-and-add in
        # their epilogue, which a compiler cannot improve. Measured on the H100 (same job, d12):
        # eager 67.50 ms/step vs compiled 68.53 ms, and compiling cost 7 s in the cold first step.
        compile_orthogonalize=False,
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]  # every model parameter once
    if resuming:
        # load_state_dict would also restore the saved groups' hyper-parameters; this run's flags win
        # (identical values, as in an exact resume, change nothing).
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(optim_state)
        for group, hp in zip(optimizer.param_groups, fresh):
            changed = [k for k in ("initial_lr", "weight_decay", "betas", "eps") if k in hp and hp[k] != group.get(k)]
            if changed:
                print0(f"resume: optimizer group {hp.get('name')}: using this run's {', '.join(changed)} "
                       f"instead of the checkpoint's")
            group.update(hp)
        del optim_state

    # Weight EMA (fp32, on the device): updated after every optimizer step, used by every evaluation.
    ema = WeightEMA(model, args.ema_decay) if args.ema_decay > 0 else None
    if ema and resuming:
        if saved_ema_state:
            ema.load(saved_ema_state, meta.get("ema"))
            print0(f"weight EMA restored ({ema.num_updates} updates)")
        else:
            print0("WARNING: the checkpoint has no weight EMA; it starts again from the resumed weights")
    elif resuming and saved_ema_state:
        print0("note: the checkpoint's weight EMA is dropped (--ema-decay not set)")
    if resuming:
        del saved_ema_state


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
    # The split is read as world_size x grad_accum_steps streams, one batch of each per step, so a
    # step trains on the same rows at any world size (nanochat/dataloader.py, build_train_loader).
    # On a GPU the reading and tokenizing run in a separate process, off this process's GIL.
    try:
        consumed_state = train_resume_state(meta["dataloader_states"], rank, world_size, grad_accum_steps) \
            if resuming else None
    except ValueError as e:
        fail([f"checkpoint {checkpoint_dir} step {args.resume_from_step}: {e}"])
    train_loader = build_train_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
                                      rank=rank, world_size=world_size, grad_accum_steps=grad_accum_steps,
                                      resume_state=consumed_state, worker_process=device_type == "cuda")
    x, y, loader_state = next(train_loader)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
    # CORE eval bundle: rank 0 finds, converts or downloads it; a missing or malformed bundle skips
    # CORE with one warning line instead of stopping the run (nanochat/core_eval.py has the format).
    core_bundle = None
    if args.core_metric_every > 0:
        bundle_dir = os.path.join(base_dir, "eval_bundle")
        if master:
            core_bundle = ensure_eval_bundle(bundle_dir, log=print0)
        if ddp:
            torch.distributed.barrier()
            if not master:
                core_bundle = ensure_eval_bundle(bundle_dir, download=False, log=lambda *a: None)
        if core_bundle:
            try:
                print0(f"CORE: {len(load_bundle(core_bundle))} tasks from {core_bundle}, "
                       f"at most {args.core_metric_max_per_task} examples each")
            except BundleError as e:
                print0(f"WARNING: CORE skipped: {e}")
                core_bundle = None

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
    compile_sec = launch_sec = None
    # The step clock runs from one loss read to the next, without a device sync in between. A
    # step's loss is normally read one step late, after the next step's work is queued: the host
    # then waits for step N's backward with step N's optimizer and all of step N+1 still queued, so
    # a host hiccup (a slow print, the OS) shorter than a step never leaves the GPU idle. Reading
    # step N's loss right after its optimizer was queued left only the optimizer (~6 ms at d12) to
    # hide the logging, the next launch and any hiccup (throughput.md section 11). The
    # optimizer skips a non-finite step on the device, so reading late never lets a NaN in.
    # `t_mark` is the last loss read (None: the clock is stopped, e.g. for an evaluation; see
    # settle()); `pending` is the step whose loss has not been read yet.
    t_mark = None
    loss_readers = (ScalarReader(device), ScalarReader(device))  # steps N and N+1 in flight
    pending = None
    peak_step_mem = 0.0  # MiB, the largest per-step peak of this process
    run_step_time = 0.0  # this process's steps after its first (with settle()'s tails): steady tok/s and ETA
    step_times: list[float] = []  # those steps' intervals: their count, the median and the slow steps
    metrics = open(args.metrics_file, "a", encoding="utf-8") if (args.metrics_file and master) else None

    def log_metrics(record: dict) -> None:
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def gather_loader_states() -> list:
        """Each rank reads its own data streams, so every rank's loader position is saved."""
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
            "ema": ema.meta() if ema else None,
            "auto_lr": spikes.state_dict() if spikes else None,
            "nonfinite_skipped": skipped_before + guard.skipped,
            "nonfinite_streak": guard.consecutive,  # so --skip-nonfinite-steps counts across a resume
            "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
        }

    def budget_spent() -> bool:
        """Rank 0's clock is every rank's clock (called once per step): all ranks stop on the same
        step and use the same time-based LR and dynamic-suffix freeze start, so weights stay equal."""
        nonlocal train_elapsed
        if not time_budget:
            return False
        if ddp:
            clock = torch.tensor(train_elapsed, dtype=torch.float64, device=device)
            torch.distributed.broadcast(clock, 0)
            train_elapsed = clock.item()
        return train_elapsed >= time_budget

    barrier = torch.distributed.barrier if ddp else None

    def settle() -> None:
        """Stop the step clock: wait for the last step's queued work (its optimizer runs after the
        loss read that ended its interval) and book that time to the same total as the step, so
        totals and steady tok/s count every second of device work, before anything else (an
        evaluation, a checkpoint) uses the GPU."""
        nonlocal t_mark, train_elapsed, total_training_time, run_step_time, compile_sec
        finish_pending()
        if t_mark is None:
            return
        synchronize()
        extra = time.time() - t_mark
        t_mark = None
        train_elapsed += extra
        if step == first_step + 1 and compile_sec is not None:  # the last step was the first (compiling) one
            compile_sec += extra
        else:
            total_training_time += extra
            run_step_time += extra

    def save_now() -> None:
        """Checkpoint `step` atomically (--keep-last-k retention). Weights holding NaN/Inf are never
        saved: the run stops (exit 1) so that the latest checkpoint stays a good one."""
        settle()
        bad = nonfinite_tensors(list(model.named_parameters()))  # one fused reduction + sync per save
        if bad:
            print0(f"step {step:05d} | not saving a checkpoint: non-finite parameters ({len(bad)}): "
                   f"{format_names(bad, args.debug_max_nonfinite)}. The last saved checkpoint is untouched.")
            compute_cleanup()
            sys.exit(1)
        model_state = model.state_dict()
        if ema:  # fp32 EMA tensors under their own key prefix (nanochat/ema.py)
            model_state = {**model_state, **ema.state_tensors()}
        save_checkpoint(checkpoint_dir, step, model_state, optimizer.state_dict(),
                        checkpoint_meta(gather_loader_states()),
                        rank=rank, world_size=world_size, barrier=barrier, keep_last_k=args.keep_last_k)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    # -----------------------------------------------------------------------------
    # Robustness and debugging (nanochat/debug.py)
    guard = NonFiniteGuard(list(model.named_parameters()), debug_nan=args.debug_nan,
                           max_names=args.debug_max_nonfinite, max_skips=args.skip_nonfinite_steps)
    skipped_before = meta.get("nonfinite_skipped", 0) if resuming else 0
    if resuming:
        guard.consecutive = meta.get("nonfinite_streak", 0)
    spikes = LossSpikeDetector(args.spike_window, args.spike_zscore, args.spike_lr_factor) if args.auto_lr_reduction else None
    if spikes and resuming and meta.get("auto_lr"):
        spikes.load_state_dict(meta["auto_lr"])
    mem_probe = PhaseMemory(args.debug_mem_every, device_type)
    if msg := PhaseMemory.unavailable_message(args.debug_mem_every, device_type):
        print0(msg)
    if args.debug_anomaly:
        print0("WARNING: --debug-anomaly: autograd anomaly detection makes every step several times slower; "
               "use it to find the op that makes a NaN, not for training")
        torch.autograd.set_detect_anomaly(True)
    try:
        fault_inject = fault_injection_from_env()  # test hook, {} unless NANOCHAT_FAULT_INJECT is set
    except ValueError as e:
        fail([str(e)])
    if fault_inject:
        print0(f"fault injection: loss multipliers by step {fault_inject}")
    graceful = GracefulStop().install()  # SIGTERM/SIGINT: finish the step, save, exit 0

    def bad_step(k: int, problem: str, loss: float) -> None:
        """Step k was not finite and never changed the weights (its optimizer update was not made,
        or was skipped on the device): count it (--skip-nonfinite-steps) or stop with the last
        checkpoint intact (exit 1)."""
        nonlocal train_elapsed, smooth_loss, t_mark
        if guard.on_bad_step():
            model.zero_grad(set_to_none=True)
            now = time.time()
            train_elapsed += now - t_mark
            t_mark = now
            if k > 0:  # feed the EMA its own debiased value, so the debiasing by step count stays exact
                smooth_loss = 0.9 * smooth_loss + 0.1 * smooth_loss / (1 - 0.9 ** k)
            print0(f"step {k:05d} | {problem} | step skipped: no optimizer update ({guard.consecutive} in a row, "
                   f"limit {args.skip_nonfinite_steps}; {skipped_before + guard.skipped} skipped in total)")
            log_metrics({"kind": "skip", "step": k, "loss": loss, "problem": problem,
                         "skipped_total": skipped_before + guard.skipped})
            return
        limit = f" ({guard.consecutive} in a row, --skip-nonfinite-steps={args.skip_nonfinite_steps})" \
            if args.skip_nonfinite_steps > 0 else ""
        print0(f"step {k:05d} | {problem}; stopping without its optimizer update{limit}. "
               f"The last saved checkpoint is untouched.")
        compute_cleanup()
        sys.exit(1)

    def log_step(rec: dict, train_loss: float) -> None:
        """Close step rec['step'] on the clock (its loss was just read) and print/record it."""
        nonlocal t_mark, train_elapsed, compile_sec, launch_sec, total_training_time, run_step_time
        nonlocal peak_step_mem, smooth_loss
        k, active_start, lrm = rec["step"], rec["active_start"], rec["lrm"]
        now = time.time()
        dt = now - t_mark
        t_mark = now
        train_elapsed += dt
        if k == first_step:
            compile_sec = dt
            launch_sec = now - t_launch  # setup, any evaluation at this step, and the first step
        else:
            total_training_time += dt
            run_step_time += dt
            step_times.append(dt)
        step_mem = rec["mem"]
        peak_step_mem = max(peak_step_mem, step_mem)
        mem = f" | mem {step_mem:,.0f}MiB" if device_type == "cuda" else ""
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (k + 1))
        tok_per_sec = total_batch_size / dt
        # MFU counts the work done: a frozen prefix does forward-only FLOPs.
        if active_start not in flops_by_start:  # walks the parameters: once per active_start, not per step
            flops_by_start[active_start] = model.estimate_flops(active_start)
        mfu_value = 100 * flops_by_start[active_start] * tok_per_sec / (peak_flops * world_size) if peak_flops else None
        mfu = f" | mfu {mfu_value:.1f}%" if mfu_value is not None else ""
        active = f" | active {model_config.n_layer - active_start}/{model_config.n_layer}" if dyn else ""
        if time_budget:
            eta = f"{max(0.0, time_budget - train_elapsed) / 60:.1f}m of budget"
        else:
            eta = f"{(num_iterations - k - 1) * run_step_time / len(step_times) / 60:.1f}m" if step_times else "-"
        horizon = "" if time_budget and args.num_iterations <= 0 else f"/{num_iterations}"
        print0(f"step {k:05d}{horizon} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.1f}ms | "
               f"tok/s {tok_per_sec:,.0f}{mfu}{mem}{active} | eta {eta}")
        log_metrics({"kind": "step", "step": k, "loss": train_loss, "loss_ema": debiased, "lrm": lrm, "dt": dt,
                     "tok_per_sec": tok_per_sec, "mfu": mfu_value, "step_peak_mib": step_mem if device_type == "cuda" else None,
                     "active_layers": model_config.n_layer - active_start, "train_elapsed": train_elapsed,
                     "tokens": (k + 1) * total_batch_size})
        for line in rec["lines"]:  # made when the step ran (the dynamic_suffix and memory lines)
            print0(line)
        if k % 100 == 0:
            wandb_run.log({"step": k, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})

    def finish_pending() -> None:
        """Read the pending step's loss (one step late, see `pending`) and close it."""
        nonlocal pending
        if pending is None:
            return
        rec, pending = pending, None
        train_loss = rec["reader"].result()
        if problem := guard.check_before_step(train_loss):  # its optimizer step was skipped on the device
            bad_step(rec["step"], problem, train_loss)
            return
        guard.on_good_step()
        log_step(rec, train_loss)

    val_batches = None  # the evaluation's (x, y) batches, read at the first evaluation
    frozen_fp8 = None  # the active_start whose frozen-prefix FP8 weight caches are live
    flops_by_start = {0: flops_per_token}  # training FLOPs per token by active_start (for MFU)
    while True:
        if any_rank(graceful.requested, device, ddp):
            save_now()
            print0(f"received {graceful.name or 'a stop signal (on another rank)'}: stopped after step {step - 1}, "
                   f"checkpoint step {step} saved; exiting (continue with --resume-latest)")
            break
        last_step = step == num_iterations or budget_spent()

        # --- evaluation: full model (active_start=0), FP8 off, EMA weights when --ema-decay is set,
        # so the numbers are comparable across runs and schedules ---------------------
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            settle()
            t_eval = time.time()
            if val_batches is None:
                # Every evaluation reads the same rows: tokenize them once and keep them on the device
                # (16 bytes per token; 8 MiB at 524,288 tokens). A loader made per evaluation kept
                # tokenizing ahead in its thread after the evaluation, and that thread's GIL use made
                # the next training steps 150-250 ms instead of 70 (H100, d12).
                val_loader = build_eval_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val",
                                               device=device, rank=rank, world_size=world_size)
                val_batches = [next(val_loader)[:2] for _ in range(eval_steps)]
                val_loader.close()
            with eval_mode(model, ema):
                val_bpb = evaluate_bpb(model, iter(val_batches), eval_steps, token_bytes, autocast_ctx)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f} | {eval_steps * args.device_batch_size * args.max_seq_len * world_size:,} tokens in {time.time() - t_eval:.1f}s")
            log_metrics({"kind": "eval", "step": step, "val_bpb": val_bpb, "train_elapsed": train_elapsed,
                         "tokens": step * total_batch_size})
            wandb_run.log({"step": step, "val/bpb": val_bpb, "total_training_time": total_training_time})

        # CORE and samples have varying shapes: they run the uncompiled forward (eager=True).
        if core_bundle and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            settle()
            with eval_mode(model, ema, eager=True):
                core = evaluate_core(model, tokenizer, core_bundle, device, args.core_metric_max_per_task,
                                     max_seq_len=args.max_seq_len, autocast_ctx=autocast_ctx)
            print0(f"step {step:05d} | CORE {core['core']:.4f} | {len(core['centered'])} tasks in {core['seconds']:.1f}s")
            log_metrics({"kind": "core", "step": step, "core": core["core"], "centered": core["centered"],
                         "accuracy": core["accuracy"], "seconds": core["seconds"], "train_elapsed": train_elapsed})
            wandb_run.log({"step": step, "core_metric": core["core"], "total_training_time": total_training_time})

        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            settle()
            with eval_mode(model, ema, eager=True):
                for text in sample_prompts(model, tokenizer, autocast_ctx=autocast_ctx):
                    print(f"step {step:05d} | sample | {text!r}", flush=True)

        # --- checkpoint -----------------------------------------------------------
        if last_step or (step > first_step and args.save_every > 0 and step % args.save_every == 0):
            save_now()

        if last_step:  # (save_now above has stopped the step clock)
            break

        # --- one optimizer step ---------------------------------------------------
        clock_was_stopped = t_mark is None
        if clock_was_stopped:  # the first step, or after an evaluation: start the clock on an idle device
            synchronize()
            t_mark = time.time()
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if dyn and time_budget and dyn.freeze_start == 10 ** 9 and train_elapsed >= args.dyn_freeze_start_frac * time_budget:
            dyn.freeze_start = max(step, args.dyn_warmup_steps)
        if dyn and not args.no_compile and step == first_step:
            # Compile the suffix-step graph variants (frozen prefix under no_grad, a boundary input
            # that needs no grad) inside this first, compiling step instead of stalling the first
            # suffix step later (measured: a 7 s stall on an H100 with a cold compile cache).
            # With FP8 the frozen prefix also runs from its weight caches: warm that variant too
            # (measured: a 4.5 s stall at the first suffix step on 2 H200s without it).
            warm_start = model_config.n_layer - 1
            if args.fp8:  # (the switch below turns these caches off again for this step's suffix)
                set_fp8_weight_cache(model, True, modules=list(model.transformer.h[:warm_start]))
                frozen_fp8 = warm_start
            with autocast_ctx:
                model(x, y, active_start=warm_start).backward()
            model.zero_grad(set_to_none=True)
        active_start = dyn.active_start(step) if dyn else 0
        if args.fp8 and active_start != frozen_fp8:
            # Frozen prefix weights do not change until the next full step: quantise them once per
            # freeze period instead of every micro-step (custom backend; a no-op for torchao).
            set_fp8_weight_cache(model, False)
            if active_start:
                set_fp8_weight_cache(model, True, modules=list(model.transformer.h[:active_start]))
            frozen_fp8 = active_start
        if ddp and dyn:
            # Every rank must train the same blocks (the sharded optimizer pairs tensors by position):
            # with a = each rank's active_start, all are equal iff (sum a)^2 == W * sum a^2. Checked
            # here, where the device is idle anyway, before any work of this step is queued.
            agree = torch.tensor([active_start, active_start ** 2], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(agree)
            a_sum, a_sq = agree.tolist()
            if a_sum ** 2 != world_size * a_sq:
                raise RuntimeError(f"step {step}: the ranks chose different dynamic_suffix active_start values "
                                   f"(this rank {active_start}, mean {a_sum / world_size:g}); their controllers "
                                   f"diverged, so the sharded optimizer would mix different blocks")
        loss_sum = torch.zeros((), device=device)
        mem_probe.start(step)  # --debug-mem-every: per-phase peaks (a no-op on most steps)
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y, active_start=active_start)
            mem_probe.end("forward")
            if step in fault_inject:
                loss = loss * fault_inject[step]
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
            mem_probe.end("backward")
            consumed_state = loader_state
            x, y, loader_state = next(train_loader)  # prefetch while the GPU works
        if ddp:  # the logged loss is the mean over every rank's micro-batches
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size
        loss_mean = loss_sum / grad_accum_steps
        reader = loss_readers[step % 2]
        reader.start(loss_mean)  # its copy to the host goes ahead of the optimizer's kernels

        # The loss reaches the host before the optimizer step only where a flag needs it there
        # (--debug-nan checks and names gradients, --auto-lr-reduction sets this step's LR from it).
        # Otherwise the step is queued first and skipped on the device if the loss is not finite,
        # so the GPU never idles while the optimizer is launched; the host reads the loss after.
        train_loss = None
        if args.debug_nan or spikes:
            train_loss = loss_mean.item()
            problem = guard.check_before_step(train_loss)
            if ddp and args.skip_nonfinite_steps > 0 and any_rank(problem is not None, device, ddp) and not problem:
                problem = "non-finite gradients on another rank"  # every rank must skip together
            if problem:
                bad_step(step, problem, train_loss)
                step += 1
                continue
        scores = None
        grads_reduced = False
        if dyn and dyn.is_full_step(step):
            # Relevance from the live gradients (before the optimizer step and zero_grad), on device.
            # Under torchrun from the rank-averaged gradients, as one process with accumulation
            # would measure them (the reduce the optimizer does anyway, done earlier).
            if ddp:
                optimizer.reduce_grads()
                grads_reduced = True
            scores = dyn.block_scores(model.block_params())
            if ddp:  # identical already; averaging makes sure all controllers see the same bits
                torch.distributed.all_reduce(scores)
                scores /= world_size
        lrm = lr_multiplier_time(train_elapsed / time_budget) if time_budget else lr_multiplier(step)
        if spikes:  # --auto-lr-reduction: a loss spike scales every LR down from this step on
            if line := spikes.update(step, train_loss):
                print0(line)
                log_metrics({"kind": "lr_reduction", "step": step, "loss": train_loss, "lr_scale": spikes.lr_scale})
            if ddp:  # rank 0's detector decides, so every rank uses the same learning rates
                scale = torch.tensor(spikes.lr_scale, dtype=torch.float64, device=device)
                torch.distributed.broadcast(scale, 0)
                spikes.lr_scale = scale.item()
            lrm *= spikes.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.step(reduce_grads=not grads_reduced, skip_if=~torch.isfinite(loss_mean))
        # Host work that needs no result goes here, while the GPU still runs the step (a profile
        # once showed nn.Module.zero_grad's parameter walk in the gap after the loss read; this loop
        # is ~50x cheaper).
        for p in params:
            p.grad = None
        finish_pending()  # the previous step's loss, read one step late
        rec = {"step": step, "active_start": active_start, "lrm": lrm, "reader": reader}
        # This step's loss is read now instead where something needs it before the next step: the
        # first step after the clock started (its time is the compile time), a dynamic_suffix probe
        # (the next active_start depends on it), the EMA and --debug-mem-every (both act on this
        # step's result), and --debug-nan / --auto-lr-reduction (read before the optimizer). Off
        # CUDA every op has finished when it returns: nothing to overlap, and a late read would
        # book the next step's time to this one.
        read_late = not (device_type != "cuda" or clock_was_stopped or train_loss is not None
                         or scores is not None or ema or mem_probe.active)
        if not read_late:
            if train_loss is None:
                train_loss = reader.result()  # the host sync of this step, with the optimizer queued
                if problem := guard.check_before_step(train_loss):  # the step above was a no-op
                    bad_step(step, problem, train_loss)
                    step += 1
                    continue
            guard.on_good_step()
            if ema:
                ema.update()
            mem_probe.end("optimizer")
            if after := guard.check_after_step():  # --debug-nan: the update itself went non-finite
                print0(f"step {step:05d} | {after}; stopping (an optimizer step cannot be undone). "
                       f"The last saved checkpoint is untouched.")
                compute_cleanup()
                sys.exit(1)
            if scores is not None:
                dyn.update(step, scores)  # one host sync, after the optimizer work has been queued
                for w in dyn.pop_warnings():
                    print0(f"dynamic_suffix warning: {w}")
        rec["mem"] = max(max_memory(), mem_probe.step_peak()) / 2**20
        rec["lines"] = [line for line in ((dyn.log_line(step) if dyn else None), mem_probe.report()) if line]
        if read_late:
            pending = rec
        else:
            log_step(rec, train_loss)
        step += 1
        if step == first_step + 1:
            # Python's cyclic GC scans the big object graph of compiled code for little gain; freeze
            # what exists after the first step and collect by hand rarely (as nanochat does). The
            # collection takes ~0.3 s: off the step clock (settle), as it always was.
            settle()
            if note := prebuild_failed(ce_prebuild):
                print0(f"note: {note}")
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    finish_pending()  # (settle() at the last step has done it; kept for any other way out of the loop)

    # -----------------------------------------------------------------------------
    # Summary
    steady_tok = len(step_times) * total_batch_size / run_step_time if run_step_time > 0 else float("nan")
    peak_mem = f"{peak_step_mem:,.0f}MiB" if device_type == "cuda" else "n/a (cpu)"
    print0(f"done: {step - first_step} steps | training time {run_step_time:.1f}s excluding first step "
           f"({compile_sec or 0:.1f}s incl. compile, done {launch_sec or 0:.1f}s after launch) | "
           f"steady tok/s {steady_tok:,.0f} | peak memory {peak_mem} | "
           f"min val bpb " + (f"{min_val_bpb:.4f}" if math.isfinite(min_val_bpb) else "n/a (no eval)"))
    if stats := step_time_stats(step_times, total_batch_size):
        print0(f"step times: median {stats['median_step_sec'] * 1000:.1f}ms ({stats['median_tok_per_sec']:,.0f} tok/s); "
               f"{stats['slow_steps']} steps above {stats['slow_factor']}x the median took "
               f"{stats['slow_excess_sec']:.2f}s more than median steps would have")
    summary = {"kind": "summary", "steps": step, "steps_this_run": step - first_step, "train_elapsed": train_elapsed,
               "first_step_sec": compile_sec, "launch_to_first_step_end_sec": launch_sec, "steady_tok_per_sec": steady_tok,
               "peak_mib": peak_step_mem if device_type == "cuda" else None,
               "final_val_bpb": val_bpb, "min_val_bpb": min_val_bpb if math.isfinite(min_val_bpb) else None,
               "final_loss_ema": smooth_loss / (1 - 0.9 ** step) if step > 0 else None,
               "tokens": step * total_batch_size, "schedule": args.block_update_schedule, "step_times": stats}
    if dyn:
        summary["dynamic_suffix"] = dyn.stats()
        print0(f"dynamic_suffix stats: {json.dumps(dyn.stats())}")
    summary["nonfinite_skipped"] = skipped_before + guard.skipped
    summary["lr_reductions"] = spikes.reductions if spikes else 0
    if guard.skipped or summary["lr_reductions"]:
        print0(f"robustness: {guard.skipped} non-finite steps skipped in this run ({summary['nonfinite_skipped']} in total); "
               f"{summary['lr_reductions']} auto LR reductions" + (f" (LR scale x{spikes.lr_scale:.4g})" if spikes else ""))
    log_metrics(summary)
    if metrics:
        metrics.close()
    wandb_run.finish()
    compute_cleanup()


def cli() -> None:
    """`main()` with the failures a user can act on turned into one line instead of a traceback.
    Mid-run, the last saved checkpoint is untouched; a half-done step cannot be saved."""
    try:
        main()
    except DataError as e:  # an unreadable shard (corrupt, truncated, wrong schema): names the file
        fail([str(e)])
    except torch.OutOfMemoryError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"base_train: error: out of device memory ({first}); lower --device-batch-size (the total batch "
              f"stays the same, with more accumulation steps) or use --lm-ce-backend=chunked; --dry-run "
              f"estimates the peak", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
