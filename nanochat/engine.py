"""Inference: a KV cache, token sampling, generation, and the "evaluation mode" context.

Generation without a cache re-runs the whole sequence for every new token (quadratic work). With
`KVCache` the prompt is run once (prefill) and every later step feeds only the newest token: each
layer appends its rotated, QK-normed keys and values to its cache slot and attends over the
cached positions. Rotary positions continue from `cache.pos` and sliding windows are applied on
absolute positions, so cached and uncached generation compute the same function (tests check that
they give identical tokens, greedy and sampled with a seed).

`eval_mode(model, ...)` is the one way every evaluation (val bpb, CORE, samples) sees the model:
`model.eval()`, FP8 off (linears run as plain bf16 under autocast, `nanochat.fp8.disable_fp8`),
optionally the EMA weights swapped in, and optionally the *uncompiled* forward: the blocks are
compiled in place with `nn.Module.compile` and `dynamic=False`, so a new sequence length would
recompile them; `eager=True` clears `_compiled_call_impl` for the duration (that attribute is
where `nn.Module.compile` keeps the compiled `__call__`). Evaluation always calls the model with
`active_start=0`, i.e. the full model, whatever the dynamic-suffix schedule is doing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import fields

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# KV cache


class _LayerCache:
    """The view of one layer's cache slot that `CausalSelfAttention.forward` receives."""

    def __init__(self, cache: "KVCache", idx: int):
        self.cache, self.idx = cache, idx

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        return self.cache.attend(self.idx, q, k, v, window)


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together.

    Buffers are (B, max_len, n_kv_head, head_dim) per layer, allocated on first use with the
    dtype the model computes in. `pos` is the number of positions already cached; the model
    advances it after running all layers on new tokens.
    """

    def __init__(self, batch_size: int, max_len: int, n_layer: int):
        self.batch_size, self.max_len, self.n_layer = batch_size, max_len, n_layer
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def layer(self, idx: int) -> _LayerCache:
        return _LayerCache(self, idx)

    def advance(self, n: int) -> None:
        self.pos += n

    def attend(self, idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, Hkv, D) for positions [pos, pos+T) -> (B, T, H, D).

        Query at absolute position p attends to cached keys j with j <= p and, for a window w,
        p - j < w: exactly `nanochat.attention.window_mask` on the full sequence."""
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        end = self.pos + T
        if B != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} sequences, got a batch of {B}")
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if self.k[idx] is None:
            self.k[idx] = torch.zeros(B, self.max_len, Hkv, D, dtype=k.dtype, device=k.device)
            self.v[idx] = torch.zeros(B, self.max_len, Hkv, D, dtype=v.dtype, device=v.device)
        self.k[idx][:, self.pos:end] = k
        self.v[idx][:, self.pos:end] = v
        kt = self.k[idx][:, :end].transpose(1, 2)   # (B, Hkv, L, D)
        vt = self.v[idx][:, :end].transpose(1, 2)
        if Hkv != H:
            kt = kt.repeat_interleave(H // Hkv, dim=1)
            vt = vt.repeat_interleave(H // Hkv, dim=1)
        qp = torch.arange(self.pos, end, device=q.device).unsqueeze(1)   # (T, 1) absolute query positions
        kp = torch.arange(end, device=q.device).unsqueeze(0)             # (1, L)
        mask = kp <= qp
        if window is not None and window > 0:
            mask = mask & (qp - kp < window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=mask)
        return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Evaluation mode


@contextlib.contextmanager
def uncompiled(model: torch.nn.Module):
    """Run every `nn.Module.compile`-d submodule of `model` eagerly inside the block.

    The FlexAttention and cuDNN-window backends are swapped for SDPA meanwhile: flex compiles its
    kernel and builds its block mask per sequence length, the cuDNN op builds a graph per shape, and
    variable-length evaluation would multiply either."""
    saved = []
    for mod in model.modules():
        if getattr(mod, "_compiled_call_impl", None) is not None:
            saved.append((mod, mod._compiled_call_impl))
            mod._compiled_call_impl = None
    runtime = getattr(model, "runtime", None)
    swapped = runtime is not None and runtime.attn_backend in ("flex", "cudnn")
    if swapped:
        model.runtime = dataclasses.replace(runtime, attn_backend="sdpa")
    try:
        yield model
    finally:
        for mod, fn in saved:
            mod._compiled_call_impl = fn
        if swapped:
            model.runtime = runtime


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, ema=None, eager: bool = False):
    """Evaluation view of a training model: eval(), FP8 off, EMA weights in (if given), and with
    `eager` the uncompiled forward. Everything is restored on exit (weights bit-exactly)."""
    from nanochat.fp8 import disable_fp8  # noqa: PLC0415 (keeps this module light to import)

    was_training = model.training
    model.eval()
    with contextlib.ExitStack() as stack:
        stack.enter_context(disable_fp8(model))
        if ema is not None:
            stack.enter_context(ema.swapped_in(model))
        if eager:
            stack.enter_context(uncompiled(model))
        try:
            yield model
        finally:
            model.train(was_training)


# -----------------------------------------------------------------------------
# Sampling


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). temperature 0 = greedy (argmax).

    top_k keeps the k largest logits, top_p the smallest set of tokens whose probability mass
    reaches p (always at least the most likely one); both apply after the temperature."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p        # the first token always has mass_before = 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class Engine:
    """Generation from a `GPT` (any module with `forward(idx, kv_cache=None) -> logits`)."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()  # not inference_mode: inference tensors must never leak into module caches
    def generate(self, tokens: list[int], max_tokens: int, num_samples: int = 1, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 42,
                 use_cache: bool = True, stop_tokens: tuple[int, ...] | None = None):
        """Yield one (num_samples,) tensor of new token ids per step, at most `max_tokens` steps.

        Rows that produced a stop token keep going (their later tokens are dropped by
        `generate_batch`); the loop ends early once every row has stopped."""
        if not tokens:
            raise ValueError("generation needs a non-empty prompt (e.g. just the BOS token)")
        model = self.model
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
        stops = torch.tensor(list(stop_tokens or ()), dtype=torch.long, device=device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=device)
        cache = None
        if use_cache:
            cache = KVCache(num_samples, len(tokens) + max_tokens, model.config.n_layer)
            logits = model(ids, kv_cache=cache)[:, -1]  # prefill
        else:
            logits = model(ids)[:, -1]
        for step in range(max_tokens):
            nxt = sample_next_token(logits, generator, temperature, top_k, top_p)   # (B, 1)
            yield nxt[:, 0]
            if stops.numel():
                done |= torch.isin(nxt[:, 0], stops)
                if bool(done.all()):
                    return
            if step == max_tokens - 1:
                return
            if use_cache:
                logits = model(nxt, kv_cache=cache)[:, -1]
            else:
                ids = torch.cat([ids, nxt], dim=1)
                logits = model(ids)[:, -1]

    def generate_batch(self, tokens: list[int], max_tokens: int, num_samples: int = 1,
                       stop_tokens: tuple[int, ...] | None = None, **kwargs) -> list[list[int]]:
        """New tokens of each sample, cut before the first stop token."""
        out = [[] for _ in range(num_samples)]
        stopped = [False] * num_samples
        stop_set = set(stop_tokens or ())
        for col in self.generate(tokens, max_tokens, num_samples=num_samples, stop_tokens=stop_tokens, **kwargs):
            for i, t in enumerate(col.tolist()):
                if stopped[i]:
                    continue
                if t in stop_set:
                    stopped[i] = True
                else:
                    out[i].append(t)
        return out


def stream_text(engine: Engine, tokens: list[int], max_tokens: int, stop_tokens: tuple[int, ...] = (),
                **kwargs) -> Iterator[tuple[list[int], str]]:
    """One sample's new tokens as (token ids, their text) pieces, as `Engine.generate` yields them,
    so a caller can print each piece at once; stops before the first stop token. `kwargs` go to
    `generate`.

    A byte-level BPE token can end inside a multi-byte UTF-8 character whose other bytes come with
    the next token; decoded alone it would print U+FFFD. So the tokens not yet shown are decoded
    together and held back while their text ends in U+FFFD (at most 8 tokens: a sequence that
    never completes is shown as is). For valid UTF-8 the texts join to `decode` of all new tokens."""
    stops = set(stop_tokens)
    pending: list[int] = []
    for col in engine.generate(tokens, max_tokens, num_samples=1, stop_tokens=stop_tokens, **kwargs):
        token = int(col[0])
        if token in stops:
            break
        pending.append(token)
        text = engine.tokenizer.decode(pending)
        if not text.endswith("\ufffd") or len(pending) >= 8:
            yield pending, text
            pending = []
    if pending:
        yield pending, engine.tokenizer.decode(pending)


# -----------------------------------------------------------------------------
# Samples during training


SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def sample_prompts(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16, autocast_ctx=None) -> list[str]:
    """Greedy completions of `prompts` (each prompt + completion as text), KV-cached."""
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    out = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=bos)
        with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
            new = engine.generate_batch(tokens, max_tokens, temperature=0.0, stop_tokens=(bos,))[0]
        out.append(tokenizer.decode(tokens[1:] + new))
    return out


# -----------------------------------------------------------------------------
# Loading a trained model (scripts/base_eval.py, scripts/generate.py)


def _model_tags(root: str) -> list[str]:
    """The directories under `root` that hold at least one complete checkpoint."""
    from nanochat.checkpoint import find_complete_steps  # noqa: PLC0415

    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(t for t in names if find_complete_steps(os.path.join(root, t)))


def resolve_model_dir(model_tag: str | None) -> str:
    """<base>/base_checkpoints/<model_tag>; without a tag, the most recently written model dir.
    A tag that is not a plain name (see checkpoint.model_tag_problem) is a CheckpointError."""
    from nanochat.checkpoint import CheckpointError, model_tag_problem  # noqa: PLC0415
    from nanochat.common import get_base_dir  # noqa: PLC0415

    if problem := model_tag_problem(model_tag):
        raise CheckpointError(problem)
    root = os.path.join(get_base_dir(), "base_checkpoints")
    if model_tag:
        return os.path.join(root, model_tag)
    tags = _model_tags(root)
    if not tags:
        raise CheckpointError(f"no trained model under {root}; train one with python -m scripts.base_train")
    return os.path.join(root, max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t))))


def _config_from_meta(meta: dict, meta_path: str):
    """The GPTConfig a checkpoint's meta.json describes; a CheckpointError naming the field if a
    value could not have come from training (so building the model cannot fail obscurely)."""
    from nanochat.checkpoint import CheckpointError  # noqa: PLC0415
    from nanochat.gpt import GPTConfig, validate_window_pattern  # noqa: PLC0415

    saved = meta["model_config"]
    problems = []
    for f in fields(GPTConfig):
        if f.name not in saved:
            continue
        v = saved[f.name]
        if isinstance(f.default, str):
            ok = isinstance(v, str) and validate_window_pattern(v) is None
        elif isinstance(f.default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
        if not ok:
            problems.append(f"'model_config'.'{f.name}' is {v!r}")
    if not problems:
        config = GPTConfig(**{f.name: saved[f.name] for f in fields(GPTConfig) if f.name in saved})
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            problems.append(f"'model_config' has n_embd {config.n_embd}, n_head {config.n_head}, n_kv_head "
                            f"{config.n_kv_head}: heads must divide evenly")
    if problems:
        raise CheckpointError(f"{meta_path}: damaged checkpoint metadata: " + "; ".join(problems))
    return config


def load_model(model_tag: str | None, step: int, device: torch.device, use_ema: bool = True):
    """Build the GPT of a checkpoint and load its weights -> (model, meta, weights_name).

    `step` -1 = the latest complete step. With `use_ema` and EMA tensors in the checkpoint, the EMA
    weights are loaded (weights_name 'ema'), else the raw weights ('model')."""
    from nanochat.attention import select_attention_backend  # noqa: PLC0415
    from nanochat.checkpoint import (META_FILE, CheckpointError, check_state_dict_keys,  # noqa: PLC0415
                                     format_mismatch, latest_complete_step, load_checkpoint, step_dir)
    from nanochat.ema import split_ema_state  # noqa: PLC0415
    from nanochat.gpt import GPT, ModelRuntime  # noqa: PLC0415

    model_dir = resolve_model_dir(model_tag)
    if step < 0:
        step = latest_complete_step(model_dir)
        if step is None:
            tags = _model_tags(os.path.dirname(model_dir))
            raise CheckpointError(f"no complete checkpoint in {model_dir}; model tags with checkpoints: "
                                  f"{', '.join(tags) or 'none'}")
    state, _, meta = load_checkpoint(model_dir, step, device, load_optimizer=False, require_meta=("model_config",))
    state, ema_state = split_ema_state(state)
    config = _config_from_meta(meta, os.path.join(step_dir(model_dir, step), META_FILE))
    device_type = torch.device(device).type
    compute_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    attn_backend, _ = select_attention_backend(device_type, config.window_pattern, compute_dtype,
                                               head_dim=config.head_dim)
    with torch.device("meta"):
        model = GPT(config, ModelRuntime(compute_dtype=compute_dtype, attn_backend=attn_backend))
    model.to_empty(device=device)
    model.init_weights()  # rotary buffers (not in the state dict)
    weights = "model"
    if use_ema and ema_state:
        state = {k: ema_state[k].to(state[k].dtype) if k in ema_state else v for k, v in state.items()}
        weights = "ema"
    if mismatch := check_state_dict_keys(state, model):
        raise CheckpointError(f"checkpoint {model_dir} step {step} does not match the model its meta.json "
                              f"describes: {format_mismatch(mismatch)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    meta = {**meta, "step": step, "model_dir": model_dir}
    return model, meta, weights


def setup_inference(device_type: str, model_tag: str | None, step: int, use_ema: bool):
    """What scripts/base_eval.py and scripts/generate.py both need: compute init, autocast,
    tokenizer, checkpoint -> model.

    Returns (device, world_size, autocast_ctx, tokenizer, model, meta, weights_name). Expected
    failures are one-line exceptions for the scripts to print: `UsageError` for a request that
    cannot work here (exit 2), `CheckpointError` / `TokenizerError` for missing or damaged files and
    a checkpoint that does not fit the tokenizer (exit 1)."""
    from contextlib import nullcontext  # noqa: PLC0415

    from nanochat.checkpoint import CheckpointError  # noqa: PLC0415
    from nanochat.common import autodetect_device_type, compute_init  # noqa: PLC0415
    from nanochat.tokenizer import get_tokenizer  # noqa: PLC0415
    device_type = device_type or autodetect_device_type()
    _, _, _, world_size, device = compute_init(device_type)
    autocast_ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    tokenizer = get_tokenizer()
    model, meta, weights = load_model(model_tag, step, device, use_ema=use_ema)
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise CheckpointError(f"the checkpoint's vocab_size {model.config.vocab_size} differs from the tokenizer's "
                              f"{tokenizer.get_vocab_size()}: use the tokenizer the model was trained with")
    return device, world_size, autocast_ctx, tokenizer, model, meta, weights
