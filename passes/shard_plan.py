"""shard's plan: which linears are column- and row-parallel, and how, decided from the graph alone
(no edits; the shard pass, spinfx.passes.shard, builds the rank-local program from it).

Classification, from structure alone:
  column-parallel  the linears that make attention's q, k, v (separate or one fused projection) and the
                   MLP's inner activations (gate/up, a fused gate_up, or a plain fc1): their outputs are
                   consumed per head or elementwise, so each rank computes its slice of output features;
  row-parallel     the linears that read those slices back (o_proj after attention, down_proj after the
                   MLP's activation): each rank multiplies its slice of input features and an
                   `all_reduce` (functional collective) sums the partial products; the bias is added by
                   rank 0 only, so exactly once;
  replicated       everything else (embeddings, lm_head, norms): every rank computes it whole.

Layouts follow vLLM (spinfx.kernels.tp_specs): q heads split evenly; kv heads KV/T per rank when T ≤ KV,
else rank r holds kv head r // (T/KV), replicated, with exactly the query heads that use it; merged /
fused projections split part by part ([q_r; k_r; v_r], [gate_r; up_r]), never by a naive chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from spinfx.engine.errors import Unsupported
from spinfx.engine.graph import Program
from spinfx.engine.match import describe, find_all
from spinfx.kernels import tp_specs as specs
from spinfx.patterns.attention import ATTENTION, output_projection
from spinfx.patterns.common import ACTIVATIONS, CASTS, HEAD_LAYOUT, VIEWS, is_linear

aten = torch.ops.aten
Seg = tuple[tuple[int, int], ...]          # (global, local) lengths of consecutive parts of one axis
Ann = dict[int, Seg]                       # axis -> segments


def hadamard_op():
    import spinfx.kernels.hadamard  # noqa: F401  (registers spinfx::hadamard)

    return torch.ops.spinfx.hadamard.default


def qlinear_op():
    import spinfx.kernels.qlinear  # noqa: F401

    return torch.ops.spinfx.qlinear.default


def shardable_linear(n: fx.Node) -> bool:
    """A linear shard splits: `is_linear`'s aten.linear (Conv1D's addmm is refused) or spinfx::qlinear (x is
    args[0] for both)."""
    return (is_linear(n) and n.target is aten.linear.default) or n.target is qlinear_op()


def module_of_linear(n: fx.Node) -> str:
    return n.args[1].target.rsplit(".", 1)[0]


def shape_of(n: fx.Node) -> list[int]:
    return [int(s) for s in n.meta["val"].shape]


def _k(n: fx.Node) -> int:
    return shape_of(n.args[0])[-1]


def _n(n: fx.Node) -> int:
    return shape_of(n)[-1]


def _through(n: fx.Node, ops) -> fx.Node:
    while n.op == "call_function" and n.target in ops:
        n = n.args[0]
    return n


def _producers(start: fx.Node) -> list[fx.Node]:
    """The nearest linears above `start` (backwards, not through linears)."""
    seen, stack, out = set(), [start], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if shardable_linear(n):
            out.append(n)
            continue
        if n.op == "call_function" and n.target is aten.addmm.default:
            raise Unsupported(f"shard: {describe(n)} is a Conv1D-style addmm linear; shard splits aten.linear "
                              f"and spinfx.qlinear only")
        stack.extend(n.all_input_nodes)
    return sorted(out, key=lambda x: x.name)


# ---- classification --------------------------------------------------------------------------------


@dataclass
class Site:
    kind: str                  # "attention" | "mlp"
    column: list[fx.Node]
    row: fx.Node
    info: dict = field(default_factory=dict)


@dataclass
class ShardPlan:
    tp: int
    sites: list[Site]
    layouts: dict[fx.Node, specs.Layout]      # linear node -> its layout (column / row)
    seeds: dict[fx.Node, Ann]                 # column linear -> annotation of its output

    def by_module(self) -> dict[str, specs.Layout]:
        return {module_of_linear(n): lay for n, lay in self.layouts.items()}


def _o_proj(attn: fx.Node) -> fx.Node:
    o, why = output_projection(attn, shardable_linear, HEAD_LAYOUT + CASTS)
    if o is None:
        raise Unsupported(f"shard: {why}")
    return o


def _unlift(e, where: str) -> Unsupported:
    return Unsupported(f"shard: {e} ({where})")


def _quant(lin: fx.Node, lay: specs.Layout) -> specs.Layout:
    if lin.target is not qlinear_op():
        return lay
    bits, group = int(lin.args[6]), int(lin.args[7])
    act_order = lin.args[4] is not None
    per_channel = shape_of(lin.args[2])[1] == 1 and group == _k(lin) and not act_order
    return lay.with_quant(bits, None if per_channel else group, act_order)


def plan_shard(prog: Program, tp: int, attention: str = "shard") -> ShardPlan:
    """Which linears are column-/row-parallel and how (no edits). Raises Unsupported with the numbers.
    attention="replicate": attention blocks stay whole on every rank (only MLPs are split) — for models
    whose head count T does not divide (SmolLM2: 9 heads at T = 2)."""
    if attention not in ("shard", "replicate"):
        raise Unsupported(f"shard: attention must be 'shard' or 'replicate', not {attention!r}")
    g = prog.graph
    sites: list[Site] = []
    layouts: dict[fx.Node, specs.Layout] = {}
    seeds: dict[fx.Node, Ann] = {}
    for m in (find_all(ATTENTION, g)[0] if attention == "shard" else []):
        attn = m.root
        q_in, k_in, v_in = m["q_in"], m["k_in"], m["v_in"]
        h, hd = shape_of(q_in)[1], shape_of(q_in)[-1]
        prods = {role: _producers(x) for role, x in (("q", q_in), ("k", k_in), ("v", v_in))}
        o = _o_proj(attn)
        where = f"attention {describe(attn)}"
        try:
            if all(len(p) == 1 for p in prods.values()) and len({p[0] for p in prods.values()}) == 3:
                q, k, v = (prods[r][0] for r in "qkv")
                kv = _n(k) // hd
                if _n(q) != h * hd or _n(v) != kv * hd:
                    raise Unsupported(f"shard: q/k/v widths {_n(q)}/{_n(k)}/{_n(v)} do not match {h} heads × "
                                      f"{hd} at {where}")
                qr, kr = specs.heads(h, kv, tp, where)
                for lin, name, heads, ranges in ((q, "q", h, qr), (k, "k", kv, kr), (v, "v", kv, kr)):
                    lay = specs.column([(name, heads * hd, [(a * hd, b * hd) for a, b in ranges])], tp, _k(lin))
                    layouts[lin] = _quant(lin, lay)
                    seeds[lin] = {len(shape_of(lin)) - 1: lay.segments()}
                cols = [q, k, v]
            elif all(len(p) == 1 for p in prods.values()) and len({p[0] for p in prods.values()}) == 1:
                qkv = prods["q"][0]
                kv2 = _n(qkv) // hd - h
                if kv2 <= 0 or kv2 % 2 or _n(qkv) % hd:
                    raise Unsupported(f"shard: fused projection {describe(qkv)} of width {_n(qkv)} is not "
                                      f"{h} q heads + 2·KV heads of {hd}")
                kv = kv2 // 2
                qr, kr = specs.heads(h, kv, tp, where)
                lay = specs.column([("q", h * hd, [(a * hd, b * hd) for a, b in qr]),
                                    ("k", kv * hd, [(a * hd, b * hd) for a, b in kr]),
                                    ("v", kv * hd, [(a * hd, b * hd) for a, b in kr])], tp, _k(qkv))
                layouts[qkv] = _quant(qkv, lay)
                seeds[qkv] = {len(shape_of(qkv)) - 1: lay.segments()}
                cols = [qkv]
            else:
                raise Unsupported(f"shard: {where}: q, k, v come from {', '.join(describe(p) for ps in prods.values() for p in ps)}; "
                                  f"expected one linear each or one fused projection")
            layouts[o] = _quant(o, specs.row(_n(o), _k(o), tp, f"{module_of_linear(o)} input features (heads × head_dim)"))
        except specs.LayoutError as e:
            raise _unlift(f"{e}; attention: replicate keeps attention whole", where) from None
        sites.append(Site("attention", cols, o, {"heads": h, "kv_heads": kv, "head_dim": hd}))
    skip = CASTS + VIEWS + (hadamard_op(),)
    for d in [n for n in g.nodes if shardable_linear(n)]:
        x = _through(d.args[0], skip)
        if x.op != "call_function":
            continue
        where = f"MLP {describe(d)}"
        if x.target is aten.mul.Tensor and any(isinstance(a, fx.Node) and _through(a, CASTS).op == "call_function"
                                               and _through(a, CASTS).target in ACTIVATIONS for a in x.args[:2]):
            cols = _producers(x)
        elif x.target in ACTIVATIONS and shardable_linear(_through(x.args[0], CASTS)):
            cols = [_through(x.args[0], CASTS)]
        else:
            continue
        if d in layouts or any(c in layouts for c in cols):
            continue
        inter = _k(d)
        try:
            if len(cols) == 1 and _n(cols[0]) == 2 * inter:  # fused gate_up: [gate; up]
                per = specs.split_even(inter, tp, f"{module_of_linear(d)} intermediate size")
                rng = [(r * per, (r + 1) * per) for r in range(tp)]
                lay = specs.column([("gate", inter, rng), ("up", inter, rng)], tp, _k(cols[0]))
                layouts[cols[0]] = _quant(cols[0], lay)
                seeds[cols[0]] = {len(shape_of(cols[0])) - 1: lay.segments()}
            elif all(_n(c) == inter for c in cols):
                for c in cols:
                    lay = specs.even_column(inter, tp, _k(c), f"{module_of_linear(d)} intermediate size")
                    layouts[c] = _quant(c, lay)
                    seeds[c] = {len(shape_of(c)) - 1: lay.segments()}
            else:
                raise Unsupported(f"shard: {where}: inner linears {', '.join(describe(c) for c in cols)} "
                                  f"do not produce the {inter} features it reads")
            layouts[d] = _quant(d, specs.row(_n(d), inter, tp, f"{module_of_linear(d)} input features (intermediate size)"))
        except specs.LayoutError as e:
            raise _unlift(e, where) from None
        sites.append(Site("mlp", cols, d, {"intermediate": inter}))
    if not sites:
        raise Unsupported("shard: no attention or MLP block with column- and row-parallel linears was found")
    for lin in layouts:
        w = lin.args[1]
        if len([u for u in w.users]) > 1:
            raise Unsupported(f"shard: the weight {describe(w)} of {describe(lin)} is read elsewhere too; "
                              f"it cannot be split for one reader")
    return ShardPlan(tp, sites, layouts, seeds)
