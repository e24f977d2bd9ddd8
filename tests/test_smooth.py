"""The smooth pass: per-channel scales folded exactly (certified ≤ 1e-10 in float64) at a norm and its
linears, v → o_proj (GQA: each query head takes its KV head's scale) and up → down_proj (behind R4's online
Hadamard: W_down·Mᵀ·diag(s)·M), skipped with a note where not exact; chosen on calibration text, they lower
the RTN-quantized model's output error after the same rotation."""
import pytest
import torch

import spinfx
from spinfx.api import rewrite
from spinfx.engine.errors import BadInput
from spinfx.recipe import _build
from spinfx.testing import zoo

W4 = {"bits": 4, "group_size": 16, "symmetric": True, "clip": "minmax"}
SPIN = [{"fold-norms": {"tie": "auto"}}, {"rotate": {"r1": "hadamard", "r2": "hadamard", "r4": True}}]
QUANT = [{"quantize": {"weights": W4}}]


def _calib(zm, windows: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, zm.model.config.vocab_size, (windows * zm.example_inputs["input_ids"].numel(),),
                         generator=torch.Generator().manual_seed(seed))


def _rewrite(zm, steps, calib=None, certify=True):
    return rewrite(zm.model, _build("test", steps), zm.example_inputs, calib=calib, certify=certify)


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama")  # GQA: 4 query heads on 2 KV heads; intermediate 88 (R4: H_11 ⊗ H_8)


def test_smooth_after_the_rotations_is_certified_and_lowers_the_quantized_output_error(llama):
    # the error smooth minimizes: the RTN-quantized model's, on the text it was calibrated on (a tiny model of
    # random weights and random tokens has no held-out text that behaves like it)
    calib = _calib(llama, 16)
    windows = calib.reshape(16, 1, -1)
    with torch.no_grad():
        ref = [llama.model(input_ids=ids, use_cache=False).logits for ids in windows]
    errs, results = {}, {}
    for name, extra in (("rtn", []), ("smooth", [{"smooth": {"weights": W4, "samples": 16, "grid": 10}}])):
        r = results[name] = _rewrite(llama, SPIN + extra + QUANT, calib if extra else None, certify=bool(extra))
        with torch.no_grad():
            errs[name] = sum((r.module(input_ids=ids, use_cache=False).logits - f).square().mean().item()
                             for ids, f in zip(windows, ref))
    assert errs["smooth"] < errs["rtn"], errs

    r = results["smooth"]
    s = r.report.pass_result("smooth")
    assert s.certificate["rel"] <= 1e-10 and s.certificate["tolerance"] == 1e-10
    layers = llama.model.config.num_hidden_layers
    # 2 norm points per layer (q/k/v; gate/up), one v → o and one up → down (behind R4's Hadamard)
    assert {k: s.findings[k]["points"] for k in ("norm", "v-o", "up-down")} == {"norm": 2 * layers, "v-o": layers,
                                                                                 "up-down": layers}
    assert all(s.findings[k]["scaled"] > 0 for k in ("norm", "v-o", "up-down"))
    assert all(s.findings[k]["error_ratio_mean"] < 1 for k in ("norm", "v-o", "up-down"))
    assert sum(rs.applied for rs in s.rules) == sum(s.findings[k]["scaled"] for k in ("norm", "v-o", "up-down"))
    # the final norm reads into the tied lm_head: not a point
    assert any("the lm_head's norm" in n for n in s.notes)
    # the norms fold-norms emptied got their weight back, under the norm module's name
    assert any(n.target == "model.layers.0.input_layernorm.weight" for n in r.program.graph.nodes if n.op == "get_attr")


def test_fused_projections_are_skipped_with_a_note():
    zm = zoo.build("phi3")  # fused q/k/v and gate/up
    r = _rewrite(zm, [{"smooth": {"weights": W4, "samples": 2, "grid": 2}}], _calib(zm, 2))
    s = r.report.pass_result("smooth")
    assert s.certificate["rel"] <= 1e-10
    notes = " ".join(s.notes)
    assert "v-o: a fused or Conv1D q/k/v projection" in notes and "up-down: a fused gate_up projection" in notes
    assert s.findings["norm"]["points"] > 0 and "v-o" not in s.findings


def test_bad_options_and_missing_calibration_are_one_line():
    zm = zoo.build("llama")
    with pytest.raises(BadInput, match="smooth: points is a non-empty list of norm, v-o, up-down"):
        _build("t", [{"smooth": {"points": ["qkv"]}}])
    with pytest.raises(BadInput, match="smooth: weights: clip must be one of"):
        _build("t", [{"smooth": {"weights": {"clip": "max"}}}])
    with pytest.raises(BadInput, match=r"calibrates on 16 windows of 8 tokens \(smooth\) and no calibration text"):
        spinfx.rewrite(zm.model, _build("t", [{"smooth": {}}]), zm.example_inputs)
    with pytest.raises(BadInput, match=r"smooth: samples: 2"):
        spinfx.rewrite(zm.model, _build("t", [{"smooth": {}}]), zm.example_inputs, calib=_calib(zm, 2))
