"""Activation recompute (`--activation-checkpointing`), the peak-memory estimate checked at every
start, and `--device-batch-size=auto` (nanochat/gpt.py, nanochat/plan.py;
docs/optimizations/memory.md).

Recompute must change memory only: the same loss and the same gradients as no recompute, for
every trained-block plan (frozen prefix, skipped blocks), eager and compiled, with FP8 and each
CE backend. The estimate must move the right way with every knob, and the start-up check must
say what fits, with a fake free-memory number standing in for the device."""
import json
import os
import re
import subprocess

import pytest
import torch

from nanochat.config import build_parser, parse_args
from nanochat.gpt import GPT, RECOMPUTE_MODES, GPTConfig, ModelRuntime
from nanochat.plan import (CPU_AUTO_BATCH, FIT_MARGIN, RECOMPUTE_ACT_ELEMS, auto_device_batch, batch_candidates,
                           dry_run_report, estimate_memory, fit_report, memory_check, memory_options, run_problems)
from tests.helpers import TINY, base_with_tokenizer, run

GiB = 2 ** 30
PLANS = [(0, ()), (1, ()), (1, (2,))]  # (active_start, skip): full, frozen prefix, frozen prefix + a skipped block


def tiny_model(recompute="none", seed=0, n_layer=4, **runtime):
    cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(seed)
    m = GPT(cfg, ModelRuntime(activation_checkpointing=recompute, **runtime))
    m.init_weights()
    with torch.no_grad():  # non-zero output projections, so every block changes the residual stream
        for b in m.transformer.h:
            b.attn.c_proj.weight.normal_(0, 0.02)
            b.mlp.c_proj.weight.normal_(0, 0.02)
    return m


def batch(B=2, T=32, V=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def loss_and_grads(model, active_start=0, skip=()):
    model.zero_grad(set_to_none=True)
    x, y = batch()
    loss = model(x, y, active_start=active_start, skip=skip)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model):
    """Bytes that a full training forward saves for backward (parameters excluded), as seen by
    saved-tensor hooks: what a compiled region's graph keeps (the selective policy's eager cache
    is outside these hooks; MemTracker below counts that)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*batch())
    return sum(v for k, v in storages.items() if k not in params)


def assert_same(ref, got, atol=0.0):
    (l0, g0), (l1, g1) = ref, got
    torch.testing.assert_close(l1, l0, atol=atol, rtol=0)
    assert [n for n, g in g0.items() if g is None] == [n for n, g in g1.items() if g is None]
    for n, g in g0.items():
        if g is not None:
            torch.testing.assert_close(g1[n], g, atol=atol, rtol=0, msg=n)


# ---------------------------------------------------------------------------------------------
# recompute gives the same numbers


@pytest.mark.parametrize("mode", ["blocks", "selective"])
@pytest.mark.parametrize("active_start,skip", PLANS)
def test_recompute_matches_no_recompute_eager(mode, active_start, skip):
    ref = loss_and_grads(tiny_model(), active_start, skip)
    assert_same(ref, loss_and_grads(tiny_model(mode), active_start, skip))


@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_recompute_with_chunked_ce_and_fp8(mode):
    """The head is outside the checkpoint, but each CE backend must still see the same inputs; the
    FP8 GEMM is a custom op (kept by the selective policy) inside an autograd.Function."""
    from nanochat.fp8 import Fp8Options, convert_to_fp8
    chunked = dict(lm_ce_backend="chunked", lm_ce_chunk_size=16)
    assert_same(loss_and_grads(tiny_model(**chunked), 1, (2,)), loss_and_grads(tiny_model(mode, **chunked), 1, (2,)))
    ref, got = tiny_model(), tiny_model(mode)
    for m in (ref, got):
        convert_to_fp8(m, Fp8Options(enabled=True, min_dim=16))
    assert_same(loss_and_grads(ref, 1), loss_and_grads(got, 1))


def test_no_recompute_without_autograd():
    """Evaluation and the frozen prefix run without autograd: nothing to recompute, same output."""
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(tiny_model("blocks")(x), tiny_model()(x), atol=0, rtol=0)


def test_recompute_under_regional_compile():
    """The checkpoint is traced inside each block's compiled region (aot_eager: dynamo and the
    AOTAutograd partitioner, without inductor's C++ build): same numbers as eager without
    recompute, the model stays compiled, no more graphs than without recompute, and less saved."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    ref = [loss_and_grads(tiny_model(), a, s) for a, s in PLANS]
    graphs, saved = {}, {}
    try:
        for mode in RECOMPUTE_MODES:
            m = tiny_model(mode)
            torch._dynamo.reset()
            counters.clear()
            m.compile_regions(backend="aot_eager", dynamic=False)
            for (a, s), r in zip(PLANS, ref):
                assert_same(r, loss_and_grads(m, a, s), atol=1e-6)
            with torch.no_grad():
                m(*batch())
            assert m._compiled, mode  # no fallback to eager
            graphs[mode] = counters["stats"]["unique_graphs"]
            saved[mode] = saved_bytes(m)
    finally:
        torch._dynamo.reset()
    assert graphs["blocks"] == graphs["selective"] == graphs["none"]
    # the compiled backward really recomputes: what the graphs save for it shrinks
    assert saved["blocks"] < 0.5 * saved["none"] and saved["blocks"] < saved["selective"] < 0.8 * saved["none"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_recompute_under_inductor_on_cpu(mode):
    """The real compiler (inductor, CPU C++ kernels) on one tiny shape: ~20-30 s each on 2 cores."""
    import torch._dynamo
    ref = loss_and_grads(tiny_model(n_layer=2), 1)
    m = tiny_model(mode, n_layer=2)
    torch._dynamo.reset()
    m.compile_regions(dynamic=False)
    try:
        assert_same(ref, loss_and_grads(m, 1), atol=1e-5)
        assert m._compiled
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_gpu_recompute_bf16_compiled_saves_memory(mode, fp8):
    """On CUDA (bf16 autocast, inductor, the Triton loss, optionally FP8 linears): recompute
    matches no recompute within bf16 noise, and the step's peak memory does not grow."""
    import torch._dynamo
    from nanochat.fp8 import Fp8Options, check_fp8_hardware, convert_to_fp8
    if fp8 and (problem := check_fp8_hardware("cuda")):
        pytest.skip(problem)
    cfg = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=6, n_head=4, n_kv_head=4, n_embd=256)
    x = torch.randint(0, 4096, (8, 512), device="cuda")
    out = {}
    for m_mode in ("none", mode):
        torch.manual_seed(0)
        m = GPT(cfg, ModelRuntime(compute_dtype=torch.bfloat16, activation_checkpointing=m_mode,
                                  lm_ce_kernel="triton")).cuda()
        m.init_weights()
        if fp8:
            convert_to_fp8(m, Fp8Options(enabled=True))
        torch._dynamo.reset()
        m.compile_regions(dynamic=False)
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(x, x)
            loss.backward()
        out[m_mode] = (loss.item(), torch.cuda.max_memory_allocated(), m.lm_head.weight.grad.float().norm().item())
        del m, loss
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    assert abs(out[mode][0] - out["none"][0]) < 1e-2
    assert abs(out[mode][2] - out["none"][2]) / out["none"][2] < 2e-2
    assert out[mode][1] <= out["none"][1] * 1.02


# ---------------------------------------------------------------------------------------------
# the estimate


def test_activation_constants_match_what_the_model_keeps():
    """RECOMPUTE_ACT_ELEMS' per-layer values are what autograd (and the checkpoint) really keep at
    the end of the forward, eager fp32, within 10 %: the difference between 4 and 2 layers."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    B, T, d = 2, 64, 128

    def after_forward(mode, n_layer):
        cfg = GPTConfig(sequence_len=T, vocab_size=512, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=d)
        torch.manual_seed(0)
        m = GPT(cfg, ModelRuntime(activation_checkpointing=mode))
        m.init_weights()
        idx = torch.randint(0, 512, (B, T))
        mt = mem_tracker.MemTracker()
        mt.track_external(m)
        with mt:
            loss = m(idx, idx)
            current = mt.get_tracker_snapshot("current")[torch.device("cpu")]
            loss.backward()
        return current[mem_tracker._MemRefType.ACT]
    for mode, (kept, _, _) in RECOMPUTE_ACT_ELEMS.items():
        per_layer = (after_forward(mode, 4) - after_forward(mode, 2)) / (2 * 4 * B * T * d)
        assert abs(per_layer - kept) <= 0.1 * kept, (mode, per_layer, kept)


def d12(**kw):
    return GPTConfig(**{**dict(sequence_len=1024, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768), **kw})


def test_estimate_grows_with_batch_sequence_depth_and_shrinks_with_recompute():
    peak = {m: estimate_memory(d12(), 32, recompute=m)["peak"] for m in RECOMPUTE_MODES}
    assert peak["blocks"] < peak["selective"] < peak["none"]
    for mode in RECOMPUTE_MODES:
        base = estimate_memory(d12(), 16, recompute=mode)
        assert estimate_memory(d12(), 32, recompute=mode)["activations"] == 2 * base["activations"]
        assert estimate_memory(d12(sequence_len=2048), 16, recompute=mode)["peak"] > base["peak"]
        deeper = estimate_memory(d12(n_layer=16), 16, recompute=mode)
        assert deeper["peak"] > base["peak"] and deeper["activations"] > base["activations"]
    # recompute changes the activations, what the blocks' backward holds and, compiled, the bf16
    # copies of the block matrices (cast again in the recomputing backward); eager keeps them
    for compiled, changed in ((True, {"activations", "backward_extra", "weight_copies", "peak"}),
                              (False, {"activations", "backward_extra", "peak"})):
        none = estimate_memory(d12(), 32, compiled=compiled)
        blocks = estimate_memory(d12(), 32, compiled=compiled, recompute="blocks")
        assert {k for k in none if none[k] != blocks[k]} == changed
    # blocks: each layer keeps its input and one block is recomputed at a time, so depth costs ~1/19 as much
    extra = lambda mode: (estimate_memory(d12(n_layer=16), 32, recompute=mode)["activations"]
                          - estimate_memory(d12(), 32, recompute=mode)["activations"])
    assert extra("blocks") * 19 == extra("none")
    assert estimate_memory(d12(), 32)["peak"] / GiB == pytest.approx(14.8, abs=0.2)  # unchanged at the d12 anchor


def test_estimate_counts_block_gradients_at_the_head_only_when_accumulating():
    """One micro-step per optimizer step: at the head's peak no block gradient exists yet; with
    more, the earlier micro-steps' gradients are live through the forward. Unknown (0) assumes more."""
    one = estimate_memory(d12(), 32, sequences_per_rank=32)
    two = estimate_memory(d12(), 16, sequences_per_rank=32)
    unknown = estimate_memory(d12(), 32)
    counts = GPT(d12()).num_scaling_params()
    assert one["grads"] == 4 * counts["lm_head"] and two["grads"] == unknown["grads"] == 4 * counts["total"]
    assert one["peak"] < unknown["peak"]
    # the blocks' backward: accumulating, every gradient on top of every kept activation; with one
    # micro-step the block gradients appear as the activations are freed: the larger end counts
    assert unknown["backward_extra"] == two["backward_extra"] == 0  # every gradient is counted at the head already
    assert one["backward_extra"] == 0  # without recompute the kept activations outweigh the gradients
    blocks = estimate_memory(d12(), 4, sequences_per_rank=4, recompute="blocks")  # a small batch: the gradients win
    per_elem = 2 * 4 * 1024 * 768  # bf16 values of one model-dim activation of the batch
    kept = per_elem * RECOMPUTE_ACT_ELEMS["blocks"][1] * 12  # compiled, 12 layers
    block_grads = unknown["grads"] - one["grads"]
    assert block_grads > kept
    assert blocks["backward_extra"] == kept // 12 + block_grads - kept + per_elem * RECOMPUTE_ACT_ELEMS["blocks"][2]


# Peak allocated GiB measured on an H100 with the allocator capped at 24 GiB, total batch 32,768,
# regional compile, bf16, Triton loss (records/2026-12-06_memory_24gib, ..._24gib_grid):
# (seq, depth, batch, mode). The first block was measured before the estimate's revision, the rest after.
MEASURED_24GIB = {
    (2048, 20, 4, "none"): 14.71, (2048, 20, 8, "none"): 22.83, (2048, 20, 8, "selective"): 15.82,
    (2048, 20, 8, "blocks"): 8.77, (2048, 20, 16, "blocks"): 9.90, (2048, 12, 16, "none"): 15.83,
    (2048, 12, 16, "selective"): 11.15, (2048, 12, 16, "blocks"): 6.08, (2048, 26, 2, "none"): 19.77,
    (2048, 26, 4, "selective"): 19.18, (2048, 26, 8, "blocks"): 14.99, (2048, 26, 16, "blocks"): 14.89,
    (2048, 28, 1, "none"): 19.88, (2048, 28, 2, "selective"): 18.43, (2048, 28, 8, "blocks"): 17.80,
    (2048, 12, 8, "none"): 9.17,
    # seq 2048 grid, d24, seq 1024 and 4096
    (2048, 28, 16, "blocks"): 17.29, (2048, 30, 2, "selective"): 21.96, (2048, 30, 8, "blocks"): 20.91,
    (2048, 12, 1, "none"): 2.93, (2048, 12, 4, "selective"): 4.30, (2048, 12, 1, "blocks"): 2.15,
    (2048, 20, 1, "none"): 8.64, (2048, 20, 2, "selective"): 8.32, (2048, 20, 2, "blocks"): 6.98,
    (2048, 26, 1, "none"): 16.39, (2048, 26, 1, "blocks"): 14.05, (2048, 28, 2, "blocks"): 17.29,
    (2048, 24, 1, "none"): 13.36, (2048, 24, 4, "none"): 21.78, (2048, 24, 4, "selective"): 16.00,
    (2048, 24, 8, "selective"): 22.73, (2048, 24, 16, "blocks"): 12.99,
    (1024, 12, 32, "none"): 15.82, (1024, 12, 32, "selective"): 11.14, (1024, 12, 32, "blocks"): 6.07,
    (1024, 20, 16, "none"): 22.79, (1024, 20, 32, "blocks"): 9.89,
    (4096, 12, 8, "none"): 15.86, (4096, 12, 8, "selective"): 11.17, (4096, 12, 8, "blocks"): 6.10,
    (4096, 20, 2, "none"): 14.69, (4096, 20, 4, "none"): 22.82, (4096, 20, 4, "selective"): 15.81,
    (4096, 20, 8, "blocks"): 9.92,
}


def test_estimate_is_within_6_percent_of_the_measured_peaks():
    """The goal is 10 %; the estimate is 0.95-1.035x every measured peak, so a change that moves
    it past 6 % either way is caught here."""
    for (seq, depth, batch, mode), peak in MEASURED_24GIB.items():
        cfg = GPTConfig(sequence_len=seq, vocab_size=32768, n_layer=depth, n_head=depth // 2, n_kv_head=depth // 2,
                        n_embd=depth * 64)  # --depth=depth: aspect ratio 64, head dim 128
        est = estimate_memory(cfg, batch, lm_ce_kernel="triton", recompute=mode,
                              sequences_per_rank=32768 // seq)["peak"] / GiB
        assert 0.94 <= est / peak <= 1.06, (seq, depth, batch, mode, est, peak)


# ---------------------------------------------------------------------------------------------
# --device-batch-size=auto and the fit check, with fake free memory


def args_for(*flags):
    return parse_args(["--depth=12", "--max-seq-len=1024", *flags])


OPTS = dict(compute_bytes=2, compiled=True, lm_ce_backend="baseline", lm_ce_chunk_size=8192, lm_ce_kernel="inductor",
            sequences_per_rank=0)


def opts(mode="none"):
    return {**OPTS, "recompute": mode}


def test_flags_parse_auto_and_the_recompute_mode():
    a = args_for("--device-batch-size=auto", "--activation-checkpointing=selective")
    assert a.device_batch_size == "auto" and a.activation_checkpointing == "selective"
    assert args_for().device_batch_size == 32 and args_for().activation_checkpointing == "none"
    assert memory_options(a, "cuda", "triton") == {**opts("selective"), "lm_ce_kernel": "triton"}
    assert memory_options(a, "cpu", "inductor")["compute_bytes"] == 4
    for bad in ("--device-batch-size=many", "--device-batch-size=0", "--activation-checkpointing=all"):
        with pytest.raises(SystemExit):
            args_for(bad)
    # the batch arithmetic waits for the chosen batch
    assert run_problems(args_for("--device-batch-size=auto", "--total-batch-size=1000"), 1) == []


def test_batch_candidates_keep_the_total_batch():
    cfg = d12()
    assert batch_candidates(args_for("--total-batch-size=65536"), cfg, 1) == [64, 32, 16, 8, 4, 2, 1]
    assert batch_candidates(args_for("--total-batch-size=49152"), cfg, 1) == [16, 8, 4, 2, 1]  # 48 per rank
    assert batch_candidates(args_for("--total-batch-size=65536"), cfg, 2) == [32, 16, 8, 4, 2, 1]
    assert batch_candidates(args_for("--total-batch-size=65536"), cfg, 1, limit=31) == [16, 8, 4, 2, 1]
    assert batch_candidates(args_for("--total-batch-size=1000"), cfg, 1) == []
    auto_total = batch_candidates(args_for(), cfg, 1)  # the scaling rule's batch: 2^19 tokens at d12
    assert auto_total[0] == 2 ** 19 // 1024


def test_auto_batch_picks_the_largest_power_of_two_that_fits():
    cfg, a = d12(), args_for("--device-batch-size=auto", "--total-batch-size=65536")
    need = {b: estimate_memory(cfg, b, **opts())["peak"] * (1 + FIT_MARGIN) for b in (8, 16, 32)}
    batch, line = auto_device_batch(a, cfg, 1, int(need[16]) + 1, opts())
    assert batch == 16
    assert "auto -> 16" in line and "32 would need" in line and "gradient accumulation" in line
    assert auto_device_batch(a, cfg, 1, int(need[16]) - 1, opts())[0] == 8
    assert auto_device_batch(a, cfg, 1, 1000 * GiB, opts())[0] == 64  # capped at the batch per rank
    # recompute lets a larger batch fit the same memory
    assert auto_device_batch(a, cfg, 1, int(need[16]) + 1, opts("blocks"))[0] > 16
    batch, problem = auto_device_batch(a, cfg, 1, 1 * GiB, opts())
    assert batch is None and "even batch 1" in problem and "--activation-checkpointing=blocks" in problem


def test_auto_batch_names_selective_recompute_when_the_batch_without_it_is_small():
    """auto picks the batch, not the mode; when the batch without recompute is as small as where
    selective recompute's larger batch measured faster, the log line says so."""
    cfg = d12(sequence_len=2048)
    a = args_for("--device-batch-size=auto", "--total-batch-size=32768", "--max-seq-len=2048")
    need = {b: estimate_memory(cfg, b, **opts())["peak"] * (1 + FIT_MARGIN) for b in (4, 8)}
    sel8 = estimate_memory(cfg, 8, **opts("selective"))["peak"] * (1 + FIT_MARGIN)
    assert sel8 < need[8]
    batch, line = auto_device_batch(a, cfg, 1, int(max(need[4], sel8)) + 1, opts())
    assert batch == 4 and "--activation-checkpointing=selective would fit batch 8" in line
    batch, line = auto_device_batch(a, cfg, 1, int(need[8]) + 1, opts())  # 8 x 2048 > 8,192 tokens
    assert batch == 8 and "selective" not in line
    assert "selective" not in auto_device_batch(a, cfg, 1, int(need[4]) + 1, opts("selective"))[1]


def test_auto_recompute_picks_the_mode_with_the_batch():
    """--activation-checkpointing=auto, resolved before the batch: none where its batch is large,
    selective where it fits a larger batch than a small one without recompute, blocks only when
    nothing else fits; with a fixed batch, the cheapest mode that fits it; off CUDA none."""
    cfg = d12(sequence_len=2048)
    a = lambda *f: args_for("--total-batch-size=32768", "--max-seq-len=2048", "--activation-checkpointing=auto", *f)
    peak = lambda b, m: estimate_memory(cfg, b, **opts(m))["peak"] * (1 + FIT_MARGIN)
    resolve = lambda args, free: (memory_check(args, cfg, 1, free, opts("auto"))[0][0], args.activation_checkpointing,
                                  args.device_batch_size)
    line, mode, batch = resolve(a("--device-batch-size=auto"), int(peak(16, "none")) + 1)
    assert (mode, batch) == ("none", 16) and "auto -> none" in line and "whole batch per rank" in line
    free = int(max(peak(4, "none"), peak(8, "selective"))) + 1  # none: 4 x 2048 tokens; selective: 8
    assert peak(8, "none") > free
    line, mode, batch = resolve(a("--device-batch-size=auto"), free)
    assert (mode, batch) == ("selective", 8) and "measured faster" in line and "none 4, selective 8" in line
    free = int(peak(1, "blocks")) + 1
    if peak(1, "selective") > free:  # only blocks fits
        assert resolve(a("--device-batch-size=auto"), free)[1] == "blocks"
    line, mode, _ = resolve(a("--device-batch-size=8"), int(peak(8, "selective")) + 1)
    assert mode == ("none" if peak(8, "none") <= peak(8, "selective") + 1 else "selective")
    assert resolve(a("--device-batch-size=8"), int(peak(8, "blocks")) + 1)[1] == "blocks"
    args = a("--device-batch-size=auto")
    lines, _ = memory_check(args, cfg, 1, None, opts("auto"))
    assert args.activation_checkpointing == "none" and "off CUDA" in lines[0]


def test_auto_batch_off_cuda_is_the_batch_per_rank_at_most_32():
    cfg = d12()
    batch, line = auto_device_batch(args_for("--device-batch-size=auto", "--total-batch-size=8192"), cfg, 1, None, opts())
    assert batch == 8 and "off CUDA" in line and "at most 32" in line
    assert auto_device_batch(args_for("--device-batch-size=auto", "--total-batch-size=131072"), cfg, 1, None,
                             opts())[0] == CPU_AUTO_BATCH
    assert auto_device_batch(args_for("--device-batch-size=auto", "--total-batch-size=24576"), cfg, 1, None,
                             opts())[0] == 24  # 24 per rank: kept whole


def test_fit_report_fits_or_suggests_the_largest_batch_and_recompute():
    cfg = d12()
    need = {b: estimate_memory(cfg, b, **opts())["peak"] * (1 + FIT_MARGIN) for b in (8, 16, 32)}
    blocks32 = estimate_memory(cfg, 32, **opts("blocks"))["peak"] * (1 + FIT_MARGIN)
    assert blocks32 < need[16]  # at d12, blocks recompute fits batch 32 where batch 16 barely does
    a = args_for("--device-batch-size=32", "--total-batch-size=65536")
    line, problem, suggestion = fit_report(a, cfg, 1, int(need[32]) + 1, opts())
    assert problem is None and suggestion is None and f"fits with a {FIT_MARGIN:.0%} margin" in line and "free on the device" in line
    line, problem, suggestion = fit_report(a, cfg, 1, int(need[16]) + 1, opts())
    assert suggestion == 16 and "--device-batch-size=16, the largest that fits" in problem
    assert "--activation-checkpointing=blocks would fit batch 32" in problem
    _, problem, suggestion = fit_report(a, cfg, 1, int(blocks32) - 1, opts())
    assert "--activation-checkpointing=blocks would not fit batch 32" in problem
    _, problem, suggestion = fit_report(a, cfg, 1, 1 * GiB, opts("blocks"))
    assert suggestion is None and "no smaller --device-batch-size fits" in problem and "chunked" in problem
    assert "--activation-checkpointing=blocks" not in problem  # already on
    assert "\n" not in problem  # one line


def test_memory_check_resolves_auto_then_checks_the_fit():
    cfg = d12()
    need16 = estimate_memory(cfg, 16, **opts())["peak"] * (1 + FIT_MARGIN)
    a = args_for("--device-batch-size=auto", "--total-batch-size=65536", "--eval-tokens=65536")
    lines, problems = memory_check(a, cfg, 1, int(need16) + 1, opts())
    assert problems == [] and a.device_batch_size == 16
    assert lines[0].startswith("device batch: auto -> 16") and lines[1].startswith("memory: estimated peak")
    # CPU: no free memory, no fit line
    a = args_for("--device-batch-size=auto", "--total-batch-size=65536", "--eval-tokens=65536")
    lines, problems = memory_check(a, cfg, 1, None, opts())
    assert problems == [] and a.device_batch_size == 32 and len(lines) == 1
    # the chosen batch still has to leave one evaluation batch
    a = args_for("--device-batch-size=auto", "--total-batch-size=65536", "--eval-tokens=1024")
    _, problems = memory_check(a, cfg, 1, None, opts())
    assert len(problems) == 1 and "--eval-tokens=1024" in problems[0]
    # a fixed batch that does not fit is the one problem
    a = args_for("--device-batch-size=32", "--total-batch-size=65536")
    lines, problems = memory_check(a, cfg, 1, int(need16) + 1, opts())
    assert len(problems) == 1 and "does not fit" in problems[0] and a.device_batch_size == 32


def test_dry_run_with_auto_batch(tiny_tokenizer, tmp_path_factory, monkeypatch):
    base = base_with_tokenizer(tmp_path_factory, "dry_auto", tiny_tokenizer)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    common = ["--depth=2", "--max-seq-len=64", "--total-batch-size=2048", "--num-iterations=5", "--eval-every=-1",
              "--device-batch-size=auto"]
    args = build_parser().parse_args(common + ["--device-type=cpu", "--activation-checkpointing=blocks"])
    report, problems = dry_run_report(args, {}, "cpu", 1)
    assert problems == [] and "device batch: auto -> 32" in report and "recompute blocks" in report
    assert "batch: 2,048 tokens per step = 32 x 64 x 1 ranks x 1 accum steps" in report
    assert re.search(r'--device-batch-size +"auto"', report) and args.device_batch_size == "auto"  # as asked
    report, problems = dry_run_report(build_parser().parse_args(common + ["--device-type=cuda"]), {}, "cuda", 1)
    assert problems == [] and "chosen at start from the device's free memory" in report and "32 -> " in report
    report, problems = dry_run_report(build_parser().parse_args(common + ["--activation-checkpointing=auto"]), {}, "cuda", 1)
    assert problems == [] and "activation checkpointing: auto, chosen at start" in report
    report, problems = dry_run_report(build_parser().parse_args(common + ["--activation-checkpointing=auto"]), {}, "cpu", 1)
    assert problems == [] and "activation checkpointing: auto -> none (no device memory" in report


# ---------------------------------------------------------------------------------------------
# through base_train on CPU


def _step_losses(path):
    with open(path, encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, filter(str.strip, f)) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def mem_base(tiny_tokenizer, tmp_path_factory):
    return base_with_tokenizer(tmp_path_factory, "memory", tiny_tokenizer)


def test_base_train_recompute_gives_the_same_losses(mem_base, tmp_path):
    losses = {}
    for mode in ("none", "blocks"):  # selective: the unit tests above
        metrics = tmp_path / f"{mode}.jsonl"
        out = run(["-m", "scripts.base_train", *TINY, "--num-iterations=4", "--eval-every=-1",
                   f"--activation-checkpointing={mode}", f"--model-tag=ac_{mode}", f"--metrics-file={metrics}"], mem_base)
        assert "WARNING" not in out.stdout
        losses[mode] = _step_losses(metrics)
    assert len(losses["none"]) == 4
    assert losses["blocks"] == losses["none"]


def test_base_train_auto_batch_on_cpu(mem_base, tmp_path):
    args = [a for a in TINY if not a.startswith("--device-batch-size")]
    out = run(["-m", "scripts.base_train", *args, "--device-batch-size=auto", "--activation-checkpointing=auto",
               "--num-iterations=2", "--eval-every=-1", "--model-tag=auto"], mem_base)
    assert "activation checkpointing: auto -> none (no device memory to fit against off CUDA)" in out.stdout
    assert "device batch: auto -> 8 (no device memory to fit against off CUDA" in out.stdout
    assert "batch: 8 x 64 x 1 ranks x 1 accum steps" in out.stdout
    assert os.path.isdir(os.path.join(mem_base, "base_checkpoints", "auto"))



def test_bench_memory_imports_and_needs_cuda():
    """scripts/bench_memory.py measures on CUDA only; on CPU it is imported and its refusal checked."""
    from scripts import bench_memory
    args = bench_memory.parse(["--depths=2", "--seq-lens=64", "--batches=2,4", "--modes=none,blocks"])
    assert bench_memory.ints(args.batches) == [2, 4] and bench_memory.model_config(args, 2, 64).n_layer == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench_memory.main([])
        assert e.value.code == 2


def test_bench_memory_plans_variants_accumulation_and_the_auto_pick():
    """The measured side of memory.md: explicit variants in order, micro-steps per optimizer step
    as base_train derives them, and the batch --device-batch-size=auto would pick (marked in the table)."""
    from scripts import bench_memory
    from nanochat.plan import estimate_memory
    args = bench_memory.parse(["--variants=20:none:4,12:blocks:16", "--seq-lens=2048"])
    assert bench_memory.variants(args) == [(20, 2048, 4, "none"), (12, 2048, 16, "blocks")]
    grid = bench_memory.parse(["--depths=2,3", "--seq-lens=64", "--batches=2", "--modes=none,blocks"])
    assert bench_memory.variants(grid) == [(2, 64, 2, "none"), (2, 64, 2, "blocks"), (3, 64, 2, "none"), (3, 64, 2, "blocks")]
    assert bench_memory.accumulation(args, 2048, 4) == 4 and bench_memory.accumulation(args, 2048, 16) == 1
    with pytest.raises(SystemExit, match="not a multiple"):
        bench_memory.accumulation(args, 2048, 32)
    with pytest.raises(SystemExit, match="not one of"):
        bench_memory.variants(bench_memory.parse(["--variants=20:full:4"]))
    cfg = bench_memory.model_config(args, 20, 2048)
    est = {b: estimate_memory(cfg, b, compiled=True, lm_ce_kernel="triton", recompute="none")["peak"] for b in (4, 8)}
    cap = int(est[8] * (1 + FIT_MARGIN) + 1)  # batch 8 fits with the margin, 16 does not
    assert bench_memory.auto_batch(args, cfg, 2048, "none", cap) == 8
    assert bench_memory.auto_batch(args, cfg, 2048, "none", int(est[4] * 1.06)) == 4
    assert bench_memory.auto_batch(args, cfg, 2048, "none", 1) is None


def test_bench_memory_auto_table_rates_the_full_auto_pick_against_the_fastest_row(capsys):
    """The second table: the (mode, batch) of --activation-checkpointing=auto --device-batch-size=auto
    at the given free memory, its measured tok/s over the fastest measured row; OOM rows are not rows."""
    from scripts import bench_memory
    args = bench_memory.parse(["--variants=20:none:4", "--seq-lens=2048"])
    cfg = bench_memory.model_config(args, 20, 2048)
    free = 23 * 2 ** 30
    mode, batch = bench_memory.auto_pick(args, cfg, 2048, free)
    assert (mode, batch) == ("selective", 8)  # d20 on a 24 GB card: none fits only batch 4 (8,192 tokens)
    row = lambda b, m, step, oom=False: (20, 2048, b, m, 0.0, True, False, {"oom": True} if oom else {"oom": False, "tokens": 32768, "step": step})
    rows = [row(4, "none", 0.25), row(8, "selective", 0.26), row(8, "none", 0.0, oom=True), row(16, "blocks", 0.3)]
    bench_memory.auto_table(args, rows, free)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("| 20 | 2048 | selective 8 | 126,031 | none 4 | 131,072 |") and line.endswith("| 0.962 |")
    bench_memory.auto_table(args, rows[:1], free)  # the pick was not measured
    assert "| selective 8 | not measured |" in capsys.readouterr().out


def test_runner_maps_the_recompute_mode_and_an_auto_batch(tmp_path):
    runner = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "speedrun_small.sh")
    env = {**os.environ, "DRY_RUN": "1", "SKIP_SETUP": "1", "NANOCHAT_BASE_DIR": str(tmp_path)}
    out = subprocess.run(["bash", runner], env={**env, "ACTIVATION_CHECKPOINTING": "selective", "DEVICE_BATCH_SIZE": "auto"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    assert "--activation-checkpointing=selective" in cmd and "--device-batch-size=auto" in cmd
    out = subprocess.run(["bash", runner], env={**env, "ACTIVATION_CHECKPOINTING": "all"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "ACTIVATION_CHECKPOINTING" in out.stderr
