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

Checkpoints (`spinfx.checkpoint.parts`) stack the per-expert matrices again (`expert_linears`). Where the model class
cannot run them with its own forward — quantized experts (one QLinear per expert) or an online transform
at every expert's down_proj input (R4) — `spinfx.load` gives the experts module `_sparse_forward`:
transformers' eager loop (each chosen expert on its tokens) over per-expert projections, with the
transform inside it. Not a hook on transformers' `_apply_gate` (what its grouped_mm / batched_mm forwards
call before down_proj): the eager forward computes the gate inline and would silently skip it.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F

from spinfx.engine.errors import Unsupported

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


# ---- checkpoints: the per-expert linears of the program as the model class's stacked tensors -----------


def expert_linears(model: torch.nn.Module) -> dict[str, tuple[str, str, int]]:
    """{`<experts>.<e>.<w>`: (`<experts>`, w, e)} — the per-expert linears `dense_experts` gives every
    stacked-experts module of `model` (w: `gate_up_proj` or `down_proj`). A checkpoint stores them
    stacked again under `<experts>.<w>` (float: the class's own parameter [E, N, K]; quantized: its
    compressed-tensors tensors with a leading E dimension, `<experts>.<w>.weight_packed` …)."""
    out = {}
    for name, m in model.named_modules():
        if is_stacked_experts(m):
            for w in _WEIGHTS:
                for e in range(getattr(m, w).shape[0]):
                    out[f"{name}.{e}.{w}"] = (name, w, e)
    return out


def stacked_projection(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """(experts module, w) if `name` is `<experts>.<w>`, a stacked projection of an experts module
    (a checkpoint's quantization / transform target); None otherwise."""
    parent, _, w = name.rpartition(".")
    if w not in _WEIGHTS:
        return None
    try:
        m = model.get_submodule(parent)
    except AttributeError:
        return None
    return (m, w) if getattr(m, "_spinfx_experts", False) or is_stacked_experts(m) else None


def _project(self, w: str, e: int, x: torch.Tensor) -> torch.Tensor:
    p = getattr(self, w)
    return p[e](x) if isinstance(p, torch.nn.ModuleList) else F.linear(x, p[e])


def _sparse_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop — each chosen expert on its tokens — over per-expert projections
    (slices of the stacked tensors, or one module each, e.g. QLinear) with the online transforms of a
    projection's input (`_spinfx_inputs`: R4 before every expert's down_proj, one Hadamard for all)."""
    inputs = self.__dict__.get("_spinfx_inputs", {})
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, K, T]
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        pos, tok = torch.where(mask[e])
        x = hidden_states[tok]
        if "gate_up_proj" in inputs:
            x = inputs["gate_up_proj"](x)
        gate, up = _project(self, "gate_up_proj", e, x).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        if "down_proj" in inputs:
            h = inputs["down_proj"](h)
        y = _project(self, "down_proj", e, h) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _own_forward(m: torch.nn.Module) -> None:
    """`m` runs `_sparse_forward` from now on (whatever `config._experts_implementation` says: grouped_mm
    and the others read the stacked parameters directly and know no per-expert modules or transforms)."""
    if not m.__dict__.get("_spinfx_experts"):
        _check_layout(type(m).__name__, m)
        m._spinfx_experts = True
        m.forward = types.MethodType(_sparse_forward, m)


def set_projections(m: torch.nn.Module, w: str, modules: list[torch.nn.Module]) -> None:
    """Replace the stacked parameter `w` of experts module `m` by one module per expert (QLinear)."""
    _own_forward(m)
    if len(modules) != m.num_experts:
        raise Unsupported(f"{type(m).__name__}.{w}: {len(modules)} expert projections for {m.num_experts} experts")
    del m._parameters[w]
    setattr(m, w, torch.nn.ModuleList(modules))


def set_input_transform(m: torch.nn.Module, w: str, fn) -> None:
    """Every expert's projection `w` of `m` reads fn(its input) (an online Hadamard: the same for all)."""
    _own_forward(m)
    m.__dict__.setdefault("_spinfx_inputs", {})[w] = fn


def projection_modules(m: torch.nn.Module, w: str) -> list[torch.nn.Module]:
    """The per-expert modules of projection `w` (after `set_projections`), e.g. to hook their inputs."""
    p = getattr(m, w)
    if not isinstance(p, torch.nn.ModuleList):
        raise Unsupported(f"{type(m).__name__}.{w} is a stacked float tensor, not one module per expert")
    return list(p)
