"""Shard listing, the fixed val split, integrity errors, the embedded sample and offline download."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (SAMPLE_DIR, DataError, DownloadError, download, iter_texts,
                              list_parquet_files, open_shard, read_row_group_texts, resolve_data_dir,
                              split_files)


def write_shard(path, texts, row_group_size=2):
    pq.write_table(pa.table({"text": texts}), str(path), row_group_size=row_group_size)


def make_shards(d, indices):
    for i in indices:
        write_shard(d / f"shard_{i:05d}.parquet", [f"doc {i} a", f"doc {i} b", f"doc {i} c"])


def test_split_highest_is_val(tmp_path):
    make_shards(tmp_path, [0, 1, 2, 10])
    (tmp_path / "shard_00003.parquet.tmp.123").write_bytes(b"partial")  # ignored
    (tmp_path / "other.parquet").write_bytes(b"x")  # ignored
    files = list_parquet_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 10)]
    assert [os.path.basename(f) for f in split_files("val", str(tmp_path))] == ["shard_00010.parquet"]
    assert [os.path.basename(f) for f in split_files("train", str(tmp_path))] == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]


def test_val_fixed_by_dataset_json(tmp_path):
    """Downloading more train shards must not move the val shard."""
    make_shards(tmp_path, [0, 1, 1822])
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "fineweb-edu", "val_shard": "shard_01822.parquet"}))
    assert os.path.basename(split_files("val", str(tmp_path))[0]) == "shard_01822.parquet"
    make_shards(tmp_path, [2, 3])
    assert os.path.basename(split_files("val", str(tmp_path))[0]) == "shard_01822.parquet"
    assert len(split_files("train", str(tmp_path))) == 4


def test_val_recorded_but_missing(tmp_path):
    make_shards(tmp_path, [0, 1])
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "climbmix", "val_shard": "shard_06542.parquet"}))
    with pytest.raises(DataError, match="shard_06542.parquet"):
        split_files("val", str(tmp_path))


def test_single_shard_refused(tmp_path):
    make_shards(tmp_path, [0])
    with pytest.raises(DataError, match="only one shard"):
        split_files("train", str(tmp_path))


def test_corrupt_and_truncated_shards_name_the_file(tmp_path):
    good = tmp_path / "shard_00000.parquet"
    write_shard(good, ["hello " * 200] * 20)
    data = good.read_bytes()
    truncated = tmp_path / "shard_00001.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "shard_00002.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(DataError, match=str(bad)):
            open_shard(str(bad))
    # damage inside a data page (footer intact) surfaces when the row group is read
    mid = bytearray(data)
    for k in range(4, min(len(mid) - 200, 400)):
        mid[k] ^= 0xFF
    damaged = tmp_path / "shard_00003.parquet"
    damaged.write_bytes(bytes(mid))
    with pytest.raises(DataError, match=str(damaged)):
        pf = open_shard(str(damaged))
        for rg in range(pf.num_row_groups):
            read_row_group_texts(pf, rg, str(damaged))


def test_missing_text_column(tmp_path):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"content": ["a"]}), str(path))
    with pytest.raises(DataError, match="no 'text' column"):
        open_shard(str(path))


def test_embedded_sample_fallback(base_dir, monkeypatch, capsys):
    monkeypatch.setattr(dataset, "_BANNER_SHOWN", False)
    d = resolve_data_dir()
    assert d == SAMPLE_DIR
    out = capsys.readouterr().out
    assert "USING THE EMBEDDED SAMPLE" in out and "python -m nanochat.dataset -n N" in out
    train, val = split_files("train", d), split_files("val", d)
    assert [os.path.basename(f) for f in train] == ["shard_00000.parquet"]
    assert [os.path.basename(f) for f in val] == ["shard_00001.parquet"]
    pf = open_shard(train[0])
    assert pf.num_row_groups >= 5
    # once base_data has shards, they win
    (base_dir / "base_data").mkdir(exist_ok=True)
    make_shards(base_dir / "base_data", [0, 1])
    assert resolve_data_dir() == str(base_dir / "base_data")


def test_iter_texts_caps(tmp_path):
    write_shard(tmp_path / "shard_00000.parquet", ["x" * 50, "y" * 50, "z" * 50])
    write_shard(tmp_path / "shard_00001.parquet", ["val"])
    texts = list(iter_texts("train", str(tmp_path), max_chars=70, doc_cap=30))
    assert texts == ["x" * 30, "y" * 30, "z" * 10]


def test_download_offline_is_clear_and_fast(tmp_path):
    """Port 9 (discard) on localhost refuses the connection: an immediate, clear DownloadError."""
    with pytest.raises(DownloadError, match="no network"):
        download(1, "climbmix", workers=1, dest_dir=str(tmp_path), base_url="http://127.0.0.1:9",
                 max_attempts=3, timeout=2)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".parquet") or ".tmp" in n]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["val_shard"] == f"shard_{dataset.CLIMBMIX_NUM_SHARDS - 1:05d}.parquet"


def test_download_cli_offline_one_line(base_dir, capsys):
    rc = dataset.main(["-n", "1", "--base-url", "http://127.0.0.1:9", "--max-attempts", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "nanochat.dataset: error:" in err and "Traceback" not in err


def test_download_verifies_before_rename(tmp_path, monkeypatch):
    """A transfer that yields a non-parquet body is retried, then reported; no final file appears."""
    import io
    import urllib.request

    class FakeResp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.close()

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResp(b"<html>oops</html>"))
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        dataset.download_shard(0, str(tmp_path), "http://example.invalid", max_attempts=2, backoff=0.0)
    assert os.listdir(tmp_path) == []


def test_mixing_datasets_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "climbmix", "val_shard": "shard_06542.parquet"}))
    # no shards yet: switching dataset just relabels the directory (then fails offline)
    with pytest.raises(DownloadError):
        download(1, "fineweb-edu", dest_dir=str(tmp_path), base_url="http://127.0.0.1:9", max_attempts=1)
    assert json.loads((tmp_path / "dataset.json").read_text())["val_shard"] == "shard_01822.parquet"
    make_shards(tmp_path, [0])
    with pytest.raises(DataError, match="fineweb-edu"):
        download(1, "climbmix", dest_dir=str(tmp_path), base_url="http://127.0.0.1:9", max_attempts=1)
