"""Train the BPE tokenizer on the train split and save it to <base_dir>/tokenizer.

    python -m scripts.tok_train                      # 32768 tokens, up to 2B characters
    python -m scripts.tok_train --max-chars=50000000 --vocab-size=8192

Reads `<base_dir>/base_data` (or the embedded sample when that is empty, with a banner). Writes
tokenizer.json and token_bytes.pt, then reports bytes per token on train and val text.
"""
from __future__ import annotations

import os
import sys
import time

from nanochat.common import get_base_dir, print0
from nanochat.dataset import DataError, iter_texts, resolve_data_dir
from nanochat.tokenizer import MIN_VOCAB_SIZE, TokenizerError, train_tokenizer
from nanochat.usage import OneLineParser, die, fail

PROG = "python -m scripts.tok_train"


def parse_args(argv=None):
    parser = OneLineParser(prog=PROG, description="Train the BPE tokenizer (rustbpe) on the train split.")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="stop reading training text after this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000,
                        help="crop each document to this many characters, so very long documents "
                             "do not dominate the pair counts")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help=f"total vocabulary including the special tokens (>= {MIN_VOCAB_SIZE})")
    return parser.parse_args(argv)


def validate_args(args) -> list[str]:
    """All problems with the flags at once, so one run tells the user everything to fix."""
    problems = []
    if args.vocab_size < MIN_VOCAB_SIZE:
        problems.append(f"--vocab-size={args.vocab_size} must be >= {MIN_VOCAB_SIZE} "
                        f"(256 byte tokens + the special tokens + at least one merge)")
    if args.max_chars <= 0:
        problems.append(f"--max-chars={args.max_chars} must be > 0")
    if args.doc_cap <= 0:
        problems.append(f"--doc-cap={args.doc_cap} must be > 0")
    return problems


def main(argv=None) -> int:
    # ---------------------------------------------------------------- args
    args = parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems, PROG)
    print0(f"tok_train args: {vars(args)}")

    try:
        # ------------------------------------------------------------ train
        data_dir = resolve_data_dir()
        n_chars = 0

        def counted():
            nonlocal n_chars
            for text in iter_texts("train", data_dir, max_chars=args.max_chars, doc_cap=args.doc_cap):
                n_chars += len(text)
                yield text

        t0 = time.time()
        tokenizer = train_tokenizer(counted(), args.vocab_size)
        train_time = time.time() - t0
        print0(f"Trained on {n_chars:,} characters from {data_dir} in {train_time:.2f}s; "
               f"vocab size {tokenizer.get_vocab_size():,}")

        # ------------------------------------------------------------ save
        out_dir = os.path.join(get_base_dir(), "tokenizer")
        tokenizer.save(out_dir)
        print0(f"Saved tokenizer.json and token_bytes.pt to {out_dir}")

        # ------------------------------------------------------------ report
        token_bytes = tokenizer.token_bytes()
        regular = token_bytes[token_bytes > 0].float()
        print0(f"Token lengths (bytes): min {int(regular.min())}, mean {regular.mean():.2f}, "
               f"max {int(regular.max())}")
        for split in ("train", "val"):
            texts = list(iter_texts(split, data_dir, max_chars=1_000_000, doc_cap=args.doc_cap))
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
            print0(f"Compression on {split} ({n_bytes:,} bytes): {n_bytes / max(1, n_tokens):.3f} "
                   f"bytes/token ({n_tokens:,} tokens)")
    except (DataError, TokenizerError) as e:
        die(str(e), PROG)
    except ModuleNotFoundError as e:   # rustbpe is only needed here, and some GPU boxes lack it
        if e.name != "rustbpe":
            raise
        die("training the tokenizer needs rustbpe, which is not installed: pip install rustbpe", PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
