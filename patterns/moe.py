"""Mixture of experts: the router and its experts, a sibling group of one input.

ROUTER        topk(softmax(linear(x, W_r))) — Mixtral, Qwen3-MoE, OLMoE — or topk(linear(x, W_r)) with the
              softmax over the chosen logits after it (Granite-MoE); casts optional. Captures `x`,
              `w_router`, the linear as `router`, the topk as `topk`.
expert_groups every router with its experts: the fused gate/up MLPs (`GATE_UP`, one per expert) that
              read the router's input x (through views/casts), each with the down projection reading
              its product. Router and experts are siblings: they read one value (the post-attention
              norm's output), so folding γ, R1 and centering act on all of them alike.

The dense form the drivers trace (spinfx.checkpoint.moe) writes Σ_e w_e ⊙ down_e(…) into the residual stream; the
per-token weight w_e is a row scale that `patterns.residual` accepts on a stream writer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from spinfx.engine.match import find_all
from spinfx.engine.pattern import Op, Opt, Var

from spinfx.patterns.common import CASTS, VIEWS, is_linear, linear_of
from spinfx.patterns.groups import GATE_UP

aten = torch.ops.aten
SOFTMAX = (aten.softmax.int, aten._softmax.default)

_logits = Opt(CASTS, linear_of(Var("x"), w="w_router", b="b_router", name="router"))
ROUTER = Op(aten.topk.default, Opt(CASTS, Op(SOFTMAX, _logits)) | _logits, Var("k"), name="topk")


@dataclass
class ExpertGroup:
    router: fx.Node                     # the router linear
    x: fx.Node                          # the input router and experts read (through views/casts)
    top_k: int
    experts: list[tuple[fx.Node, fx.Node | None]] = field(default_factory=list)  # (gate_up or gate, down)

    def summary(self) -> str:
        """'4 experts (top-2): model.layers.0.mlp.experts.{0..3}' — what reads the router's input."""
        mods = [(gu.meta.get("module") or gu.name).removesuffix(".gate_up_proj") for gu, _ in self.experts]
        head = mods[0].rsplit(".", 1)[0] if mods else ""
        if mods and all(m.rsplit(".", 1)[0] == head for m in mods):
            where = f"{head}.{{{mods[0].rsplit('.', 1)[1]}..{mods[-1].rsplit('.', 1)[1]}}}"
        else:
            where = ", ".join(mods)
        return f"{len(self.experts)} experts (top-{self.top_k}) read its input: {where}"


def _source(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in CASTS + VIEWS:
        n = n.args[0]
    return n


def _down(glu: fx.Node) -> fx.Node | None:
    users = [u for u in glu.users if is_linear(u)]
    return users[0] if len(users) == 1 and len(glu.users) == 1 else None


def expert_groups(graph: fx.Graph) -> list[ExpertGroup]:
    """Every router of the graph with the experts that read its input, in graph order."""
    routers = find_all(ROUTER, graph)[0]
    mlps = find_all(GATE_UP, graph)[0]
    by_input: dict[fx.Node, list] = {}
    for m in mlps:
        by_input.setdefault(_source(m["x"]), []).append(m)
    groups = []
    for r in routers:
        src = _source(r["x"])
        experts = [(m.get("gate_up") or m.get("gate"), _down(m["glu"])) for m in by_input.get(src, [])]
        groups.append(ExpertGroup(r["router"] if "router" in r.captures else r["router_t"], src, int(r["k"]), experts))
    return groups


def routers(graph: fx.Graph) -> set[fx.Node]:
    """The router linears (kept in float by `quantize` unless asked otherwise)."""
    return {g.router for g in expert_groups(graph)}
