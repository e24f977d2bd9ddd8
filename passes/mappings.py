"""check-mappings: llm-compressor's mapping vocabulary as constraints on what the graph finds.

Users coming from llm-compressor describe a model with a SpinQuantMapping (`embedding`, `attn_q`,
`attn_k`, `attn_v`, `attn_o`, `attn_head_dim`, `mlp_in`, `mlp_out`) and NormMappings (`norm` →
`linears`), as module names or `re:` regexes. spinfx never *needs* them — structure decides — but when
given, every role must name exactly the modules the graph assigns to it, or the pass refuses and
says, role by role, which modules one side has and the other does not.

Name matching follows llm-compressor: `re:<regex>` is `re.match` on the module's full name; a plain
string matches the full name, its last component, or the module's class name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from spinfx.engine.errors import Unsupported
from spinfx.engine.graph import Program
from spinfx.engine.match import find_all
from spinfx.patterns.attention import QKV, qkv_linears
from spinfx.patterns.common import LINEAR_OPS
from spinfx.patterns.groups import GATE_UP, NORM_LINEARS
from spinfx.patterns.residual import residual_stream
from spinfx.engine.pipeline import Context, Pass, PassResult

aten = torch.ops.aten


def matches(target: str, name: str, cls: str = "") -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, name.rsplit(".", 1)[-1], cls)


def _select(targets, modules: dict[str, str]) -> set[str]:
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return {m for m, cls in modules.items() if any(matches(t, m, cls) for t in targets)}


def _mod(node) -> str:
    return node.meta.get("module", "")


def graph_roles(prog: Program) -> dict[str, set[str]]:
    """The modules the graph's structure assigns to each SpinQuantMapping role."""
    g = prog.graph
    roles: dict[str, set[str]] = {k: set() for k in ("embedding", "attn_q", "attn_k", "attn_v", "attn_o",
                                                    "mlp_in", "mlp_out")}
    stream = residual_stream(g)
    if stream.embedding is not None:
        roles["embedding"].add(_mod(stream.embedding))
    head_dims = set()
    for m in find_all(QKV, g)[0]:
        lins = qkv_linears(m)
        for role, node in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
            roles[role].add(_mod(lins.get(node, lins.get("qkv"))))
        head_dims.add(int(m["v_heads"].meta["val"].shape[-1]))
        out = m["attn"]
        while out.target not in LINEAR_OPS and len(out.users) == 1:
            out = next(iter(out.users))
        if out.target in LINEAR_OPS:
            roles["attn_o"].add(_mod(out))
    for m in find_all(GATE_UP, g)[0]:
        for k in ("gate", "up", "gate_up"):
            if k in m.captures:
                roles["mlp_in"].add(_mod(m[k]))
    attn_o = roles["attn_o"]
    for w in stream.writers:
        if w.node.target in LINEAR_OPS and _mod(w.node) not in attn_o:
            roles["mlp_out"].add(_mod(w.node))
    roles["attn_head_dim"] = head_dims  # type: ignore[assignment]
    return roles


def _modules(prog: Program) -> dict[str, str]:
    mods: dict[str, str] = {}
    for n in prog.graph.nodes:
        if n.op == "call_function" and n.meta.get("module"):
            if n.target in LINEAR_OPS + (aten.embedding.default,) or "norm" in n.meta.get("module_type", "").lower():
                mods.setdefault(n.meta["module"], n.meta.get("module_type", ""))
    return mods


@dataclass(frozen=True)
class CheckMappings(Pass):
    name = "check-mappings"
    spinquant: dict = field(default_factory=dict)   # SpinQuantMapping fields
    norms: tuple = ()                               # NormMapping dicts: {norm: ..., linears: [...]}

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        modules = _modules(prog)
        found = graph_roles(prog)
        problems = []
        for role, targets in self.spinquant.items():
            if role == "attn_head_dim":
                if found["attn_head_dim"] != {int(targets)}:
                    problems.append(f"attn_head_dim: mapping says {targets}, attention has head_dim "
                                    f"{sorted(found['attn_head_dim'])}")
                continue
            if role not in found:
                raise Unsupported(f"check-mappings: unknown SpinQuantMapping role {role!r}; "
                                  f"known: {', '.join(sorted(found))}")
            named = _select(targets, modules)
            problems += _diff(role, targets, named, found[role])
        norm_groups = {_mod(m.root): {_mod(lm.captures.get("linear") or lm.captures.get("linear_t"))
                                      for lm in m["linears"]} for m in find_all(NORM_LINEARS, prog.graph)[0]}
        for nm in self.norms:
            linears = _select(nm["linears"], modules)
            for norm in sorted(_select(nm["norm"], modules)):
                problems += _diff(f"norm {norm} → linears", nm["linears"], _scoped(norm, linears),
                                  norm_groups.get(norm, set()))
        res.findings["roles"] = {k: len(v) for k, v in found.items()}
        if problems:
            raise Unsupported("the mappings disagree with the graph: " + "; ".join(problems))
        res.notes.append(f"mappings agree with the graph ({len(self.spinquant)} roles, {len(self.norms)} norm mappings)")
        return res


def _scoped(norm: str, linears: set[str]) -> set[str]:
    """The named linears in the norm's own block: under its nearest ancestor that has any (as
    llm-compressor resolves a NormMapping per layer)."""
    parts = norm.split(".")[:-1]
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        inside = {m for m in linears if not prefix or m.startswith(prefix + ".")}
        if inside:
            return inside
    return set()


def _diff(role: str, targets, named: set[str], found: set[str]) -> list[str]:
    out = []
    if named - found:
        out.append(f"{role}: {targets!r} names {sorted(named - found)[:3]} which the graph does not find in that role")
    if found - named:
        out.append(f"{role}: the graph finds {sorted(found - named)[:3]} which {targets!r} does not name")
    return out
