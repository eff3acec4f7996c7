"""scripts/profile_gaps.py: the gap analysis on a synthetic Chrome trace (the profiling needs a GPU)."""
import subprocess
import sys

import pytest
import torch

from scripts.profile_gaps import find_gaps


def k(name, ts, dur, cat="kernel"):
    return {"name": name, "ts": ts, "dur": dur, "cat": cat}


def test_find_gaps_busy_time_overlaps_and_host_frames():
    events = [
        k("gemm", 0, 100),
        k("side", 50, 100),  # overlaps gemm (another stream): busy 0-150 counts once
        k("norm", 400, 50),  # 250 us gap after "side"
        k("copy", 470, 10, cat="gpu_memcpy"),  # 20 us gap: below the threshold
        k("loss", 1480, 20),  # 1000 us gap after "copy"
        {"name": "zero_grad", "ts": 500, "dur": 900, "cat": "python_function"},
        {"name": "main", "ts": 0, "dur": 2000, "cat": "python_function"},
        {"name": "aten::mm", "ts": 600, "dur": 10, "cat": "cpu_op"},  # not a Python frame
    ]
    window, busy, gaps = find_gaps(events)
    assert window == 1500
    assert busy == 150 + 50 + 10 + 20
    assert [(g["gap_us"], g["after"], g["before"]) for g in gaps] == [(1000, "copy", "loss"), (250, "side", "norm")]
    assert gaps[0]["host"] == ["zero_grad", "main"]  # innermost (shortest) first
    assert gaps[1]["host"] == ["main"]


def test_no_gpu_events():
    assert find_gaps([{"name": "main", "ts": 0, "dur": 5, "cat": "python_function"}]) == (0.0, 0.0, [])


def test_cpu_only_machine_gets_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "scripts.profile_gaps", "--depth=2"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
