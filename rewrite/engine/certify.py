"""Function certificates, in float64.

A pass that changes weights must not change what the model computes (beyond its declared
tolerance). `certify_equal(before, after)` runs both programs in float64 on seeded random inputs
shaped like the examples they were traced with and compares every output. Exact rewrites use
tolerance 1e-10 relative to the largest output magnitude; failing raises `CertificateError` naming
the pass and the numbers: never a silently different model.

Weights live in float64 while passes run (`to_master`) until `finalize` casts each back once.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from spinfx.engine.errors import SpinfxError
from spinfx.engine.graph import Program

_LOW = (torch.float32, torch.float16, torch.bfloat16)


class CertificateError(SpinfxError):
    """A rewrite changed the model's function beyond its tolerance."""


def _promote(a):
    return torch.float64 if isinstance(a, torch.dtype) and a in _LOW else a


def as_fp64(prog: Program) -> Program:
    """A copy that computes in float64: float constants upcast, dtype literals in the graph promoted."""
    out = prog.clone()
    for name, buf in list(out.gm.named_buffers()):
        if buf.is_floating_point() and buf.dtype != torch.float64:
            out.set_const(name, buf.to(torch.float64))
    for n in out.graph.nodes:
        if n.op == "call_function":
            n.args, n.kwargs = pytree.tree_map(_promote, (n.args, n.kwargs))
    out.gm.recompile()
    return out


def to_master(prog: Program) -> None:
    """Float constants to float64 in place; their original dtypes are kept in prog.meta['dtypes']."""
    dtypes = prog.meta.setdefault("dtypes", {})
    for name, buf in list(prog.gm.named_buffers()):
        if buf.is_floating_point():
            dtypes.setdefault(name, buf.dtype)
            if buf.dtype != torch.float64:
                prog.set_const(name, buf.to(torch.float64))


def model_dtype(prog: Program) -> torch.dtype:
    counts, bufs = {}, dict(prog.gm.named_buffers())
    for name, dt in prog.meta.get("dtypes", {}).items():
        if name in bufs:
            counts[dt] = counts.get(dt, 0) + bufs[name].numel()
    return max(counts, key=counts.get) if counts else torch.float32


def finalize(prog: Program) -> None:
    """Cast every float constant back to its original dtype (new ones: the model's dtype)."""
    dtypes, default = prog.meta.get("dtypes", {}), model_dtype(prog)
    for name, buf in list(prog.gm.named_buffers()):
        if buf.is_floating_point():
            want = dtypes.get(name, default)
            if buf.dtype != want:
                prog.set_const(name, buf.to(want))
    prog.gm.recompile()


def random_inputs(examples: list, seed: int) -> list:
    """Seeded inputs like `examples`, drawn on the CPU (same values on any device), on each example's device."""
    g, out = torch.Generator().manual_seed(seed), []
    for ex in examples:
        if isinstance(ex, torch.Tensor) and ex.is_floating_point():
            out.append(torch.randn(ex.shape, generator=g, dtype=torch.float64).to(ex.device))
        elif isinstance(ex, torch.Tensor) and ex.dtype in (torch.int64, torch.int32) and ex.numel():
            lo, hi = int(ex.min()), int(ex.max())
            out.append(torch.randint(lo, hi + 1, ex.shape, generator=g, dtype=ex.dtype).to(ex.device))
        else:
            out.append(copy.deepcopy(ex))
    return out


class _Fp64(fx.Interpreter):  # computes what as_fp64's copy would, without copying the graph
    def fetch_attr(self, target):
        t = super().fetch_attr(target)
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def call_function(self, target, args, kwargs):
        return super().call_function(target, pytree.tree_map(_promote, args), pytree.tree_map(_promote, kwargs))


def outputs(prog: Program, seeds=(0, 1)) -> list[list[torch.Tensor]]:
    """Float64 outputs on the seeded inputs, per seed (kept instead of a copy of the program)."""
    with torch.no_grad():
        return [[t for t in pytree.tree_leaves(_Fp64(prog.gm).run(*random_inputs(prog.examples, s)))
                 if isinstance(t, torch.Tensor)] for s in seeds]


def compare(before: Program | list, after: Program | list, seeds=(0, 1)) -> dict:
    """max |Δ| and relative max |Δ| / max |ref| over all outputs and seeds, in float64 (each side: or its outputs)."""
    refs, got = (x if isinstance(x, list) else outputs(x, seeds) for x in (before, after))
    max_abs = ref_max = 0.0
    for ob, oa in zip(refs, got):  # outputs computed without autograd: nothing here records a graph
        if len(ob) != len(oa):
            raise CertificateError(f"output count changed: {len(ob)} -> {len(oa)}")
        for x, y in zip(ob, oa):
            if x.shape != y.shape:
                raise CertificateError(f"output shape changed: {tuple(x.shape)} -> {tuple(y.shape)}")
            if x.is_floating_point():
                max_abs = max(max_abs, (x.double() - y.double()).abs().max().item())
                ref_max = max(ref_max, x.double().abs().max().item())
            elif not torch.equal(x, y):
                raise CertificateError("an integer output changed")
    return {"max_abs": max_abs, "rel": max_abs / ref_max if ref_max else max_abs, "seeds": list(seeds),
            "inputs": "seeded random inputs shaped like the examples (ints within the examples' range)",
            "dtype": "float64"}


def certify_equal(before: Program | list, after: Program | list, tol: float, what: str) -> dict:
    cert = compare(before, after)
    cert["tolerance"] = tol
    if not cert["rel"] <= tol:
        raise CertificateError(f"{what} changed the model's function: max |Δ| = {cert['max_abs']:.3e}, "
                               f"relative {cert['rel']:.3e} > tolerance {tol:.0e}")
    return cert
