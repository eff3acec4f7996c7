"""Checkpoints that survive crashes and never execute code when loaded.

Layout (one directory per step)::

    <checkpoint_dir>/step_000500/
        model.pt          model state_dict (tensors), written by rank 0
        optim_rank0.pt    optimizer state of rank 0 (one file per rank: sharded optimizers)
        optim_rank1.pt    ...
        meta.json         step, args, model config, loop/dataloader/controller/RNG state (JSON)
        DONE              written last; a directory without it is not a checkpoint

Why it is built this way:

* **Never write to the final name** (a kill mid-save must leave the previous checkpoint as the
  latest complete one). Everything goes into ``.tmp_step_000500`` first, every file and the
  directory are fsynced, ``DONE`` is written last, and only then is the directory renamed to
  ``step_000500``. A rename within one filesystem is atomic, so a reader sees either no
  ``step_000500`` or a complete one. Discovery additionally requires ``DONE`` + ``meta.json`` +
  ``model.pt`` (belt and braces, and it ignores directories made by other tools).
* **Loading never runs code.** ``torch.load(..., weights_only=True)`` only rebuilds tensors and
  plain Python containers; a pickle that names any other global (``os.system`` ...) is refused
  with a :class:`CheckpointError` naming the file. Saving walks the states first and refuses
  values that such a load could not read back, so a run cannot write a checkpoint it can't resume.
* **meta.json is JSON, checked key by key**, so the error names the offending key instead of a
  bare ``TypeError`` from deep inside ``json``; dicts must have ``str`` keys because JSON would
  silently turn ``{1: ...}`` into ``{"1": ...}`` and break resume parity.
* **Multi-rank protocol** (optimizer state is sharded per rank): rank 0 prepares the temp dir,
  ``barrier()``, every rank writes its own ``optim_rank{r}.pt``, ``barrier()``, rank 0 writes
  meta/DONE, renames and applies retention, ``barrier()``. Every rank calls ``barrier`` exactly
  three times per save, so the caller can pass ``torch.distributed.barrier``.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping

import torch

DONE_FILE = "DONE"
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt, unsafe, or cannot be written as asked."""


# ---------------------------------------------------------------------------------------------
# names and discovery


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def step_dir(checkpoint_dir: str | os.PathLike, step: int) -> str:
    """Final directory of `step`: <checkpoint_dir>/step_{step:06d}."""
    return os.path.join(os.fspath(checkpoint_dir), f"step_{step:06d}")


def _tmp_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"{_TMP_PREFIX}{step:06d}")


def _is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (DONE_FILE, META_FILE, MODEL_FILE))


def find_complete_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Ascending steps whose directory holds DONE + meta.json + model.pt ([] if the dir is absent)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        m = _STEP_RE.match(name)
        if m and _is_complete(os.path.join(checkpoint_dir, name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The highest complete step, or None when there is none."""
    steps = find_complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def set_aside_newer(checkpoint_dir: str | os.PathLike, step: int) -> list[str]:
    """Resuming from `step` abandons every complete checkpoint after it (they belong to the run
    that is being rewound). Rename them to `abandoned_step_N` so that retention (`keep_last_k`) and
    "latest" only ever see the resumed run's checkpoints, which would otherwise be the ones deleted
    and skipped. Nothing is deleted; returns the new paths. Call on rank 0 only."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    moved = []
    for s in find_complete_steps(checkpoint_dir):
        if s <= step:
            continue
        src = step_dir(checkpoint_dir, s)
        dst = os.path.join(checkpoint_dir, f"abandoned_step_{s:06d}")
        n = 1
        while os.path.exists(dst):
            dst = os.path.join(checkpoint_dir, f"abandoned_step_{s:06d}.{n}")
            n += 1
        os.replace(src, dst)
        moved.append(dst)
    if moved:
        _fsync_dir(checkpoint_dir)
    return moved


def _available(checkpoint_dir: str) -> str:
    steps = find_complete_steps(checkpoint_dir)
    return ", ".join(str(s) for s in steps) if steps else "none"


def resolve_resume_step(checkpoint_dir: str | os.PathLike, requested: int | str) -> int | None:
    """Turn a --resume-from-step value into a step that exists and is complete.

    * ``-1`` (the project's "disabled" sentinel) -> None: start fresh.
    * ``"latest"`` -> the newest complete step; CheckpointError if there is none.
    * an int >= 0 (or its decimal string) -> that step if complete, else CheckpointError listing
      the complete steps that do exist.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if isinstance(requested, str):
        text = requested.strip().lower()
        if text == "latest":
            step = latest_complete_step(checkpoint_dir)
            if step is None:
                raise CheckpointError(f"resume 'latest' requested but {checkpoint_dir} holds no complete "
                                      f"checkpoint (a step_NNNNNN dir with DONE, {META_FILE}, {MODEL_FILE})")
            return step
        try:
            requested = int(text)
        except ValueError:
            raise CheckpointError(f"resume step must be an integer, -1 or 'latest', got {requested!r}") from None
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise CheckpointError(f"resume step must be an integer, -1 or 'latest', got {requested!r}")
    if requested == -1:
        return None
    if requested < 0:
        raise CheckpointError(f"resume step must be >= 0, -1 (fresh start) or 'latest', got {requested}")
    if not _is_complete(step_dir(checkpoint_dir, requested)):
        raise CheckpointError(f"no complete checkpoint for step {requested} in {checkpoint_dir}; "
                              f"available complete steps: {_available(checkpoint_dir)}")
    return requested


# ---------------------------------------------------------------------------------------------
# validation of what is about to be written


def _path_str(path: list) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<top level>"


def _check_json(obj, path: list, what: str) -> None:
    """Raise CheckpointError naming the first key whose value JSON cannot round-trip."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        return  # nan/inf are written as NaN/Infinity, which Python's json reads back
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json(v, path + [i], what)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(
                    f"{what}{_path_str(path)} has non-str key {k!r} ({type(k).__name__}); JSON would turn it into "
                    f"a string and the resumed value would differ: use str keys")
            _check_json(v, path + [k], what)
        return
    hint = " (convert with .tolist()/.item(), or put tensors into model/optimizer state)" \
        if isinstance(obj, torch.Tensor) else ""
    raise CheckpointError(f"{what}{_path_str(path)} is not JSON-serialisable: "
                          f"{type(obj).__module__}.{type(obj).__qualname__}{hint}")


# Types that torch.load(weights_only=True) rebuilds without executing anything.
_TORCH_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _check_weights_only(obj, path: list, what: str) -> None:
    """Refuse values a weights_only load could not read back (checked before writing anything)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{what}{_path_str(path)} is a tensor subclass {type(obj).__qualname__}; "
                                  f"save a plain tensor (e.g. a dequantized or .to_local() copy)")
        return
    if isinstance(obj, _TORCH_PLAIN):
        return
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only(v, path + [i], what)
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, path + [f"<key {k!r}>"], what)
            _check_weights_only(v, path + [k], what)
        return
    raise CheckpointError(f"{what}{_path_str(path)} has type {type(obj).__module__}.{type(obj).__qualname__}, "
                          f"which a safe (weights_only) load cannot rebuild; store tensors and plain "
                          f"Python values only")


# ---------------------------------------------------------------------------------------------
# durable file writes


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (new files, renames) durable. No-op where dirs cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_torch(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# save


def save_checkpoint(checkpoint_dir: str | os.PathLike, step: int, model_state: Mapping | None,
                    optimizer_state: Mapping | None, meta: Mapping | None, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] | None = None, keep_last_k: int = -1) -> str:
    """Atomically write checkpoint `step`; returns its final directory (on every rank).

    Every rank calls this with its own `optimizer_state` (None: no optimizer shard for this rank).
    `model_state` and `meta` are only used on rank 0 (meta must be JSON-serialisable: str keys;
    tensors / numpy values are refused with the key named). An existing `step_NNNNNN` (an earlier
    run reaching the same step) is replaced only after the new one is complete. With
    ``keep_last_k > 0`` rank 0 then deletes older complete checkpoints beyond the newest k (the
    one just written is always kept); leftover temp dirs of crashed saves are always removed.
    With world_size > 1, `barrier` is required and is called exactly three times on every rank.
    Arguments are validated before the first barrier; a rank that raises there leaves the others
    waiting in `barrier`, as with any collective, so pass the same kind of values on every rank.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("save_checkpoint with world_size > 1 needs barrier= (e.g. torch.distributed.barrier)")
    sync = barrier if barrier is not None else (lambda: None)

    # Validate before touching the disk, so a bad value never leaves half a checkpoint behind.
    if optimizer_state is not None:
        _check_weights_only(optimizer_state, [], f"optimizer_state (rank {rank})")
    meta_text = None
    if rank == 0:
        if model_state is None or meta is None:
            raise ValueError("rank 0 must pass model_state and meta")
        _check_weights_only(model_state, [], "model_state")
        if not isinstance(meta, Mapping):
            raise CheckpointError(f"meta must be a dict, got {type(meta).__name__}")
        _check_json(dict(meta), [], "meta")
        meta_text = json.dumps(dict(meta), indent=2, allow_nan=True)

    tmp = _tmp_dir(checkpoint_dir, step)
    final = step_dir(checkpoint_dir, step)

    # 1) rank 0 makes a fresh temp dir (a crashed save of the same step may have left one).
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    sync()

    # 2) every rank writes its own optimizer shard (rank 0 also the model and meta), in parallel.
    if rank == 0:
        _write_torch(model_state, os.path.join(tmp, MODEL_FILE))
        _write_text(meta_text, os.path.join(tmp, META_FILE))
    if optimizer_state is not None:
        _write_torch(optimizer_state, os.path.join(tmp, optim_file(rank)))
    sync()

    # 3) rank 0 seals (DONE last), renames into place, then applies retention.
    if rank == 0:
        shards = sorted(n for n in os.listdir(tmp) if re.fullmatch(r"optim_rank\d+\.pt", n))
        done = {"step": step, "world_size": world_size, "optimizer_shards": shards}
        _write_text(json.dumps(done) + "\n", os.path.join(tmp, DONE_FILE))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):
            old = os.path.join(checkpoint_dir, f"{_OLD_PREFIX}{step:06d}")
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the previous complete checkpoint back
            raise
        _fsync_dir(checkpoint_dir)
        if old is not None:
            _rmtree(old)
        _cleanup(checkpoint_dir, keep_last_k, keep_step=step)
    sync()
    return final


def _cleanup(checkpoint_dir: str, keep_last_k: int, keep_step: int) -> None:
    """Remove temp/aside dirs of crashed saves and, with keep_last_k > 0, old complete checkpoints."""
    for name in os.listdir(checkpoint_dir):
        if name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            _rmtree(os.path.join(checkpoint_dir, name))
    if keep_last_k > 0:
        steps = find_complete_steps(checkpoint_dir)
        keep = set(steps[-keep_last_k:]) | {keep_step}
        for s in steps:
            if s not in keep:
                # Rename out of the step_ namespace first so a half-deleted dir is never "complete".
                doomed = os.path.join(checkpoint_dir, f"{_OLD_PREFIX}{s:06d}")
                os.replace(step_dir(checkpoint_dir, s), doomed)
                _rmtree(doomed)


# ---------------------------------------------------------------------------------------------
# load


def _unpickler_detail(msg: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if m:
        return f"it references {m.group(1)}, which could run code"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", msg)
    if m:
        return f"the safe unpickler rejected it: {m.group(1).strip()}"
    return "the safe unpickler rejected it"


def safe_torch_load(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """torch.load(weights_only=True) whose failures are one-line CheckpointErrors naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (every failure becomes one clear error naming the file)
        msg = str(e)
        if "Weights only load failed" in msg:
            raise CheckpointError(f"refusing to load {path}: not a plain tensor checkpoint "
                                  f"({_unpickler_detail(msg)})") from None
        first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
        detail = f"{type(e).__name__}{': ' + first if first else ''}"
        if any(s in msg for s in ("CUDA", "MPS", "device")):  # e.g. map_location=cuda on a CPU box
            raise CheckpointError(f"cannot load checkpoint file {path} onto device {device}: {detail}") from None
        raise CheckpointError(f"corrupt or truncated checkpoint file {path}: {detail}") from None


def _read_json(path: str):
    """A checkpoint's JSON file, or a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {type(e).__name__}: {e}") from None


def load_checkpoint(checkpoint_dir: str | os.PathLike, step: int, device: torch.device | str,
                    load_optimizer: bool = True, rank: int = 0, world_size: int | None = None):
    """Load complete checkpoint `step` -> (model_state, optimizer_state or None, meta).

    Tensors land on `device`. The optimizer shard is this rank's ``optim_rank{rank}.pt``; pass
    `world_size` to insist that the checkpoint was written by the same number of ranks (sharded
    optimizer state does not fit another layout). Nothing in the files is ever executed.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    d = step_dir(checkpoint_dir, step)
    if not _is_complete(d):
        raise CheckpointError(f"no complete checkpoint for step {step} in {checkpoint_dir}; "
                              f"available complete steps: {_available(checkpoint_dir)}")
    meta = _read_json(os.path.join(d, META_FILE))
    done = _read_json(os.path.join(d, DONE_FILE))
    saved_ws = done.get("world_size")
    model_state = safe_torch_load(os.path.join(d, MODEL_FILE), device)
    optimizer_state = None
    if load_optimizer:
        if world_size is not None and saved_ws is not None and saved_ws != world_size:
            raise CheckpointError(f"checkpoint {d} was saved by {saved_ws} ranks, this run has {world_size}; "
                                  f"its sharded optimizer state cannot be loaded (resume with {saved_ws} "
                                  f"ranks, or load without optimizer state)")
        opt_path = os.path.join(d, optim_file(rank))
        if not os.path.isfile(opt_path):
            raise CheckpointError(f"checkpoint {d} has no optimizer state for rank {rank} (missing {opt_path}; "
                                  f"saved by {saved_ws} ranks)")
        optimizer_state = safe_torch_load(opt_path, device)
    return model_state, optimizer_state, meta


# ---------------------------------------------------------------------------------------------
# resume compatibility reports


def _normalise(v):
    """Tuples -> lists (JSON round trip), so (0.8, 0.95) in the run equals [0.8, 0.95] saved."""
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalise(x) for k, x in v.items()}
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def _as_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def diff_model_config(saved: Mapping, current: Mapping) -> list[str]:
    """Lines like 'n_layer: checkpoint 4, run 2' for every key whose value differs (dataclass ok)."""
    saved, current = _as_dict(saved), _as_dict(current)
    lines = []
    for key in list(saved) + [k for k in current if k not in saved]:
        a = _normalise(saved[key]) if key in saved else "<absent>"
        b = _normalise(current[key]) if key in current else "<absent>"
        if a != b:
            fa = repr(saved[key]) if key in saved else "<absent>"
            fb = repr(current[key]) if key in current else "<absent>"
            lines.append(f"{key}: checkpoint {fa}, run {fb}")
    return lines


def check_state_dict_keys(saved_state: Mapping, model: torch.nn.Module | Mapping) -> list[str]:
    """What stops `model.load_state_dict(saved_state)`: missing/unexpected keys, shape mismatches.

    Empty list: compatible. `model` may be a module or a state dict.
    """
    current = model.state_dict() if isinstance(model, torch.nn.Module) else model

    def shape(t):
        return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    lines = []
    for k in current:
        if k not in saved_state:
            lines.append(f"missing in checkpoint: {k} (run shape {shape(current[k])})")
    for k in saved_state:
        if k not in current:
            lines.append(f"unexpected in checkpoint: {k} (checkpoint shape {shape(saved_state[k])})")
    for k in saved_state:
        if k in current and shape(saved_state[k]) != shape(current[k]):
            lines.append(f"shape mismatch: {k}: checkpoint {shape(saved_state[k])}, run {shape(current[k])}")
    prefix = "_orig_mod."
    strip = lambda keys: {k.replace(prefix, "") for k in keys}  # noqa: E731
    if set(saved_state) != set(current) and strip(saved_state) == strip(current):
        lines.append(f"keys differ only by torch.compile's '{prefix}' prefix: save and load the "
                     f"uncompiled model's state_dict")
    return lines
