"""A tiny model checkpoint written in-process (no training run), for the tests of the scripts
that read checkpoints (generate, base_eval): seconds instead of a base_train subprocess."""
import os
from dataclasses import asdict

import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.ema import EMA_PREFIX
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.helpers import base_with_tokenizer
from tests.test_checkpoint import resume_meta

STEP = 3


def make_tiny_checkpoint(tmp_path_factory, tokenizer_dir, name="tiny_ckpt_base", tag="tiny", ema=True):
    """A base dir with the test run's tokenizer and base_checkpoints/<tag>/step_000003 holding a
    depth-2 model (weights perturbed so its samples vary) and, with `ema`, EMA tensors beside it."""
    base = base_with_tokenizer(tmp_path_factory, name, tokenizer_dir)
    vocab = Tokenizer.load(os.path.join(base, "tokenizer")).get_vocab_size()
    cfg = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():   # zero output projections at init: perturb so every layer matters
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    state = dict(model.state_dict())
    if ema:
        state.update({EMA_PREFIX + k: v.float().clone() for k, v in model.named_parameters()})
    save_checkpoint(os.path.join(base, "base_checkpoints", tag), STEP, state, None,
                    resume_meta(STEP, asdict(cfg)))
    return base
