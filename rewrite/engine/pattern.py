"""The pattern DSL: pure descriptions of ATen subgraphs.

    Var("x")                          capture anything (a node or a literal); the same name twice must
                                      bind the same thing
    Var("w", where=is_const)          ... with a constraint (a predicate; its docstring is the reason
                                      printed when it fails)
    Op(aten.linear.default, x, w)     a call of that op (or any of a tuple of ops); args positional,
                                      missing trailing ones are unconstrained, literals compare equal
    Op(..., name="norm")              also capture the matched node itself
    Op(..., internal=True)            all users of this node must lie inside the match
    a | b                             alternatives, tried in order
    Opt(CASTS, x)                     an optional node: `cast(x)` or just `x`
    Siblings(producer, consumer, ...) N consumers of one producer (q/k/v, gate/up, MoE experts)

Commutative ops (add/mul) try both argument orders. Nothing here touches a graph: patterns are data;
`spinfx.engine.match` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

aten = torch.ops.aten

COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}


class Pat:
    """Base of every pattern node."""

    def __or__(self, other: "Pat") -> "Alt":
        return Alt((*_alts(self), *_alts(other)))

    def roots(self) -> tuple | None:
        """The ops a node must call for this pattern to match there (None: any node)."""
        return None


def _alts(p: Pat) -> tuple:
    return p.alternatives if isinstance(p, Alt) else (p,)


@dataclass(eq=False)
class Var(Pat):
    name: str | None = None
    where: Callable[[Any], bool] | None = None

    def __repr__(self) -> str:
        return f"Var({self.name!r})"


ANY = Var(None)


@dataclass(eq=False)
class Lit(Pat):
    value: Any

    def __repr__(self) -> str:
        return f"Lit({self.value!r})"


@dataclass(eq=False)
class Op(Pat):
    targets: tuple
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    name: str | None = None
    internal: bool = False
    where: Callable[[Any], bool] | None = None
    commutative: bool | None = None

    def __init__(self, targets, *args, name=None, internal=False, where=None, commutative=None, **kwargs):
        self.targets = tuple(targets) if isinstance(targets, (tuple, list, set, frozenset)) else (targets,)
        self.args = tuple(_wrap(a) for a in args)
        self.kwargs = {k: _wrap(v) for k, v in kwargs.items()}
        self.name = name
        self.internal = internal
        self.where = where
        self.commutative = commutative if commutative is not None else any(t in COMMUTATIVE for t in self.targets)

    def roots(self) -> tuple:
        return self.targets

    def __repr__(self) -> str:
        from spinfx.engine.printer import op_name

        ops = "|".join(op_name(t) for t in self.targets)
        return f"{ops}({', '.join(map(repr, self.args))})"


@dataclass(eq=False)
class Alt(Pat):
    alternatives: tuple

    def roots(self) -> tuple | None:
        out: list = []
        for a in self.alternatives:
            r = a.roots()
            if r is None:
                return None
            out.extend(r)
        return tuple(dict.fromkeys(out))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.alternatives))


def Opt(targets, inner, *rest, **kw) -> Pat:
    """An optional node around `inner`: `targets(inner, *rest)` if it is there, else `inner` itself."""
    inner = _wrap(inner)
    return Alt((Op(targets, inner, *rest, **kw), inner))


def Chain(targets, inner, depth: int = 3) -> Pat:
    """Up to `depth` optional nodes from `targets` stacked on `inner` (views, casts)."""
    p = _wrap(inner)
    for _ in range(depth):
        p = Opt(targets, p)
    return p


@dataclass(eq=False)
class Siblings(Pat):
    """Consumers of one producer node.

    `producer` is matched at the root; then each user of the producer node is tried against
    `consumer`, in which `Var(bind)` refers to the producer. `all_users=True` makes a user that is
    not a consumer a failure (named in the miss); otherwise it is ignored. Captures of each consumer
    come back as a list under `name` (default "siblings").
    """

    producer: Pat
    consumer: Pat
    bind: str = "x"
    min: int = 1
    max: int | None = None
    all_users: bool = False
    name: str = "siblings"
    through: tuple = ()  # ops a user may go through before the consumer (casts/views); tried first

    def roots(self) -> tuple | None:
        return self.producer.roots()


@dataclass(eq=False)
class Seq(Pat):
    """A list argument (e.g. aten.cat's tensors), matched element by element."""

    items: tuple

    def __repr__(self) -> str:
        return f"[{', '.join(map(repr, self.items))}]"


def _wrap(a: Any) -> Pat:
    if isinstance(a, Pat):
        return a
    if isinstance(a, (list, tuple)) and any(isinstance(x, Pat) for x in a):
        return Seq(tuple(_wrap(x) for x in a))
    return Lit(a)


# ---- constraints (their docstrings are the reasons printed in miss reports) ---------------------


def is_const(v: Any) -> bool:
    """a named constant (parameter or buffer)"""
    return getattr(v, "op", None) == "get_attr"


def is_number(v: Any) -> bool:
    """a Python number"""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_last_dim(v: Any) -> bool:
    """the last dimension ([-1])"""
    return v in ([-1], -1, (-1,))


def val(v: Any):
    """The example value (FakeTensor or scalar) of a node; literals are their own value."""
    return v.meta.get("val") if hasattr(v, "meta") else v
