"""Shared test setup: CPU by default, GPU tests opt in with @pytest.mark.gpu."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An empty NANOCHAT_BASE_DIR for the test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="package")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token BPE trained once per test run on the embedded sample (package scope: every test
    lives in tests/, so that is once for all of them); copy it with tests.helpers.base_with_tokenizer."""
    from tests.helpers import run
    base = tmp_path_factory.mktemp("tokenizer_base")
    run(["-m", "scripts.tok_train", "--vocab-size=512", "--max-chars=2000000"], base)
    return os.path.join(base, "tokenizer")
