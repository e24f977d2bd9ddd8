"""Mixture-of-experts blocks as a static, dense program for tracing (a driver, not the engine).

transformers ≥ 5 stores a sparse-MoE block's experts as 3-D tensors — `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] — and runs them in a loop over the experts that some token chose
(`one_hot(...).nonzero()`): a data-dependent loop that `torch.export` cannot trace ("Could not guard on
data-dependent expression"). For the trace, `dense_experts(model)` swaps such a module's forward for the
same function written statically:

    out = Σ_e  w_e ⊙ down_e(act(gate_e(x)) · up_e(x)),   w_e = Σ_k top_k_weights[:, k] · [top_k_index[:, k] = e]

Every expert computes on every token, scaled by its routing weight ([T, 1]: zero where the router did
not choose it). The sparse form adds w·y over the chosen experts only; the dense form adds 0·y for the
others, which is the same number (y finite), so only the order of the summation differs.

Each expert is a module of its own for the trace, `<experts>.<e>`, with linears `gate_up_proj` and
`down_proj` whose weights are slice e of the stacked tensors (shared storage): the program reads
`…experts.<e>.gate_up_proj.weight` and `…experts.<e>.down_proj.weight` — the per-expert layout of the
original checkpoints (Qwen3-MoE's `experts.<e>.{gate,up,down}_proj`, Mixtral's `experts.<e>.w1/w3/w2`,
gate and up fused here) — so every pass sees an expert as the fused gate/up MLP it is (Phi-3 style), the
router and every expert's gate_up are sibling linears of the post-attention norm, and quantized
experts get tensors of their own (`…experts.<e>.down_proj.weight_packed`). The module's own
parameters are put back after the trace; the source model is never modified.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F

from spinfx.errors import Unsupported

_WEIGHTS = ("gate_up_proj", "down_proj")


def is_stacked_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module: 3-D `gate_up_proj` and `down_proj` parameters, one slice per expert."""
    return all(isinstance(getattr(module, n, None), torch.nn.Parameter) and getattr(module, n).dim() == 3
               for n in _WEIGHTS)


def _check_layout(name: str, m: torch.nn.Module) -> None:
    """The layout the dense form implements: [gate; up] concatenated, [out, in] per expert, no bias."""
    odd = [what for what, bad in (("transposed weights", getattr(m, "is_transposed", False)),
                                   ("interleaved gate/up", not getattr(m, "is_concatenated", True)),
                                   ("biases", getattr(m, "has_bias", False)),
                                   ("no gate", not getattr(m, "has_gate", True)),
                                   ("a post-expert norm", getattr(m, "has_post_expert_norm", False)))
           if bad]
    E, two_i, H = m.gate_up_proj.shape
    if m.down_proj.shape != (E, H, two_i // 2) or two_i % 2:
        odd.append(f"gate_up_proj {tuple(m.gate_up_proj.shape)} and down_proj {tuple(m.down_proj.shape)} "
                   f"are not [E, 2I, H] and [E, H, I]")
    if not callable(getattr(m, "act_fn", None)):
        odd.append("no act_fn")
    if odd:
        raise Unsupported(f"{name} ({type(m).__name__}): experts with {', '.join(odd)} have no dense "
                          f"formulation for tracing here")


class _Proj(torch.nn.Module):
    """One expert's projection: a linear whose weight is a slice of the stacked tensor (shared storage)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _Expert(torch.nn.Module):
    """Expert e: down_proj(act(gate) · up), [gate; up] = gate_up_proj(x) — a fused gate/up MLP."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj, self.down_proj = _Proj(gate_up), _Proj(down)

    def forward(self, x: torch.Tensor, act) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(act(gate) * up)


def _dense_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """Σ_e w_e ⊙ expert_e(x), w_e the routing weight of expert e per token (0 where not chosen)."""
    out = None
    for e in range(self.num_experts):
        w_e = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)  # [T, 1]
        y = (getattr(self, str(e))(hidden_states, self.act_fn) * w_e).to(hidden_states.dtype)
        out = y if out is None else out + y
    return out


@contextlib.contextmanager
def dense_experts(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block, every stacked-experts module of `model` runs the dense form, its expert
    matrices exposed as `<name>.gate_up_proj.<e>` / `<name>.down_proj.<e>`; yields how many modules.
    A layout the dense form does not implement is refused (`Unsupported`) before anything changes."""
    found = [(n, m) for n, m in model.named_modules() if is_stacked_experts(m)]
    for name, m in found:
        _check_layout(name, m)
    saved = []
    try:
        for _, m in found:
            params = {n: m._parameters.pop(n) for n in _WEIGHTS}
            saved.append((m, params, m.__dict__.get("forward")))
            for e in range(m.num_experts):
                m.add_module(str(e), _Expert(params["gate_up_proj"][e].detach(), params["down_proj"][e].detach()))
            m.forward = types.MethodType(_dense_forward, m)
        yield len(found)
    finally:
        for m, params, fwd in saved:
            for e in range(m.num_experts):
                del m._modules[str(e)]
            m._parameters.update(params)
            if fwd is None:
                del m.__dict__["forward"]
            else:
                m.forward = fwd
