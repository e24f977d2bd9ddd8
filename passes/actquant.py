"""Dynamic activation and KV-cache fake quantization, inserted into the graph as plain ATen ops.

    per token (a linear's input x, over its last dim), symmetric, b bits, m = 2^(b-1) - 1:
        s = max|x| / m        x̂ = clamp(round(x / s), -m-1, m) · s
    per head and token (attention's k and v, over head_dim), asymmetric, b bits, M = 2^b - 1:
        s = (max x - min x) / M,  z = round(-min x / s)     x̂ = (clamp(round(x / s) + z, 0, M) - z) · s

These are accuracy-study quantizers ("fake quantization"): values are rounded to the integer grid and
scaled back in the activation dtype; no integer matmul runs. A real int8×int8 path was measured and is
not worth it on this CPU: torch._int_mm at [512×576]·[576×1536] took 28 ms against 14 ms for the fp32
matmul, so the report says "fake-quant". Scales are dynamic (computed from the values at run time), so
no calibration is needed and the ops stay visible for Inductor to fuse.

The KV quantizer sits where the cache would: on attention's k and v before GQA's repeat_kv (after R3's
online Hadamard when the rotation pass put one there), so the cache would hold the quantized values.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from spinfx.errors import BadInput
from spinfx.graph import Program
from spinfx.match import find_all
from spinfx.pattern import ANY, Op, Var
from spinfx.patterns.attention import SDPA, _repeat_kv

aten = torch.ops.aten

# Attention with its k and v captured before GQA's repeat (the tensors a KV cache holds).
KV_SITE = Op(SDPA, ANY, _repeat_kv(Var("k")), _repeat_kv(Var("v")), name="attn")


def check_bits(bits, what: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise BadInput(f"quantize: {what} bits must be an integer in 2..8, got {bits!r}")
    return bits


class _Chain:
    """Appends ATen nodes one after another (starting after `anchor`), each with metadata computed by
    running the op on its inputs' FakeTensors."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, module: str, kind: str):
        self.graph, self.last = graph, anchor
        self.meta = {"module": module, "module_type": kind}

    def __call__(self, target, *args) -> fx.Node:
        with self.graph.inserting_after(self.last):
            node = self.graph.call_function(target, args)
        vals = fx.node.map_arg(args, lambda a: a.meta["val"])
        node.meta = {"val": target(*vals), **self.meta}
        self.last = node
        return node


def fake_quant(graph: fx.Graph, x: fx.Node, bits: int, symmetric: bool, kind: str) -> fx.Node:
    """Insert the fake quantizer of x over its last dim right after x; return its output node."""
    tiny = torch.finfo(x.meta["val"].dtype).tiny  # keeps an all-zero row at zero instead of 0/0
    op = _Chain(graph, x, x.meta.get("module", ""), kind)
    if symmetric:
        m = (1 << (bits - 1)) - 1
        s = op(aten.clamp_min.default, op(aten.div.Tensor, op(aten.amax.default, op(aten.abs.default, x), [-1], True),
                                          float(m)), tiny)
        q = op(aten.clamp.default, op(aten.round.default, op(aten.div.Tensor, x, s)), float(-m - 1), float(m))
        return op(aten.mul.Tensor, q, s)
    top = float((1 << bits) - 1)
    lo = op(aten.amin.default, x, [-1], True)
    hi = op(aten.amax.default, x, [-1], True)
    s = op(aten.clamp_min.default, op(aten.div.Tensor, op(aten.sub.Tensor, hi, lo), top), tiny)
    z = op(aten.round.default, op(aten.div.Tensor, op(aten.neg.default, lo), s))
    q = op(aten.clamp.default, op(aten.add.Tensor, op(aten.round.default, op(aten.div.Tensor, x, s)), z), 0.0, top)
    return op(aten.mul.Tensor, op(aten.sub.Tensor, q, z), s)


def quantize_inputs(prog: Program, linears: list[tuple[fx.Node, int]], bits: int) -> int:
    """Per-token symmetric fake quantization of the inputs of `linears` ((node, input arg index) pairs).

    Linears reading one value (q/k/v, gate/up) share one quantizer; other readers of that value (the
    residual add) keep reading it unquantized. Returns the number of quantizers inserted."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node, i in linears:
        readers.setdefault(node.args[i], []).append(node)
    for x, users in readers.items():
        q = fake_quant(prog.graph, x, bits, symmetric=True, kind="act-fake-quant")
        for u in users:
            u.replace_input_with(x, q)
    return len(readers)


def quantize_kv(prog: Program, bits: int, symmetric: bool) -> int:
    """Per-head, per-token fake quantization of every attention's k and v (what a KV cache stores).
    Returns the number of attention sites."""
    sites = find_all(KV_SITE, prog.graph)[0]
    if not sites:
        raise BadInput("quantize: kv_cache asks for KV quantization but no attention "
                       "(scaled_dot_product_attention) was found")
    for m in sites:
        for key in ("k", "v"):
            x = m[key]
            users = list(x.users)  # every reader: a cache output, when there is one, holds x̂ too
            q = fake_quant(prog.graph, x, bits, symmetric, kind="kv-fake-quant")
            for u in users:
                u.replace_input_with(x, q)
    return len(sites)
