"""Canonical text of a graph: one node per line, deterministic, no paths, ids or line comments.

    v3 = aten.linear(v2, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]

* values are numbered locally in graph order (`v0, v1, ...`); user inputs are `in0, in1, ...`;
* constants are written inline by their FQN (`$name`), with their own lines only in `consts=True` mode;
* with `module=` only nodes whose module path equals it or lies below it are printed; values from
  outside are `ext0, ext1, ...` in order of first use — so a layer's golden does not move when
  something before it changes;
* spinfx's own ops print as `spinfx.name`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

_DT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8",
       torch.int16: "i16"}


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        name = target._schema.name.split("::", 1)[-1]
        ov = target._overloadname
        return f"{ns}.{name}" + ("" if ov in ("default", "") else f".{ov}")
    return getattr(target, "__name__", str(target))


def _type(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{_DT.get(v.dtype, str(v.dtype))}[{','.join(str(s) for s in v.shape)}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_type(x) for x in v) + ")"
    return type(v).__name__ if v is not None else "-"


def _in_module(node: fx.Node, module: str | None) -> bool:
    if module is None:
        return True
    m = node.meta.get("module", "")
    return m == module or m.startswith(module + ".")


def print_graph(gm_or_graph, module: str | None = None, consts: bool = False, types: bool = True) -> str:
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    names: dict[fx.Node, str] = {}
    ext: dict[fx.Node, str] = {}
    lines: list[str] = []
    n_in = n_v = 0

    def ref(a: Any) -> str:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return "$" + a.target
            if a in names:
                return names[a]
            if a not in ext:
                ext[a] = f"ext{len(ext)}"
            return ext[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(ref(x) for x in a)
            return f"[{inner}]"
        if isinstance(a, torch.dtype):
            return _DT.get(a, str(a))
        if isinstance(a, float):
            return repr(a)
        if isinstance(a, torch.device):
            return a.type
        if isinstance(a, torch.memory_format | torch.layout):
            return str(a).removeprefix("torch.")
        return repr(a)

    for n in graph.nodes:
        if n.op == "placeholder":
            names[n] = f"in{n_in}"
            n_in += 1
            if module is None:
                lines.append(f"{names[n]} = input" + (f" : {_type(n.meta.get('val'))}" if types else ""))
            continue
        if n.op == "get_attr":
            if consts:
                lines.append(f"${n.target} : {_type(n.meta.get('val'))}")
            continue
        if n.op == "output":
            if module is None:
                lines.append(f"return {ref(n.args[0])}")
            continue
        if not _in_module(n, module):
            continue
        names[n] = f"v{n_v}"
        n_v += 1
        args = [ref(a) for a in n.args] + [f"{k}={ref(v)}" for k, v in n.kwargs.items()]
        line = f"{names[n]} = {op_name(n.target)}({', '.join(args)})"
        if types:
            line += f" : {_type(n.meta.get('val'))}"
        lines.append(line)
    return "\n".join(lines) + "\n"
