"""Checkpoint back in (`spinfx.load`).

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

import json
import os
from pathlib import Path
from typing import Any

import torch

from spinfx.checkpoint.parts import BASE_TYPE_KEY, HADAMARD, MATRIX, belongs_to
from spinfx.engine.errors import BadInput, Unsupported

ATTENTION_IMPL = "spinfx_sdpa"


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
    missing = [k for k in missing if k not in tied and not belongs_to(k, swapped)]
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
    elif model.config._attn_implementation == "sdpa" and getattr(cfg, "num_key_value_heads", None) not in (
            None, getattr(cfg, "num_attention_heads", None)):
        _use_attention(model)  # GQA without repeat_kv (spinfx_sdpa)
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
    extra = args.get("observer_kwargs") or {}  # spinfx writes only a clip ratio there (`parts._act_args`)
    clip = extra.get("clip_ratio", 1.0) if isinstance(extra, dict) else None
    if not isinstance(extra, dict) or set(extra) - {"clip_ratio"} or isinstance(clip, bool) \
            or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise BadInput(f"{path}: {what} observer_kwargs {extra!r} is not one spinfx applies "
                       f"(only {{clip_ratio: c}}, 0 < c <= 1)")
    clip = float(clip)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if gs is not None and x.shape[-1] != gs:
            raise BadInput(f"{path}: {what} has group_size {gs} but attention's head_dim is {x.shape[-1]}")
        return fake_quant(x, bits, symmetric, clip=clip)

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


def _sdpa_gqa(module, query, key, value, attention_mask, scaling, is_causal):
    """transformers' `sdpa_attention_forward` for GQA on CPU, with the KV heads given to SDPA as they are:
    causal only for several queries and no mask (a causal prefill into an empty static cache sees its
    own keys only), output [batch, q_len, heads, head_dim]."""
    q_len = query.shape[2]
    causal = q_len > 1 and attention_mask is None and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """`spinfx_sdpa`: SDPA with q rotated first (the module's `_spinfx_qk` transforms), and k where the
    KV cache did not already store it rotated (`_KeysRotatedOnWrite`), then k and v fake-quantized (the
    module's `_spinfx_kv`), where the program does both: after R3, before GQA's repeat. The key and
    value here are the whole cache (past tokens and the new ones; keys rotated as they entered it), so
    every step quantizes all of them; per head and token, each cached token's x̂ is the one the program
    computes. The scores q·H·(k·H)ᵀ = q·kᵀ are unchanged by H.

    GQA on CPU: transformers' SDPA repeats k and v to every query head (`repeat_kv`) unless there is no
    mask — under torch.compile, with a static cache's mask, that copies the whole cache `groups` times in
    every layer at every decode step. Torch's CPU SDPA takes the KV heads as they are (`enable_gqa`, with a
    mask; the same values bit for bit: tests/test_load_speed.py), so `_sdpa_gqa` calls it that way."""
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
        if (query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1 and not module.training
                and not any(kwargs.get(k) for k in ("dropout", "position_bias", "softcap", "output_attentions"))):
            return _sdpa_gqa(module, query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("is_causal"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_IMPL, spinfx_sdpa)
    # and SDPA's mask: an attention name without a registered mask function gets no mask at all,
    # which a static cache (zeros in its unfilled slots) cannot do without
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(ATTENTION_IMPL, sdpa_mask)
