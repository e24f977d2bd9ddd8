"""The test zoo: deterministic, runnable, exportable, and with nothing left at its default value."""
import pytest
import torch
from torch import nn

from spinfx.engine.errors import BadInput
from spinfx.checkpoint.moe import dense_experts
from spinfx.testing.zoo import ZOO, build, random_llama, tied


def _blocks(model: nn.Module) -> nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@pytest.mark.parametrize("name", ZOO)
def test_same_seed_same_model(name):
    a, b, c = build(name), build(name), build(name, seed=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.example_inputs["input_ids"], b.example_inputs["input_ids"])
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ZOO)
def test_export_matches_eager(name):
    z = build(name)
    with torch.no_grad():
        eager = z.model(**z.example_inputs).logits
    assert eager.shape == (1, 8, z.expect.vocab)
    assert torch.isfinite(eager).all()
    assert eager.std() > 0.1, "logits nearly constant: the random model is too weak to detect bad rewrites"
    with dense_experts(z.model):  # a mixture of experts traces in its dense form (spinfx.checkpoint.moe); others as they are
        exported = torch.export.export(z.model, (), z.example_inputs, strict=False)
    out = exported.module()(**z.example_inputs)
    torch.testing.assert_close(out.logits, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_norms_and_biases_are_randomized(name):
    z = build(name)
    norms = [m for m in z.model.modules() if "norm" in type(m).__name__.lower()]
    assert len(norms) == z.expect.norms
    for norm in norms:
        scale = norm.weight + 1 if z.expect.norm == "rms1p" else norm.weight
        assert not torch.allclose(scale, torch.ones_like(scale)), norm
        assert scale.std() > 0.05
    biases = [p for n, p in z.model.named_parameters() if n.endswith(".bias")]
    assert bool(biases) == (z.expect.norm == "layer" or z.expect.qkv_bias)
    for bias in biases:
        assert bias.abs().min() > 0


@pytest.mark.parametrize("name", ZOO)
def test_expect_describes_the_model(name):
    z = build(name, layers=3)
    e = z.expect
    blocks = _blocks(z.model)
    assert len(blocks) == e.layers == 3
    # a mixture's router and experts are no nn.Linear: 3-D expert tensors, one linear each in the trace
    moe = 1 + 2 * e.experts if e.experts else 0
    assert sum(_is_linear(m) for m in blocks[0].modules()) == e.linears_per_layer - moe
    if e.experts:
        experts = next(m for m in blocks[0].modules() if hasattr(m, "gate_up_proj"))
        assert experts.gate_up_proj.shape == (e.experts, 2 * e.intermediate, e.hidden)
        assert experts.down_proj.shape == (e.experts, e.hidden, e.intermediate)
    assert (z.model.lm_head.weight.data_ptr() == z.model.get_input_embeddings().weight.data_ptr()) == e.tied
    assert tied(name) == e.tied  # what test collection reads without building the model
    assert any(type(m).__name__ == "Conv1D" for m in z.model.modules()) == (e.linear == "conv1d")
    assert any(isinstance(m, nn.LayerNorm) for m in z.model.modules()) == (e.norm == "layer")
    if e.positions == "rope":  # RoPE turns rotary · head_dim dims of each head: half as many frequencies
        inv_freq = next(m.inv_freq for m in z.model.modules() if hasattr(m, "inv_freq"))
        assert 2 * inv_freq.numel() == e.rotary * e.head_dim
    assert e.intermediate % 2 == 0 and e.intermediate & (e.intermediate - 1), "intermediate should not be 2^k"


def test_zoo_covers_the_structures():
    e = {name: build(name).expect for name in ZOO}
    assert e["llama"].tied and not e["llama_untied"].tied
    assert (e["llama"].heads, e["llama"].kv_heads, e["llama"].head_dim) == (4, 2, 16)
    assert e["gemma"].heads * e["gemma"].head_dim != e["gemma"].hidden and e["gemma"].norm == "rms1p"
    assert e["qwen2"].qkv_bias and e["phi3"].fused_qkv and e["phi3"].fused_gate_up
    assert e["opt"].positions == "learned" and e["gpt2"].linear == "conv1d"
    assert (e["mixtral"].experts, e["mixtral"].top_k) == (4, 2) and e["qwen3_moe"].qk_norm and e["qwen3_moe"].experts
    assert e["olmo2"].norm_place == "post" and e["olmo2"].qk_norm and not e["olmo2"].tied
    assert e["gemma2"].norm_place == "sandwich" and e["gemma2"].norm == "rms1p"
    assert {e[n].norm_place for n in ZOO} - {"post", "sandwich"} == {"pre"}
    assert (e["stablelm"].rotary, e["phi"].rotary, e["gpt_neox"].rotary) == (0.25, 0.5, 0.25)
    assert e["phi"].block_norms == 1 and e["gpt_neox"].fused_qkv and not e["gpt_neox"].gated_mlp
    assert {e[n].norm for n in ("stablelm", "phi", "gpt_neox")} == {"layer"}


def test_gemma2_caps_and_windows_bend_the_output():
    # the soft-caps and the sliding window are small enough to change the logits: a rewrite that
    # dropped one would show (and Gemma-2 loads with the eager attention transformers requires)
    import transformers as tf

    z = build("gemma2")
    assert z.model.config._attn_implementation == "eager"
    with torch.no_grad():
        ref = z.model(**z.example_inputs).logits
        for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64}):
            config = type(z.config)(**(z.config.to_dict() | change))
            other = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            other.load_state_dict(z.model.state_dict())
            out = other(**z.example_inputs).logits
            assert ((out - ref).abs().max() / ref.abs().max()) > 1e-2, change


def test_dtype():
    z = build("llama", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in z.model.parameters())
    with torch.no_grad():
        assert z.model(**z.example_inputs).logits.dtype == torch.bfloat16


def test_random_llama_depths():
    for layers in (4, 64):
        z = random_llama(layers)
        assert len(_blocks(z.model)) == z.expect.layers == layers
    wide = random_llama(2, hidden=128, heads=8, kv_heads=4)
    assert (wide.expect.hidden, wide.expect.head_dim, wide.expect.kv_heads) == (128, 16, 4)
    with torch.no_grad():
        assert torch.isfinite(wide.model(**wide.example_inputs).logits).all()


def test_unknown_name():
    with pytest.raises(BadInput, match="unknown zoo model"):
        build("bert")
