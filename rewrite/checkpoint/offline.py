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
* activation and KV-cache fake quantization (the quantize pass's `activations:` / `kv_cache:`,
  `spinfx.kernels.fake_quant`) in compressed-tensors' schema: a config group's `input_activations`
  (int, `token`, dynamic, symmetric) for the linears whose input is quantized, and the top-level
  `kv_cache_scheme` (int, `group` with group_size = head_dim, dynamic: per head and token). Their
  rounding convention is spinfx's, not compressed-tensors' (`_act_args`), so the config is guarded
  (GUARD_TYPE) as for online transforms.
* a mixture of experts (`spinfx.checkpoint.moe`): the program holds one matrix per expert (`<experts>.<e>.gate_up_proj`,
  `.down_proj`), the model class one stacked parameter per projection (`<experts>.gate_up_proj` [E, 2I, H],
  `<experts>.down_proj` [E, H, I]). Float experts are stacked again into the class's parameters (fold,
  rotate: a plain model-class checkpoint). Quantized experts keep their compressed-tensors tensors with a
  leading E dimension under the stacked projection's name (`<experts>.down_proj.weight_packed` [E, N, K/8],
  `…weight_scale` [E, N, G], `…weight_shape` [E, 2]) and the config group targets `<experts>.down_proj`:
  spinfx's layout (no compressed-tensors client has per-expert modules to put them in), guarded
  (GUARD_TYPE). An online transform at every expert's projection input (R4 before down_proj, one
  Hadamard for all) is recorded once at `<experts>.down_proj`, location `input`. Every expert must be
  treated alike (all quantized with one scheme, or all float; the transform at all of them), a quantized
  router (`quantize: {router: true}`) is refused: the class routes with a float weight.
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
filled by such a model holds rotated keys; `_KeysRotatedOnWrite`). Fake quantizers follow the
transforms of their site, as in the program: a forward pre-hook on each linear with `input_activations`
(after an input Hadamard; siblings fused only where they share one quantizer, which then runs once on
their packed linear's input), and k and v in `spinfx_sdpa` (after R3, over the whole cache). An experts module
with quantized projections or an input transform runs `spinfx.checkpoint.moe`'s sparse forward (transformers' eager
loop over the chosen experts; per-expert QLinears, never fused: each expert reads its own tokens' rows; the
transform applied inside it to each expert's input,
so the loaded model keeps it whatever `experts_implementation` is set). It is the model class
itself: `generate` and every KV cache work (the rewritten `Result.module` is traced for one input
signature and does not).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported

MAX_SHARD = 5 * 1024**3  # bytes per safetensors shard
NEUTRAL = {"gamma": 1.0, "gamma1p": 0.0, "beta": 0.0}  # norm-pattern capture -> value that does nothing
HADAMARD, MATRIX = "spinfx-hadamard", "spinfx-matrix"
ATTENTION_IMPL = "spinfx_sdpa"
# transformers ignores `transform_config` (and skips unknown quantization methods with a warning): a
# checkpoint with online transforms would load there silently computing something else; one with
# spinfx's activation/KV fake quantization would be rounded by compressed-tensors' convention. Its config's
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
    kv_cache: dict | None = None                                 # kv_cache_scheme (QuantizationArgs)
    notes: list[str] = field(default_factory=list)
    experts: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # spinfx.checkpoint.moe.expert_linears
    expert_sites: dict[tuple, set[int]] = field(default_factory=dict)  # (transform, <experts>.<w>, location) -> e
    stacked_quantized: bool = False                              # quantized experts, stacked (spinfx's layout)

    @property
    def fake_quantized(self) -> bool:
        """Activations or the KV cache are fake-quantized (spinfx's quantizer, see `_act_args`)."""
        return self.kv_cache is not None or any(key[-1] for key in self.quant_groups)


def checkpoint_parts(result) -> Parts:
    """The tensors and config entries of `result` as a checkpoint of its source model."""
    prog, source = result.program, result.source
    if source is None or getattr(source, "config", None) is None:
        raise BadInput("saving needs the source to be a Hugging Face model (it has no config)")
    from spinfx.checkpoint.moe import expert_linears

    parts = Parts(experts=expert_linears(source))
    live = {n.target for n in prog.graph.nodes if n.op == "get_attr"}
    quantized = _quantized(prog, parts)
    parts.kv_cache = _kv_cache_scheme(prog)
    for n in prog.graph.nodes:
        if _is_online(n):
            _record_transform(n, parts)
    state = source.state_dict()
    _check_expert_sites(parts, state)
    buffers = dict(source.named_buffers())
    slices: dict[str, dict[int, torch.Tensor]] = {}  # <experts>.<w> -> {e: expert e's float matrix}
    for name in sorted(live):
        if _belongs_to(name, quantized) and name not in state:
            continue  # the quantized layer's runtime tensors: its compressed-tensors form is written instead
        module, _, leaf = name.rpartition(".")
        if module in parts.experts and leaf == "weight":  # one expert's matrix: stacked again below
            experts, w, e = parts.experts[module]
            slices.setdefault(f"{experts}.{w}", {})[e] = prog.const(name)
            continue
        if name in state or name.startswith("spinfx."):  # spinfx.*: online matrices
            parts.tensors[name] = prog.const(name)
        elif name in buffers and _same(buffers[name], prog.const(name)):
            continue  # a non-persistent buffer (rotary inv_freq) the model class rebuilds
        else:
            raise Unsupported(f"save: the rewritten program reads {name}, which {type(source).__name__} has no "
                              f"parameter for; the model class cannot express this rewrite")
    for key, per in slices.items():
        parts.tensors[key] = _stack(key, per, state[key].shape[0])
    neutral = _neutral_values(result.report)
    # tensors the source shares (a tied lm_head): kept tied if the program still reads one of them
    shared: dict[tuple, list[str]] = {}
    for key, v in state.items():
        shared.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(key)
    tied_to = {k: ks for ks in shared.values() if len(ks) > 1 for k in ks}
    for key, value in state.items():
        if key in parts.tensors or key in quantized or _belongs_to(key, quantized):
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


def _stack(key: str, per: dict[int, Any], n: int) -> Any:
    """[per[0], …, per[n-1]] — every expert of the stacked projection `key` (else Unsupported); tensors are
    stacked, other values (schemes) must all be equal and are returned once."""
    if sorted(per) != list(range(n)):
        missing = sorted(set(range(n)) - set(per))
        raise Unsupported(f"save: {key} stores {n} experts stacked, but the rewritten program treats experts "
                          f"{sorted(per)} alike and not {missing}; the model class cannot express this rewrite")
    values = [per[e] for e in range(n)]
    if isinstance(values[0], torch.Tensor):
        if any(v.shape != values[0].shape or v.dtype != values[0].dtype for v in values):
            raise Unsupported(f"save: the experts of {key} have different shapes/dtypes "
                              f"{sorted({(tuple(v.shape), str(v.dtype)) for v in values})}; they cannot be stacked")
        return torch.stack(values)
    if any(v != values[0] for v in values):
        raise Unsupported(f"save: the experts of {key} are quantized differently ({sorted(set(map(str, values)))}); "
                          f"a stacked projection has one scheme")
    return values[0]


def _check_expert_sites(parts: Parts, state: dict) -> None:
    """An online transform at an expert's projection is recorded once for the stacked projection: it must
    act on every expert alike (R4: the same Hadamard before every expert's down_proj)."""
    for (key, target, location), es in parts.expert_sites.items():
        _stack(f"{target} ({key} at its {location})", dict.fromkeys(es, True), state[target].shape[0])


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
    compressed-tensors form, with the fake quantization of its input if it has one; returns their
    module names."""
    layers = prog.meta.get("quant", {})
    stacked: dict[str, dict[int, Any]] = {}  # <experts>.<w> -> {e: expert e's QuantLayer}
    for module, layer in layers.items():
        if layer.router:
            raise Unsupported(f"save: the MoE router {module} is quantized (quantize: router: true); the model "
                              f"class computes its routing from a float weight, so a checkpoint cannot hold it "
                              f"quantized — keep routers in float (router: false, the default)")
        if module in parts.experts:  # one expert's projection: stacked with the others below
            experts, w, e = parts.experts[module]
            stacked.setdefault(f"{experts}.{w}", {})[e] = layer
            continue
        qw = layer.weight
        for name, t in qw.to_compressed_tensors().items():
            parts.tensors[f"{module}.{name}"] = t
        parts.quant_groups.setdefault(_scheme(layer), []).append(module)
        for reader in layer.tied:
            parts.tied[reader] = module
            parts.notes.append(f"{reader} reads the quantized table of {module} (tied): stored once")
    n_experts = {}
    for experts, w, e in parts.experts.values():
        n_experts[f"{experts}.{w}"] = max(n_experts.get(f"{experts}.{w}", 0), e + 1)
    for target, per in sorted(stacked.items()):
        # the projection of every expert in one set of tensors with a leading E dimension: <experts>.<w>.weight_packed
        # [E, N, K/8] …, one config group target <experts>.<w> (spinfx's layout: `load` runs it, see GUARD_TYPE)
        n = n_experts[target]
        tensors = {e: l.weight.to_compressed_tensors() for e, l in per.items()}
        scheme = _stack(target, {e: _scheme(l) for e, l in per.items()}, n)
        names = _stack(target, {e: tuple(sorted(t)) for e, t in tensors.items()}, n)
        for name in names:
            parts.tensors[f"{target}.{name}"] = _stack(f"{target}.{name}", {e: t[name] for e, t in tensors.items()}, n)
        parts.quant_groups.setdefault(scheme, []).append(target)
        parts.stacked_quantized = True
    return set(layers) | set(parts.tied) | set(stacked)


def _scheme(layer) -> tuple:
    """A config group's key: (bits, group_size, symmetric, act_order, clip, input_bits)."""
    qw = layer.weight
    return (qw.bits, qw.group_size, qw.symmetric, qw.weight_g_idx is not None, layer.clip, layer.input_bits)


def _kv_cache_scheme(prog) -> dict | None:
    """The quantize pass's KV fake quantization (`prog.meta["kv_cache"]`) as compressed-tensors'
    `kv_cache_scheme`: per head and token over head_dim is its `group` strategy with group_size =
    head_dim on the cache's [batch, heads, tokens, head_dim] (its `token` strategy would share one
    scale across all tokens of a head)."""
    kv = prog.meta.get("kv_cache")
    if not kv:
        return None
    if len(kv["head_dims"]) != 1:
        raise Unsupported(f"save: the KV cache is quantized over head sizes {kv['head_dims']}; compressed-tensors' "
                          f"kv_cache_scheme has one group size")
    return {**_act_args(kv["bits"], kv["symmetric"]), "strategy": "group", "group_size": kv["head_dims"][0]}


def _act_args(bits: int, symmetric: bool) -> dict:
    """compressed-tensors QuantizationArgs of spinfx's dynamic fake quantizer (`spinfx.kernels.fake_quant`):
    int, per token, scales computed at run time. Its scale convention is spinfx's (symmetric: max|x| /
    (2^(b-1) - 1); asymmetric: the row's own min..max), not compressed-tensors' (max|x| / 7.5 at 4 bits;
    a range always holding 0): a checkpoint that carries one is therefore guarded like one with online
    transforms (GUARD_TYPE), so that no other client runs it with its own rounding."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "token", "dynamic": True}


def quantization_config(parts: Parts, linears: list[str]) -> dict | None:
    """compressed-tensors `quantization_config` (pack-quantized, with `input_activations` /
    `kv_cache_scheme` where activations / the KV cache are fake-quantized) and/or the transform_config."""
    if not parts.quant_groups and not parts.transforms and parts.kv_cache is None:
        return None
    groups = {}
    for i, ((bits, gs, sym, act, clip, ib), modules) in enumerate(sorted(parts.quant_groups.items(), key=str)):
        groups[f"group_{i}"] = {
            "targets": sorted(modules),
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if gs is None
                        else "group", "group_size": gs, "dynamic": False, "actorder": "group" if act else None,
                        "observer": clip},
            "input_activations": _act_args(ib, True) if ib else None, "output_activations": None,
            "format": "pack-quantized"}
    quantized = {m for ms in parts.quant_groups.values() for m in ms} | set(parts.tied)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized" if groups else "dense",
          "quantization_status": "compressed", "config_groups": groups,
          "ignore": sorted(m for m in linears if m not in quantized) if groups else [],
          "kv_cache_scheme": parts.kv_cache, "sparsity_config": {}}
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
    from spinfx.engine.match import describe

    values, todo, attention = {n}, [n], []
    while todo:  # q/k at attention: n reaches scaled_dot_product_attention's q or k through layout ops
        for u in _readers(todo.pop()):
            if u.target is aten.scaled_dot_product_attention.default:
                attention.append(u)
            elif u.target in _PASS_THROUGH and u not in values:
                values.add(u)
                todo.append(u)
    for a in attention:
        for i, loc in ((0, "q_attn"), (1, "k_cache")):
            if a.args[i] in values:
                return a.meta.get("module", ""), loc
    users = {u.meta.get("module", "") for u in _readers(n)}
    src = n.args[0].meta.get("module", "")
    if len(users) == 1 and next(iter(users)) not in ("", src):
        return next(iter(users)), "input"
    if src and src not in users:
        return src, "output"
    raise Unsupported(f"save: the online op {describe(n)} has no module-level site (input of one module, "
                      f"output of one, or q/k at attention)")


def _readers(x: fx.Node) -> list[fx.Node]:
    """x's users, seen through the fake quantizers after it (actquant: a linear's input, attention's k/v).
    `load` applies a quantizer after the transforms of its site, as the program does."""
    from spinfx.passes.actquant import KINDS

    out, seen, todo = [], set(), [x]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                (todo if u.meta.get("module_type") in KINDS else out).append(u)
    return out


def _record_transform(n: fx.Node, parts: Parts) -> None:
    from spinfx.kernels.hadamard_matrices import plan

    module, location = _site(n)
    size = n.args[0].meta["val"].shape[-1]
    expert = parts.experts.get(module)
    if expert is not None:  # one expert's projection: the site is the stacked projection <experts>.<w>
        if location != "input":
            raise Unsupported(f"save: an online op at the {location} of expert projection {module}; the experts "
                              f"module of the model class can take a transform at its projections' input only")
        module = f"{expert[0]}.{expert[1]}"
    if _matrix_names(n):
        key, kind = _matrix_names(n)[0], MATRIX
    else:
        _, ks, block, transpose = (list(n.args) + [False])[:4]
        p = plan(size)
        if (list(p.ks), p.block, bool(transpose)) != (list(ks), block, False):
            raise Unsupported(f"save: a Hadamard of size {size} with factors {ks}/{block} is not the standard "
                              f"plan {list(p.ks)}/{p.block}; it cannot be recorded by size")
        key, kind = f"hadamard-{location}-{size}", HADAMARD
    if expert is not None:
        parts.expert_sites.setdefault((key, module, location), set()).add(expert[2])
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


# ---- reading --------------------------------------------------------------------------------------


def load(path: str | os.PathLike, cpu_compute_dtype: torch.dtype | None | str = "auto",
         fuse: bool = True) -> torch.nn.Module:
    """A checkpoint directory (any HF model dir, or one written by `save`) as a runnable model.

    `cpu_compute_dtype`: what quantized linears compute in on CPU (`kernels.qlinear.plan_qlinear`):
    bfloat16 takes the fast int4/int8 kernels (activations rounded to bf16 on the way in); None runs the
    generic `spinfx::qlinear` in the activation dtype, the op the rewritten program runs. "auto" (the
    default): None where the checkpoint fake-quantizes activations or the KV cache, bfloat16 otherwise.
    A 4-bit grid's rounding is discontinuous: bf16's relative 2⁻⁹ moves a few percent of the values
    across a rounding boundary, one whole step each (the tiny zoo llama under spinquant-w4a4kv4: logits
    off by 34% of their max in bf16, bit-identical to the program in its own dtype).

    `fuse`: sibling quantized linears (q/k/v, gate/up) run as one packed linear each (`fuse_siblings`),
    bit-identical to the separate ones; False keeps them separate."""
    from spinfx.checkpoint.hf import _transformers, attention_impl, check_finite, load_model, resolve_source

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
    if cpu_compute_dtype == "auto":
        fake = qc.get("kv_cache_scheme") or any(g.get("input_activations") for g in qc.get("config_groups", {}).values())
        cpu_compute_dtype = None if fake else torch.bfloat16
    tensors = read_safetensors(path)
    weights: dict[str, Any] = {}  # swapped module -> its QuantWeight (None: not a fusion candidate)
    act_quant = {}  # module -> the fake quantizer of its input
    for group in qc.get("config_groups", {}).values():
        weights |= _swap_quantized(model, group, tensors, cpu_compute_dtype)
        if group.get("input_activations"):
            fn = _fake_quantizer(group["input_activations"], "input_activations", path)
            act_quant.update(dict.fromkeys(group["targets"], fn))
    swapped = set(weights)
    from spinfx.kernels.qlinear import QLinearSlice
    from spinfx.checkpoint.moe import projection_modules, stacked_projection
    transforms = (qc.get("transform_config") or {}).get("config_groups", {})
    matrices = {k: tensors.pop(k) for k in transforms if k in tensors}
    want = model.state_dict()
    for key, t in sorted(tensors.items()):
        if key in want and tuple(t.shape) != tuple(want[key].shape):
            raise BadInput(f"{path}: tensor {key} is {list(t.shape)} in the checkpoint but config.json makes it "
                           f"{list(want[key].shape)}: the config disagrees with the weights")
        if key in want and want[key].is_floating_point() and not t.is_floating_point():
            raise BadInput(f"{path}: tensor {key} is {t.dtype} in the checkpoint, where a float weight is expected")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if cfg.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not _belongs_to(k, swapped)]
    if missing or unexpected:
        raise BadInput(f"{path}: weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        _tie(model, cpu_compute_dtype)
    check_finite(model, str(path))  # before fusion's forward
    model.eval()
    if fuse:  # before the transforms: their hooks then sit on the slices, at the siblings' names
        inputs = {t for g in transforms.values() for a in g["apply"] if a["location"] == "input" for t in a["targets"]}
        fuse_siblings(model, {k: w for k, w in weights.items() if w is not None and k not in inputs}, act_quant)
    attach_transforms(model, transforms, matrices)
    hooked = set()
    for name, fn in act_quant.items():  # after the transforms: an input Hadamard (R4) runs first, as in the program
        experts = stacked_projection(model, name)  # every expert's projection (after the experts' input transform)
        for mod in projection_modules(*experts) if experts else [model.get_submodule(name)]:
            # fused siblings share one quantizer (fuse_siblings): it runs once, on the packed linear's input
            mod = mod.fused.linear if isinstance(mod, QLinearSlice) else mod
            if id(mod) not in hooked:
                hooked.add(id(mod))
                mod.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]), *args[1:]))
    if qc.get("kv_cache_scheme"):
        attach_kv_quantizer(model, _fake_quantizer(qc["kv_cache_scheme"], "kv_cache_scheme", path))
    return model


def _fake_quantizer(args: dict, what: str, path: Path):
    """x -> x̂ for compressed-tensors QuantizationArgs written by `_act_args` (spinfx's dynamic quantizer,
    `spinfx.kernels.fake_quant`); other activation schemes are refused, not approximated."""
    from spinfx.kernels.fake_quant import fake_quant

    strategy, gs = args.get("strategy"), args.get("group_size")
    per_row = strategy == "token" if what == "input_activations" else strategy == "group" and isinstance(gs, int)
    if args.get("type", "int") != "int" or args.get("dynamic") is not True or not per_row:
        raise BadInput(f"{path}: {what} {args} is not one spinfx applies (int, dynamic, per token"
                       f"{'' if what == 'input_activations' else ' and head: strategy group, group_size head_dim'})")
    bits, symmetric = int(args["num_bits"]), bool(args.get("symmetric", True))

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if gs is not None and x.shape[-1] != gs:
            raise BadInput(f"{path}: {what} has group_size {gs} but attention's head_dim is {x.shape[-1]}")
        return fake_quant(x, bits, symmetric)

    return quantize


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tie(model: torch.nn.Module, cpu_compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
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
    model.set_output_embeddings(QLinear(emb.quant_weight(), cpu_compute_dtype=cpu_compute_dtype))


def _swap_quantized(model: torch.nn.Module, group: dict, tensors: dict,
                    cpu_compute_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Replace the group's targets by QLinear modules (QEmbedding for an nn.Embedding) built from their
    tensors (popped); returns each swapped module's name -> its QuantWeight (a stacked experts projection
    and its per-expert modules -> None)."""
    from spinfx.kernels.qembedding import QEmbedding
    from spinfx.kernels.qlinear import QLinear
    from spinfx.kernels.quant_weight import QuantWeight
    from spinfx.checkpoint.moe import set_projections, stacked_projection

    w = group["weights"]
    gs = None if w.get("strategy") == "channel" else w.get("group_size")
    out = {}
    for name in group["targets"]:
        mine = {k.removeprefix(f"{name}."): tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == name}
        experts = stacked_projection(model, name)
        if experts is not None:  # <experts>.<w>: every expert's tensors stacked [E, …] -> one QLinear per expert
            n = int(mine["weight_shape"].shape[0])
            qws = [QuantWeight.from_compressed_tensors({k: v[e] for k, v in mine.items()}, bits=w["num_bits"],
                                                       group_size=gs) for e in range(n)]
            set_projections(*experts, [QLinear(qw, cpu_compute_dtype=cpu_compute_dtype) for qw in qws])
            # not fusion candidates (None): each expert reads its own tokens' rows, no two share an input
            out |= dict.fromkeys([name, *(f"{name}.{e}" for e in range(n))])
            continue
        qw = QuantWeight.from_compressed_tensors(mine, bits=w["num_bits"], group_size=gs)
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        old = model.get_submodule(name)
        table = isinstance(old, torch.nn.Embedding)
        setattr(model.get_submodule(parent), leaf, QEmbedding(qw, _lookup_scale(name, old)) if table
                else QLinear(qw, cpu_compute_dtype=cpu_compute_dtype))
        out[name] = qw
    return out


@torch.no_grad()
def _lookup_scale(name: str, emb: torch.nn.Embedding) -> float:
    """The number an embedding module multiplies its lookup by: 1 for nn.Embedding itself; a subclass
    that overrides forward (Gemma's scaled embedding: rows · √d) is asked, on a few rows of its own
    table, what it returns beyond the lookup. Anything but one constant factor is refused: swapping in
    a QEmbedding would drop it."""
    if type(emb).forward is torch.nn.Embedding.forward:
        return 1.0
    ids = torch.arange(min(16, emb.num_embeddings), device=emb.weight.device)
    plain, out = torch.nn.functional.embedding(ids, emb.weight).double(), emb(ids).double()
    s = ((out * plain).sum() / (plain * plain).sum().clamp_min(1e-300)).item()
    s = torch.tensor(s, dtype=emb.weight.dtype).item()  # the factor as the module's dtype holds it
    if out.shape != plain.shape or not torch.allclose(out, plain * s, rtol=4 * torch.finfo(emb.weight.dtype).eps, atol=0):
        raise Unsupported(f"{name}: {type(emb).__name__} computes more than its table lookup times a number; "
                          f"its quantized table cannot be loaded in its place")
    return s


def fuse_siblings(model: torch.nn.Module, weights: dict[str, Any],
                  act_quant: dict[str, Any] | None = None) -> list[list[str]]:
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
    choice depends on N) stays separate (`FusedQLinear.build` returns None). Siblings whose inputs are
    fake-quantized differently (`act_quant`, name -> the quantizer object; absent: none) are not fused
    together: a packed linear reads one input, so its siblings must share one quantizer (`load` then
    hooks it once, on the packed linear). The checkpoint is not touched: it keeps separate q/k/v tensors."""
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
    act_quant = act_quant or {}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, x in inputs.items():  # call order
        groups.setdefault((id(x), id(act_quant.get(name))), []).append(name)
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
    from spinfx.checkpoint.moe import set_input_transform, stacked_projection

    attention = False
    for key, g in groups.items():
        if g["type"] == HADAMARD:
            p = plan(int(g["head_dim"]))
            fn = _hadamard_fn(list(p.ks), p.block)
        elif g["type"] == MATRIX:
            fn = _MatrixTransform(matrices[key])
            model.add_module(f"spinfx_transform_{key}".replace(".", "_"), fn)  # moves with model.to()
        else:
            raise BadInput(f"transform {key}: unknown type {g['type']!r}")
        for a in g["apply"]:
            for name in a["targets"]:
                loc = a["location"]
                experts = stacked_projection(model, name)
                if experts is not None:  # <experts>.<w>: the input of every expert's projection w
                    if loc != "input":
                        raise BadInput(f"transform {key}: {name} is a stacked experts projection; only its "
                                       f"input can be transformed, not {loc!r}")
                    set_input_transform(*experts, fn)
                    continue
                mod = model.get_submodule(name)
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
        _use_attention(model)


def attach_kv_quantizer(model: torch.nn.Module, fn) -> None:
    """KV-cache fake quantization at every attention (compressed-tensors' `kv_cache_scheme` names no
    modules: it is the whole model's, as the quantize pass quantizes every attention's k and v): every
    module carries `fn`, and `spinfx_sdpa` applies it to the attention modules it is called with."""
    for m in model.modules():
        m.__dict__["_spinfx_kv"] = fn
    _use_attention(model)


def _use_attention(model: torch.nn.Module) -> None:
    _register_attention()
    model.set_attn_implementation(ATTENTION_IMPL)


def _hadamard_fn(ks: list[int], block: int):
    return lambda x: torch.ops.spinfx.hadamard(x, ks, block, False)


class _MatrixTransform(torch.nn.Module):
    """x ↦ x·M, M a buffer (not saved: the checkpoint holds it under its transform's name), so that
    `model.to(device)` moves it with the model."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", m, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.matrix.to(x.dtype))


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
    KV cache did not already store it rotated (`_KeysRotatedOnWrite`), then k and v fake-quantized (the
    module's `_spinfx_kv`), where the program does both: after R3, before GQA's repeat. The key and
    value here are the whole cache (past tokens and the new ones; keys rotated as they entered it), so
    every step quantizes all of them; per head and token, each cached token's x̂ is the one the program
    computes. The scores q·H·(k·H)ᵀ = q·kᵀ are unchanged by H."""
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
        kv = module.__dict__.get("_spinfx_kv")
        if kv is not None:
            key, value = kv(key), kv(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_IMPL, spinfx_sdpa)
    # and SDPA's mask: an attention name without a registered mask function gets no mask at all,
    # which a static cache (zeros in its unfilled slots) cannot do without
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(ATTENTION_IMPL, sdpa_mask)
