"""fold-norms on every zoo family: exact in float64 (certified), ≤1e-4 relative in float32, and the
known traps closed (RMSNorm models never centered; tied embeddings handled; LayerNorm → RMSNorm)."""
import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.engine.certify import compare
from spinfx.engine.errors import SpinfxError
from spinfx.engine.match import find_all
from spinfx.patterns.norms import NORM, norm_kind


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# the tie mode only decides what happens to a shared weight: an untied model is folded once
@pytest.mark.parametrize("name, tie", [(n, t) for n in zoo.ZOO for t in ("untie", "keep", "auto")
                                       if t == "untie" or zoo.tied(n)])
def test_fold_is_exact(name, tie):
    zm = zoo.build(name)
    recipe = spinfx.recipe.Recipe("fold", [spinfx.passes.FoldNorms(tie=tie)])
    if tie == "keep" and zm.expect.tied and zm.expect.norm == "layer":
        # centering the stream would change the tied embedding under the lm_head: refused, not guessed
        with pytest.raises(spinfx.Unsupported, match="is tied.*use tie: untie"):
            spinfx.rewrite(zm.model, recipe, zm.example_inputs)
        return
    r = spinfx.rewrite(zm.model, recipe, zm.example_inputs)
    p = r.report.passes[0]
    assert p.certificate["rel"] <= 1e-10 and p.certificate["dtype"] == "float64"
    ref = zm.model(**zm.example_inputs).logits
    assert _rel(r.module(**zm.example_inputs).logits, ref) <= 1e-4
    # every norm lost its scale, except one that shares a tied weight under tie=keep, q/k norms (Qwen3,
    # OLMo-2): no linear reads them, and RoPE between them and q·kᵀ keeps γ from moving on, and post-norms
    # (OLMo-2, Gemma-2): they write the residual stream, no linear reads them
    kinds = [norm_kind(m) for m in find_all(NORM, r.program.graph)[0]]
    kept = (2 if zm.expect.qk_norm else 0) + (2 if zm.expect.norm_place != "pre" else 0)
    leftover = len(kinds) - kept * zm.expect.layers
    # auto keeps a tie like keep, except where keep must refuse (centering a LayerNorm model): untie there
    if zm.expect.tied and (tie == "keep" or (tie == "auto" and zm.expect.norm != "layer")):
        assert leftover == 1 and len(p.refusals) == 1 and f"tie: {tie}" in p.refusals[0]
    else:
        assert leftover == 0, kinds


def test_fp64_against_the_original_model_in_fp64():
    zm = zoo.build("qwen2", dtype=torch.float64)
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    ids = torch.randint(0, zm.expect.vocab, (1, 8), generator=torch.Generator().manual_seed(5))
    ref = zm.model(input_ids=ids, use_cache=False).logits
    out = r.module(input_ids=ids, use_cache=False).logits
    assert (out - ref).abs().max().item() <= 1e-9


def test_rmsnorm_embeddings_are_not_centered():
    zm = zoo.build("llama")
    E = zm.model.model.embed_tokens.weight.detach().clone()
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    assert torch.equal(r.program.const("model.embed_tokens.weight"), E)
    assert not any("centered" in n for n in r.report.passes[0].notes)


def test_layernorm_model_is_centered_and_becomes_rmsnorm():
    zm = zoo.build("opt")
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    E = r.program.const("model.decoder.embed_tokens.weight").double()
    assert E.mean(dim=1).abs().max() < 1e-6  # rows are zero-mean after centering
    ops = {n.target for n in r.program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.layer_norm.default not in ops and torch.ops.aten.rms_norm.default in ops


def test_tied_lm_head_untied_gets_its_own_weight():
    zm = zoo.build("llama")
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    names = dict(r.program.gm.named_buffers())
    assert "lm_head.weight" in names
    gamma = zm.model.model.norm.weight.detach()
    E = zm.model.model.embed_tokens.weight.detach()
    assert torch.allclose(names["lm_head.weight"], E * gamma[None, :], atol=1e-6)
    assert torch.equal(names["model.embed_tokens.weight"], E)


def test_a_wrong_fold_is_caught_by_the_certificate():
    # sabotage: a rewrite that forgets the scale must be refused by the float64 certificate
    from spinfx.passes import fold_norms

    zm = zoo.build("llama")
    orig = fold_norms.scale_inputs
    try:
        fold_norms.scale_inputs = lambda st, lm, gamma, beta: True
        with pytest.raises(SpinfxError, match="changed the model's function"):
            spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    finally:
        fold_norms.scale_inputs = orig


def test_hf_model_with_use_cache_in_its_config_traces_without_a_cache():
    # the HF default config.use_cache=True would make the traced call return a DynamicCache; the
    # caller did not ask for one, so the trace runs without it (the config is left as it was)
    zm = zoo.build("llama")
    ids = zm.example_inputs["input_ids"]
    assert zm.config.use_cache is True
    r = spinfx.rewrite(zm.model, "fold", example_inputs=(ids,))
    assert r.report.passes[0].certificate["rel"] <= 1e-10
    assert _rel(r.module(ids).logits, zm.model(ids, use_cache=False).logits) <= 1e-4
    assert spinfx.inspect(zm.model, example_inputs=(ids,)).passes[0].findings["counts"]
    assert zm.config.use_cache is True
