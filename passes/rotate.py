"""rotate: SpinQuant/QuaRot rotations placed from the graph, certified exact.

R1 (hidden × hidden) on the residual stream: every stream value x becomes x·R1. Writers change so
they write rotated values — embeddings E ← E·R1, writer linears W ← R1ᵀ·W and b ← R1ᵀ·b — and
readers undo it inside their weights — each linear after a stream-reading norm W ← W·R1. Sound only
if every reader is a *scale-free* RMSNorm (rms(x·R) = rms(x)·R) feeding only linears and every writer
is a linear or an embedding: anything else is refused, naming the node.

R2 (head_dim × head_dim, one per layer) on the value path: v_proj's rows of every *KV* head
W_v[h] ← R2ᵀ·W_v[h] (and its bias), o_proj's columns of every *query* head W_o[:, h] ← W_o[:, h]·R2.
Attention mixes tokens, never features, so o_h·R2 reaches o_proj intact. Sound only when the v path
goes linear → heads → (repeat_kv) → attention → heads → o_proj with nothing else on it.

R3: an online Hadamard (spinfx::hadamard) on q and k *after* RoPE — q·H·(k·H)ᵀ = q·kᵀ — so the KV
cache holds rotated keys. R4: an online Hadamard on down_proj's input with W_down ← W_down·H.

Each edit is a rule (`R1_RULES` … `R4_RULES`: a pattern and a rewrite that reads like its algebra), driven
by the engine, which counts its matches and applications for the report and SPINFX_TRACE. What no local
pattern can decide — R1's soundness over the whole stream, which linears are the MLP's down projections
— is analysed first (`r1_plan`, `mlp_down_projections`); the rewrites decline what it did not select.

Weight arithmetic is float64 (the pipeline's master weights); the pass is certified in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported
from spinfx.engine.graph import Program, add_const
from spinfx.kernels.hadamard import HadamardRotation
from spinfx.engine.match import describe, find_all
from spinfx.passes.options import check_fields, check_rounding
from spinfx.patterns.attention import ATTENTION, QKV, ROPE_SITE, output_projection, qkv_linears
from spinfx.patterns.common import CASTS, EMBEDDING, HEAD_LAYOUT, LINEAR, LINEAR_OPS, is_linear, linear_node
from spinfx.patterns.groups import SCALE_FREE_LINEARS
from spinfx.patterns.norms import NORM, norm_kind
from spinfx.patterns.residual import residual_stream
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.engine.rule import Rule, RuleStats, apply_rules

aten = torch.ops.aten


KINDS = ("hadamard", "random", "none")  # r1 / r2: a randomized Hadamard, a seeded random orthogonal, none


def make_rotation(kind: str, n: int, seed: int):
    """An n×n orthonormal float64 rotation R, used as `X @ R` and `R.T @ X`: 'hadamard' (randomized
    Hadamard, applied through the fast transform: kernels.hadamard.HadamardRotation), 'random' (a seeded
    QR matrix)."""
    from spinfx.kernels import hadamard as H

    if kind == "hadamard":
        return H.HadamardRotation.randomized(n, seed)
    if kind == "random":
        return H.random_orthogonal(n, seed)
    raise Unsupported(f"rotation kind must be 'hadamard', 'random' or 'none', not {kind!r}")


class _Weights:
    """Edits of named constants, refusing to transform one tensor twice in different roles."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.done: dict[str, str] = {}

    def edit(self, node: fx.Node, role: str, fn) -> None:
        fqn = node.target
        if fqn in self.done and self.done[fqn] != role:
            raise Unsupported(f"{fqn} is used as {self.done[fqn]} and as {role}: rotating it for one "
                              f"would break the other (untie it first: fold-norms tie: untie)")
        self.done[fqn] = role
        self.apply(fqn, fn)

    def apply(self, fqn: str, fn) -> None:
        self.prog.set_const(fqn, fn(self.prog.const(fqn)))


def _lin(node: fx.Node) -> tuple[fx.Node, fx.Node | None, bool]:
    """(weight node, bias node, transposed) of a linear / Conv1D addmm."""
    if node.target is aten.addmm.default:
        return node.args[2], node.args[0], True
    return node.args[1], (node.args[2] if len(node.args) > 2 else None), False


# ---- the rules' state: what the global analyses decided, where the weight edits go ----------------


@dataclass
class _State:
    prog: Program
    res: PassResult
    R1: object = None                      # n×n rotation of the residual stream (None: no R1)
    w1: _Weights | None = None             # where R1's weight edits go
    r2: object = None                      # r2(site, head_dim): a site's R2 (None: no R2)
    w2: _Weights | None = None             # where R2's weight edits go
    stream: object = None                  # the residual stream (patterns.residual.Stream), for R1
    tied: bool = False                     # the token embedding is also the lm_head (tie: keep)
    writers: set = field(default_factory=set)       # what writes the stream: embeddings and linears
    readers: set = field(default_factory=set)       # the scale-free norms that read it
    downs: set = field(default_factory=set)         # the MLP down projections (R4)
    block: int | None = None                        # R4's Hadamard block
    w4: _Weights | None = None                      # where R4's weight edits go
    done: set = field(default_factory=set)          # the writers / down projections rewritten
    sites: int = 0                                  # attention sites given their R2 so far
    plans: dict = field(default_factory=lambda: {"r3": set(), "r4": set()})


# ---- R1: the global precondition, then one rule per kind of stream writer and reader ---------------


def r1_plan(st: _State) -> None:
    """Sound only if every reader of the stream is a scale-free RMSNorm feeding linears and every writer
    is a linear or an embedding (module docstring); anything else is refused here, naming the node."""
    g = st.prog.graph
    stream = residual_stream(g)
    if stream.end is None:
        raise Unsupported(f"R1: the residual stream could not be followed: {stream.stop_reason}")
    owner = {n: m for m in find_all(SCALE_FREE_LINEARS, g)[0] for n in m.nodes}
    tied = [u for u in stream.embedding.args[0].users if u.target in LINEAR_OPS]
    # a tied embedding is rotated online and un-rotated before the final norm, which then reads the
    # original stream: it is exempt from the scale-free requirement
    tail = set(stream.values[stream.values.index(stream.end):])  # the end and its casts/views
    exempt = {r for r in stream.readers if tied and any(a in tail for a in r.all_input_nodes)}
    readers: list = []
    for r in stream.readers:
        if r in exempt:
            continue
        if r in owner:
            if owner[r].root not in readers:
                readers.append(owner[r].root)
            continue
        scaled = [m for m in find_all(NORM, g)[0] if r in m.nodes]
        why = (f"it is a norm with a scale ({norm_kind(scaled[0])}); fold the norms first" if scaled else
               "it is not a scale-free RMSNorm feeding only linears (e.g. a post-norm or a non-linear reader)")
        raise Unsupported(f"R1: {describe(r)} reads the residual stream and {why}")
    st.stream, st.tied, st.readers = stream, bool(tied), set(readers)
    st.writers = {stream.embedding} | {w.node for w in stream.writers}
    st.res.findings["r1"] = {"dim": st.R1.shape[0], "writers": len(stream.writers) + 1, "reader_norms": len(readers)}


def rotate_table(m, st: _State):
    """E ← E·R1: the embedding writes rotated rows into the stream."""
    if m.root not in st.writers or (st.tied and m.root is st.stream.embedding):
        return None
    R = st.R1
    st.w1.edit(m["table"], "embedding", lambda E: E @ R)
    st.done.add(m.root)
    return True


def rotate_lookup(m, st: _State):
    """x ← x·R1 after a tied embedding's lookup, x ← x·R1ᵀ before the final norm (one matrix stays stored)."""
    if not st.tied or m.root is not st.stream.embedding:
        return None
    _online_embedding(st.prog, st.stream, st.R1, st.res)
    st.done.add(m.root)
    return True


def rotate_writer(m, st: _State):
    """W ← R1ᵀ·W, b ← R1ᵀ·b (Conv1D's W[in, out]: W ← W·R1): the linear writes x·R1 into the stream."""
    lin, t = linear_node(m)
    if lin not in st.writers:
        return None
    R = st.R1
    st.w1.edit(m["w"], "stream writer", (lambda W: W @ R) if t else (lambda W: R.T @ W))
    if m["b"] is not None:
        st.w1.edit(m["b"], "stream writer bias", lambda b: b @ R)
    st.done.add(lin)
    return True


def rotate_readers(m, st: _State):
    """W ← W·R1 (Conv1D: W ← R1ᵀ·W) for each linear after a scale-free norm of the stream:
    rms(x·R1) = rms(x)·R1, and the weight undoes R1."""
    if m.root not in st.readers:
        return None
    R, table = st.R1, st.stream.embedding.args[0]
    for lm in m["linears"]:
        if lm["w"] is table and st.tied:
            continue  # the tied lm_head reads the un-rotated stream (see _online_embedding)
        t = "linear_t" in lm.captures
        st.w1.edit(lm["w"], "stream reader", (lambda W: R.T @ W) if t else (lambda W: W @ R))
    return True


def _online_embedding(prog: Program, stream, R, res: PassResult) -> None:
    """Tied embedding kept whole: rotate after the lookup, un-rotate before the final norm."""
    g = prog.graph
    emb = stream.embedding
    R = R if isinstance(R, torch.Tensor) else R.dense()
    rot = add_const(prog.gm, "spinfx.r1", R.clone())
    with g.inserting_after(emb):
        new = g.call_function(aten.matmul.default, (emb, rot))
    new.meta = dict(emb.meta)
    emb.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    end = stream.end
    rot_t = add_const(prog.gm, "spinfx.r1_t", R.T.contiguous().clone())
    with g.inserting_after(end):
        back = g.call_function(aten.matmul.default, (end, rot_t))
    back.meta = dict(end.meta)
    for u in list(end.users):
        if u is not back and u.op != "output":
            u.replace_input_with(end, back)
    res.notes.append("R1 on a tied embedding (tie: keep): applied online after the lookup and undone "
                     "before the final norm, so one matrix is stored")


# ---- R2 -------------------------------------------------------------------------------------------



# ---- R2: one rule per attention site --------------------------------------------------------------


def _o_proj(attn: fx.Node) -> fx.Node:
    o, why = output_projection(attn, is_linear)
    if o is None:
        raise Unsupported(f"R2: {why}; o_proj must read it through head-layout ops only (they keep heads apart)")
    return o


def fixed_r2(kind: str, seed: int, site_base: int = 0):
    """R2 of each attention site: `kind` seeded per layer of the whole model (site_base: the index of the
    program's first block), as `rotation(site, head_dim)`."""
    return lambda i, hd: make_rotation(kind, hd, seed + 1000 + site_base + i)


def rotate_v_o(m, st: _State):
    """W_v[h] ← R2ᵀ·W_v[h] for every KV head h (and its bias), W_o[:, h] ← W_o[:, h]·R2 for every query
    head: attention mixes tokens, never features, so v·R2 reaches o_proj, which undoes it."""
    i, st.sites = st.sites, st.sites + 1
    vh = m["v_heads"].meta["val"]            # [B, kv, S, hd]
    kv, hd = vh.shape[1], vh.shape[-1]
    q_heads = m["attn"].meta["val"].shape[1]
    R = st.r2(i, hd)
    lin = qkv_linears(m)
    v_node, start = (lin["qkv"], _part_start(m.get("v_part"))) if "qkv" in lin else (lin["v"], 0)
    wn, bn, t = _lin(v_node)

    def rot_rows(M):
        M = M.clone()
        if t:  # Conv1D: output features are columns
            blk = M[:, start:start + kv * hd].reshape(M.shape[0], kv, hd)
            M[:, start:start + kv * hd] = (blk @ R).reshape(M.shape[0], kv * hd)
        else:
            blk = M[start:start + kv * hd].reshape(kv, hd, -1)
            M[start:start + kv * hd] = (R.T @ blk).reshape(kv * hd, -1)
        return M

    def rot_bias(b):
        b = b.clone()
        b[start:start + kv * hd] = (b[start:start + kv * hd].reshape(kv, hd) @ R).reshape(-1)
        return b

    st.w2.edit(wn, f"v rows (layer site {i})", rot_rows)
    if bn is not None:
        st.w2.edit(bn, f"v bias (layer site {i})", rot_bias)
    own, _, ot = _lin(_o_proj(m["attn"]))

    def rot_cols(M):
        if ot:  # Conv1D: input features are rows
            return (R.T @ M.reshape(q_heads, hd, -1)).reshape(q_heads * hd, -1)
        return (M.reshape(M.shape[0], q_heads, hd) @ R).reshape(M.shape[0], q_heads * hd)

    st.w2.edit(own, f"o columns (layer site {i})", rot_cols)
    return True


def _part_start(part: fx.Node) -> int:
    if part.target is aten.slice.Tensor:
        return int(part.args[2])
    # getitem(split(fused, size), idx)
    split, idx = part.args[0], part.args[1]
    size = split.args[1]
    return int(size) * int(idx) if isinstance(size, int) else int(sum(size[:idx]))


# ---- R3, R4: online Hadamards ---------------------------------------------------------------------


def rotate_qk(m, st: _State):
    """q ← q·H, k ← k·H after RoPE: q·H·(k·H)ᵀ = q·kᵀ, and the KV cache holds rotated keys."""
    return _hadamard_after(m, st, "rope_q", "rope_k")


def rotate_qk_inputs(m, st: _State):
    """q ← q·H, k ← k·H at attention's inputs (no RoPE: nothing sits between the projections and attention)."""
    return _hadamard_after(m, st, "q_in", "k_in")


def _hadamard_after(m, st: _State, *keys: str) -> bool:
    for key in keys:
        x = m[key]
        p = _plan(x.meta["val"].shape[-1], "R3")
        st.plans["r3"].add(p.describe())
        h = _online(x.graph, x, p)
        x.replace_all_uses_with(h, delete_user_cb=lambda u: u is not h)
    return True


def rotate_down(m, st: _State):
    """x ← x·H before the MLP's down projection (online), W ← W·H (Conv1D's W[in, out]: W ← Hᵀ·W):
    (x·H)·(W·H)ᵀ = x·Wᵀ."""
    d, t = linear_node(m)
    if d not in st.downs:
        return None
    x = d.args[1 if t else 0]
    p = _plan(x.meta["val"].shape[-1], f"R4 at {describe(d)}", st.block)
    st.plans["r4"].add(p.describe())
    H = HadamardRotation(p)  # the online op's matrix, applied to the weight through the same transform
    d.replace_input_with(x, _online(d.graph, x, p, before=d))
    st.w4.edit(m["w"], "down projection", (lambda W: H.T @ W) if t else (lambda W: W @ H))
    st.done.add(d)
    return True


def _online(g: fx.Graph, x: fx.Node, plan, before: fx.Node | None = None) -> fx.Node:
    """Insert spinfx::hadamard(x) (x @ M over the last dim) right after x, or right before `before`."""
    import spinfx.kernels.hadamard  # noqa: F401  (registers torch.ops.spinfx.hadamard)

    ctx = g.inserting_before(before) if before is not None else g.inserting_after(x)
    with ctx:
        h = g.call_function(torch.ops.spinfx.hadamard.default, (x, list(plan.ks), plan.block, False))
    h.meta = {"val": x.meta["val"], "module": x.meta.get("module", ""), "module_type": "online-hadamard"}
    return h


def _plan(n: int, what: str, block: int | None = None):
    from spinfx.kernels.hadamard_matrices import plan

    try:
        return plan(n, block)
    except ValueError as e:
        raise Unsupported(f"{what}: no Hadamard transform of size {n}: {e}") from None


def _reads_attention(node: fx.Node, attn_roots: set) -> bool:
    x = node.args[1] if node.target is aten.addmm.default else node.args[0]
    while x.op == "call_function" and x.target in HEAD_LAYOUT + CASTS:
        x = x.args[0]
    return x in attn_roots


def mlp_down_projections(prog: Program) -> list[fx.Node]:
    """Linears that write the MLP's output into the residual stream (not attention's o_proj)."""
    stream = residual_stream(prog.graph)
    attn_roots = {m.root for m in find_all(ATTENTION, prog.graph)[0]}
    downs = [w.node for w in stream.writers
             if w.node.target in LINEAR_OPS and not _reads_attention(w.node, attn_roots)]
    if not downs:
        why = "" if stream.end is not None else f" (the stream could not be followed: {stream.stop_reason})"
        raise Unsupported(f"R4: no MLP down projection writes into the residual stream{why}")
    return downs


# ---- the rule tables, and the pass's order of them --------------------------------------------------

R1_RULES = [
    Rule("R1: E ← E·R1 (an embedding writes the stream)", EMBEDDING, rotate_table),
    Rule("R1: x ← x·R1 after a tied embedding's lookup, ·R1ᵀ before the final norm", EMBEDDING, rotate_lookup),
    Rule("R1: W ← R1ᵀ·W (a linear writes the stream)", LINEAR, rotate_writer),
    Rule("R1: W ← W·R1 (linears read a scale-free norm of the stream)", SCALE_FREE_LINEARS, rotate_readers),
]
R2_RULES = [Rule("R2: W_v ← R2ᵀ·W_v per KV head, W_o ← W_o·R2 per head", QKV, rotate_v_o)]
R3_RULES = [Rule("R3: q ← q·H, k ← k·H after RoPE (online)", ROPE_SITE, rotate_qk)]
R3_NO_ROPE = [Rule("R3: q ← q·H, k ← k·H at attention's inputs (online)", ATTENTION, rotate_qk_inputs)]
R4_RULES = [Rule("R4: x ← x·H before down_proj (online), W ← W·H", LINEAR, rotate_down)]


def _drive(st: _State, rules: list[Rule]) -> list[RuleStats]:
    """Each match rewritten once (weight edits are not idempotent); the engine's counts go to the report."""
    stats = list(apply_rules(st.prog.gm, rules, st, max_sweeps=1).values())
    st.res.rules += stats
    return stats


def _all_done(st: _State, wanted: set, what: str) -> None:
    missed = [n for n in st.prog.graph.nodes if n in wanted and n not in st.done]
    if missed:
        raise Unsupported(f"{what}: {describe(missed[0])} is in a form no rule rewrites")


def place(prog: Program, res: PassResult, R1, r2, r3: bool = False, r4: bool = False,
          r4_block: int | None = None, w1: _Weights | None = None, w2: _Weights | None = None) -> None:
    """The rotations in their order: R1 (an n×n rotation; None: none), R2 (`r2(site, head_dim)` gives a
    site's; None: none), R3, R4 — each a table of rules. `w1` / `w2`: where R1's / R2's weight edits go
    (default: the program's constants, now; learned rotations record them instead: passes/rotate_learn.py)."""
    st = _State(prog, res, R1, w1 or _Weights(prog), r2, w2 or _Weights(prog), block=r4_block, w4=_Weights(prog))
    st.downs = set(mlp_down_projections(prog)) if r4 else set()  # found before R1 edits the stream
    if R1 is not None:
        r1_plan(st)
        _drive(st, R1_RULES)
        _all_done(st, st.writers, "R1: a writer of the residual stream")
    if r2 is not None:
        if not _drive(st, R2_RULES)[0].matches:
            raise Unsupported("R2: no attention with q/k/v projections of one input was found")
        res.findings["r2"] = {"sites": st.sites}
    if r3:
        found = _drive(st, R3_RULES)[0].applied
        if not found:
            # no RoPE (learned positions): nothing sits between the projections and attention, so the
            # rotation goes on attention's q and k inputs directly
            found = _drive(st, R3_NO_ROPE)[0].applied
            if not found:
                raise Unsupported("R3: no attention site (scaled_dot_product_attention or matmul-softmax-matmul) "
                                  "was found")
            res.notes.append("R3: the model has no RoPE; q and k are rotated at attention's inputs")
        res.findings["r3"] = {"sites": found, "hadamard": ", ".join(sorted(st.plans["r3"]))}
    if r4:
        _drive(st, R4_RULES)
        _all_done(st, st.downs, "R4: a down projection")
        res.findings["r4"] = {"sites": len(st.downs), "hadamard": ", ".join(sorted(st.plans["r4"]))}


LEARNED = "learned"  # r1 / r2: optimized on calibration text through the fake-quantized program
LEARN_WEIGHTS = {"bits": 4, "group_size": 128, "symmetric": True}  # what the later quantize pass rounds to


@dataclass(frozen=True)
class Rotate(Pass):
    name = "rotate"
    calibration_words: ClassVar[tuple[str, str]] = ("rotate: learned", "rotate: windows")  # for messages
    certify = True
    changes_weights = True
    r1: str = "hadamard"
    r2: str = "hadamard"
    r3: bool = False
    r4: bool = False
    # R4's Hadamard block (None: exact when constructible). Tensor parallelism needs a block that
    # divides I/T so the online transform stays rank-local (a block-diagonal rotation is still exact).
    r4_block: int | None = None
    seed: int = 0
    # learned rotations (r1 / r2: learned; passes/rotate_learn.py): `steps` Adam steps of learning rate
    # `lr` on `windows` windows of calibration text, through the weights as RTN will round them (`weights`:
    # the quantize pass's bits / group_size / symmetric; the group falls back as quantize's does). Defaults:
    # SmolLM2 W4 g64 Hamlet ppl 85.50 (Hadamard) → 63.93, 13 min on 1 loaded CPU thread (bench_quality w4-spinL24-rtn)
    steps: int = 24
    lr: float = 0.003
    windows: int = 4
    weights: dict = field(default_factory=lambda: dict(LEARN_WEIGHTS))

    def learns(self) -> bool:
        return LEARNED in (self.r1, self.r2)

    def calibration_windows(self) -> int:
        return self.windows if self.learns() else 0

    def streams(self) -> bool:
        # fixed: R1 from (hidden, seed), R2 from (head_dim, seed, layer index: ctx.site_base), R4 from shapes;
        # learned: trained on the whole model
        return not self.learns()

    def validate(self) -> None:
        check_fields(self, self.name)
        for key in ("r1", "r2"):
            if getattr(self, key) not in KINDS + (LEARNED,):
                raise BadInput(f"rotate: {key} must be {' or '.join(map(repr, KINDS + (LEARNED,)))}, "
                               f"got {getattr(self, key)!r}")
        if self.r4_block is not None and self.r4_block < 1:
            raise BadInput(f"rotate: r4_block must be a positive integer or null, got {self.r4_block!r}")
        for key in ("steps", "windows"):
            if getattr(self, key) < 1:
                raise BadInput(f"rotate: {key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise BadInput(f"rotate: lr must be a positive number, got {self.lr!r}")
        w = self.weights
        if not isinstance(w, dict) or set(w) - set(LEARN_WEIGHTS):
            raise BadInput(f"rotate: weights takes {{bits, group_size, symmetric}} (what quantize will round to), "
                           f"got {w!r}")
        w = {**LEARN_WEIGHTS, **w}
        check_rounding(w, "rotate: weights")

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        stream = residual_stream(prog.graph) if self.r1 != "none" else None
        if stream is not None and stream.end is None:  # R1's refusal first: it names what stops the stream
            raise Unsupported(f"R1: the residual stream could not be followed: {stream.stop_reason}")
        learned = None
        if self.learns():
            from spinfx.passes.rotate_learn import learn

            learned = learn(self, prog, ctx, res)  # R1 and each site's R2 in float64, exactly orthogonal
        R1 = None
        if stream is not None:
            hidden = stream.embedding.meta["val"].shape[-1]
            R1 = learned.r1 if self.r1 == LEARNED else make_rotation(self.r1, hidden, self.seed)
        r2 = None
        if self.r2 == LEARNED:
            r2 = lambda i, hd: learned.r2[i]  # noqa: E731
        elif self.r2 != "none":
            r2 = fixed_r2(self.r2, self.seed, ctx.site_base)
        place(prog, res, R1, r2, self.r3, self.r4, self.r4_block)
        return res

