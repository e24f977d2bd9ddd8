"""The matcher: runs `spinfx.engine.pattern` patterns over an FX graph.

One sweep over the nodes in graph order; patterns are indexed by the op at their root, so a node is
only ever tried against the patterns that can start there (cost linear in graph size for a fixed rule
set). A failed attempt is not thrown away: it becomes a `Miss` that names the first node that
differed and why, and the deepest miss of a pattern (the one that got furthest) is what reports show
as its "nearest miss".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx

from spinfx.engine.pattern import Alt, Lit, Op, Pat, Seq, Siblings, Var
from spinfx.engine.printer import op_name


@dataclass
class Match:
    root: fx.Node
    captures: dict[str, Any]
    nodes: list[fx.Node]

    def __getitem__(self, key: str) -> Any:
        return self.captures[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.captures.get(key, default)


@dataclass
class Miss:
    root: fx.Node | None
    at: Any
    reason: str
    depth: int = 0

    def describe(self) -> str:
        where = f" (trying at {describe(self.root)})" if self.root is not None else ""
        return f"{describe(self.at)}: {self.reason}{where}" if self.at is not None else self.reason + where


def describe(v: Any) -> str:
    if isinstance(v, fx.Node):
        if v.op == "get_attr":
            return f"${v.target}"
        if v.op == "placeholder":
            return f"input {v.name}"
        mod = v.meta.get("module", "")
        return f"{v.name} [{op_name(v.target)}{' in ' + mod if mod else ''}]"
    return repr(v)


class _St:
    __slots__ = ("caps", "nodes", "depth", "internal")

    def __init__(self, caps=None, nodes=None, depth=0, internal=None):
        self.caps = caps if caps is not None else {}
        self.nodes = nodes if nodes is not None else []
        self.depth = depth
        self.internal = internal if internal is not None else []

    def fork(self) -> "_St":
        return _St(dict(self.caps), list(self.nodes), self.depth, list(self.internal))


def _deeper(a: Miss | None, b: Miss) -> Miss:
    return b if a is None or b.depth > a.depth else a


def _lit_eq(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_lit_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    try:
        return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                 and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
    except Exception:
        return False


def arg(node: fx.Node, i: int, name: str | None = None) -> Any:
    """Positional argument i of a call, or its keyword form, or the schema default."""
    if i < len(node.args):
        return node.args[i]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name) if name else None
    if i < len(schema.arguments):
        a = schema.arguments[i]
        if a.name in node.kwargs:
            return node.kwargs[a.name]
        return a.default_value if a.has_default_value() else None
    return None


def _bind(name: str | None, v: Any, st: _St, root) -> _St | Miss:
    if name is None:
        return st
    if name in st.caps:
        if st.caps[name] is v or (not isinstance(v, fx.Node) and _lit_eq(st.caps[name], v)):
            return st
        return Miss(root, v, f"expected the same value as '{name}' ({describe(st.caps[name])})", st.depth)
    st = st.fork()
    st.caps[name] = v
    return st


def _m(p: Pat, v: Any, st: _St, root) -> _St | Miss:
    if isinstance(p, Var):
        if p.where is not None and not p.where(v):
            return Miss(root, v, f"is not {p.where.__doc__ or p.where.__name__}", st.depth)
        return _bind(p.name, v, st, root)
    if isinstance(p, Lit):
        return st if _lit_eq(v, p.value) else Miss(root, v, f"expected {p.value!r}", st.depth)
    if isinstance(p, Seq):
        if not isinstance(v, (list, tuple)) or len(v) != len(p.items):
            return Miss(root, v, f"expected a list of {len(p.items)}", st.depth)
        for ip, iv in zip(p.items, v):
            st = _m(ip, iv, st, root)
            if isinstance(st, Miss):
                return st
        return st
    if isinstance(p, Alt):
        best = None
        for a in p.alternatives:
            r = _m(a, v, st, root)
            if isinstance(r, _St):
                return r
            best = _deeper(best, r)
        return best
    if isinstance(p, Op):
        if not isinstance(v, fx.Node) or v.op != "call_function" or v.target not in p.targets:
            want = "|".join(op_name(t) for t in p.targets)
            return Miss(root, v, f"expected {want}", st.depth)
        if p.where is not None and not p.where(v):
            return Miss(root, v, f"is not {p.where.__doc__ or p.where.__name__}", st.depth)
        if v in st.nodes:  # the same node may legitimately be reached twice (shared subexpression)
            return st
        st = st.fork()
        st.depth += 1
        st.nodes.append(v)
        if p.internal:
            st.internal.append(v)
        r0 = _bind(p.name, v, st, root)
        if isinstance(r0, Miss):
            return r0
        orders = [p.args]
        if p.commutative and len(p.args) >= 2:
            orders.append((p.args[1], p.args[0], *p.args[2:]))
        best = None
        for args in orders:
            cur: _St | Miss = r0
            for i, ap in enumerate(args):
                cur = _m(ap, arg(v, i), cur, root)
                if isinstance(cur, Miss):
                    break
            if isinstance(cur, _St):
                for k, kp in p.kwargs.items():
                    cur = _m(kp, v.kwargs.get(k), cur, root)
                    if isinstance(cur, Miss):
                        break
            if isinstance(cur, _St):
                return cur
            best = _deeper(best, cur)
        return best
    raise TypeError(f"{type(p).__name__} is only valid at the root of a pattern")


def _check_internal(st: _St, root) -> Miss | None:
    inside = set(st.nodes)
    for n in st.internal:
        for u in n.users:
            if u not in inside:
                return Miss(root, u, f"uses {describe(n)} from outside the pattern", st.depth)
    return None


def _order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return sorted(nodes, key=_pos)


def _pos(n: fx.Node) -> int:
    # fx keeps a total order; sort_key is the cheap public-ish handle for it
    return n._sort_key if hasattr(n, "_sort_key") else 0


def match_at(p: Pat, node: fx.Node) -> Match | Miss:
    """Try pattern `p` rooted at `node`."""
    if isinstance(p, Siblings):
        return _match_siblings(p, node)
    r = _m(p, node, _St(), node)
    if isinstance(r, Miss):
        return r
    bad = _check_internal(r, node)
    return bad or Match(node, r.caps, r.nodes)


def _match_siblings(p: Siblings, node: fx.Node) -> Match | Miss:
    r = _m(p.producer, node, _St(), node)
    if isinstance(r, Miss):
        return r
    r = _bind(p.bind, node, r, node)
    if isinstance(r, Miss):
        return r
    found: list[Match] = []
    best: Miss | None = None
    used: set[fx.Node] = set(r.nodes)
    candidates: list[fx.Node] = []

    def reach(n: fx.Node) -> None:  # users, through any chain of `through` ops (a cast, then a view)
        for u in _order(n.users):
            if u.op == "call_function" and u.target in p.through and u not in used:
                used.add(u)
                reach(u)
            else:
                candidates.append(u)

    reach(node)
    for c in candidates:
        sub = _m(p.consumer, c, r.fork(), node)
        if isinstance(sub, _St):
            bad = _check_internal(sub, node)
            if bad is None:
                new = [n for n in sub.nodes if n not in r.nodes]
                found.append(Match(c, {k: v for k, v in sub.caps.items() if k not in r.caps or k == p.bind}, new))
                used.update(new)
                continue
            sub = bad
        if p.all_users:
            sub.reason = f"user of {describe(node)} is not a consumer: {sub.reason}"
            sub.depth += len(found) + r.depth
            return sub
        best = _deeper(best, sub)
    if len(found) < p.min:
        return Miss(node, best.at if best else node,
                    f"{len(found)} consumer(s), need {p.min}" + (f"; nearest: {best.reason}" if best else ""),
                    r.depth + len(found))
    if p.max is not None and len(found) > p.max:
        return Miss(node, node, f"{len(found)} consumers, at most {p.max}", r.depth + len(found))
    caps = dict(r.caps)
    caps[p.name] = found
    return Match(node, caps, list(dict.fromkeys([*r.nodes, *[n for m in found for n in m.nodes]])))


# ----------------------------------------------------------------------------------------------


class Index:
    """Patterns indexed by root op: `sweep(graph)` yields (key, Match) in graph order and keeps the
    nearest miss per key."""

    def __init__(self, patterns: dict[Any, Pat]):
        self.patterns = patterns
        self.by_op: dict[Any, list] = {}
        self.wild: list = []
        for key, p in patterns.items():
            roots = p.roots()
            if roots is None:
                self.wild.append(key)
            else:
                for t in roots:
                    self.by_op.setdefault(t, []).append(key)
        self.misses: dict[Any, Miss] = {}
        self.tried: dict[Any, int] = {}

    def candidates(self, node: fx.Node) -> list:
        if node.op != "call_function":
            return []
        return self.by_op.get(node.target, []) + self.wild

    def try_node(self, key: Any, node: fx.Node) -> Match | None:
        self.tried[key] = self.tried.get(key, 0) + 1
        r = match_at(self.patterns[key], node)
        if isinstance(r, Miss):
            prev = self.misses.get(key)
            if r.depth > 0 and (prev is None or r.depth > prev.depth):
                self.misses[key] = r
            return None
        return r

    def sweep(self, graph: fx.Graph):
        for node in list(graph.nodes):
            if node.graph is None or getattr(node, "_erased", False):
                continue
            for key in self.candidates(node):
                m = self.try_node(key, node)
                if m is not None:
                    yield key, m

    def nearest_miss(self, key: Any) -> Miss:
        if key in self.misses:
            return self.misses[key]
        roots = self.patterns[key].roots()
        want = "|".join(op_name(t) for t in roots) if roots else "anything"
        if not self.tried.get(key):
            return Miss(None, None, f"no node calls {want}")
        return Miss(None, None, f"{self.tried[key]} node(s) call {want} but none matched beyond the root")


def find_all(p: Pat, graph: fx.Graph) -> tuple[list[Match], Miss | None]:
    """All matches of one pattern (graph order) and its nearest miss."""
    idx = Index({0: p})
    found = [m for _, m in idx.sweep(graph)]
    return found, (idx.nearest_miss(0) if not found or 0 in idx.misses else None)
