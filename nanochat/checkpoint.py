"""Checkpoints that survive crashes, prove their content, and never execute code when loaded.

Layout (one directory per step)::

    <checkpoint_dir>/.lock            held by the run that writes here (lock_checkpoint_dir)
    <checkpoint_dir>/step_000500/
        model.pt          model state_dict (tensors), written by rank 0
        optim_rank0.pt    optimizer state of rank 0 (one file per rank: sharded optimizers)
        optim_rank1.pt    ...
        meta.json         step, args, model config, loop/dataloader/controller/RNG state (JSON)
        DONE              the manifest, written last: step, world size, shards and the sha256 of
                          every other file; a directory without it is not a checkpoint

Why it is built this way:

* **Never write to the final name** (a kill mid-save must leave the previous checkpoint as the
  latest complete one). Everything goes into ``.tmp_step_000500.<pid>`` first (the pid of rank 0,
  so two savers can never share a temp dir), every file and the directory are fsynced, ``DONE`` is
  written last, and only then is the directory renamed to ``step_000500``. A rename within one
  filesystem is atomic, so a reader sees either no ``step_000500`` or a complete one. Discovery
  additionally requires ``DONE`` + ``meta.json`` + ``model.pt`` (belt and braces, and it ignores
  directories made by other tools).
* **A failed save cleans up after itself.** Any ``OSError`` while saving (a full disk above all)
  removes the partial temp dir and becomes one :class:`CheckpointError` line that says which
  earlier checkpoint is intact; a run killed mid-save leaves its temp dir, which the next save
  removes (unless the process that owns it is still alive).
* **Content hashes.** Each file's sha256 (read back in 1 MiB chunks, so memory stays flat) is
  recorded in ``DONE`` at save time and checked before the file is used: a flipped bit on disk or
  in a copy is reported with the damaged file named, instead of loading wrong weights silently. A
  load checks only the files it reads (generation never reads the optimizer shards). Checkpoints
  written before hashes were recorded load with one ``WARNING`` line (see `load_checkpoint`).
* **Loading never runs code.** ``torch.load(..., weights_only=True)`` only rebuilds tensors and
  plain Python containers; a pickle that names any other global (``os.system`` ...) is refused
  with a :class:`CheckpointError` naming the file. Saving walks the states first and refuses
  values that such a load could not read back, so a run cannot write a checkpoint it can't resume.
* **meta.json is JSON, checked key by key**: at save, so the error names the offending key instead
  of a bare ``TypeError`` from deep inside ``json`` (dicts must have ``str`` keys because JSON
  would silently turn ``{1: ...}`` into ``{"1": ...}`` and break resume parity); at load, against
  the schema a resume reads (`validate_meta`), so a damaged file is one line naming the field,
  never a ``KeyError`` in the middle of the training script.
* **One writer per directory.** `lock_checkpoint_dir` takes an exclusive ``flock``; a second run
  on the same directory stops at once with the first one's pid instead of interleaving saves and
  deleting each other's checkpoints through retention.
* **Multi-rank protocol** (optimizer state is sharded per rank): rank 0 prepares the temp dir,
  ``barrier()``, every rank writes its own ``optim_rank{r}.pt`` and its hash, ``barrier()``, rank 0
  writes DONE, renames and applies retention, ``barrier()``. Every rank calls ``barrier`` exactly
  three times per save, so the caller can pass ``torch.distributed.barrier``; with
  torch.distributed initialised the ranks also learn rank 0's pid (the temp dir's name) through one
  broadcast.
"""
from __future__ import annotations

import atexit
import base64
import binascii
import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; lock_checkpoint_dir is a no-op there
    fcntl = None

DONE_FILE = "DONE"
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
LOCK_FILE = ".lock"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"
# A leftover of an interrupted save: .tmp_step_000500.<pid> (or without a pid, as older code wrote).
_LEFTOVER_RE = re.compile(r"^\.(?:tmp|old)_step_\d+(?:\.(\d+))?$")
_HASH_SUFFIX = ".sha256"   # per-file hash a rank leaves next to its file until rank 0 seals DONE
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt, unsafe, locked by another run, or cannot be
    written as asked. The message is one line and names the file (or directory) concerned."""


# ---------------------------------------------------------------------------------------------
# names and discovery


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def step_dir(checkpoint_dir: str | os.PathLike, step: int) -> str:
    """Final directory of `step`: <checkpoint_dir>/step_{step:06d}."""
    return os.path.join(os.fspath(checkpoint_dir), f"step_{step:06d}")


def _tmp_dir(checkpoint_dir: str, step: int, token: int) -> str:
    return os.path.join(checkpoint_dir, f"{_TMP_PREFIX}{step:06d}.{token}")


_MODEL_TAG_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def model_tag_problem(model_tag: str | None) -> str | None:
    """Why `model_tag` cannot name a directory under base_checkpoints, or None if it can.

    A tag is a plain name (letters, digits, '.', '_', '-'), never '.', '..' or a path: the
    scripts join it under the base dir, so '../..' or '/abs' would read or write elsewhere.
    None or '' mean "not given" and are fine."""
    if not model_tag:
        return None
    if not _MODEL_TAG_RE.fullmatch(model_tag) or model_tag in (".", ".."):
        return (f"--model-tag={model_tag!r} must be a plain directory name (letters, digits, '.', '_', '-'; "
                f"not '.' or '..'), not a path")
    return None


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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory stays flat for multi-GB files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_hash(path: str) -> None:
    """Leave `path`'s hash beside it; rank 0 gathers these into DONE (the only channel between
    ranks that the save protocol has is the shared directory)."""
    _write_text(file_sha256(path) + "\n", path + _HASH_SUFFIX)


def _gather_hashes(tmp: str) -> dict[str, str]:
    """{file name: sha256} of every file in the temp dir, from the ranks' hash files (removed
    here) or, for a file that has none, computed now."""
    hashes, names = {}, os.listdir(tmp)
    for name in names:
        if name.endswith(_HASH_SUFFIX):
            with open(os.path.join(tmp, name), encoding="ascii") as f:
                hashes[name[:-len(_HASH_SUFFIX)]] = f.read().strip()
    for name in names:
        if not name.endswith(_HASH_SUFFIX) and name != DONE_FILE and name not in hashes:
            hashes[name] = file_sha256(os.path.join(tmp, name))
    for name in names:
        if name.endswith(_HASH_SUFFIX):
            os.remove(os.path.join(tmp, name))
    return dict(sorted(hashes.items()))


def _save_token(world_size: int) -> int:
    """Rank 0's pid on every rank: the temp dir's suffix, so it is unique per saving process."""
    pid = os.getpid()
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [pid]
        torch.distributed.broadcast_object_list(box, src=0)
        pid = box[0]
    return pid  # without torch.distributed the ranks are threads of one process (tests): one pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): leave its files alone
    return True


def _os_error_text(e: OSError) -> str:
    code = e.errno if e.errno is not None else (e.args[0] if e.args and isinstance(e.args[0], int) else None)
    text = e.strerror or (os.strerror(code) if code is not None else str(e))
    return f"{type(e).__name__}: {text}"


def _save_failed(e: OSError, checkpoint_dir: str, step: int) -> CheckpointError:
    """One line for an OSError during a save, saying which checkpoint is still good."""
    code = e.errno if e.errno is not None else (e.args[0] if e.args and isinstance(e.args[0], int) else None)
    prev = latest_complete_step(checkpoint_dir)
    intact = f"the previous checkpoint step {prev} is intact" if prev is not None else "no earlier checkpoint exists"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return CheckpointError(f"disk full while saving checkpoint step {step} to {checkpoint_dir}; the partial "
                               f"save was removed and {intact} (free some space, or keep fewer checkpoints)")
    return CheckpointError(f"could not save checkpoint step {step} to {checkpoint_dir} ({_os_error_text(e)}); "
                           f"the partial save was removed and {intact}")


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

    Any OSError while writing (disk full, quota, I/O error) removes this rank's partial files
    (rank 0: the whole temp dir) and raises a one-line CheckpointError naming the newest complete
    checkpoint, which is untouched. With several ranks the others still wait in `barrier` (there is
    no channel to tell them), so a multi-rank run ends there through the collective's timeout.
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

    tmp = _tmp_dir(checkpoint_dir, step, _save_token(world_size))
    final = step_dir(checkpoint_dir, step)
    mine = []   # files this rank writes, removed again if writing fails
    try:
        # 1) rank 0 makes a fresh temp dir (a crashed save of the same step may have left one).
        if rank == 0:
            os.makedirs(checkpoint_dir, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        sync()

        # 2) every rank writes its own optimizer shard (rank 0 also the model and meta), in parallel,
        #    each file followed by its hash.
        if rank == 0:
            mine += [os.path.join(tmp, MODEL_FILE), os.path.join(tmp, META_FILE)]
            _write_torch(model_state, mine[0])
            _write_text(meta_text, mine[1])
        if optimizer_state is not None:
            mine.append(os.path.join(tmp, optim_file(rank)))
            _write_torch(optimizer_state, mine[-1])
        for path in mine:
            _write_hash(path)
        sync()

        # 3) rank 0 seals (DONE last, with every file's hash) and renames into place.
        if rank == 0:
            hashes = _gather_hashes(tmp)
            shards = sorted(n for n in hashes if re.fullmatch(r"optim_rank\d+\.pt", n))
            done = {"step": step, "world_size": world_size, "optimizer_shards": shards, "sha256": hashes}
            _write_text(json.dumps(done) + "\n", os.path.join(tmp, DONE_FILE))
            _fsync_dir(tmp)
            _install(tmp, final, checkpoint_dir, step)
    except OSError as e:
        if rank == 0:
            _rmtree(tmp)
        else:
            for path in mine:
                for p in (path, path + _HASH_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.remove(p)
        raise _save_failed(e, checkpoint_dir, step) from None
    if rank == 0:
        _cleanup(checkpoint_dir, keep_last_k, keep_step=step)
    sync()
    return final


def _install(tmp: str, final: str, checkpoint_dir: str, step: int) -> None:
    """Rename the sealed temp dir to `final`; an existing `final` is moved aside first and put
    back if the rename fails, so a complete checkpoint of `step` exists at every moment."""
    old = None
    if os.path.exists(final):
        old = os.path.join(checkpoint_dir, f"{_OLD_PREFIX}{step:06d}.{os.getpid()}")
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


def _is_leftover(name: str) -> bool:
    """A temp/aside dir of an interrupted save, and not one that a live process is writing."""
    m = _LEFTOVER_RE.match(name)
    if not m:
        return False
    pid = int(m.group(1)) if m.group(1) else None
    return pid is None or pid == os.getpid() or not _pid_alive(pid)


def _cleanup(checkpoint_dir: str, keep_last_k: int, keep_step: int) -> None:
    """Remove temp/aside dirs of crashed saves and, with keep_last_k > 0, old complete checkpoints."""
    for name in os.listdir(checkpoint_dir):
        if _is_leftover(name):
            _rmtree(os.path.join(checkpoint_dir, name))
    if keep_last_k > 0:
        steps = find_complete_steps(checkpoint_dir)
        keep = set(steps[-keep_last_k:]) | {keep_step}
        for s in steps:
            if s not in keep:
                # Rename out of the step_ namespace first so a half-deleted dir is never "complete".
                doomed = os.path.join(checkpoint_dir, f"{_OLD_PREFIX}{s:06d}.{os.getpid()}")
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


def safe_torch_load(path: str | os.PathLike, device: torch.device | str = "cpu", kind: str = "checkpoint"):
    """torch.load(weights_only=True) whose failures are one-line CheckpointErrors naming the file
    (`kind` names what the file is in the message: "checkpoint", "tokenizer", ...)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{kind} file missing: {path}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (every failure becomes one clear error naming the file)
        msg = str(e)
        if "Weights only load failed" in msg:
            raise CheckpointError(f"refusing to load {path}: not a plain tensor {kind} file "
                                  f"({_unpickler_detail(msg)})") from None
        first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
        detail = f"{type(e).__name__}{': ' + first if first else ''}"
        if any(s in msg for s in ("CUDA", "MPS", "device")):  # e.g. map_location=cuda on a CPU box
            raise CheckpointError(f"cannot load {kind} file {path} onto device {device}: {detail}") from None
        raise CheckpointError(f"corrupt or truncated {kind} file {path}: {detail}") from None


def _read_json(path: str):
    """A checkpoint's JSON file, or a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {type(e).__name__}: {e}") from None


# What a training resume reads from meta.json (scripts/base_train.py). Evaluation and generation
# need only model_config. Keys not named here are tolerated, so new state can be added to a
# checkpoint without breaking readers; keys named here are type-checked whenever present.
RESUME_KEYS = ("step", "model_config", "loop_state", "rng", "dataloader_states")
_LOOP_NUMBERS = ("smooth_loss", "min_val_bpb", "val_bpb", "total_training_time", "train_elapsed")
_COUNTS = ("nonfinite_skipped", "nonfinite_streak")
_LOOP_COUNTS = ("step", *_COUNTS)
_DICT_OR_NONE = ("dynamic_suffix", "ema", "auto_lr", "schedule")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(v), type(v).__name__)


def _meta_problems(meta: dict, required) -> list[str]:
    problems = [f"missing '{k}'" for k in required if k not in meta]
    if "step" in meta and not (_is_int(meta["step"]) and meta["step"] >= 0):
        problems.append(f"'step' is {meta['step']!r}, expected an integer >= 0")
    if "model_config" in meta:
        cfg = meta["model_config"]
        if not isinstance(cfg, dict) or not cfg:
            problems.append(f"'model_config' is {_kind(cfg)}, expected a non-empty object")
    if "loop_state" in meta:
        loop = meta["loop_state"]
        if not isinstance(loop, dict):
            problems.append(f"'loop_state' is {_kind(loop)}, expected an object")
        else:  # fields default when absent (nanochat.train_state.TrainState), so only types are checked
            for k in _LOOP_NUMBERS:
                if k in loop and not (_is_number(loop[k]) or (k == "val_bpb" and loop[k] is None)):
                    problems.append(f"'loop_state'.'{k}' is {loop[k]!r}, expected a number")
            for k in _LOOP_COUNTS:
                if k in loop and not (_is_int(loop[k]) and loop[k] >= 0):
                    problems.append(f"'loop_state'.'{k}' is {loop[k]!r}, expected an integer >= 0")
    if "rng" in meta:
        rng = meta["rng"]
        if not isinstance(rng, dict) or "cpu" not in rng:
            problems.append(f"'rng' is {_kind(rng)} without 'cpu', expected {{\"cpu\": base64 of the torch RNG state}}")
        elif not isinstance(rng["cpu"], str):
            problems.append(f"'rng'.'cpu' is {_kind(rng['cpu'])}, expected a base64 string")
        else:
            try:
                n = len(base64.b64decode(rng["cpu"], validate=True))
            except (binascii.Error, ValueError):
                problems.append("'rng'.'cpu' is not valid base64")
            else:
                want = torch.get_rng_state().numel()
                if n != want:
                    problems.append(f"'rng'.'cpu' decodes to {n} bytes, a torch CPU RNG state has {want}")
    if "dataloader_states" in meta and not isinstance(meta["dataloader_states"], list):
        problems.append(f"'dataloader_states' is {_kind(meta['dataloader_states'])}, expected a list (one per rank)")
    for k in _DICT_OR_NONE:
        if k in meta and not (meta[k] is None or isinstance(meta[k], dict)):
            problems.append(f"'{k}' is {_kind(meta[k])}, expected an object or null")
    for k in _COUNTS:
        if k in meta and not (_is_int(meta[k]) and meta[k] >= 0):
            problems.append(f"'{k}' is {meta[k]!r}, expected an integer >= 0")
    return problems


def validate_meta(meta, path: str | os.PathLike, required=RESUME_KEYS) -> None:
    """Check a checkpoint's parsed meta.json before anything uses it; CheckpointError otherwise.

    The message is one line naming `path` and every bad or missing field, e.g.
    ``.../meta.json: damaged checkpoint metadata: missing 'loop_state'; 'step' is 'abc', expected an
    integer >= 0``. `required` lists the top-level keys that must be present (default: all that a
    training resume reads); keys the schema knows are type-checked whenever present; unknown keys
    are accepted.
    """
    path = os.fspath(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata: the file holds {_kind(meta)}, expected an object")
    problems = _meta_problems(meta, required)
    if problems:
        raise CheckpointError(f"{path}: damaged checkpoint metadata: " + "; ".join(problems))


def _check_model_file(state, path: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds {_kind(state)}, expected a dict of parameter name -> tensor")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is {_kind(v)}, expected a tensor under a str name")


def _check_optim_file(state, path: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds {_kind(state)}, expected an optimizer state_dict (a dict)")
    for k, kind in (("state", Mapping), ("param_groups", list)):
        if not isinstance(state.get(k), kind):
            raise CheckpointError(f"{path}: '{k}' is {_kind(state.get(k)) if k in state else 'missing'}, "
                                  f"expected {'a dict' if kind is Mapping else 'a list'} (an optimizer state_dict)")


def _read_manifest(d: str) -> dict:
    path = os.path.join(d, DONE_FILE)
    done = _read_json(path)
    if not isinstance(done, dict):
        raise CheckpointError(f"{path}: damaged checkpoint manifest: holds {_kind(done)}, expected an object")
    hashes = done.get("sha256")
    if hashes is not None and not (isinstance(hashes, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in hashes.items())):
        raise CheckpointError(f"{path}: damaged checkpoint manifest: 'sha256' must map file names to hex digests")
    ws = done.get("world_size")
    if ws is not None and not (_is_int(ws) and ws >= 1):
        raise CheckpointError(f"{path}: damaged checkpoint manifest: 'world_size' is {ws!r}")
    return done


def _verify(path: str, hashes: dict | None) -> None:
    """Compare a file with the hash recorded at save (no-op for checkpoints without hashes)."""
    if hashes is None:
        return
    name = os.path.basename(path)
    if name not in hashes:
        raise CheckpointError(f"{path}: not listed in the checkpoint's manifest ({DONE_FILE}); the checkpoint "
                              f"was changed after it was saved")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        got = file_sha256(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {_os_error_text(e)}") from None
    if got != hashes[name]:
        raise CheckpointError(f"damaged checkpoint file {path}: its sha256 {got[:16]}... differs from the "
                              f"{hashes[name][:16]}... recorded when it was saved; use another step or a good copy")


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_checkpoint(checkpoint_dir: str | os.PathLike, step: int, device: torch.device | str,
                    load_optimizer: bool = True, rank: int = 0, world_size: int | None = None,
                    require_meta=None, warn: Callable[[str], None] | None = None):
    """Load complete checkpoint `step` -> (model_state, optimizer_state or None, meta).

    Tensors land on `device`. The optimizer shard is this rank's ``optim_rank{rank}.pt``; pass
    `world_size` to insist that the checkpoint was written by the same number of ranks (sharded
    optimizer state does not fit another layout). Nothing in the files is ever executed.

    Before a file is used its sha256 is compared with the one recorded in DONE, meta.json is
    checked with `validate_meta` (`require_meta`: the keys that must be present; default: all
    that a resume reads when `load_optimizer`, else none) and must name this step, and model.pt /
    the optimizer shard must hold a state dict. Every problem is one CheckpointError line naming
    the file. A checkpoint saved before hashes were recorded loads unverified, with one line
    ``WARNING: checkpoint <dir> records no content hashes ...`` passed to `warn` (default: printed
    to stderr) on rank 0.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    d = step_dir(checkpoint_dir, step)
    if not _is_complete(d):
        raise CheckpointError(f"no complete checkpoint for step {step} in {checkpoint_dir}; "
                              f"available complete steps: {_available(checkpoint_dir)}")
    done = _read_manifest(d)
    hashes = done.get("sha256")
    if hashes is None and rank == 0:
        (warn or _warn_stderr)(f"WARNING: checkpoint {d} records no content hashes (saved before they were "
                               f"recorded): its files are loaded unverified")
    meta_path = os.path.join(d, META_FILE)
    _verify(meta_path, hashes)
    meta = _read_json(meta_path)
    if require_meta is None:
        require_meta = RESUME_KEYS if load_optimizer else ()
    validate_meta(meta, meta_path, require_meta)
    if "step" in meta and meta["step"] != step:
        raise CheckpointError(f"{meta_path}: damaged checkpoint metadata: 'step' is {meta['step']}, but the "
                              f"directory is step {step}")
    saved_ws = done.get("world_size")
    model_path = os.path.join(d, MODEL_FILE)
    _verify(model_path, hashes)
    model_state = safe_torch_load(model_path, device)
    _check_model_file(model_state, model_path)
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
        _verify(opt_path, hashes)
        optimizer_state = safe_torch_load(opt_path, device)
        _check_optim_file(optimizer_state, opt_path)
    return model_state, optimizer_state, meta


# ---------------------------------------------------------------------------------------------
# one writer per checkpoint directory


class CheckpointLock:
    """An exclusive hold on a checkpoint directory, from `lock_checkpoint_dir` until `release()`
    or process exit. A no-op object (``held`` False) where flock is unavailable."""

    def __init__(self, checkpoint_dir: str, fd: int | None = None):
        self.checkpoint_dir = checkpoint_dir
        self.path = os.path.join(checkpoint_dir, LOCK_FILE)
        self._fd = fd
        self._owner = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the directory back (idempotent). The lock file is removed while still locked, so
        a clean exit leaves nothing behind; a killed run leaves a stale file, which is harmless
        because the kernel dropped its flock."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._owner:
            return  # a forked child shares the parent's lock: only the parent gives it back
        _HELD_LOCKS.pop(os.path.realpath(self.checkpoint_dir), None)
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "CheckpointLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD_LOCKS: dict[str, CheckpointLock] = {}


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def lock_checkpoint_dir(checkpoint_dir: str | os.PathLike) -> CheckpointLock:
    """Claim `checkpoint_dir` for this run: an exclusive, non-blocking flock on ``<dir>/.lock``
    (created with the directory if needed), which holds this process's pid.

    A second run on the same directory gets a one-line CheckpointError naming the directory and
    the holder's pid, instead of two runs interleaving saves and deleting each other's
    checkpoints through retention. The lock lasts until `release()` or process exit (the kernel
    drops a flock when its process dies, so a killed run never leaves the directory locked).
    Calling it again in the process that holds the lock returns the same lock.

    Take it on rank 0 only: the ranks of one run share the directory by design (each writes its
    own optimizer shard), and rank 0 alone decides what the directory holds. Where ``fcntl`` is
    missing (Windows) or the filesystem refuses flock (some network filesystems), nothing is
    locked: the returned lock has ``held`` False (and the latter case prints one WARNING line).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    key = os.path.realpath(checkpoint_dir)
    held = _HELD_LOCKS.get(key)
    if held is not None and held.held:
        return held
    if fcntl is None:
        return CheckpointLock(checkpoint_dir)
    path = os.path.join(checkpoint_dir, LOCK_FILE)
    for _ in range(10):
        try:
            os.makedirs(checkpoint_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create the lock file {path}: {_os_error_text(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"checkpoint dir {checkpoint_dir} is in use by another run (pid {holder}); "
                                      f"wait for it to finish, stop it, or use another model tag") from None
            _warn_stderr(f"WARNING: cannot lock {path} ({_os_error_text(e)}); nothing stops a second run "
                         f"from writing checkpoints here")
            return CheckpointLock(checkpoint_dir)
        # A holder releasing at this moment unlinks the file we opened: lock the one at the path.
        if _same_file(fd, path):
            break
        os.close(fd)
    else:
        raise CheckpointError(f"could not lock {path}: the file kept being replaced")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    lock = _HELD_LOCKS[key] = CheckpointLock(checkpoint_dir, fd)
    return lock


@atexit.register
def _release_held_locks() -> None:
    for lock in list(_HELD_LOCKS.values()):
        lock.release()


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


def format_mismatch(lines: list[str], limit: int = 8) -> str:
    """`diff_model_config` / `check_state_dict_keys` lines as one '; '-joined line, the first
    `limit` of them and a count of the rest."""
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return "; ".join(shown)
