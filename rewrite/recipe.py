"""Recipes: an ordered list of passes with their options — a preset name, a YAML file, or a Recipe.

    passes:
      - fold-norms: {tie: untie}
    allow_unchanged: false   # optional: true lets the recipe change none of a graph's linears

Presets (INTERFACE.md) are written in the same words. A preset whose passes are not built yet is
refused with the list of what is available, never silently approximated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinfx.engine.errors import BadInput
from spinfx.engine.pipeline import Pass

DEFAULT_RECIPE = "spinquant-w4a16"  # what spinfx.rewrite, the backend and the CLI use when not told

PRESETS: dict[str, list[dict[str, dict]]] = {
    "fold": [{"fold-norms": {}}],
    "rotate": [{"fold-norms": {}}, {"rotate": {"r1": "hadamard", "r2": "hadamard"}}],
    "spinquant": [{"fold-norms": {}}, {"rotate": {"r1": "hadamard", "r2": "hadamard", "r3": True, "r4": True}}],
}
# clip: mse — each group's range shrunk to its least squared error: SmolLM2 Hamlet 16×512 with the default
# preset 86.12 → 76.08, and better in every 4-bit row of bench/README.md "MSE-searched clipping"
_W4 = {"bits": 4, "group_size": 128, "symmetric": True, "method": "rtn", "clip": "mse"}
# the token embedding and the lm_head (found by structure): 8-bit per row, one matrix when tied
PRESETS["w4a16"] = [{"quantize": {"weights": _W4, "embedding": {"bits": 8}, "lm_head": {"bits": 8}}}]
# GPTQ on `samples` windows of 512 tokens of calibration text: SmolLM2 Hamlet 16×512, spinquant + GPTQ W4,
# 32 windows are within 1 % of 128 at a quarter of the calibration time (bench/README.md "GPTQ: quality vs
# calibration tokens")
_GPTQ_SAMPLES = 32
_ENDS = {"embedding": {"bits": 8}, "lm_head": {"bits": 8}}
PRESETS["w4a16-gptq"] = [{"quantize": {"weights": {**_W4, "method": "gptq"}, **_ENDS, "samples": _GPTQ_SAMPLES}}]
# A tied embedding stays tied (one 8-bit matrix): R1 runs online after the lookup and is undone before
# the final norm (fold-norms tie: auto; LayerNorm models, whose centering needs their own embedding,
# untie) — 90 MB instead of 116 MB for SmolLM2 (bench/README.md).
# Weight-only presets rotate with R1, R2 and R4 — no R3. R3 (q·H and k·H after RoPE) exists for a quantized
# KV cache: with a float cache q·H·(k·H)ᵀ = q·kᵀ changes no weight and no value the quantizers see, yet costs
# two online Hadamards per layer at every decode step (SmolLM2 compiled: 60 of the 92 matmuls a step;
# bench/README.md "Decode"). spinquant-w4a4kv4, which quantizes the cache, keeps it.
_SPIN = [{"fold-norms": {"tie": "auto"}}, {"rotate": {"r1": "hadamard", "r2": "hadamard", "r4": True}}]
# Hadamard rotations (data-free) + RTN weights: what needs no calibration text (the backend given a bare
# module, a model without a tokenizer). SmolLM2 Hamlet 16×512: 76.08 (1.81× fp32, bench/README.md).
PRESETS["hadamard-w4a16"] = _SPIN + PRESETS["w4a16"]
# The default: the rotations + GPTQ on 16 windows of calibration text (the built-in Shakespeare unless given):
# SmolLM2 Hamlet 16×512 1.06× fp32 where Hadamard + RTN is 1.81× (bench/README.md "Default recipe", "target_damp").
# The rotations are still the Hadamard ones: learned R1/R2 (rotate: {r1: learned}) are not fast enough for a
# default yet and refuse a kept tie (bench/README.md "Learned rotations").
_DEFAULT_SAMPLES = 16
# Ranges min/max: GPTQ's compensation makes the MSE search's lower weight error irrelevant (46.18 MSE vs 45.96
# min/max at 32 windows) and the search costs time in GPTQ's column loop. target: float — Ŵ reproduces the
# float model's outputs, not the quantized inputs' (45.97 → 45.36 at 16 windows); target_damp 0.1 — W*'s ridge
# (45.36 → 44.87; 32 windows: 44.93, no better); symmetric: false — zero points (→ 44.36 = 1.0575×; 5.243
# bits/weight with the 8-bit tables instead of 5.199).
PRESETS["spinquant-w4a16"] = _SPIN + [{"quantize": {"weights": {**_W4, "method": "gptq", "clip": "minmax",
                                                                "symmetric": False, "target": "float",
                                                                "target_damp": 0.1},
                                                    **_ENDS, "samples": _DEFAULT_SAMPLES}}]
# RTN weights after calibrated smoothing (passes/smooth.py: per-channel scales at each norm → q/k/v, gate/up,
# at v → o_proj and up → down_proj, α searched on 16 calibration windows against this RTN) and the Hadamard R2
# (per KV head) and R4 (before down_proj, where the scale sits in front of the online Hadamard). No R1, so no
# folded norms: folding γ is what moves RTN's error onto SmolLM2's massive residual channel, and in R1's basis a
# per-channel scale cannot find that channel again. SmolLM2 Hamlet 16×512: 53.44 (1.27× fp32) against w4a16's
# 64.61; fold + R1/R2/R4 + smooth: 69.17 (Hadamard alone 76.08); smooth without rotations: 62.22
# (bench/README.md "Smoothing with the rotation").
_SMOOTH = {"smooth": {"weights": _W4, "samples": _DEFAULT_SAMPLES, "grid": 10}}
PRESETS["spinquant-w4a16-rtn"] = [{"rotate": {"r1": "none", "r2": "hadamard", "r4": True}}, _SMOOTH] + PRESETS["w4a16"]
# 3 bits need GPTQ after the rotations (RTN: 1901 ppl, GPTQ: 65, bench/README.md "Quality"); the default's
# GPTQ (zero points, float target with target_damp 0.1) on 32 windows: SmolLM2 Hamlet 16×512 68.56 → 51.85
# (1.63× → 1.24× fp32; 16 windows: 54.57), bench/README.md "W3 and W4A4KV4 with the default's GPTQ"
PRESETS["spinquant-w3a16"] = _SPIN + [{"quantize": {"weights": {**_W4, "bits": 3, "method": "gptq", "clip": "minmax",
                                                               "symmetric": False, "target": "float",
                                                               "target_damp": 0.1},
                                                   **_ENDS, "samples": _GPTQ_SAMPLES}}]
# 4-bit per-token activations and a 4-bit KV cache (R3 kept for it) need GPTQ weights: the default's GPTQ (zero
# points, target_damp 0.1) on 16 windows, its Hessians on the fake-quantized activations. SmolLM2 Hamlet 16×512:
# RTN (MSE clip) 157.18 (3.75× fp32) → the default's GPTQ 97.39 (2.32×) → target: original (Ŵ fitted to the
# original model's outputs: float weights *and* float activations/KV, so it compensates their rounding too) with
# QuaRot's clip ratios (activations 0.9, KV 0.95) 65.96 (1.57×) (bench/README.md "W4A4KV4 below 2×")
PRESETS["spinquant-w4a4kv4"] = PRESETS["spinquant"] + [
    {"quantize": {"weights": {**_W4, "method": "gptq", "clip": "minmax", "symmetric": False, "target": "original",
                              "target_damp": 0.1},
                  "ignore": ["lm_head"], "activations": {"bits": 4, "clip_ratio": 0.9},
                  "kv_cache": {"bits": 4, "clip_ratio": 0.95}, "samples": _DEFAULT_SAMPLES}}]


@dataclass
class Recipe:
    name: str
    passes: list[Pass] = field(default_factory=list)
    # A recipe that changes weights and changes none of a graph's linears is refused, unless it says
    # that may happen (YAML: `allow_unchanged: true`).
    allow_unchanged: bool = False

    @property
    def changes_weights(self) -> bool:
        return any(p.changes_weights for p in self.passes)

    @property
    def streams(self) -> bool:
        """Can the recipe run window by window (spinfx.checkpoint.stream)? Every pass must say so (Pass.streams)."""
        return all(p.streams() for p in self.passes)

    def to_dict(self) -> dict:
        d = {"name": self.name, "passes": [{p.name: p.options()} for p in self.passes]}
        if self.allow_unchanged:
            d["allow_unchanged"] = True
        return d


def _build(name: str, steps: Any, allow_unchanged: bool = False) -> Recipe:
    from spinfx.passes import REGISTRY
    from spinfx.passes.options import check_fields

    if not isinstance(steps, list):
        raise BadInput(f"recipe {name}: 'passes' must be a list of {{pass-name: {{options}}}}")
    passes = []
    for step in steps:
        if not isinstance(step, dict) or len(step) != 1:
            raise BadInput(f"recipe {name}: each pass is one mapping {{pass-name: {{options}}}}, got {step!r}")
        (pname, opts), = step.items()
        if pname not in REGISTRY:
            raise BadInput(f"recipe {name}: unknown pass {pname!r}; known: {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[pname]
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise BadInput(f"recipe {name}: the options of {pname} must be a mapping {{option: value}}, got {opts!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(opts) - known
        if bad:
            raise BadInput(f"recipe {name}: pass {pname} has no option(s) {', '.join(sorted(map(str, bad)))}; "
                           f"it takes: {', '.join(sorted(known)) or 'none'}")
        try:  # a pass checks its options when built (Pass.validate); every field's type is checked here
            passes.append(cls(**opts))
            check_fields(passes[-1], pname)
        except BadInput as e:
            raise BadInput(f"recipe {name}: {e}") from None
    return Recipe(name, passes, allow_unchanged)


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    if isinstance(spec, Recipe):
        return spec
    s = str(spec)
    if s in PRESETS:
        return _build(s, PRESETS[s])
    p = Path(s)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise BadInput(f"recipe file {s} does not exist")
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise BadInput(f"recipe file {s} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or "passes" not in data:
            raise BadInput(f"recipe file {s} must have a top-level 'passes:' list")
        extra = set(data) - {"passes", "allow_unchanged"}
        if extra:
            raise BadInput(f"recipe file {s}: unknown top-level key(s) {', '.join(sorted(map(str, extra)))}; "
                           f"known: passes, allow_unchanged")
        allow = data.get("allow_unchanged", False)
        if not isinstance(allow, bool):
            raise BadInput(f"recipe file {s}: allow_unchanged must be true or false, got {allow!r}")
        return _build(p.stem, data["passes"], allow)
    raise BadInput(f"unknown recipe {s!r}; presets: {', '.join(PRESETS)} (or a path to a YAML recipe)")
