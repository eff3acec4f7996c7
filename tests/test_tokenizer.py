"""Tokenizer training, special tokens, plain-JSON save/load, token_bytes and the tok_train CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.dataset import SAMPLE_DIR, iter_texts
from nanochat.tokenizer import (SPECIAL_TOKENS, Tokenizer, TokenizerError, get_token_bytes, get_tokenizer,
                                train_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_texts("train", SAMPLE_DIR, max_chars=300_000), VOCAB)


@pytest.fixture(scope="module")
def val_text():
    return "\n\n".join(iter_texts("val", SAMPLE_DIR, max_chars=20_000))


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == VOCAB
    n_ranks = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n_ranks, VOCAB))
    assert tok.get_bos_token_id() == n_ranks
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"


def test_round_trip_real_text(tok, val_text):
    ids = tok.encode(val_text)
    assert tok.decode(ids) == val_text
    assert len(ids) < len(val_text.encode("utf-8"))  # it compresses
    odd = "naïve café 日本語 🙂 12345 \r\n\t  x"
    assert tok.decode(tok.encode(odd)) == odd


def test_prepend_and_batch(tok):
    bos = tok.get_bos_token_id()
    assert tok.encode("hi there", prepend="<|bos|>")[0] == bos
    assert tok.encode("hi there", prepend=bos) == [bos] + tok.encode("hi there")
    batch = tok.encode(["a cat", "the dog"], prepend=bos)
    assert batch == [[bos] + tok.encode("a cat"), [bos] + tok.encode("the dog")]
    # special-token text in data stays ordinary text
    assert bos not in tok.encode("<|bos|>")


def test_save_load_round_trip(tok, val_text, tmp_path):
    tok.save(str(tmp_path))
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern
    assert loaded.encode(val_text) == tok.encode(val_text)
    payload = json.loads((tmp_path / "tokenizer.json").read_text())
    assert payload["format_version"] == 1 and set(payload) == {
        "format_version", "pattern", "mergeable_ranks", "special_tokens"}


def test_token_bytes_sum_to_text_bytes(tok, val_text):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert all(tb[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    ids = torch.tensor(tok.encode(val_text, prepend="<|bos|>"))
    assert int(tb[ids].sum()) == len(val_text.encode("utf-8"))


def test_get_tokenizer_from_base_dir(tok, base_dir):
    with pytest.raises(TokenizerError, match="scripts.tok_train"):
        get_tokenizer()
    tok.save(str(base_dir / "tokenizer"))
    assert get_tokenizer().encode("hello world") == tok.encode("hello world")
    assert torch.equal(get_token_bytes(), tok.token_bytes())


@pytest.mark.parametrize("mutate, msg", [
    (lambda p: "{not json", "not valid JSON"),
    (lambda p: json.dumps({**p, "format_version": 7}), "format_version"),
    (lambda p: json.dumps({k: v for k, v in p.items() if k != "pattern"}), "missing keys"),
    (lambda p: json.dumps({**p, "mergeable_ranks": p["mergeable_ranks"][:-1] + [["!!!", 5]]}), "base64"),
    (lambda p: json.dumps({**p, "mergeable_ranks": p["mergeable_ranks"][1:]}), "ranks must be|single byte"),
    (lambda p: json.dumps({**p, "special_tokens": {"<|bos|>": 3}}), "special token ids"),
])
def test_malformed_tokenizer_json(tok, tmp_path, mutate, msg):
    tok.save(str(tmp_path))
    path = tmp_path / "tokenizer.json"
    payload = json.loads(path.read_text())
    path.write_text(mutate(payload))
    with pytest.raises(TokenizerError, match=msg) as e:
        Tokenizer.load(str(tmp_path))
    assert str(path) in str(e.value)


def test_train_rejects_tiny_vocab():
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer(iter(["hello"]), 100)


def test_tok_train_cli_bad_vocab(base_dir):
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size=10"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--vocab-size=10" in lines[0] and "Traceback" not in out.stderr


def test_tok_train_cli_runs(base_dir):
    """End to end on the embedded sample: trains, saves, and the saved files load."""
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=200000", "--vocab-size=400"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "EMBEDDED SAMPLE" in out.stdout and "bytes/token" in out.stdout
    t = Tokenizer.load(str(base_dir / "tokenizer"))
    assert t.get_vocab_size() == 400
    assert get_token_bytes().shape == (400,)


def test_rustbpe_panic_becomes_clear_error(monkeypatch):
    """rustbpe panics derive from BaseException; they must not escape `except Exception` handlers."""
    import rustbpe

    class FakePanic(BaseException):
        pass

    class PanickingBPE:
        def train_from_iterator(self, *a, **k):
            raise FakePanic("index out of bounds")

    monkeypatch.setattr(rustbpe, "Tokenizer", PanickingBPE)
    with pytest.raises(TokenizerError, match="rustbpe training failed.*index out of bounds"):
        train_tokenizer(iter(["hello"]), 300)


# -----------------------------------------------------------------------------
# damaged files: one line naming the file and the way to rebuild it


def _one_line_naming(e, path):
    msg = str(e.value)
    assert str(path) in msg and "python -m scripts.tok_train" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.unlink(), "not found"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "corrupt or truncated tokenizer file"),
    (lambda p: p.write_bytes(b"\x00garbage" * 50),
     "corrupt or truncated tokenizer file|not a plain tensor tokenizer file"),
    (lambda p: torch.save([1, 2, 3], p), "expected a 1-D int32 tensor"),
    (lambda p: torch.save(torch.zeros(VOCAB, dtype=torch.int64), p), "expected a 1-D int32 tensor"),
    (lambda p: torch.save(torch.full((VOCAB,), -1, dtype=torch.int32), p), "negative byte counts"),
    (lambda p: torch.save(torch.ones(7, dtype=torch.int32), p), f"has 7 entries but the vocabulary has {VOCAB}"),
])
def test_damaged_token_bytes(tok, base_dir, damage, needle):
    tok.save(str(base_dir / "tokenizer"))
    path = base_dir / "tokenizer" / "token_bytes.pt"
    damage(path)
    with pytest.raises(TokenizerError, match=needle) as e:
        get_token_bytes(vocab_size=VOCAB)
    _one_line_naming(e, path)


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(b"\xff\xfe\x00binary"), "not valid JSON"),
    (lambda p: p.write_text('{"format_version": 1, "pattern": '), "not valid JSON"),
    (lambda p: (p.unlink(), p.mkdir()), "unreadable"),
    (lambda p: p.write_text("[]"), "malformed tokenizer file"),
])
def test_damaged_tokenizer_json(tok, base_dir, damage, needle):
    tok.save(str(base_dir / "tokenizer"))
    path = base_dir / "tokenizer" / "tokenizer.json"
    damage(path)
    with pytest.raises(TokenizerError, match=needle) as e:
        get_tokenizer()
    _one_line_naming(e, path)


def test_save_on_a_full_disk_is_one_error_and_leaves_no_temp_file(tok, tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: could not write it \(OSError: No space left on dev"):
        tok.save(str(tmp_path))
    assert os.listdir(tmp_path) == []
