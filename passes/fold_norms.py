"""fold-norms: move every norm's scale (and LayerNorm's shift) into the linears that read it.

    γ · n(x) → linear W            ⇒  n(x) → linear W·diag(γ)                 (RMSNorm)
    (1+w) · n(x) → linear W        ⇒  n(x) → linear W·diag(1+w)               (Gemma)
    γ ⊙ ln(x) + β → linear (W, b)  ⇒  ln(x) → linear (W·diag(γ), b + W·β)    (LayerNorm)

Exact: the norm's output is only read by linears (the NORM_LINEARS sibling group demands that every
user is one), so the scale commutes into their weights. For LayerNorm models the residual stream is
also *centered*: every writer (token and positional embeddings, the linears that add into the
stream) loses its mean over the hidden dimension, so each stream value is zero-mean and the affine-
free LayerNorm equals an RMSNorm with the same eps, which replaces it. Centering is decided by the
norm's op type and is never applied to RMSNorm models (their function would change). It requires
every reader of the stream to be a LayerNorm; otherwise the pass refuses, naming the reader.

Tied weights (lm_head sharing the embedding): `tie="untie"` gives the linear its own copy before
folding; `tie="keep"` leaves that norm's scale in place and says so; `tie="auto"` keeps the tie except
where keeping it must refuse (centering a LayerNorm model's stream changes the embedding alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported
from spinfx.engine.graph import Program, add_const
from spinfx.engine.match import arg, describe, find_all
from spinfx.passes.options import check_fields
from spinfx.patterns.common import LINEAR_OPS, linear_node
from spinfx.patterns.groups import norm_linears
from spinfx.patterns.norms import LAYERNORM, RMSNORM, RMSNORM_1P, RMSNORM_ATEN
from spinfx.patterns.residual import residual_stream
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.engine.rule import Rule, apply_rules

aten = torch.ops.aten


@dataclass
class _State:
    prog: Program
    tie: str
    centered: set          # stream values known to be zero-mean
    res: PassResult


# ---- weight edits -------------------------------------------------------------------------------


def own_weight(st: _State, node: fx.Node, arg: int, untie: bool = False) -> str | None:
    """The FQN of `node.args[arg]`, a weight this node may now change alone (None: shared and kept
    tied — tie: keep or auto, unless `untie`).

    A shared weight (tied embedding / lm_head) is untied: the linear reader gets a copy named after
    its module (its alias from the original model when there is one); the embedding keeps the name.
    """
    w = node.args[arg]
    if len(w.users) == 1:
        return w.target
    if st.tie != "untie" and not untie:
        return None
    movers = [node] if node.target in LINEAR_OPS else [u for u in w.users if u is not node]
    mine = w.target
    for u in movers:
        fqn = _copy_for(st, u, w)
        if u is node:
            mine = fqn
    return mine


def _copy_for(st: _State, user: fx.Node, w: fx.Node) -> str:
    prog = st.prog
    module = user.meta.get("module") or w.target.rsplit(".", 1)[0]
    alias = [a for a in prog.aliases.get(w.target, []) if a.rsplit(".", 1)[0] == module]
    fqn = alias[0] if alias else f"{module}.weight"
    if fqn in dict(prog.gm.named_buffers()):
        fqn = f"{module}.weight_untied"
    node = add_const(prog.gm, fqn, prog.const(w.target).clone())
    user.replace_input_with(w, node)
    if alias:
        prog.aliases[w.target].remove(fqn)
    st.res.notes.append(f"untied {fqn} from {w.target} (tie: untie)")
    return fqn


def set_bias(st: _State, lin: fx.Node, transposed: bool, value: torch.Tensor) -> None:
    """Add `value` to the linear's bias, creating the bias if the linear had none."""
    prog = st.prog
    b = lin.args[0] if transposed else (lin.args[2] if len(lin.args) > 2 else None)
    if b is not None:
        prog.set_const(b.target, prog.const(b.target) + value)
        return
    module = lin.meta.get("module") or "folded"
    node = add_const(prog.gm, f"{module}.bias", value.clone())
    lin.args = (lin.args[0], lin.args[1], node)


def scale_inputs(st: _State, lm, gamma: torch.Tensor, beta: torch.Tensor | None) -> bool:
    lin, transposed = linear_node(lm)
    warg = 2 if transposed else 1
    fqn = own_weight(st, lin, warg)
    if fqn is None:
        return False
    W = st.prog.const(fqn)
    if beta is not None:  # b + W·β, with W before scaling
        set_bias(st, lin, transposed, beta @ W if transposed else W @ beta)
    st.prog.set_const(fqn, gamma[:, None] * W if transposed else W * gamma[None, :])
    return True


# ---- rewrites -----------------------------------------------------------------------------------


def _fold_into_linears(m, st: _State, gamma: torch.Tensor, beta: torch.Tensor | None) -> bool:
    linears = m["linears"]
    shared = [lm for lm in linears if len(linear_node(lm)[0].args[2 if linear_node(lm)[1] else 1].users) > 1]
    if shared and st.tie != "untie":
        why = (f"{describe(m.root)}: kept its scale — {describe(linear_node(shared[0])[0])} "
               f"reads a tied weight (tie: {st.tie})")
        if why not in st.res.refusals:  # the fixed-point sweep meets it again
            st.res.refusals.append(why)
        return False
    for lm in linears:
        scale_inputs(st, lm, gamma, beta)
    return True


def fold_rms(m, st: _State):
    g = m["gamma"]
    if not _fold_into_linears(m, st, st.prog.const(g.target), None):
        return None
    root = m.root
    other = next(a for a in root.args[:2] if a is not g)
    return other  # γ·n → n


def fold_rms1p(m, st: _State):
    if not _fold_into_linears(m, st, 1.0 + st.prog.const(m["gamma1p"].target), None):
        return None
    return next(a for a in m.root.args[:2] if a is not m["one_plus"])  # n·(1+w) → n


def fold_rms_aten(m, st: _State):
    g = m["gamma"]
    if not _fold_into_linears(m, st, st.prog.const(g.target), None):
        return None
    root = m.root
    with root.graph.inserting_before(root):
        new = root.graph.call_function(aten.rms_norm.default, (root.args[0], root.args[1], None, arg(root, 3)))
    new.meta = dict(root.meta)
    return new


def fold_layer(m, st: _State):
    gamma, beta = m["gamma"], m["beta"]
    if gamma is None and beta is None:
        return None
    prog = st.prog
    d = m.root.meta["val"].shape[-1]
    g = prog.const(gamma.target) if gamma is not None else torch.ones(d, dtype=torch.float64)
    b = prog.const(beta.target) if beta is not None else None
    if not _fold_into_linears(m, st, g, b):
        return None
    return _affine_free(m.root, st)


def layer_to_rms(m, st: _State):
    """An affine-free LayerNorm of a centered stream value is an RMSNorm."""
    if m["gamma"] is not None or m["beta"] is not None or m["x"] not in st.centered:
        return None
    return _affine_free(m.root, st)


def _affine_free(root: fx.Node, st: _State) -> fx.Node:
    x, shape, eps = root.args[0], root.args[1], arg(root, 4)
    with root.graph.inserting_before(root):
        if x in st.centered:
            new = root.graph.call_function(aten.rms_norm.default, (x, shape, None, eps))
        else:
            new = root.graph.call_function(aten.layer_norm.default, (x, shape, None, None, eps))
    new.meta = dict(root.meta)
    return new


# ---- centering the stream (LayerNorm models) ----------------------------------------------------


def center_stream(st: _State, stream, layer_norm_roots: set) -> None:
    prog = st.prog
    for r in stream.readers:
        if r.op == "output" or r in layer_norm_roots:
            continue
        raise Unsupported(f"cannot center the residual stream of a LayerNorm model: {describe(r)} reads it "
                          f"and is not a LayerNorm (centering would change its input)")
    emb = stream.embedding
    writers = [("embedding", emb)] + [(w.kind, w.node) for w in stream.writers]
    for kind, node in writers:
        if kind == "embedding":
            fqn = _own(st, node, 0)
            E = prog.const(fqn)
            prog.set_const(fqn, E - E.mean(dim=1, keepdim=True))
        else:
            transposed = kind == "linear_t"
            fqn = _own(st, node, 2 if transposed else 1)
            W = prog.const(fqn)
            prog.set_const(fqn, W - W.mean(dim=1 if transposed else 0, keepdim=True))
            b = node.args[0] if transposed else (node.args[2] if len(node.args) > 2 else None)
            if b is not None:
                prog.set_const(b.target, prog.const(b.target) - prog.const(b.target).mean())
    st.centered.update(stream.values)
    st.res.notes.append(f"centered the residual stream: {len(writers)} writers lose their mean "
                        f"(LayerNorm model; LayerNorm → RMSNorm)")


def _own(st: _State, node: fx.Node, arg: int) -> str:
    fqn = own_weight(st, node, arg, untie=st.tie == "auto")  # auto: untie only where keeping must refuse
    if fqn is None:
        raise Unsupported(f"cannot center {describe(node)}: its weight {node.args[arg].target} is tied "
                          f"(tie: keep); use tie: untie")
    return fqn


@dataclass(frozen=True)
class FoldNorms(Pass):
    name = "fold-norms"
    certify = True
    changes_weights = True
    tie: str = "untie"

    def rules(self) -> list[Rule]:
        return [
            Rule("fold-rms", norm_linears(RMSNORM), fold_rms),
            Rule("fold-rms-1p", norm_linears(RMSNORM_1P), fold_rms1p),
            Rule("fold-rms-aten", norm_linears(RMSNORM_ATEN), fold_rms_aten),
            Rule("fold-layernorm", norm_linears(LAYERNORM), fold_layer),
            Rule("layernorm-to-rms", LAYERNORM, layer_to_rms),
        ]

    def streams(self) -> bool:
        return True  # γ into the linears of its own block; centering is per row of the table / per tensor

    def validate(self) -> None:
        check_fields(self, self.name)
        if self.tie not in ("untie", "keep", "auto"):
            raise BadInput(f"fold-norms: tie must be 'untie', 'keep' or 'auto', not {self.tie!r}")

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        st = _State(prog, self.tie, set(), res)
        stream = residual_stream(prog.graph)
        ln_roots = {m.root for m in find_all(LAYERNORM, prog.graph)[0]}
        reads_stream = {r for r in stream.readers if r in ln_roots}
        if reads_stream:
            center_stream(st, stream, ln_roots)
        res.rules = list(apply_rules(prog.gm, self.rules(), st).values())
        return res
