"""qlinear vs dense matmul on CPU: medians of interleaved repeats, ratios within one run.

    .venv/bin/python bench/bench_qlinear.py [--repeats 30] [--threads N] [--m 1,16] [--shapes 4096x4096,...]

Rows: (N×K, M). Columns: fp32 F.linear, bf16 F.linear, and spinfx plans called with fp32 activations:
int8 sym per-channel (qlinear_int8pack, bf16 compute); "aten": int4 sym g128 and int3 sym g64 on
qlinear_int4pack (aten._weight_int4pack_mm_for_cpu, bf16 compute; the plans without the C++ kernel);
"cpp": int4 sym g64 / g128 and int3 sym g64 on spinfx::qlinear_cpu (the C++ kernel, fp32 math, its
widest body: AVX-512 where torch reports it), and "cpp256" its AVX2 body forced on the same CPU (a
column only where the widest is AVX-512). K = 576 is not a multiple of 128, so its "g128" columns use g64
(as the w4a16 recipe does). Timings on a shared machine swing 2–3×: every variant is timed once per
round, round after round, so load hits all alike. For an AVX2-only machine's aten kernels on an AVX-512
one: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (then "cpp" is the AVX2 body).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from spinfx.kernels import qlinear_cpu
from spinfx.kernels.qlinear import QLinearPlan, plan_qlinear
from spinfx.kernels.quant_rtn import quantize_rtn

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (11008, 4096)]
VARIANTS = ["fp32", "bf16", "int8", "aten int4 g128", "aten int3 g64", "cpp int4 g64", "cpp int4 g128", "cpp int3 g64",
            "cpp256 int4 g128"]


def with_vector_bits(plan: QLinearPlan, bits: int) -> QLinearPlan:
    return replace(plan, calls=tuple(replace(c, attrs={**c.attrs, "vector_bits": bits}) for c in plan.calls))


def variants(n: int, k: int, m: int, names: list[str]) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen)
    wb, xb = w.bfloat16(), x.bfloat16()
    g128 = 128 if k % 128 == 0 else 64
    q = {"int4 g64": quantize_rtn(w, 4, 64), "int4 g128": quantize_rtn(w, 4, g128), "int3 g64": quantize_rtn(w, 3, 64)}
    with qlinear_cpu.disabled():
        plans = {"int8": plan_qlinear(quantize_rtn(w, 8, None)), "aten int4 g128": plan_qlinear(q["int4 g128"]),
                 "aten int3 g64": plan_qlinear(q["int3 g64"])}
    if qlinear_cpu.available():
        plans.update({f"cpp {name}": plan_qlinear(qw) for name, qw in q.items()})
        if qlinear_cpu.vector_bits() == 512:
            plans["cpp256 int4 g128"] = with_vector_bits(plans["cpp int4 g128"], 256)
    fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
    fns.update({name: (lambda p=p: p(x)) for name, p in plans.items()})
    return {name: fns[name] for name in names if name in fns}


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
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "?")
    names = [v for v in VARIANTS if v != "cpp256 int4 g128" or qlinear_cpu.vector_bits() == 512]
    int4 = "cpp int4 g128" if qlinear_cpu.available() else "aten int4 g128"
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {model}, torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}, median of {args.repeats} interleaved repeats (ms)\n")
    print("| N×K | M | " + " | ".join(names) + f" | fp32 / {int4} | aten / cpp int4 g128 |")
    print("|---|---|" + "---:|" * (len(names) + 2))
    verdict = []
    with torch.inference_mode():
        for n, k in shapes:
            for m in (int(v) for v in args.m.split(",")):
                ms = median_ms(variants(n, k, m, names), args.repeats)
                speedup = ms["fp32"] / ms[int4]
                cells = " | ".join(f"{ms[v]:.3f}" if v in ms else "—" for v in names)
                ratio = f"{ms['aten int4 g128'] / ms[int4]:.1f}×"
                print(f"| {n}×{k} | {m} | {cells} | {speedup:.1f}× | {ratio} |", flush=True)
                if m == 1 and n * k >= 4096 * 4096:
                    verdict.append((f"{n}×{k}", speedup))
    print()
    for name, speedup in verdict:
        print(f"acceptance (int4 M=1 >= 5x fp32) {name}: {speedup:.1f}x {'PASS' if speedup >= 5 else 'FAIL'}")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
