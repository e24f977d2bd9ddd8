"""The checkpoint format, and what a rewritten program holds as its parts (`checkpoint_parts`).

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

Writing it: spinfx.checkpoint.write; reading it back: spinfx.checkpoint.read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported

NEUTRAL = {"gamma": 1.0, "gamma1p": 0.0, "beta": 0.0}  # norm-pattern capture -> value that does nothing
HADAMARD, MATRIX = "spinfx-hadamard", "spinfx-matrix"
# transformers ignores `transform_config` (and skips unknown quantization methods with a warning): a
# checkpoint with online transforms would load there silently computing something else; one with
# spinfx's activation/KV fake quantization would be rounded by compressed-tensors' convention. Its config's
# `model_type` is therefore `spinfx`, which every other client refuses, with the model class's type
# kept under BASE_TYPE_KEY for `load`.
GUARD_TYPE, BASE_TYPE_KEY = "spinfx", "spinfx_model_type"
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
        if belongs_to(name, quantized) and name not in state:
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
        if key in parts.tensors or key in quantized or belongs_to(key, quantized):
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
        return k in live or belongs_to(k, own)

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


def belongs_to(key: str, modules: set[str]) -> bool:
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
    """A config group's key: (bits, group_size, symmetric, act_order, clip, input quantizer) — the input
    quantizer (bits, symmetric, clip ratio), None where the input stays float."""
    qw = layer.weight
    inputs = (layer.input_bits, layer.input_symmetric, layer.input_clip) if layer.input_bits else None
    return (qw.bits, qw.group_size, qw.symmetric, qw.weight_g_idx is not None, layer.clip, inputs)


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
    return {**_act_args(kv["bits"], kv["symmetric"], kv.get("clip", 1.0)), "strategy": "group",
            "group_size": kv["head_dims"][0]}


def _act_args(bits: int, symmetric: bool, clip: float = 1.0) -> dict:
    """compressed-tensors QuantizationArgs of spinfx's dynamic fake quantizer (`spinfx.kernels.fake_quant`):
    int, per token, scales computed at run time. Its scale convention is spinfx's (symmetric: max|x| /
    (2^(b-1) - 1); asymmetric: the row's own min..max), not compressed-tensors' (max|x| / 7.5 at 4 bits;
    a range always holding 0): a checkpoint that carries one is therefore guarded like one with online
    transforms (GUARD_TYPE), so that no other client runs it with its own rounding.

    A clip ratio c < 1 (each row's range shrunk to c times its own, `spinfx.kernels.fake_quant`) has no field
    of its own in QuantizationArgs, whose dynamic scales always take the row's full range: it is written as
    `observer_kwargs: {clip_ratio: c}` (schema-valid; other clients are kept out by the guard, and
    `spinfx.load` applies it). c = 1 writes nothing, as before."""
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "token", "dynamic": True}
    return {**args, "observer_kwargs": {"clip_ratio": clip}} if clip != 1.0 else args


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
            "input_activations": _act_args(*ib) if ib else None, "output_activations": None,
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
