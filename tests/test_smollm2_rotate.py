"""SmolLM2 (real weights, real text): spinquant is exact, and rotation lowers the outliers that
quantization sees at the linear inputs."""
import pytest
import torch

import spinfx

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def smollm2():
    from spinfx.tools.data import text_path, tokenize_file
    from spinfx.checkpoint.hf import load_model

    model, tok = load_model("smollm2")
    tokens = tokenize_file(tok, text_path("hamlet"))
    return model, tokens


def test_spinquant_on_smollm2_is_exact_and_tames_activations(smollm2):
    model, tokens = smollm2
    ids = tokens[:32].reshape(1, 32)
    r = spinfx.rewrite(model, "spinquant", {"input_ids": ids, "use_cache": False}, calib=tokens[32:32 + 32 * 16])
    for p in r.report.passes:
        assert p.certificate["rel"] <= 1e-10, (p.name, p.certificate)
    f = r.report.pass_result("rotate").findings
    assert f["r1"] == {"dim": 576, "writers": 61, "reader_norms": 61}
    assert f["r2"]["sites"] == 30 and f["r3"]["sites"] == 30 and f["r4"]["sites"] == 30
    assert f["r4"]["hadamard"] == "exact 12×2^7"  # 1536
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = r.module(input_ids=ids, use_cache=False).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    med = r.report.extra["activations"]["median"]
    assert med["kurtosis_after"] < med["kurtosis_before"] / 5
    assert med["max_abs_after"] < med["max_abs_before"]
    layers = r.report.extra["activations"]["layers"]
    down = layers["model.layers.29.mlp.down_proj"]  # the worst outlier layer: R4 must tame it
    assert down["after"]["max_abs"] < down["before"]["max_abs"] / 3
    assert "kurtosis" in r.report.to_text()
