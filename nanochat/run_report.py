"""The end-of-run report of runs/speedrun_small.sh: how good the model is, what it writes, where it
is, and the commands that use it next.

A training log ends with hundreds of step lines; the numbers a user wants afterwards (final and best
val bpb) and what to do with the checkpoint are easy to miss there. The numbers come from the
summary line that base_train appends to its metrics JSONL (`--metrics-file`), not from the log
text, whose format is free to change.

    python -m nanochat.run_report --metrics-file M --checkpoint-dir D --model-tag d12 [--samples 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys


def read_summary(path: str) -> dict | None:
    """The last `"kind": "summary"` record of a metrics JSONL (a file appended to by several runs
    of one tag holds one per run), or None. Unparsable lines are skipped: a run killed mid-write
    leaves a partial last line."""
    summary = None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("kind") == "summary":
                    summary = rec
    except OSError:
        return None
    return summary


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def metrics_line(summary: dict | None, metrics_file: str) -> str:
    if summary is None:
        return f"val bpb: unknown (no summary line in {metrics_file})"
    steps = summary.get("steps")
    elapsed = summary.get("train_elapsed")
    after = f" after {steps} steps" if steps is not None else ""
    if elapsed is not None:
        after += f" ({duration(elapsed)} of training)"
    final, best = summary.get("final_val_bpb"), summary.get("min_val_bpb")
    if final is None:
        return f"val bpb: n/a (no evaluation ran; EVAL_EVERY=-1?){after}"
    best_text = f", min {best:.4f}" if best is not None else ""
    return f"val bpb: final {final:.4f}{best_text}{after}"


def _env_prefix() -> str:
    """The base dir the run used, when it is not the default: the commands must name it too."""
    base = os.environ.get("NANOCHAT_BASE_DIR")
    return f"NANOCHAT_BASE_DIR={shlex.quote(base)} " if base else ""


def sample_argv(model_tag: str, samples: int, max_tokens: int = 48) -> list[str]:
    """Flags of scripts.generate that every version of it has had (prompt: its default)."""
    return ["-m", "scripts.generate", f"--model-tag={model_tag}", f"--num-samples={samples}",
            f"--max-tokens={max_tokens}"]


def next_commands(model_tag: str, eval_args: list[str]) -> list[str]:
    prefix = _env_prefix()
    gen = shlex.join(["python", "-m", "scripts.generate", f"--model-tag={model_tag}", "--prompt", "Once upon a time"])
    ev = shlex.join(["python", "-m", "scripts.base_eval", f"--model-tag={model_tag}", *eval_args])
    return [prefix + gen, prefix + ev]


def checkpoint_line(checkpoint_dir: str) -> str:
    from nanochat.checkpoint import latest_complete_step, step_dir  # noqa: PLC0415 (torch: only here)
    step = latest_complete_step(checkpoint_dir)
    if step is None:
        return f"checkpoint: none complete in {checkpoint_dir}"
    return f"checkpoint: {step_dir(checkpoint_dir, step)} (step {step})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.run_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics-file", required=True, help="the run's metrics JSONL")
    p.add_argument("--checkpoint-dir", required=True, help="<base_dir>/base_checkpoints/<model tag>")
    p.add_argument("--model-tag", required=True)
    p.add_argument("--samples", type=int, default=3, help="samples to generate from the checkpoint (0 = none)")
    p.add_argument("--eval-args", default="", help="extra base_eval flags for the suggested command")
    p.add_argument("--prog", default="speedrun_small.sh", help="name the lines start with")
    args = p.parse_args(argv)

    print(f"{args.prog}: ------------------------------------------------------------ report")
    print(metrics_line(read_summary(args.metrics_file), args.metrics_file))
    print(f"metrics: {args.metrics_file}")
    print(checkpoint_line(args.checkpoint_dir), flush=True)
    if args.samples > 0:
        gen = sample_argv(args.model_tag, args.samples)
        print(f"samples ({shlex.join(['python', *gen])}):", flush=True)
        rc = subprocess.run([sys.executable, *gen]).returncode
        if rc != 0:
            print(f"samples: scripts.generate failed (exit {rc}); the checkpoint is still there")
    print("next (in the project's venv):")
    for cmd in next_commands(args.model_tag, shlex.split(args.eval_args)):
        print(f"  {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
