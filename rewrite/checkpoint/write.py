"""Checkpoint out (`Result.save`, `spinfx rewrite --out`): the parts (spinfx.checkpoint.parts) written
as a Hugging Face directory, plus tokenizer files, `spinfx_report.json` and `report.html`.

Everything is written to a temporary sibling directory, then *verified* — loaded back with `load` and
run on the program's example input, its logits compared with the program's — and only then renamed
into place. A rewrite the model class cannot express (an op with no module-level home, a norm changed
beyond its scale) is refused with `Unsupported`, never written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from spinfx.checkpoint.parts import BASE_TYPE_KEY, GUARD_TYPE, Parts, checkpoint_parts, quantization_config
from spinfx.engine.errors import BadInput, Unsupported

MAX_SHARD = 5 * 1024**3  # bytes per safetensors shard
_VERIFY_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative max |Δ| of the logits; else 2e-2


# ---- writing --------------------------------------------------------------------------------------


def save(result, out: str | os.PathLike, force: bool = False, progress=None) -> Path:
    """Write `result` as a checkpoint directory (see the module docstring); returns its path."""
    out = Path(out).expanduser()
    log = progress or (lambda msg: None)
    if out.exists() and not force:
        raise BadInput(f"{out} exists (use --force to replace it)")
    src_dir = result.source_dir
    if src_dir is not None and out.resolve() == Path(src_dir).resolve():
        raise BadInput(f"{out} is the source directory; the source is never modified")
    parts = checkpoint_parts(result)
    with staged_dir(out) as tmp:
        log(f"writing {len(parts.tensors)} tensors to {out} …")
        _write(result, parts, tmp)
        log("verifying the checkpoint: loading it back and comparing logits …")
        result.report.extra["checkpoint"] = verify(result, tmp, quantized=bool(parts.quant_groups))
        result.report.extra["checkpoint"]["notes"] = parts.notes
        _write_reports(result, tmp)
    return out


def check_writable(out: Path) -> None:
    """`out` can be created: its nearest existing ancestor is a directory we may create entries in
    (tried, with an empty temporary directory, removed at once). Otherwise one BadInput naming `out`
    and why — checked before long work starts."""
    out = Path(out).expanduser().absolute()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"cannot write {out}: {os.strerror(errno.ENOTDIR)} ({parent})")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise unwritable(out, e) from None


def unwritable(out: Path, e: OSError) -> BadInput:
    """An OSError met while writing `out` (read-only, full disk, …), as the user's one line."""
    return BadInput(f"cannot write {out}: {e.strerror or e}; nothing was written")


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield an empty sibling directory of `out` to write into; when the block ends normally it replaces
    `out` (an existing one is moved aside first, then removed), otherwise it is removed, and so are the
    parent directories it created: a failure never leaves a half-written `out`. An OSError on the way
    (a read-only location, a full disk) is a BadInput naming `out`."""
    check_writable(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    done, tmp = False, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / out.name)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        done = True
    except OSError as e:
        raise unwritable(out, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for p in made:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if still empty


def _write(result, parts: Parts, tmp: Path) -> None:
    from spinfx.checkpoint.hf import copy_tokenizer_files

    source = result.source
    linears = sorted(name for name, m in source.named_modules() if isinstance(m, torch.nn.Linear))
    write_config(source.config, parts, linears, tmp)
    write_safetensors(parts.tensors, tmp)
    if result.source_dir is not None:
        copy_tokenizer_files(result.source_dir, tmp)


def write_config(source_config, parts: Parts, linears: list[str], tmp: Path) -> None:
    """config.json: the source's config with `parts.config`'s changes and the quantization_config over
    `linears` (every nn.Linear module name of the model)."""
    config = source_config.__class__.from_dict(source_config.to_dict())
    for k, v in parts.config.items():
        setattr(config, k, v)
    qc = quantization_config(parts, linears)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if qc is not None:
        config.quantization_config = qc
    config.save_pretrained(tmp)
    if parts.transforms or parts.fake_quantized or parts.stacked_quantized:  # see GUARD_TYPE and _act_args
        data = json.loads((tmp / "config.json").read_text())
        data[BASE_TYPE_KEY], data["model_type"] = data["model_type"], GUARD_TYPE
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard: int = MAX_SHARD) -> list[str]:
    """`model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard` bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # safetensors refuses views and shared storage: every tensor gets its own contiguous copy
    own = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(own, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard)
    umask = os.umask(0)
    os.umask(umask)
    for file, names in split.filename_to_tensors.items():
        save_tensors({k: own[k] for k in names}, out / file, metadata={"format": "pt"})
        os.chmod(out / file, 0o666 & ~umask)  # safetensors creates files private (0600)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in own.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sorted(split.filename_to_tensors)


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, its I/O failures (a full disk, …) raised as the OSError they are
    (safetensors reports them as its own error type: "… I/O error: … (os error 28) …")."""
    import safetensors.torch

    try:
        safetensors.torch.save_file(tensors, str(file), metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from e


def _write_reports(result, tmp: Path) -> None:
    from spinfx.tools.report_html import write_html

    data = result.report.to_dict()
    (tmp / "spinfx_report.json").write_text(json.dumps(data, indent=1, default=str))
    write_html(result, tmp / "report.html")


@torch.no_grad()
def verify(result, path: Path, quantized: bool = False) -> dict:
    """Load the checkpoint at `path` and compare its logits with the program's on the example input.
    Quantized linears compute in the program's activation dtype (`cpu_compute_dtype=None`), unfused: what is
    checked is the checkpoint, not the bf16 CPU kernels (tests/test_qlinear.py bounds those). bf16's
    rounding here once said more about the kernels than about the checkpoint: SmolLM2 under a data-free
    W4 + 8-bit lm_head recipe, logits 2.2 % off in bf16 and identical in fp32; a mixture's top-k routing
    flipped by a near-tie between two experts' router logits (Granite-MoE: 0.2603 vs 0.2630)."""
    from spinfx.checkpoint.read import load

    prog = result.program
    ids = [e for e in prog.examples if isinstance(e, torch.Tensor) and not e.is_floating_point()]
    if len(prog.examples) != 1 or not ids:
        raise Unsupported("save: only programs traced from input_ids alone are written as checkpoints")
    ref = prog.gm(*prog.examples)[0]
    # unfused: sibling fusion is a runtime layout, checked bit-identical per group where it is built (its
    # detection forward dequantizes every weight on this path: 22 of SmolLM2's 25 s of loading)
    got = load(path, cpu_compute_dtype=None, fuse=False)(input_ids=ids[0], use_cache=False).logits
    err = (got.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    # bit for bit the program on the zoo and on SmolLM2's 16-token examples; the bound stays for quantized
    # checkpoints: one float ulp between the model class and the graph may move a value across a rounding
    # boundary of a 4-bit grid (activations, KV).
    tol = 2e-2 if quantized else _VERIFY_TOL.get(ref.dtype, 2e-2)
    if not rel <= tol:
        raise Unsupported(f"save: the model class loaded from the checkpoint does not compute the rewritten "
                          f"program (max |Δ logits| {err:.3e}, relative {rel:.2e} > {tol:.0e}); this rewrite "
                          f"cannot be expressed as a {result.source.config.model_type} checkpoint")
    return {"verified": True, "max_abs": err, "rel": rel, "tolerance": tol}
