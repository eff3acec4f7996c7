"""One-line usage errors for every entry point.

A user who mistypes a flag should see one line that names the problem and the way out, not
argparse's whole usage block (71 lines for base_train) followed by the message, and never a
traceback. Every script builds its parser with `OneLineParser` and reports its own validation
problems with `fail`; both exit 2, argparse's code for usage errors. Runtime failures (a damaged
checkpoint, a missing file) use exit code 1 through `die`.
"""
from __future__ import annotations

import argparse
import sys


def _tool_name(prog: str) -> str:
    """'python -m scripts.base_train' -> 'base_train' (the name the messages start with)."""
    return prog.split()[-1].rsplit(".", 1)[-1] if prog else "nanochat"


def fail(problems: list[str], prog: str = "base_train", code: int = 2) -> None:
    """Print all problems in one message (one line when there is one) and exit (2 = usage)."""
    msg = "; ".join(problems) if len(problems) == 1 else "\n  - " + "\n  - ".join(problems)
    print(f"{_tool_name(prog)}: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def die(message: str, prog: str = "base_train") -> None:
    """A runtime failure the user can act on: one line, exit 1."""
    fail([message], prog, code=1)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line plus where to read more, instead of the full usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 (argparse API)
        print(f"{_tool_name(self.prog)}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)
