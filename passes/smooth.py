"""smooth: per-channel scales s > 0 folded exactly on both sides of a point, chosen on calibration text so
that the weights' rounding error lands where the inputs are small (AWQ's search, in the basis the earlier
passes left: after `rotate`, the rotated one).

    γ · n(x) → linears W             ⇒  (γ/s) · n(x) → linears W·diag(s)              (a norm with a scale)
    n(x) → linears W                 ⇒  (1/s) · n(x) → linears W·diag(s)              (one fold-norms emptied:
                                         a per-channel weight after the normalization, which R1 commutes with)
    x·W_vᵀ + b_v → attention → o     ⇒  W_v ← diag(1/s)·W_v, b_v ← b_v/s, per KV head g and dim d;
                                         W_o[:, (h, d)] ← W_o[:, (h, d)]·s[g(h), d] for every query head h
                                         (attention mixes tokens, never features: linear in v)
    act(g) ⊙ (x·W_upᵀ + b_up) → down ⇒  W_up ← diag(1/s)·W_up, b_up ← b_up/s, W_down ← W_down·diag(s)
    … → online Hadamard M → down     ⇒  W_down ← W_down·Mᵀ·diag(s)·M  (R4: the scale sits before M;
                                         (h/s)·M·(W_down·Mᵀ·S·M)ᵀ = h·W_downᵀ·… exactly, M orthogonal)

The points are found by structure (patterns.groups: a norm whose users are all linears, the gated MLP's
gate/up pair; patterns.attention: the q/k/v group and o_proj), never by name. A point is skipped, with a
note, where scaling it is not exact or not wanted: the lm_head's norm (the lm_head is quantized by its own
scheme, and a tied one shares its matrix with the embedding), a weight read elsewhere, a fused q/k/v or
gate/up projection, a Conv1D v/up projection, a path from the MLP's product to down_proj through anything
but casts, views and one online Hadamard.

Choosing s: X = the point's input on `samples` windows of `ctx.calib` (the float program), a = mean |X| per
channel, H = XᵀX. For α in {0, 1/grid, …, 1}: s = a^α / √(max·min) and the consumers' output error
‖(Q(W·S)·S⁻¹ − W)·Xᵀ‖² = tr(Δ·H·Δᵀ) (with R4, Q acts on the stored W·Mᵀ·S·M), Q = RTN with `weights:`
(bits, group_size with quantize's fallback, symmetric, clip: the same words as quantize's `weights:`; the
other keys are accepted so a recipe can copy them, and the search rounds with RTN whatever `method` says).
The α with the least error wins; α = 0 is s = 1, so no point gets worse at the layer level than without the
pass, and a point whose best α is 0 is left as it was.

Exact: certified in float64 (≤ 1e-10) like fold-norms and rotate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput
from spinfx.engine.graph import Program, add_const
from spinfx.engine.match import describe, find_all
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.engine.rule import Rule, apply_rules
from spinfx.kernels.hadamard import hadamard_by_gemm
from spinfx.kernels.quant_rtn import group_for, group_scale_zero, quantize_values
from spinfx.passes.calibration import check_calibration, float_values, restore_threads, token_batches
from spinfx.passes.options import check_fields, check_rounding
from spinfx.patterns.attention import QKV, output_projection, qkv_linears
from spinfx.patterns.common import CASTS, VIEWS, is_linear, linear_input_arg, linear_node, linear_weight
from spinfx.patterns.groups import GATE_UP, norm_linears
from spinfx.patterns.norms import RMSNORM, RMSNORM_ATEN, RMSNORM_PLAIN
from spinfx.patterns.residual import output_linear

aten = torch.ops.aten

POINTS = ("norm", "v-o", "up-down")
WEIGHTS = {"bits": 4, "group_size": 128, "symmetric": True, "clip": "minmax"}
# quantize's other weight options: accepted (a recipe writes one `weights:` in both passes), not used
OTHER_WEIGHT_KEYS = {"method", "act_order", "damp", "target", "target_damp"}


@dataclass(eq=False)
class _Point:
    """One place where a per-channel scale folds exactly: what chooses it and where it goes."""

    kind: str                   # one of POINTS
    x: fx.Node                  # the consumers' input (before R4's Hadamard): its statistics choose s
    consumers: list[fx.Node]    # the linears W ← W·diag(s) (o_proj, down_proj: one)
    expand: torch.Tensor | None = None   # column c of the consumers' input takes s[expand[c]] (GQA's o_proj)
    hadamard: tuple | None = None        # (ks, block, transpose) of the online Hadamard before the consumer
    s: torch.Tensor | None = None        # the chosen scale (float64), None: left as it was
    alpha: float = 0.0
    gain: float = 1.0                    # error with s / error without


@dataclass
class _State:
    prog: Program
    res: PassResult
    points: dict = field(default_factory=dict)  # match root → _Point


# ---- the points, by structure -------------------------------------------------------------------------

NORM_POINT = norm_linears(RMSNORM | RMSNORM_ATEN | RMSNORM_PLAIN)


def _own(w: fx.Node) -> bool:
    return len(w.users) == 1


def norm_point(m, st: _State, head: fx.Node | None) -> _Point | str:
    lins = [linear_node(lm)[0] for lm in m["linears"]]
    if head in lins:
        return "the lm_head's norm (the lm_head has its own scheme; a tied one is the embedding's matrix)"
    if not all(_own(linear_weight(n)) for n in lins):
        return "a linear's weight is read elsewhere (tied)"
    gamma = m.get("gamma")
    if gamma is not None and not _own(gamma):
        return "its scale is read elsewhere"
    return _Point("norm", lins[0].args[linear_input_arg(lins[0])], lins)


def v_o_point(m, st: _State) -> _Point | str:
    lin = qkv_linears(m)
    v = lin.get("v")
    if v is None or v.target is not aten.linear.default:
        return "a fused or Conv1D q/k/v projection"
    o, _ = output_projection(m["attn"], is_linear)
    if o is None or o.target is not aten.linear.default:
        return "no aten.linear o_proj reads the attention output through head-layout ops"
    if not (_own(v.args[1]) and _own(o.args[1]) and (len(v.args) < 3 or v.args[2] is None or _own(v.args[2]))):
        return "a weight is read elsewhere"
    kv, hd = m["v_heads"].meta["val"].shape[1], m["v_heads"].meta["val"].shape[-1]
    q_heads = m["attn"].meta["val"].shape[1]
    if q_heads % kv or o.args[1].meta["val"].shape[1] != q_heads * hd or v.args[1].meta["val"].shape[0] != kv * hd:
        return f"o_proj's input is not {q_heads} heads × {hd} (KV heads {kv})"
    rep = q_heads // kv  # repeat_kv: query head h reads KV head h // rep
    expand = (torch.arange(q_heads)[:, None] // rep * hd + torch.arange(hd)[None, :]).reshape(-1)
    return _Point("v-o", o.args[0], [o], expand=expand)


def up_down_point(m, st: _State) -> _Point | str:
    up = m.get("up")
    if up is None:
        return "a fused gate_up projection"
    if not (_own(up.args[1]) and (len(up.args) < 3 or up.args[2] is None or _own(up.args[2]))):
        return "up's weight is read elsewhere"
    n, hadamard, x = m["glu"], None, m["glu"]
    hop = getattr(getattr(torch.ops, "spinfx", None), "hadamard", None)
    while not is_linear(n):
        users = list(n.users)
        if len(users) != 1:
            return f"{describe(n)} has {len(users)} users on the way to down_proj"
        n = users[0]
        if hop is not None and n.target is hop.default and hadamard is None:
            hadamard = (list(n.args[1]), int(n.args[2]), bool(n.args[3]) if len(n.args) > 3 else False)
            x = n.args[0]
        elif not is_linear(n) and not (n.op == "call_function" and n.target in CASTS + VIEWS):
            return f"{describe(n)} sits between the MLP's product and down_proj"
    if n.target is not aten.linear.default or not _own(n.args[1]):
        return "down_proj is not an aten.linear of its own weight"
    return _Point("up-down", x if hadamard else n.args[0], [n], hadamard=hadamard)


# ---- the rewrites: each reads like its algebra ------------------------------------------------------


def _rows(W: torch.Tensor, t: bool) -> torch.Tensor:
    """A linear's weight as [out, in] (Conv1D stores [in, out])."""
    return W.T if t else W


def scale_columns(prog: Program, lin: fx.Node, s: torch.Tensor) -> None:
    """W ← W·diag(s) (Conv1D's W[in, out]: W ← diag(s)·W)."""
    w = linear_weight(lin)
    W = prog.const(w.target)
    prog.set_const(w.target, s[:, None] * W if lin.target is aten.addmm.default else W * s[None, :])


def scale_rows(prog: Program, lin: fx.Node, s: torch.Tensor) -> None:
    """W ← diag(1/s)·W, b ← b/s (aten.linear only)."""
    w = lin.args[1]
    prog.set_const(w.target, prog.const(w.target) / s[:, None])
    if len(lin.args) > 2 and lin.args[2] is not None:
        prog.set_const(lin.args[2].target, prog.const(lin.args[2].target) / s)


def smooth_norm(m, st: _State):
    """γ ← γ/s (no γ left by fold-norms: γ ← 1/s), W ← W·diag(s) for each linear reading the norm."""
    p = st.points.get(m.root)
    if p is None or p.s is None:
        return None
    prog, s = st.prog, p.s
    gamma = m.get("gamma")
    if gamma is not None:
        prog.set_const(gamma.target, prog.const(gamma.target) / s)
    else:
        _new_scale(prog, m.root, 1.0 / s)
    for lin in p.consumers:
        scale_columns(prog, lin, s)
    return True


def _new_scale(prog: Program, root: fx.Node, gamma: torch.Tensor) -> None:
    """A scale-free norm gets the weight γ: aten.rms_norm's weight argument, else γ · n(x) after its casts
    (as the model class writes `weight * x.to(dtype)`), named `<norm module>.weight` for checkpoints."""
    module = root.meta.get("module") or "smooth"
    g = add_const(prog.gm, f"{module}.weight", gamma.clone())
    if root.target is aten.rms_norm.default:
        root.args = (root.args[0], root.args[1], g, *root.args[3:])
        return
    out = root
    while len(out.users) == 1 and next(iter(out.users)).target in CASTS:
        out = next(iter(out.users))
    with prog.graph.inserting_after(out):
        new = prog.graph.call_function(aten.mul.Tensor, (g, out))
    new.meta = {**out.meta}
    out.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


def smooth_v_o(m, st: _State):
    """W_v ← diag(1/s)·W_v, b_v ← b_v/s per KV head and dim; W_o[:, (h, d)] ← W_o[:, (h, d)]·s[g(h), d]."""
    p = st.points.get(m.root)
    if p is None or p.s is None:
        return None
    scale_rows(st.prog, qkv_linears(m)["v"], p.s)
    scale_columns(st.prog, p.consumers[0], p.s[p.expand])
    return True


def smooth_up_down(m, st: _State):
    """W_up ← diag(1/s)·W_up, b_up ← b_up/s; W_down ← W_down·diag(s) (after R4's online M: W_down·Mᵀ·diag(s)·M)."""
    p = st.points.get(m.root)
    if p is None or p.s is None:
        return None
    scale_rows(st.prog, m["up"], p.s)
    down = p.consumers[0]
    if p.hadamard is None:
        scale_columns(st.prog, down, p.s)
    else:
        w = down.args[1].target
        st.prog.set_const(w, _through_m(_through_m(st.prog.const(w), p.hadamard, back=True) * p.s, p.hadamard))
    return True


def _through_m(W: torch.Tensor, h: tuple, back: bool = False) -> torch.Tensor:
    """W·M (back: W·Mᵀ) for the online Hadamard M of `h` = (ks, block, transpose): the op computes x·M."""
    ks, block, t = h
    return hadamard_by_gemm(W, ks, block, t != back)


NORM_RULES = [Rule("smooth: γ ← γ/s, W ← W·diag(s) (a norm and its linears)", NORM_POINT, smooth_norm)]
V_O_RULES = [Rule("smooth: W_v ← diag(1/s)·W_v, W_o ← W_o·diag(s) per KV head", QKV, smooth_v_o)]
UP_DOWN_RULES = [Rule("smooth: W_up ← diag(1/s)·W_up, W_down ← W_down·diag(s)", GATE_UP, smooth_up_down)]


# ---- choosing s ---------------------------------------------------------------------------------------


def _fake_quantize(W: torch.Tensor, w: dict, dtype: torch.dtype) -> torch.Tensor:
    """dequantize(RTN(W)) of W [N, K], float64: kernels.quant_rtn's group scales (clip included) and codes."""
    n, k = W.shape
    g = group_for(k, w["group_size"]) or k
    wg = W.reshape(n, k // g, g)
    s, z = group_scale_zero(wg, w["bits"], w["symmetric"], dtype, w["clip"])
    q = quantize_values(wg, s[..., None], None if z is None else z[..., None], w["bits"])
    return ((q if z is None else q - z[..., None]) * s[..., None]).reshape(n, k)


def choose(p: _Point, prog: Program, xs: list[torch.Tensor], w: dict, grid: int, dtype: torch.dtype) -> None:
    """s = a^α/√(max·min) with the α of least output error tr(Δ·H·Δᵀ) over the consumers (module docstring)."""
    threads = torch.get_num_threads()  # GEMMs on all threads, the rest on one (calibration.THREADED's reason)
    k = xs[0].shape[-1]
    h = torch.zeros(k, k, dtype=torch.float64)
    a = torch.zeros(k, dtype=torch.float64)
    rows = 0
    for x in xs:
        x = x.reshape(-1, k).float()
        torch.set_num_threads(threads)
        h += (x.T @ x).double()
        torch.set_num_threads(1)
        a += x.abs().sum(0).double()
        rows += x.shape[0]
    h, a = (h / rows).float(), a / rows
    if p.expand is not None:  # a per KV channel: the mean over the query heads reading it
        a = torch.zeros(int(p.expand.max()) + 1, dtype=torch.float64).index_add_(0, p.expand, a) / \
            torch.bincount(p.expand).double()
    a = a.clamp_min(a.max() * 1e-6 + 1e-30)
    ws = [_rows(prog.const(linear_weight(n).target), n.target is aten.addmm.default) for n in p.consumers]
    W0 = torch.cat(ws).double()
    if p.hadamard is not None:  # the weight in x's basis (before M)
        W0 = _through_m(W0, p.hadamard, back=True)
    best = None
    for i in range(grid + 1):
        alpha = i / grid
        s = a ** alpha
        s = s / (s.max() * s.min()).sqrt()
        sc = s if p.expand is None else s[p.expand]
        Ws = W0 * sc[None, :]
        if p.hadamard is not None:
            Q = _through_m(_fake_quantize(_through_m(Ws, p.hadamard), w, dtype), p.hadamard, back=True)
        else:
            Q = _fake_quantize(Ws, w, dtype)
        d = (Q / sc[None, :] - W0).float()
        torch.set_num_threads(threads)
        err = float(((d @ h) * d).sum())
        torch.set_num_threads(1)
        if best is None or err < best[0]:
            best = (err, alpha, s)
        if i == 0:
            base = err
    torch.set_num_threads(threads)
    err, p.alpha, s = best
    p.gain = err / base if base > 0 else 1.0
    p.s = None if p.alpha == 0 else s


# ---- the pass -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Smooth(Pass):
    name = "smooth"
    calibration_words: ClassVar[tuple[str, str]] = ("smooth", "smooth: samples")  # for messages
    certify = True
    changes_weights = True
    # what the search rounds with: quantize's `weights:` words (bits, group_size, symmetric, clip)
    weights: dict = field(default_factory=lambda: dict(WEIGHTS))
    points: list = field(default_factory=lambda: list(POINTS))
    samples: int = 16   # calibration windows
    grid: int = 20      # α ∈ {0, 1/grid, …, 1}

    def validate(self) -> None:
        check_fields(self, self.name)
        w = self.weights
        if not isinstance(w, dict) or set(w) - set(WEIGHTS) - OTHER_WEIGHT_KEYS:
            raise BadInput(f"smooth: weights takes quantize's weight options ({', '.join(WEIGHTS)} are used), "
                           f"got {w!r}")
        w = {**WEIGHTS, **{k: v for k, v in w.items() if k in WEIGHTS}}
        check_rounding(w, "smooth: weights")
        if not isinstance(self.points, (list, tuple)) or not self.points or set(self.points) - set(POINTS):
            raise BadInput(f"smooth: points is a non-empty list of {', '.join(POINTS)}, got {self.points!r}")
        for key in ("samples", "grid"):
            if getattr(self, key) < 1:
                raise BadInput(f"smooth: {key} must be a positive integer, got {getattr(self, key)!r}")

    def calibration_windows(self) -> int:
        return self.samples

    def run(self, prog: Program, ctx: Context) -> PassResult:
        from spinfx.engine.certify import model_dtype

        res = PassResult(self.name, self.options())
        st = _State(prog, res)
        head = output_linear(prog.graph)
        tables = {"norm": (NORM_POINT, NORM_RULES, lambda m: norm_point(m, st, head)),
                  "v-o": (QKV, V_O_RULES, lambda m: v_o_point(m, st)),
                  "up-down": (GATE_UP, UP_DOWN_RULES, lambda m: up_down_point(m, st))}
        skipped: dict[str, list[str]] = {}
        for kind in self.points:
            pattern, _, plan = tables[kind]
            for m in find_all(pattern, prog.graph)[0]:
                p = plan(m)
                if isinstance(p, str):
                    skipped.setdefault(f"{kind}: {p}", []).append(describe(m.root))
                else:
                    st.points[m.root] = p
        for why, where in skipped.items():
            res.notes.append(f"not smoothed ({len(where)}): {why} — {', '.join(where[:2])}"
                             + (", …" if len(where) > 2 else ""))
        if st.points:
            self._choose(prog, ctx, st, model_dtype(prog))
        for kind in ("v-o", "up-down", "norm"):  # weight edits first, the norms' new scales last
            if kind in self.points:
                res.rules += apply_rules(prog.gm, tables[kind][1], st, max_sweeps=1).values()
        return res

    def _choose(self, prog: Program, ctx: Context, st: _State, dtype: torch.dtype) -> None:
        if not isinstance(ctx.calib, torch.Tensor) or ctx.calib.is_floating_point():
            raise BadInput("smooth needs calibration text: pass calib=<1-D tensor of token ids> "
                           "(e.g. spinfx.rewrite(model, recipe, calib=tokens); CLI: --calib FILE)")
        window = next(e.numel() for e in prog.examples if isinstance(e, torch.Tensor) and not e.is_floating_point())
        check_calibration(ctx.calib.numel(), self.samples, window, who=self.calibration_words)
        batches = token_batches(prog, ctx.calib.reshape(-1), limit=self.samples)
        w = {**WEIGHTS, **{k: v for k, v in self.weights.items() if k in WEIGHTS}}
        by_x: dict[fx.Node, list[_Point]] = {}
        for p in st.points.values():
            by_x.setdefault(p.x, []).append(p)
        t0 = last = time.perf_counter()
        done = 0
        for x, values in float_values(prog, batches, list(by_x)):
            for p in by_x[x]:
                with restore_threads():
                    choose(p, prog, values, w, self.grid, dtype)
                done += 1
            if ctx.progress is not None and (time.perf_counter() - last > 10 or done == len(st.points)):
                last = time.perf_counter()
                ctx.progress(f"smooth: {done}/{len(st.points)} points, {last - t0:.0f} s")
        ps = list(st.points.values())
        for kind in POINTS:
            mine = [p for p in ps if p.kind == kind]
            if mine:
                moved = [p for p in mine if p.s is not None]
                st.res.findings[kind] = {
                    "points": len(mine), "scaled": len(moved),
                    "alpha_mean": round(sum(p.alpha for p in mine) / len(mine), 3),
                    "error_ratio_mean": round(sum(p.gain for p in mine) / len(mine), 4)}
        st.res.notes.append(f"smooth: {sum(p.s is not None for p in ps)} of {len(ps)} points scaled "
                            f"(α on a grid of {self.grid + 1}, RTN {w['bits']}-bit {w['clip']}) on {len(batches)} "
                            f"calibration windows, {time.perf_counter() - t0:.0f} s")
