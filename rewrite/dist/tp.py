"""Tensor parallelism as a user runs it: `spinfx rewrite --tp T` (the rewritten checkpoint split into
rank files, spinfx.dist.sharded), `spinfx consolidate`, and greedy generation with T ranks under torchrun:

    torchrun --nproc-per-node 2 -m spinfx.dist.tp smollm2 --recipe w4a16 --prompt "To be, or not"

(real processes for tests and benchmarks: spinfx.dist.ranks; simulated ranks: spinfx.passes.shard_ranks)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from spinfx.checkpoint.write import check_writable
from spinfx.dist.sharded import META, consolidate, shard_checkpoint
from spinfx.engine.errors import BadInput, Unsupported


# ---- CLI (spinfx rewrite --tp T, spinfx consolidate) -----------------------------------------------


def cmd_rewrite_tp(args) -> int:
    """`spinfx rewrite SRC --recipe R --out DIR --tp T`: the unsharded rewrite (certified, saved and
    verified as usual, into a temporary directory), then its checkpoint split by the layouts the shard
    pass reads off the rewritten graph: one safetensors file per rank + spinfx_tp.json."""
    from spinfx.api import progress
    from spinfx.tools.cli import rewrite_to_dir
    from spinfx.checkpoint.moe import expert_linears
    from spinfx.passes.shard_plan import plan_shard

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
