"""Building blocks shared by the pattern library: casts, views, the linear layer in its spellings."""
from __future__ import annotations

import operator

import torch

from spinfx.engine.pattern import ANY, Chain, Op, Opt, Var, is_const, is_number

aten = torch.ops.aten

# dtype casts that may or may not be present (bf16 models upcast around norms; fp32 models do not)
CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)
# shape-only ops between a producer and a consumer
VIEWS = (aten.view.default, aten.reshape.default)
# per-head layout ops on an attention input
HEAD_LAYOUT = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
               aten.contiguous.default)
# the elementwise activations of an MLP (act(gate)·up, act(fc1)); the one definition
ACTIVATIONS = (aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default)
# the functional collectives the shard pass inserts (and the simulated ranks answer)
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
SPLITS = (aten.slice.Tensor, operator.getitem, aten.split.Tensor, aten.split_with_sizes.default,
          aten.narrow.default)


# The float linear in its ATen spellings, and where each reads its input and weight: `aten.linear(x, W, b)`
# and GPT-2's Conv1D `aten.addmm(b, x, W[in,out])`. The one definition of "is this a linear".
LINEAR_OPS = (aten.linear.default, aten.addmm.default)
_LINEAR_ARGS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2)}  # (input, weight) positions


def is_linear(n) -> bool:
    """A float linear (either spelling) whose weight is a named constant of the program."""
    return (getattr(n, "op", None) == "call_function" and n.target in _LINEAR_ARGS
            and getattr(n.args[_LINEAR_ARGS[n.target][1]], "op", None) == "get_attr")


def linear_input_arg(n) -> int:
    """The argument position of a float linear's input (0 for aten.linear, 1 for Conv1D's addmm)."""
    return _LINEAR_ARGS[n.target][0]


def linear_weight(n):
    """The get_attr node of a float linear's weight."""
    return n.args[_LINEAR_ARGS[n.target][1]]


def reads_graph_input(n) -> bool:
    """Does the linear `n` read one of the graph's inputs (through casts, views and slices only)?"""
    x = n.args[linear_input_arg(n)]
    while getattr(x, "op", None) == "call_function" and x.target in CASTS + VIEWS + SPLITS:
        x = x.args[0]
    return getattr(x, "op", None) == "placeholder"


def linear_of(inp, w: str = "w", b: str = "b", name: str = "linear"):
    """A linear layer reading `inp`, in either ATen spelling:
    `aten.linear(inp, W[out,in], b?)`, or GPT-2's Conv1D `addmm(b, view(inp), W[in,out])` (captured
    under `<name>_t` so rewrites know the weight is transposed)."""
    return (Op(aten.linear.default, Chain(CASTS + VIEWS, inp, 2), Var(w, where=is_const), Var(b), name=name)
            | Op(aten.addmm.default, Var(b, where=is_const), Chain(VIEWS, inp, 2), Var(w, where=is_const),
                 name=name + "_t"))


# any float linear (captures `linear` or `linear_t`, `w`, `b`): where rules about one linear start
LINEAR = linear_of(ANY)
# a lookup in a constant table (a token or positional embedding): captures `table`
EMBEDDING = Op(aten.embedding.default, Var("table", where=is_const), ANY, name="lookup")


def soft_cap(inp):
    """c·tanh(inp/c): Gemma-2's soft-capping of attention scores and of the logits — elementwise, so
    whatever commutes with the value before it (a rotation of q and k, of v and o_proj) commutes with it."""
    return Op(aten.mul.Tensor, Op(aten.tanh.default, Op(aten.div.Tensor, inp, Var(None, where=is_number))),
              Var(None, where=is_number))


def linear_node(m, name: str = "linear"):
    """(node, transposed) of a linear captured by `linear_of`."""
    if name in m.captures:
        return m.captures[name], False
    return m.captures[name + "_t"], True


__all__ = ["CASTS", "VIEWS", "HEAD_LAYOUT", "SPLITS", "ACTIVATIONS", "LINEAR_OPS", "is_linear", "linear_input_arg",
           "linear_weight", "reads_graph_input", "ALL_REDUCE", "WAIT_TENSOR", "linear_of", "LINEAR", "EMBEDDING",
           "linear_node", "soft_cap", "Opt", "Chain"]
