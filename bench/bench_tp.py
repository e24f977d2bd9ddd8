"""Tensor parallel on CPU with gloo: per-rank forward time and the share spent in communication.

SmolLM2-135M (float32, no recipe), T = 1 vs T = 2 ranks as processes (spinfx.dist.ranks.run_ranks). SmolLM2 has
9 attention heads, which 2 does not divide, so at T = 2 attention is replicated (`attention: replicate`)
and the 30 MLPs are split (1536 → 768 per rank): 30 all_reduces per forward. Each rank times its
rewritten program (median of reps) and the same program with the all_reduces replaced by identity
(compute only), interleaved, best of `reps`; communication share = 1 − compute / total. One thread per
rank (and for T = 1), so a rank's time compares with the single process (this machine has 2 cores). Shapes: one forward of S tokens, no KV cache (S = 128 prefill, S = 1).

    .venv/bin/python bench/bench_tp.py [--reps 10]
"""
from __future__ import annotations

import argparse
import time

import torch


def _time(fn, reps: int) -> float:
    return _times([fn], reps)[0]


def _times(fns, reps: int) -> list[float]:
    """Best-of-`reps` ms of each function, measured interleaved (this machine is shared: the minimum
    is the least disturbed run, and interleaving exposes both to the same load)."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [min(t) * 1e3 for t in ts]


def _no_comm(prog):
    from spinfx.patterns.common import ALL_REDUCE

    p = prog.clone()
    for n in p.graph.nodes:
        if n.target is ALL_REDUCE:
            n.target = _identity
    p.gm.recompile()
    return p


def _identity(x, op, group):
    return x


def bench_rank(rank: int, T: int, seqs: list[int], reps: int) -> dict:
    import torch.distributed as dist

    from spinfx.api import default_inputs, rewrite
    from spinfx.checkpoint.hf import load_model
    from spinfx.passes.shard import Shard
    from spinfx.recipe import Recipe
    from spinfx.patterns.common import ALL_REDUCE

    torch.set_num_threads(1)
    model, _ = load_model("smollm2")
    out = {"threads": torch.get_num_threads()}
    for s in seqs:
        inputs = default_inputs(model, s)[1]
        passes = [Shard(tp=T, rank=rank, attention="replicate", check=False)] if T > 1 else []
        r = rewrite(model, Recipe(f"tp{T}", passes), ((), inputs), certify=False)
        prog = r.program
        xs = prog.flat_inputs(**inputs)
        reduces = [n for n in prog.graph.nodes if n.target is ALL_REDUCE]
        with torch.no_grad():
            local = _no_comm(prog)
            if T > 1:
                dist.barrier()
            total, compute = _times([lambda: prog.gm(*xs), lambda: local.gm(*xs)], reps)
            one = None
            if reduces:
                x = torch.randn(reduces[0].meta["val"].shape)
                dist.barrier()
                one = _time(lambda: dist.all_reduce(x), reps * 3)
        out[s] = {"total_ms": total, "compute_ms": compute, "all_reduces": len(reduces),
                  "all_reduce_ms": one, "bytes_each": int(reduces[0].meta["val"].numel() * 4) if reduces else 0}
    return out


def main() -> None:
    from spinfx.dist import ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seqs", default="128,1")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    # T = 1 before and after the T = 2 run: this machine is shared, so both are shown
    one = bench_rank(0, 1, seqs, args.reps)
    two = ranks.run_ranks(bench_rank, 2, seqs, args.reps, timeout=1800)
    again = bench_rank(0, 1, seqs, args.reps)
    print(f"SmolLM2-135M float32, eager, CPU, {one['threads']} thread per process, gloo; best of {args.reps}")
    print(f"{'S':>4} {'T':>2} {'rank':>4} {'total ms':>9} {'compute ms':>10} {'comm share':>10} {'all_reduces':>11} "
          f"{'1 all_reduce ms':>15}")
    for s in seqs:
        for r in (one[s], again[s]):
            print(f"{s:>4} {1:>2} {0:>4} {r['total_ms']:>9.1f} {r['compute_ms']:>10.1f} {'—':>10} {0:>11} {'—':>15}")
        for rank, res in enumerate(two):
            r = res[s]
            share = 1 - r["compute_ms"] / r["total_ms"]
            print(f"{s:>4} {2:>2} {rank:>4} {r['total_ms']:>9.1f} {r['compute_ms']:>10.1f} {share:>9.0%} "
                  f"{r['all_reduces']:>11} {r['all_reduce_ms']:>15.3f}")


if __name__ == "__main__":
    main()
