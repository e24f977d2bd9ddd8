"""The test zoo: tiny seeded random HF causal LMs, one per architecture family, built from configs.

Every model is small (vocab 256, hidden 64, 2 layers) so `torch.export` takes ≈0.5 s on a quiet
machine, and every parameter is drawn from one seeded generator: linear/embedding weights N(0, 0.1²)
(not HF's 0.02, so attention scores and logits have spread: logits std ≈ 0.8), norm scales
1 + 0.1·N(0, 1) (Gemma stores w in x·(1 + w): 0.1·N(0, 1)), every bias 0.02·N(0, 1). Nothing is ones or zeros, so a rewrite that drops a norm scale, a bias or a
LayerNorm mean shows up in the output. `ZooModel.expect` says what a pattern library should find.

No downloads: configs are written here; transformers is imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from spinfx.engine.errors import BadInput
from spinfx.checkpoint.hf import attention_impl

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, SEQ = 256, 64, 4, 2, 16, 88, 8
WEIGHT_STD, NORM_STD, BIAS_STD = 0.1, 0.1, 0.02


@dataclass(frozen=True)
class Expect:
    """The structure a zoo model has, as plain data for tests and contracts."""

    family: str  # the HF model_type
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head.weight is the embedding matrix
    norm: str  # "rms": x̂·w; "rms1p": x̂·(1 + w) (Gemma); "layer": LayerNorm with bias
    norms: int  # norm modules in the model, final norm included
    linear: str  # "linear": nn.Linear (y = x Wᵀ + b); "conv1d": GPT-2 Conv1D (y = x W + b)
    fused_qkv: bool  # one projection makes q, k and v
    fused_gate_up: bool  # one projection makes gate and up
    gated_mlp: bool  # down(act(gate(x)) · up(x)) rather than fc2(act(fc1(x)))
    linears_per_layer: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    positions: str  # "rope" or "learned"
    embed_scale: float  # Gemma multiplies the embeddings by sqrt(hidden), Granite by its embedding_multiplier
    qk_norm: bool = False  # q and k pass an RMSNorm (Qwen3: per head; OLMo-2: over the projection): two more norm modules per layer
    # where a block's norms sit: "pre" (x + f(norm(x))), "post" (x + norm(f(x)): OLMo-2),
    # "sandwich" (x + norm(f(norm(x))): Gemma-2, two more norm modules per layer). A post-norm writes
    # the residual stream through a nonlinearity: R1 is refused there, fold and quantize are not
    norm_place: str = "pre"
    experts: int = 0  # a mixture of experts per layer (0: a dense MLP); `intermediate` is then per expert
    top_k: int = 0
    rotary: float = 1.0  # the fraction of each head's dims RoPE turns (partial rotary: StableLM, Phi, GPT-NeoX)
    # norm modules before a block's attention and MLP: 1 where a parallel block's attention and MLP read
    # one norm (Phi: x + attn(ln(x)) + mlp(ln(x))); GPT-NeoX's parallel block has one norm each
    block_norms: int = 2
    # a fused q/k/v projection whose rows interleave per head ([q_h, k_h, v_h] for each head h: GPT-NeoX):
    # no q/k/v group is found there, so R2 (and what needs it) is refused
    qkv_interleaved: bool = False


@dataclass
class ZooModel:
    name: str
    family: str
    model: nn.Module  # an HF *ForCausalLM in eval mode
    config: Any  # its transformers config
    example_inputs: dict  # kwargs for model(**example_inputs) and torch.export.export(model, (), kwargs)
    expect: Expect


def _llama(tf, layers: int, tied: bool = True, head_dim: int = HEAD_DIM, **o):
    return tf.LlamaConfig(**_common(layers, o), head_dim=head_dim, tie_word_embeddings=tied, **_hf(o))


def _mistral(tf, layers: int, tied: bool = False, head_dim: int = HEAD_DIM, **o):
    return tf.MistralConfig(**_common(layers, o), head_dim=head_dim, tie_word_embeddings=tied,
                            **_hf(o, sliding_window=None))


def _qwen2(tf, layers: int, tied: bool = True, **o):  # q/k/v always have biases
    return tf.Qwen2Config(**_common(layers, o), tie_word_embeddings=tied, **_hf(o))


def _qwen3(tf, layers: int, tied: bool = True, head_dim: int = HEAD_DIM, **o):  # per-head q/k RMSNorm before RoPE
    return tf.Qwen3Config(**_common(layers, o), head_dim=head_dim, tie_word_embeddings=tied, **_hf(o))


def _granite(tf, layers: int, tied: bool = True, **o):  # scalar multipliers on the embedding, every writer, the logits
    return tf.GraniteConfig(**_common(layers, o), tie_word_embeddings=tied, **_hf(
        o, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0))


EXPERTS, TOP_K, EXPERT_INTERMEDIATE = 4, 2, 40  # 40: not 2^k (R4 takes H_20 ⊗ H_2)


# A mixture's `intermediate` is each expert's (default EXPERT_INTERMEDIATE)
def _mixtral(tf, layers: int, tied: bool = False, head_dim: int = HEAD_DIM, **o):  # router + experts in every MLP
    return tf.MixtralConfig(**_common(layers, {"intermediate": EXPERT_INTERMEDIATE} | o), head_dim=head_dim,
                            tie_word_embeddings=tied,
                            **_hf(o, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=None))


def _qwen3_moe(tf, layers: int, tied: bool = True, head_dim: int = HEAD_DIM, **o):  # Qwen3's q/k norms + a mixture
    # (intermediate_size: the dense MLP of a layer in mlp_only_layers; every layer is a mixture by default)
    return tf.Qwen3MoeConfig(**_common(layers, o), head_dim=head_dim, tie_word_embeddings=tied, **_hf(
        o, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=o.get("intermediate", EXPERT_INTERMEDIATE),
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))


def _olmoe(tf, layers: int, tied: bool = False, **o):  # a mixture in every layer; q/k RMSNorm over the whole projection
    return tf.OlmoeConfig(**_common(layers, {"intermediate": EXPERT_INTERMEDIATE} | o), tie_word_embeddings=tied,
                          **_hf(o, num_experts=EXPERTS, num_experts_per_tok=TOP_K))


def _granitemoe(tf, layers: int, tied: bool = True, **o):  # Granite's multipliers + a mixture (softmax over the top-k)
    return tf.GraniteMoeConfig(**_common(layers, {"intermediate": EXPERT_INTERMEDIATE} | o), tie_word_embeddings=tied,
                               **_hf(o, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, embedding_multiplier=2.0,
                                     residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0))


def _gemma(tf, layers: int, tied: bool = True, head_dim: int = 24, **o):  # head_dim 24: heads·head_dim = 96 ≠ hidden 64; MQA
    return tf.GemmaConfig(**_common(layers, {"kv_heads": 1} | o), head_dim=head_dim, tie_word_embeddings=tied,
                          **_hf(o, hidden_activation="gelu_pytorch_tanh"))


def _phi3(tf, layers: int, tied: bool = False, **o):  # fused q/k/v and gate/up projections
    return tf.Phi3Config(**_common(layers, o), tie_word_embeddings=tied, **_hf(o))


def _olmo2(tf, layers: int, tied: bool = False, **o):  # post-norms on the attention/MLP outputs, q/k norms
    return tf.Olmo2Config(**_common(layers, o), tie_word_embeddings=tied, **_hf(o))


def _gemma2(tf, layers: int, tied: bool = True, head_dim: int = HEAD_DIM, **o):
    # sandwich norms; soft-capped attention scores and logits (caps small enough that tanh bends: a rewrite
    # that dropped a cap shows); sliding-window attention on even layers (window 4 < SEQ 8); scale 1/√32
    return tf.Gemma2Config(**_common(layers, o), head_dim=head_dim, tie_word_embeddings=tied, **_hf(
        o, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0))


def _opt(tf, layers: int, tied: bool = True, **o):
    s = _sizes(o)
    return tf.OPTConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                        ffn_dim=s["intermediate"], num_hidden_layers=layers, max_position_embeddings=64,
                        tie_word_embeddings=tied, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                        bos_token_id=2, eos_token_id=2, **_hf(o, word_embed_proj_dim=s["hidden"],
                                                              do_layer_norm_before=True, enable_bias=True))


def _gpt2(tf, layers: int, tied: bool = True, **o):  # Conv1D linears (y = x W + b), fused q/k/v
    s = _sizes(o)
    return tf.GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_head=s["heads"], n_inner=s["intermediate"],
                         n_layer=layers, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **_hf(o))


def _stablelm(tf, layers: int, tied: bool = False, **o):  # LayerNorm, partial rotary (25 %), q/k/v biases (StableLM-2)
    return tf.StableLmConfig(**_common(layers, o), tie_word_embeddings=tied,
                             **_hf(o, partial_rotary_factor=0.25, use_qkv_bias=True))


def _phi(tf, layers: int, tied: bool = False, **o):  # parallel attention + MLP on one LayerNorm, partial rotary, biases
    return tf.PhiConfig(**_common(layers, o), tie_word_embeddings=tied, **_hf(o, partial_rotary_factor=0.5))


def _gpt_neox(tf, layers: int, tied: bool = False, **o):  # parallel residual, fused q/k/v interleaved per head
    s = _sizes(o)
    return tf.GPTNeoXConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                            intermediate_size=s["intermediate"], num_hidden_layers=layers, max_position_embeddings=64,
                            tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            **_hf(o, rotary_pct=0.25, use_parallel_residual=True))


SIZES = ("vocab", "hidden", "heads", "kv_heads", "intermediate")  # the sizes a config factory takes by these names


def _hf(options: dict, **defaults) -> dict:
    """The options that are not sizes: HF config keywords, passed as they are (over the factory's defaults)."""
    return defaults | {k: v for k, v in options.items() if k not in SIZES}


def _sizes(size: dict) -> dict:
    return {"vocab": VOCAB, "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS,
            "intermediate": INTERMEDIATE} | size


def _common(layers: int, size: dict) -> dict:
    s = _sizes(size)
    return dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"], num_hidden_layers=layers,
                max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)


_DECODER = dict(norm="rms", linear="linear", fused_qkv=False, fused_gate_up=False, gated_mlp=True, qk_norm=False,
                linears_per_layer=7, qkv_bias=False, o_bias=False, mlp_bias=False, positions="rope", norm_place="pre")
_LAYERNORM = dict(norm="layer", qk_norm=False, norm_place="pre", fused_gate_up=False, gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                  positions="learned")
_PARTIAL = dict(norm="layer", linear="linear", qk_norm=False, norm_place="pre", fused_gate_up=False, positions="rope")
# name -> (config factory, structure flags beyond the config's sizes)
_FAMILIES: dict[str, tuple[Callable, dict]] = {
    "llama": (_llama, _DECODER),
    "mistral": (_mistral, _DECODER),
    "qwen2": (_qwen2, _DECODER | dict(qkv_bias=True)),
    "qwen3": (_qwen3, _DECODER | dict(qk_norm=True)),
    "granite": (_granite, _DECODER),
    # router + EXPERTS fused gate/up experts per layer: 4 + 1 + 2·EXPERTS linears
    "mixtral": (_mixtral, _DECODER | dict(fused_gate_up=True, linears_per_layer=5 + 2 * EXPERTS,
                                          experts=EXPERTS, top_k=TOP_K)),
    "qwen3_moe": (_qwen3_moe, _DECODER | dict(qk_norm=True, fused_gate_up=True, linears_per_layer=5 + 2 * EXPERTS,
                                              experts=EXPERTS, top_k=TOP_K)),
    "gemma": (_gemma, _DECODER | dict(norm="rms1p")),
    "phi3": (_phi3, _DECODER | dict(fused_qkv=True, fused_gate_up=True, linears_per_layer=4)),
    "olmo2": (_olmo2, _DECODER | dict(qk_norm=True, norm_place="post")),
    "gemma2": (_gemma2, _DECODER | dict(norm="rms1p", norm_place="sandwich")),
    "opt": (_opt, _LAYERNORM | dict(linear="linear", fused_qkv=False, linears_per_layer=6)),
    "gpt2": (_gpt2, _LAYERNORM | dict(linear="conv1d", fused_qkv=True, linears_per_layer=4)),
    # LayerNorm + partial rotary: a Llama-shaped block (gated MLP, biases on q/k/v only)
    "stablelm": (_stablelm, _PARTIAL | dict(fused_qkv=False, gated_mlp=True, linears_per_layer=7, qkv_bias=True,
                                            o_bias=False, mlp_bias=False, rotary=0.25)),
    # parallel blocks: x + attn(ln(x)) + mlp(ln(x)) on one LayerNorm, biases everywhere (the lm_head's too)
    "phi": (_phi, _PARTIAL | dict(fused_qkv=False, gated_mlp=False, linears_per_layer=6, qkv_bias=True, o_bias=True,
                                  mlp_bias=True, rotary=0.5, block_norms=1)),
    # parallel residual with a LayerNorm for each branch; q/k/v from one projection, interleaved per head
    "gpt_neox": (_gpt_neox, _PARTIAL | dict(fused_qkv=True, qkv_interleaved=True, gated_mlp=False, linears_per_layer=4,
                                            qkv_bias=True, o_bias=True, mlp_bias=True, rotary=0.25)),
}
_VARIANTS = {"llama_untied": ("llama", {"tied": False})}
# Families built from configs here that are not zoo members (no goldens): spinfx.testing.fuzz and
# tests/test_coverage.py build them with `hf_config` -> _randomize's norm kind
_MORE: dict[str, tuple[Callable, str]] = {"olmoe": (_olmoe, "rms"), "granitemoe": (_granitemoe, "rms")}
FAMILIES: tuple[str, ...] = (*_FAMILIES, *_MORE)  # every family `hf_config` builds
ZOO: tuple[str, ...] = (*_FAMILIES, *_VARIANTS)
MIXTURES: tuple[str, ...] = tuple(n for n, (_, flags) in _FAMILIES.items() if flags.get("experts"))  # MoE zoo models


def build(name: str, seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> ZooModel:
    """The zoo model `name` (see `ZOO`) with `layers` blocks; same seed → identical weights and inputs."""
    if name in _VARIANTS:
        family, options = _VARIANTS[name]
    elif name in _FAMILIES:
        family, options = name, {}
    else:
        raise BadInput(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return _make(name, family, seed, layers, dtype, options)


def tied(name: str) -> bool:
    """Whether zoo model `name` ties its lm_head to its embedding (`Expect.tied`), read from its config:
    nothing is built (test collection asks this of every zoo model)."""
    family, options = _VARIANTS.get(name, (name, {}))
    return bool(hf_config(family, 1, **options).tie_word_embeddings)


def random_llama(layers: int, hidden: int = HIDDEN, heads: int = HEADS, kv_heads: int = KV_HEADS,
                 intermediate: int = INTERMEDIATE, vocab: int = VOCAB, seed: int = 0, tied: bool = True,
                 dtype: torch.dtype = torch.float32) -> ZooModel:
    """A random Llama of any depth/width (the matching-time-vs-depth benchmark); head_dim = hidden/heads."""
    if hidden % heads or heads % kv_heads:
        raise BadInput(f"hidden {hidden} / heads {heads} / kv_heads {kv_heads} do not divide")
    options = dict(tied=tied, head_dim=hidden // heads, hidden=hidden, heads=heads, kv_heads=kv_heads,
                   intermediate=intermediate, vocab=vocab)
    return _make(f"llama-{layers}x{hidden}", "llama", seed, layers, dtype, options)


def hf_config(family: str, layers: int = 2, **options):
    """The transformers config of `family` (see `FAMILIES`) with `layers` blocks. `options`: the sizes
    (`SIZES`: vocab, hidden, heads, kv_heads, intermediate), `tied`, `head_dim` where the family's config
    has one, and any other keyword of the family's HF config (attention_bias=True, ...), over this
    module's defaults."""
    import transformers as tf

    if family not in FAMILIES:
        raise BadInput(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    make_config = _FAMILIES[family][0] if family in _FAMILIES else _MORE[family][0]
    return make_config(tf, layers, **options)


def from_config(config, seed: int = 0, dtype: torch.dtype = torch.float32,
                gen: torch.Generator | None = None) -> nn.Module:
    """The HF causal LM of `config` (SDPA attention, eval mode) with every parameter drawn as the module
    docstring says from `gen` (default: a generator seeded with `seed`), in `dtype`. In float64 a
    mixture's experts run transformers' eager loop over the chosen experts (its default grouped_mm
    takes float32/16 only)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    family = config.model_type
    norm = _FAMILIES[family][1]["norm"] if family in _FAMILIES else _MORE.get(family, (None, "rms"))[1]
    eager = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention_impl(config), dtype=torch.float32,
                                                **eager)
    _randomize(model, gen or torch.Generator().manual_seed(seed), norm)
    return model.to(dtype).eval()


def _make(name: str, family: str, seed: int, layers: int, dtype: torch.dtype, options: dict) -> ZooModel:
    flags = _FAMILIES[family][1]
    config = hf_config(family, layers, **options)
    gen = torch.Generator().manual_seed(seed)
    model = from_config(config, dtype=dtype, gen=gen)  # the input ids come next from the same generator
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (1, SEQ), generator=gen)
    heads = config.num_attention_heads
    expect = Expect(
        family=config.model_type,
        layers=layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=next(getattr(config, k) for k in ("moe_intermediate_size", "intermediate_size", "ffn_dim",
                                                        "n_inner") if hasattr(config, k)),
        vocab=vocab,
        tied=model.lm_head.weight is model.get_input_embeddings().weight,
        norms=(flags.get("block_norms", 2) + 2 * flags["qk_norm"] + 2 * (flags["norm_place"] == "sandwich")) * layers + 1,
        embed_scale=getattr(config, "embedding_multiplier", None) or (config.hidden_size ** 0.5 if family.startswith("gemma") else 1.0),
        **flags,
    )
    return ZooModel(name=name, family=family, model=model, config=config,
                    example_inputs={"input_ids": ids, "use_cache": False}, expect=expect)


@torch.no_grad()
def _randomize(model: nn.Module, gen: torch.Generator, norm: str) -> None:
    """Draw every parameter from `gen` in module order (shared/tied parameters once)."""
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen)
            if pname == "bias":
                p.copy_(BIAS_STD * noise)
            elif is_norm:
                p.copy_(NORM_STD * noise + (0.0 if norm == "rms1p" else 1.0))
            else:
                p.copy_(WEIGHT_STD * noise)
