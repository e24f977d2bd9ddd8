"""Dynamic fake quantization over the last dim, written once for two callers.

    symmetric, b bits, m = 2^(b-1) - 1 (a linear's input, per token):
        s = max|x| / m        x̂ = clamp(round(x / s), -m-1, m) · s
    asymmetric, b bits, M = 2^b - 1 (attention's k and v, per head and token):
        s = (max x - min x) / M,  z = round(-min x / s)     x̂ = (clamp(round(x / s) + z, 0, M) - z) · s

Scales are floored at the dtype's smallest normal number, so an all-zero row stays zero (not 0/0).

`clip` c ∈ (0, 1] shrinks the range before the scale is taken (QuaRot's clip ratio: 0.9 for activations,
0.95 for the KV cache): symmetric s = c · max|x| / m; asymmetric lo, hi = c · min x, c · max x. Values
outside the shrunk range saturate at the grid's ends (the clamp). c = 1 runs exactly the ops above.

`fake_quant(x, bits, symmetric)` runs the ATen ops on a tensor; `passes/actquant.py` passes an `op`
that appends each call to an FX graph instead. The rewritten program and a checkpoint loaded by
`spinfx.load` therefore run the same ATen calls in the same order, on the same values: bit for bit
the same quantizer.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

aten = torch.ops.aten


def _run(target, *args):
    return target(*args)


def fake_quant(x: Any, bits: int, symmetric: bool, *, clip: float = 1.0, dtype: torch.dtype | None = None,
               op: Callable = _run) -> Any:
    """x̂ over x's last dim (see the module docstring). `op(target, *args)` applies one ATen op (default:
    calls it); `dtype` is x's dtype where x is not a tensor (an FX node)."""
    tiny = torch.finfo(dtype or x.dtype).tiny

    def clipped(r):  # the range's end, shrunk by the clip ratio
        return r if clip == 1.0 else op(aten.mul.Tensor, r, float(clip))

    if symmetric:
        m = (1 << (bits - 1)) - 1
        s = op(aten.clamp_min.default, op(aten.div.Tensor, clipped(op(aten.amax.default, op(aten.abs.default, x), [-1], True)),
                                          float(m)), tiny)
        q = op(aten.clamp.default, op(aten.round.default, op(aten.div.Tensor, x, s)), float(-m - 1), float(m))
        return op(aten.mul.Tensor, q, s)
    top = float((1 << bits) - 1)
    lo = clipped(op(aten.amin.default, x, [-1], True))
    hi = clipped(op(aten.amax.default, x, [-1], True))
    s = op(aten.clamp_min.default, op(aten.div.Tensor, op(aten.sub.Tensor, hi, lo), top), tiny)
    z = op(aten.round.default, op(aten.div.Tensor, op(aten.neg.default, lo), s))
    q = op(aten.clamp.default, op(aten.add.Tensor, op(aten.round.default, op(aten.div.Tensor, x, s)), z), 0.0, top)
    return op(aten.mul.Tensor, op(aten.sub.Tensor, q, z), s)
