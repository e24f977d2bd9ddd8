"""spinfx.passes: one file per pass; each exports its rules and one Pass.

`REGISTRY` maps a pass's kebab-case name (as written in recipes) to its class.
"""
from spinfx.passes.fold_norms import FoldNorms
from spinfx.passes.mappings import CheckMappings
from spinfx.passes.quantize import LowerQLinear, Quantize
from spinfx.passes.rotate import Rotate
from spinfx.passes.shard import Shard
from spinfx.passes.smooth import Smooth
from spinfx.passes.structure import FindStructure

REGISTRY = {p.name: p for p in (FindStructure, FoldNorms, Rotate, Smooth, Quantize, LowerQLinear, CheckMappings, Shard)}
