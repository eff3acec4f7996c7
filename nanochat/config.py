"""Every flag of `python -m scripts.base_train`, as typed dataclasses: the one place where a flag's
name, type, default, choices, help text and validation live.

Each concern is a small dataclass (`RunFlags`, `ModelFlags`, ...) whose field `x_y` is the flag
`--x-y`; the field's metadata holds its help text, choices and, where it differs from the section's,
its `--help` group. `TrainConfig` holds one of each and gives typed access (`cfg.optim.matrix_lr`).
From these:

* `build_parser()` generates the argparse (same dests, so the code that reads a flat namespace
  keeps working); a `--help` snapshot test makes every new flag a deliberate diff.
* `validate_args()` / `TrainConfig.validate()` report every problem at once, one line each naming
  the flag and the fix, before anything touches a device. Bounds keep every size and product
  finite and allocatable, so an absurd value is one line, not an allocation that never returns.
* `parse_args()` reads `--config FILE` (JSON or TOML), whose values become the parser's defaults,
  so a flag given on the command line always wins and `--help` shows the merged defaults.
* `python -m nanochat.config --markdown > docs/feature_flags.md` writes the flag reference; a test
  keeps it identical to what this module generates.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from nanochat.dynamic_suffix import RELEVANCE_METRICS, DynamicSuffixConfig
from nanochat.fp8 import Fp8Options, validate_fp8_options
from nanochat.gpt import RECOMPUTE_MODES, GPTConfig, validate_window_pattern
from nanochat.schedules import REGISTRY, SCHEDULES
from nanochat.schedules.depth_growth import DepthGrowthConfig
from nanochat.schedules.layer_drop import LayerDropConfig
from nanochat.softcap_ce import KERNELS as CE_KERNELS
from nanochat.softcap_ce import choose_kernel as choose_ce_kernel
from nanochat.usage import OneLineParser, fail

# The `--help` groups, in order: short key (what sections and fields name) -> title.
GROUPS = {
    "logging": "logging",
    "runtime": "runtime",
    "model": "model architecture",
    "horizon": "training horizon (precedence: --num-iterations, then --time-budget-sec, --target-flops, "
               "--target-param-data-ratio; with a time budget, --num-iterations only caps)",
    "optimization": "optimization",
    "fp8": "fp8 training (nanochat/fp8.py)",
    "schedule": "block-update schedule (dynamic suffix; see nanochat/dynamic_suffix.py)",
    "muon": "muon optimizer",
    "loss": "lm-head cross-entropy",
    "eval": "evaluation",
    "debug": "debugging and robustness (nanochat/debug.py)",
    "output": "output",
}

# Bounds that keep every size, product and loop finite and allocatable (each is far beyond any
# real run; past them a run would fail only after minutes of building, or never start a step).
MAX_SEED = 2 ** 63 - 1
MAX_DEPTH = 1024
MAX_MODEL_DIM = 65536
MAX_SEQ_LEN = 2 ** 20
MAX_MICRO_BATCH_TOKENS = 2 ** 31  # device batch * sequence length: one micro-step's tokens
MAX_TOTAL_BATCH = 2 ** 40
MAX_GRAD_ACCUM = 10 ** 6  # the data loader keeps one stream per rank and micro-step
MAX_EVAL_TOKENS = 2 ** 34

# each schedule's config class holds its defaults; the flags take them from there (one place)
_DYN = DynamicSuffixConfig()
_DROP = LayerDropConfig()
_GROWTH = DepthGrowthConfig()


def flag(default: Any, help: str, *, choices: list | tuple | None = None, group: str | None = None,
         parse: Any = None) -> Any:
    """A dataclass field that is also a command-line flag (a bool field is a switch). `parse`
    replaces the parser's type conversion (default: the field's type), for values such as an
    integer or a word."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "parse": parse})


class _BadValue(argparse.ArgumentTypeError, ValueError):
    """A value a `parse` function rejects: argparse shows its message as is, and a --config file
    value (converted through the same function) is reported with it."""


def int_or_auto(text: str) -> int | str:
    """'auto' or an integer (as written on the command line or in a --config file)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except (TypeError, ValueError):
        raise _BadValue(f"{text!r} is neither an integer nor 'auto'") from None


def flag_name(dest: str) -> str:
    """'max_seq_len' -> '--max-seq-len'."""
    return "--" + dest.replace("_", "-")


def model_dim(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """depth * aspect_ratio rounded up to a multiple of head_dim (the model's width)."""
    return ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim


class _Flags:
    """What every section shares: built from a flat namespace, and checked by `validate`."""

    GROUP: ClassVar[str]

    @classmethod
    def from_args(cls, args: Any):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def validate(self) -> list[str]:
        return []

    def changed(self, prefix: str) -> list[str]:
        """The flags starting with `prefix` that differ from their defaults."""
        return [flag_name(f.name) for f in fields(self) if f.name.startswith(prefix) and getattr(self, f.name) != f.default]


class _Problems(list):
    """A list of problem lines with `need(cond, msg)`: msg is kept when cond fails."""

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            self.append(msg)

    def at_least(self, flags: _Flags, name: str, lo: int) -> None:
        v = getattr(flags, name)
        self.need(v >= lo, f"{flag_name(name)}={v} must be >= {lo}")

    def or_off(self, flags: _Flags, name: str, lo: int, off: str = "disabled", *, above: bool = False) -> None:
        """`--name` must be >= lo (> lo with `above`), or -1, which means `off`."""
        v = getattr(flags, name)
        self.need(v == -1 or (v > lo if above else v >= lo),
                  f"{flag_name(name)}={v} must be {'>' if above else '>='} {lo} or -1 ({off})")


@dataclass
class RunFlags(_Flags):
    """How the process runs: wandb name, device, seed, compilation, a config file, a dry run."""

    GROUP: ClassVar[str] = "runtime"
    run: str = flag("dummy", "wandb run name; 'dummy' disables wandb", group="logging")
    wandb_log_every: int = flag(100, "log every step metric to wandb each N steps (evaluations always; the "
                                     "--metrics-file has every step)", group="logging")
    device_type: str = flag("", "cuda | cpu | mps; empty = autodetect")
    seed: int = flag(42, "seed for weight init (the data order is fixed)")
    no_compile: bool = flag(False, "run eager (no torch.compile); for debugging or CPU")
    activation_checkpointing: str = flag("none", "recompute the trained blocks' activations in backward to save memory: "
                                                 "blocks keeps only each block's input (about one extra forward of the "
                                                 "trained blocks); selective keeps the matmul and attention outputs and "
                                                 "recomputes norms, rotary and activations; auto picks on CUDA at "
                                                 "start from the free memory: none where the batch fits well, "
                                                 "selective where it fits a larger batch than a small one without "
                                                 "recompute, blocks only if nothing else fits (docs/optimizations/memory.md)",
                                         choices=[*RECOMPUTE_MODES, "auto"])
    config: str = flag("", "JSON or TOML file of flag values (keys: flag names, dashes or underscores); flags given on "
                           "the command line override it (empty = none)")
    dry_run: bool = flag(False, "validate everything, print the resolved config, parameter counts, FLOPs per token, "
                                "token budget and a peak-memory estimate, then exit 0 without touching the GPU or the data")

    def validate(self) -> list[str]:
        p = _Problems()
        p.at_least(self, "wandb_log_every", 1)
        p.need(self.device_type in ("", "cuda", "cpu", "mps"),
               f"--device-type={self.device_type!r} must be cuda, cpu, mps or empty (autodetect)")
        p.need(0 <= self.seed <= MAX_SEED, f"--seed={self.seed} must be in [0, 2**63 - 1]")
        return p


@dataclass
class ModelFlags(_Flags):
    """The model's shape (nanochat/plan.py turns it into a GPTConfig)."""

    GROUP: ClassVar[str] = "model"
    depth: int = flag(20, "number of transformer layers")
    aspect_ratio: int = flag(64, "model_dim = depth * aspect_ratio (rounded up to a multiple of --head-dim)")
    head_dim: int = flag(128, "target attention head dimension")
    max_seq_len: int = flag(2048, "context length in tokens")
    window_pattern: str = flag("L", "sliding-window pattern tiled over layers: L = full context, S = half context "
                                    "(e.g. SSSL); the last layer is always L")

    def validate(self) -> list[str]:
        p = _Problems()
        p.at_least(self, "depth", 1)
        p.need(self.depth <= MAX_DEPTH, f"--depth={self.depth} must be <= {MAX_DEPTH}")
        p.at_least(self, "aspect_ratio", 1)
        p.need(self.head_dim >= 2 and self.head_dim % 2 == 0,
               f"--head-dim={self.head_dim} must be an even number >= 2 (rotary embeddings rotate pairs)")
        p.at_least(self, "max_seq_len", 2)
        p.need(self.max_seq_len <= MAX_SEQ_LEN, f"--max-seq-len={self.max_seq_len} must be <= {MAX_SEQ_LEN:,}")
        if not p and (d := model_dim(self.depth, self.aspect_ratio, self.head_dim)) > MAX_MODEL_DIM:
            p.append(f"model_dim = --depth * --aspect-ratio rounded up to a multiple of --head-dim = {d:,} must be "
                     f"<= {MAX_MODEL_DIM:,}; lower --aspect-ratio (or --depth, --head-dim)")
        if wp := validate_window_pattern(self.window_pattern):
            p.append(wp)
        return p


@dataclass
class HorizonFlags(_Flags):
    """How long to train: the first horizon flag set wins (see the group title)."""

    GROUP: ClassVar[str] = "horizon"
    num_iterations: int = flag(-1, "explicit number of optimizer steps (-1 = disabled)")
    target_flops: float = flag(-1.0, "derive num_iterations to reach this many training FLOPs (-1 = disabled)")
    target_param_data_ratio: float = flag(10.5, "derive num_iterations so that tokens = ratio * scaling params "
                                                "(Chinchilla = 20; -1 = disabled)")
    time_budget_sec: float = flag(-1.0, "train for this many seconds of step time (compile included, eval and saving "
                                        "excluded); the LR schedule follows elapsed/budget and --num-iterations, if "
                                        "given, is only a cap (-1 = disabled)")

    def validate(self) -> list[str]:
        p = _Problems()
        p.or_off(self, "num_iterations", 1)
        p.or_off(self, "target_flops", 0, above=True)
        p.or_off(self, "target_param_data_ratio", 0, above=True)
        p.need(self.num_iterations > 0 or self.target_flops > 0 or self.target_param_data_ratio > 0
               or self.time_budget_sec > 0,
               "no training horizon: set --num-iterations, --target-flops, --target-param-data-ratio or --time-budget-sec")
        p.or_off(self, "time_budget_sec", 0, above=True)
        return p


@dataclass
class OptimFlags(_Flags):
    """Batch sizes, learning rates, their schedule, and the Muon optimizer's knobs."""

    GROUP: ClassVar[str] = "optimization"
    device_batch_size: int | str = flag(32, "sequences per device per micro-step; lower it (16, 8, ...) on OOM; auto = the "
                                            "largest power of two whose estimated peak memory fits the device's free "
                                            "memory (CPU: the batch per rank, at most 32), --total-batch-size kept by "
                                            "gradient accumulation", parse=int_or_auto)
    total_batch_size: int = flag(-1, "tokens per optimizer step across all devices; must be a multiple of "
                                     "device-batch-size * max-seq-len * world size (-1 = auto from scaling laws)")
    embedding_lr: float = flag(0.3, "AdamW learning rate of the token embedding")
    unembedding_lr: float = flag(0.004, "AdamW learning rate of the lm_head")
    weight_decay: float = flag(0.2, "cautious weight decay of the Muon matrices")
    matrix_lr: float = flag(0.02, "Muon learning rate of the block matrices")
    scalar_lr: float = flag(0.5, "AdamW learning rate of the per-layer scalars (resid/x0 lambdas)")
    adam_beta1: float = flag(0.8, "AdamW beta1 for embedding/unembedding")
    adam_beta2: float = flag(0.95, "AdamW beta2 for embedding/unembedding")
    warmup_ratio: float = flag(0.0, "fraction of steps for linear LR warmup")
    warmdown_ratio: float = flag(0.4, "fraction of steps for the final linear LR warmdown")
    final_lr_frac: float = flag(0.0, "final LR as a fraction of the initial LR")
    muon_active_only_stack: bool = flag(False, "orthogonalise only matrices that have gradients (frozen blocks are "
                                               "skipped instead of stacked as zeros)", group="muon")
    muon_stack_chunk_size: int = flag(0, "orthogonalise stacked matrices in chunks of this many (the last padded): "
                                         "bounds the orthogonaliser's temporary memory and keeps its shapes fixed "
                                         "(0 = one stack per matrix shape)", group="muon")

    def validate(self) -> list[str]:
        p = _Problems()
        b = self.device_batch_size
        p.need(b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1),
               f"--device-batch-size={b} must be >= 1 or auto")
        p.or_off(self, "total_batch_size", 1, "auto")
        p.need(self.total_batch_size <= MAX_TOTAL_BATCH,
               f"--total-batch-size={self.total_batch_size} must be <= 2**40 tokens per step")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            v = getattr(self, name)
            p.need(v >= 0 and v == v, f"{flag_name(name)}={v} must be a number >= 0")
        p.need(self.weight_decay >= 0, f"--weight-decay={self.weight_decay} must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            p.need(0 <= v < 1, f"{flag_name(name)}={v} must be in [0, 1)")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            v = getattr(self, name)
            p.need(0 <= v <= 1, f"{flag_name(name)}={v} must be in [0, 1]")
        p.need(self.warmup_ratio + self.warmdown_ratio <= 1,
               f"--warmup-ratio ({self.warmup_ratio}) + --warmdown-ratio ({self.warmdown_ratio}) must not exceed 1")
        p.need(self.muon_stack_chunk_size >= 0,
               f"--muon-stack-chunk-size={self.muon_stack_chunk_size} must be >= 0 (0 = no chunking)")
        return p


@dataclass
class ResumeFlags(_Flags):
    """Which checkpoint to continue from."""

    GROUP: ClassVar[str] = "optimization"
    resume_from_step: int = flag(-1, "resume from the checkpoint of this step (-1 = start fresh)")
    resume_latest: bool = flag(False, "resume from the newest complete checkpoint of --model-tag (error if there is none)")

    def validate(self) -> list[str]:
        p = _Problems()
        p.need(self.resume_from_step == -1 or self.resume_from_step >= 0,
               f"--resume-from-step={self.resume_from_step} must be >= 0 or -1")
        p.need(not (self.resume_latest and self.resume_from_step != -1),
               f"--resume-latest and --resume-from-step={self.resume_from_step} both pick the resume step; give only one")
        return p


@dataclass
class Fp8Flags(_Flags):
    """FP8 training; `options()` is what nanochat/fp8.py takes."""

    GROUP: ClassVar[str] = "fp8"
    fp8: bool = flag(False, "train the block linears (and lm_head unless skipped) in FP8; needs CUDA capability >= 8.9 "
                            "(runs slowly on CPU for testing)")
    fp8_backend: str = flag("custom", "custom: our tensorwise Float8 linear (torch._scaled_mm via a registered custom "
                                      "op); torchao: torchao.float8", choices=["custom", "torchao"])
    fp8_recipe: str = flag("tensorwise", "scaling recipe; rowwise (more accurate, slower) needs --fp8-backend=torchao",
                           choices=["tensorwise", "rowwise"])
    fp8_min_dim: int = flag(128, "skip linears whose smaller dimension is below this")
    fp8_skip_lm_head: bool = flag(False, "keep the lm_head in bf16")
    fp8_skip_attn_qk: bool = flag(False, "keep the attention q and k projections in bf16")
    fp8_fast_accum: bool = flag(False, "custom backend: fast (lower-precision) accumulation in the forward GEMM")
    fp8_weight_grad_bf16: bool = flag(False, "custom backend: weight gradients in bf16 (default fp32)")
    fp8_no_allow_in_graph: bool = flag(False, "custom backend: let inductor trace torch._scaled_mm instead of calling "
                                              "our registered custom op")
    fp8_include_regex: str | None = flag(None, "convert only linears whose qualified name matches (re.search)")
    fp8_exclude_regex: str | None = flag(None, "never convert linears whose qualified name matches (re.search)")
    fp8_log_modules: bool = flag(False, "print every converted and skipped linear with the reason")

    def options(self) -> Fp8Options:
        return Fp8Options.from_args(self)

    def validate(self) -> list[str]:
        problems = validate_fp8_options(self.options())
        # a missing optional package is found here, before the model is built, not as an ImportError mid-setup
        if self.fp8 and self.fp8_backend == "torchao" and importlib.util.find_spec("torchao") is None:
            problems.append("--fp8-backend=torchao needs torchao, which is not installed: pip install \"torchao>=0.17\" "
                            "(or pip install -e \".[fp8]\"), or use --fp8-backend=custom")
        return problems


@dataclass
class ScheduleFlags(_Flags):
    """The block-update schedule; the `--dyn-*` defaults are `DynamicSuffixConfig`'s (one place)."""

    GROUP: ClassVar[str] = "schedule"
    block_update_schedule: str = flag("full_update", "full_update trains every block each step; dynamic_suffix trains "
                                                     "only a relevance-chosen suffix of blocks on most steps; "
                                                     "layer_drop leaves random middle blocks out early, ramping to full "
                                                     "depth; depth_growth trains every N-th block, then copies them to "
                                                     "full depth", choices=list(SCHEDULES))
    dyn_warmup_steps: int = flag(_DYN.warmup_steps, "full-update steps at the start")
    dyn_probe_every: int = flag(_DYN.probe_every, "a full-update probe step (measures relevance, re-chooses the "
                                                  "suffix) every N steps (<= 0 disables)")
    dyn_refresh_every: int = flag(_DYN.refresh_every, "a full-update refresh step every N steps, so the frozen prefix "
                                                      "never goes stale (<= 0 disables)")
    dyn_relevance_metric: str = flag(_DYN.relevance_metric, "per-block relevance: grad_ratio = |g|/(|W|+eps); "
                                                            "saliency_abs_gp = sum |g*W|", choices=list(RELEVANCE_METRICS))
    dyn_relevance_threshold: float = flag(_DYN.relevance_threshold, "train the smallest top-down suffix whose share of "
                                                                    "the relevance EMA reaches this, in (0, 1]")
    dyn_min_active_layers: int = flag(_DYN.min_active_layers, "floor on the number of trained blocks")
    dyn_max_active_layers: int = flag(_DYN.max_active_layers, "cap on the number of trained blocks (0 = no cap); the "
                                                              "log says how often it binds")
    dyn_freeze_start_step: int = flag(_DYN.freeze_start_step, "first step that may freeze a prefix (-1 = use "
                                                              "--dyn-freeze-start-frac)")
    dyn_freeze_start_frac: float = flag(_DYN.freeze_start_frac, "freeze start as a fraction of the steps (used when "
                                                                "--dyn-freeze-start-step is -1)")
    dyn_ema_decay: float = flag(_DYN.ema_decay, "decay of the per-block relevance EMA, in [0, 1)")
    dyn_eps: float = flag(_DYN.eps, "denominator guard of grad_ratio (> 0)")
    dyn_log_every: int = flag(_DYN.log_every, "print the controller's line (active suffix, cap/floor binding, "
                                              "relevance) every N steps (<= 0 disables)")

    drop_rate_start: float = flag(_DROP.rate_start, "layer_drop: probability that each middle block (all but the first "
                                                    "and last) is left out of a step at the start of the run, in [0, 1]")
    drop_full_depth_at: float = flag(_DROP.full_depth_at, "layer_drop: fraction of the horizon (time budget, else "
                                                          "--num-iterations) at which the drop rate reaches 0; every "
                                                          "later step trains every block, in (0, 1]")
    drop_mode: str = flag(_DROP.mode, "layer_drop: bernoulli drops each middle block independently; fixed drops exactly "
                                      "the expected number (rounded stochastically) as a random subset, for an even "
                                      "step time", choices=["bernoulli", "fixed"])
    growth_at: float = flag(_GROWTH.at, "depth_growth: fraction of the horizon (time budget, else --num-iterations) "
                                        "after which the shallow model grows to full depth by copying blocks, in (0, 1)")
    growth_factor: int = flag(_GROWTH.factor, "depth_growth: the shallow model trains every N-th block (0, N, 2N, ...) "
                                              "and the last; the others become copies of the nearest trained block "
                                              "below them at growth, in [2, depth-1]")

    def dynamic(self) -> DynamicSuffixConfig:
        return DynamicSuffixConfig.from_args(self)

    def validate(self, depth: int = ModelFlags.depth) -> list[str]:
        """`depth` (the model's --depth) bounds the layer counts. A schedule's own flags are
        validated by its config class (nanochat.schedules.REGISTRY); set for another schedule, they
        are an error."""
        problems = []
        for entry in REGISTRY:
            if entry.config is None:
                continue
            if self.block_update_schedule == entry.name:
                problems += entry.config.from_args(self).validate(depth)
            elif changed := self.changed(entry.flag_prefix):
                problems.append(f"{', '.join(changed)} only apply with --block-update-schedule={entry.name}")
        return problems


@dataclass
class LossFlags(_Flags):
    """How the lm-head cross-entropy is computed."""

    GROUP: ClassVar[str] = "loss"
    lm_ce_backend: str = flag("baseline", "baseline materialises the full (tokens x vocab) logits (bf16 when compiled, "
                                          "fp32 eager); chunked never does (exact grads, far less memory)",
                              choices=["baseline", "chunked"])
    lm_ce_chunk_size: int = flag(8192, "rows (tokens) per chunk of the chunked cross-entropy")
    lm_ce_kernel: str = flag("auto", "how the baseline backend turns the bf16 logits into the softcapped loss: triton "
                                     "= two Triton kernels (nanochat/softcap_ce.py: one pass each way, hardware tanh; "
                                     "CUDA only), inductor = the loss in PyTorch, compiled by torch.compile; auto = "
                                     "triton where it can run, else inductor", choices=CE_KERNELS)

    def validate(self) -> list[str]:
        p = _Problems()
        p.at_least(self, "lm_ce_chunk_size", 1)
        p.need(self.lm_ce_backend == "chunked" or self.lm_ce_chunk_size == LossFlags.lm_ce_chunk_size,
               f"--lm-ce-chunk-size={self.lm_ce_chunk_size} only applies with --lm-ce-backend=chunked")
        return p


@dataclass
class EvalFlags(_Flags):
    """Evaluation, samples, the weight EMA and checkpoint saving."""

    GROUP: ClassVar[str] = "eval"
    eval_every: int = flag(250, "evaluate val bpb every N steps and at the end (-1 = disabled)")
    eval_tokens: int = flag(40 * 524288, "tokens of the validation split per evaluation")
    core_metric_every: int = flag(-1, "evaluate the CORE metric every N steps and at the end (-1 = disabled; nanochat "
                                      "uses 2000). Needs the eval bundle in $NANOCHAT_BASE_DIR/eval_bundle (downloaded "
                                      "when online); without it CORE is skipped with a warning")
    core_metric_max_per_task: int = flag(500, "examples per CORE task (-1 = all)")
    sample_every: int = flag(-1, "print greedy samples of fixed prompts every N steps and at the end, rank 0 only "
                                 "(-1 = disabled)")
    ema_decay: float = flag(-1.0, "keep an fp32 weight EMA with this decay (e.g. 0.999), used for val bpb, CORE and "
                                  "samples and saved in checkpoints (-1 = disabled)")
    save_every: int = flag(-1, "save a checkpoint every N steps (-1 = only at the end)")
    keep_last_k: int = flag(-1, "after each save, delete all but the newest K complete checkpoints (-1 = keep all)")

    def validate(self) -> list[str]:
        p = _Problems()
        p.or_off(self, "eval_every", 1)
        p.at_least(self, "eval_tokens", 1)
        p.need(self.eval_tokens <= MAX_EVAL_TOKENS, f"--eval-tokens={self.eval_tokens} must be <= 2**34")
        p.or_off(self, "core_metric_every", 1)
        p.or_off(self, "core_metric_max_per_task", 1, "all examples")
        p.or_off(self, "sample_every", 1)
        p.need(self.ema_decay == -1 or 0 < self.ema_decay < 1,
               f"--ema-decay={self.ema_decay} must be in (0, 1), e.g. 0.999, or -1 (disabled)")
        p.or_off(self, "save_every", 1, "only at the end")
        p.or_off(self, "keep_last_k", 1, "keep all")
        return p


@dataclass
class DebugFlags(_Flags):
    """NaN/Inf checks, memory prints, skipping bad steps and loss-spike LR reduction."""

    GROUP: ClassVar[str] = "debug"
    debug_nan: bool = flag(False, "check every gradient before and every parameter after each optimizer step for "
                                  "NaN/Inf (one fused reduction and host sync each) and name the offending tensors")
    debug_anomaly: bool = flag(False, "torch.autograd anomaly detection: the backward op that made a NaN is reported "
                                      "with its forward traceback; very slow, debugging only")
    debug_max_nonfinite: int = flag(10, "name at most this many non-finite tensors")
    debug_mem_every: int = flag(-1, "print CUDA peak memory of each phase (forward, backward, optimizer) every N steps "
                                    "(-1 = disabled; CUDA only)")
    skip_nonfinite_steps: int = flag(-1, "skip a step whose loss (or, with --debug-nan, gradients) is NaN/Inf: no "
                                         "optimizer update, the batch still counts; stop (exit 1) after more than N "
                                         "such steps in a row (-1 = never skip: stop at the first)")
    auto_lr_reduction: bool = flag(False, "on a loss spike (loss more than --spike-zscore std above the mean of the last "
                                          "--spike-window losses) multiply every LR by --spike-lr-factor, at most 5 "
                                          "times; logged and checkpointed")
    spike_window: int = flag(50, "losses in the spike detector's window (>= 2)")
    spike_zscore: float = flag(6.0, "z-score above which a loss is a spike (> 0)")
    spike_lr_factor: float = flag(0.5, "LR multiplier per detected spike, in (0, 1)")

    def validate(self) -> list[str]:
        p = _Problems()
        p.at_least(self, "debug_max_nonfinite", 1)
        p.or_off(self, "debug_mem_every", 1)
        p.need(self.skip_nonfinite_steps == -1 or self.skip_nonfinite_steps >= 1,
               f"--skip-nonfinite-steps={self.skip_nonfinite_steps} must be >= 1 (bad steps in a row to skip) or -1 "
               f"(never skip)")
        p.at_least(self, "spike_window", 2)
        p.need(self.spike_zscore > 0, f"--spike-zscore={self.spike_zscore} must be > 0 (e.g. 6)")
        p.need(0 < self.spike_lr_factor < 1, f"--spike-lr-factor={self.spike_lr_factor} must be in (0, 1), e.g. 0.5")
        changed = [] if self.auto_lr_reduction else self.changed("spike_")
        p.need(not changed, f"{', '.join(changed)} only apply with --auto-lr-reduction")
        return p


@dataclass
class OutputFlags(_Flags):
    """Where the run writes: its checkpoint directory name and metrics file."""

    GROUP: ClassVar[str] = "output"
    model_tag: str | None = flag(None, "checkpoint directory name (default: d{depth})")
    metrics_file: str = flag("", "append one JSON line per step and per evaluation, and a final summary line, to this "
                                 "file (empty = off)")

    def validate(self) -> list[str]:
        p = _Problems()
        if self.model_tag is not None:  # a directory name under base_checkpoints: never a path out of it
            p.need(re.fullmatch(r"[A-Za-z0-9._-]+", self.model_tag) is not None,
                   f"--model-tag={self.model_tag!r} may only contain letters, digits, '.', '_' and '-'")
            p.need(self.model_tag not in (".", ".."), f"--model-tag={self.model_tag!r} must be a plain name, not '.' or '..'")
        return p


@dataclass
class TrainConfig:
    """All flags of base_train, one section per concern; field order is `--help` order within a group."""

    run: RunFlags = field(default_factory=RunFlags)
    model: ModelFlags = field(default_factory=ModelFlags)
    horizon: HorizonFlags = field(default_factory=HorizonFlags)
    optim: OptimFlags = field(default_factory=OptimFlags)
    resume: ResumeFlags = field(default_factory=ResumeFlags)
    fp8: Fp8Flags = field(default_factory=Fp8Flags)
    schedule: ScheduleFlags = field(default_factory=ScheduleFlags)
    loss: LossFlags = field(default_factory=LossFlags)
    eval: EvalFlags = field(default_factory=EvalFlags)
    debug: DebugFlags = field(default_factory=DebugFlags)
    output: OutputFlags = field(default_factory=OutputFlags)

    @staticmethod
    def section_types() -> list[type]:
        return [f.default_factory for f in fields(TrainConfig)]

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        """From a flat namespace (argparse's, or anything with one attribute per flag)."""
        return cls(**{f.name: f.default_factory.from_args(args) for f in fields(cls)})

    def sections(self) -> list[_Flags]:
        return [getattr(self, f.name) for f in fields(self)]

    def to_args(self) -> argparse.Namespace:
        """The flat namespace argparse would give (dest -> value), in `--help` order."""
        flat = {f.name: getattr(s, f.name) for s in self.sections() for f in fields(s)}
        return argparse.Namespace(**{dest: flat[dest] for dest in _flag_fields()})

    def validate(self) -> list[str]:
        """Every problem with the flags, each naming the flag(s) and the fix. Pure: no GPU, no I/O."""
        p = _Problems()
        for section in self.sections():
            p += section.validate(self.model.depth) if isinstance(section, ScheduleFlags) else section.validate()
        m, o = self.model, self.optim
        if m.max_seq_len >= 1 and isinstance(o.device_batch_size, int) and o.device_batch_size >= 1:
            tokens = o.device_batch_size * m.max_seq_len
            p.need(tokens <= MAX_MICRO_BATCH_TOKENS,
                   f"--device-batch-size * --max-seq-len = {o.device_batch_size} * {m.max_seq_len} = {tokens:,} tokens "
                   f"per micro-step must be <= 2**31; lower --device-batch-size")
        try:  # the device is known only after compute_init, which checks again; an empty type means CUDA if present
            choose_ce_kernel(self.loss.lm_ce_kernel, self.run.device_type or "cuda", self.loss.lm_ce_backend,
                             GPTConfig.softcap)
        except ValueError as e:
            p.append(str(e))
        for section in self.sections():  # inf passes most range checks but breaks the arithmetic (round(inf), NaN LRs)
            for f in fields(section):
                v = getattr(section, f.name)
                if _field_types(type(section))[f.name] is float and isinstance(v, float):
                    p.need(not math.isinf(v), f"{flag_name(f.name)}={v} must be a finite number")
        return p


# ---------------------------------------------------------------------------------------------
# the parser, generated from the dataclasses


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    """{field: int | float | str | bool} (`str | None` is a str flag whose default is None)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def _flag_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """{dest: (section type, field)} in `--help` order: group by group, sections and fields in order."""
    all_fields = [(cls, f) for cls in TrainConfig.section_types() for f in fields(cls)]
    return {f.name: (cls, f) for group in GROUPS for cls, f in all_fields
            if (f.metadata["group"] or cls.GROUP) == group}


def build_parser() -> argparse.ArgumentParser:
    """The argparse of base_train, one flag per dataclass field (errors are one line + see --help)."""
    p = OneLineParser(prog="python -m scripts.base_train",
                      description="Pretrain a nanochat GPT. All flags are validated before any GPU work.")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for dest, (cls, f) in _flag_fields().items():
        g = groups[f.metadata["group"] or cls.GROUP]
        kind = _field_types(cls)[dest]
        if kind is bool:
            g.add_argument(flag_name(dest), action="store_true", help=f.metadata["help"])
        else:
            g.add_argument(flag_name(dest), type=f.metadata["parse"] or kind, default=f.default, choices=f.metadata["choices"],
                           help=f.metadata["help"])
    return p


def validate_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags of a parsed namespace (see TrainConfig.validate)."""
    return TrainConfig.from_args(args).validate()


def parse_args(argv: list[str] | None = None, with_sources: bool = False):
    """Parse and validate (exit 2 on any problem). `--config FILE` values become defaults that
    flags on the command line override. With `with_sources`, also return
    {dest: 'cli' | 'config' | 'default'}."""
    args, sources, problems = parse_with_config(build_parser(), sys.argv[1:] if argv is None else argv)
    if problems:
        fail(problems)
    problems = validate_args(args)
    if problems:
        fail(problems)
    return (args, sources) if with_sources else args


def batch_problems(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> list[str]:
    """Gradient-accumulation arithmetic, with the nearest valid totals as the fix."""
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step == 0:
        accum = total_batch_size // per_step
        if accum > MAX_GRAD_ACCUM:
            return [f"--total-batch-size={total_batch_size} is {accum:,} accumulation steps of device-batch-size * "
                    f"max-seq-len * world size = {per_step} tokens; at most {MAX_GRAD_ACCUM:,}: raise "
                    f"--device-batch-size or lower --total-batch-size"]
        return []
    lo = max(per_step, (total_batch_size // per_step) * per_step)
    hi = lo + per_step
    return [f"--total-batch-size={total_batch_size} is not a multiple of device-batch-size * max-seq-len * world size "
            f"= {device_batch_size} * {max_seq_len} * {world_size} = {per_step}; use e.g. {lo} or {hi}, or change "
            f"--device-batch-size"]


# ---------------------------------------------------------------------------------------------
# --config FILE: a flat JSON or TOML table whose keys are flag names, with dashes or underscores
# and with or without the leading `--` (`max-seq-len`, `max_seq_len`). Each value is checked
# against its flag: a switch takes a boolean; a number flag takes a number (or a string, parsed as
# on the command line); choices are enforced. Unknown keys and wrong types are reported all at
# once, each naming the key.

_NOT_IN_FILE = {"config", "help"}


def _load_toml(f) -> dict | None:
    """The parsed TOML file, or None when no TOML reader is installed (Python 3.10 without tomli)."""
    try:
        import tomllib  # noqa: PLC0415 (Python >= 3.11)
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # noqa: PLC0415 (the same API, for Python 3.10)
        except ModuleNotFoundError:
            return None
    return tomllib.load(f)


def _read_config_file(path: str) -> tuple[dict | None, str | None]:
    """(table, None) or (None, problem)."""
    if not os.path.isfile(path):
        return None, f"--config={path}: file not found"
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        elif ext == ".toml":
            with open(path, "rb") as f:
                data = _load_toml(f)
            if data is None:
                return None, f"--config={path}: TOML needs Python >= 3.11 (tomllib); use a .json file"
        else:
            return None, f"--config={path}: unknown file type {ext or '(none)'!r}; use a .json or .toml file"
    except (OSError, ValueError) as e:  # json.JSONDecodeError and TOMLDecodeError are ValueErrors
        return None, f"--config={path}: cannot parse ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return None, f"--config={path}: the top level must be a table/object of flag names, got {type(data).__name__}"
    return data, None


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """'--max-seq-len' -> action, for every long option."""
    out = {}
    for a in parser._actions:
        for s in a.option_strings:
            if s.startswith("--"):
                out[s] = a
    return out


def _convert(key: str, value, action: argparse.Action, path: str) -> tuple[object, str | None]:
    """A config value as the flag's Python value, or a problem naming the key."""
    where = f"--config={path}: key {key!r}"
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            return None, f"{where} is a switch: use true or false, not {value!r}"
        return value, None
    if value is None:
        if action.default is None:
            return None, None
        return None, f"{where} may not be null"
    kind = action.type or str
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        return None, f"{where} needs a {getattr(kind, '__name__', 'value')}, not {value!r}"
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value)
        except (TypeError, ValueError):
            return None, f"{where}: {value!r} is not a valid {kind.__name__}"
    elif kind is int and not isinstance(value, int):
        return None, f"{where} needs an integer, not {value!r}"
    elif kind is float and isinstance(value, (int, float)):
        value = float(value)
    elif kind is str and not isinstance(value, str):
        return None, f"{where} needs a string, not {value!r}"
    if action.choices is not None and value not in action.choices:
        return None, f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}"
    return value, None


def config_file_defaults(parser: argparse.ArgumentParser, path: str) -> tuple[dict, list[str]]:
    """({dest: value}, problems) for the flags set in config file `path`."""
    data, problem = _read_config_file(path)
    if problem:
        return {}, [problem]
    actions = _flag_actions(parser)
    values, problems, seen = {}, [], {}
    for key, value in data.items():
        name = "--" + str(key).lstrip("-").replace("_", "-")
        action = actions.get(name)
        if action is None or action.dest in _NOT_IN_FILE:
            if isinstance(value, dict):
                hint = " (nested tables are not supported: put the flags at the top level)"
            else:
                close = difflib.get_close_matches(name, list(actions), n=1)
                hint = f" (did you mean {close[0][2:]!r}?)" if close else ""
            problems.append(f"--config={path}: unknown key {key!r}{hint}")
            continue
        if action.dest in seen:
            problems.append(f"--config={path}: keys {seen[action.dest]!r} and {key!r} both set {name}")
            continue
        seen[action.dest] = key
        converted, problem = _convert(str(key), value, action, path)
        if problem:
            problems.append(problem)
        else:
            values[action.dest] = converted
    return values, problems


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests that `argv` sets explicitly (parsed again with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        parser._defaults = {}
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d
        parser._defaults = saved_defaults


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict, list[str]]:
    """Parse `argv`, with `--config FILE` values as defaults. -> (args, sources, problems).

    `sources` maps each dest to 'cli', 'config' or 'default'. With problems in the file, `args`
    is None (the caller reports them and exits 2)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    file_values: dict = {}
    if known.config:
        file_values, problems = config_file_defaults(parser, known.config)
        if problems:
            return None, {}, problems
        parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    cli = explicit_dests(parser, argv)
    sources = {k: "cli" if k in cli else "config" if k in file_values else "default" for k in vars(args)}
    return args, sources, []


# ---------------------------------------------------------------------------------------------
# docs/feature_flags.md, generated from the parser and the runner's mapping lines


def markdown_flag_table(parser: argparse.ArgumentParser) -> str:
    """The flag reference of docs/feature_flags.md, generated from the parser itself."""
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            name = a.option_strings[-1]
            if a.choices:
                name += " {" + ",".join(map(str, a.choices)) + "}"
            default = "off" if a.nargs == 0 else repr(a.default) if isinstance(a.default, str) else str(a.default)
            help_text = (a.help or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {default} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


_RUNNER_LINE = re.compile(r"^(opt|flag|int_opt|num_opt|choice_opt) ([A-Z][A-Z0-9_]*) (--[a-z0-9-]+)", re.M)


def runner_env_mapping(runner_text: str) -> list[tuple[str, str]]:
    """(ENV_VAR, --flag) pairs declared in runs/speedrun_small.sh (its `opt ENV --flag` lines)."""
    return [(m.group(2), m.group(3)) for m in _RUNNER_LINE.finditer(runner_text)]


def feature_flags_doc(runner_text: str) -> str:
    """The whole of docs/feature_flags.md: generated, never hand-edited (a test compares)."""
    env_rows = "\n".join(f"| `{env}` | `{name}` |" for env, name in runner_env_mapping(runner_text))
    return f"""# Flags and environment variables

Generated by `python -m nanochat.config --markdown > docs/feature_flags.md` from the dataclasses
of `nanochat/config.py` (each field is a flag: its name, default, choices and help) and the mapping
lines of `runs/speedrun_small.sh`; `tests/test_config.py` fails when this file is out of date.
Conventions: `-1` disables (or means auto where stated); every flag problem is reported at once,
before any GPU work, with exit code 2.

## `scripts/base_train.py`

{markdown_flag_table(build_parser())}
## `runs/speedrun_small.sh` environment variables

Each variable sets one flag; unset variables keep the defaults (the runner picks a CPU-sized config
when no GPU is present). `BASE_TRAIN_EXTRA_ARGS` is appended last, so its flags win.

| variable | flag |
|---|---|
{env_rows}

Runner controls: `SKIP_SETUP=1` (use the existing environment), `PREPARE_DATA=auto|0|1` (download
shards / train the tokenizer when missing, never, always), `NUM_SHARDS`, `DATASET`
(`climbmix` or `fineweb-edu`), `TOK_VOCAB_SIZE`, `TOK_MAX_CHARS`, `NPROC_PER_NODE` (torchrun when
above 1), `LOG_FILE` (tee the output), `DRY_RUN=1` (print the resolved command and exit),
`BASE_TRAIN_EXTRA_ARGS`, `REPORT=0` (no end-of-run report), `REPORT_SAMPLES` (samples in the
report, default 3). nanochat's names are accepted too: `WANDB_RUN` (= `RUN_NAME`, i.e. `--run`) and
`WANDB_PROJECT` (the wandb project, default `nanochat`). A variable with one of the runner's
prefixes that it does not know (a typo) stops it before anything runs, with a did-you-mean.
"""


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "runs", "speedrun_small.sh"), encoding="utf-8") as f:
            print(feature_flags_doc(f.read()), end="")
    else:
        build_parser().print_help()
