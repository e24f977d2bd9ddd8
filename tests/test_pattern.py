"""The pattern DSL and matcher on small hand-made graphs: every feature, and its miss reasons."""
import pytest
import torch

import spinfx
from spinfx.engine.match import Index, find_all, match_at, Match
from spinfx.engine.pattern import ANY, Op, Opt, Siblings, Var, is_const, is_number
from spinfx.engine.rule import Rule, apply_rules, find
from spinfx.engine.errors import SpinfxError

aten = torch.ops.aten


class Block(torch.nn.Module):
    """norm -> (a, b, c) linears, plus an optional cast and a scaled add."""

    def __init__(self, d=8, cast=False, extra=False):
        super().__init__()
        self.g = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.a, self.b, self.c = (torch.nn.Linear(d, d) for _ in range(3))
        self.cast, self.extra = cast, extra

    def forward(self, x):
        h = x.to(torch.float64) if self.cast else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = h.to(x.dtype) if self.cast else h
        n = self.g * h
        m = n * 2.0 if self.extra else n
        return self.a(m) + self.b(n) + self.c(n)


def prog(**kw):
    return spinfx.trace(Block(**kw), example_inputs=(torch.randn(2, 8),))


X, EPS = Var("x"), Var("eps", where=is_number)
CORE = Op(aten.mul.Tensor, Opt(aten._to_copy.default, X),
          Op(aten.rsqrt.default, Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, Opt(aten._to_copy.default, X), 2), [-1], True), EPS)))
NORM = Op(aten.mul.Tensor, Var("g", where=is_const), Opt(aten._to_copy.default, CORE), name="norm")
LIN = Op(aten.linear.default, Var("n"), Var("w", where=is_const), Var("bias"), name="lin")


def test_captures_and_same_name():
    p = prog()
    found, _ = find_all(NORM, p.graph)
    assert len(found) == 1
    m = found[0]
    assert m["eps"] == 1e-6 and m["g"].target == "g"
    assert m["x"].op == "placeholder"  # both uses of x bound to the same node


def test_optional_cast_both_ways():
    assert len(find_all(NORM, prog(cast=True).graph)[0]) == 1
    assert len(find_all(NORM, prog(cast=False).graph)[0]) == 1


def test_commutative_order():
    # the graph has mul(g, h); a pattern written mul(h, g) still matches
    swapped = Op(aten.mul.Tensor, CORE, Var("g", where=is_const))
    assert len(find_all(swapped, prog().graph)[0]) == 1
    no_comm = Op(aten.mul.Tensor, CORE, Var("g", where=is_const), commutative=False)
    found, miss = find_all(no_comm, prog().graph)
    assert not found and miss is not None


def test_constraint_reason_in_miss():
    pat = Op(aten.mul.Tensor, Var("g", where=is_number), CORE)
    found, miss = find_all(pat, prog().graph)
    assert not found
    assert "is not a Python number" in miss.describe()
    assert miss.at.op in ("get_attr", "placeholder")  # the value that failed the constraint is named


def test_alternatives():
    other = Op(aten.div.Tensor, X, X)
    found, _ = find_all(other | NORM, prog().graph)
    assert len(found) == 1


def test_siblings_all_users_and_miss_names_node():
    sib = Siblings(NORM, Op(aten.linear.default, Var("nout"), Var("w", where=is_const)), bind="nout",
                   all_users=True, min=1, name="linears")
    found, _ = find_all(sib, prog().graph)
    assert len(found) == 1 and len(found[0]["linears"]) == 3
    found, miss = find_all(sib, prog(extra=True).graph)
    assert not found
    text = miss.describe()
    assert "aten.mul.Tensor" in text and "not a consumer" in text and "expected aten.linear" in text


def test_siblings_min_max():
    sib = Siblings(NORM, Op(aten.linear.default, Var("nout"), ANY), bind="nout", min=4)
    found, miss = find_all(sib, prog().graph)
    assert not found and "3 consumer(s), need 4" in miss.describe()
    sib = Siblings(NORM, Op(aten.linear.default, Var("nout"), ANY), bind="nout", max=2)
    assert not find_all(sib, prog().graph)[0]


def test_internal_users():
    # the rsqrt node is used only inside the norm: internal holds; the norm output is used by 3 linears
    inner = Op(aten.mul.Tensor, Var("g", where=is_const), Op(aten.mul.Tensor, X, Op(aten.rsqrt.default, ANY, internal=True)))
    assert len(find_all(inner, prog().graph)[0]) == 1
    outer = Op(aten.add.Tensor, Op(aten.linear.default, Op(aten.mul.Tensor, ANY, ANY, internal=True), ANY, ANY), ANY)
    found, miss = find_all(outer, prog().graph)
    assert not found and "from outside the pattern" in miss.describe()


def test_nearest_miss_is_deepest():
    deep = Op(aten.mul.Tensor, Var("g", where=is_const), Op(aten.mul.Tensor, X, Op(aten.sqrt.default, ANY)))
    found, miss = find_all(deep, prog().graph)
    assert not found
    assert "expected aten.sqrt" in miss.reason and miss.depth == 2


def test_index_by_root_op_only_tries_candidates():
    p = prog()
    idx = Index({"lin": LIN, "norm": NORM})
    hits = list(idx.sweep(p.graph))
    n_linear = sum(1 for n in p.graph.nodes if n.target is aten.linear.default)
    n_mul = sum(1 for n in p.graph.nodes if n.target is aten.mul.Tensor)
    assert idx.tried["lin"] == n_linear and idx.tried["norm"] == n_mul
    assert sorted(k for k, _ in hits) == ["lin"] * 3 + ["norm"]


def test_rule_knows_its_line_and_rewrites_to_fixed_point():
    # x*2.0 -> x+x; a rule that declines (returns None) when the constant is not 2
    def twice(m, ctx):
        if m["k"] != 2.0:
            return None
        g = m.root.graph
        with g.inserting_before(m.root):
            new = g.call_function(aten.add.Tensor, (m["y"], m["y"]))
        new.meta["val"] = m.root.meta["val"]
        return new

    rule = Rule("mul2-to-add", Op(aten.mul.Tensor, Var("y"), Var("k", where=is_number)), twice)
    assert rule.where.startswith("tests/test_pattern.py:")
    p = prog(extra=True)
    stats = apply_rules(p.gm, [rule])
    st = next(iter(stats.values()))
    assert st.applied == 1 and st.matches == 1
    assert not any(n.target is aten.mul.Tensor and 2.0 in n.args for n in p.graph.nodes)


def test_non_converging_rules_hit_the_cap():
    def flip(m, ctx):
        g = m.root.graph
        with g.inserting_before(m.root):
            new = g.call_function(aten.neg.default, (g.call_function(aten.neg.default, (m["y"],)),))
        return new

    rule = Rule("neg-forever", Op(aten.linear.default, Var("y"), ANY, ANY), None)
    loop = Rule("neg-neg", Op(aten.neg.default, Var("y")), flip)
    p = prog()
    # seed one neg so the looping rule has something to chew on
    lin = next(n for n in p.graph.nodes if n.target is aten.linear.default)
    with p.graph.inserting_after(lin):
        ng = p.graph.call_function(aten.neg.default, (lin,))
    lin.replace_all_uses_with(ng, delete_user_cb=lambda u: u is not ng)
    with pytest.raises(SpinfxError, match="fixed point"):
        apply_rules(p.gm, [rule, loop], max_sweeps=3)


def test_find_reports_no_root_op():
    stats = find(prog().gm, [Rule("sdpa", Op(aten.scaled_dot_product_attention.default, ANY, ANY, ANY))])
    st = next(iter(stats.values()))
    assert st.matches == 0 and "no node calls aten.scaled_dot_product_attention" in st.nearest_miss
