"""Real tensor-parallel ranks: gloo processes on CPU. (The ranks simulated in one process, and the shard
pass's certificate, are spinfx.passes.shard_ranks.)

  run_ranks(fn, tp, *args)   fn(rank, tp, *args) in T processes on torch.distributed (gloo, CPU); returns
                             each rank's result (torch.multiprocessing spawn, a rendezvous file)
  zoo_jobs(rank, tp, jobs)   a worker for run_ranks: zoo models (or SmolLM2) rewritten with the shard pass
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Callable

import torch

from spinfx.engine.errors import SpinfxError
from spinfx.patterns.common import ALL_REDUCE


# ---- real processes ------------------------------------------------------------------------------


def _worker(rank: int, tp: int, init: str, fn: Callable, args: tuple, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=tp)
    try:
        out = fn(rank, tp, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles that die with this process
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - sent to the parent as one line
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn: Callable, tp: int, *args, timeout: float = 600) -> list:
    """fn(rank, tp, *args) in `tp` spawned processes joined in one gloo process group (CPU). `fn` must be
    importable (a module-level function); its return values come back in rank order."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/rendezvous"
        procs = [ctx.Process(target=_worker, args=(r, tp, init, fn, args, results)) for r in range(tp)]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        while len(got) + len(errors) < tp:
            if not results.empty():
                rank, status, out = results.get()
                if status == "ok":
                    got[rank] = torch.load(io.BytesIO(out), weights_only=False)
                else:
                    errors.append(f"rank {rank}: {out}")
                continue
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                why = (f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]}" if dead
                       else f"no answer in {timeout:.0f} s")
                raise SpinfxError(f"tensor-parallel run failed: {why}" + (f"; {'; '.join(errors)}" if errors else ""))
            time.sleep(0.05)
        for p in procs:
            p.join(timeout)
    if errors:
        raise SpinfxError("tensor-parallel run failed: " + "; ".join(errors))
    return [got[r] for r in range(tp)]


# ---- workers (module level: spawned processes import them) ---------------------------------------


def zoo_jobs(rank: int, tp: int, jobs: list[dict]) -> list[dict]:
    """For each job {name, passes, compile, layers, dtype, attention, after}: the zoo model rewritten with
    `passes` + the shard pass for this rank (+ `after`), run on the zoo's example input (eager, or
    torch.compile(backend="spinfx")): {"logits": ...}; rank 0 also runs the unsharded rewrite the same
    way ({"reference": ...}) after its sharded run."""
    from spinfx.testing import zoo
    from spinfx.passes.shard import Shard
    from spinfx.recipe import Recipe

    out = []
    for job in jobs:
        zm = (_smollm2(job.get("dtype", torch.float64), job.get("seq", 16), job.get("layers")) if job["name"] == "smollm2"
              else zoo.build(job["name"], layers=job.get("layers", 2), dtype=job.get("dtype", torch.float64)))
        passes = list(job.get("passes", []))
        shard = Shard(tp=tp, rank=rank, check=False, attention=job.get("attention", "shard"))
        logits, reduces = _run_zoo(zm, Recipe(f"tp{tp}", passes + [shard] + list(job.get("after", []))), job)
        res = {"logits": logits, "all_reduces": reduces}
        if rank == 0:
            res["reference"] = _run_zoo(zm, Recipe("unsharded", passes + list(job.get("after", []))), job)[0]
        out.append(res)
    return out


def _smollm2(dtype: torch.dtype, seq: int, layers: int | None = None):
    """SmolLM2 (real weights, from the spinfx cache) shaped like a zoo model: .model, .example_inputs;
    `layers`: keep only the first decoder layers (memory, when many ranks share one machine)."""
    from types import SimpleNamespace

    from spinfx.api import default_inputs
    from spinfx.checkpoint.hf import load_model

    model, _ = load_model("smollm2")
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model = model.to(dtype).eval()
    return SimpleNamespace(model=model, example_inputs=default_inputs(model, seq)[1])


def _run_zoo(zm, recipe, job) -> tuple[dict, int]:
    """({"model": logits, "fp64": logits in float64 semantics (eager only)}, all_reduce nodes in what
    ran: the rewritten program, or the compiled graphs)."""
    from spinfx.api import rewrite

    with torch.no_grad():
        if job.get("compile"):
            import torch._dynamo as dynamo

            from spinfx.backend import clear_cache, reports

            dynamo.reset()
            clear_cache()
            model = torch.compile(zm.model, backend="spinfx", options={"recipe": recipe})
            logits = model(**zm.example_inputs).logits
            shards = [p for rec in reports() if rec.report is not None for p in rec.report.passes if p.name == "shard"]
            return {"model": logits}, sum(p.findings.get("counts", {}).get("row", 0) for p in shards)
        r = rewrite(zm.model, recipe, zm.example_inputs, certify=job.get("certify", False))
        reduces = sum(n.target is ALL_REDUCE for n in r.program.graph.nodes)
        from spinfx.engine.certify import as_fp64

        # and in float64 semantics: HF's float32 casts around norms promoted (as certificates run)
        fp64 = as_fp64(r.program)(**zm.example_inputs).logits
        return {"model": r.module(**zm.example_inputs).logits, "fp64": fp64}, reduces
