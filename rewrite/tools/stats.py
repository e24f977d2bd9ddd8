"""Activation statistics at the inputs of the linears (what quantization sees).

`linear_input_stats(prog, batches)` runs the program on real inputs with an fx.Interpreter and records,
for every linear (by its original module path), the max |x| and the kurtosis E[(x-μ)⁴]/σ⁴ of its input
over all batches. Rotations exist to bring both down (outliers spread over many channels); the report
shows them before and after.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from spinfx.engine.graph import Program
from spinfx.patterns.common import LINEAR_OPS, linear_input_arg


def _input_arg(n: fx.Node) -> int | None:
    """Which argument of n is a linear's input: aten.linear / addmm (Conv1D), or any spinfx.qlinear*
    op (the quantized linears read x first)."""
    if n.op != "call_function":
        return None
    if n.target in LINEAR_OPS:
        return linear_input_arg(n)
    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "spinfx" \
            and n.target.__name__.startswith("qlinear"):
        return 0
    return None


class _Moments:
    """Running power sums in float64, kept as tensors on the activations' device (no sync per batch)."""

    __slots__ = ("n", "sums", "max_abs")

    def __init__(self):
        self.n, self.sums, self.max_abs = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        x2 = x * x
        self.n += x.numel()
        s, m = torch.stack([x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum()]), x.abs().max()
        self.sums = s if self.sums is None else self.sums + s
        self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)

    def kurtosis(self) -> float:
        s1, s2, s3, s4 = (v / self.n for v in self.sums.tolist())
        var = s2 - s1 * s1
        m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1 ** 4
        return m4 / (var * var) if var > 0 else math.nan


class _Recorder(fx.Interpreter):
    def __init__(self, gm, moments):
        super().__init__(gm)
        self.moments = moments

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        arg = _input_arg(n)
        if arg is not None:
            x = self.env[n.args[arg]]
            self.moments.setdefault(n.meta.get("module") or n.name, _Moments()).add(x)
        return out


@torch.no_grad()
def linear_input_stats(prog: Program, batches: list[list]) -> dict[str, dict]:
    """{module: {"max_abs": float, "kurtosis": float}} over `batches` (each a flat list of graph inputs)."""
    moments: dict[str, _Moments] = {}
    rec = _Recorder(prog.gm, moments)
    for b in batches:
        rec.run(*b)
    return {k: {"max_abs": m.max_abs.item(), "kurtosis": m.kurtosis()} for k, m in moments.items()}


def compare_stats(before: dict, after: dict) -> dict:
    """Per module before/after, plus medians over modules present in both."""
    keys = [k for k in before if k in after]
    rows = {k: {"before": before[k], "after": after[k]} for k in keys}

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else math.nan

    summary = {f"{m}_{w}": med([(before if w == "before" else after)[k][m] for k in keys])
               for m in ("max_abs", "kurtosis") for w in ("before", "after")}
    return {"layers": rows, "median": summary}
