"""Building blocks shared by the pattern library: casts, views, the linear layer in its spellings."""
from __future__ import annotations

import operator

import torch

from spinfx.pattern import Chain, Op, Opt, Var, is_const

aten = torch.ops.aten

# dtype casts that may or may not be present (bf16 models upcast around norms; fp32 models do not)
CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)
# shape-only ops between a producer and a consumer
VIEWS = (aten.view.default, aten.reshape.default)
# per-head layout ops on an attention input
HEAD_LAYOUT = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
               aten.contiguous.default)
SPLITS = (aten.slice.Tensor, operator.getitem, aten.split.Tensor, aten.split_with_sizes.default,
          aten.narrow.default)


def linear_of(inp, w: str = "w", b: str = "b", name: str = "linear"):
    """A linear layer reading `inp`, in either ATen spelling:
    `aten.linear(inp, W[out,in], b?)`, or GPT-2's Conv1D `addmm(b, view(inp), W[in,out])` (captured
    under `<name>_t` so rewrites know the weight is transposed)."""
    return (Op(aten.linear.default, Chain(CASTS + VIEWS, inp, 2), Var(w, where=is_const), Var(b), name=name)
            | Op(aten.addmm.default, Var(b, where=is_const), Chain(VIEWS, inp, 2), Var(w, where=is_const),
                 name=name + "_t"))


def linear_node(m, name: str = "linear"):
    """(node, transposed) of a linear captured by `linear_of`."""
    if name in m.captures:
        return m.captures[name], False
    return m.captures[name + "_t"], True


__all__ = ["CASTS", "VIEWS", "HEAD_LAYOUT", "SPLITS", "linear_of", "linear_node", "Opt", "Chain"]
