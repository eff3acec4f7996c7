"""Block-update schedules `layer_drop` and `depth_growth`: plans that are pure functions of
(seed, step, progress), rank agreement, skipped blocks untouched by a real MuonAdamW step, the
one-time copy of weights and optimizer state at growth (sharded under 2 gloo ranks too), resume
parity at every step, and `skip` as the identity through GPT.forward."""
import argparse
import copy
import dataclasses
import io

import pytest
import torch

from nanochat.config import ScheduleFlags, build_parser, flag_name
from nanochat.gpt import GPT
from nanochat.optim import MuonAdamW
from nanochat.schedules import REGISTRY, SCHEDULES, ScheduleContext, StepPlan, build_schedule
from nanochat.schedules.depth_growth import DepthGrowthConfig, DepthGrowthSchedule, growth_sources, shallow_blocks
from nanochat.schedules.layer_drop import LayerDropConfig, LayerDropSchedule

from tests.test_gpt import batch, make_model, tiny_config


def make_opt(model, **kw):
    """The optimizer as the trainer builds it (weight decay on, so a missed skip would show), with
    the orthogonalisation in fp32 (faster than bf16 on a CPU; the same code path otherwise)."""
    opt = MuonAdamW(model.param_groups(unembedding_lr=0.01, embedding_lr=0.2, matrix_lr=0.05, scalar_lr=0.5,
                                       weight_decay=0.1), **kw)
    opt.ortho_dtype = torch.float32
    return opt


def ctx_for(model, opt=None, num_iterations=10, seed=0, n_layer=None, **kw):
    return ScheduleContext(model=model, n_layer=n_layer or model.config.n_layer, num_iterations=num_iterations,
                           optimizer=opt, seed=seed, **kw)


def layer_drop(n_layer=12, num_iterations=1000, seed=0, time_budget=None, **cfg):
    """A layer_drop schedule for plans only (no model: choosing plans never touches it)."""
    ctx = ctx_for(None, num_iterations=num_iterations, seed=seed, n_layer=n_layer, time_budget=time_budget)
    return LayerDropSchedule(ctx, LayerDropConfig(**cfg))


def train_step(model, opt, sched, step, elapsed=0.0, data_seed=None):
    """One step as the trainer runs it (the interface's hook order); returns (loss, plan)."""
    plan = sched.before_step(step, elapsed)
    x, y = batch(seed=step if data_seed is None else data_seed)
    loss = model(x, y, active_start=plan.active_start, skip=plan.skip)
    loss.backward()
    sched.after_backward(step, plan)
    opt.step()
    model.zero_grad(set_to_none=True)
    sched.after_step(step, plan)
    return loss.item(), plan


class StepPlanSchedule:
    """A stand-in schedule that runs one fixed plan (default: the full model)."""

    def __init__(self, plan=StepPlan()):
        self.plan_ = plan

    def before_step(self, step, elapsed):
        return self.plan_

    def after_backward(self, step, plan):
        return False

    def after_step(self, step, plan):
        return []


def state_of(opt, params):
    """Deep copy of the optimizer state of `params` (a list of dicts of tensors)."""
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} if p in opt.state else {}
            for p in params]


def same_state(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --------------------------------------------------------------------------- flags and registry
def test_configs_from_args_defaults_and_validation():
    assert LayerDropConfig.from_args(argparse.Namespace(drop_rate_start=0.3, drop_mode="fixed", lr=1)).to_dict() == \
        {"rate_start": 0.3, "full_depth_at": 0.5, "mode": "fixed"}
    assert DepthGrowthConfig.from_args(argparse.Namespace(growth_factor=3)).to_dict() == {"at": 0.3, "factor": 3}
    assert LayerDropConfig().validate(12) == [] and DepthGrowthConfig().validate(12) == []
    bad = LayerDropConfig(rate_start=1.5, full_depth_at=0.0, mode="path").validate(2)
    assert [line.split()[0] for line in bad] == ["--drop-rate-start", "--drop-full-depth-at", "--drop-mode",
                                                 "--block-update-schedule=layer_drop"]
    assert "must be in [0, 1]" in bad[0] and "must be in (0, 1]" in bad[1]
    assert LayerDropConfig(rate_start="x").validate(12) == ["--drop-rate-start ('x') must be a number"]
    assert DepthGrowthConfig(at=1.0, factor=12).validate(12) == ["--growth-at (1.0) must be in (0, 1)",
                                                                  "--growth-factor (12) must be in [2, 11]"]
    assert DepthGrowthConfig(factor=2.0).validate(12) == ["--growth-factor (2.0) must be an integer"]
    assert "needs --depth >= 3" in DepthGrowthConfig().validate(2)[0]


def test_registry_builds_both_schedules():
    model = make_model(n_layer=4)
    args = argparse.Namespace(drop_rate_start=0.25, growth_at=0.5)
    assert {"layer_drop", "depth_growth"} <= set(SCHEDULES)
    drop = build_schedule("layer_drop", ctx_for(model), args)
    grow = build_schedule("depth_growth", ctx_for(model, make_opt(model)), args)
    assert isinstance(drop, LayerDropSchedule) and drop.config.rate_start == 0.25 and drop.varies
    assert isinstance(grow, DepthGrowthSchedule) and grow.config.at == 0.5 and grow.varies
    assert grow.describe() == {"name": "depth_growth", "at": 0.5, "factor": 2, "shallow_blocks": [0, 2, 3]}
    with pytest.raises(ValueError, match="optimizer"):
        build_schedule("depth_growth", ctx_for(model), args)
    with pytest.raises(ValueError, match="horizon"):
        build_schedule("layer_drop", ctx_for(model, num_iterations=-1), args)


def test_the_registry_is_the_one_list_of_schedules(monkeypatch):
    """`--block-update-schedule` offers exactly REGISTRY's names; each entry builds through
    build_schedule with its config read from the flags, and ScheduleFlags validates the chosen
    schedule through the entry's config class and refuses its flags with another schedule."""
    parser = build_parser()
    choices = next(a.choices for a in parser._actions if "--block-update-schedule" in a.option_strings)
    assert list(choices) == list(SCHEDULES) == [e.name for e in REGISTRY] and len(set(SCHEDULES)) == len(SCHEDULES)
    with pytest.raises(ValueError, match="unknown block-update schedule 'nope'; choose from full_update, "):
        build_schedule("nope", None, None)
    model = make_model(n_layer=4)
    args = parser.parse_args([])
    defaults = ScheduleFlags.from_args(args)
    for entry in REGISTRY:
        sched = build_schedule(entry.name, ctx_for(model, make_opt(model)), args)
        assert type(sched) is entry.schedule and sched.name == entry.name
        chosen = dataclasses.replace(defaults, block_update_schedule=entry.name)
        assert chosen.validate(4) == []
        if entry.config is None:
            continue
        assert sched.config == entry.config.from_args(args)
        own = {f.name for f in dataclasses.fields(ScheduleFlags) if f.name.startswith(entry.flag_prefix)}
        assert own == {entry.flag_prefix + f.name for f in dataclasses.fields(entry.config)}
        monkeypatch.setattr(entry.config, "validate", lambda self, n_layer, name=entry.name: [f"{name} at {n_layer}"])
        assert chosen.validate(7) == [f"{entry.name} at 7"]
        first = sorted(own)[0]
        other = dataclasses.replace(defaults, **{first: object()})  # differs from its default
        assert other.validate(4) == [f"{flag_name(first)} only apply with --block-update-schedule={entry.name}"]


# --------------------------------------------------------------------------- layer_drop plans
@pytest.mark.parametrize("mode", ["bernoulli", "fixed"])
def test_layer_drop_plans_are_a_pure_function_of_seed_and_step(mode):
    """Two instances ("ranks") agree on every step whatever order they are asked in; asking twice
    changes nothing; another seed draws other blocks."""
    a, b = layer_drop(seed=7, mode=mode), layer_drop(seed=7, mode=mode)
    steps = range(0, 400, 3)
    plans_a = [a.plan(s, 0.0) for s in steps]
    plans_b = [b.plan(s, 0.0) for s in reversed(steps)][::-1]
    assert plans_a == plans_b == [a.plan(s, 0.0) for s in steps]
    other = [layer_drop(seed=8, mode=mode).plan(s, 0.0) for s in steps]
    assert other != plans_a
    assert any(p.skip for p in plans_a) and len({p.skip for p in plans_a}) > 10


def test_layer_drop_rate_ramps_to_zero_then_every_step_is_full():
    sched = layer_drop(num_iterations=100, rate_start=0.6, full_depth_at=0.4)
    assert [sched.drop_rate(t) for t in (0.0, 0.1, 0.2, 0.4, 0.9)] == pytest.approx([0.6, 0.45, 0.3, 0.0, 0.0])
    for step in range(100):
        plan = sched.before_step(step, 0.0)
        assert plan.active_start == 0 and 0 not in plan.skip and 11 not in plan.skip
        if step >= 40:
            assert plan == StepPlan()
    st = sched.stats()
    assert st["full_depth_step"] == 40 and st["steps"] == 100 and st["full_steps"] >= 60
    assert st["mean_skipped_blocks"] == pytest.approx(12 - st["mean_trained_blocks"])
    assert sum(st["skip_counts"]) == pytest.approx(100 * st["mean_skipped_blocks"])
    assert st["skip_counts"][0] == st["skip_counts"][11] == 0
    # Under a time budget progress is elapsed / budget, whatever the step number.
    timed = layer_drop(num_iterations=10 ** 9, time_budget=100.0, rate_start=0.6, full_depth_at=0.4)
    assert timed.plan(5, 40.0) == StepPlan() and any(timed.plan(10 ** 6 + s, 4.0).skip for s in range(10))


@pytest.mark.parametrize("mode", ["bernoulli", "fixed"])
def test_layer_drop_skips_each_middle_block_at_the_drop_rate(mode):
    sched = layer_drop(num_iterations=10 ** 9, rate_start=0.35, mode=mode)  # progress ~ 0: rate 0.35
    skips = [sched.plan(s, 0.0).skip for s in range(3000)]
    counts = [len(skip) for skip in skips]
    assert sum(counts) / len(counts) == pytest.approx(0.35 * 10, rel=0.05)
    if mode == "fixed":  # the expected count, rounded stochastically: 3 or 4 of the 10 middle blocks
        assert set(counts) == {3, 4}
    else:
        assert len(set(counts)) > 4
    per_block = [sum(i in skip for skip in skips) / len(skips) for i in range(12)]
    assert per_block[0] == per_block[11] == 0.0
    assert all(abs(f - 0.35) < 0.05 for f in per_block[1:11]), per_block


def test_layer_drop_announces_full_depth_once():
    sched = layer_drop(num_iterations=10, rate_start=0.5, full_depth_at=0.5)
    lines = []
    for step in range(10):
        lines += sched.after_step(step, sched.before_step(step, 0.0))
    assert len(lines) == 1 and lines[0].startswith("layer_drop: full depth from step 5 on")


# --------------------------------------------------------------------------- skip semantics
def test_skip_gives_the_loss_and_gradients_of_the_model_without_those_blocks():
    big = make_model(n_layer=6)
    small = GPT(tiny_config(n_layer=4))
    small.load_state_dict(big.state_dict(), strict=False)  # embedding and head
    for i, j in enumerate((0, 1, 3, 5)):
        small.transformer.h[i].load_state_dict(big.transformer.h[j].state_dict())
    x, y = batch(seed=3)
    loss_big = big(x, y, skip=(2, 4))
    loss_small = small(x, y)
    assert torch.equal(loss_big, loss_small)
    loss_big.backward()
    loss_small.backward()
    for i, j in enumerate((0, 1, 3, 5)):
        for p, q in zip(small.transformer.h[i].parameters(), big.transformer.h[j].parameters()):
            assert torch.equal(p.grad, q.grad)
    assert all(p.grad is None for j in (2, 4) for p in big.transformer.h[j].parameters())
    assert torch.equal(big.lm_head.weight.grad, small.lm_head.weight.grad)


def test_skipped_blocks_keep_weights_and_optimizer_state_across_a_muon_adamw_step():
    model = make_model(n_layer=6)
    opt = make_opt(model)
    sched = LayerDropSchedule(ctx_for(model, num_iterations=10 ** 6), LayerDropConfig(rate_start=0.5))
    train_step(model, opt, sched, 0)  # a step that creates state for whatever it trains
    train_step(model, opt, StepPlanSchedule(), 1)  # a full step: every block has state now
    step = next(s for s in range(2, 100) if 0 < len(sched.plan(s, 0.0).skip) < 4)
    skipped = sched.plan(step, 0.0).skip
    blocks = model.transformer.h
    frozen = [p for i in skipped for p in blocks[i].parameters()]
    trained = [p for i in range(6) if i not in skipped for p in blocks[i].parameters() if p.dim() == 2]
    w_frozen, w_trained = [p.detach().clone() for p in frozen], [p.detach().clone() for p in trained]
    s_frozen, s_trained = state_of(opt, frozen), state_of(opt, trained)
    assert all(s for s in s_frozen)  # there is state to keep (momenta, AdamW moments and steps)
    _, plan = train_step(model, opt, sched, step)
    assert plan.skip == skipped
    assert all(torch.equal(p, w) for p, w in zip(frozen, w_frozen))
    assert same_state(state_of(opt, frozen), s_frozen)
    assert not any(torch.equal(p, w) for p, w in zip(trained, w_trained))
    assert not same_state(state_of(opt, trained), s_trained)


# --------------------------------------------------------------------------- depth_growth
def test_shallow_blocks_and_growth_sources():
    assert shallow_blocks(12, 2) == (0, 2, 4, 6, 8, 10, 11)
    assert growth_sources(12, 2) == {1: 0, 3: 2, 5: 4, 7: 6, 9: 8}
    assert shallow_blocks(7, 3) == (0, 3, 6) and growth_sources(7, 3) == {1: 0, 2: 0, 4: 3, 5: 3}
    assert shallow_blocks(5, 4) == (0, 4) and growth_sources(5, 4) == {1: 0, 2: 0, 3: 0}


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "stacked"])
def test_depth_growth_copies_weights_and_optimizer_state_exactly_once(pack):
    model = make_model(n_layer=5)  # shallow: 0 2 4; copies 1 <- 0, 3 <- 2
    opt = make_opt(model, pack=pack)
    sched = DepthGrowthSchedule(ctx_for(model, opt, num_iterations=10), DepthGrowthConfig(at=0.3, factor=2))
    blocks = model.transformer.h
    init = {i: [p.detach().clone() for p in blocks[i].parameters()] for i in (1, 3)}
    lines = []
    for step in range(3):  # steps 0, 1, 2 are shallow (progress < 0.3)
        _, plan = train_step(model, opt, sched, step)
        assert plan.skip == (1, 3)
    for i in (1, 3):  # untouched, and without optimizer state, until growth
        assert all(torch.equal(p, w) for p, w in zip(blocks[i].parameters(), init[i]))
        assert all(p not in opt.state or not opt.state[p] for p in blocks[i].parameters())
    calls = []
    grow = sched.grow
    sched.grow = lambda step: (calls.append(step), grow(step))
    plan = sched.before_step(3, 0.0)
    assert plan == StepPlan() and calls == [3] and sched.grown and sched.growth_step == 3
    for dst, src in ((1, 0), (3, 2)):
        src_p, dst_p = list(blocks[src].parameters()), list(blocks[dst].parameters())
        assert all(torch.equal(a, b) for a, b in zip(src_p, dst_p))
        assert same_state(state_of(opt, dst_p), state_of(opt, src_p))
        assert all(opt.state[p] for p in dst_p)  # Muon momenta, AdamW step and moments of the scalars
        assert {k for p in dst_p for k in opt.state[p]} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    x, y = batch(seed=3)
    model(x, y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    lines += sched.after_step(3, plan)
    assert len(lines) == 1 and "grew from 3 to 5 blocks at step 3" in lines[0] and "0->1 2->3" in lines[0]
    for step in range(4, 10):
        train_step(model, opt, sched, step)
    assert calls == [3]
    # The copies train on their own from there (a packed buffer moved with its parameter).
    assert not torch.equal(blocks[1].attn.c_q.weight, blocks[0].attn.c_q.weight)
    assert not torch.equal(opt.state[blocks[1].attn.c_q.weight]["momentum_buffer"],
                           opt.state[blocks[0].attn.c_q.weight]["momentum_buffer"])
    st = sched.stats()
    assert st["grown"] and st["growth_step"] == 3 and st["shallow_steps"] == 3 and st["shallow_trained_blocks"] == 3
    assert st["mean_trained_blocks"] == pytest.approx((3 * 3 + 7 * 5) / 10)


def test_depth_growth_copies_the_weight_ema_shadow():
    from nanochat.ema import WeightEMA
    model = make_model(n_layer=4)
    opt = make_opt(model)
    ema = WeightEMA(model, 0.9)
    sched = DepthGrowthSchedule(ctx_for(model, opt, num_iterations=4, extra={"ema": ema}), DepthGrowthConfig(at=0.5))
    for step in range(2):
        train_step(model, opt, sched, step)
        ema.update()
    shadow = dict(zip(ema.names, ema.shadow))
    names = [name for name, _ in model.transformer.h[0].named_parameters()]
    assert not any(torch.equal(shadow[f"transformer.h.1.{n}"], shadow[f"transformer.h.0.{n}"]) for n in names)
    sched.before_step(2, 0.0)  # grows: block 1 <- block 0
    assert all(torch.equal(shadow[f"transformer.h.1.{n}"], shadow[f"transformer.h.0.{n}"]) for n in names)


def _schedule(kind, model, opt, num_iterations):
    ctx = ctx_for(model, opt, num_iterations=num_iterations, seed=3)
    if kind == "layer_drop":
        return LayerDropSchedule(ctx, LayerDropConfig(rate_start=0.6, full_depth_at=0.6))
    return DepthGrowthSchedule(ctx, DepthGrowthConfig(at=0.4, factor=2))


def _saved(obj):
    """A checkpoint round trip (torch.save / torch.load), as the trainer's save and resume do."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", ["layer_drop", "depth_growth"])
def test_resume_at_any_step_gives_bit_identical_losses(kind):
    """8 steps straight vs k steps + save + load into a fresh model, optimizer and schedule + the
    rest, for every k (before, at and after growth / full depth)."""
    n = 8
    model = make_model(n_layer=5)
    opt = make_opt(model)
    sched = _schedule(kind, model, opt, n)
    losses, plans, ckpts = [], [], {}
    for step in range(n):
        ckpts[step] = _saved({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()})
        loss, plan = train_step(model, opt, sched, step)
        losses.append(loss)
        plans.append(plan)
    assert any(p.skip for p in plans) and plans[-1] == StepPlan()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    for k in range(1, n):
        m = make_model(seed=123, n_layer=5)
        m.load_state_dict(ckpts[k]["model"])
        o = make_opt(m)
        o.load_state_dict(ckpts[k]["optim"])
        s = _schedule(kind, m, o, n)
        s.load_state_dict(copy.deepcopy(ckpts[k]["sched"]))
        if kind == "depth_growth":
            grows = []
            grow = s.grow
            s.grow = lambda step: (grows.append(step), grow(step))
        resumed = [train_step(m, o, s, step) for step in range(k, n)]
        assert [loss for loss, _ in resumed] == losses[k:], k
        assert [plan for _, plan in resumed] == plans[k:], k
        assert all(torch.equal(final[name], v) for name, v in m.state_dict().items()), k
        assert s.stats() == sched.stats(), k
        if kind == "depth_growth":  # copied by the resumed run only if the checkpoint is from before growth
            assert grows == ([sched.growth_step] if k <= sched.growth_step else [])


# --------------------------------------------------------------------------- 2 gloo ranks
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make_model(n_layer=4)
        opt = make_opt(model)  # sharded: Muon matrix i of a group lives on rank i % 2
        ctx = ctx_for(model, opt, num_iterations=6, ddp=True, world_size=world)
        sched = DepthGrowthSchedule(ctx, DepthGrowthConfig(at=0.5, factor=2))  # grows at step 3: 1 <- 0
        params = list(model.parameters())
        at_growth = None
        for step in range(6):
            plan = sched.before_step(step, 0.0)  # checks that the ranks agree (an all-reduce)
            if step == 3:
                at_growth = {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)
                             if "momentum_buffer" in opt.state.get(p, {})}
            x, y = batch(seed=100 * step + rank)
            model(x, y, skip=plan.skip).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        # layer_drop: same seed -> every step agrees; a rank with another seed is caught, on both ranks.
        drop = LayerDropSchedule(ctx_for(model, num_iterations=100, ddp=True, world_size=world),
                                 LayerDropConfig(rate_start=0.5))
        agreed = [drop.before_step(s, 0.0).skip for s in range(20)]
        skew = LayerDropSchedule(ctx_for(model, num_iterations=100, ddp=True, world_size=world, seed=rank),
                                 LayerDropConfig(rate_start=0.5))
        caught = None
        for s in range(50):
            try:
                skew.before_step(s, 0.0)
            except RuntimeError as e:
                caught = (s, "ranks chose different layer_drop plans" in str(e))
                break
        torch.save({"params": [p.detach().clone() for p in params], "momenta": at_growth, "agreed": agreed,
                    "caught": caught}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_grow_like_one_process(tmp_path):
    """depth_growth under 2 ranks with sharded optimizer state: the copied Muon momenta reach the
    copies' owners (some owned by the other rank), and the weights equal one process's, which
    averages the two ranks' gradients; layer_drop plans agree across ranks and a divergent rank
    is caught."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # One process: the same steps with the two ranks' gradients averaged.
    model = make_model(n_layer=4)
    opt = make_opt(model)
    sched = DepthGrowthSchedule(ctx_for(model, opt, num_iterations=6), DepthGrowthConfig(at=0.5, factor=2))
    params = list(model.parameters())
    for step in range(6):
        plan = sched.before_step(step, 0.0)
        if step == 3:
            ref_momenta = {i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)
                           if "momentum_buffer" in opt.state.get(p, {})}
        grads = []
        for r in range(2):
            x, y = batch(seed=100 * step + r)
            model(x, y, skip=plan.skip).backward()
            grads.append([p.grad for p in params])
            model.zero_grad(set_to_none=True)
        for p, g0, g1 in zip(params, *grads):
            p.grad = None if g0 is None else (g0 + g1) / 2
        opt.step()
        model.zero_grad(set_to_none=True)
    for r in ranks:
        for i, (want, got) in enumerate(zip(params, r["params"])):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, msg=f"param {i}")
    # Every momentum exists on exactly one rank and equals the one process's, copies included.
    owned = [set(r["momenta"]) for r in ranks]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(ref_momenta)
    momenta = {**ranks[0]["momenta"], **ranks[1]["momenta"]}
    for i, buf in ref_momenta.items():
        torch.testing.assert_close(momenta[i], buf, rtol=1e-5, atol=1e-6, msg=f"momentum {i}")
    index = {id(p): i for i, p in enumerate(params)}
    copied = [(index[id(ps)], index[id(pd)]) for ps, pd in zip(model.transformer.h[0].parameters(),
                                                                 model.transformer.h[1].parameters()) if ps.dim() == 2]
    for i, j in copied:
        assert torch.equal(momenta[i], momenta[j]), (i, j)  # the copy is exact
    assert any((i in owned[0]) != (j in owned[0]) for i, j in copied)  # some copies crossed ranks
    assert ranks[0]["agreed"] == ranks[1]["agreed"] and any(ranks[0]["agreed"])
    assert ranks[0]["caught"] == ranks[1]["caught"] and ranks[0]["caught"][1]


# --------------------------------------------------------------------------- compiled
@pytest.mark.slow
def test_compiled_skip_plans_compile_nothing_new():
    """Regional compilation: once the first (full) step has compiled the block and the head, plans
    that leave different blocks out run the same graphs (no recompiles, no new graphs)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = make_model(n_layer=6)
    model.compile_regions(dynamic=False)
    x, y = batch(seed=0)
    model(x, y).backward()
    model.zero_grad(set_to_none=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the block and the head were compiled
    for skip in [(1,), (2, 3), (1, 2, 3, 4), (4,), ()]:
        loss = model(x, y, skip=skip)
        loss.backward()
        model.zero_grad(set_to_none=True)
        eager = make_model(n_layer=6)(x, y, skip=skip)
        torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"]
    torch._dynamo.reset()
