"""Checkpoint out (`Result.save`, `spinfx rewrite --out`) and back in (`spinfx.load`).

A checkpoint is the source model's Hugging Face directory with the rewritten weights:

* `model.safetensors` (sharded with an index past `MAX_SHARD`): the program's constants under their
  names, which are the source's state-dict names. A norm scale that a rewrite folded away is no
  longer read by the program; it is written as the neutral value of its role in the norm (the norm
  patterns' captures: `gamma` → 1, `gamma1p` (Gemma's 1+w) → 0, `beta` → 0), so the model class
  computes the same function. An lm_head untied from the embedding sets `tie_word_embeddings: false`.
* quantized linears (`spinfx::qlinear` nodes) and a quantized token embedding (`spinfx::qembedding`) in
  compressed-tensors `pack-quantized` form (`QuantWeight.to_compressed_tensors()`; an embedding table
  [V, D] is stored like a linear's weight [N, K], one row per token) with a `quantization_config` (one
  config group per weight scheme, explicit module names as targets — the embedding module among them —,
  the other linears in `ignore`). A tied lm_head reading the quantized embedding table is stored once,
  under the embedding: `tie_word_embeddings` stays true and the lm_head is neither a target nor ignored;
* online ops (R3/R4 Hadamards, an online R1 for a kept tied embedding) in `quantization_config.
  transform_config`, in compressed-tensors' TransformConfig schema: one group per transform with its
  `apply` targets (module names) and `location` — `input`/`output` of a module, `q_attn`/`k_cache`
  at attention. Their types are `spinfx-hadamard` (the `spinfx::hadamard` transform of size
  `head_dim`) and `spinfx-matrix` (x @ the matrix stored under the group's name). Other clients do
  not know these types and refuse the checkpoint instead of silently dropping the rotation.
* tokenizer files copied from the source directory, `spinfx_report.json`, `report.html`.

Everything is written to a temporary sibling directory, then *verified* — loaded back with `load` and
run on the program's example input, its logits compared with the program's — and only then renamed
into place. A rewrite the model class cannot express (an op with no module-level home, a norm changed
beyond its scale) is refused with `Unsupported`, never written.

`load(dir)` builds the model class from `config.json` with transformers (plain checkpoints load
exactly as transformers loads them), swaps quantized linears for `spinfx.kernels.qlinear.QLinear` and a
quantized embedding for `spinfx.kernels.qembedding.QEmbedding` (a tied lm_head: a `QLinear` over the
same codes and scales), fuses sibling quantized linears (q/k/v, gate/up: one packed `FusedQLinear`
each, bit-identical; `load(dir, fuse=False)` keeps them separate), and re-attaches each online transform
at its recorded site: forward pre-hooks / hooks for module inputs / outputs, and for R3 an attention
function (`spinfx_sdpa`) rotating q, with the keys rotated once as they enter the KV cache (so a cache
filled by such a model holds rotated keys; `_KeysRotatedOnWrite`). It is the model class
itself: `generate` and every KV cache work (the rewritten `Result.module` is traced for one input
signature and does not).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from spinfx.errors import BadInput, Unsupported

MAX_SHARD = 5 * 1024**3  # bytes per safetensors shard
NEUTRAL = {"gamma": 1.0, "gamma1p": 0.0, "beta": 0.0}  # norm-pattern capture -> value that does nothing
HADAMARD, MATRIX = "spinfx-hadamard", "spinfx-matrix"
ATTENTION_IMPL = "spinfx_sdpa"
# transformers ignores `transform_config` (and skips unknown quantization methods with a warning): a
# checkpoint with online transforms would load there silently computing something else. Its config's
# `model_type` is therefore `spinfx`, which every other client refuses, with the model class's type
# kept under BASE_TYPE_KEY for `load`.
GUARD_TYPE, BASE_TYPE_KEY = "spinfx", "spinfx_model_type"
_VERIFY_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative max |Δ| of the logits; else 2e-2
aten = torch.ops.aten


# ---- what the program holds, as checkpoint parts ------------------------------------------------


@dataclass
class Parts:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)         # changes to the source config
    quant_groups: dict[tuple, list[str]] = field(default_factory=dict)  # weight scheme -> modules
    tied: dict[str, str] = field(default_factory=dict)           # module reading a quantized table -> its owner
    transforms: dict[str, dict] = field(default_factory=dict)    # transform_config config_groups
    notes: list[str] = field(default_factory=list)


def checkpoint_parts(result) -> Parts:
    """The tensors and config entries of `result` as a checkpoint of its source model."""
    prog, source = result.program, result.source
    if source is None or getattr(source, "config", None) is None:
        raise BadInput("saving needs the source to be a Hugging Face model (it has no config)")
    parts = Parts()
    live = {n.target for n in prog.graph.nodes if n.op == "get_attr"}
    quantized = _quantized(prog, parts)
    for n in prog.graph.nodes:
        if _is_online(n):
            _record_transform(n, parts)
    state = source.state_dict()
    buffers = dict(source.named_buffers())
    for name in sorted(live):
        if _belongs_to(name, quantized) and name not in state:
            continue  # the quantized layer's runtime tensors: its compressed-tensors form is written instead
        if name in state or name.startswith("spinfx."):  # spinfx.*: online matrices
            parts.tensors[name] = prog.const(name)
        elif name in buffers and _same(buffers[name], prog.const(name)):
            continue  # a non-persistent buffer (rotary inv_freq) the model class rebuilds
        else:
            raise Unsupported(f"save: the rewritten program reads {name}, which {type(source).__name__} has no "
                              f"parameter for; the model class cannot express this rewrite")
    neutral = _neutral_values(result.report)
    # tensors the source shares (a tied lm_head): kept tied if the program still reads one of them
    shared: dict[tuple, list[str]] = {}
    for key, v in state.items():
        shared.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(key)
    tied_to = {k: ks for ks in shared.values() if len(ks) > 1 for k in ks}
    for key, value in state.items():
        if key in parts.tensors or _belongs_to(key, quantized):
            continue
        if any(k in live for k in tied_to.get(key, ())):
            continue  # the model class ties it on load
        if key in neutral:
            parts.tensors[key] = torch.full_like(value, neutral[key])
            continue
        raise Unsupported(f"save: {key} is no longer read by the rewritten program and is not a folded norm "
                          f"scale; the model class cannot express this rewrite")
    own = quantized - set(parts.tied)  # modules storing their own quantized tensors

    def stored(k: str) -> bool:
        return k in live or _belongs_to(k, own)

    if any(sum(stored(k) for k in ks) > 1 for ks in shared.values()):
        parts.config["tie_word_embeddings"] = False
        parts.notes.append("the lm_head was untied from the embedding: tie_word_embeddings = false")
    return parts


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype), b)


def _neutral_values(report) -> dict[str, float]:
    """FQN -> neutral value for every norm scale/shift a fold rule captured."""
    out = {}
    for p in report.passes:
        for r in p.rules:
            for m in r.found:
                for cap, value in NEUTRAL.items():
                    node = m.captures.get(cap)
                    if isinstance(node, fx.Node) and node.op == "get_attr":
                        out[node.target] = value
    return out


def _belongs_to(key: str, modules: set[str]) -> bool:
    return key.rsplit(".", 1)[0] in modules


# ---- quantized linears ----------------------------------------------------------------------------


def _quantized(prog, parts: Parts) -> set[str]:
    """Record every weight the quantize pass replaced (`prog.meta["quant"]`: module -> QuantLayer) in
    compressed-tensors form; returns their module names."""
    layers = prog.meta.get("quant", {})
    for module, layer in layers.items():
        if layer.input_bits:
            raise Unsupported(f"save: {module} quantizes its input activations to {layer.input_bits} bits; "
                              f"activation quantization has no checkpoint form here yet")
        qw = layer.weight
        for name, t in qw.to_compressed_tensors().items():
            parts.tensors[f"{module}.{name}"] = t
        scheme = (qw.bits, qw.group_size, qw.symmetric, qw.weight_g_idx is not None)
        parts.quant_groups.setdefault(scheme, []).append(module)
        for reader in layer.tied:
            parts.tied[reader] = module
            parts.notes.append(f"{reader} reads the quantized table of {module} (tied): stored once")
    return set(layers) | set(parts.tied)


def quantization_config(parts: Parts, linears: list[str]) -> dict | None:
    """compressed-tensors `quantization_config` (pack-quantized) and/or the transform_config."""
    if not parts.quant_groups and not parts.transforms:
        return None
    groups = {}
    for i, ((bits, gs, sym, act), modules) in enumerate(sorted(parts.quant_groups.items(), key=str)):
        groups[f"group_{i}"] = {
            "targets": sorted(modules),
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if gs is None
                        else "group", "group_size": gs, "dynamic": False, "actorder": "group" if act else None,
                        "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    quantized = {m for ms in parts.quant_groups.values() for m in ms} | set(parts.tied)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized" if groups else "dense",
          "quantization_status": "compressed", "config_groups": groups,
          "ignore": sorted(m for m in linears if m not in quantized) if groups else [],
          "kv_cache_scheme": None, "sparsity_config": {}}
    if parts.transforms:
        qc["transform_config"] = {"config_groups": parts.transforms}
    return qc


# ---- online transforms --------------------------------------------------------------------------


def _is_online(n: fx.Node) -> bool:
    import spinfx.kernels.hadamard  # noqa: F401  (registers torch.ops.spinfx.hadamard)

    return n.op == "call_function" and (n.target is torch.ops.spinfx.hadamard.default or bool(_matrix_names(n)))


def _matrix_names(n: fx.Node) -> list[str]:
    """An online matrix: aten.matmul(x, get_attr spinfx.*)."""
    if n.op == "call_function" and n.target is aten.matmul.default:
        w = n.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).startswith("spinfx."):
            return [w.target]
    return []


# ops that carry a value to attention unchanged in content (layout, GQA repeat, casts)
_PASS_THROUGH = {aten.reshape.default, aten.view.default, aten.expand.default, aten.transpose.int,
                 aten.permute.default, aten.unsqueeze.default, aten.clone.default, aten._to_copy.default,
                 aten.contiguous.default, aten.slice.Tensor}


def _site(n: fx.Node) -> tuple[str, str]:
    """(module, location) where the online op `n` acts, as a module-level site (or Unsupported)."""
    from spinfx.match import describe

    values, todo, attention = {n}, [n], []
    while todo:  # q/k at attention: n reaches scaled_dot_product_attention's q or k through layout ops
        for u in todo.pop().users:
            if u.target is aten.scaled_dot_product_attention.default:
                attention.append(u)
            elif u.target in _PASS_THROUGH and u not in values:
                values.add(u)
                todo.append(u)
    for a in attention:
        for i, loc in ((0, "q_attn"), (1, "k_cache")):
            if a.args[i] in values:
                return a.meta.get("module", ""), loc
    users = {u.meta.get("module", "") for u in n.users}
    src = n.args[0].meta.get("module", "")
    if len(users) == 1 and next(iter(users)) not in ("", src):
        return next(iter(users)), "input"
    if src and src not in users:
        return src, "output"
    raise Unsupported(f"save: the online op {describe(n)} has no module-level site (input of one module, "
                      f"output of one, or q/k at attention)")


def _record_transform(n: fx.Node, parts: Parts) -> None:
    from spinfx.kernels.hadamard_matrices import plan

    module, location = _site(n)
    size = n.args[0].meta["val"].shape[-1]
    if _matrix_names(n):
        key, kind = _matrix_names(n)[0], MATRIX
    else:
        _, ks, block, transpose = (list(n.args) + [False])[:4]
        p = plan(size)
        if (list(p.ks), p.block, bool(transpose)) != (list(ks), block, False):
            raise Unsupported(f"save: a Hadamard of size {size} with factors {ks}/{block} is not the standard "
                              f"plan {list(p.ks)}/{p.block}; it cannot be recorded by size")
        key, kind = f"hadamard-{location}-{size}", HADAMARD
    group = parts.transforms.setdefault(key, {"type": kind, "apply": [], "randomize": False,
                                              "requires_grad": False, "head_dim": size, "precision": "float32"})
    for a in group["apply"]:
        if a["location"] == location:
            if module not in a["targets"]:
                a["targets"].append(module)
            return
    group["apply"].append({"targets": [module], "location": location, "inverse": False, "ignore": []})


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


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield an empty sibling directory of `out` to write into; when the block ends normally it replaces
    `out` (an existing one is moved aside first, then removed), otherwise it is removed: a failure
    never leaves a half-written `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / out.name)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(result, parts: Parts, tmp: Path) -> None:
    from spinfx.hf import copy_tokenizer_files

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
    if parts.transforms:  # see GUARD_TYPE
        data = json.loads((tmp / "config.json").read_text())
        data[BASE_TYPE_KEY], data["model_type"] = data["model_type"], GUARD_TYPE
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard: int = MAX_SHARD) -> list[str]:
    """`model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard` bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: every tensor gets its own contiguous copy
    own = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(own, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard)
    umask = os.umask(0)
    os.umask(umask)
    for file, names in split.filename_to_tensors.items():
        save_file({k: own[k] for k in names}, out / file, metadata={"format": "pt"})
        os.chmod(out / file, 0o666 & ~umask)  # safetensors creates files private (0600)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in own.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sorted(split.filename_to_tensors)


def _write_reports(result, tmp: Path) -> None:
    from spinfx.report_html import write_html

    data = result.report.to_dict()
    (tmp / "spinfx_report.json").write_text(json.dumps(data, indent=1, default=str))
    write_html(result, tmp / "report.html")


@torch.no_grad()
def verify(result, path: Path, quantized: bool = False) -> dict:
    """Load the checkpoint at `path` and compare its logits with the program's on the example input."""
    prog = result.program
    ids = [e for e in prog.examples if isinstance(e, torch.Tensor) and not e.is_floating_point()]
    if len(prog.examples) != 1 or not ids:
        raise Unsupported("save: only programs traced from input_ids alone are written as checkpoints")
    ref = prog.gm(*prog.examples)[0]
    got = load(path)(input_ids=ids[0], use_cache=False).logits
    err = (got.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    # quantized linears load as QLinear, whose CPU fast paths round activations to bf16 (kernels/qlinear)
    tol = 2e-2 if quantized else _VERIFY_TOL.get(ref.dtype, 2e-2)
    if not rel <= tol:
        raise Unsupported(f"save: the model class loaded from the checkpoint does not compute the rewritten "
                          f"program (max |Δ logits| {err:.3e}, relative {rel:.2e} > {tol:.0e}); this rewrite "
                          f"cannot be expressed as a {result.source.config.model_type} checkpoint")
    return {"verified": True, "max_abs": err, "rel": rel, "tolerance": tol}


# ---- reading --------------------------------------------------------------------------------------


def load(path: str | os.PathLike, fuse: bool = True) -> torch.nn.Module:
    """A checkpoint directory (any HF model dir, or one written by `save`) as a runnable model; `fuse`:
    sibling quantized linears (q/k/v, gate/up) run as one packed linear each (`fuse_siblings`)."""
    from spinfx.hf import _transformers, attention_impl, load_model, resolve_source

    path = resolve_source(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if not qc:
        return load_model(path)[0]
    if qc.get("quant_method") != "compressed-tensors":
        raise BadInput(f"{path}: quantization method {qc.get('quant_method')!r} is not compressed-tensors")
    tf = _transformers()
    tf.utils.logging.disable_progress_bar()
    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type", BASE_TYPE_KEY)}
    cfg = tf.AutoConfig.for_model(config.get(BASE_TYPE_KEY, config["model_type"]), **fields)
    dtype = getattr(cfg, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attention_impl(cfg), dtype=dtype)
    tensors = read_safetensors(path)
    weights: dict[str, Any] = {}  # quantized module -> its QuantWeight, for fuse_siblings
    for group in qc.get("config_groups", {}).values():
        weights |= _swap_quantized(model, group, tensors)
    swapped = set(weights)
    transforms = (qc.get("transform_config") or {}).get("config_groups", {})
    matrices = {k: tensors.pop(k) for k in transforms if k in tensors}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if cfg.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not _belongs_to(k, swapped)]
    if missing or unexpected:
        raise BadInput(f"{path}: weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        _tie(model)
    model.eval()
    if fuse:  # before the transforms: their hooks then sit on the slices, at the siblings' names
        inputs = {t for g in transforms.values() for a in g["apply"] if a["location"] == "input" for t in a["targets"]}
        fuse_siblings(model, {k: w for k, w in weights.items() if k not in inputs})
    attach_transforms(model, transforms, matrices)
    return model


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tie(model: torch.nn.Module) -> None:
    """The lm_head reads the embedding's matrix: transformers' tie, or, for a quantized table, a QLinear
    over the same codes and scales (per-row table = per-channel linear: the same QuantWeight)."""
    from spinfx.kernels.qembedding import QEmbedding
    from spinfx.kernels.qlinear import QLinear

    emb = model.get_input_embeddings()
    if not isinstance(emb, QEmbedding):
        model.tie_weights()
        return
    if model.get_output_embeddings() is None:
        raise BadInput(f"{type(model).__name__} ties its embeddings but has no output embedding to read the table")
    model.set_output_embeddings(QLinear(emb.quant_weight()))


def _swap_quantized(model: torch.nn.Module, group: dict, tensors: dict) -> dict[str, Any]:
    """Replace the group's targets by QLinear modules (QEmbedding for an nn.Embedding) built from their
    tensors (popped); returns target -> its QuantWeight."""
    from spinfx.kernels.qembedding import QEmbedding
    from spinfx.kernels.qlinear import QLinear
    from spinfx.kernels.quant_weight import QuantWeight

    w = group["weights"]
    gs = None if w.get("strategy") == "channel" else w.get("group_size")
    out = {}
    for name in group["targets"]:
        mine = {k.removeprefix(f"{name}."): tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == name}
        qw = QuantWeight.from_compressed_tensors(mine, bits=w["num_bits"], group_size=gs)
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        old = model.get_submodule(name)
        if isinstance(old, torch.nn.Embedding):
            # an embedding class that scales its rows (transformers' *ScaledWordEmbedding) keeps its scale
            scale = getattr(old, "embed_scale", None)
            new = QEmbedding(qw, None if scale is None else float(scale))
        else:
            new = QLinear(qw)
        setattr(model.get_submodule(parent), leaf, new)
        out[name] = qw
    return out


def fuse_siblings(model: torch.nn.Module, weights: dict[str, Any]) -> list[list[str]]:
    """Sibling quantized linears become one `FusedQLinear` each (q/k/v: one packed linear split by the
    GQA sizes; gate/up likewise), each sibling a `QLinearSlice` at its own name: its hooks, state-dict
    place and the model class's calls (self.q_proj(x), …) stay as they were. Returns the fused groups.

    Siblings are found by structure, not names: QLinears (those in `weights`, name -> QuantWeight) that
    receive the very same input tensor in one forward on a 2-token input, their pre-hooks recording it.
    The recorded inputs are kept alive during that forward, so no tensor's identity is reused. (The
    module tree alone cannot tell: o_proj is the attention module's child too, often with the same
    in_features, but reads attention's output.) A module with a forward pre-hook of its own (an input
    transform: the caller leaves those out of `weights`) is never fused, and a group whose fused
    runtime tensors would not be exactly the siblings' concatenated (schemes differ, or the kernel
    choice depends on N) stays separate (`FusedQLinear.build` returns None). The checkpoint is not
    touched: it keeps separate q/k/v tensors."""
    from spinfx.kernels.qlinear import FusedQLinear, QLinear, QLinearSlice

    candidates = {name: m for name, m in model.named_modules()
                  if name in weights and isinstance(m, QLinear) and not m._forward_pre_hooks}
    if len(candidates) < 2:
        return []
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args) -> None:
            inputs.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in candidates.items()]
    try:
        device = next(iter([*model.parameters(), *model.buffers()])).device
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, x in inputs.items():  # call order
        groups.setdefault(id(x), []).append(name)
    del inputs
    fused_groups = []
    for names in groups.values():
        fused = FusedQLinear.build([candidates[n] for n in names], [weights[n] for n in names]) if len(names) > 1 else None
        if fused is None:
            continue
        prefix = os.path.commonprefix([n.split(".") for n in names])
        parent = model.get_submodule(".".join(prefix))
        parent.add_module(f"spinfx_fused_{len([c for c in parent._modules if c.startswith('spinfx_fused_')])}", fused)
        for i, name in enumerate(names):
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(model.get_submodule(owner), leaf, QLinearSlice(fused, i))
        fused_groups.append(names)
    return fused_groups


def attach_transforms(model: torch.nn.Module, groups: dict[str, dict], matrices: dict[str, torch.Tensor]) -> None:
    """Re-attach online transforms at their recorded sites (see the module docstring)."""
    import spinfx.kernels.hadamard  # noqa: F401  (registers torch.ops.spinfx.hadamard)
    from spinfx.kernels.hadamard_matrices import plan

    attention = False
    for key, g in groups.items():
        if g["type"] == HADAMARD:
            p = plan(int(g["head_dim"]))
            fn = _hadamard_fn(list(p.ks), p.block)
        elif g["type"] == MATRIX:
            fn = _matrix_fn(matrices[key])
        else:
            raise BadInput(f"transform {key}: unknown type {g['type']!r}")
        for a in g["apply"]:
            for name in a["targets"]:
                mod = model.get_submodule(name)
                loc = a["location"]
                if loc == "input":
                    mod.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]), *args[1:]))
                elif loc == "output":
                    mod.register_forward_hook(lambda m, args, out, fn=fn: fn(out))
                elif loc == "q_attn":
                    mod.__dict__.setdefault("_spinfx_qk", {})[loc] = fn
                    attention = True
                elif loc == "k_cache":  # rotated as they enter the cache (see _KeysRotatedOnWrite)
                    keys = _KeysRotatedOnWrite(fn)
                    mod.__dict__.setdefault("_spinfx_qk", {})[loc] = keys
                    mod.register_forward_pre_hook(keys.hook, with_kwargs=True)
                    attention = True
                else:
                    raise BadInput(f"transform {key}: unknown location {loc!r}")
    if attention:
        _register_attention()
        model.set_attn_implementation(ATTENTION_IMPL)


def _hadamard_fn(ks: list[int], block: int):
    return lambda x: torch.ops.spinfx.hadamard(x, ks, block, False)


def _matrix_fn(m: torch.Tensor):
    return lambda x: torch.matmul(x, m.to(x.dtype))


class _KeysRotatedOnWrite:
    """R3 on the keys, applied where it costs least: once per key, as it enters the KV cache.

    Scores need only q·H·(k·H)ᵀ = q·kᵀ, so the cache may hold H-rotated keys. The attention module's
    forward (every transformers model class) computes k, applies RoPE and calls
    `cache.update(k, v, layer_idx, …)`, which returns every cached key. A forward pre-hook (with kwargs)
    on the attention module hands it, in place of the `Cache` it was given (found by type, under whatever
    keyword), a `_RotatingCache` whose `update` rotates the new keys first: each step rotates the step's
    keys only, and the cost of R3 no longer grows with the cache length. `in_cache` tells `spinfx_sdpa`
    that the keys it receives came out of such an update (already rotated); without a cache (use_cache
    False) it rotates them itself, as before.

    Consequence: a cache filled by a model loaded with R3 holds rotated keys; it must not be reused with
    a model without this rotation (nor the reverse).
    """

    def __init__(self, fn) -> None:
        self.fn, self.in_cache = fn, False

    def hook(self, module, args, kwargs):
        from transformers import Cache

        self.in_cache = False
        args = tuple(_RotatingCache(a, self) if isinstance(a, Cache) else a for a in args)
        kwargs = {k: _RotatingCache(v, self) if isinstance(v, Cache) else v for k, v in kwargs.items()}
        return args, kwargs


class _RotatingCache:
    """A transformers Cache whose `update` stores the keys rotated (`_KeysRotatedOnWrite`); everything
    else is the wrapped cache's."""

    def __init__(self, cache, keys: _KeysRotatedOnWrite) -> None:
        self._cache, self._keys = cache, keys

    def update(self, key_states, value_states, *args, **kwargs):
        self._keys.in_cache = True
        return self._cache.update(self._keys.fn(key_states), value_states, *args, **kwargs)

    def __getattr__(self, name):  # only for names not set in __init__ (copy/pickle probe before it ran)
        if name in ("_cache", "_keys") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._cache, name)


def _register_attention() -> None:
    """`spinfx_sdpa`: SDPA with q rotated first (the module's `_spinfx_qk` transforms), and k where the
    KV cache did not already store it rotated (`_KeysRotatedOnWrite`); the scores q·H·(k·H)ᵀ = q·kᵀ
    are unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def spinfx_sdpa(module, query, key, value, attention_mask, **kwargs):
        qk = module.__dict__.get("_spinfx_qk", {})
        if "q_attn" in qk:
            query = qk["q_attn"](query)
        if "k_cache" in qk:
            keys = qk["k_cache"]
            if not keys.in_cache:
                key = keys.fn(key)
            keys.in_cache = False  # consumed: this call's keys only
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_IMPL, spinfx_sdpa)
    # and SDPA's mask: an attention name without a registered mask function gets no mask at all,
    # which a static cache (zeros in its unfilled slots) cannot do without
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(ATTENTION_IMPL, sdpa_mask)
