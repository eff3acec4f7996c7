"""Where does the GPU wait for the host? Profile a few steps of base_train and list the idle gaps.

    python -m scripts.profile_gaps --depth=12 --max-seq-len=1024 --device-batch-size=32 \
        --total-batch-size=32768 --num-iterations=50 --eval-every=-1 --save-every=-1 --run=dummy

Every argument goes to `scripts/base_train.py` unchanged. The torch profiler (CUDA kernels plus
the Python stack) records the steps selected by --profile-wait/--profile-steps (counted in
optimizer steps), then this prints the GPU's busy time in that window and the largest gaps
between consecutive GPU kernels, each with the kernels around it and the innermost Python frames
the host was running at the gap's midpoint: the code that kept the GPU waiting. The trace is
written to --profile-out (gzipped Chrome trace, open it in Perfetto).

Python stack tracing slows the host down, so gaps come out larger than in an unprofiled run;
use them to find *where* the host is slow, and measure the effect of a fix without the profiler.
--profile-light records the GPU only: the sizes are then close to the truth, the host frames unknown.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import runpy
import sys

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def find_gaps(events: list[dict], min_gap_us: float = 50.0) -> tuple[float, float, list[dict]]:
    """From Chrome-trace events: (window_us, gpu_busy_us, gaps), gaps sorted longest first, each
    {gap_us, at_us, after, before, host}, `host` = the innermost Python frames spanning the gap's
    midpoint. Overlapping GPU events (several streams) count once."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    if not gpu:
        return 0.0, 0.0, []
    frames = [e for e in events if e.get("cat") == "python_function" and "dur" in e]
    busy, gaps = 0.0, []
    start, end, last = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] > end:  # a gap: close the busy interval
            busy += end - start
            if e["ts"] - end >= min_gap_us:
                gaps.append({"gap_us": e["ts"] - end, "at_us": end, "after": last["name"], "before": e["name"]})
            start = e["ts"]
        if e["ts"] + e["dur"] >= end:
            end, last = e["ts"] + e["dur"], e
    busy += end - start
    for g in gaps:
        mid = g["at_us"] + g["gap_us"] / 2
        running = sorted((f for f in frames if f["ts"] <= mid <= f["ts"] + f["dur"]), key=lambda f: f["dur"])
        g["host"] = [f["name"] for f in running[:4]]
    gaps.sort(key=lambda g: -g["gap_us"])
    return end - gpu[0]["ts"], busy, gaps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile-wait", type=int, default=40, help="optimizer steps before recording (compile, warm-up)")
    p.add_argument("--profile-steps", type=int, default=3, help="optimizer steps to record")
    p.add_argument("--profile-top", type=int, default=25, help="gaps to print")
    p.add_argument("--profile-light", action="store_true",
                   help="record GPU activity only, no host ops or Python stacks: gap sizes close to an "
                        "unprofiled run's, but no host frames")
    p.add_argument("--profile-out", type=str, default="profile_gaps.json.gz", help="gzipped Chrome trace")
    args, train_args = p.parse_known_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    if not torch.cuda.is_available():
        sys.exit("profile_gaps: needs a CUDA GPU (it measures GPU idle time)")
    import nanochat.optim as optim
    activities = [ProfilerActivity.CUDA] if args.profile_light else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    prof = profile(activities=activities, with_stack=not args.profile_light,
                   schedule=schedule(wait=args.profile_wait, warmup=2, active=args.profile_steps))
    step = optim.MuonAdamW.step

    def step_and_tick(self, *a, **k):  # one profiler step per optimizer step
        out = step(self, *a, **k)
        prof.step()
        return out

    optim.MuonAdamW.step = step_and_tick
    sys.argv = ["scripts.base_train", *train_args]
    prof.start()
    try:
        runpy.run_module("scripts.base_train", run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    prof.stop()
    raw = args.profile_out.removesuffix(".gz")
    prof.export_chrome_trace(raw)
    with open(raw) as f:
        events = json.load(f)["traceEvents"]
    os.remove(raw)
    with gzip.open(args.profile_out, "wt") as f:
        json.dump({"traceEvents": events}, f)
    window, busy, gaps = find_gaps(events)
    if not window:
        sys.exit("profile_gaps: no GPU events recorded (did the run reach --profile-wait + 2 steps?)")
    print(f"\n{args.profile_steps} steps: window {window / 1000:.1f} ms, GPU busy {busy / 1000:.1f} ms "
          f"({100 * busy / window:.0f} %); {len(gaps)} gaps >= 50 us, {sum(g['gap_us'] for g in gaps) / 1000:.1f} ms")
    for g in gaps[:args.profile_top]:
        print(f"{g['gap_us'] / 1000:7.2f} ms after {g['after'][:60]} | before {g['before'][:60]}\n"
              f"          host: {' < '.join(h[:60] for h in g['host'])}")
    print(f"trace: {args.profile_out}")


if __name__ == "__main__":  # the training data loader spawns a process that imports this module
    main()
