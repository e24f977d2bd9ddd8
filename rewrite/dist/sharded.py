"""Sharded checkpoints: one safetensors file per rank, and back.

  shard_checkpoint(src, out, T)  a saved checkpoint directory -> one safetensors file per rank
                                 (`model.rank00-of-04.safetensors`) + `spinfx_tp.json` (every tensor's layout,
                                 dtype and shape): consolidation needs no process group
  consolidate(dir, out)          the rank files back into the unsharded checkpoint, bit for bit
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from spinfx.checkpoint.read import read_safetensors
from spinfx.checkpoint.write import save_tensors, staged_dir, write_safetensors
from spinfx.engine.errors import BadInput, SpinfxError
from spinfx.engine.graph import Program

META = "spinfx_tp.json"


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
    from spinfx.passes.shard_plan import plan_shard

    return plan_shard(prog, tp, attention).by_module()
