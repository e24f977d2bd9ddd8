"""Rules: a pattern, what to do with a match, and where the rule was written.

    Rule("fold-rms-gamma", NORM_LINEARS, fold_gamma)

`rewrite(match, ctx)` returns None when the rule does not apply here (its guards live in the rewrite
function, tinygrad-style), a Node to replace the match root with, or True when it edited the graph (or
weights) itself, leaving no dead node. A rule with no rewrite is a finder: it only records what it
matched (used by inspect and by analysis passes). Every rule knows its file:line; stats are keyed by it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from spinfx.engine.errors import SpinfxError
from spinfx.engine.match import Index, Match, Miss, describe
from spinfx.engine.pattern import Pat


@dataclass(eq=False)
class Rule:
    name: str
    pattern: Pat
    rewrite: Callable[[Match, Any], Any] | None = None
    where: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.where:
            f = sys._getframe(2)
            path = f.f_code.co_filename.replace(os.sep, "/").split("/")
            self.where = f"{'/'.join(path[-2:])}:{f.f_lineno}"


@dataclass
class RuleStats:
    name: str
    where: str
    matches: int = 0
    applied: int = 0
    declined: int = 0
    nearest_miss: str | None = None
    found: list[Match] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {"rule": self.name, "where": self.where, "matches": self.matches, "applied": self.applied,
             "declined": self.declined}
        if self.nearest_miss:
            d["nearest_miss"] = self.nearest_miss
        return d


def trace_level() -> int:
    level = os.environ.get("SPINFX_TRACE", "0").strip()
    return int(level) if level.isdigit() else 0


def apply_rules(gm: fx.GraphModule, rules: list[Rule], ctx: Any = None, max_sweeps: int = 8) -> dict[str, RuleStats]:
    """Drive `rules` over the graph to a fixed point (at most `max_sweeps` sweeps; 1: each match rewritten once)."""
    stats = {r.where + ":" + r.name: RuleStats(r.name, r.where) for r in rules}
    keyed = {r.where + ":" + r.name: r for r in rules}
    level = trace_level()
    for sweep in range(max_sweeps):
        idx = Index({k: r.pattern for k, r in keyed.items()})
        changed = False
        for key, m in idx.sweep(gm.graph):
            rule, st = keyed[key], stats[key]
            if sweep == 0:
                st.matches += 1
                st.found.append(m)
            if level >= 2:
                print(f"[spinfx] {rule.name} ({rule.where}) matched at {describe(m.root)}", file=sys.stderr)
            if rule.rewrite is None:
                continue
            out = rule.rewrite(m, ctx)
            if out is None or out is False:
                st.declined += 1
                continue
            st.applied += 1
            changed = True
            if isinstance(out, fx.Node) and out is not m.root:
                out.meta.setdefault("module", m.root.meta.get("module", ""))
                m.root.replace_all_uses_with(_same_dtype(out, m.root))
                gm.graph.eliminate_dead_code()
        for key, st in stats.items():
            if st.matches == 0 and st.nearest_miss is None:
                st.nearest_miss = idx.nearest_miss(key).describe()
        if not changed or max_sweeps == 1:  # one sweep: rewrites that are not idempotent (weight edits)
            return stats
    raise SpinfxError(f"rules did not reach a fixed point in {max_sweeps} sweeps: "
                      + ", ".join(s.name for s in stats.values() if s.applied))


def _same_dtype(new: fx.Node, old: fx.Node) -> fx.Node:
    """`new`, cast to `old`'s dtype if they differ: the dropped op may have promoted (float64 γ · float32 n)."""
    a, b = new.meta.get("val"), old.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype == b.dtype:
        return new
    with old.graph.inserting_before(old):
        cast = old.graph.call_function(torch.ops.aten._to_copy.default, (new,), {"dtype": b.dtype})
    cast.meta = {**old.meta, "val": a.to(b.dtype)}
    return cast


def find(gm_or_graph, rules: list[Rule]) -> dict[str, RuleStats]:
    """Run finder rules (ignoring any rewrite) and return their stats with matches."""
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    keyed = {r.where + ":" + r.name: r for r in rules}
    stats = {k: RuleStats(r.name, r.where) for k, r in keyed.items()}
    idx = Index({k: r.pattern for k, r in keyed.items()})
    for key, m in idx.sweep(graph):
        stats[key].matches += 1
        stats[key].found.append(m)
    for key, st in stats.items():
        miss = idx.misses.get(key)
        if st.matches == 0 or miss is not None:
            st.nearest_miss = (miss or idx.nearest_miss(key)).describe()
    return stats


__all__ = ["Rule", "RuleStats", "apply_rules", "find", "Miss", "Match"]
