"""BPE tokenizer: trained with rustbpe, run with tiktoken, stored as plain JSON.

rustbpe learns the merges fast (a 32k vocab on the project corpus in ~10 s) but is slow at
inference; tiktoken encodes fast but cannot train. So training produces mergeable ranks with
rustbpe and everything else goes through a `tiktoken.Encoding` built from those ranks. Nothing
here downloads anything (`tiktoken.get_encoding` would, so it is never used).

Storage is `tokenizer.json` (never pickle: loading a pickle runs arbitrary code), plus
`token_bytes.pt`, the per-token UTF-8 byte counts used to turn a loss in nats/token into
bits per byte, a metric that does not depend on the vocabulary.

Every failure a user can meet here (a missing, unreadable, damaged or tampered tokenizer file, a
failed training or save) is a `TokenizerError` whose message is one line that names the file and,
for stored files, says how to rebuild them (``python -m scripts.tok_train``). Entry points catch
`TokenizerError` and print that line; nothing else escapes for bad files.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from typing import Iterable

import tiktoken
import torch

from nanochat.common import get_base_dir, print0

# GPT-4's split pattern with numbers split into groups of at most 2 digits (instead of 3): with
# small vocabularies, fewer 3-digit number tokens leaves room for more useful merges.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# nanochat's special tokens. They take the ids right after the mergeable ranks. Ordinary text that
# happens to contain e.g. "<|bos|>" is encoded as plain text, never as the special token.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
BOS = "<|bos|>"
FORMAT_VERSION = 1
TOKENIZER_JSON = "tokenizer.json"
TOKEN_BYTES_PT = "token_bytes.pt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # at least one merge


REBUILD = "rebuild it with python -m scripts.tok_train"


class TokenizerError(Exception):
    """Training or saving failed, or a stored tokenizer file (tokenizer.json, token_bytes.pt) is
    missing, unreadable, damaged or unsafe. The message is one line naming the file and the fix;
    callers catch this class (it is not a ValueError or OSError) and print the message."""


class Tokenizer:
    """A tiktoken Encoding plus nanochat's special tokens and plain-JSON save/load."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 pattern: str = SPLIT_PATTERN):
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern,
                                     mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens[BOS]

    # -- basic queries ----------------------------------------------------------------------
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"unknown special token {name!r}; known: {list(self.special_tokens)}")
        return self.special_tokens[name]

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (bytes decoded with replacement, so partial UTF-8 shows as \ufffd)."""
        return self.enc.decode([token_id])

    # -- encode / decode ----------------------------------------------------------------------
    def _special_id(self, tok: int | str | None) -> int | None:
        if tok is None or isinstance(tok, int):
            return tok
        return self.encode_special(tok)

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Token ids of a string, or a list of id lists for a list of strings (batched, threaded).

        `prepend`/`append` take a special-token string (e.g. "<|bos|>") or an id. Special-token
        text inside `text` is encoded as ordinary text, so data can never inject control tokens.
        """
        pre, post = self._special_id(prepend), self._special_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects str or list of str, got {type(text).__name__}")
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if pre is not None:
            for ids in batch:
                ids.insert(0, pre)
        if post is not None:
            for ids in batch:
                ids.append(post)
        return batch

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    # -- bits per byte --------------------------------------------------------------------------
    def token_bytes(self) -> torch.Tensor:
        """int32 tensor [vocab]: UTF-8 byte length of each token, 0 for special tokens.

        Summing it over the target ids gives the number of text bytes predicted, so
        bpb = sum(loss_nats) / (ln 2 * sum(bytes)); specials count 0 so they are left out.
        """
        out = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        for tok, rank in self.mergeable_ranks.items():
            out[rank] = len(tok)
        return out

    # -- storage ------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write `tokenizer.json` and `token_bytes.pt` to `directory` (each via temp + rename)."""
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise TokenizerError(f"{directory}: cannot create it ({type(e).__name__}: {e.strerror or e})") from None
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        payload = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "mergeable_ranks": [[base64.b64encode(tok).decode("ascii"), rank] for tok, rank in ranks],
            "special_tokens": self.special_tokens,
        }
        token_bytes = io.BytesIO()
        torch.save(self.token_bytes(), token_bytes)
        path = os.path.join(directory, TOKENIZER_JSON)
        _write_file(path, json.dumps(payload).encode("utf-8"))
        _write_file(os.path.join(directory, TOKEN_BYTES_PT), token_bytes.getvalue())
        return path

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """Load and validate `directory/tokenizer.json`; any problem is a one-line TokenizerError."""
        path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.exists(path):
            raise TokenizerError(f"{path}: not found; train one with python -m scripts.tok_train")
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except OSError as e:
            raise TokenizerError(f"{path}: unreadable ({type(e).__name__}: {e.strerror or e}); {REBUILD}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise TokenizerError(f"{path}: not valid JSON ({_first_line(e)}); {REBUILD}") from None
        ranks, specials, pattern = _validate_payload(payload, path)
        try:
            return cls(ranks, specials, pattern)
        except Exception as e:  # noqa: BLE001 (tiktoken raises plain ValueError for a bad regex etc.)
            raise TokenizerError(f"{path}: tiktoken rejected it ({type(e).__name__}: {_first_line(e)}); "
                                 f"{REBUILD}") from None


def _write_file(path: str, data: bytes) -> None:
    """Write via temp + rename, so a reader never sees half a file; an OSError (disk full, no
    permission) removes the temp file and becomes a TokenizerError naming `path`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TokenizerError(f"{path}: could not write it ({type(e).__name__}: {e.strerror or e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _validate_payload(payload, path: str) -> tuple[dict[bytes, int], dict[str, int], str]:
    """Check a parsed tokenizer.json; returns (ranks, specials, pattern) or raises naming `path`."""
    def bad(msg: str) -> TokenizerError:
        return TokenizerError(f"{path}: malformed tokenizer file: {msg}; {REBUILD}")

    if not isinstance(payload, dict):
        raise bad("top level must be an object")
    missing = [k for k in ("format_version", "pattern", "mergeable_ranks", "special_tokens")
               if k not in payload]
    if missing:
        raise bad(f"missing keys {missing}")
    if payload["format_version"] != FORMAT_VERSION:
        raise bad(f"format_version {payload['format_version']!r}, this code reads {FORMAT_VERSION}")
    pattern = payload["pattern"]
    if not isinstance(pattern, str) or not pattern:
        raise bad("'pattern' must be a non-empty string")
    entries = payload["mergeable_ranks"]
    if not isinstance(entries, list) or not entries:
        raise bad("'mergeable_ranks' must be a non-empty list of [base64, rank] pairs")
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise bad(f"mergeable_ranks[{i}] is not a [base64 string, int rank] pair")
        try:
            tok = base64.b64decode(entry[0], validate=True)
        except ValueError as e:
            raise bad(f"mergeable_ranks[{i}] is not valid base64 ({e})") from e
        if not tok or tok in ranks:
            raise bad(f"mergeable_ranks[{i}] is empty or a duplicate token")
        ranks[tok] = entry[1]
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise bad(f"ranks must be exactly 0..{n - 1} with no gaps or repeats")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise bad("not every single byte has a rank, so some text would be unencodable")
    specials = payload["special_tokens"]
    if not isinstance(specials, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in specials.items()):
        raise bad("'special_tokens' must map strings to int ids")
    if BOS not in specials:
        raise bad(f"special_tokens lacks {BOS}")
    if sorted(specials.values()) != list(range(n, n + len(specials))):
        raise bad(f"special token ids must be {n}..{n + len(specials) - 1}, right after the ranks")
    return ranks, specials, pattern


def train_tokenizer(text_iter: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
    """Learn a BPE of `vocab_size` tokens in total (merges + 256 bytes + the special tokens).

    With too little text rustbpe stops early, giving a smaller vocabulary; that is reported, not
    hidden, since the model's embedding size follows `get_vocab_size()`.
    """
    import rustbpe  # noqa: PLC0415 (only needed for training; absent on some GPU boxes)

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens + at least one merge), got {vocab_size}")
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    bpe = rustbpe.Tokenizer()
    try:
        bpe.train_from_iterator(iter(text_iter), n_ranks, pattern=pattern)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        raise  # an error from our own text iterator (e.g. DataError naming a shard): keep it as is
    except BaseException as e:  # rustbpe panics derive from BaseException
        raise TokenizerError(f"rustbpe training failed: {type(e).__name__}: {e}") from e
    ranks = {bytes(tok): int(rank) for tok, rank in bpe.get_mergeable_ranks()}
    if len(ranks) < n_ranks:
        print0(f"WARNING: only {len(ranks)} of {n_ranks} mergeable tokens learned (not enough "
               f"distinct text); vocab size is {len(ranks) + len(SPECIAL_TOKENS)}, not {vocab_size}")
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(ranks, specials, pattern)


def tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by scripts/tok_train.py, from `<base_dir>/tokenizer`."""
    return Tokenizer.load(tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu", vocab_size: int | None = None) -> torch.Tensor:
    """The saved token_bytes table (int32 [vocab]) on `device`; with `vocab_size` (the tokenizer's
    or the model's) its length must match. Any problem is a one-line TokenizerError."""
    from nanochat.checkpoint import CheckpointError, safe_torch_load  # noqa: PLC0415

    path = os.path.join(tokenizer_dir(), TOKEN_BYTES_PT)
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: not found; train a tokenizer with python -m scripts.tok_train")
    try:
        tb = safe_torch_load(path, "cpu", kind="tokenizer")
    except CheckpointError as e:   # truncated, garbage, or a pickle that would run code
        raise TokenizerError(f"{e}; {REBUILD}") from None
    if not isinstance(tb, torch.Tensor) or tb.dim() != 1 or tb.dtype != torch.int32:
        raise TokenizerError(f"{path}: expected a 1-D int32 tensor of per-token byte counts; {REBUILD}")
    if bool((tb < 0).any()):
        raise TokenizerError(f"{path}: holds negative byte counts; {REBUILD}")
    if vocab_size is not None and tb.numel() != vocab_size:
        raise TokenizerError(f"{path}: has {tb.numel()} entries but the vocabulary has {vocab_size} tokens "
                             f"(left from another tokenizer?); {REBUILD}")
    return tb.to(device)
