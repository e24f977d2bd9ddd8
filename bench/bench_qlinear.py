"""qlinear vs dense matmul on CPU: medians of interleaved repeats, ratios within one run.

    .venv/bin/python bench/bench_qlinear.py [--repeats 30] [--threads N] [--m 1,16] [--shapes 4096x4096,...]

Rows: (N×K, M). Columns: fp32 F.linear, bf16 F.linear, and spinfx plans (default CPU fast paths, bf16
compute) called with fp32 activations: int8 sym per-channel (qlinear_int8pack), int4 sym g64 and g128
and int3 sym g64 (qlinear_int4pack). K = 576 is not a multiple of 128, so its "g128" column uses g64
(as the w4a16 recipe does). Timings on a shared machine swing 2–3×: every variant is timed once per
round, round after round, so load hits all alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from spinfx.kernels.qlinear import plan_qlinear
from spinfx.kernels.quant_rtn import quantize_rtn

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (11008, 4096)]
VARIANTS = ["fp32", "bf16", "int8", "int4 g64", "int4 g128", "int3 g64"]


def variants(n: int, k: int, m: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    wb, xb = w.bfloat16(), x.bfloat16()
    g128 = 128 if k % 128 == 0 else 64
    plans = {"int8": plan_qlinear(quantize_rtn(w, 8, None)), "int4 g64": plan_qlinear(quantize_rtn(w, 4, 64)),
             "int4 g128": plan_qlinear(quantize_rtn(w, 4, g128)), "int3 g64": plan_qlinear(quantize_rtn(w, 3, 64))}
    fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
    fns.update({name: (lambda p=p: p(x)) for name, p in plans.items()})
    return fns


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for f in fns.values():  # warm-up
        f(), f()
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--m", default="1,16", help="activation rows M, e.g. 1,16,64")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N×K list, e.g. 4096x4096")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} interleaved repeats (ms)\n")
    print("| N×K | M | " + " | ".join(VARIANTS) + " | fp32 / int4 g128 | fp32 / int8 |")
    print("|---|---|" + "---:|" * (len(VARIANTS) + 2))
    verdict = []
    with torch.inference_mode():
        for n, k in shapes:
            for m in (int(v) for v in args.m.split(",")):
                ms = median_ms(variants(n, k, m), args.repeats)
                speedup = ms["fp32"] / ms["int4 g128"]
                cells = " | ".join(f"{ms[v]:.3f}" for v in VARIANTS)
                print(f"| {n}×{k} | {m} | {cells} | {speedup:.1f}× | {ms['fp32'] / ms['int8']:.1f}× |", flush=True)
                if m == 1 and n * k >= 4096 * 4096:
                    verdict.append((f"{n}×{k}", speedup))
    print()
    for name, speedup in verdict:
        print(f"acceptance (int4 M=1 >= 5x fp32) {name}: {speedup:.1f}x {'PASS' if speedup >= 5 else 'FAIL'}")


if __name__ == "__main__":
    main()
