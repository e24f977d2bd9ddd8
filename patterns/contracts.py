"""Model contracts: what each family must show in its graph, as counts in terms of L (layers) and, for a
mixture of experts, E (experts per layer; `EL` is E·L).

A broken contract is an error that names what is missing and the nearest miss of that finder. The
engine evaluates these (spinfx.engine.report.check_contract); the family knowledge lives only here.
"""
from __future__ import annotations

_GATED = {"norm": "2L+1", "norm-linears": "2L+1", "qkv": "L", "gate-up": "L", "rope": "L",
          "attention": "L", "residual-writers": "2L"}
_CLASSIC = {"norm": "2L+1", "norm-linears": "2L+1", "qkv": "L", "gate-up": "0", "rope": "0",
            "attention": "L", "residual-writers": "2L+1"}  # + the learned positional embedding
# every layer's MLP a mixture: a router and E experts (fused gate/up each) reading the post-attention
# norm, and each expert's down_proj a writer of the stream (scaled per token by its routing weight)
_MOE = _GATED | {"gate-up": "EL", "router": "L", "experts": "EL", "residual-writers": "L+EL"}

CONTRACTS: dict[str, dict[str, str]] = {
    "llama": _GATED, "mistral": _GATED, "qwen2": _GATED, "gemma": _GATED, "phi3": _GATED,
    "qwen3": _GATED | {"norm": "4L+1"}, "granite": _GATED,  # + q_norm and k_norm per layer (they feed no linear)
    "opt": _CLASSIC, "gpt2": _CLASSIC,
    "mixtral": _MOE, "qwen3_moe": _MOE | {"norm": "4L+1"},
    # post-norm blocks write the stream through a norm: the walk stops at the first block (0 writers,
    # hence R1 refused). OLMo-2: post_attention / post_feedforward norms and q/k norms over the whole
    # projection, only the final norm feeds a linear; Gemma-2: pre- and post-norms around both blocks
    "olmo2": _GATED | {"norm": "4L+1", "norm-linears": "1", "residual-writers": "0"},
    "gemma2": _GATED | {"norm": "4L+1", "residual-writers": "0"},
    # LayerNorm with RoPE on part of each head. StableLM: a Llama-shaped block. Parallel blocks (the
    # attention and the MLP read the block's input, both write the stream): Phi's read one LayerNorm
    # (L+1 norms), GPT-NeoX's one each and its MLPs are not gated; NeoX's q/k/v come from one
    # projection whose rows interleave per head, which the q/k/v finder does not take apart (R2 refused)
    "stablelm": _GATED,
    "phi": _GATED | {"norm": "L+1", "norm-linears": "L+1", "gate-up": "0"},
    "gpt_neox": _GATED | {"qkv": "0", "gate-up": "0"},
}
