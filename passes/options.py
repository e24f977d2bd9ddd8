"""Pass options as recipes give them: each field of a pass (or of an options dataclass such as
quantize's weight `Scheme`) holds a value of its annotated type, else one BadInput naming the pass,
the option, what it takes and what it got (`rotate: {r1: 3}`, `weights: {bits: four}`)."""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from spinfx.engine.errors import BadInput


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Is `value` (as YAML or Python gives it) of the annotated type? A list fits a tuple and an int a
    float; a bool is not an int. Parameters of generics are not looked into (list[str] is a list)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return not isinstance(hint, type) or isinstance(value, hint)


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list", type(None): "null"}


def _say(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_say(h) for h in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(obj: Any, where: str) -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type, else one BadInput
    naming `where`, the option, what it takes and what it got (a recipe's `r1: 3`, `bits: four`)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in hints and not _fits(value, hints[f.name]):
            raise BadInput(f"{where}: option {f.name} must be {_say(hints[f.name])}, got {value!r}")


def check_rounding(w: dict, who: str) -> None:
    """The weight-rounding words every pass that rounds weights shares (quantize's `weights:`; what rotate
    learns against and smooth searches against): bits, group_size, symmetric and clip, each where `w` has
    it; one BadInput beginning with `who` (e.g. "rotate: weights") otherwise."""
    from spinfx.kernels.quant_pack import SUPPORTED_BITS
    from spinfx.kernels.quant_rtn import CLIPS

    if "bits" in w and (w["bits"] not in SUPPORTED_BITS or isinstance(w["bits"], bool)):
        raise BadInput(f"{who}: bits must be one of {SUPPORTED_BITS}, got {w['bits']!r}")
    g = w.get("group_size")
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise BadInput(f"{who}: group_size must be a positive integer or null, got {g!r}")
    if "symmetric" in w and not isinstance(w["symmetric"], bool):
        raise BadInput(f"{who}: symmetric must be true or false, got {w['symmetric']!r}")
    if "clip" in w and w["clip"] not in CLIPS:
        raise BadInput(f"{who}: clip must be one of {', '.join(CLIPS)}, got {w['clip']!r}")
