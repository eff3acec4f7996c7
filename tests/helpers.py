"""Scaffolding shared by the tests that drive the real entry points (`python -m scripts.*`) in
subprocesses: the repo root, one tiny CPU training config, a runner, and base dirs that hold a
tiny tokenizer trained once per test run (see the `tiny_tokenizer` fixture in conftest.py), and
readers of base_train's `--metrics-file`: tests check numbers there, not in the log's wording."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# depth 2, dim 64, 2 micro-batches of 4 x 64 tokens per step; learning rates raised so that a few
# dozen steps visibly learn.
TINY = ["--device-type=cpu", "--no-compile", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
        "--device-batch-size=4", "--total-batch-size=512", "--eval-tokens=2048", "--matrix-lr=0.1",
        "--embedding-lr=1.0", "--unembedding-lr=0.02"]


def run(args, base, check=True, env=None, timeout=300):
    """`python <args>` from the repo root with NANOCHAT_BASE_DIR=base; asserts success if `check`."""
    full_env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", **(env or {})}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def base_with_tokenizer(tmp_path_factory, name, tokenizer_dir):
    """A fresh base dir holding a copy of the shared tiny tokenizer (and nothing else)."""
    base = tmp_path_factory.mktemp(name)
    shutil.copytree(tokenizer_dir, os.path.join(base, "tokenizer"))
    return base


def reseal(path):
    """Record `path`'s new content hash in its checkpoint's DONE manifest (where the manifest keeps
    hashes), as whoever edits a checkpoint on purpose would, so the run reaches the edited weights."""
    done_path = os.path.join(os.path.dirname(path), "DONE")
    with open(done_path, encoding="utf-8") as f:
        done = json.load(f)
    if "sha256" in done:
        with open(path, "rb") as f:
            done["sha256"][os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
        with open(done_path, "w", encoding="utf-8") as f:
            json.dump(done, f)


def read_metrics(path, kind=None):
    """The JSON records of a `--metrics-file` (all, or those of one `kind`: run, step, eval, core,
    skip, lr_reduction, summary), in order. A resumed run appends to its file: give each run its own."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def step_losses(path):
    """{step: raw loss} of a `--metrics-file`: the exact float, fit for bit-parity checks (the
    log prints a rounded, smoothed loss)."""
    return {r["step"]: r["loss"] for r in read_metrics(path, "step")}
