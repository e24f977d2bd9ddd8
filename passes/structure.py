"""find-structure: the analysis every other pass starts from.

Runs the structure finders of spinfx.patterns (norms, norm→linear groups, q/k/v, gate/up, RoPE,
attention, MoE routers) and the residual-stream walk, and groups each router with its experts; records counts, nearest misses, and the matches themselves
in `ctx.analyses["structure"]` for later passes. Edits nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spinfx.engine.graph import Program
from spinfx.patterns import STRUCTURE
from spinfx.patterns.moe import expert_groups
from spinfx.patterns.residual import Stream, residual_stream
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.engine.rule import find


@dataclass
class Structure:
    matches: dict[str, list]          # finder name -> matches
    stream: Stream

    def count(self, name: str) -> int:
        return len(self.matches.get(name, []))


@dataclass(frozen=True)
class FindStructure(Pass):
    name = "find-structure"

    def streams(self) -> bool:
        return True  # finds, changes nothing

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        stats = find(prog.gm, STRUCTURE)
        res.rules = list(stats.values())
        stream = residual_stream(prog.graph)
        st = Structure({s.name: s.found for s in stats.values()}, stream)
        ctx.analyses["structure"] = st
        counts: dict[str, Any] = {s.name: s.matches for s in stats.values()}
        norm_nodes = {m.root: m for m in st.matches.get("norm", [])}
        reading = {id(norm_nodes[n]) for n in _reader_norms(stream, st.matches.get("norm", []))}
        counts["residual-writers"] = len(stream.writers)
        counts["residual-readers"] = len(reading)
        res.findings["counts"] = counts
        res.findings["residual"] = {
            "embedding": stream.summary()["embedding"], "writers": len(stream.writers),
            "reader_norms": len(reading), "writer_kinds": ", ".join(stream.summary()["writer_kinds"]),
            "stop": stream.stop_reason}
        groups = expert_groups(prog.graph)
        if groups:  # mixture of experts (only then: other models' reports stay as they were)
            counts["router"] = len(groups)
            counts["experts"] = sum(len(g.experts) for g in groups)
            res.findings["experts"] = {g.router.meta.get("module") or g.router.name: g.summary() for g in groups}
        return res


def _reader_norms(stream: Stream, norm_matches: list) -> list:
    """Norm roots whose match contains a node that reads the stream."""
    readers = set(stream.readers)
    return [m.root for m in norm_matches if readers.intersection(m.nodes)
            or m.captures.get("x") in stream.values]
