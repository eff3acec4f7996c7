"""Golden losses: a fixed tiny model, data and optimizer must reproduce these losses on CPU.

Any change to the model, the optimizer or their numerics moves them. If the change is intended,
replace GOLDEN with the values the failure message prints and say why in the commit. One thread,
fp32, fixed seeds: the numbers do not depend on the machine's core count.

Muon orthogonalises in fp32 here: in bf16 (as in training) CPUs with and without native bf16 GEMMs
round differently and the losses drifted by up to 9e-4 between two CI-class machines, more than
some real changes move them (a 10 % higher Muon learning rate: 3.6e-3).
"""

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import MuonAdamW

# full_update for 6 steps, then 4 steps training only block 1 (active_start=1), as dynamic_suffix does
GOLDEN = [5.5451994, 4.8892736, 4.0057001, 3.120338, 2.3575361, 1.692149, 1.1759411, 0.8186361, 0.5882244, 0.4480011]


def train_losses() -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        opt = MuonAdamW(model.param_groups(unembedding_lr=0.004, embedding_lr=0.1, matrix_lr=0.02, scalar_lr=0.1,
                                           weight_decay=0.1))
        opt.ortho_dtype = torch.float32
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (4, 33), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        losses = []
        for step in range(10):
            loss = model(x, y, active_start=0 if step < 6 else 1)
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


def test_golden_losses():
    got = train_losses()
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, GOLDEN)) and len(got) == len(GOLDEN), \
        f"losses moved: got {[round(v, 7) for v in got]}"
