"""MuonAdamW: AdamW part matches torch.optim.AdamW, Muon orthogonalises, missing grads are untouched."""
import copy

import pytest
import torch

from nanochat.optim import MuonAdamW, orthogonalize


def adamw_groups(params, lr=1e-2, wd=0.0):
    return [dict(kind="adamw", params=params, lr=lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=wd)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_part_matches_torch(wd):
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=wd)
    opt = MuonAdamW(adamw_groups(ours, wd=wd))
    for step in range(5):
        grads = [torch.randn_like(p) for p in ref]
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_orthogonalize_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 96), (96, 32)]:
        G = torch.randn(3, *shape)
        X = orthogonalize(G).float()
        s = torch.linalg.svdvals(X)
        # Polar Express in bf16 lands the singular values in a band around 1 (not exactly 1);
        # only the few tiniest singular values of a random square matrix stay below the band.
        assert s.max() < 1.3, (shape, s.max())
        in_band = ((s > 0.7) & (s < 1.3)).float().mean()
        assert in_band > 0.9, (shape, in_band)
        # Same singular vectors as the exact polar factor U V^T: high cosine similarity.
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        cos = (X * polar).sum() / (X.norm() * polar.norm())
        assert cos > 0.95


def make_muon(params, **kw):
    groups = [dict(kind="muon", params=params, lr=0.02, momentum=0.95, weight_decay=0.1)]
    return MuonAdamW(groups, **kw)


def test_muon_step_changes_weights_with_a_bounded_update():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 32) * 0.1) for _ in range(3)]
    before = [p.detach().clone() for p in ps]
    opt = make_muon(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, b in zip(ps, before):
        delta = (p - b)
        assert delta.abs().sum() > 0
        # The orthogonalised update has spectral norm ~1, so lr bounds the change.
        assert torch.linalg.matrix_norm(delta, ord=2) < 0.02 * 1.5 + 0.02 * 0.1 * b.norm()


@pytest.mark.parametrize("active_only", [True, False])
def test_none_grad_params_and_state_untouched(active_only):
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(4)]
    scal = [torch.nn.Parameter(torch.randn(1)) for _ in range(4)]
    opt = MuonAdamW([dict(kind="muon", params=mats, lr=0.02, momentum=0.95, weight_decay=0.1),
                     dict(kind="adamw", params=scal, lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)],
                    active_only_stack=active_only)
    # Step 1: everyone has grads, so everyone gets state.
    for p in mats + scal:
        p.grad = torch.randn_like(p)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    frozen = [mats[0], mats[1], scal[0], scal[1]]
    values_before = [p.detach().clone() for p in frozen]
    # Step 2: the first two of each group are frozen (grad None).
    for p in mats + scal:
        p.grad = None if any(p is f for f in frozen) else torch.randn_like(p)
    opt.step()
    for p, v in zip(frozen, values_before):
        assert torch.equal(p, v)
    state_after = opt.state_dict()
    for idx in (0, 1, 4, 5):  # param indices of the frozen ones in the state dict
        for k, v in state_before["state"][idx].items():
            assert torch.equal(v, state_after["state"][idx][k]), (idx, k)
    # The trained ones moved on.
    assert not torch.equal(state_before["state"][2]["momentum_buffer"], state_after["state"][2]["momentum_buffer"])
    assert state_after["state"][6]["step"].item() == 2


def _pack_run(pack, replace_at=None):
    """Muon on two groups over steps whose active matrices are all, a suffix, a non-contiguous set
    and a lone one, with a device-side skipped step; at `replace_at` a parameter's `.data` is
    replaced and the optimizer state is reloaded from a copy (as a checkpoint resume does)."""
    torch.manual_seed(0)
    groups = [dict(kind="muon", params=[torch.nn.Parameter(torch.randn(*shape)) for _ in range(4)], lr=0.02,
                   momentum=0.95, weight_decay=0.1) for shape in [(8, 8), (16, 8)]]
    opt = MuonAdamW(groups, fused_adamw=True, pack=pack)
    opt.ortho_dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    for step, rows in enumerate([[0, 1, 2, 3], [1, 2, 3], [0, 2, 3], [3], [0, 1, 2, 3], [2, 3], [0, 1]]):
        if step == replace_at:
            p = groups[0]["params"][2]
            p.data = p.data.clone()
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                p.grad = torch.randn(p.shape, generator=g) if i in rows else None
        opt.step(skip_if=torch.tensor(step == 4))
    params = [p for group in opt.param_groups for p in group["params"]]
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


def test_packed_storage_gives_the_same_update_as_stacking():
    """Packed weights and momenta updated in place == stacked copies written back, bit for bit,
    whatever the active set (a contiguous run takes the in-place path, the rest stacks)."""
    ref = _pack_run(pack=False)
    for a, b in zip(ref, _pack_run(pack=True)):
        assert torch.equal(a, b)
    for a, b in zip(ref, _pack_run(pack=True, replace_at=3)):
        assert torch.equal(a, b)


def test_packed_parameters_are_views_of_one_tensor_and_stay_in_sync():
    mats = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    values = [p.detach().clone() for p in mats]
    opt = MuonAdamW([dict(kind="muon", params=mats, lr=0.02, momentum=0.95, weight_decay=0.0)])
    assert len({p.untyped_storage().data_ptr() for p in mats}) == 1  # one storage for the group
    assert all(torch.equal(p, v) for p, v in zip(mats, values))  # packing kept the values
    # A parameter whose .data was replaced (e.g. by a dtype or device move) is re-pointed into the
    # pack before it is written, so the update lands in the parameter the model uses.
    mats[1].data = mats[1].data.clone()
    before = mats[1].detach().clone()
    for p in mats:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(mats[1], before)
    assert len({p.untyped_storage().data_ptr() for p in mats}) == 1


def run_muon(active_only, chunk, grads_per_step):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 24)) for _ in range(5)]
    opt = make_muon(ps, active_only_stack=active_only, stack_chunk_size=chunk)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach().clone() for p in ps]


def test_active_only_and_chunked_stacking_match_the_full_stack():
    torch.manual_seed(1)
    steps = []
    for s in range(3):
        steps.append([None if (s > 0 and i < s) else torch.randn(8, 24) for i in range(5)])
    ref = run_muon(active_only=False, chunk=0, grads_per_step=steps)
    for active_only, chunk in [(True, 0), (True, 2), (False, 3), (True, 8)]:
        got = run_muon(active_only, chunk, steps)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_groups_rejected():
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.randn(2))], lr=0.1)])
    with pytest.raises(ValueError, match="one shape"):
        make_muon([torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 8))])


def test_compiled_orthogonalizer_does_not_recompile_when_the_active_count_changes():
    """Active-only stacking changes the stack size with the trained suffix; that must not cost a
    recompile per count (it stalled dynamic-suffix runs for seconds on the GPU)."""
    import torch._dynamo
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(6)]
    opt = make_muon(ps, active_only_stack=True, compile_orthogonalize=True, compile_backend=counting_backend)
    for n_active in (6, 4, 3, 5, 2, 1):
        for i, p in enumerate(ps):
            p.grad = torch.randn_like(p) if i >= len(ps) - n_active else None
        opt.step()
    assert len(compiles) == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------- sharded (torchrun)
def _sharded_model_and_groups(seed=0):
    """A small stand-in for the GPT's groups: two AdamW matrices (sharded by rows), per-layer
    scalars (replicated) and a Muon group of 5 matrices (owned by rank i % 2, uneven on purpose)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Parameter(torch.randn(64, 32, generator=g))
    head = torch.nn.Parameter(torch.randn(64, 32, generator=g) * 0.1)
    scalars = [torch.nn.Parameter(torch.ones(1)) for _ in range(5)]
    mats = [torch.nn.Parameter(torch.randn(32, 48, generator=g) * 0.2) for _ in range(5)]
    groups = [dict(kind="adamw", name="emb", params=[emb, head], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
              dict(kind="adamw", name="scalars", params=scalars, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
              dict(kind="muon", name="mats", params=mats, lr=2e-2, momentum=0.95, weight_decay=0.1)]
    return [emb, head, *scalars, *mats], groups


def _sharded_grads(step, rank, params):
    """Per-rank gradients; on steps 1 and 3 the first three matrices and scalars are frozen (None),
    as on a dynamic-suffix step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    frozen = set(range(2, 5)) | set(range(7, 10)) if step in (1, 3) else set()
    return [None if i in frozen else torch.randn(p.shape, generator=g) for i, p in enumerate(params)]


def _sharded_worker(rank, world, init_file, out_dir, backend):
    import torch.distributed as dist
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, groups = _sharded_model_and_groups()
        for p in params:
            p.data = p.data.to(device)
        opt = MuonAdamW(groups)
        for step in range(5):
            for p, grad in zip(params, _sharded_grads(step, rank, params)):
                p.grad = None if grad is None else grad.to(device)
            if step == 2:  # the dynamic-suffix probe path: average first, then step without reducing
                opt.reduce_grads()
                opt.step(reduce_grads=False)
            elif step == 4:  # a non-finite step on one rank: skipped on every rank (the flag is global)
                if rank == 1:
                    params[-1].grad[0, 0] = float("nan")
                opt.step(skip_if=torch.tensor(True, device=device))
            else:
                opt.step()
        owned = sorted(i for i, p in enumerate(params) if p in opt.state and "momentum_buffer" in opt.state[p])
        torch.save({"params": [p.detach().cpu().clone() for p in params], "owned_muon": owned,
                    "emb_state_rows": opt.state[params[0]]["exp_avg"].shape[0]}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still talks to it (SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_sharded_state_matches_one_process(tmp_path, backend):
    """2 ranks with sharded optimizer state give the weights one process gets from the averaged
    gradients, frozen (None-grad) steps, the reduce-first path and a skipped step included; each
    rank keeps only its own Muon momenta and half of the embedding's AdamW moments. gloo runs the
    fallbacks on CPU; nccl (2 GPUs) runs reduce-scatter / in-place all-gather."""
    import torch.multiprocessing as mp
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path), backend), nprocs=2, join=True)
    params, groups = _sharded_model_and_groups()
    opt = MuonAdamW(groups)
    for step in range(4):  # step 4 was skipped
        per_rank = [_sharded_grads(step, r, params) for r in range(2)]
        for p, g0, g1 in zip(params, *per_rank):
            p.grad = None if g0 is None else (g0 + g1) / 2
        opt.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        for i, (want, got) in enumerate(zip(params, r["params"])):
            # GPU bf16 orthogonalisation rounds differently from the CPU reference
            tol = dict(rtol=1e-5, atol=1e-6) if backend == "gloo" else dict(rtol=2e-2, atol=2e-3)
            torch.testing.assert_close(got, want.detach(), **tol, msg=f"param {i}")
        assert r["emb_state_rows"] == 32
    # Muon matrices are params 7..11 (group index 0..4): rank 0 owns 0, 2, 4; rank 1 owns 1, 3.
    assert ranks[0]["owned_muon"] == [7, 9, 11] and ranks[1]["owned_muon"] == [8, 10]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_side_skip_changes_nothing_and_otherwise_equals_a_plain_step(device):
    """step(skip_if=flag) with fused AdamW (the CUDA default; CPU has a fused kernel too) decides
    on the device: a True flag with NaN/Inf gradients leaves weights and every state tensor (step
    counts included) bit-identical; a False flag gives exactly the plain step."""
    params, groups = _sharded_model_and_groups()
    twin, twin_groups = _sharded_model_and_groups()
    for p in params + twin:
        p.data = p.data.to(device)
    opt = MuonAdamW(groups, fused_adamw=True)
    ref = MuonAdamW(twin_groups, fused_adamw=True)

    def snapshot():
        return [p.detach().clone() for p in params] + [v.clone() for st in opt.state.values() for v in st.values()]

    for step in range(4):
        grads = _sharded_grads(step, 0, params)
        for p, q, g in zip(params, twin, grads):
            p.grad = None if g is None else g.to(device, copy=True)
            q.grad = None if g is None else g.to(device, copy=True)
        if step == 2:
            params[0].grad[0, 0] = float("nan")
            params[-1].grad[1, 1] = float("inf")
            before = snapshot()
            opt.step(skip_if=torch.tensor(True, device=device))
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
            continue
        opt.step(skip_if=torch.tensor(False, device=device))
        ref.step()
        for p, q in zip(params, twin):
            assert torch.equal(p, q)


def test_orthogonalize_fused_epilogue_is_closer_to_exact_than_the_plain_formula():
    """The baddbmm/addmm form runs the same Polar Express steps as the written-out formula, with
    the scale-and-add inside the GEMM (fp32 accumulate, one rounding): against the same steps in
    fp64 it is 2-4x more accurate than the plain bf16 formula (measured 1.6-2.0 % vs 3.4-6.1 %)."""
    from nanochat.optim import _POLAR_EXPRESS_COEFFS

    def plain(G, dtype):
        X = G.to(dtype)
        transposed = X.size(-2) > X.size(-1)
        X = X.mT if transposed else X
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
        for a, b, c in _POLAR_EXPRESS_COEFFS:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
        return (X.mT if transposed else X).double()

    torch.manual_seed(0)
    for shape in [(4, 48, 48), (2, 32, 80), (2, 80, 32), (40, 24)]:
        G = torch.randn(*shape)
        exact = plain(G, torch.float64)
        ours = orthogonalize(G).double()
        assert ours.shape == G.shape
        err_ours = (ours - exact).norm() / exact.norm()
        err_plain = (plain(G, torch.bfloat16) - exact).norm() / exact.norm()
        assert err_ours < 0.03 and err_ours < err_plain, (shape, err_ours, err_plain)


# --------------------------------------------------------------------------- fused elementwise
def _muon_run(fuse, backend, steps_spec, device="cpu", skip_at=()):
    """Muon on the model's three kinds of group (square, tall, wide; 8/16 instead of 768/3072);
    per step the number of active matrices (the dynamic-suffix pattern), changing lr and momentum
    every step, a skipped step at `skip_at`. One group without weight decay."""
    torch.manual_seed(0)
    groups = []
    for i, shape in enumerate([(8, 8), (16, 8), (8, 16)]):
        params = [torch.nn.Parameter(torch.randn(*shape, device=device)) for _ in range(4)]
        groups.append(dict(kind="muon", name=str(shape), params=params, lr=0.02, momentum=0.95,
                           weight_decay=0.0 if i == 2 else 0.1))
    # fused AdamW (also on CPU) turns on the device-side skip, the path base_train takes
    opt = MuonAdamW(groups, fuse_elementwise=fuse, compile_backend=backend, fused_adamw=True)
    opt.ortho_dtype = torch.float32
    g = torch.Generator(device=device).manual_seed(1)
    for step, n_active in enumerate(steps_spec):
        for group in opt.param_groups:
            group["lr"] = 0.02 * (1 - step / 20)
            group["momentum"] = 0.85 + 0.01 * step
            for i, p in enumerate(group["params"]):
                p.grad = torch.randn(p.shape, generator=g, device=device) if i >= 4 - n_active else None
        opt.step(skip_if=torch.tensor(step in skip_at, device=device))
    return [p.detach().clone() for group in opt.param_groups for p in group["params"]], opt


def test_fused_elementwise_never_recompiles_for_lr_momentum_or_active_count():
    """The compiled pre/post-GEMM functions take lr, momentum and the stack size as graph inputs:
    a per-step schedule and a changing trained suffix must not recompile (each recompile is a
    stall of seconds on the GPU)."""
    import torch._dynamo
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    torch._dynamo.reset()
    _muon_run(True, counting_backend, [4, 4, 3, 2, 3, 4, 1, 2, 3])
    # One prepare and one apply graph for every shape (flat stacks), and one apply graph for the
    # group without weight decay (a branch; the model gives every group the same decay). None per
    # step, per count, for a lone matrix (padded to two: dynamo would specialise a size-1
    # dimension), or for packed views against stacked copies (a non-contiguous run of matrices).
    assert len(graphs) == 3, len(graphs)
    torch._dynamo.reset()


def test_fused_elementwise_matches_eager_with_inductor():
    """The real compiled kernels (inductor's CPU code here, Triton on the GPU) compute the same
    update as the eager functions, a device-side skipped step included."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    spec = [4, 4, 3, 1, 2, 4]
    ref, _ = _muon_run(False, "inductor", spec, skip_at=(2,))
    got, _ = _muon_run(True, "inductor", spec, skip_at=(2,))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # No recompiles behind the result's back (lr and momentum changed every step): a graph that
    # kept a stale momentum was one failure mode seen while writing this.
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


@pytest.mark.gpu
def test_fused_elementwise_matches_eager_on_gpu_with_a_skipped_step():
    import torch._dynamo
    torch._dynamo.reset()
    spec = [4, 4, 3, 2, 4, 4]
    ref, _ = _muon_run(False, "inductor", spec, device="cuda", skip_at=(3,))
    got, opt = _muon_run(True, "inductor", spec, device="cuda", skip_at=(3,))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
