"""spinfx::hadamard vs a dense matmul with the same orthonormal matrix, fp32 on CPU.

    .venv/bin/python bench/bench_hadamard.py [--repeats 7] [--threads N] [--no-compile]

Prints a markdown table: per n and rows M, median ms of the op (eager, CPU body), of the
plain-torch body compiled by Inductor, and of x @ M with the dense n×n M. Methods are timed in
interleaved rounds and each ratio is the median of per-round ratios: timings on a shared machine
swing 2–3× between runs, ratios taken side by side much less.
"""

import argparse
import statistics
import time

import torch

from spinfx.kernels.hadamard import hadamard, hadamard_transform, plan

DIMS = (64, 1536, 11008, 14336)
ROWS = (1, 16)


def batch_size(fn, x) -> int:
    """Calls per timed batch, so that a batch takes ~10 ms."""
    fn(x)
    t = time.perf_counter()
    fn(x)
    return max(1, int(0.01 / max(time.perf_counter() - t, 1e-6)))


def interleaved_ms(fns: dict, x, repeats: int) -> tuple[dict, dict]:
    """Per method, the median ms per call over `repeats` rounds; every round times each method
    once (one batch), so all methods see the same machine load. Also, per method, the median over
    rounds of dense-time / method-time (a ratio taken inside each round)."""
    sizes = {name: batch_size(fn, x) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(sizes[name]):
                fn(x)
            samples[name].append((time.perf_counter() - t) / sizes[name] * 1e3)
    ms = {name: statistics.median(v) for name, v in samples.items()}
    ratio = {name: statistics.median(d / t for d, t in zip(samples["dense"], v)) for name, v in samples.items()}
    return ms, ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip the Inductor column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of {args.repeats} rounds\n")
    print("| n | plan | M | op ms | compiled ms | dense ms | dense / op | dense / compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for n in DIMS:
        p = plan(n)
        dense = p.matrix(torch.float32)
        compiled = None if args.no_compile else torch.compile(hadamard_transform)
        for m in ROWS:
            x = torch.randn(m, n)
            assert torch.allclose(hadamard(x, p), x @ dense, rtol=0, atol=1e-4)
            fns = {"op": lambda x: hadamard(x, p), "dense": lambda x: x @ dense}
            if compiled is not None:
                fns["compiled"] = lambda x: compiled(x, p)
            ms, ratio = interleaved_ms(fns, x, args.repeats)
            comp = f"{ms['compiled']:.3f}" if compiled else "–"
            comp_ratio = f"{ratio['compiled']:.1f}×" if compiled else "–"
            print(f"| {n} | {p.describe()} | {m} | {ms['op']:.3f} | {comp} | {ms['dense']:.3f} "
                  f"| {ratio['op']:.1f}× | {comp_ratio} |", flush=True)
        del dense


if __name__ == "__main__":
    main()
