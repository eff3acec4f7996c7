"""The command line of `scripts/base_train.py`: one grouped argparse and one validator.

This module is the single place where a flag's name, default and meaning live. The training
script calls `parse_args()`; `docs/feature_flags.md` is generated from `build_parser()`
(`python -m nanochat.cli --markdown`) and a test keeps the two identical, as does a `--help`
snapshot test, so adding a flag is always a deliberate, visible change.

Conventions: kebab-case flags, `-1` means "disabled" (or "auto" where the help says so), and
every problem with the flags is reported at once, in one message, before any model, data or GPU
work starts (exit code 2, no traceback).
"""
from __future__ import annotations

import argparse
import re
import sys

from nanochat.dynamic_suffix import DynamicSuffixConfig
from nanochat.gpt import validate_window_pattern

_DYN = DynamicSuffixConfig()  # the controller's defaults are the flags' defaults

# Defaults tuned at d12 / 2^19-token batches by nanochat; base_train rescales the learning rates
# and weight decay for other batch sizes and horizons.
B_REF = 2 ** 19


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
    g.add_argument("--lm-ce-chunk-size", type=int, default=4096, help="rows (tokens) per chunk of the chunked cross-entropy")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps and at the end (-1 = disabled)")
    g.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens of the validation split per evaluation")
    g.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    g = p.add_argument_group("output")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default: d{depth})")
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
    need(args.num_iterations > 0 or args.target_flops > 0 or args.target_param_data_ratio > 0,
         "no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
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


def batch_problems(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> list[str]:
    """Gradient-accumulation arithmetic, with the nearest valid totals as the fix."""
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step == 0:
        return []
    lo = max(per_step, (total_batch_size // per_step) * per_step)
    hi = lo + per_step
    return [f"--total-batch-size={total_batch_size} is not a multiple of device-batch-size * max-seq-len * world size "
            f"= {device_batch_size} * {max_seq_len} * {world_size} = {per_step}; use e.g. {lo} or {hi}, or change --device-batch-size"]


def fail(problems: list[str]) -> None:
    """Print all problems in one message and exit 2 (argparse's convention for usage errors)."""
    msg = "; ".join(problems) if len(problems) == 1 else "\n  - " + "\n  - ".join(problems)
    print(f"base_train: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems)
    return args


def markdown_flag_table(parser: argparse.ArgumentParser | None = None) -> str:
    """The flag reference of docs/feature_flags.md, generated from the parser itself."""
    parser = parser or build_parser()
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            flag = a.option_strings[-1]
            if a.choices:
                flag += " {" + ",".join(map(str, a.choices)) + "}"
            default = "off" if a.nargs == 0 else repr(a.default) if isinstance(a.default, str) else str(a.default)
            help_text = (a.help or "").replace("|", "\\|")
            lines.append(f"| `{flag}` | {default} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


_RUNNER_LINE = re.compile(r"^(opt|flag|int_opt|num_opt|choice_opt) ([A-Z][A-Z0-9_]*) (--[a-z0-9-]+)", re.M)


def runner_env_mapping(runner_text: str) -> list[tuple[str, str]]:
    """(ENV_VAR, --flag) pairs declared in runs/speedrun_small.sh (its `opt ENV --flag` lines)."""
    return [(m.group(2), m.group(3)) for m in _RUNNER_LINE.finditer(runner_text)]


def feature_flags_doc(runner_text: str) -> str:
    """The whole of docs/feature_flags.md: generated, never hand-edited (a test compares)."""
    env_rows = "\n".join(f"| `{env}` | `{flag}` |" for env, flag in runner_env_mapping(runner_text))
    return f"""# Flags and environment variables

Generated by `python -m nanochat.cli --markdown > docs/feature_flags.md` from the argparse
definitions in `nanochat/cli.py` and the mapping lines of `runs/speedrun_small.sh`;
`tests/test_cli.py` fails when this file is out of date. Conventions: `-1` disables (or means
auto where stated); every flag problem is reported at once, before any GPU work, with exit code 2.

## `scripts/base_train.py`

{markdown_flag_table()}
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
`BASE_TRAIN_EXTRA_ARGS`.
"""


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        import os
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "runs", "speedrun_small.sh"), encoding="utf-8") as f:
            print(feature_flags_doc(f.read()), end="")
    else:
        build_parser().print_help()
