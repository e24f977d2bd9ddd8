"""Tensor parallelism drivers: real gloo processes, sharded checkpoints. (The ranks simulated in one
process, and the shard pass's certificate, are spinfx.passes.shard_ranks.)

  run_ranks(fn, tp, *args)       fn(rank, tp, *args) in T processes on torch.distributed (gloo, CPU); returns
                                 each rank's result (torch.multiprocessing spawn, a rendezvous file)
  shard_checkpoint(src, out, T)  a saved checkpoint directory -> one safetensors file per rank
                                 (`model.rank00-of-04.safetensors`) + `spinfx_tp.json` (every tensor's layout,
                                 dtype and shape): consolidation needs no process group
  consolidate(dir, out)          the rank files back into the unsharded checkpoint, bit for bit

A user's command (two ranks on CPU; see README "Tensor parallel"):

    torchrun --nproc-per-node 2 -m spinfx.dist.tp smollm2 --recipe w4a16 --prompt "To be, or not"
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from spinfx.engine.errors import BadInput, SpinfxError, Unsupported
from spinfx.engine.graph import Program
from spinfx.checkpoint.read import read_safetensors
from spinfx.checkpoint.write import check_writable, save_tensors, staged_dir, write_safetensors
from spinfx.patterns.common import ALL_REDUCE

META = "spinfx_tp.json"


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


# ---- sharded checkpoints -------------------------------------------------------------------------


def rank_file(rank: int, tp: int) -> str:
    w = max(2, len(str(tp - 1)))
    return f"model.rank{rank:0{w}d}-of-{tp:0{w}d}.safetensors"


def _module_and_kind(name: str, layouts: dict) -> tuple[str | None, str]:
    module, _, kind = name.rpartition(".")
    return (module, kind) if module in layouts else (None, kind)


def shard_tensors_by_layout(tensors: dict[str, torch.Tensor], layouts: dict, tp: int) -> list[dict[str, torch.Tensor]]:
    """A checkpoint's tensors -> each rank's (layouts: module -> tp_specs.Layout; others replicated)."""
    from spinfx.kernels import tp_specs as specs

    grouped: dict[str | None, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        module, kind = _module_and_kind(name, layouts)
        if module is None:
            grouped.setdefault(None, {})[name] = t
        else:
            grouped.setdefault(module, {})[kind] = t
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for module, ts in grouped.items():
        for r in range(tp):
            if module is None:
                ranks[r].update(ts)
                continue
            try:
                local = specs.shard_tensors(layouts[module], ts, r, zp_packed=True)
            except specs.LayoutError as e:
                raise SpinfxError(f"shard {module}: {e}") from None
            ranks[r].update({f"{module}.{k}": v for k, v in local.items()})
    return ranks


def consolidate_tensors(ranks: list[dict[str, torch.Tensor]], layouts: dict) -> dict[str, torch.Tensor]:
    from spinfx.kernels import tp_specs as specs

    tp = len(ranks)
    out: dict[str, torch.Tensor] = {}
    per_module: dict[str, list[dict[str, torch.Tensor]]] = {}
    names = list(dict.fromkeys(n for r in ranks for n in r))
    for name in names:
        module, kind = _module_and_kind(name, layouts)
        if module is None:
            copies = [r[name] for r in ranks]
            for c in copies[1:]:
                if c.dtype != copies[0].dtype or c.shape != copies[0].shape or not torch.equal(c, copies[0]):
                    raise SpinfxError(f"consolidate: replicated tensor {name} differs between rank files")
            out[name] = copies[0]
        else:
            if module not in per_module:
                per_module[module] = [{} for _ in range(tp)]
            for r in range(tp):
                if name in ranks[r]:
                    per_module[module][r][kind] = ranks[r][name]
    for module, rs in per_module.items():
        try:
            full = specs.consolidate_tensors(layouts[module], rs, zp_packed=True, what=module)
        except specs.LayoutError as e:
            raise SpinfxError(f"consolidate {module}: {e}") from None
        out.update({f"{module}.{k}": v for k, v in full.items()})
    return out


def save_sharded(tensors: dict[str, torch.Tensor], layouts: dict, tp: int, out: Path,
                 extra: dict | None = None) -> list[Path]:
    """Write rank files + metadata into the existing directory `out`."""
    ranks = shard_tensors_by_layout(tensors, layouts, tp)
    files = []
    for r, ts in enumerate(ranks):
        f = out / rank_file(r, tp)
        save_tensors({k: v.contiguous() for k, v in ts.items()}, f, metadata={"tp": str(tp), "rank": str(r)})
        files.append(f)
    meta = {"format": "spinfx-tp", "version": 1, "tp": tp, "files": [f.name for f in files],
            "layouts": {m: lay.to_dict() for m, lay in sorted(layouts.items())},
            "tensors": {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                        for n, t in sorted(tensors.items())},
            **(extra or {})}
    (out / META).write_text(json.dumps(meta, indent=1))
    return files


def read_sharded(d: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    mp = d / META
    if not mp.is_file():
        raise BadInput(f"{d} has no {META}: not a spinfx tensor-parallel checkpoint")
    meta = json.loads(mp.read_text())
    ranks = []
    for f in meta["files"]:
        if not (d / f).is_file():
            raise BadInput(f"{d}: rank file {f} is missing")
        ranks.append(load_file(str(d / f)))
    return meta, ranks


def layouts_from_meta(meta: dict) -> dict:
    from spinfx.kernels.tp_specs import Layout

    return {m: Layout.from_dict(d) for m, d in meta["layouts"].items()}


def shard_checkpoint(src: Path, out: Path, tp: int, layouts: dict) -> Path:
    """An unsharded checkpoint directory -> rank files + metadata + the other files (config, tokenizer,
    reports) copied, written to a temporary sibling and renamed."""
    tensors = read_safetensors(src)
    with staged_dir(out) as tmp:
        for f in src.iterdir():
            if f.is_file() and not (f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        extra = {"unsharded_files": sorted(f.name for f in src.iterdir()
                                           if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json")}
        save_sharded(tensors, layouts, tp, tmp, extra)
    return out


def consolidate(d: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Rank files of `d` -> the unsharded checkpoint in `out` (no process group needed), checked tensor by
    tensor against the recorded dtypes and shapes."""
    d, out = Path(d), Path(out)
    if out.exists() and not force:
        raise BadInput(f"{out} exists (use --force to replace it)")
    meta, ranks = read_sharded(d)
    full = consolidate_tensors(ranks, layouts_from_meta(meta))
    want = meta["tensors"]
    if set(full) != set(want):
        missing, extra = sorted(set(want) - set(full)), sorted(set(full) - set(want))
        raise SpinfxError(f"consolidate: tensors differ from the recorded checkpoint (missing {missing[:3]}, extra {extra[:3]})")
    for n, t in full.items():
        if str(t.dtype).removeprefix("torch.") != want[n]["dtype"] or list(t.shape) != want[n]["shape"]:
            raise SpinfxError(f"consolidate: {n} came back as {t.dtype} {list(t.shape)}, recorded {want[n]}")
    with staged_dir(out) as tmp:
        for f in d.iterdir():
            if f.is_file() and f.name != META and f.name not in meta["files"]:
                shutil.copy2(f, tmp / f.name)
        write_safetensors(full, tmp)
    return out


def checkpoint_layouts(prog: Program, tp: int, attention: str = "shard") -> dict:
    """module -> Layout for a rewritten (unsharded) program, as its checkpoint names the modules."""
    from spinfx.passes.shard import plan_shard

    return plan_shard(prog, tp, attention).by_module()


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


# ---- CLI (spinfx rewrite --tp T, spinfx consolidate) -----------------------------------------------


def cmd_rewrite_tp(args) -> int:
    """`spinfx rewrite SRC --recipe R --out DIR --tp T`: the unsharded rewrite (certified, saved and
    verified as usual, into a temporary directory), then its checkpoint split by the layouts the shard
    pass reads off the rewritten graph: one safetensors file per rank + spinfx_tp.json."""
    from spinfx.api import progress
    from spinfx.tools.cli import rewrite_to_dir
    from spinfx.checkpoint.moe import expert_linears
    from spinfx.passes.shard import plan_shard

    out, T = Path(args.out), int(args.tp)
    if T < 1:
        raise BadInput(f"--tp must be a positive integer, got {T}")
    if out.exists() and not args.force:
        raise BadInput(f"{out} exists (use --force to replace it)")
    check_writable(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.unsharded.", dir=out.parent))
    try:
        result = rewrite_to_dir(args.src, args.recipe, work / "ckpt", True, getattr(args, "calib", None))
        layouts = plan_shard(result.program, T, getattr(args, "tp_attention", "shard")).by_module()
        stacked = sorted({m for m in layouts if m in expert_linears(result.source)})
        if stacked:  # the checkpoint holds them stacked [E, …] under <experts>.<w> (spinfx.checkpoint.parts)
            raise Unsupported(f"--tp: the rank files would split each expert's projection ({stacked[0]}, …), but "
                              f"the checkpoint stores the experts stacked; sharding stacked experts is not "
                              f"implemented (spinfx.rewrite with the shard pass does split them in the program)")
        progress(f"sharding the checkpoint for T = {T}: {sum(l.kind == 'column' for l in layouts.values())} "
                 f"column-parallel, {sum(l.kind == 'row' for l in layouts.values())} row-parallel linears")
        shard_checkpoint(work / "ckpt", out, T, layouts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for p in made if not out.exists() else ():  # parents this call created, left empty by a failure
            with contextlib.suppress(OSError):
                p.rmdir()
    files = sorted(f.name for f in out.glob("*.safetensors"))
    mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    if getattr(args, "json", False):
        print(json.dumps({"out": str(out), "tp": T, "files": files, "size_mb": round(mb, 3),
                          "report": result.report.to_dict()}, default=str))
    else:
        print(result.report.to_text(), end="")
        print(f"\nwrote {out}: {len(files)} rank files ({mb:.1f} MB) + {META}")
    return 0


def cmd_consolidate(args) -> int:
    out = consolidate(args.dir, args.out, force=args.force)
    print(f"wrote {out} (the unsharded checkpoint)")
    return 0


# ---- torchrun entry point: greedy generation with T ranks --------------------------------------------


def generate_main(argv: list[str] | None = None) -> int:
    """torchrun --nproc-per-node T -m spinfx.dist.tp SRC [--recipe R] [--prompt TEXT] [--tokens N]

    Every rank loads SRC, rewrites it with the recipe + `shard` for its rank (one process group, gloo
    on CPU, from torchrun's environment), and decodes greedily. The program is traced once for a
    window of prompt + N tokens; causal attention makes the logits at position t independent of the
    (padding) tokens after it, so each step runs the window and reads position t. Rank 0 prints."""
    import argparse

    import torch.distributed as dist

    from spinfx.api import rewrite
    from spinfx.checkpoint.hf import load_model
    from spinfx.passes.shard import Shard
    from spinfx.recipe import Recipe, load_recipe

    p = argparse.ArgumentParser(prog="python -m spinfx.dist.tp")
    p.add_argument("src", help="an HF model directory, or 'smollm2'")
    p.add_argument("--recipe", default=None, help="a preset or YAML recipe run before sharding (default: none)")
    p.add_argument("--prompt", default="To be, or not to be,")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--attention", choices=("shard", "replicate"), default="shard")
    args = p.parse_args(argv)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, T = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // T))
    model, tok = load_model(args.src)
    if tok is None:
        raise BadInput(f"{args.src} has no tokenizer")
    prompt = tok(args.prompt, return_tensors="pt").input_ids
    n0 = prompt.shape[1]
    ids = torch.full((1, n0 + args.tokens), tok.pad_token_id or 0, dtype=torch.long)
    ids[:, :n0] = prompt
    passes = list(load_recipe(args.recipe).passes) if args.recipe else []
    recipe = Recipe(f"{args.recipe or 'none'}+tp{T}", passes + [Shard(tp=T, rank=rank, attention=args.attention)])
    r = rewrite(model, recipe, ((), {"input_ids": ids, "use_cache": False}), certify=rank == 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(n0, n0 + args.tokens):
            logits = r.module(input_ids=ids, use_cache=False).logits
            ids[0, t] = int(logits[0, t - 1].argmax())
    dt = time.perf_counter() - t0
    if rank == 0:
        print(tok.decode(ids[0]))
        print(f"[spinfx] T = {T}: {args.tokens} tokens in {dt:.2f} s (window {ids.shape[1]}, no KV cache)",
              file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
