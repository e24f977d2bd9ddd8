"""Normalization layers in all their ATen spellings.

Captures: `x` (the normalized input), `eps`, and by family:
  rms    `gamma`        y = γ · x/√(mean(x²)+ε)          HF Llama/Mistral/Qwen2/Phi-3 (fp32 upcast optional)
  rms1p  `gamma1p`      y = (1+w) · x/√(mean(x²)+ε)      Gemma
  rms    `gamma` via aten.rms_norm(x, [d], γ, ε)          torch's own op, when a model calls it
  layer  `gamma`,`beta` aten.layer_norm(x, [d], γ, β, ε)  OPT, GPT-2
  rms0   (no scale)     x/√(mean(x²)+ε)                  what folding leaves behind
The root node is captured as `norm`.
"""
from __future__ import annotations

import torch

from spinfx.engine.pattern import Op, Opt, Var, is_const, is_last_dim, is_number

from spinfx.patterns.common import CASTS

aten = torch.ops.aten

_xf = Opt(CASTS, Var("x"))
_mean_sq = Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, _xf, 2) | Op(aten.mul.Tensor, _xf, _xf),
              Var("dims", where=is_last_dim), True)
_denom = Op(aten.add.Tensor, _mean_sq, Var("eps", where=is_number))

# x * rsqrt(mean(x²) + eps)   |   x / sqrt(mean(x²) + eps)
RMS_CORE = (Op(aten.mul.Tensor, _xf, Op(aten.rsqrt.default, _denom), name="core")
            | Op(aten.div.Tensor, _xf, Op(aten.sqrt.default, _denom), name="core"))

# γ · core  (the core may be cast back to the activation dtype first)
RMSNORM = Op(aten.mul.Tensor, Var("gamma", where=is_const), Opt(CASTS, RMS_CORE), name="norm")

# core · (1 + w)   (Gemma: the weight is stored as an offset from one)
RMSNORM_1P = Op(aten.mul.Tensor, Opt(CASTS, RMS_CORE),
                Op(aten.add.Tensor, Opt(CASTS, Var("gamma1p", where=is_const)), 1.0, name="one_plus"),
                name="norm")

RMSNORM_ATEN = Op(aten.rms_norm.default, Var("x"), Var("dims"), Var("gamma", where=is_const),
                  Var("eps"), name="norm")

LAYERNORM = Op(aten.layer_norm.default, Var("x"), Var("dims"), Var("gamma"), Var("beta"),
               Var("eps"), name="norm")

# A norm without a scale: what `fold-norms` leaves (and models that never had one).
RMSNORM_PLAIN = (Op(aten.mul.Tensor, Opt(CASTS, Var("x")), Op(aten.rsqrt.default, _denom), name="norm")
                 | Op(aten.rms_norm.default, Var("x"), Var("dims"), None, Var("eps"), name="norm"))

NORM = RMSNORM | RMSNORM_1P | RMSNORM_ATEN | LAYERNORM


def norm_kind(m) -> str:
    """'rms' | 'rms1p' | 'layer' | 'rms0' for a match of NORM (or of a scale-free core)."""
    root = m.captures["norm"]
    if root.target is aten.layer_norm.default:
        return "layer"
    if "gamma1p" in m.captures:
        return "rms1p"
    if m.captures.get("gamma") is not None:
        return "rms"
    return "rms0"
