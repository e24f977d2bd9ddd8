"""Matching time per node vs model depth: the structure finders + residual walk on random Llamas.

    .venv/bin/python bench/bench_match.py [--depths 4 8 16 32 64] [--repeats 7]

Prints one row per depth (nodes, median ms, µs/node) and the 64/4 per-node ratio (goal ≤ 1.5: the
matcher is one sweep indexed by root op, so cost is linear in graph size).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import spinfx
from spinfx.testing import zoo
from spinfx.patterns import STRUCTURE
from spinfx.patterns.residual import residual_stream
from spinfx.engine.rule import find


def measure(layers: int, repeats: int) -> tuple[int, float]:
    zm = zoo.random_llama(layers)
    prog = spinfx.trace(zm.model, zm.example_inputs)
    n = sum(1 for _ in prog.graph.nodes)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = find(prog.gm, STRUCTURE)
        residual_stream(prog.graph)
        times.append(time.perf_counter() - t0)
    assert next(s for s in stats.values() if s.name == "qkv").matches == layers
    return n, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'layers':>6} {'nodes':>6} {'median ms':>10} {'µs/node':>8}")
    for d in args.depths:
        n, t = measure(d, args.repeats)
        rows.append((d, n, t))
        print(f"{d:>6} {n:>6} {t * 1e3:>10.2f} {t / n * 1e6:>8.2f}", flush=True)
    first, last = rows[0], rows[-1]
    ratio = (last[2] / last[1]) / (first[2] / first[1])
    print(f"per-node time ratio {last[0]}-layer / {first[0]}-layer: {ratio:.2f}")


if __name__ == "__main__":
    main()
