"""Pretrain a base model.

    python -m scripts.base_train --depth=12 --max-seq-len=1024 --device-batch-size=32 --total-batch-size=32768
    torchrun --nproc_per_node=2 -m scripts.base_train ...
    python -m scripts.base_train --device-type=cpu --depth=4 --max-seq-len=256 --device-batch-size=8 \\
        --total-batch-size=2048 --num-iterations=100 --eval-every=25 --eval-tokens=16384   # CPU, minutes

The script is wiring and reads top to bottom: args -> compute init -> tokenizer and model ->
resume -> FP8 -> compile -> horizon -> optimizer -> block schedule -> data -> loop (evaluate, save,
one train step) -> summary. Every piece lives in nanochat/ and is tested there: the flags in
config.py, the horizon in plan.py, the step in training.py, the loop state and clock in
train_state.py, the block-update schedules in schedules/.
"""
import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import atexit
import base64
import gc
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch._dynamo

from nanochat.attention import select_attention_backend
from nanochat.checkpoint import (CheckpointError, check_state_dict_keys, diff_model_config, load_checkpoint,
                                 lock_checkpoint_dir, save_checkpoint, set_aside_newer)
from nanochat.common import (UsageError, autodetect_device_type, compute_cleanup, compute_init, device_mark,
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, print0, run_provenance)
from nanochat.config import build_parser, parse_args
from nanochat.core_eval import BundleError, ensure_eval_bundle, evaluate_core, load_bundle
from nanochat.dataloader import build_eval_loader, build_train_loader, train_resume_state
from nanochat.dataset import DataError
from nanochat.debug import (GracefulStop, LossSpikeDetector, NonFiniteGuard, PhaseMemory, any_rank,
                            fault_injection_from_env)
from nanochat.ema import WeightEMA, split_ema_state
from nanochat.engine import eval_mode, sample_prompts
from nanochat.fp8 import Fp8Options, check_fp8_hardware, convert_to_fp8
from nanochat.gpt import GPT, GPTConfig, ModelRuntime, start_compile_workers
from nanochat.optim import MuonAdamW
from nanochat.plan import (dry_run_report, free_device_memory, horizon_problems, memory_check, memory_options,
                           model_config_from_args, plan_horizon, resolve_resume, run_problems, scaling_params,
                           sequences_per_rank)
from nanochat.schedules import ScheduleContext, build_schedule
from nanochat.softcap_ce import choose_kernel as choose_ce_kernel, prebuild_failed, prebuild_in_background
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train_state import StepClock, TrainState
from nanochat.training import (Batches, LRSchedule, MetricsLog, RunInfo, StepRunner, TrainingStopped, ValEvaluator,
                               summary_record)
from nanochat.usage import fail


# -----------------------------------------------------------------------------
# Setup steps too long to read inline; each is called once from main().

def load_resume(args, checkpoint_dir: str, device, rank: int, world_size: int, model: GPT) -> dict:
    """The checkpoint of --resume-from-step: model weights loaded into `model` (before compile),
    the rest returned: {"meta", "optim", "ema"}. Every mismatch with this run is one error line."""
    try:
        # Under torchrun MuonAdamW's state is sharded (each rank owns a part, nanochat/optim.py):
        # every rank loads its own file, so a resume needs the world size that saved it.
        model_state, optim_state, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                         load_optimizer=True, rank=rank, world_size=world_size)
    except CheckpointError as e:
        fail([str(e)])
    model_state, ema_state = split_ema_state(model_state)  # EMA tensors ride along in model.pt
    mismatch = diff_model_config(meta["model_config"], asdict(model.config)) + check_state_dict_keys(model_state, model)
    if mismatch:
        shown = mismatch[:8] + ([f"... and {len(mismatch) - 8} more"] if len(mismatch) > 8 else [])
        fail([f"checkpoint {checkpoint_dir} step {args.resume_from_step} does not match this run (same --depth/"
              f"--aspect-ratio/--head-dim/--max-seq-len/--window-pattern and tokenizer needed): " + "; ".join(shown)])
    model.load_state_dict(model_state, strict=True)
    print0(f"resuming from step {args.resume_from_step} of {checkpoint_dir}")
    if rank == 0:  # later checkpoints belong to the run being rewound: keep them, out of the way
        for path in set_aside_newer(checkpoint_dir, args.resume_from_step):
            print0(f"set aside {path} (newer than the resumed step; not used for --resume-latest or retention)")
    return {"meta": meta, "optim": optim_state, "ema": ema_state}


def build_optimizer(args, model: GPT, weight_decay: float, resume: dict | None) -> MuonAdamW:
    optimizer = MuonAdamW(
        model.param_groups(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                           matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
                           weight_decay=weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2)),
        active_only_stack=args.muon_active_only_stack, stack_chunk_size=args.muon_stack_chunk_size,
        # Eager on purpose: each Polar Express step is two cuBLAS GEMMs with the scale-and-add in
        # their epilogue, which a compiler cannot improve, and compiling it costs seconds in the first step.
        compile_orthogonalize=False,
    )
    if resume:
        # load_state_dict also restores the saved groups' hyper-parameters; this run's flags win
        # (identical values, as in an exact resume, change nothing).
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(resume["optim"])
        for group, hp in zip(optimizer.param_groups, fresh):
            changed = [k for k in ("initial_lr", "weight_decay", "betas", "eps") if k in hp and hp[k] != group.get(k)]
            if changed:
                print0(f"resume: optimizer group {hp.get('name')}: using this run's {', '.join(changed)} "
                       f"instead of the checkpoint's")
            group.update(hp)
    return optimizer


def build_ema(args, model: GPT, resume: dict | None) -> WeightEMA | None:
    """Weight EMA (fp32, on the device), updated after every optimizer step, used by every evaluation."""
    ema = WeightEMA(model, args.ema_decay) if args.ema_decay > 0 else None
    if ema and resume:
        if resume["ema"]:
            ema.load(resume["ema"], resume["meta"].get("ema"))
            print0(f"weight EMA restored ({ema.num_updates} updates)")
        else:
            print0("WARNING: the checkpoint has no weight EMA; it starts again from the resumed weights")
    elif resume and resume["ema"]:
        print0("note: the checkpoint's weight EMA is dropped (--ema-decay not set)")
    return ema


def compile_model(model: GPT, device_type: str) -> None:
    """Regional compilation (each block and the head separately; see nanochat/gpt.py for why)."""
    if device_type == "cpu":
        print0("note: compiling on CPU is slow to start; pass --no-compile for quick CPU runs")
    # Fail loudly instead of silently falling back to eager if something recompiles too often.
    for knob in ("recompile_limit", "cache_size_limit"):  # the name differs across torch versions
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    model.compile_regions(dynamic=False)


def find_core_bundle(args, base_dir: str, master: bool, ddp: bool) -> str | None:
    """CORE eval bundle: rank 0 finds, converts or downloads it; a missing or malformed bundle skips
    CORE with one warning line instead of stopping the run (nanochat/core_eval.py has the format)."""
    if args.core_metric_every <= 0:
        return None
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    bundle = ensure_eval_bundle(bundle_dir, log=print0) if master else None
    if ddp:
        torch.distributed.barrier()
        if not master:
            bundle = ensure_eval_bundle(bundle_dir, download=False, log=lambda *a: None)
    if bundle:
        try:
            print0(f"CORE: {len(load_bundle(bundle))} tasks from {bundle}, at most {args.core_metric_max_per_task} "
                   f"examples each")
        except BundleError as e:
            print0(f"WARNING: CORE skipped: {e}")
            return None
    return bundle


def save(runner: StepRunner, ckpt: dict, ema, spikes) -> None:
    """Checkpoint the current step atomically (--keep-last-k retention); never non-finite weights."""
    runner.settle()
    runner.check_weights_finite()
    model_state = runner.model.state_dict()
    if ema:  # fp32 EMA tensors under their own key prefix (nanochat/ema.py)
        model_state = {**model_state, **ema.state_tensors()}
    state = runner.state
    meta = {**ckpt["meta"], "step": state.step, "dataloader_states": runner.loader_states(),
            "loop_state": state.state_dict(), "schedule": runner.schedule.state_dict(),
            "ema": ema.meta() if ema else None, "auto_lr": spikes.state_dict() if spikes else None,
            "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}}
    save_checkpoint(ckpt["dir"], state.step, model_state, runner.optimizer.state_dict(), meta, rank=ckpt["rank"],
                    world_size=ckpt["world_size"], barrier=ckpt["barrier"], keep_last_k=ckpt["keep_last_k"])
    print0(f"saved checkpoint step {state.step} to {ckpt['dir']}")


def print_horizon(args, plan, num_scaling_params: int, flops_per_token: float, world_size: int) -> None:
    if plan.time_budget:
        print0(f"horizon: {plan.time_budget:.0f}s of step time (compile included)"
               + (f", at most {plan.num_iterations:,} steps" if args.num_iterations > 0 else ""))
    else:
        tokens = plan.total_tokens
        print0(f"horizon: {plan.num_iterations:,} steps x {plan.total_batch_size:,} tokens = {tokens:,} tokens "
               f"({tokens / num_scaling_params:.2f} tokens/param; {flops_per_token * tokens:.3e} FLOPs)")
        print0(f"token budget (Chinchilla, 20 x scaling params): {20 * num_scaling_params:,} tokens; planned "
               f"{tokens:,} = {tokens / (20 * num_scaling_params):.3g}x")
    print0(f"batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {plan.grad_accum_steps} "
           f"accum steps; weight decay {plan.weight_decay:.5f}")


def print_summary(runner: StepRunner, summary: dict, compiled: bool) -> None:
    state, clock, schedule = runner.state, runner.clock, runner.schedule
    steady, stats = summary["steady_tok_per_sec"], summary["step_times"]
    print0(f"done: {summary['steps_this_run']} steps | training time {clock.run_step_time:.1f}s excluding first step "
           f"({clock.compile_sec or 0:.1f}s {'incl. compile' if compiled else 'eager'}, done "
           f"{clock.launch_sec or 0:.1f}s after launch) | steady tok/s {steady:,.0f} | peak memory "
           + (f"{runner.peak_step_mem:,.0f}MiB" if runner.info.device_type == "cuda" else "n/a (cpu)") + " | min val bpb "
           + (f"{state.min_val_bpb:.4f}" if math.isfinite(state.min_val_bpb) else "n/a (no eval)"))
    if stats:
        print0(f"step times: median {stats['median_step_sec'] * 1000:.1f}ms ({stats['median_tok_per_sec']:,.0f} tok/s); "
               f"{stats['slow_steps']} steps above {stats['slow_factor']}x the median took "
               f"{stats['slow_excess_sec']:.2f}s more than median steps would have")
    if schedule.varies:
        print0(f"{schedule.name} stats: {json.dumps(summary.get(schedule.name, summary['schedule_stats']))}")
    if runner.guard.skipped or summary["lr_reductions"]:
        lr_scale = f" (LR scale x{runner.spikes.lr_scale:.4g})" if runner.spikes else ""
        print0(f"robustness: {runner.guard.skipped} non-finite steps skipped in this run ({state.nonfinite_skipped} in "
               f"total); {summary['lr_reductions']} auto LR reductions{lr_scale}")


def build_robustness(args, model: GPT, state: TrainState, meta: dict, device_type: str):
    """The non-finite guard, the loss-spike LR reduction, the per-phase memory probe and the fault
    injection test hook (nanochat/debug.py), restored from the checkpoint where they keep state."""
    guard = NonFiniteGuard(list(model.named_parameters()), debug_nan=args.debug_nan,
                           max_names=args.debug_max_nonfinite, max_skips=args.skip_nonfinite_steps)
    guard.consecutive = state.nonfinite_streak  # --skip-nonfinite-steps counts across a resume
    spikes = LossSpikeDetector(args.spike_window, args.spike_zscore, args.spike_lr_factor) if args.auto_lr_reduction else None
    if spikes and meta.get("auto_lr"):
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
    return guard, spikes, mem_probe, fault_inject


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
    if problems := run_problems(args, world_size):  # batch arithmetic, eval tokens, output paths
        fail(problems)
    try:
        ddp, rank, local_rank, world_size, device = compute_init(device_type)
        capability = torch.cuda.get_device_capability(device) if device_type == "cuda" else None
        ce_kernel, ce_reason = choose_ce_kernel(args.lm_ce_kernel, device_type, args.lm_ce_backend,
                                                GPTConfig.softcap, capability)
    except (UsageError, ValueError) as e:
        fail([str(e)])
    master, cuda = rank == 0, device_type == "cuda"
    compiled = not args.no_compile
    if cuda and compiled:
        start_compile_workers()  # they start up while the tokenizer, model and data load
    # The Triton loss kernels build in a child process meanwhile (one per machine: the cache is on
    # disk); the first step then loads them instead of building them.
    ce_prebuild = prebuild_in_background(torch.device(device)) if ce_kernel == "triton" and local_rank == 0 else None
    if args.fp8:
        if hw_problem := check_fp8_hardware(device_type):
            fail([hw_problem])
        if device_type == "cpu":
            print0("WARNING: --fp8 on CPU emulates FP8 GEMMs slowly; use it for testing only")
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    autocast_ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    provenance = run_provenance()
    print0(f"run: {json.dumps(provenance)}")
    parser = build_parser()  # every value is in the checkpoints and the metrics file; the log shows the changed ones
    print0(f"args (not at their defaults): {json.dumps({k: v for k, v in user_config.items() if v != parser.get_default(k)})}")

    # -----------------------------------------------------------------------------
    # Tokenizer and model (runtime options go in through ModelRuntime; GPTConfig is what is saved)
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device=device)
    except Exception as e:  # noqa: BLE001 (missing or damaged tokenizer files: one clear line)
        fail([f"{e}"])
    vocab_size = tokenizer.get_vocab_size()
    model_config = model_config_from_args(args, vocab_size, args.depth)  # shared with --dry-run
    attn_backend, attn_reason = select_attention_backend(device_type, args.window_pattern, compute_dtype,
                                                         head_dim=model_config.head_dim)
    # Peak-memory estimate vs the device's free memory, before any allocation: stops a batch that cannot fit, picks auto
    mem_lines, problems = memory_check(args, model_config, world_size, free_device_memory(device, ddp),
                                       memory_options(args, device_type, ce_kernel,
                                                      sequences_per_rank(args, model_config, world_size)))
    if mem_lines:
        print0(*mem_lines, sep="\n")
    if problems:
        fail(problems, code=1)
    runtime = ModelRuntime(compute_dtype=compute_dtype, attn_backend=attn_backend, lm_ce_backend=args.lm_ce_backend,
                           lm_ce_chunk_size=args.lm_ce_chunk_size, lm_ce_kernel=ce_kernel,
                           activation_checkpointing=args.activation_checkpointing)
    torch.manual_seed(args.seed)  # (after the attention backend's test call, which may draw random numbers)
    with torch.device("meta"):
        model = GPT(model_config, runtime)
    model.to_empty(device=device)
    model.init_weights()
    print0(f"model: {json.dumps(asdict(model_config))}")
    print0(f"attention backend: {attn_backend} ({attn_reason})")
    print0(f"lm-head loss: {args.lm_ce_backend}" + (f", {ce_kernel} kernel ({ce_reason})"
                                                   if args.lm_ce_backend == "baseline" else ""))
    param_counts = model.num_scaling_params()
    print0("parameters: " + ", ".join(f"{k}={v:,}" for k, v in param_counts.items()))
    flops_per_token = model.estimate_flops()
    print0(f"FLOPs per token (training): {flops_per_token:.3e}")

    # -----------------------------------------------------------------------------
    # Checkpoint directory and resume (weights load before compile)
    base_dir = get_base_dir()
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", args.model_tag or f"d{args.depth}")
    # One run per checkpoint dir: a second run with the same --model-tag stops here, naming the first's pid.
    if rank == 0:  # released (its file removed) at any exit, error exits included
        atexit.register(lock_checkpoint_dir(checkpoint_dir).release)
    resume_step, problem = resolve_resume(args, checkpoint_dir)  # --resume-from-step N or --resume-latest
    if problem:
        fail([problem])
    if resume_step is not None:
        args.resume_from_step = resume_step  # --resume-latest resolved (user_config keeps what was asked)
    resume = load_resume(args, checkpoint_dir, device, rank, world_size, model) if args.resume_from_step != -1 else None
    if resume and ddp:
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
    if compiled:
        compile_model(model, device_type)

    # -----------------------------------------------------------------------------
    # Horizon, batch size and hyper-parameter scaling (nanochat's scaling rules; shared with --dry-run)
    num_scaling_params = scaling_params(param_counts)
    plan = plan_horizon(args, num_scaling_params, flops_per_token, vocab_size, world_size)
    total_batch_size, grad_accum_steps = plan.total_batch_size, plan.grad_accum_steps
    time_budget, num_iterations = plan.time_budget, plan.num_iterations
    if plan.auto_batch:
        print0(f"auto total batch size: {total_batch_size:,} tokens")
    if problems := horizon_problems(args.resume_from_step if resume else None, plan):
        fail(problems)
    print_horizon(args, plan, num_scaling_params, flops_per_token, world_size)
    lr = LRSchedule(args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac, num_iterations, time_budget)

    # -----------------------------------------------------------------------------
    # Optimizer, weight EMA, block-update schedule
    optimizer = build_optimizer(args, model, plan.weight_decay, resume)
    ema = build_ema(args, model, resume)
    meta = resume["meta"] if resume else {}
    del resume  # the loaded tensors now live in the model, optimizer and EMA
    schedule = build_schedule(args.block_update_schedule, ScheduleContext(
        model=model, n_layer=model_config.n_layer, num_iterations=num_iterations, time_budget=time_budget,
        fp8=args.fp8, compiled=compiled, ddp=ddp, world_size=world_size, device=device, optimizer=optimizer,
        seed=args.seed, extra={"ema": ema}), args)
    schedule.load_checkpoint_meta(meta)
    print0(f"block-update schedule: {json.dumps(schedule.describe())}")

    # -----------------------------------------------------------------------------
    # Data (each rank reads world_size x grad_accum_steps streams: the rows of a step do not depend
    # on the world size; on a GPU the reading and tokenizing run in a separate process)
    try:
        consumed = train_resume_state(meta["dataloader_states"], rank, world_size, grad_accum_steps) if meta else None
    except ValueError as e:
        fail([f"checkpoint {checkpoint_dir} step {args.resume_from_step}: {e}"])
    batches = Batches(build_train_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
                                         rank=rank, world_size=world_size, grad_accum_steps=grad_accum_steps,
                                         resume_state=consumed, worker_process=cuda), consumed)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
    evaluate = ValEvaluator(lambda: build_eval_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val",
                                                      device=device, rank=rank, world_size=world_size),
                            eval_steps, token_bytes, autocast_ctx)
    core_bundle = find_core_bundle(args, base_dir, master, ddp)

    # -----------------------------------------------------------------------------
    # Loop state, clock, metrics, robustness (nanochat/debug.py)
    state = TrainState.from_checkpoint(meta) if meta else TrainState()
    if meta:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"]["cpu"])), dtype=torch.uint8))
    clock = StepClock(state, sync=torch.cuda.synchronize if cuda else (lambda: None), launch_time=t_launch,
                      mark=device_mark if cuda else None)
    # a resumed run continues its wandb run: the id rides in the checkpoints
    wandb_run = init_wandb(args.run, {**user_config, **provenance}, master, run_id=meta.get("wandb_id"))
    metrics = MetricsLog(args.metrics_file, master, wandb_run, wandb_every=args.wandb_log_every)
    metrics.write({"kind": "run", "args": user_config, "depth": args.depth, "n_layer": model_config.n_layer,
                   "schedule": args.block_update_schedule, "horizon": {**lr.describe(), "total_batch_size": total_batch_size},
                   "eval_tokens": eval_steps * args.device_batch_size * args.max_seq_len * world_size,
                   "params": param_counts, "flops_per_token": flops_per_token, "provenance": provenance})
    guard, spikes, mem_probe, fault_inject = build_robustness(args, model, state, meta, device_type)
    graceful = GracefulStop().install()  # SIGTERM/SIGINT: finish the step, save, exit 0
    runner = StepRunner(
        RunInfo(device_type=device_type, device=device, ddp=ddp, world_size=world_size,
                grad_accum_steps=grad_accum_steps, total_batch_size=total_batch_size, num_iterations=num_iterations,
                time_budget=time_budget, show_horizon=not (time_budget and args.num_iterations <= 0), compiled=compiled,
                peak_flops=get_peak_flops(torch.cuda.get_device_name(device)) if cuda else None),
        model=model, optimizer=optimizer, schedule=schedule, batches=batches, state=state, clock=clock, lr=lr,
        metrics=metrics, guard=guard, mem_probe=mem_probe, autocast_ctx=autocast_ctx, ema=ema, spikes=spikes,
        fault_inject=fault_inject, debug_nan=args.debug_nan)
    ckpt = {"dir": checkpoint_dir, "rank": rank, "world_size": world_size, "keep_last_k": args.keep_last_k,
            "barrier": torch.distributed.barrier if ddp else None,
            "meta": {"args": user_config, "model_config": asdict(model_config), "provenance": provenance,
                     "total_batch_size": total_batch_size, "num_iterations": num_iterations,
                     "wandb_id": getattr(wandb_run, "id", None)}}

    # -----------------------------------------------------------------------------
    # Loop: evaluate -> save -> one train step. Evaluations use the full model (no frozen or
    # skipped blocks), FP8 off and the EMA weights when kept, so numbers compare across runs.
    first_step = state.step
    while True:
        step = state.step
        if any_rank(graceful.requested, device, ddp):
            save(runner, ckpt, ema, spikes)
            print0(f"received {graceful.name or 'a stop signal (on another rank)'}: stopped after step {step - 1}, "
                   f"checkpoint step {step} saved; exiting (continue with --resume-latest)")
            break
        last_step = step == num_iterations or runner.budget_spent()
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            runner.settle()
            t_eval = time.time()
            with eval_mode(model, ema):
                state.record_eval(evaluate(model))
            eval_tokens = len(evaluate.batches) * args.device_batch_size * args.max_seq_len * world_size
            print0(f"step {step:05d} | val bpb {state.val_bpb:.4f} | {eval_tokens:,} tokens in {time.time() - t_eval:.1f}s")
            metrics.write({"kind": "eval", "step": step, "val_bpb": state.val_bpb, "eval_tokens": eval_tokens,
                           "train_elapsed": state.train_elapsed, "tokens": step * total_batch_size})
            metrics.wandb({"step": step, "val/bpb": state.val_bpb, "total_training_time": state.total_training_time})
        # CORE and samples have varying shapes: they run the uncompiled forward (eager=True).
        if core_bundle and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            runner.settle()
            with eval_mode(model, ema, eager=True):
                core = evaluate_core(model, tokenizer, core_bundle, device, args.core_metric_max_per_task,
                                     max_seq_len=args.max_seq_len, autocast_ctx=autocast_ctx, log=print0)
            print0(f"step {step:05d} | CORE {core['core']:.4f} | {len(core['centered'])} tasks in {core['seconds']:.1f}s")
            metrics.write({"kind": "core", "step": step, "train_elapsed": state.train_elapsed,
                           **{k: core[k] for k in ("core", "centered", "accuracy", "seconds")}})
            metrics.wandb({"step": step, "core_metric": core["core"], "total_training_time": state.total_training_time})
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            runner.settle()
            with eval_mode(model, ema, eager=True):
                for text in sample_prompts(model, tokenizer, autocast_ctx=autocast_ctx):
                    print(f"step {step:05d} | sample | {text!r}", flush=True)
        if last_step or (step > first_step and args.save_every > 0 and step % args.save_every == 0):
            save(runner, ckpt, ema, spikes)
        if last_step:
            break
        runner.train_step()
        if state.step == first_step + 1:
            # Python's cyclic GC scans the big object graph of compiled code for little gain: freeze
            # what exists after the first step and collect by hand rarely (as nanochat does), off
            # the step clock.
            runner.settle()
            if note := prebuild_failed(ce_prebuild):
                print0(f"note: {note}")
            gc.collect()
            gc.freeze()
            gc.disable()
        elif state.step % 5000 == 0:
            gc.collect()
    runner.finish_pending()

    # -----------------------------------------------------------------------------
    # Summary
    summary = summary_record(runner, args.block_update_schedule)
    print_summary(runner, summary, compiled)
    metrics.write(summary)
    metrics.close()
    compute_cleanup()


def cli() -> None:
    """`main()` with the failures a user can act on as one line, not a traceback (checkpoints untouched)."""
    try:
        main()
    except TrainingStopped as e:  # a non-finite step beyond --skip-nonfinite-steps, or non-finite weights
        print0(str(e))
        compute_cleanup()
        sys.exit(e.exit_code)
    except (DataError, CheckpointError) as e:  # an unreadable shard (names the file); a failed save
        fail([str(e)], code=1)
    except torch.OutOfMemoryError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        fail([f"out of device memory ({first}); lower --device-batch-size (the total batch stays the same, with "
              f"more accumulation steps), use --activation-checkpointing=selective or blocks (or auto, with "
              f"--device-batch-size=auto), or --lm-ce-backend=chunked; --dry-run estimates the peak"], code=1)


if __name__ == "__main__":
    cli()
