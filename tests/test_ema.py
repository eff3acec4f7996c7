"""Weight EMA: update math, exact swap in/out, checkpoint round trip, and resume parity in training."""
import os
import shutil

import pytest
import torch

from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.ema import EMA_PREFIX, WeightEMA, split_ema_state

from tests.helpers import TINY, base_with_tokenizer, read_metrics, run


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    return m.to(dtype)


def test_update_math_with_warmup():
    m = small_model()
    ema = WeightEMA(m, decay=0.9)
    ref = [p.detach().clone() for p in m.parameters()]
    for t in range(30):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        ref = [d * r + (1 - d) * p.detach() for r, p in zip(ref, m.parameters())]
    assert ema.num_updates == 30
    for s, r in zip(ema.shadow, ref):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)


def test_shadow_is_fp32_for_bf16_params_and_swap_is_exact():
    m = small_model(torch.bfloat16)
    ema = WeightEMA(m, decay=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    ema.update()
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    before = [p.detach().clone() for p in m.parameters()]
    with ema.swapped_in(m):
        for p, s in zip(m.parameters(), ema.shadow):
            assert torch.equal(p, s.to(p.dtype))
        assert not torch.equal(next(m.parameters()), before[0])   # really swapped
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)   # bit-exact restore
    with pytest.raises(ValueError):
        WeightEMA(m, decay=1.0)


def test_checkpoint_round_trip(tmp_path):
    m = small_model()
    ema = WeightEMA(m, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        ema.update()
    state = {**m.state_dict(), **ema.state_tensors()}
    assert all(k.startswith(EMA_PREFIX) for k in ema.state_tensors())
    save_checkpoint(tmp_path, 3, state, None, {"ema": ema.meta()})
    loaded, _, meta = load_checkpoint(tmp_path, 3, "cpu", load_optimizer=False)
    model_state, ema_state = split_ema_state(loaded)
    m2 = small_model()
    m2.load_state_dict(model_state, strict=True)
    ema2 = WeightEMA(m2, decay=0.99)
    ema2.load(ema_state, meta["ema"])
    assert ema2.num_updates == 3
    for a, b in zip(ema.shadow, ema2.shadow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        ema2.load({}, None)


# -----------------------------------------------------------------------------
# Through the real training script: resume restores the EMA exactly.
TINY_EMA = [*TINY, "--eval-tokens=1024", "--ema-decay=0.9"]


def test_training_resume_restores_the_ema_exactly(tmp_path_factory, tiny_tokenizer, tmp_path):
    base = base_with_tokenizer(tmp_path_factory, "ema_base", tiny_tokenizer)
    n = 4
    run(["-m", "scripts.base_train", *TINY_EMA, f"--num-iterations={2 * n}", f"--save-every={n}",
         f"--eval-every={n}", "--model-tag=ema", f"--metrics-file={tmp_path / 'straight.jsonl'}"], base)
    ckpt_dir = os.path.join(base, "base_checkpoints", "ema")
    final = os.path.join(ckpt_dir, f"step_{2 * n:06d}")
    ref = torch.load(os.path.join(final, "model.pt"), weights_only=True)
    assert any(k.startswith(EMA_PREFIX) for k in ref)
    shutil.rmtree(final)
    resumed = run(["-m", "scripts.base_train", *TINY_EMA, f"--num-iterations={2 * n}", f"--resume-from-step={n}",
                   f"--eval-every={n}", "--model-tag=ema", f"--metrics-file={tmp_path / 'resumed.jsonl'}"], base)
    assert f"weight EMA restored ({n} updates)" in resumed.stdout
    got = torch.load(os.path.join(final, "model.pt"), weights_only=True)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The evaluations use the EMA weights, so the val bpb at the resume step and the final one match
    # too, to the last bit.
    bpb_straight, bpb_resumed = ({r["step"]: r["val_bpb"] for r in read_metrics(tmp_path / name, "eval")}
                                 for name in ("straight.jsonl", "resumed.jsonl"))
    assert sorted(bpb_straight) == [0, n, 2 * n] and sorted(bpb_resumed) == [n, 2 * n]
    assert bpb_resumed == {k: bpb_straight[k] for k in bpb_resumed}
