"""The tables of docs/optimizations/memory.md from the raw bench_memory outputs of this folder and
records/2026-12-06_memory_24gib, with the estimate of the code that runs this script:

    python records/2026-12-06_memory_24gib_grid/table.py

Runs: A = records/2026-12-06_memory_24gib (commit 58571d1), B = B_* here (183cc8e), C = C_* here
(e4b3d53, the allocator with expandable segments as base_train sets it; A and B ran without).
A row measured in C is shown from C; the allocated peaks agree where both measured it."""
import argparse
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
from nanochat.plan import estimate_memory, model_config_from_args  # noqa: E402
from scripts.bench_memory import auto_pick, parse  # noqa: E402

GiB = 2 ** 30
FREE = 23.48  # GiB: what base_train saw free with the ballast process holding the rest (D_e2e_*.txt)


def rows(path, run, seq=None):
    """(seq, depth, batch, mode) -> measured dict, from a bench_memory markdown table."""
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 13 or not cells[0].isdigit():
            continue
        depth, s, batch, mode = int(cells[0]), int(cells[1]), int(cells[2]), cells[3]
        peak = None if cells[7] == "OOM" else float(cells[7])
        out[(s, depth, batch, mode)] = {"run": run, "peak": peak, "reserved": cells[9], "tok": cells[12]}
    return out


measured = {}
measured.update(rows(os.path.join(here, "..", "2026-12-06_memory_24gib", "bench_memory.txt"), "A"))
measured.update(rows(os.path.join(here, "B_grid_s2048.txt"), "B"))
measured.update(rows(os.path.join(here, "B_oos_tables.md"), "B"))
measured.update(rows(os.path.join(here, "C_edge_s2048.txt"), "C"))


def estimate(seq, depth, batch, mode):
    cfg = model_config_from_args(argparse.Namespace(depth=depth, aspect_ratio=64, head_dim=128, max_seq_len=seq,
                                                    window_pattern="L"), 32768)
    return cfg, estimate_memory(cfg, batch, lm_ce_kernel="triton", recompute=mode,
                                sequences_per_rank=32768 // seq)["peak"] / GiB


order = {"none": 0, "selective": 1, "blocks": 2}
print("| seq | depth | recompute | batch | run | estimate GiB | peak GiB | estimate / peak | reserved GiB | tok/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
ratios = []
for key in sorted(measured, key=lambda k: (k[0] != 2048, k[0], k[1], order[k[3]], k[2])):
    seq, depth, batch, mode = key
    m = measured[key]
    _, est = estimate(*key)
    ratio = "-" if m["peak"] is None else f"{est / m['peak']:.3f}"
    peak = "OOM" if m["peak"] is None else f"{m['peak']:.2f}"
    if m["peak"] is not None:
        ratios.append(est / m["peak"])
    print(f"| {seq} | {depth} | {mode} | {batch} | {m['run']} | {est:.2f} | {peak} | {ratio} | "
          f"{m['reserved']} | {m['tok']} |")
print(f"\nestimate / peak over {len(ratios)} measured peaks: {min(ratios):.3f}-{max(ratios):.3f}")

print(f"\n| seq | depth | auto picks ({FREE} GiB free) | tok/s | fastest measured | tok/s | auto / fastest |")
print("|---|---|---|---|---|---|---|")
for seq, depth in sorted({(k[0], k[1]) for k in measured}, key=lambda k: (k[0] != 2048, k)):
    cfg, _ = estimate(seq, depth, 1, "none")
    mode, batch = auto_pick(parse([f"--seq-lens={seq}"]), cfg, seq, int(FREE * GiB))
    tok = {(k[2], k[3]): float(v["tok"].replace(",", "")) for k, v in measured.items()
           if (k[0], k[1]) == (seq, depth) and v["peak"] is not None}
    (fb, fm), fast = max(tok.items(), key=lambda kv: kv[1])
    got = tok.get((batch, mode))
    print(f"| {seq} | {depth} | {mode} {batch} | {f'{got:,.0f}' if got else 'not measured'} | {fm} {fb} | "
          f"{fast:,.0f} | {f'{got / fast:.3f}' if got else '-'} |")
