"""llm-compressor's mapping vocabulary as constraints: agreement passes, disagreement is named."""
import pytest

import spinfx
from spinfx.testing import zoo
from spinfx.passes import CheckMappings, FoldNorms, Rotate
from spinfx.recipe import Recipe

# llm-compressor's default SpinQuant mappings for Llama-style models, in its own words
LLAMA = dict(embedding="re:.*embed_tokens$", attn_q="re:.*q_proj$", attn_k="re:.*k_proj$",
             attn_v="re:.*v_proj$", attn_o="re:.*o_proj$", attn_head_dim=16,
             mlp_in=["re:.*up_proj$", "re:.*gate_proj$"], mlp_out=["re:.*down_proj$"])
NORMS = ({"norm": "re:.*input_layernorm$", "linears": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]},
         {"norm": "re:.*post_attention_layernorm$", "linears": ["re:.*up_proj$", "re:.*gate_proj$"]},
         {"norm": "model.norm", "linears": ["lm_head"]})


def test_llm_compressor_mappings_agree_with_the_graph():
    zm = zoo.build("llama")
    r = spinfx.rewrite(zm.model, Recipe("m", [CheckMappings(spinquant=LLAMA, norms=NORMS), FoldNorms(), Rotate()]),
                       zm.example_inputs)
    assert "agree" in r.report.passes[0].notes[0]
    assert r.report.passes[0].findings["roles"]["attn_q"] == 2


def test_llama_names_on_a_fused_model_are_refused_with_the_difference():
    zm = zoo.build("phi3")  # one qkv_proj, one gate_up_proj: the Llama regexes name nothing
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("m", [CheckMappings(spinquant=LLAMA)]), zm.example_inputs)
    msg = str(e.value)
    assert "attn_q: the graph finds ['model.layers.0.self_attn.qkv_proj'" in msg
    assert "attn_k: the graph finds ['model.layers.0.self_attn.qkv_proj'" in msg
    # 're:.*v_proj$' also names qkv_proj and 're:.*up_proj$' names gate_up_proj: those two agree by
    # accident of the regex, which is exactly why structure, not names, decides in spinfx
    assert "attn_v" not in msg and "mlp_in" not in msg


def test_wrong_head_dim_and_wrong_norm_mapping_are_named():
    zm = zoo.build("llama")
    bad = dict(LLAMA, attn_head_dim=64)
    norms = ({"norm": "re:.*input_layernorm$", "linears": ["re:.*q_proj$"]},)  # forgets k and v
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("m", [CheckMappings(spinquant=bad, norms=norms)]), zm.example_inputs)
    msg = str(e.value)
    assert "attn_head_dim: mapping says 64, attention has head_dim [16]" in msg
    assert "norm model.layers.0.input_layernorm → linears: the graph finds ['model.layers.0.self_attn.k_proj'" in msg
