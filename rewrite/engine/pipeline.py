"""Passes and the pipeline that runs them.

A pass is a frozen dataclass with a kebab-case `name`; its fields are its options (xDSL-style). Its
`run(prog, ctx)` edits the program and returns a `PassResult`; the default `run` drives the pass's
rules to a fixed point. The pipeline runs passes in one visible order and after each one verifies the
graph (lint, metadata on every node, no dead nodes) and, for passes that change what the model
computes, certifies the change (spinfx.engine.certify) or stops with an error.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from spinfx.engine.errors import SpinfxError
from spinfx.engine.graph import Program, infer_meta
from spinfx.engine.printer import print_graph
from spinfx.engine.rule import Rule, RuleStats, apply_rules, trace_level


@dataclass
class PassResult:
    name: str
    options: dict
    rules: list[RuleStats] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)   # what an analysis found (counts, lists)
    notes: list[str] = field(default_factory=list)           # choices the pass made, said plainly
    refusals: list[str] = field(default_factory=list)        # structures it declined, with the reason
    certificate: dict | None = None
    seconds: float = 0.0

    @property
    def edits(self) -> int:
        return sum(r.applied for r in self.rules)

    def to_dict(self) -> dict:
        return {"pass": self.name, "options": self.options, "seconds": round(self.seconds, 4),
                "edits": self.edits, "rules": [r.to_dict() for r in self.rules],
                "findings": self.findings, "notes": self.notes, "refusals": self.refusals,
                "certificate": self.certificate}


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"
    # Changes the model's function? Then certified to `tolerance` (relative, fp64; 1e-10: exact) unless told not to
    certify: ClassVar[bool] = False
    tolerance: ClassVar[float] = 1e-10
    changes_weights: ClassVar[bool] = False  # exists to change weights: changing no linear is an error

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse options the pass cannot take (BadInput naming the option) when it is built, before any work."""

    def rules(self) -> list[Rule]:
        return []

    def calibration_windows(self) -> int:
        """How many windows of calibration text the pass runs the model on (0: none)."""
        return 0

    def streams(self) -> bool:
        """Each edit reads only its tensor, its window's constants, shape-fixed values: windows rewrite apart."""
        return False

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def run(self, prog: Program, ctx: "Context") -> PassResult:
        res = PassResult(self.name, self.options())
        res.rules = list(apply_rules(prog.gm, self.rules(), ctx).values())
        return res


@dataclass
class Context:
    """What passes may read besides the program: shared analyses and the caller's choices."""

    analyses: dict[str, Any] = field(default_factory=dict)
    calib: Any = None
    progress: Any = None  # callable(str) for long work
    site_base: int = 0  # the whole model's index of the program's first block (a window of layers i..: i)


def verify(gm: fx.GraphModule, after: str) -> None:
    """The graph is well formed, every value has metadata, and nothing is dead."""
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises plain RuntimeError
        raise SpinfxError(f"after {after}: malformed graph: {e}") from None
    infer_meta(gm)
    for n in gm.graph.nodes:
        if n.op in ("call_function", "get_attr") and not n.users and not _has_effect(n):
            raise SpinfxError(f"after {after}: dead node {n.name} ({n.target}) left in the graph")
        if n.op == "call_function" and "val" not in n.meta:
            raise SpinfxError(f"after {after}: node {n.name} has no metadata")
    gm.recompile()


def _has_effect(n: fx.Node) -> bool:
    return getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable


def run_pipeline(prog: Program, passes: list[Pass], ctx: Context | None = None,
                 certify: bool = True) -> list[PassResult]:
    """Run `passes` in order on `prog` (in place). Returns one result per pass."""
    from spinfx.engine.certify import certify_equal, outputs

    ctx = ctx or Context()
    results = []
    level = trace_level()
    now = None  # prog's certificate outputs, while known (the last certified pass's "after")
    for p in passes:
        if level >= 3:
            print(f"[spinfx] graph before {p.name}:\n{print_graph(prog.gm)}", file=sys.stderr)
        before, now = (now or outputs(prog)) if (certify and p.certify) else None, None  # outputs, not a copy
        t0 = time.perf_counter()
        res = p.run(prog, ctx)
        prog.gm.graph.eliminate_dead_code()
        verify(prog.gm, p.name)
        res.seconds = time.perf_counter() - t0
        if before is not None:
            now = outputs(prog)
            res.certificate = certify_equal(before, now, tol=p.tolerance, what=p.name)
        if level >= 1:
            counts = ", ".join(f"{r.name}={r.applied}/{r.matches}" for r in res.rules)
            print(f"[spinfx] {p.name}: {res.edits} edits in {res.seconds * 1e3:.1f} ms ({counts})", file=sys.stderr)
        results.append(res)
    return results
