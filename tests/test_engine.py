"""KV-cache generation: same logits and same tokens as full recomputation (greedy and seeded
sampling), windows respected, evaluation mode restores everything, and the scripts run end to end."""
import json
import re
import shutil

import pytest
import torch

from nanochat.engine import Engine, KVCache, eval_mode, sample_next_token, uncompiled
from nanochat.gpt import GPT, GPTConfig

from tests.helpers import TINY, base_with_tokenizer, run


def make_model(window_pattern="L", seed=0, sequence_len=16, n_layer=3):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=64, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                    window_pattern=window_pattern)
    m = GPT(cfg)
    m.init_weights()
    with torch.no_grad():   # init has zero output projections: perturb so every layer matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("pattern", ["L", "SL", "SSL"])
def test_cached_logits_match_full_forward(pattern):
    m = make_model(pattern)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))  # > 2x the S window (8)
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(2, 40, m.config.n_layer)
        parts = [m(ids[:, :5], kv_cache=cache)]                  # prefill
        parts += [m(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 30)]   # decode
        parts.append(m(ids[:, 30:], kv_cache=cache))             # a chunk again
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_windows_are_respected_with_the_cache():
    """The same weights with pattern S vs L give different logits beyond the window, and the
    cached S model follows the S full forward, so the cache really applies the window."""
    s_model = make_model("SL")
    l_model = make_model("L")
    l_model.load_state_dict(s_model.state_dict())
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full_s, full_l = s_model(ids), l_model(ids)
        cache = KVCache(1, 30, s_model.config.n_layer)
        cached = torch.cat([s_model(ids[:, t:t + 1], kv_cache=cache) for t in range(30)], 1)
    window = s_model.config.sequence_len // 2
    assert torch.allclose(full_s[:, :window], full_l[:, :window], atol=1e-5)   # inside the window: same
    assert not torch.allclose(full_s[:, window:], full_l[:, window:], atol=1e-3)
    torch.testing.assert_close(cached, full_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=5),
                                dict(temperature=0.9, top_k=10, seed=6), dict(temperature=1.2, top_p=0.8, seed=7)])
def test_generation_identical_with_and_without_cache(kw):
    m = make_model("SL")
    engine = Engine(m)
    prompt = [1, 2, 3, 4, 5]
    cached = engine.generate_batch(prompt, 30, num_samples=3, use_cache=True, **kw)
    plain = engine.generate_batch(prompt, 30, num_samples=3, use_cache=False, **kw)
    assert cached == plain
    assert cached == engine.generate_batch(prompt, 30, num_samples=3, use_cache=True, **kw)  # deterministic
    assert all(len(row) == 30 for row in cached)
    if kw["temperature"] > 0:   # and the seed matters
        other = engine.generate_batch(prompt, 30, num_samples=3, **{**kw, "seed": kw["seed"] + 100})
        assert other != cached


def test_stop_tokens_and_cache_limits():
    m = make_model()
    engine = Engine(m)
    first = engine.generate_batch([1, 2, 3], 5)[0][0]
    assert engine.generate_batch([1, 2, 3], 5, stop_tokens=(first,)) == [[]]
    cache = KVCache(1, 4, m.config.n_layer)
    with pytest.raises(ValueError, match="positions"):
        m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="inference"):
        m(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), kv_cache=KVCache(1, 4, 3))


def test_sample_next_token_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    assert sample_next_token(logits, g, 0.0).flatten().tolist() == [1] * 200
    assert sample_next_token(logits, g, 1.0, top_k=1).flatten().tolist() == [1] * 200
    assert sample_next_token(logits, g, 1.0, top_p=1e-3).flatten().tolist() == [1] * 200
    assert set(sample_next_token(logits, g, 5.0, top_k=2).flatten().tolist()) == {1, 3}
    # p(1)=0.64, p(3)=0.24 after softmax: top_p=0.8 keeps {1, 3}, top_p=0.5 only {1}
    assert set(sample_next_token(logits, g, 1.0, top_p=0.8).flatten().tolist()) == {1, 3}
    assert set(sample_next_token(logits, g, 1.0).flatten().tolist()) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax([0, 3, 1, 2]) = [0.032, 0.644, 0.087, 0.237]: by mass 1, 3, 2, 0
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(400, 1)
    assert set(sample_next_token(logits, g, 1.0, top_p=0.9).flatten().tolist()) == {1, 2, 3}   # 0.968 > 0.9
    assert set(sample_next_token(logits, g, 1.0, top_p=1.0).flatten().tolist()) == {0, 1, 2, 3}   # no filter
    assert set(sample_next_token(logits, g, 1.0, top_k=2, top_p=0.9).flatten().tolist()) == {1, 3}   # k first
    # the kept tokens are sampled in proportion to their renormalised probabilities
    kept = sample_next_token(logits, g, 1.0, top_p=0.8).flatten()
    assert abs((kept == 1).float().mean().item() - 0.644 / 0.881) < 0.08
    # rows are filtered independently
    mixed = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = torch.stack([sample_next_token(mixed, g, 1.0, top_p=0.5)[:, 0] for _ in range(100)])
    assert set(out[:, 0].tolist()) == {1} and len(set(out[:, 1].tolist())) > 1


def test_uncompiled_and_eval_mode_restore_everything():
    m = make_model()
    m.train()
    block = m.transformer.h[0]

    def boom(*a, **k):
        raise AssertionError("compiled path used")

    block._compiled_call_impl = boom   # stands in for nn.Module.compile (compiling is slow on CPU)
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(AssertionError):
        m(ids)
    for backend in ("flex", "cudnn"):   # built per sequence length: variable-length evaluation uses SDPA
        m.runtime.attn_backend = backend
        with uncompiled(m):
            assert m.runtime.attn_backend == "sdpa"
            m(ids)
        assert block._compiled_call_impl is boom and m.runtime.attn_backend == backend
    m.runtime.attn_backend = "sdpa"
    block._compiled_call_impl = None

    from nanochat.ema import WeightEMA
    ema = WeightEMA(m, 0.5)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with eval_mode(m, ema, eager=True):
        assert not m.training
        assert torch.equal(m.lm_head.weight, ema.shadow[ema.names.index("lm_head.weight")])
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_eval_mode_turns_fp8_off():
    from nanochat.fp8 import Float8Linear, Fp8Options, convert_to_fp8
    m = make_model()
    convert_to_fp8(m, Fp8Options(enabled=True, min_dim=16))
    fp8 = [mod for mod in m.modules() if isinstance(mod, Float8Linear)]
    assert fp8 and all(mod.fp8_enabled for mod in fp8)
    with eval_mode(m):
        assert not any(mod.fp8_enabled for mod in fp8)
        Engine(m).generate_batch([1, 2], 3)
    assert all(mod.fp8_enabled for mod in fp8)


# -----------------------------------------------------------------------------
# End to end: a tiny checkpoint trained by scripts.base_train, read by generate and base_eval.
TINY_SL = [*TINY, "--eval-tokens=1024", "--window-pattern=SL"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    base = base_with_tokenizer(tmp_path_factory, "engine_base", tiny_tokenizer)
    from tests.test_core_eval import LM, MC, SCHEMA, TASKS, write_bundle
    write_bundle(base / "eval_bundle", TASKS, {"mc.jsonl": MC, "schema.jsonl": SCHEMA, "lm.jsonl": LM})
    out = run(["-m", "scripts.base_train", *TINY_SL, "--num-iterations=6", "--eval-every=6", "--core-metric-every=3",
               "--core-metric-max-per-task=2", "--sample-every=3", "--ema-decay=0.9", "--model-tag=tiny"], base)
    return base, out.stdout


def test_training_prints_samples_and_core(trained):
    _, stdout = trained
    assert len(re.findall(r"^step 00003 \| sample \| 'The capital of France is", stdout, re.M)) == 1
    assert len(re.findall(r"^step 0000[36] \| CORE -?\d\.\d{4} \| 3 tasks", stdout, re.M)) == 2


def test_missing_bundle_skips_core_with_one_warning(trained, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(trained[0] / "tokenizer", base / "tokenizer")   # a base dir without eval_bundle
    out = run(["-m", "scripts.base_train", *TINY_SL, "--num-iterations=1", "--eval-every=-1", "--core-metric-every=1"], base)
    assert "CORE is skipped" in out.stdout and "| CORE " not in out.stdout


def test_generate_script_cache_matches_no_cache_and_is_seeded(trained):
    base, _ = trained
    common = ["-m", "scripts.generate", "--model-tag=tiny", "--prompt=The cat", "--max-tokens=12",
              "--num-samples=2", "--temperature=1.0", "--top-k=40", "--top-p=0.95", "--seed=3"]
    text = lambda out: [ln for ln in out.stdout.splitlines() if not ln.startswith("#")]  # noqa: E731
    a = run(common, base)
    assert "(ema weights)" in a.stdout and "KV cache" in a.stdout
    b = run([*common, "--no-kv-cache"], base)
    assert text(a) == text(b) and len(text(a)) == 4
    bad = run(["-m", "scripts.generate", "--model-tag=tiny", "--top-k=0"], base, check=False)
    assert bad.returncode == 2 and "--top-k" in bad.stderr and "Traceback" not in bad.stderr


def test_base_eval_script(trained):
    base, _ = trained
    out = run(["-m", "scripts.base_eval", "--model-tag=tiny", "--evals=bpb,core", "--eval-tokens=1024",
               "--device-batch-size=4"], base)
    result = json.loads(out.stdout.strip().splitlines()[-1].split("base_eval: ", 1)[1])
    assert result["step"] == 6 and result["weights"] == "ema"
    assert 0 < result["val_bpb"] < 20 and set(result["core_centered"]) == {"mc", "schema", "lm"}
    assert result["core"] == pytest.approx(sum(result["core_centered"].values()) / 3)
    missing = run(["-m", "scripts.base_eval", "--model-tag=nope"], base, check=False)
    assert missing.returncode == 1 and "no complete checkpoint" in missing.stderr   # a missing file: exit 1
