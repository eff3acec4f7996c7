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

import base64
import gc
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

from nanochat.cli import B_REF, batch_problems, fail, parse_args

# -----------------------------------------------------------------------------
# Arguments: parsed and validated before torch touches any device.
args = parse_args()
user_config = vars(args).copy()

import torch  # noqa: E402

from nanochat.checkpoint import (CheckpointError, check_state_dict_keys, diff_model_config,  # noqa: E402
                                 load_checkpoint, save_checkpoint)
from nanochat.common import (UsageError, autodetect_device_type, compute_cleanup, compute_init,  # noqa: E402
                             get_base_dir, get_dist_info, get_peak_flops, init_wandb, print0, run_provenance)
from nanochat.dataloader import build_loader  # noqa: E402
from nanochat.dynamic_suffix import DynamicSuffixConfig, DynamicSuffixController  # noqa: E402
from nanochat.evaluation import evaluate_bpb  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.optim import MuonAdamW  # noqa: E402
from nanochat.tokenizer import get_token_bytes, get_tokenizer  # noqa: E402
from nanochat.attention import select_attention_backend  # noqa: E402

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
# Compile: regional (each block and the head separately); see nanochat/gpt.py for why.
if not args.no_compile:
    if device_type == "cpu":
        print0("note: compiling on CPU is slow to start; pass --no-compile for quick CPU runs")
    import torch._dynamo
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
batch_lr_scale = (total_batch_size / B_REF) ** 0.5  # AdamW-style sqrt scaling, used for Muon too
weight_decay = args.weight_decay * (total_batch_size / B_REF) ** 0.5 * (D_REF / target_tokens)
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
else:
    num_iterations = max(1, target_tokens // total_batch_size)
total_tokens = total_batch_size * num_iterations
print0(f"horizon: {num_iterations:,} steps x {total_batch_size:,} tokens = {total_tokens:,} tokens "
       f"({total_tokens / num_scaling_params:.2f} tokens/param; {flops_per_token * total_tokens:.3e} FLOPs)")
print0(f"batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {grad_accum_steps} accum steps; "
       f"LR scale {batch_lr_scale:.4f}, weight decay {weight_decay:.5f}")

# -----------------------------------------------------------------------------
# Optimizer
optimizer = MuonAdamW(
    model.param_groups(unembedding_lr=args.unembedding_lr * batch_lr_scale, embedding_lr=args.embedding_lr * batch_lr_scale,
                       matrix_lr=args.matrix_lr * batch_lr_scale, scalar_lr=args.scalar_lr * batch_lr_scale,
                       weight_decay=weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2)),
    active_only_stack=args.muon_active_only_stack, stack_chunk_size=args.muon_stack_chunk_size,
    compile_orthogonalize=(not args.no_compile and device_type == "cuda"),
)
if resuming:
    optimizer.load_state_dict(optim_state)
    del optim_state


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
    total_training_time = loop["total_training_time"]
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"]["cpu"])), dtype=torch.uint8))
else:
    step, smooth_loss, min_val_bpb, val_bpb, total_training_time = 0, 0.0, float("inf"), None, 0.0
first_step = step
compile_sec = None
peak_step_mem = []


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
                       "total_training_time": total_training_time},
        "dynamic_suffix": dyn.state_dict() if dyn else None,
        "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
    }


barrier = torch.distributed.barrier if ddp else None
while True:
    last_step = step == num_iterations

    # --- evaluation -----------------------------------------------------------
    if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
        model.eval()
        val_loader = build_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=device,
                                  rank=rank, world_size=world_size)
        t_eval = time.time()
        val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes, autocast_ctx)
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f} | {eval_steps * args.device_batch_size * args.max_seq_len * world_size:,} tokens in {time.time() - t_eval:.1f}s")
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
    active_start = dyn.active_start(step) if dyn else 0
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
    lrm = lr_multiplier(step)
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
    mfu = f" | mfu {100 * step_flops * tok_per_sec / (peak_flops * world_size):.1f}%" if peak_flops else ""
    active = f" | active {model_config.n_layer - active_start}/{model_config.n_layer}" if dyn else ""
    done = step - first_step
    eta = f"{(num_iterations - step - 1) * total_training_time / done / 60:.1f}m" if done > 0 else "-"
    print0(f"step {step:05d}/{num_iterations} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.1f}ms | "
           f"tok/s {tok_per_sec:,.0f}{mfu}{mem}{active} | eta {eta}")
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
if dyn:
    print0(f"dynamic_suffix stats: {json.dumps(dyn.stats())}")
wandb_run.finish()
compute_cleanup()
