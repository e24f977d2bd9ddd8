"""The T rank programs of the shard pass run together in one process: threads, one per rank, whose
`all_reduce` sums the ranks' partial products in rank order. The shard pass's float64 certificate
(every rank's outputs equal the unsharded program's) and the tests' simulated ranks use it; real
processes are the tp driver's business (spinfx.dist.tp).
"""
from __future__ import annotations

import threading
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from spinfx.engine.certify import CertificateError, as_fp64, random_inputs
from spinfx.engine.graph import Program
from spinfx.passes.shard import shard_program
from spinfx.patterns.common import ALL_REDUCE, WAIT_TENSOR


# ---- simulated ranks ------------------------------------------------------------------------------


class _Exchange:
    def __init__(self, tp: int):
        self.tp = tp
        self.slots: list[Any] = [None] * tp
        self.barrier = threading.Barrier(tp)

    def all_reduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = x
        self.barrier.wait()
        total = self.slots[0].clone()
        for t in self.slots[1:]:
            total = total + t
        self.barrier.wait()
        return total


class _RankInterpreter(fx.Interpreter):
    def __init__(self, gm, rank: int, ex: _Exchange):
        super().__init__(gm)
        self.rank, self.ex = rank, ex

    def call_function(self, target, args, kwargs):
        if target is ALL_REDUCE:
            return self.ex.all_reduce(self.rank, args[0])
        if target is WAIT_TENSOR:
            return args[0]
        return super().call_function(target, args, kwargs)


def simulate(progs: list[Program], flat_inputs: list) -> list:
    """Run rank programs together (flat inputs, as `Program.gm` takes them); each rank's outputs."""
    ex = _Exchange(len(progs))
    outs: list[Any] = [None] * len(progs)
    errors: list[BaseException] = []

    def work(r: int) -> None:
        try:
            with torch.no_grad():
                outs[r] = _RankInterpreter(progs[r].gm, r, ex).run(*flat_inputs)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ex.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(progs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return outs


def rank_programs(prog: Program, tp: int, group: str | None = None, attention: str = "shard") -> list[Program]:
    """All T rank-local copies of `prog` (the input is not changed)."""
    out = []
    for r in range(tp):
        p = prog.clone()
        shard_program(p, tp, r, group, attention)
        out.append(p)
    return out


def certify_sharded(before: Program, tp: int, mine: Program | None = None, rank: int = 0,
                    tol: float = 1e-10, what: str = "shard", seeds=(0, 1), attention: str = "shard") -> dict:
    """All ranks (rank `rank` given as `mine`, the others built from `before`) run together in float64 on
    seeded random inputs; every rank's outputs must equal the unsharded program's."""
    progs = []
    for r in range(tp):
        if mine is not None and r == rank:
            progs.append(mine)
            continue
        p = before.clone()
        shard_program(p, tp, r, (mine.meta.get("tp", {}).get("group") if mine is not None else None), attention)
        progs.append(p)
    ref, ranks = as_fp64(before), [as_fp64(p) for p in progs]
    max_abs = ref_max = 0.0
    for s in seeds:
        xs = random_inputs(before.examples, s)
        with torch.no_grad():
            want = [t for t in pytree.tree_leaves(ref.gm(*xs)) if isinstance(t, torch.Tensor)]
        for got in simulate(ranks, xs):
            got = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
            for x, y in zip(want, got, strict=True):
                if x.shape != y.shape:
                    raise CertificateError(f"{what}: output shape changed {tuple(x.shape)} -> {tuple(y.shape)}")
                max_abs = max(max_abs, (x.double() - y.double()).abs().max().item())
                ref_max = max(ref_max, x.double().abs().max().item())
    rel = max_abs / ref_max if ref_max else max_abs
    cert = {"max_abs": max_abs, "rel": rel, "tolerance": tol, "seeds": list(seeds), "dtype": "float64",
            "ranks": tp, "reference": "the unsharded program; all ranks simulated in one process"}
    if not rel <= tol:
        raise CertificateError(f"{what} changed the model's function: relative {rel:.3e} > tolerance {tol:.0e} "
                               f"(T = {tp})")
    return cert
