"""Mixture of experts: traced in a dense form (spinfx.moe), router + experts as sibling groups of one input,
fold / R1 / R4 / quantize / tensor parallel acting on every expert — certified, or refused with a reason."""
import functools

import pytest
import torch

import spinfx
from spinfx import zoo
from spinfx.moe import dense_experts
from spinfx.passes import FoldNorms, Rotate
from spinfx.passes.quantize import Quantize, quantized_layers
from spinfx.passes.shard import Shard
from spinfx.recipe import Recipe

aten = torch.ops.aten
W4 = {"bits": 4, "group_size": 32, "symmetric": True, "method": "rtn"}


@functools.lru_cache(maxsize=None)
def _zoo(name, dtype=torch.float32):
    return zoo.build(name, dtype=dtype)


def _experts(model, layer=0):
    return model.model.layers[layer].mlp.experts


def test_mixtral_traces_and_the_module_is_restored():
    # before spinfx.moe: "Could not guard on data-dependent expression" (the loop over the chosen experts)
    zm = _zoo("mixtral")
    ex = _experts(zm.model)
    before = dict(zm.model.state_dict())
    prog = spinfx.trace(zm.model, zm.example_inputs)
    with torch.no_grad():
        ref = zm.model(**zm.example_inputs).logits
        got = prog(**zm.example_inputs).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # per-expert linears, slices of the stacked tensors; the module is as it was
    consts = prog.consts()
    assert torch.equal(consts["model.layers.0.mlp.experts.3.gate_up_proj.weight"], ex.gate_up_proj[3])
    assert torch.equal(consts["model.layers.1.mlp.experts.2.down_proj.weight"],
                       _experts(zm.model, 1).down_proj[2])
    assert zm.model.state_dict().keys() == before.keys()
    assert "forward" not in ex.__dict__ and not hasattr(ex, "0") and ex.gate_up_proj.dim() == 3


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_dense_form_is_the_sparse_function(name):
    # the experts module alone, float64, every token routed: Σ_e w_e·expert_e(x) = the sparse loop
    zm = zoo.build(name, dtype=torch.float64)
    ex = _experts(zm.model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, ex.hidden_dim, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(ex.num_experts, generator=g)[:2] for _ in range(32)])
    w = torch.rand(32, 2, generator=g, dtype=torch.float64)
    ex.config._experts_implementation = "eager"  # the loop over chosen experts (grouped_mm has no float64)
    with torch.no_grad():
        sparse = ex(x, idx, w)
        with dense_experts(zm.model):
            dense = ex(x, idx, w)
    assert (dense - sparse).abs().max().item() <= 1e-12 * sparse.abs().max().item()


def test_inspect_shows_expert_groups():
    zm = _zoo("qwen3_moe")
    rep = spinfx.inspect(zm.model, zm.example_inputs)
    assert rep.contract.ok and rep.contract.env == {"L": 2, "E": 4}
    experts = rep.passes[0].findings["experts"]
    assert experts == {f"model.layers.{i}.mlp.gate": f"4 experts (top-2) read its input: model.layers.{i}.mlp.experts.{{0..3}}"
                       for i in range(2)}


def test_fold_puts_gamma_into_router_and_every_expert():
    zm = _zoo("mixtral")
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    assert r.report.passes[0].certificate["rel"] <= 1e-10
    c, layer = r.program.consts(), zm.model.model.layers[0]
    gamma = layer.post_attention_layernorm.weight.detach()
    assert torch.allclose(c["model.layers.0.mlp.gate.weight"], layer.mlp.gate.weight.detach() * gamma)
    for e in range(4):
        assert torch.allclose(c[f"model.layers.0.mlp.experts.{e}.gate_up_proj.weight"],
                              layer.mlp.experts.gate_up_proj[e].detach() * gamma)


def test_spinquant_rotates_router_and_experts_and_r4_each_down_proj():
    zm = _zoo("mixtral")
    r = spinfx.rewrite(zm.model, "spinquant", zm.example_inputs)
    assert all(p.certificate["rel"] <= 1e-10 for p in r.report.passes if p.certificate)
    rot = r.report.pass_result("rotate").findings
    assert rot["r4"]["sites"] == 2 * 4  # one online Hadamard per expert down_proj
    assert rot["r1"]["writers"] == 1 + 2 + 2 * 4  # embedding, o_proj, every expert's down_proj
    c = r.program.consts()
    assert r.report.extra["linears"]["changed"] == r.report.extra["linears"]["total"]  # routers included
    assert not torch.allclose(c["model.layers.1.mlp.gate.weight"], zm.model.model.layers[1].mlp.gate.weight)


def test_quantize_keeps_routers_in_float_unless_asked():
    zm = _zoo("mixtral")
    r = spinfx.rewrite(zm.model, Recipe("q", [Quantize(weights=W4)]), zm.example_inputs)
    q = r.report.pass_result("quantize")
    assert q.certificate["rel"] <= 1e-10 and any("MoE routers" in n for n in q.notes)
    layers = quantized_layers(r.program)
    assert "model.layers.0.mlp.experts.3.down_proj" in layers and "model.layers.0.mlp.gate" not in layers
    floats = [n.meta["module"] for n in r.program.graph.nodes if n.target is aten.linear.default]
    assert sorted(floats) == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    r = spinfx.rewrite(zm.model, Recipe("q", [Quantize(weights=W4, router=True)]), zm.example_inputs)
    assert "model.layers.1.mlp.gate" in quantized_layers(r.program)
    with pytest.raises(spinfx.SpinfxError, match="router must be true or false"):
        spinfx.rewrite(zm.model, Recipe("q", [Quantize(weights=W4, router="yes")]), zm.example_inputs)


def test_tensor_parallel_splits_experts_like_dense_mlps():
    # float64 model (HF's norms cast to float32 and back: norm → cast → view → router/experts)
    zm = _zoo("mixtral", torch.float64)
    passes = [FoldNorms(), Rotate(r3=True, r4=True, r4_block=20), Shard(tp=2, rank=1)]
    r = spinfx.rewrite(zm.model, Recipe("tp", passes), zm.example_inputs)
    assert all(p.certificate["rel"] <= 1e-10 for p in r.report.passes if p.certificate)
    c = r.program.consts()  # rank 1's program
    assert tuple(c["model.layers.0.mlp.experts.0.gate_up_proj.weight"].shape) == (40, 64)  # [gate_r; up_r]
    assert tuple(c["model.layers.0.mlp.experts.0.down_proj.weight"].shape) == (64, 20)
    assert tuple(c["model.layers.0.mlp.gate.weight"].shape) == (4, 64)  # the router is replicated


def test_experts_layout_without_a_dense_form_is_refused():
    zm = zoo.build("mixtral")
    _experts(zm.model, 1).is_transposed = True
    with pytest.raises(spinfx.Unsupported, match="experts.*transposed weights.*no dense formulation"):
        spinfx.rewrite(zm.model, "fold", zm.example_inputs)


def test_saving_per_expert_weights_is_refused(tmp_path):
    # the model class stores experts stacked [E, …]; the rewritten program holds one matrix per expert
    zm = _zoo("mixtral")
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    with pytest.raises(spinfx.Unsupported, match="experts.0.*has no parameter"):
        r.save(tmp_path / "out")
