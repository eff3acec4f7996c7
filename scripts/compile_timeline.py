"""Where the first step's compile time goes: base_train with timeline hooks.

    python -m scripts.compile_timeline <base_train flags>

Run it with empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR to see a cold compile. It trains
exactly as base_train does and adds lines ``[timeline   12.34s] ...`` (seconds since this script
started) for:

- each dynamo compile (start and end): one per compiled region and variant;
- each wait of inductor for the kernels its worker processes build, and every build future
  that was still running when the wait reached it and took over 0.05 s more;
- every launch configuration compiled in this process that took over 0.05 s (all of them with
  ``TORCHINDUCTOR_COMPILE_THREADS=1``, which builds in the main process: inductor compiles several
  configurations of some reductions and times them at the first call);
- the first launch of the Triton loss kernels (their JIT build) and the first optimizer step.

This is how the first step's largest single cost was found (one 8 s launch configuration of the
QK-norm + rotary backward kernel; docs/optimizations/throughput.md section 10). The hooks wrap
private torch functions (checked with torch 2.11 and 2.13): a hook whose target is missing is left
out with a note, and training runs unchanged.
"""
from __future__ import annotations

import sys
import time

T0 = time.time()
THRESHOLD = 0.05  # seconds: shorter builds and waits are not listed


def log(what: str) -> None:
    print(f"[timeline {time.time() - T0:8.2f}s] {what}", flush=True)


def _wrap(owner, name: str, make) -> bool:
    """Replace owner.name by make(original); False (and a note) when torch has no such attribute."""
    orig = getattr(owner, name, None)
    if orig is None:
        log(f"note: {getattr(owner, '__name__', owner)}.{name} not found in this torch; not timed")
        return False
    setattr(owner, name, make(orig))
    return True


def install_hooks() -> None:
    import torch
    from torch._dynamo.callback import callback_handler

    callback_handler.register_start_callback(lambda *_: log("dynamo compile start"))
    callback_handler.register_end_callback(lambda *_: log("dynamo compile end"))

    from concurrent.futures import Future
    from torch._inductor import async_compile
    from torch._inductor.codecache import CodeCacheFuture

    def timed_wait_futures(orig):
        def wait_futures(self, scope):
            n = 0
            for key, fut in list(scope.items()):
                if isinstance(fut, (Future, CodeCacheFuture)):
                    n += 1
                    t = time.time()
                    scope[key] = fut.result()
                    if (dt := time.time() - t) > THRESHOLD:
                        log(f"  build future {key}: {dt:.2f}s still to wait")
            return orig(self, scope)  # nothing left to wait for; keeps inductor's own bookkeeping
        return wait_futures
    _wrap(async_compile.AsyncCompile, "_wait_futures", timed_wait_futures)

    def timed_wait(orig):
        def wait(self, scope):
            t = time.time()
            out = orig(self, scope)
            log(f"inductor waited {time.time() - t:.2f}s for its kernel builds")
            return out
        return wait
    _wrap(async_compile.AsyncCompile, "wait", timed_wait)

    from torch._inductor.runtime import triton_heuristics

    def timed_config(orig):
        def precompile_config(self, cfg, *a, **k):
            t = time.time()
            out = orig(self, cfg, *a, **k)
            if (dt := time.time() - t) > THRESHOLD:
                name = self.inductor_meta.get("kernel_name", "?")
                log(f"  built {name} {dict(cfg.kwargs)} num_warps={cfg.num_warps} in this process: {dt:.2f}s")
            return out
        return precompile_config
    _wrap(triton_heuristics.CachingAutotuner, "_precompile_config", timed_config)

    import nanochat.softcap_ce as softcap_ce
    kernels = softcap_ce._kernels

    class FirstLaunch:
        """A Triton kernel whose first launch (which builds it) is timed."""

        def __init__(self, name, jit):
            self.name, self.jit, self.done = name, jit, False

        def __getitem__(self, grid):
            launch = self.jit[grid]
            if self.done:
                return launch

            def first(*a, **k):
                t = time.time()
                out = launch(*a, **k)
                torch.cuda.synchronize()
                self.done = True
                log(f"{self.name} first launch (Triton JIT build): {time.time() - t:.2f}s")
                return out
            return first

    class Kernels:
        def __init__(self):
            m = kernels()
            self.ce_fwd_kernel = FirstLaunch("softcap CE forward", m.ce_fwd_kernel)
            self.ce_bwd_kernel = FirstLaunch("softcap CE backward", m.ce_bwd_kernel)
    timed = []

    def timed_kernels():
        if not timed:
            timed.append(Kernels())
        return timed[0]
    softcap_ce._kernels = timed_kernels

    import nanochat.optim as optim

    def timed_step(orig):
        first = [True]

        def step(self, *a, **k):
            if not first[0]:
                return orig(self, *a, **k)
            first[0] = False
            log("first optimizer step: start")
            out = orig(self, *a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log("first optimizer step: end (synchronized)")
            return out
        return step
    _wrap(optim.MuonAdamW, "step", timed_step)


def main() -> None:
    install_hooks()
    from scripts import base_train
    sys.argv = ["base_train", *sys.argv[1:]]
    base_train.cli()


if __name__ == "__main__":  # the data loader's worker processes import this module again
    main()
