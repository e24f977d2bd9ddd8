"""spinfx.patterns: pure subgraph definitions (no graph is touched here).

The structure finders that `spinfx inspect` runs and the passes build on, in one list:
"""
from __future__ import annotations

from spinfx.engine.rule import Rule

from spinfx.patterns.attention import ATTENTION, QKV, ROPE_SITE
from spinfx.patterns.groups import GATE_UP, NORM_LINEARS
from spinfx.patterns.norms import NORM

# The finders, in report order. Names are what reports and contracts call them.
STRUCTURE = [
    Rule("norm", NORM),
    Rule("norm-linears", NORM_LINEARS),
    Rule("qkv", QKV),
    Rule("gate-up", GATE_UP),
    Rule("rope", ROPE_SITE),
    Rule("attention", ATTENTION),
]
