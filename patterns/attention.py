"""Attention, RoPE and the q/k/v sibling group.

ROPE(t)     t·cos + rotate_half(t)·sin, rotate_half(t) = cat(-t[..., h/2:], t[..., :h/2]); also the
            partial form cat(rope(t), t[..., r:]) (Phi-3). Captures `cos`, `sin`; the output is named.
ATTENTION   every attention site, `attn`: scaled_dot_product_attention, or the eager matmul/softmax form
            (scores optionally soft-capped, c·tanh(s/c): Gemma-2).
ROPE_SITE   an attention whose q and k both come through RoPE: captures `rope_q`, `rope_k` (the
            nodes after which R3 goes), `cos`, `sin`.
QKV         an attention whose q, k, v are projections of one input `x` — three linears (`q`, `k`,
            `v` with `w_q`…/`b_q`…) or slices of one fused linear (`qkv`, Phi-3 / GPT-2) —
            optionally through RoPE and GQA's repeat_kv, q and k optionally through an RMSNorm
            (`head_norm`: per head, Qwen3; over the whole projection, OLMo-2). The v path is captured as `v_heads`.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from spinfx.engine.match import describe
from spinfx.engine.pattern import ANY, Chain, Op, Opt, Var, is_const, is_number

from spinfx.patterns.common import CASTS, HEAD_LAYOUT, VIEWS, linear_of, soft_cap

aten = torch.ops.aten
SDPA = (aten.scaled_dot_product_attention.default,)


def _rotate_half(t: str):
    return Op(aten.cat.default, [Op(aten.neg.default, Op(aten.slice.Tensor, Var(t), ANY, ANY, ANY)),
                                 Op(aten.slice.Tensor, Var(t), ANY, ANY, ANY)], -1)


def rope(t_pat, t: str, out: str):
    """RoPE applied to the value matched by `t_pat` (captured as `t`); output captured as `out`. Partial
    rotary: cat(rope(t), t[..., r:]) (Phi-3), or cat(rope(t[..., :r]), t[..., r:]) (StableLM, NeoX, Phi)."""
    def core(x_pat, x: str, name):
        return Op(aten.add.Tensor, Op(aten.mul.Tensor, x_pat, Var("cos")),
                  Op(aten.mul.Tensor, _rotate_half(x), Var("sin")), name=name)

    def cat_rest(rotated):
        return Op(aten.cat.default, [rotated, Op(aten.slice.Tensor, Var(t), ANY, ANY, ANY)], -1, name=out)

    head = Op(aten.slice.Tensor, t_pat, ANY, 0, ANY, name=f"{t}_rot")
    return (cat_rest(core(t_pat, t, out + "_rotated")) | cat_rest(core(head, f"{t}_rot", out + "_rotated"))
            | core(t_pat, t, out))


def _repeat_kv(p):
    """GQA's repeat_kv: reshape|view(expand(unsqueeze(kv, 2)))."""
    return Op(VIEWS, Op(aten.expand.default, Op(aten.unsqueeze.default, p, 2), ANY), ANY) | p


def attention(q, k, v, name: str = "attn"):
    """softmax(q·kᵀ·scale + mask)·v: one `aten.scaled_dot_product_attention`, or HF's eager spelling
    matmul(softmax(matmul(q, kᵀ)·scale + mask), v) (casts around the softmax optional), the scaled scores
    optionally soft-capped (Gemma-2: c·tanh(s/c) before the mask)."""
    scores = Op(aten.matmul.default, q, Op(aten.transpose.int, k, ANY, ANY))
    scaled = Opt(aten.mul.Tensor, scores, Var(None, where=is_number))
    masked = Opt(aten.add.Tensor, soft_cap(scaled) | scaled, ANY)
    probs = Opt(CASTS, Op(aten.softmax.int, masked, -1))
    return Op(SDPA, q, k, v, name=name) | Op(aten.matmul.default, probs, v, name=name)


ATTENTION = attention(Var("q_in"), Var("k_in"), Var("v_in"))

ROPE_SITE = attention(rope(Var("tq"), "tq", "rope_q"), _repeat_kv(rope(Var("tk"), "tk", "rope_k")), ANY)


def _fused_part(role: str):
    fused = linear_of(Var("x"), w="w_qkv", b="b_qkv", name="qkv")
    return (Op(aten.slice.Tensor, fused, ANY, ANY, ANY, name=f"{role}_part")
            | Op(operator.getitem, Op(aten.split.Tensor, Chain(VIEWS, fused, 1), ANY, ANY), ANY,
                 name=f"{role}_part"))


def head_norm(inp, name: str, per_head: bool = True):
    """RMSNorm of a q or k projection: γ · t/√(mean(t²)+ε) where t is `inp` split into heads (Qwen3:
    over head_dim of each head), or `inp` itself with `per_head=False` (OLMo-2: over the whole
    projection, before the split: both reads of t match `inp`, whose captures then name one node). A
    per-head t is captured as `<name>_in`, γ as `<name>_gamma`, the norm as `name`."""
    t = Opt(CASTS, Var(f"{name}_in") if per_head else inp)
    first = Opt(CASTS, Op(HEAD_LAYOUT, inp, name=f"{name}_in") if per_head else inp)
    var = Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, t, 2), [-1], True),
             Var(None, where=is_number))
    core = Op(aten.mul.Tensor, first, Op(aten.rsqrt.default, var))
    return Op(aten.mul.Tensor, Var(f"{name}_gamma", where=is_const), Opt(CASTS, core), name=name)


def _heads(role: str):
    proj = linear_of(Var("x"), w=f"w_{role}", b=f"b_{role}", name=role) | _fused_part(role)
    scaled = Op(aten.mul.Tensor, proj, Var(f"scale_{role}", where=is_number)) | proj  # OPT scales q
    # q and k may pass an RMSNorm on their way to attention, per head (Qwen3) or over the whole
    # projection before the split (OLMo-2); v never does here
    if role in ("q", "k"):
        whole = Chain(HEAD_LAYOUT, head_norm(scaled, f"{role}_norm", per_head=False), 2)
        inner = head_norm(scaled, f"{role}_norm") | whole | Chain(HEAD_LAYOUT, scaled, 2)
    else:
        inner = Chain(HEAD_LAYOUT, scaled, 2)
    return Op(HEAD_LAYOUT, inner, name=f"{role}_heads")


QKV = attention(rope(_heads("q"), "q_heads", "rope_q") | _heads("q"),
                _repeat_kv(rope(_heads("k"), "k_heads", "rope_k") | _heads("k")),
                _repeat_kv(_heads("v")))


def qkv_linears(m) -> dict:
    """{'q': node, 'k': node, 'v': node} or {'qkv': node} for a QKV match."""
    c = m.captures
    if "qkv" in c or "qkv_t" in c:
        return {"qkv": c.get("qkv", c.get("qkv_t"))}
    return {r: c.get(r, c.get(r + "_t")) for r in ("q", "k", "v")}


def output_projection(attn: fx.Node, is_linear, through=HEAD_LAYOUT) -> tuple[fx.Node | None, fx.Node | str]:
    """Follow attention's output through head-layout ops (`through`) to the one linear reading it:
    (linear, last node before it), or (None, why not) — more than one user on the way, or an op that
    is not a pure layout change (and so might mix heads)."""
    n = attn
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None, f"the attention output {describe(attn)} has {len(users)} users"
        u = users[0]
        if is_linear(u):
            return u, n
        if u.op != "call_function" or u.target not in through:
            return None, f"{describe(u)} sits between attention and its output projection"
        n = u
