"""Packing loader: BOS alignment, shapes, determinism, exact resume, rank sharding, errors."""
import itertools
import json
import multiprocessing
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import build_loader, pack_rows
from nanochat.dataset import SAMPLE_DIR, DataError, iter_texts
from nanochat.tokenizer import train_tokenizer

B, T = 4, 64


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_texts("train", SAMPLE_DIR, max_chars=200_000), 384)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """Three train shards with short docs and small row groups (fast to tokenize), plus val."""
    d = tmp_path_factory.mktemp("shards")
    texts = list(iter_texts("train", SAMPLE_DIR, max_chars=150_000, doc_cap=600))
    for i in range(3):
        part = texts[i::3]
        pq.write_table(pa.table({"text": part}), str(d / f"shard_{i:05d}.parquet"), row_group_size=20)
    val = list(iter_texts("val", SAMPLE_DIR, max_chars=20_000, doc_cap=600))
    pq.write_table(pa.table({"text": val}), str(d / "shard_00003.parquet"), row_group_size=20)
    return str(d)


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_pack_rows_best_fit():
    docs = [[0, 1, 1, 1], [0, 2], [0, 3, 3, 3, 3, 3, 3], [0, 4, 4]]
    rows = pack_rows(docs, 8)
    # row 1: largest fitting (7) then crop shortest of the rest ([0,2]) to 1 token
    assert rows[0] == [0, 3, 3, 3, 3, 3, 3, 0]
    # row 2 would be [0,1,1,1] + [0,4,4] = 7 tokens, and no doc is left for the last slot:
    # the partial row is dropped
    assert rows == [[0, 3, 3, 3, 3, 3, 3, 0]]
    docs = [[0] + [5] * 20]
    assert pack_rows(docs, 8) == [[0] + [5] * 7]  # a long doc is cropped to one row


def test_shapes_bos_and_shift(tok, small_dir):
    bos = tok.get_bos_token_id()
    for x, y, state in take(build_loader(tok, B, T, "train", data_dir=small_dir), 6):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert json.loads(json.dumps(state)) == state


def test_deterministic(tok, small_dir):
    a = take(build_loader(tok, B, T, "train", data_dir=small_dir), 8)
    b = take(build_loader(tok, B, T, "train", data_dir=small_dir, prefetch=0), 8)
    for (xa, ya, sa), (xb, yb, sb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb


def test_exact_resume_including_epoch_wrap(tok, small_dir):
    """Resume from every state of a stream that wraps into the next epoch."""
    bs = 8
    full = take(build_loader(tok, bs, T, "val", data_dir=small_dir), 14)
    epochs = {s["epoch"] for _, _, s in full}
    assert {0, 1} <= epochs, epochs  # the val split is small: the stream wraps
    for k in (1, 3, len(full) - 4):
        resumed = take(build_loader(tok, bs, T, "val", data_dir=small_dir, resume_state=full[k - 1][2]), 4)
        for (x1, y1, s1), (x2, y2, s2) in zip(full[k:k + 4], resumed):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1 == s2


def test_rank_sharding_disjoint(tok, small_dir):
    seen = {}
    for rank in (0, 1):
        batches = take(build_loader(tok, 2, T, "train", data_dir=small_dir, rank=rank, world_size=2), 30)
        seen[rank] = batches
        assert all(s["rank"] == rank for _, _, s in batches)
    rg0 = {(s["shard_idx"], s["rg_idx"]) for _, _, s in seen[0]}
    rg1 = {(s["shard_idx"], s["rg_idx"]) for _, _, s in seen[1]}
    assert rg0 and rg1 and not rg0 & rg1
    rows0 = {tuple(r.tolist()) for x, _, _ in seen[0] for r in x}
    rows1 = {tuple(r.tolist()) for x, _, _ in seen[1] for r in x}
    assert not rows0 & rows1
    # a state from rank 0 cannot silently resume rank 1
    with pytest.raises(ValueError, match="rank 0 of 2"):
        build_loader(tok, 2, T, "train", data_dir=small_dir, rank=1, world_size=2,
                     resume_state=seen[0][-1][2])


def test_embedded_sample_default(tok, base_dir):
    """With an empty base dir the loader reads the embedded sample (several row groups)."""
    x, y, state = next(build_loader(tok, 2, 256, "val"))
    assert x.shape == (2, 256) and state["shard_idx"] == 0


def test_no_rows_is_a_clear_error(tok, tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"text": ["hi", "yo"]}), str(tmp_path / f"shard_{i:05d}.parquet"))
    with pytest.raises(DataError, match="no complete rows.*shard_00000.parquet"):
        next(build_loader(tok, 2, 512, "train", data_dir=str(tmp_path)))


def test_bad_arguments(tok, small_dir):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tok, 0, T, "train", data_dir=small_dir)
    with pytest.raises(ValueError, match="seq_len=32"):
        state = next(build_loader(tok, B, 32, "train", data_dir=small_dir))[2]
        build_loader(tok, B, T, "train", data_dir=small_dir, resume_state=state)


def test_eval_loader_rows_do_not_depend_on_world_size(tok):
    """Over W ranks the eval loader yields exactly the batches one process reads (interleaved)."""
    from nanochat.dataloader import build_eval_loader
    one = [x for x, _, _ in itertools.islice(build_eval_loader(tok, 2, 32, "val"), 6)]
    r0 = [x for x, _, _ in itertools.islice(build_eval_loader(tok, 2, 32, "val", rank=0, world_size=2), 3)]
    r1 = [x for x, _, _ in itertools.islice(build_eval_loader(tok, 2, 32, "val", rank=1, world_size=2), 3)]
    for i in range(3):
        assert torch.equal(one[2 * i], r0[i]) and torch.equal(one[2 * i + 1], r1[i])


def test_worker_process_yields_exactly_the_in_process_batches(tok, small_dir, tmp_path):
    """The loader process (used on GPUs) gives the same batches and states as the in-process
    loader, resumes from a state exactly, and reports a failure in the worker as one DataError."""
    from nanochat.dataloader import build_train_loader
    kw = dict(world_size=2, rank=1, grad_accum_steps=2, data_dir=small_dir)
    want = take(build_train_loader(tok, B, T, "train", **kw), 12)
    got = take(build_train_loader(tok, B, T, "train", worker_process=True, queue_batches=3, **kw), 12)
    for (x1, y1, s1), (x2, y2, s2) in zip(want, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1 == s2
    resumed = take(build_train_loader(tok, B, T, "train", worker_process=True, resume_state=want[5][2], **kw), 3)
    for (x1, _, s1), (x2, _, s2) in zip(want[6:9], resumed):
        assert torch.equal(x1, x2) and s1 == s2
    # SIGTERM to the process group must not kill the worker: the trainer finishes its step first.
    loader = build_train_loader(tok, B, T, "train", worker_process=True, queue_batches=2, **kw)
    first = next(loader)
    child = [p for p in multiprocessing.active_children() if p.name == "nanochat-train-loader"]
    assert len(child) == 1
    os.kill(child[0].pid, signal.SIGTERM)
    rest = take(loader, 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip([first, *rest], want[:6]))
    loader.close()
    child[0].join(timeout=10)
    assert not child[0].is_alive()
    # A problem found before the worker starts keeps its own type; one found in the worker is a DataError.
    with pytest.raises(ValueError, match="grad_accum_steps"):
        build_train_loader(tok, B, T, "train", worker_process=True, world_size=1, grad_accum_steps=0, data_dir=small_dir)
    for i in range(2):
        pq.write_table(pa.table({"text": ["hi", "yo"]}), str(tmp_path / f"shard_{i:05d}.parquet"))
    with pytest.raises(DataError, match="data loader process: DataError: .*no complete rows"):
        next(build_train_loader(tok, 2, 512, "train", worker_process=True, data_dir=str(tmp_path)))


def test_worker_process_death_is_reported(tok, small_dir):
    """If the loader process dies (OOM killer, a crash), the trainer gets a DataError that says
    so once the batches already received are used up, instead of waiting forever."""
    from nanochat.dataloader import DataError, build_train_loader
    loader = build_train_loader(tok, B, T, "train", worker_process=True, queue_batches=2, data_dir=small_dir)
    next(loader)
    child = [p for p in multiprocessing.active_children() if p.name == "nanochat-train-loader"]
    assert len(child) == 1
    os.kill(child[0].pid, signal.SIGKILL)
    with pytest.raises(DataError, match="data loader process died"):
        for _ in range(20):  # at most the 2 queued + 4 moved to this process's side
            next(loader)


def _priority_probe(q):
    from nanochat.dataloader import _yield_cpu_to_trainer
    _yield_cpu_to_trainer()
    import pyarrow
    q.put((os.nice(0), pyarrow.cpu_count()))


def test_loader_process_yields_the_cpu_to_the_trainer():
    """The loader process runs at a lower priority with a small pyarrow pool, so a row-group
    refill cannot take every core from the thread that launches the GPU's kernels."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_priority_probe, args=(q,))
    p.start()
    nice, cpus = q.get(timeout=60)
    p.join(timeout=10)
    assert cpus == 2
    assert nice >= min(os.nice(0) + 10, 19)  # capped at 19; unchanged only where renicing is refused
