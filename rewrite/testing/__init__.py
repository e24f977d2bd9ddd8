"""spinfx.testing — pin the graph of *your* model as a golden, inline in your test.

    import spinfx
    from spinfx.testing import graph_text

    def test_my_block(spinfx_golden):            # the fixture comes with `pip install spinfx`
        prog = spinfx.trace(MyBlock(), example_inputs=(torch.randn(2, 16),))
        spinfx_golden(graph_text(prog), '''
    v0 = aten.linear(in0, $proj.weight, $proj.bias) : f32[2,32]
    ''')

When the graph changes the test fails with a unified diff of expected vs actual. Run once with
`SPINFX_ACCEPT=1` to rewrite the string in your test file (expecttest-style), read the diff, commit.
CI should never run with SPINFX_ACCEPT set.
"""
from __future__ import annotations

import ast
import difflib
import os
import sys
import textwrap

import pytest

ACCEPT_ENV = "SPINFX_ACCEPT"

# file -> [(original line, line delta)] for rewrites already applied in this process
_SHIFTS: dict[str, list[tuple[int, int]]] = {}


class GoldenMismatch(AssertionError):
    pass


def accepting() -> bool:
    return os.environ.get(ACCEPT_ENV, "") not in ("", "0")


def graph_text(prog_or_gm, module: str | None = None) -> str:
    """The canonical text of a program / GraphModule (optionally one module's nodes)."""
    from spinfx.engine.printer import print_graph

    gm = getattr(prog_or_gm, "gm", prog_or_gm)
    return print_graph(gm, module=module)


def _norm(s: str) -> str:
    return textwrap.dedent(s).strip("\n")


def assert_golden(actual: str, expected: str, _depth: int = 1) -> None:
    """Compare `actual` with the inline golden `expected` (dedented, outer blank lines ignored)."""
    a, e = _norm(actual), _norm(expected)
    if a == e:
        return
    frame = sys._getframe(_depth)
    if accepting():
        _rewrite_inline(frame.f_code.co_filename, frame.f_lineno, a, e)
        return
    diff = "\n".join(difflib.unified_diff(e.splitlines(), a.splitlines(), "expected (golden)", "actual",
                                          lineterm="", n=2))
    raise GoldenMismatch(f"golden mismatch at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} "
                         f"(re-run with {ACCEPT_ENV}=1 to accept):\n{diff}")


def _literal(text: str) -> str:
    if '"""' not in text and "\\" not in text:
        return '"""\n' + text + '\n"""'
    return repr(text)


def _rewrite_inline(path: str, lineno: int, actual: str, expected: str) -> None:
    shift = sum(d for line, d in _SHIFTS.get(path, []) if line < lineno)
    cur_line = lineno + shift
    with open(path) as f:
        src = f.read()
    tree = ast.parse(src)
    best = None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and node.args and node.lineno <= cur_line <= node.end_lineno
                and isinstance(node.args[-1], ast.Constant) and isinstance(node.args[-1].value, str)
                and _norm(node.args[-1].value) == expected):  # the string that holds this golden
            if best is None or node.lineno >= best.lineno:
                best = node
    if best is None:
        raise GoldenMismatch(f"{path}:{lineno}: cannot find the inline golden string to rewrite")
    lit = best.args[-1]
    lines = src.splitlines(keepends=True)
    offs = [0]
    for ln in lines:
        offs.append(offs[-1] + len(ln))
    # ast columns are UTF-8 byte offsets
    def pos(line, col):
        return offs[line - 1] + len(lines[line - 1].encode()[:col].decode())
    start, end = pos(lit.lineno, lit.col_offset), pos(lit.end_lineno, lit.end_col_offset)
    new = _literal(actual)
    out = src[:start] + new + src[end:]
    with open(path, "w") as f:
        f.write(out)
    delta = new.count("\n") - src[start:end].count("\n")
    _SHIFTS.setdefault(path, []).append((lit.lineno - shift, delta))


@pytest.fixture
def spinfx_golden():
    """`spinfx_golden(actual_text, '''golden''')`: inline golden check; SPINFX_ACCEPT=1 rewrites it."""

    def check(actual: str, expected: str) -> None:
        assert_golden(actual, expected, _depth=2)

    return check
