"""Multi-process training on CPU: torchrun with gloo, 2 ranks, against one process.

Data contract (nanochat/dataloader.py, build_train_loader): the train split is read as
world_size x grad_accum_steps streams and every step takes one batch of each, so 2 ranks x 1
micro-step train on exactly the rows of 1 rank x 2 micro-steps; only the float summation order
differs. The metrics file (rank 0) records the raw, rank-averaged loss of every step.
"""
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.dataloader import build_train_loader, train_resume_state
from nanochat.dataset import SAMPLE_DIR, iter_texts
from nanochat.tokenizer import train_tokenizer

from tests.helpers import ROOT, TINY as TINY_BASE, base_with_tokenizer, read_metrics

# 2 micro-batches of 4 x 64 per step: 1 rank x 2 accumulation steps, or 2 ranks x 1.
TINY = [*TINY_BASE, "--eval-every=-1"]
FEATURES = ["--fp8", "--fp8-min-dim=16", "--lm-ce-backend=chunked", "--lm-ce-chunk-size=96"]
DYN = ["--depth=4", "--block-update-schedule=dynamic_suffix", "--dyn-warmup-steps=2", "--dyn-probe-every=3",
       "--dyn-refresh-every=-1", "--dyn-relevance-threshold=0.5"]
REL = 1e-5


def run(args, base, nproc=1, script=None, check=True):
    """base_train in one process, or under torchrun (gloo) with `nproc` ranks."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    target = [script] if script else ["-m", "scripts.base_train"]
    if nproc > 1:
        target.append("--")  # torchrun's options end here (it would take --run=... for its --run-path)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launch, *target, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def steps(path):
    """{step: metrics record} of a --metrics-file; a step recorded twice (by two ranks) fails."""
    recs = read_metrics(path, "step")
    assert len({r["step"] for r in recs}) == len(recs), [r["step"] for r in recs]
    return {r["step"]: r for r in recs}


def assert_close(a: dict, b: dict, rel=REL):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k]["loss"] == pytest.approx(b[k]["loss"], rel=rel), (k, a[k]["loss"], b[k]["loss"])


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    """A base dir with the shared tiny tokenizer (training reads the embedded sample)."""
    return base_with_tokenizer(tmp_path_factory, "ddp_base", tiny_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_texts("train", SAMPLE_DIR, max_chars=200_000), 384)


# --------------------------------------------------------------------------- data streams (in-process)
def test_train_loader_rows_per_step_do_not_depend_on_world_size(tok):
    """Micro-step k of rank r reads stream k*W + r: 2 ranks x 1 == 1 rank x 2 == 2 ranks x 2 / 1 x 4 regrouped."""
    take = lambda it, n: list(itertools.islice(it, n))  # noqa: E731
    one = take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, grad_accum_steps=2), 6)
    ranks = [take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, rank=r, world_size=2), 3) for r in (0, 1)]
    for i, (x, y, _) in enumerate(one):  # global micro-batch i is rank i % 2's batch i // 2
        xr, yr, _ = ranks[i % 2][i // 2]
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert not torch.equal(one[0][0], one[1][0])  # the two streams hold different rows
    four = take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, grad_accum_steps=4), 8)
    two_by_two = [take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, rank=r, world_size=2, grad_accum_steps=2), 4)
                  for r in (0, 1)]
    for s in range(2):  # per step, the same set of micro-batches
        a = sorted(tuple(b[0].flatten().tolist()) for b in four[4 * s:4 * s + 4])
        b = sorted(tuple(b[0].flatten().tolist()) for r in (0, 1) for b in two_by_two[r][2 * s:2 * s + 2])
        assert a == b


def test_train_loader_resume_exact_and_regrouped(tok):
    """States saved by 2 ranks after 2 steps resume exactly on 2 ranks, and on 1 rank x 2 micro-steps."""
    take = lambda it, n: list(itertools.islice(it, n))  # noqa: E731
    per_rank = [take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, rank=r, world_size=2), 5) for r in (0, 1)]
    saved = [json.loads(json.dumps(per_rank[r][1][2])) for r in (0, 1)]  # a checkpoint's list, after step 2
    for r in (0, 1):
        resumed = take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, rank=r, world_size=2,
                                          resume_state=train_resume_state(saved, r, 2, 1)), 3)
        for (x1, _, s1), (x2, _, s2) in zip(per_rank[r][2:], resumed):
            assert torch.equal(x1, x2) and s1 == s2
    single = take(build_train_loader(tok, 2, 64, data_dir=SAMPLE_DIR, grad_accum_steps=2,
                                     resume_state=train_resume_state(saved, 0, 1, 2)), 6)
    for i, (x, _, _) in enumerate(single):
        assert torch.equal(x, per_rank[i % 2][2 + i // 2][0])
    # older checkpoints hold bare build_loader states (rank r of W): they are stream r of W
    bare = [s["streams"][0] for s in saved]
    assert [train_resume_state(bare, r, 2, 1) for r in (0, 1)] == [train_resume_state(saved, r, 2, 1) for r in (0, 1)]
    assert train_resume_state([None, None], 0, 2, 1) is None  # nothing consumed yet: start fresh
    with pytest.raises(ValueError, match="2 streams.*this run reads 4"):
        train_resume_state(saved, 0, 2, 2)


# --------------------------------------------------------------------------- torchrun end to end
@pytest.mark.parametrize("extra", [[], FEATURES], ids=["baseline", "fp8+chunked_ce"])
def test_two_ranks_match_one_process_with_accumulation(base, tmp_path, extra):
    """Same total batch: 2 ranks x 1 micro-step vs 1 process x 2 -- the same losses (step 1 is after
    one all-reduced optimizer update), accumulation derived from the world size, rank-0 logging."""
    args = [*TINY, *extra, "--num-iterations=3", "--model-tag=match", "--run=dummy"]
    one = run([*args, f"--metrics-file={tmp_path / 'one.jsonl'}"], base)
    two = run([*args, f"--metrics-file={tmp_path / 'two.jsonl'}"], base, nproc=2)
    assert "4 x 64 x 1 ranks x 2 accum steps" in one.stdout
    assert "4 x 64 x 2 ranks x 1 accum steps" in two.stdout
    assert two.stdout.count("step 00000/3 |") == 1 and two.stdout.count("saved checkpoint") == 1  # rank 0 only
    a, b = steps(tmp_path / "one.jsonl"), steps(tmp_path / "two.jsonl")
    assert sorted(a) == [0, 1, 2]
    assert_close(a, b)


def test_dynamic_suffix_ranks_agree(base, tmp_path):
    """Every rank trains the same suffix each step (base_train checks it every step under torchrun and
    stops on disagreement), and it is the suffix one process with accumulation chooses."""
    args = [*TINY, *DYN, "--num-iterations=8", "--model-tag=dyn"]
    run([*args, f"--metrics-file={tmp_path / 'two.jsonl'}"], base, nproc=2)
    run([*args, f"--metrics-file={tmp_path / 'one.jsonl'}"], base)
    a, b = steps(tmp_path / "one.jsonl"), steps(tmp_path / "two.jsonl")
    active = [b[s]["active_layers"] for s in sorted(b)]
    assert min(active) < 4 and active[:2] == [4, 4], active  # warmup, then suffix steps
    assert active == [a[s]["active_layers"] for s in sorted(a)]
    assert_close(a, b)
    # The check works: make rank 1 train one block fewer at step 1 -> both ranks stop before the update.
    skew = tmp_path / "skew.py"
    skew.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from nanochat.dynamic_suffix import DynamicSuffixController as C\n"
        "from scripts import base_train\n"
        "orig = C.active_start\n"
        "def skewed(self, step, record=True):\n"
        "    return orig(self, step, record) + (dist.get_rank() == 1 and step == 1)\n"
        "C.active_start = skewed\n"
        "sys.argv = ['base_train', *sys.argv[1:]]\n"
        "base_train.main()\n")
    out = run([*args, "--model-tag=skew", f"--metrics-file={tmp_path / 'skew.jsonl'}"], base, nproc=2,
              script=str(skew), check=False)
    assert out.returncode != 0
    assert "ranks chose different dynamic_suffix plans" in out.stdout + out.stderr
    assert sorted(steps(tmp_path / "skew.jsonl")) == [0]  # step 1 never finished


def test_resume_parity_two_ranks(base, tmp_path):
    """2 ranks, every feature: 2N steps straight vs N + save + resume + N -> identical losses and
    weights, each rank saving and loading its own optimizer shard; 1 process cannot take it over."""
    n = 3
    args = [*TINY, *DYN, *FEATURES, f"--num-iterations={2 * n}", "--model-tag=resume"]
    ckpt_dir = os.path.join(base, "base_checkpoints", "resume")
    run([*args, f"--save-every={n}", f"--metrics-file={tmp_path / 'straight.jsonl'}"], base, nproc=2)
    # The optimizer state is sharded: each rank writes its own part.
    assert {f for f in os.listdir(os.path.join(ckpt_dir, f"step_{n:06d}")) if f.startswith("optim_rank")} == \
        {"optim_rank0.pt", "optim_rank1.pt"}
    final = os.path.join(ckpt_dir, f"step_{2 * n:06d}")
    ref = torch.load(os.path.join(final, "model.pt"), weights_only=True)
    shutil.rmtree(final)
    run([*args, f"--resume-from-step={n}", f"--metrics-file={tmp_path / 'resumed.jsonl'}"], base, nproc=2)
    straight, resumed = steps(tmp_path / "straight.jsonl"), steps(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(n, 2 * n))
    assert {s: straight[s]["loss"] for s in resumed} == {s: r["loss"] for s, r in resumed.items()}
    assert [straight[s]["active_layers"] for s in resumed] == [r["active_layers"] for r in resumed.values()]
    got = torch.load(os.path.join(final, "model.pt"), weights_only=True)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # Sharded state does not fit another world size: refused in one line, before any step.
    refused = tmp_path / "refused.jsonl"
    out = run([*args, f"--resume-from-step={n}", f"--metrics-file={refused}"], base, check=False)
    assert out.returncode == 2 and "saved by 2 ranks, this run has 1" in out.stderr
    assert "Traceback" not in out.stderr and not (refused.exists() and read_metrics(refused, "step"))
