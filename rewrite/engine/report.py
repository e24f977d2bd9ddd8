"""Reports: what ran, what each rule found or almost found, contracts, certificates.

`Report.to_dict()` is the JSON form (`--json`, spinfx_report.json); `Report.to_text()` the console
form. Contracts are generic here: expected counts are small expressions in named quantities
("2L+1"); the families that declare them live in spinfx.patterns.contracts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from spinfx.engine.pipeline import PassResult

_TERM = re.compile(r"^\s*(\d*)\s*([A-Za-z]*)\s*$")


def eval_count(expr: str | int, env: dict[str, int]) -> int:
    """'2L+1' with env {'L': 30} -> 61. Sums of terms `k`, `kX` or products `kXY` ('EL': E·L)."""
    if isinstance(expr, int):
        return expr
    total = 0
    for term in str(expr).replace("-", "+-").split("+"):
        if not term.strip():
            continue
        sign = -1 if term.strip().startswith("-") else 1
        m = _TERM.match(term.strip().lstrip("-"))
        if not m:
            raise ValueError(f"bad contract term {term!r} in {expr!r}")
        k, names = m.groups()
        term_value = int(k) if k else 1
        for var in names:
            term_value *= env[var]
        total += sign * term_value
    return total


@dataclass
class ContractResult:
    family: str
    env: dict[str, int]
    expected: dict[str, int]
    found: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"family": self.family, "env": self.env, "expected": self.expected, "found": self.found,
                "satisfied": self.ok, "problems": self.problems}


def check_contract(family: str, spec: dict[str, str], env: dict[str, int], found: dict[str, int],
                   misses: dict[str, str] | None = None) -> ContractResult:
    expected = {k: eval_count(v, env) for k, v in spec.items()}
    res = ContractResult(family, env, expected, {k: found.get(k, 0) for k in expected})
    for k, want in expected.items():
        got = found.get(k, 0)
        if got != want:
            line = f"{k}: expected {want} ({spec[k]} with {', '.join(f'{a}={b}' for a, b in env.items())}), found {got}"
            if misses and misses.get(k):
                line += f"; nearest miss: {misses[k]}"
            res.problems.append(line)
    return res


@dataclass
class Report:
    model: str = ""
    recipe: str = ""
    passes: list[PassResult] = field(default_factory=list)
    contract: ContractResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pass_result(self, name: str) -> PassResult | None:
        return next((p for p in self.passes if p.name == name), None)

    def to_dict(self) -> dict:
        d = {"model": self.model, "recipe": self.recipe, "passes": [p.to_dict() for p in self.passes]}
        if self.contract is not None:
            d["contract"] = self.contract.to_dict()
        d.update(self.extra)
        return d

    def to_text(self, verbose: bool = False, stable: bool = False) -> str:
        """Console text. `stable=True` drops timings and file:line (for goldens)."""
        lines = [f"spinfx report: {self.model}" + (f" — recipe {self.recipe}" if self.recipe else "")]
        for p in self.passes:
            lines.append(f"\n[{p.name}] {p.edits} edits" + ("" if stable else f", {p.seconds * 1e3:.0f} ms"))
            for k, v in p.findings.items():
                if not isinstance(v, (dict, list)):
                    lines.append(f"  {k}: {v}")
                elif isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
                    lines.append(f"  {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
            for r in p.rules:
                tail = f"  nearest miss: {r.nearest_miss}" if (r.nearest_miss and (verbose or not r.matches)) else ""
                act = f", applied {r.applied}" if r.applied or r.declined else ""
                loc = "" if stable else f"   ({r.where})"
                lines.append(f"  {r.name:<18} {r.matches:>5} matches{act}{loc}{tail}")
            for n in p.notes:
                lines.append(f"  note: {n}")
            for n in p.refusals:
                lines.append(f"  refused: {n}")
            if p.certificate:
                c = p.certificate
                lines.append(f"  certified: max |Δ| {c['max_abs']:.2e} (relative {c['rel']:.2e} ≤ {c['tolerance']:.0e}), {c['dtype']}")
        if lin := self.extra.get("linears"):
            lines.append(f"\nlinears changed: {lin['changed']} of {lin['total']}" + (f" ({lin['note']})" if "note" in lin else "")
                         + (f"\n  note: {lin['untouched']}" if "untouched" in lin else ""))
        if cal := self.extra.get("calibration"):
            lines.append(f"\ncalibrated on {cal['text']}: {cal['tokens']} tokens")
        if acts := self.extra.get("activations"):
            med = acts["median"]
            lines.append(f"\nactivations at linear inputs (median over {len(acts['layers'])} linears, real text): "
                         f"max|x| {med['max_abs_before']:.3g} → {med['max_abs_after']:.3g}, "
                         f"kurtosis {med['kurtosis_before']:.3g} → {med['kurtosis_after']:.3g}")
            if verbose:
                for k, row in acts["layers"].items():
                    b, a = row["before"], row["after"]
                    lines.append(f"  {k:<40} max|x| {b['max_abs']:8.3g} → {a['max_abs']:8.3g}   "
                                 f"kurtosis {b['kurtosis']:8.3g} → {a['kurtosis']:8.3g}")
        if self.contract is not None:
            c = self.contract
            env = ", ".join(f"{a}={b}" for a, b in c.env.items())
            lines.append(f"\ncontract {c.family} ({env}): {'satisfied' if c.ok else 'BROKEN'}")
            for k, want in c.expected.items():
                mark = "ok" if c.found[k] == want else "!!"
                lines.append(f"  {mark} {k:<18} expected {want:>4}, found {c.found[k]:>4}")
            for pr in c.problems:
                lines.append(f"  problem: {pr}")
        return "\n".join(lines) + "\n"
