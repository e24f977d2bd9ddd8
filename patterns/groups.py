"""Linear groups: the linears that read one norm, and the gated MLP's gate/up pair.

NORM_LINEARS  a norm whose every user is a linear (through casts/views): the unit that folding and
              R1 act on. Captures the norm's captures plus `linears`: one match per linear (`w`,
              `b`, `linear` or `linear_t`).
SCALE_FREE_LINEARS  an RMSNorm without a scale (rms(x·R) = rms(x)·R) whose every user is a linear: where
              R1 is undone inside the readers' weights. Same captures as NORM_LINEARS.
GATE_UP       act(linear(x, Wg)) * linear(x, Wu), or a fused gate_up linear split in two (Phi-3).
"""
from __future__ import annotations

import operator

import torch

from spinfx.engine.pattern import Op, Siblings, Var, is_const

from spinfx.patterns.common import ACTIVATIONS, CASTS, VIEWS, linear_of
from spinfx.patterns.norms import NORM, RMSNORM_PLAIN

aten = torch.ops.aten



def norm_linears(norm):
    """The norm matched by `norm` with every user a linear (through casts/views): captures `linears`."""
    return Siblings(norm, linear_of(Var("normout")), bind="normout", min=1, all_users=True,
                    through=CASTS + VIEWS, name="linears")


NORM_LINEARS = norm_linears(NORM)
SCALE_FREE_LINEARS = norm_linears(RMSNORM_PLAIN)

_gate = Op(aten.linear.default, Var("x"), Var("w_gate", where=is_const), Var("b_gate"), name="gate")
_up = Op(aten.linear.default, Var("x"), Var("w_up", where=is_const), Var("b_up"), name="up")
_fused = Op(aten.split.Tensor, Op(aten.linear.default, Var("x"), Var("w_gate_up", where=is_const),
                                  Var("b_gate_up"), name="gate_up"), Var("split"), -1)

GATE_UP = (Op(aten.mul.Tensor, Op(ACTIVATIONS, _gate, name="act"), _up, name="glu")
           | Op(aten.mul.Tensor, Op(ACTIVATIONS, Op(operator.getitem, _fused, 0), name="act"),
                Op(operator.getitem, _fused, 1), name="glu"))
