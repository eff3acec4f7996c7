"""BOS-aligned best-fit packing dataloader: deterministic, rank-sharded, exactly resumable.

Why this design:
* **BOS-aligned rows.** Every row of T+1 tokens starts at a document's BOS, so no row opens in
  the middle of a document whose start the model cannot see.
* **Best-fit cropping, no padding.** A row is filled with the largest remaining document that fits;
  when none fits, the shortest remaining document is cropped to fill the row exactly (its tail is
  dropped). Every token in a batch is a real token that is trained on.
* **Row group = unit of work.** Packing restarts for each parquet row group (a trailing partial row
  is dropped), so each row group deterministically yields the same list of rows regardless of
  what came before. That makes the position (epoch, shard, row group, rows consumed) a complete
  resume state: re-pack that one row group, skip the consumed rows, and the stream continues
  bit-identically.
* **Ranks** take row groups round-robin by their index within the epoch (counter % world_size ==
  rank), so ranks never see the same document. The state is per rank: save each rank's.
* **Training streams** (`build_train_loader`): the trainer reads the split as world_size x
  grad_accum_steps such "ranks" (streams) and each step takes one batch from every stream, so a
  step sees the same rows on 1 GPU with 2 accumulation steps as on 2 GPUs with 1.
"""
from __future__ import annotations

import bisect
import multiprocessing as mp
import os
import signal
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, Full
from queue import Queue as LocalQueue
from typing import Iterator

import pyarrow as pa
import torch

from nanochat.common import print0

from nanochat.dataset import DataError, open_shard, read_row_group_texts, resolve_data_dir, split_files

STATE_KEYS = ("epoch", "shard_idx", "rg_idx", "row_offset", "rank", "world_size", "seq_len")


def pack_rows(docs: list[list[int]], row_len: int) -> list[list[int]]:
    """Pack token lists (each starting with BOS) into rows of exactly `row_len` tokens.

    Deterministic best fit: each row is built by repeatedly taking the largest remaining document
    that fits in the space left (earliest document on ties); if none fits, the shortest remaining
    document is cropped to fill the space exactly (cropping the shortest wastes the fewest
    tokens). Since every document starts with BOS, so does every row. Documents still unplaced
    when the last row cannot be completed are dropped with it.
    """
    # Sorted (length, index) keys: bisect finds "largest that fits" in O(log n).
    pool = sorted((len(d), i) for i, d in enumerate(docs) if d)
    rows = []
    row: list[int] = []
    while pool:
        space = row_len - len(row)
        # Largest length <= space; among equal lengths the smallest index (hence the -1 trick).
        j = bisect.bisect_right(pool, (space, len(docs))) - 1
        if j >= 0:
            length = pool[j][0]
            k = bisect.bisect_left(pool, (length, -1))  # earliest doc of that length
            _, i = pool.pop(k)
            row.extend(docs[i])
        else:
            _, i = pool.pop(0)  # shortest; all remaining are longer than the space
            row.extend(docs[i][:space])
        if len(row) == row_len:
            rows.append(row)
            row = []
    return rows


def _describe(files: list[str]) -> str:
    """File list for error messages: all of a short list, else the first few and a count."""
    if len(files) <= 4:
        return ", ".join(files)
    return ", ".join(files[:3]) + f", ... ({len(files)} files)"


def _validate_state(state: dict, rank: int, world_size: int, seq_len: int) -> dict:
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS[:4]):
        raise ValueError(f"resume_state must be a dict with keys {list(STATE_KEYS)}, got {state!r}")
    for k in STATE_KEYS:
        if k in state and (not isinstance(state[k], int) or state[k] < 0):
            raise ValueError(f"resume_state[{k!r}] must be a non-negative int, got {state[k]!r}")
    got = (state.get("rank", rank), state.get("world_size", world_size))
    if got != (rank, world_size):
        raise ValueError(f"resume_state was saved by rank {got[0]} of {got[1]}, but this loader is "
                         f"rank {rank} of {world_size}; save and restore each rank's own state")
    if state.get("seq_len", seq_len) != seq_len:
        raise ValueError(f"resume_state was saved with seq_len={state['seq_len']}, this loader has "
                         f"seq_len={seq_len}; rows would not line up, so resume is not exact")
    return state


class _DeviceCopier:
    """Host (B, T) int64 batches -> `device`. On CUDA through two pinned buffers, each with an
    event, so the copy is asynchronous and a buffer is never overwritten before its copy is done."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.slots: list = []
        self.step = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type != "cuda":
            return x.contiguous().to(self.device), y.contiguous().to(self.device)
        if len(self.slots) < 2:
            self.slots.append((torch.empty(x.shape, dtype=x.dtype, pin_memory=True),
                               torch.empty(y.shape, dtype=y.dtype, pin_memory=True), None))
        i = self.step % 2
        x_buf, y_buf, event = self.slots[i]
        if event is not None:
            event.synchronize()
        x_buf.copy_(x)
        y_buf.copy_(y)
        out = x_buf.to(self.device, non_blocking=True), y_buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.slots[i] = (x_buf, y_buf, event)
        self.step += 1
        return out


def build_loader(tokenizer, batch_size: int, seq_len: int, split: str, device="cpu", rank: int = 0,
                 world_size: int = 1, resume_state: dict | None = None, data_dir: str | None = None,
                 tokenizer_threads: int = 4, prefetch: int = 2
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Infinite iterator of (inputs, targets, state): int64 (B, T) tensors on `device`.

    `state` (plain ints, JSON-serialisable) is the position after this batch; passing it as
    `resume_state` to a new loader makes its first batch equal to this loader's next one. Both
    splits loop forever (epoch += 1 when the files run out); evaluation takes N batches from a
    fresh loader. `prefetch` row groups are read and tokenized in one background thread (order is
    fixed, so this changes nothing but speed; 0 = all in the caller's thread).
    """
    problems = []
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        problems.append(f"seq_len must be a positive int, got {seq_len!r}")
    if split not in ("train", "val"):
        problems.append(f"split must be 'train' or 'val', got {split!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        problems.append(f"need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if resume_state is not None:
        resume_state = _validate_state(resume_state, rank, world_size, seq_len)

    d = data_dir if data_dir is not None else resolve_data_dir()
    files = split_files(split, d)
    if not files:
        raise DataError(f"{d}: the {split} split has no shards")
    num_rgs = [open_shard(p).num_row_groups for p in files]
    total_rgs = sum(num_rgs)
    if total_rgs <= rank:
        raise DataError(f"the {split} split has {total_rgs} row groups in {_describe(files)}, too few for "
                        f"rank {rank} of {world_size} to get any")
    rg_base = [sum(num_rgs[:i]) for i in range(len(files))]  # counter of each shard's first rg
    if resume_state is not None:
        s0, r0 = resume_state["shard_idx"], resume_state["rg_idx"]
        if s0 >= len(files) or r0 >= num_rgs[s0]:
            raise ValueError(f"resume_state points at shard {s0} row group {r0}, beyond the "
                             f"{split} files {_describe(files)}; did the data directory change?")
        if (rg_base[s0] + r0) % world_size != rank:
            raise ValueError(f"resume_state points at a row group of another rank "
                             f"(shard {s0}, row group {r0}); did the data directory change?")

    def positions(start: dict | None):
        """(epoch, shard_idx, rg_idx) of this rank's row groups, forever, from `start` on."""
        epoch, s0, r0 = (start["epoch"], start["shard_idx"], start["rg_idx"]) if start else (0, 0, 0)
        while True:
            for s in range(s0, len(files)):
                for r in range(r0 if s == s0 else 0, num_rgs[s]):
                    if (rg_base[s] + r) % world_size == rank:
                        yield epoch, s, r
            epoch, s0, r0 = epoch + 1, 0, 0

    open_files: dict[int, object] = {}

    def load_rows(pos) -> torch.Tensor:
        """Read, tokenize and pack one row group: (num_rows, T+1) int64 tensor on CPU."""
        _, s, r = pos
        if s not in open_files:
            open_files.clear()  # one shard open at a time
            open_files[s] = open_shard(files[s])
        texts = read_row_group_texts(open_files[s], r, files[s])
        docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=tokenizer_threads)
        rows = pack_rows(docs, seq_len + 1)
        if not rows:
            return torch.empty((0, seq_len + 1), dtype=torch.int64)
        return torch.tensor(rows, dtype=torch.int64)

    def generate():
        pos_iter = positions(resume_state)
        skip = resume_state["row_offset"] if resume_state else 0
        executor = ThreadPoolExecutor(max_workers=1) if prefetch > 0 else None
        pending: deque = deque()

        def next_rows():
            if executor is None:
                pos = next(pos_iter)
                return pos, load_rows(pos)
            while len(pending) <= prefetch:
                pos = next(pos_iter)
                pending.append((pos, executor.submit(load_rows, pos)))
            pos, fut = pending.popleft()
            return pos, fut.result()

        to_device = _DeviceCopier(device)
        try:
            batch_rows: list[torch.Tensor] = []
            n_in_batch = 0
            epoch_rows, cur_epoch = 0, None
            while True:
                pos, rows = next_rows()
                if pos[0] != cur_epoch:
                    if cur_epoch is not None and epoch_rows == 0:
                        raise DataError(f"the {split} split yields no complete rows of {seq_len + 1} "
                                        f"tokens for rank {rank} of {world_size} from {_describe(files)} "
                                        f"(too little text per row group?)")
                    cur_epoch, epoch_rows = pos[0], 0
                epoch_rows += rows.shape[0]
                start = min(skip, rows.shape[0])
                skip = 0
                while start < rows.shape[0]:
                    take = min(batch_size - n_in_batch, rows.shape[0] - start)
                    batch_rows.append(rows[start:start + take])
                    n_in_batch += take
                    start += take
                    if n_in_batch < batch_size:
                        continue
                    batch = torch.cat(batch_rows) if len(batch_rows) > 1 else batch_rows[0]
                    batch_rows, n_in_batch = [], 0
                    state = {"epoch": pos[0], "shard_idx": pos[1], "rg_idx": pos[2], "row_offset": start,
                             "rank": rank, "world_size": world_size, "seq_len": seq_len}
                    x, y = to_device(batch[:, :-1], batch[:, 1:])
                    yield x, y, state
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    return generate()


# ---------------------------------------------------------------------------------------------
# Training data for data-parallel runs: the same rows per optimizer step at any world size


def stream_ids(rank: int, world_size: int, grad_accum_steps: int) -> list[int]:
    """The streams that `rank` reads, in micro-step order: micro-step k of rank r reads stream
    k * world_size + r, so global micro-batch i is rank i % world_size's (a single process with
    world_size * grad_accum_steps micro-steps reads stream i at micro-step i)."""
    return [k * world_size + rank for k in range(grad_accum_steps)]


def build_train_loader(tokenizer, batch_size: int, seq_len: int, split: str = "train", device="cpu", rank: int = 0,
                       world_size: int = 1, grad_accum_steps: int = 1, resume_state: dict | None = None,
                       data_dir: str | None = None, worker_process: bool = False, queue_batches: int = 16,
                       **kwargs) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """The trainer's loader: infinite (inputs, targets, state) micro-batches for this rank.

    `worker_process=True` reads, tokenizes and packs in a separate (spawned) process that keeps
    up to `queue_batches` micro-batches ready; this process only copies them to the device. Use it
    when a GPU is being fed: done in a thread of the training process, the Python half of that
    work (list building, packing) competes for the GIL with the thread that launches the kernels,
    and on an H100 at the d12 anchor config that makes every ~20th step 100-300 ms instead of 72 ms
    (11 % of the throughput). The batches and states are exactly those of the in-process loader.

    The split is read as D = world_size * grad_accum_steps streams, stream j being what
    `build_loader(rank=j, world_size=D)` yields (row groups round-robin, so streams are
    disjoint). Every optimizer step takes the next batch of each stream once; this rank cycles
    through its own streams (`stream_ids`). Hence the rows of a step depend only on D, i.e. on
    --total-batch-size / (--device-batch-size * --max-seq-len), never on how D splits into ranks
    and accumulation steps: 2 ranks x 1 micro-step train on exactly what 1 rank x 2 micro-steps
    does, and no rank tokenizes another rank's data.

    `state` (JSON-serialisable) is the position after this batch: {"num_streams", "stream_ids",
    "streams" (each stream's `build_loader` state, None before its first batch), "next" (the
    micro-step index of the next batch)}. Pass it back as `resume_state`, or regroup the states of
    every rank with `train_resume_state`.
    """
    if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
        raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}")
    if worker_process:
        return _process_loader(dict(tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, split=split,
                                    rank=rank, world_size=world_size, grad_accum_steps=grad_accum_steps,
                                    resume_state=resume_state, data_dir=data_dir, **kwargs), device, queue_batches)
    num_streams = world_size * grad_accum_steps
    ids = stream_ids(rank, world_size, grad_accum_steps)
    subs: list = [None] * grad_accum_steps
    first = 0
    if resume_state is not None:
        keys = ("num_streams", "stream_ids", "streams", "next")
        if not isinstance(resume_state, dict) or any(k not in resume_state for k in keys):
            raise ValueError(f"resume_state must be a dict with keys {', '.join(keys)} (a state of "
                             f"build_train_loader), got {resume_state!r}")
        saved = (resume_state["num_streams"], list(resume_state["stream_ids"]))
        if saved != (num_streams, ids):
            raise ValueError(f"resume_state holds streams {saved[1]} of {saved[0]}, but rank {rank} of {world_size} "
                             f"with {grad_accum_steps} accumulation steps reads streams {ids} of {num_streams}; "
                             f"regroup saved states with train_resume_state")
        subs = list(resume_state["streams"])
        first = resume_state["next"]
        if len(subs) != grad_accum_steps or not (isinstance(first, int) and 0 <= first < grad_accum_steps):
            raise ValueError(f"resume_state has {len(subs)} stream states and next={first!r}; expected "
                             f"{grad_accum_steps} and 0 <= next < {grad_accum_steps}")
    loaders = []
    for sid, sub in zip(ids, subs):
        try:
            loaders.append(build_loader(tokenizer, batch_size, seq_len, split, device=device, rank=sid,
                                        world_size=num_streams, resume_state=sub, data_dir=data_dir, **kwargs))
        except DataError as e:
            raise DataError(f"{e} (the {split} split is read as {num_streams} streams = {world_size} ranks x "
                            f"{grad_accum_steps} accumulation steps; each stream needs its own row groups)") from e

    def generate():
        k = first
        states = list(subs)
        while True:
            x, y, states[k] = next(loaders[k])
            k = (k + 1) % grad_accum_steps
            yield x, y, {"num_streams": num_streams, "stream_ids": list(ids), "streams": list(states), "next": k}

    return generate()


def _yield_cpu_to_trainer() -> None:
    """Make this process the one that waits when CPUs are busy. The trainer's launching thread
    must never be descheduled: if it is, the GPU runs dry. pyarrow decodes a row group with a pool
    of one thread per core, and the tokenizer adds its own threads, so a row-group refill could
    occupy every core at once. Lower priority (nice +10) and a 2-thread pyarrow pool keep the
    refill in the background; the queue of ready batches covers the slower refill."""
    try:
        os.nice(10)
    except OSError:
        pass  # not permitted here: run at normal priority
    pa.set_cpu_count(2)


def _loader_process_main(queue, loader_kwargs: dict, parent_pid: int) -> None:
    """Body of the loader process: the in-process train loader on the CPU, batch by batch into
    `queue` (waiting while it is full); an exception is sent as one line and ends the process.

    SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a scheduler's preemption) are ignored:
    the trainer handles them by finishing its step, which may still need batches, then stops this
    process itself. If the trainer dies without doing so, the wait on a full queue notices that
    this process has been re-parented and exits instead of lingering."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _yield_cpu_to_trainer()

    def put(item) -> bool:
        while True:
            try:
                queue.put(item, timeout=2)
                return True
            except Full:
                if os.getppid() != parent_pid:
                    return False

    try:
        for x, y, state in build_train_loader(device="cpu", **loader_kwargs):
            if not put((x.numpy(), y.numpy(), state)):
                return
    except Exception as e:  # noqa: BLE001 (reported to the training process, which raises it)
        put(f"{type(e).__name__}: {e}")


def _process_loader(loader_kwargs: dict, device, queue_batches: int):
    # Validate in this process first (cheap: the generators are lazy), so a bad argument or a
    # missing split raises here with its own type and message instead of from the worker.
    build_train_loader(device="cpu", **loader_kwargs)
    ctx = mp.get_context("spawn")  # fork is unsafe here: CUDA and pyarrow/tokenizer threads exist
    queue = ctx.Queue(maxsize=max(1, queue_batches))
    proc = ctx.Process(target=_loader_process_main, args=(queue, loader_kwargs, os.getpid()), daemon=True,
                       name="nanochat-train-loader")
    proc.start()
    to_device = _DeviceCopier(device)
    ready: LocalQueue = LocalQueue(maxsize=4)
    stop = threading.Event()

    def pump():
        """Move batches from the process queue to `ready`, in a thread of this process. Reading one
        (~0.5 MB, pickled) takes several pipe-sized chunks, each written by the loader process's
        feeder thread when it gets that process's GIL; while the loader packs a row group in Python
        that can take tens of ms (on 2 CPU cores: median 1.3 ms, worst 49 ms per read). Done here,
        that wait never holds up the thread that launches the GPU's kernels. A message (str) ends it."""
        while not stop.is_set():
            try:
                item = queue.get(timeout=1)
            except Empty:
                if not proc.is_alive():
                    offer(f"the data loader process died (exit code {proc.exitcode})")
                    return
                continue
            offer(f"data loader process: {item}" if isinstance(item, str) else item)
            if isinstance(item, str):
                return

    def offer(item) -> None:
        """Put `item` into `ready`, giving up once the consumer has stopped (a full queue would
        otherwise block this thread forever)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=1)
                return
            except Full:
                pass

    reader = threading.Thread(target=pump, name="nanochat-train-loader-pump", daemon=True)
    reader.start()

    def generate():
        try:
            while True:
                item = ready.get()
                if isinstance(item, str):
                    raise DataError(item)
                x, y, state = item
                yield (*to_device(torch.from_numpy(x), torch.from_numpy(y)), state)
        finally:
            stop.set()
            proc.kill()  # it ignores SIGTERM (see _loader_process_main)
            proc.join(timeout=5)

    return generate()


def train_resume_state(saved: list, rank: int, world_size: int, grad_accum_steps: int) -> dict | None:
    """This rank's `build_train_loader` resume state from the states every rank saved at a step
    boundary (a checkpoint's list, one per saving rank). The streams are regrouped by id, so a
    run may resume on another world size as long as D = world_size * grad_accum_steps is the
    same (the same --total-batch-size, --device-batch-size and --max-seq-len). A bare
    `build_loader` state (older checkpoints: rank r of W) counts as stream r of W. None when no
    rank had consumed a batch yet (start fresh). Raises ValueError when the data cannot resume exactly."""
    by_id: dict[int, dict | None] = {}
    saved_streams = None
    for i, st in enumerate(saved):
        if st is None:
            continue
        if isinstance(st, dict) and "streams" in st:
            if st.get("next") != 0:
                raise ValueError(f"saved data state {i} was taken in the middle of an optimizer step (next "
                                 f"micro-step {st.get('next')}); only step-boundary states can be regrouped")
            n, pairs = st["num_streams"], list(zip(st["stream_ids"], st["streams"]))
        elif isinstance(st, dict) and "world_size" in st and "rank" in st:
            n, pairs = st["world_size"], [(st["rank"], st)]
        else:
            raise ValueError(f"saved data state {i} is not a loader state: {st!r}")
        if saved_streams not in (None, n):
            raise ValueError(f"saved data states disagree on the number of streams ({saved_streams} vs {n})")
        saved_streams = n
        by_id.update(pairs)
    if saved_streams is None:
        return None
    num_streams = world_size * grad_accum_steps
    if saved_streams != num_streams:
        raise ValueError(f"the checkpoint read the training data as {saved_streams} streams (world size x accumulation "
                         f"steps), this run reads {num_streams} ({world_size} ranks x {grad_accum_steps}); keep "
                         f"--total-batch-size / (--device-batch-size x --max-seq-len) = {saved_streams} so the data "
                         f"order resumes exactly")
    ids = stream_ids(rank, world_size, grad_accum_steps)
    return {"num_streams": num_streams, "stream_ids": ids, "streams": [by_id.get(j) for j in ids], "next": 0}


def build_eval_loader(tokenizer, batch_size: int, seq_len: int, split: str = "val", device="cpu", rank: int = 0,
                      world_size: int = 1, data_dir: str | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Evaluation batches that do not depend on the world size: every rank reads the split as one
    stream and keeps batches rank, rank + W, rank + 2W, ..., so the first n * W batches over all
    ranks are exactly the first n * W batches one process reads and val bpb is measured on the
    same tokens however many ranks there are. (Each rank tokenizes the whole stream; the val
    shard is small.) Ends at the end of the split, with one warning, instead of wrapping around:
    a row is never counted twice, and an --eval-tokens far beyond the split cannot turn one
    evaluation into hours of re-reading it."""
    stream = build_loader(tokenizer, batch_size, seq_len, split, device=device, rank=0, world_size=1,
                          data_dir=data_dir)
    for i, (x, y, state) in enumerate(stream):
        if state.get("epoch", 0) > 0:
            print0(f"WARNING: evaluation wrapped around the {split} split after {i} batches: it stops there, so val "
                   f"bpb is measured on those {i * batch_size * seq_len:,} tokens (each row once); lower "
                   f"--eval-tokens to at most {i * batch_size * seq_len:,} to silence this")
            stream.close()
            return
        if i % world_size == rank:
            yield x, y, state
