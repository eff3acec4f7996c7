"""Pretraining text shards: listing, the fixed validation split, downloading, integrity checks and
the small embedded sample that lets every script run with no download at all.

Layout (nanochat's `base_data`): `shard_XXXXX.parquet` files with one string column `text`, one
document per row, under `<base_dir>/base_data`. Shards are read one row group at a time, so the
row group is the unit the dataloader shards across ranks and resumes from.

The validation shard is FIXED so that val numbers from runs with different numbers of downloaded
shards stay comparable (a classic trap: "val = last shard present" moves when you download more):

* a downloaded dataset records its name and its val shard (the dataset's LAST shard index, which
  `-n N` always fetches in addition to the N train shards) in `base_data/dataset.json`;
* a directory without `dataset.json` (a local corpus copied or symlinked in, or the embedded
  sample) uses its highest-numbered shard as val; a directory with only one shard is refused,
  since train and val would then be the same text.

CLI:
    python -m nanochat.dataset -n 8                       # 8 ClimbMix train shards + the val shard
    python -m nanochat.dataset -n 8 --dataset fineweb-edu # FineWeb-Edu-100B instead
    python -m nanochat.dataset --build-sample <corpus dir> # rebuild nanochat/data_sample/
"""
from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0


def _one_line(e: BaseException) -> str:
    """`Type: message` with pyarrow's multi-line details joined, so an error stays one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class DataError(Exception):
    """A shard or data directory is unusable (missing, corrupt, truncated, wrong schema).

    The message always names the file or directory, so the user knows what to delete or re-fetch.
    """


class DownloadError(Exception):
    """A shard could not be fetched (offline, HTTP error, or a broken download after retries)."""


# ---------------------------------------------------------------------------------------------
# Datasets that `python -m nanochat.dataset` knows how to download.

# ClimbMix-400B, reshuffled into nanochat-style shards; nanochat's current default pretraining
# mix. 6543 shards in total (indices 0..6542); the last one is the validation shard.
CLIMBMIX_NUM_SHARDS = 6543
# FineWeb-Edu-100B (nanochat's original dataset): indices 0..1822, the last one is validation.
FINEWEB_EDU_NUM_SHARDS = 1823

DATASETS = {
    "climbmix": {
        "base_url": "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        "num_shards": CLIMBMIX_NUM_SHARDS,
    },
    "fineweb-edu": {
        "base_url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        "num_shards": FINEWEB_EDU_NUM_SHARDS,
    },
}
DEFAULT_DATASET = "climbmix"

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
DATASET_JSON = "dataset.json"
TEXT_COLUMN = "text"

# The embedded sample ships inside the package so that tests, CI and first-time users never need
# the network. It is tiny: real training must download shards.
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_sample")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir() -> str:
    """Where downloaded (or copied-in) shards live: `<base_dir>/base_data`."""
    return os.path.join(get_base_dir(), "base_data")


_base_data_dir = data_dir  # functions below take a `data_dir` argument that shadows the name


# ---------------------------------------------------------------------------------------------
# Listing and the train/val split


def list_parquet_files(data_dir: str | None = None) -> list[str]:
    """Full paths of the `shard_XXXXX.parquet` files in `data_dir`, sorted by shard index.

    Only exact shard names count, so temp files of an interrupted download (`*.tmp*`) and stray
    parquet files are never read as data.
    """
    d = data_dir if data_dir is not None else _base_data_dir()
    if not os.path.isdir(d):
        return []
    names = sorted(n for n in os.listdir(d) if SHARD_RE.match(n))
    return [os.path.join(d, n) for n in names]


def read_dataset_json(d: str) -> dict | None:
    """The `dataset.json` record of a downloaded dataset, or None for a plain directory."""
    path = os.path.join(d, DATASET_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset record ({e}); delete it and re-run "
                        f"python -m nanochat.dataset") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("val_shard"), str) \
            or not SHARD_RE.match(meta["val_shard"]):
        raise DataError(f"{path}: malformed dataset record (needs 'dataset' and 'val_shard': "
                        f"'shard_XXXXX.parquet'); delete it and re-run python -m nanochat.dataset")
    return meta


def val_shard_path(data_dir: str | None = None) -> str:
    """The fixed validation shard of a directory (see the module docstring for the rule)."""
    d = data_dir if data_dir is not None else _base_data_dir()
    files = list_parquet_files(d)
    meta = read_dataset_json(d)
    if meta is not None:
        path = os.path.join(d, meta["val_shard"])
        if not os.path.exists(path):
            raise DataError(f"{path}: validation shard recorded in {DATASET_JSON} is missing; "
                            f"re-run python -m nanochat.dataset -n 0 to fetch it")
        return path
    if not files:
        raise DataError(f"{d}: no shard_XXXXX.parquet files found")
    if len(files) == 1:
        raise DataError(f"{d}: only one shard ({os.path.basename(files[0])}); the highest-numbered "
                        f"shard is the validation split, so train and val would be identical. "
                        f"Add at least one more shard")
    return files[-1]


def split_files(split: str, data_dir: str | None = None) -> list[str]:
    """Shard paths of a split: 'val' is the one fixed val shard, 'train' is every other shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d = data_dir if data_dir is not None else _base_data_dir()
    val = val_shard_path(d)
    if split == "val":
        return [val]
    return [f for f in list_parquet_files(d) if os.path.basename(f) != os.path.basename(val)]


_BANNER_SHOWN = False
# Set by a runner once one of its steps has shown the banner: the later steps say it in one line.
SAMPLE_BANNER_ENV = "NANOCHAT_SAMPLE_BANNER_SHOWN"


def resolve_data_dir() -> str:
    """`data_dir()` when it holds shards, else the embedded sample (with a loud banner, once).

    Falling back instead of failing lets a fresh clone run tests, smoke runs and the tokenizer
    trainer offline; the banner makes sure nobody mistakes a few MB of text for a real dataset.
    """
    global _BANNER_SHOWN
    d = data_dir()
    if list_parquet_files(d):
        return d
    if not _BANNER_SHOWN:
        _BANNER_SHOWN = True
        if os.environ.get(SAMPLE_BANNER_ENV) == "1":
            print0(f"data: USING THE EMBEDDED SAMPLE ({d} has no shards; see the banner above)")
            return SAMPLE_DIR
        bar = "!" * 78
        print0("\n".join([
            bar,
            "!!! USING THE EMBEDDED SAMPLE (a few MB of text in nanochat/data_sample/)",
            f"!!! because {d} has no shard_XXXXX.parquet files.",
            "!!! Fine for tests and smoke runs; useless for a real model.",
            "!!! For real training run: python -m nanochat.dataset -n N",
            "!!! (or copy/symlink your own shards there; the highest-numbered one is val).",
            bar,
        ]))
    return SAMPLE_DIR


# ---------------------------------------------------------------------------------------------
# Integrity


def open_shard(path: str) -> pq.ParquetFile:
    """Open a shard, turning any pyarrow/OS failure into a DataError that names the file.

    Reading the footer catches truncation (the footer is at the end of the file) and most
    corruption; damage inside a data page surfaces later, in `read_row_group_texts`.
    """
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated parquet shard ({_one_line(e)}); "
                        f"delete it and re-download") from e
    names = pf.schema_arrow.names
    if TEXT_COLUMN not in names:
        raise DataError(f"{path}: no '{TEXT_COLUMN}' column (columns: {names})")
    col_type = pf.schema_arrow.field(TEXT_COLUMN).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"{path}: column '{TEXT_COLUMN}' has type {col_type}, expected string")
    return pf


def read_row_group_texts(pf: pq.ParquetFile, rg_idx: int, path: str) -> list[str]:
    """The documents of one row group (nulls and empty strings dropped), errors naming the file."""
    try:
        table = pf.read_row_group(rg_idx, columns=[TEXT_COLUMN])
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: row group {rg_idx} is unreadable ({_one_line(e)}); "
                        f"delete the shard and re-download") from e
    return [t for t in table.column(TEXT_COLUMN).to_pylist() if t]


def iter_texts(split: str, data_dir: str | None = None, max_chars: int | None = None,
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in shard/row-group order, for tokenizer training and quick looks.

    `doc_cap` crops each document to that many characters (very long documents would otherwise
    dominate BPE pair counts); iteration stops once `max_chars` characters have been yielded.
    """
    d = data_dir if data_dir is not None else resolve_data_dir()
    seen = 0
    for path in split_files(split, d):
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            for text in read_row_group_texts(pf, rg, path):
                if doc_cap is not None and len(text) > doc_cap:
                    text = text[:doc_cap]
                if max_chars is not None and seen + len(text) > max_chars:
                    text = text[:max_chars - seen]
                    if text:
                        yield text
                    return
                seen += len(text)
                yield text


# ---------------------------------------------------------------------------------------------
# Download


def _is_offline_error(e: BaseException) -> bool:
    """DNS failure or refused/unreachable connection: retrying will not help, say so at once."""
    reason = getattr(e, "reason", e)
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and getattr(reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH))


def download_shard(index: int, dest_dir: str, base_url: str, max_attempts: int = 5,
                   timeout: float = 60.0, backoff: float = 2.0) -> str:
    """Fetch one shard to `dest_dir`, never leaving a partial file under the final name.

    Bytes go to a temp name; the file must open with pyarrow and have a `text` column before it
    is renamed into place (os.replace is atomic), so a crash or a truncated transfer can never
    produce a shard that the loader would trip over later. Retries with exponential backoff.
    """
    name = shard_name(index)
    final = os.path.join(dest_dir, name)
    if os.path.exists(final):
        return final
    url = f"{base_url.rstrip('/')}/{name}"
    tmp = f"{final}.tmp.{os.getpid()}"
    last_err: BaseException | None = None
    for attempt in range(1, max(1, max_attempts) + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the file gets its real name
            open_shard(tmp)  # verify before it gets its real name
            os.replace(tmp, final)
            return final
        # HTTPException covers a connection cut mid-body (http.client.IncompleteRead).
        except (urllib.error.URLError, http.client.HTTPException, OSError, DataError) as e:
            last_err = e
            if _is_offline_error(e):
                raise DownloadError(f"cannot reach {url} ({getattr(e, 'reason', e)}): no network? "
                                    f"Copy shards into {dest_dir} instead, or use the embedded "
                                    f"sample") from e
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                raise DownloadError(f"{url}: HTTP 404 (no such shard)") from e
            if attempt < max_attempts:
                wait = backoff ** attempt
                print0(f"{name}: attempt {attempt}/{max_attempts} failed ({e}); retrying in {wait:.0f}s")
                time.sleep(wait)
        finally:  # success renamed it; any failure (Ctrl-C included) must not leave a partial file
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DownloadError(f"{url}: failed after {max_attempts} attempts ({last_err})")


def download(num_train_shards: int, dataset: str = DEFAULT_DATASET, workers: int = 4,
             dest_dir: str | None = None, base_url: str | None = None, max_attempts: int = 5,
             timeout: float = 60.0) -> list[str]:
    """Fetch the first `num_train_shards` train shards (-1 = all) plus the fixed val shard.

    Writes `dataset.json` first, so even an interrupted download leaves the directory labelled,
    and refuses to mix two datasets in one directory (the val shard would be ambiguous).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    d = dest_dir if dest_dir is not None else data_dir()
    os.makedirs(d, exist_ok=True)
    val_index = spec["num_shards"] - 1
    meta = read_dataset_json(d)
    has_shards = bool(list_parquet_files(d))
    if meta is not None and meta.get("dataset") != dataset and has_shards:
        raise DataError(f"{os.path.join(d, DATASET_JSON)}: this directory holds dataset "
                        f"{meta.get('dataset')!r}, not {dataset!r}; use another NANOCHAT_BASE_DIR")
    if meta is None and has_shards:
        raise DataError(f"{d}: already holds shards with no {DATASET_JSON} (a local corpus); "
                        f"use another NANOCHAT_BASE_DIR for downloads")
    if meta is None or meta.get("dataset") != dataset:  # fresh, or an empty dir labelled for another
        tmp = os.path.join(d, DATASET_JSON + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"dataset": dataset, "val_shard": shard_name(val_index),
                       "num_shards": spec["num_shards"]}, f, indent=1)
        os.replace(tmp, os.path.join(d, DATASET_JSON))
    n = val_index if num_train_shards < 0 else min(num_train_shards, val_index)
    indices = [val_index] + list(range(n))
    url = base_url or spec["base_url"]
    print0(f"Downloading {len(indices)} shards of {dataset} ({n} train + val {shard_name(val_index)}) "
           f"to {d} with {workers} workers")
    t0 = time.time()

    def fetch(i: int) -> tuple[str, bool]:
        present = os.path.exists(os.path.join(d, shard_name(i)))
        return download_shard(i, d, url, max_attempts, timeout), present

    paths: list[str] = [""] * len(indices)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        futures = {ex.submit(fetch, i): k for k, i in enumerate(indices)}
        try:
            # A line per shard as it lands: a shard is ~100 MB, so a download is otherwise silent
            # for minutes.
            for n_done, fut in enumerate(as_completed(futures), 1):
                path, present = fut.result()
                paths[futures[fut]] = path
                what = "already present" if present else f"{os.path.getsize(path) / 1e6:.0f} MB"
                print0(f"[{n_done}/{len(indices)}] {os.path.basename(path)}: {what} ({time.time() - t0:.0f}s)")
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)  # one failure (or Ctrl-C) ends the download
            raise
    print0(f"Done: {len(paths)} shards in {time.time() - t0:.1f}s")
    return paths


# ---------------------------------------------------------------------------------------------
# The embedded sample

SAMPLE_TRAIN_RAW_BYTES = 6_700_000  # ~2.5 MB of zstd parquet
SAMPLE_VAL_RAW_BYTES = 1_150_000    # ~0.4 MB
SAMPLE_ROW_GROUP = 200              # several row groups, so loader sharding/resume get exercised


def _write_shard(texts: list[str], path: str, row_group_size: int) -> None:
    table = pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())})
    tmp = path + ".tmp"
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                   compression_level=9)
    os.replace(tmp, path)


def _sample_docs(paths: list[str], budget: int, seed: int) -> list[str]:
    """A seeded uniform sample of documents (kept in source order) up to `budget` UTF-8 bytes.

    Uniform over documents rather than bytes, so short Wikipedia leads and web pages are as
    likely to be picked as book chunks and every source of the corpus is represented.
    """
    docs = []
    for path in paths:
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            docs.extend(read_row_group_texts(pf, rg, path))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, used = [], 0
    for i in order:
        size = len(docs[i].encode("utf-8"))
        if used + size > budget:
            break
        chosen.append(i)
        used += size
    return [docs[i] for i in sorted(chosen)]


def build_embedded_sample(src_dir: str, dst_dir: str = SAMPLE_DIR,
                          train_raw_bytes: int = SAMPLE_TRAIN_RAW_BYTES,
                          val_raw_bytes: int = SAMPLE_VAL_RAW_BYTES) -> list[str]:
    """Cut the embedded sample from a local corpus directory (deterministic: same input, same bytes).

    train (`shard_00000`) = a seeded document sample of the corpus's train shards; val
    (`shard_00001`, the highest number, hence val) = a sample of the corpus's val shard, so the
    sample keeps the corpus's train/val separation. Only needed to regenerate the sample; nothing
    reads the corpus at run time.
    """
    train = _sample_docs(split_files("train", src_dir), train_raw_bytes, seed=0)
    val = _sample_docs(split_files("val", src_dir), val_raw_bytes, seed=1)
    # The source corpus repeats a few book chunks across its own train and val shards: drop those
    # from val so that no validation document was also trained on.
    seen = set(train)
    val = [doc for doc in val if doc not in seen]
    if not train or not val:
        raise DataError(f"{src_dir}: not enough text to build the sample")
    os.makedirs(dst_dir, exist_ok=True)
    out = [os.path.join(dst_dir, shard_name(0)), os.path.join(dst_dir, shard_name(1))]
    _write_shard(train, out[0], SAMPLE_ROW_GROUP)
    _write_shard(val, out[1], SAMPLE_ROW_GROUP)
    for path, docs in zip(out, (train, val)):
        print0(f"{path}: {len(docs)} docs, {sum(len(t.encode()) for t in docs):,} text bytes, "
               f"{os.path.getsize(path):,} bytes on disk")
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download pretraining shards (plus the fixed val "
                                     "shard) into <base_dir>/base_data, or rebuild the embedded sample.")
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help="number of train shards to download (-1 = all); the val shard is always fetched")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                        help="which dataset to download (default: climbmix, nanochat's current default)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per shard (backoff between)")
    parser.add_argument("--base-url", default=None, help="mirror URL to use instead of huggingface.co")
    parser.add_argument("--build-sample", metavar="CORPUS_DIR", default=None,
                        help="rebuild nanochat/data_sample/ from a local corpus directory and exit")
    args = parser.parse_args(argv)
    try:
        if args.build_sample is not None:
            build_embedded_sample(args.build_sample)
            return 0
        problems = []
        if args.num_files is None:
            problems.append("-n/--num-files is required")
        elif args.num_files < -1:
            problems.append(f"-n must be >= -1, got {args.num_files}")
        if args.num_workers < 1:
            problems.append(f"-w must be >= 1, got {args.num_workers}")
        if args.max_attempts < 1:
            problems.append(f"--max-attempts must be >= 1, got {args.max_attempts}")
        if problems:
            print(f"nanochat.dataset: error: {'; '.join(problems)}", file=sys.stderr)
            return 2
        download(args.num_files, args.dataset, args.num_workers, base_url=args.base_url,
                 max_attempts=args.max_attempts)
    except (DownloadError, DataError) as e:
        print(f"nanochat.dataset: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
