"""Mistyped runner variables are errors: `NUM_ITERS=5 bash runs/speedrun_small.sh` stops with
"unknown variable NUM_ITERS; did you mean NUM_ITERATIONS?" instead of training 520 steps.

bash cannot tell a typo from an unrelated variable, so without this check a misspelt knob is
silently ignored and the run trains with the default, which is found out hours later if ever.
Only names with one of the runners' prefixes (`DYN_`, `FP8_`, `NUM_`, ...) are checked: the
environment holds many unrelated variables (`PATH`, `MAX_JOBS`, `WANDB_API_KEY`) that are none
of the runner's business.

A runner's known names are read from its own text, so a new variable needs no second list: its
mapping lines (`opt ENV --flag`, `int_opt ...`, the lines docs/feature_flags.md is generated from)
and every variable it reads with a default (`${NAME:-...}`, `: "${NAME:=...}"`), which covers its
controls (`SKIP_SETUP`, `NUM_SHARDS`, ...).

    python3 -m nanochat.runner_env runs/speedrun_small.sh            # exit 2 and one line on a typo
    python3 -m nanochat.runner_env runs/a.sh runs/speedrun_small.sh  # a.sh passes b's variables on
    python3 -m nanochat.runner_env runs/b.sh --also runs/a.sh --prefix FULL_ --known EXTRA_NAME

The first runner names the message. `--also FILE`: names of a runner that calls this one, present
in the environment but not meant for it; accepted, never suggested. Standard library only: runners
call this before their setup step has installed anything.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

# Prefixes of the runners' own names. Generic words (`MAX_`, `TIME_`, `MODEL_`, `USE_`, `LOG_`)
# are narrowed to the runner's names, since other tools read e.g. MAX_JOBS and TIME_STYLE; nor is
# `WANDB_` checked, as wandb itself reads dozens of WANDB_* variables (WANDB_RUN_ID, WANDB_MODE, ...).
DEFAULT_PREFIXES = (
    "DYN_", "FP8_", "LM_CE_", "MUON_", "NUM_", "EVAL_", "DEVICE_", "TOK_", "TOTAL_", "TARGET_", "BLOCK_",
    "SAVE_", "WINDOW_", "ASPECT_", "HEAD_", "NPROC_", "PREPARE_", "SKIP_", "DRY_", "REPORT_", "BASE_TRAIN",
    "DROP_", "GROWTH_", "MAX_SEQ", "TIME_BUDGET", "USE_FP8",
)

# The runner's mapping lines (the syntax nanochat.cli's runner_env_mapping reads for the docs).
_MAPPING = re.compile(r"^\s*(?:opt|flag|int_opt|num_opt|choice_opt) ([A-Z][A-Z0-9_]*)\s", re.M)
# A variable read with a default or a test: ${NAME:-x} ${NAME:=x} ${NAME-x} ${NAME:+x} ${NAME:?x}.
_READ = re.compile(r"\$\{([A-Z][A-Z0-9_]*):?[-=+?]")


def runner_names(text: str) -> set[str]:
    """The environment variables a runner script reads (see the module docstring)."""
    return set(_MAPPING.findall(text)) | set(_READ.findall(text))


def unknown_variables(environ, known, prefixes=DEFAULT_PREFIXES, accepted=()) -> list[tuple[str, str | None]]:
    """(name, closest known name or None) for each set variable with a prefix that nobody reads."""
    known, accepted = set(known), set(accepted)
    out = []
    for name in sorted(environ):
        if not name.startswith(tuple(prefixes)) or name in known or name in accepted:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        out.append((name, close[0] if close else None))
    return out


def message(prog: str, unknown: list[tuple[str, str | None]]) -> str:
    """One line: every unknown name with its suggestion."""
    where = " (docs/feature_flags.md lists the runner's variables)"
    if len(unknown) == 1:
        name, close = unknown[0]
        return f"{prog}: error: unknown variable {name}" + (f"; did you mean {close}?" if close else where)
    parts = [name + (f" (did you mean {close}?)" if close else "") for name, close in unknown]
    return f"{prog}: error: unknown variables " + ", ".join(parts) + where


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        print(f"runner_env: error: cannot read runner {path}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m nanochat.runner_env",
                                description="Exit 2 with one line when a runner variable is mistyped.")
    p.add_argument("runners", nargs="+", help="runner scripts whose variables are known (the first names the message)")
    p.add_argument("--also", action="append", default=[], metavar="FILE",
                   help="a runner that calls these: its variables are accepted but never suggested")
    p.add_argument("--known", action="append", default=[], metavar="NAME", help="one more known name")
    p.add_argument("--prefix", action="append", default=[], metavar="P", help="one more checked prefix")
    args = p.parse_args(argv)
    known = set(args.known)
    for path in args.runners:
        known |= runner_names(_read(path))
    accepted = set()
    for path in args.also:
        accepted |= runner_names(_read(path))
    unknown = unknown_variables(os.environ, known, DEFAULT_PREFIXES + tuple(args.prefix), accepted)
    if unknown:
        print(message(os.path.basename(args.runners[0]), unknown), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
