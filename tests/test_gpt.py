"""Model shapes, init, FLOP counting and the `active_start` contract."""
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, layer_windows, validate_window_pattern


def tiny_config(**kw):
    cfg = dict(sequence_len=32, vocab_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="L")
    cfg.update(kw)
    return GPTConfig(**cfg)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(tiny_config(**kw))
    m.to_empty(device="cpu")
    m.init_weights()
    return m


def batch(seed=0, B=2, T=32, V=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return x, y


def test_shapes_and_initial_loss():
    m = make_model()
    x, y = batch()
    logits = m(x)
    assert logits.shape == (2, 32, 256) and logits.dtype == torch.float32
    assert logits.abs().max() <= m.config.softcap
    loss = m(x, y)
    # lm_head is initialised tiny, so the initial loss is close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1
    per_token = m(x, y, loss_reduction="none")
    assert per_token.shape == (2, 32)
    assert torch.allclose(per_token.mean(), loss, atol=1e-6)


def test_window_pattern_tiling():
    cfg = tiny_config(n_layer=6, window_pattern="SSL")
    assert layer_windows(cfg) == [16, 16, -1, 16, 16, -1]
    cfg = tiny_config(n_layer=4, window_pattern="S")
    assert layer_windows(cfg) == [16, 16, 16, -1]  # the last layer always sees everything
    assert validate_window_pattern("SXL") is not None
    assert validate_window_pattern("") is not None
    assert validate_window_pattern("sssl") is None


def test_active_start_zero_is_the_full_model():
    m = make_model()
    x, y = batch()
    full = m(x, y)
    assert torch.equal(full, m(x, y, active_start=0))


@pytest.mark.parametrize("a", [1, 2, 3, 4])
def test_active_start_freezes_prefix_and_keeps_forward_values(a):
    m = make_model()
    # Give every parameter non-trivial values (c_proj starts at zero).
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, y = batch()
    ref = m(x, y)
    m.zero_grad(set_to_none=True)
    loss = m(x, y, active_start=a)
    # Same forward value: freezing changes what gets gradients, not what is computed.
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    for i, block in enumerate(m.transformer.h):
        grads = [p.grad for p in block.parameters()]
        if i < a:
            assert all(g is None for g in grads), f"block {i} is in the frozen prefix"
        else:
            assert all(g is not None for g in grads), f"block {i} is in the trained suffix"
            assert any(g.abs().sum() > 0 for g in grads)
    assert m.lm_head.weight.grad is not None
    # The embedding still trains through the x0 skip path into the suffix, unless no block trains.
    assert (m.transformer.wte.weight.grad is not None) == (a < m.config.n_layer)


def test_active_start_out_of_range():
    m = make_model()
    x, y = batch()
    with pytest.raises(ValueError, match="active_start"):
        m(x, y, active_start=5)


def test_gqa_and_sliding_window_run_and_differ_from_full():
    m_l = make_model(window_pattern="L")
    m_s = make_model(window_pattern="SL")
    m_s.load_state_dict(m_l.state_dict())
    with torch.no_grad():
        for p1, p2 in zip(m_l.parameters(), m_s.parameters()):
            noise = 0.05 * torch.randn_like(p1)
            p1.add_(noise)
            p2.add_(noise)
    x, _ = batch()
    a, b = m_l(x), m_s(x)
    # The first 16 positions see at most 16 tokens either way, so they agree; later ones differ.
    assert torch.allclose(a[:, :16], b[:, :16], atol=1e-5)
    assert not torch.allclose(a[:, 16:], b[:, 16:], atol=1e-5)


def test_flops_and_param_counts():
    m = make_model()
    counts = m.num_scaling_params()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["scalars"] == 2 * m.config.n_layer
    full = m.estimate_flops()
    half = m.estimate_flops(active_start=2)
    assert half < full
    # The frozen prefix does forward work only: 1/3 of its share.
    per_block = (full - 6 * counts["lm_head"]) // m.config.n_layer
    assert full - half == pytest.approx(2 * per_block * 2 / 3, rel=0.01)


def test_param_groups_cover_everything_once():
    m = make_model()
    groups = m.param_groups(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    for g in groups:
        if g["kind"] == "muon":
            assert len({tuple(p.shape) for p in g["params"]}) == 1


def test_deterministic_init():
    a, b = make_model(seed=3), make_model(seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_a_failing_compile_falls_back_to_eager_loudly(capsys):
    """A region whose compile fails runs eagerly, with a warning, instead of crashing or silently
    degrading; the result equals the eager model's."""
    import torch._dynamo

    def broken_backend(gm, example_inputs):
        raise RuntimeError("simulated compiler crash")

    m = make_model()
    x, y = batch()
    ref = m(x, y)
    torch._dynamo.reset()
    m.compile_regions(backend=broken_backend)
    got = m(x, y, active_start=1)
    torch._dynamo.reset()
    assert torch.allclose(got, ref, atol=1e-6)
    out = capsys.readouterr().out
    assert "WARNING: torch.compile failed" in out and "EAGERLY" in out
    assert out.count("WARNING: torch.compile failed") == 1
    assert not m._compiled and all(b._compiled_call_impl is None for b in m.transformer.h)


def test_a_failing_backward_compile_also_falls_back_before_anything_ran(capsys):
    """A compiler that fails only on the backward graph: the failure surfaces at the region's
    forward call (the backward is lowered with the forward), so the step falls back to eager and
    loss and gradients equal the eager model's instead of crashing in loss.backward()."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    def fw_ok(gm, example_inputs):
        return gm.forward

    def bw_broken(gm, example_inputs):
        raise RuntimeError("simulated backward compiler crash")

    ref_model, m = make_model(), make_model()
    x, y = batch()
    ref = ref_model(x, y)
    ref.backward()
    torch._dynamo.reset()
    m.compile_regions(backend=aot_autograd(fw_compiler=fw_ok, bw_compiler=bw_broken))
    got = m(x, y)
    got.backward()
    torch._dynamo.reset()
    assert torch.allclose(got, ref, atol=1e-6)
    for (n, p), q in zip(m.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    out = capsys.readouterr().out
    assert out.count("WARNING: torch.compile failed") == 1 and "EAGERLY" in out



def test_regional_compile_graph_count():
    """Compile cost is counted in graphs: a full training step needs exactly one block graph and one
    head graph (block 0 must not get its own because its residual input aliases x0), an evaluation
    forward one more of each, a suffix step only the block variant whose input needs no grad
    (the frozen prefix reuses the evaluation graph), and further active_start values nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    m = make_model()
    x, y = batch()
    torch._dynamo.reset()
    counters.clear()
    m.compile_regions(backend="eager")
    seen = []
    m(x, y).backward()
    seen.append(counters["stats"]["unique_graphs"])
    with torch.no_grad():
        m(x, y)
    seen.append(counters["stats"]["unique_graphs"])
    for a in (2, 1, 3, 0):
        m(x, y, active_start=a).backward()
        seen.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert seen == [2, 4, 5, 5, 5, 5]
