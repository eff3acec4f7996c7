"""Small shared utilities: device autodetection, distributed init, rank-0 printing, the base
directory, the GPU peak-FLOPs table and the run's provenance record.

Everything here is import-cheap and never touches CUDA at import time, so CPU-only machines
(CI) and scripts that only validate flags never initialise a GPU context.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist


class UsageError(Exception):
    """A user-facing configuration problem: printed as one line, exit code 2, no traceback."""


def get_base_dir() -> str:
    """Where data, tokenizer and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_master() -> bool:
    return get_dist_info()[1] == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so logs interleave correctly with subprocess output."""
    if is_master():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type: str):
    """Seed, set matmul precision, and initialise torch.distributed when launched by torchrun.

    Returns (ddp, rank, local_rank, world_size, device). CPU runs under torchrun use gloo, so the
    multi-process code path is testable without a GPU.
    """
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device-type=cuda but no CUDA device is visible; use --device-type=cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device-type=mps but MPS is not available on this machine; use --device-type=cpu")
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Dense bf16 tensor-core peak FLOP/s (no sparsity), used for MFU. Matched by substring of the
# device name; order matters (more specific names first).
_PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 5090", 209e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]


def get_peak_flops(device_name: str) -> float | None:
    """bf16 dense peak for a CUDA device name, or None when unknown (MFU is then not printed)."""
    for key, flops in _PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def step_time_stats(step_times: list[float], tokens_per_step: int, slow_factor: float = 1.25) -> dict | None:
    """The distribution behind a mean tok/s: median step, and the steps slower than `slow_factor`
    times the median with the time they cost beyond it.

    Steady tok/s is a mean, so a few stalled steps lower it without showing where; the median
    says what a normal step costs and the excess says how much the stalls took (on the H100 a
    520-step anchor run had 5-8 steps of 84-107 ms against a 65 ms median). None without steps."""
    if not step_times:
        return None
    median = statistics.median(step_times)
    slow = [t for t in step_times if t > slow_factor * median]
    return {"median_step_sec": median, "median_tok_per_sec": tokens_per_step / median if median > 0 else float("nan"),
            "slow_steps": len(slow), "slow_excess_sec": sum(t - median for t in slow), "slow_factor": slow_factor}


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_provenance() -> dict:
    """What produced a run: code version, library versions, hardware. Logged and checkpointed."""
    info = {
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


DEFAULT_WANDB_PROJECT = "nanochat"


class DummyWandb:
    """Stands in for a wandb run when logging is off or unavailable (no id: nothing to resume)."""

    id = None

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbRun:
    """A live wandb run whose later failures (a dropped connection mid-run) warn once instead of
    stopping training, as a failed init does. `id` is what a resumed run passes back to init_wandb."""

    def __init__(self, run):
        self._run = run
        self.id = run.id
        self._warned = False

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            print0(f"WARNING: wandb {what} failed ({type(e).__name__}: {e}); training continues")

    def log(self, data: dict, step: int | None = None) -> None:
        """Every key of `data` as given (the caller decides what and how often)."""
        try:
            self._run.log(dict(data), **({} if step is None else {"step": step}))
        except Exception as e:  # noqa: BLE001 (a logging failure must not stop training)
            self._warn("log", e)

    def finish(self) -> None:
        try:
            self._run.finish()
        except Exception as e:  # noqa: BLE001
            self._warn("finish", e)


def init_wandb(run_name: str, config: dict, master: bool, run_id: str | None = None) -> WandbRun | DummyWandb:
    """wandb only when asked for (`--run` not 'dummy'), imported lazily; a missing package or login
    prints one warning and training continues.

    The project is $WANDB_PROJECT, else "nanochat". `run_id`: the `.id` of an earlier run, stored in
    its checkpoints, so that a resumed training continues the same wandb run (resume="allow": a run
    with that id that does not exist, e.g. in another project, is created). The config is set after
    init with allow_val_change, because a resumed run's args differ (the resume flags at least) and
    wandb refuses a changed config value otherwise."""
    if run_name == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb  # noqa: PLC0415 (lazy on purpose: 20 MB, often absent on GPU boxes)
    except ImportError:
        print0("WARNING: wandb is not installed (pip install wandb); continuing without it")
        return DummyWandb()
    try:
        project = os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
        run = wandb.init(project=project, name=run_name, id=run_id, resume="allow")
        if run is None:
            raise RuntimeError("wandb.init returned no run")
        run.config.update(config, allow_val_change=True)
        return WandbRun(run)
    except Exception as e:  # noqa: BLE001 (any wandb failure must not stop training)
        print0(f"WARNING: wandb unavailable ({type(e).__name__}: {e}); continuing without it")
        return DummyWandb()


def device_mark():
    """A CUDA event recorded now on the current stream, with timing: `a.elapsed_time(b)` is the
    device time in ms between two marks once both have completed."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class ScalarReader:
    """Read a 0-dim device tensor on the host without waiting for the work queued after it.

    `t.item()` queues its device-to-host copy behind everything already queued, which in a training
    step is the whole optimizer: the host would wait for it, and the GPU would then sit idle while
    the host logs and launches the next step (measured on an H100 at d12: ~0.8 ms after every loss
    read, plus the next step's launch latency). `start(t)` queues the copy into pinned memory right
    after `t` is computed; `result()` waits for that copy only. One read in flight at a time."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.buf = torch.empty((), dtype=torch.float32, pin_memory=True) if self.cuda else None
        self.event = None
        self.value = None

    def start(self, t: torch.Tensor) -> None:
        if not self.cuda:  # CPU work is synchronous: nothing to overlap
            self.value = t.item()
            return
        self.buf.copy_(t.detach(), non_blocking=True)
        self.event = device_mark()  # also the step clock's mark of this step (nanochat.train_state)

    def result(self) -> float:
        if not self.cuda:
            return self.value
        self.event.synchronize()
        return self.buf.item()
