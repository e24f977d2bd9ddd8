"""Dynamic activation and KV-cache fake quantization, inserted into the graph as plain ATen ops
(the quantizer itself is `spinfx.kernels.fake_quant`):

    per token (a linear's input x, over its last dim), symmetric, b bits, m = 2^(b-1) - 1:
        s = max|x| / m        x̂ = clamp(round(x / s), -m-1, m) · s
    per head and token (attention's k and v, over head_dim), asymmetric, b bits, M = 2^b - 1:
        s = (max x - min x) / M,  z = round(-min x / s)     x̂ = (clamp(round(x / s) + z, 0, M) - z) · s

A clip ratio c ∈ (0, 1] (`clip_ratio:`) shrinks each row's range to c times its own before the scale is
taken (QuaRot: 0.9 for activations, 0.95 for the KV cache); `symmetric: false` gives a linear's input
the asymmetric quantizer too. Defaults (c = 1, symmetric inputs) run the ops above unchanged.

These are accuracy-study quantizers ("fake quantization"): values are rounded to the integer grid and
scaled back in the activation dtype; no integer matmul runs. A real int8×int8 path was measured and is
not worth it on this CPU: torch._int_mm at [512×576]·[576×1536] took 28 ms against 14 ms for the fp32
matmul, so the report says "fake-quant". Scales are dynamic (computed from the values at run time), so
no calibration is needed and the ops stay visible for Inductor to fuse.

The KV quantizer sits where the cache would: on attention's k and v before GQA's repeat_kv (after R3's
online Hadamard when the rotation pass put one there), so the cache would hold the quantized values.
"""
from __future__ import annotations

import torch.fx as fx

from spinfx.engine.errors import BadInput
from spinfx.engine.graph import Program
from spinfx.kernels.fake_quant import fake_quant as kernel_fake_quant
from spinfx.engine.match import find_all
from spinfx.engine.pattern import ANY, Op, Var
from spinfx.patterns.attention import SDPA, _repeat_kv


# node meta "module_type" of the quantizers' ops (drivers find the KV quantizer by it)
ACT_KIND, KV_KIND = "act-fake-quant", "kv-fake-quant"
KINDS = (ACT_KIND, KV_KIND)

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


def check_clip(clip, what: str) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise BadInput(f"quantize: {what} clip_ratio must be a number in (0, 1], got {clip!r}")
    return float(clip)


def fake_quant(graph: fx.Graph, x: fx.Node, bits: int, symmetric: bool, kind: str, clip: float = 1.0) -> fx.Node:
    """Insert the fake quantizer of x over its last dim right after x; return its output node. The ops
    are `spinfx.kernels.fake_quant`'s, appended to the graph one by one (`spinfx.load` runs the same
    function on tensors)."""
    return kernel_fake_quant(x, bits, symmetric, clip=clip, dtype=x.meta["val"].dtype,
                             op=_Chain(graph, x, x.meta.get("module", ""), kind))


def quantizer_outputs(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """{x̂: x} for every fake quantizer in the graph (its last op: the one read outside the quantizer)."""
    out = {}
    for n in graph.nodes:
        if n.meta.get("module_type") in KINDS and any(u.meta.get("module_type") not in KINDS for u in n.users):
            seen, todo, xs = set(), [n], set()
            while todo:
                m = todo.pop()
                if m not in seen:
                    seen.add(m)
                    for a in m.all_input_nodes:
                        (todo.append(a) if a.meta.get("module_type") in KINDS else xs.add(a))
            (out[n],) = xs
    return out


def quantize_inputs(prog: Program, linears: list[tuple[fx.Node, int]], bits: int, symmetric: bool = True,
                    clip: float = 1.0) -> int:
    """Per-token fake quantization of the inputs of `linears` ((node, input arg index) pairs).

    Linears reading one value (q/k/v, gate/up) share one quantizer; other readers of that value (the
    residual add) keep reading it unquantized. Returns the number of quantizers inserted."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node, i in linears:
        readers.setdefault(node.args[i], []).append(node)
    for x, users in readers.items():
        q = fake_quant(prog.graph, x, bits, symmetric, kind=ACT_KIND, clip=clip)
        for u in users:
            u.replace_input_with(x, q)
    return len(readers)


def quantize_kv(prog: Program, bits: int, symmetric: bool, clip: float = 1.0) -> list[int]:
    """Per-head, per-token fake quantization of every attention's k and v (what a KV cache stores).
    Returns the sizes quantized over (head_dim of k and of v), two per attention site."""
    sites = find_all(KV_SITE, prog.graph)[0]
    if not sites:
        raise BadInput("quantize: kv_cache asks for KV quantization but no attention "
                       "(scaled_dot_product_attention) was found")
    sizes = []
    for m in sites:
        for key in ("k", "v"):
            x = m[key]
            users = list(x.users)  # every reader: a cache output, when there is one, holds x̂ too
            q = fake_quant(prog.graph, x, bits, symmetric, kind=KV_KIND, clip=clip)
            for u in users:
                u.replace_input_with(x, q)
            sizes.append(x.meta["val"].shape[-1])
    return sizes
