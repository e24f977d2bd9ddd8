"""The zoo: every family's contract holds, and goldens pin one decoder layer's canonical graph and
the inspect report. Regenerate on purpose only: SPINFX_ACCEPT=1 ./run test tests/test_zoo_goldens.py,
read the diff, say why in the commit message."""
import functools

import pytest

import spinfx
from spinfx.testing import zoo
from spinfx.testing import graph_text


@functools.lru_cache(maxsize=None)
def traced(name):
    zm = zoo.build(name)
    return zm, spinfx.trace(zm.model, zm.example_inputs), spinfx.inspect(zm.model, zm.example_inputs)


@pytest.mark.parametrize("name", zoo.ZOO)
def test_contract_holds(name):
    zm, _, rep = traced(name)
    assert rep.contract is not None and rep.contract.ok, rep.contract.problems
    # a norm before each block feeds its linears (one norm for both blocks of a parallel Phi layer);
    # post-norms (OLMo-2) feed the stream: only the final norm is left
    e = zm.expect
    assert rep.contract.expected["norm-linears"] == (1 if e.norm_place == "post" else e.block_norms * e.layers + 1)
    assert rep.contract.expected["qkv"] == (0 if e.qkv_interleaved else e.layers)


def test_every_zoo_model_has_goldens():
    assert {n for n in zoo.ZOO} == set(GOLDEN_TESTS)


def test_golden_llama(spinfx_golden):
    _, prog, rep = traced("llama")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v10 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,2,8,16]
v12 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v13 = aten.reshape(v12, [1, 8, -1, 16]) : f32[1,8,2,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,2,8,16]
v15 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v16 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v17 = aten.mul.Tensor(v8, v15) : f32[1,4,8,16]
v18 = aten.slice.Tensor(v8, 3, 0, 8) : f32[1,4,8,8]
v19 = aten.slice.Tensor(v8, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v20 = aten.neg(v19) : f32[1,4,8,8]
v21 = aten.cat([v20, v18], -1) : f32[1,4,8,16]
v22 = aten.mul.Tensor(v21, v16) : f32[1,4,8,16]
v23 = aten.add.Tensor(v17, v22) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v11, v15) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v16) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = aten.unsqueeze(v30, 2) : f32[1,2,1,8,16]
v32 = aten.expand(v31, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v33 = aten.reshape(v32, [1, 4, 8, 16]) : f32[1,4,8,16]
v34 = aten.unsqueeze(v14, 2) : f32[1,2,1,8,16]
v35 = aten.expand(v34, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v36 = aten.reshape(v35, [1, 4, 8, 16]) : f32[1,4,8,16]
v37 = aten.scaled_dot_product_attention(v23, v33, v36, ext3, scale=0.25) : f32[1,4,8,16]
v38 = aten.transpose.int(v37, 1, 2) : f32[1,8,4,16]
v39 = aten.reshape(v38, [1, 8, -1]) : f32[1,8,64]
v40 = aten.linear(v39, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v41 = aten.add.Tensor(ext0, v40) : f32[1,8,64]
v42 = aten.pow.Tensor_Scalar(v41, 2) : f32[1,8,64]
v43 = aten.mean.dim(v42, [-1], True) : f32[1,8,1]
v44 = aten.add.Tensor(v43, 1e-06) : f32[1,8,1]
v45 = aten.rsqrt(v44) : f32[1,8,1]
v46 = aten.mul.Tensor(v41, v45) : f32[1,8,64]
v47 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v46) : f32[1,8,64]
v48 = aten.linear(v47, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v49 = aten.silu(v48) : f32[1,8,88]
v50 = aten.linear(v47, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v51 = aten.mul.Tensor(v49, v50) : f32[1,8,88]
v52 = aten.linear(v51, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v53 = aten.add.Tensor(v41, v52) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: llama

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract llama (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_llama_untied(spinfx_golden):
    _, prog, rep = traced("llama_untied")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v10 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,2,8,16]
v12 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v13 = aten.reshape(v12, [1, 8, -1, 16]) : f32[1,8,2,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,2,8,16]
v15 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v16 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v17 = aten.mul.Tensor(v8, v15) : f32[1,4,8,16]
v18 = aten.slice.Tensor(v8, 3, 0, 8) : f32[1,4,8,8]
v19 = aten.slice.Tensor(v8, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v20 = aten.neg(v19) : f32[1,4,8,8]
v21 = aten.cat([v20, v18], -1) : f32[1,4,8,16]
v22 = aten.mul.Tensor(v21, v16) : f32[1,4,8,16]
v23 = aten.add.Tensor(v17, v22) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v11, v15) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v16) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = aten.unsqueeze(v30, 2) : f32[1,2,1,8,16]
v32 = aten.expand(v31, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v33 = aten.reshape(v32, [1, 4, 8, 16]) : f32[1,4,8,16]
v34 = aten.unsqueeze(v14, 2) : f32[1,2,1,8,16]
v35 = aten.expand(v34, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v36 = aten.reshape(v35, [1, 4, 8, 16]) : f32[1,4,8,16]
v37 = aten.scaled_dot_product_attention(v23, v33, v36, ext3, scale=0.25) : f32[1,4,8,16]
v38 = aten.transpose.int(v37, 1, 2) : f32[1,8,4,16]
v39 = aten.reshape(v38, [1, 8, -1]) : f32[1,8,64]
v40 = aten.linear(v39, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v41 = aten.add.Tensor(ext0, v40) : f32[1,8,64]
v42 = aten.pow.Tensor_Scalar(v41, 2) : f32[1,8,64]
v43 = aten.mean.dim(v42, [-1], True) : f32[1,8,1]
v44 = aten.add.Tensor(v43, 1e-06) : f32[1,8,1]
v45 = aten.rsqrt(v44) : f32[1,8,1]
v46 = aten.mul.Tensor(v41, v45) : f32[1,8,64]
v47 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v46) : f32[1,8,64]
v48 = aten.linear(v47, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v49 = aten.silu(v48) : f32[1,8,88]
v50 = aten.linear(v47, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v51 = aten.mul.Tensor(v49, v50) : f32[1,8,88]
v52 = aten.linear(v51, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v53 = aten.add.Tensor(v41, v52) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: llama

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract llama (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_mistral(spinfx_golden):
    _, prog, rep = traced("mistral")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v10 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,2,8,16]
v12 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v13 = aten.reshape(v12, [1, 8, -1, 16]) : f32[1,8,2,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,2,8,16]
v15 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v16 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v17 = aten.mul.Tensor(v8, v15) : f32[1,4,8,16]
v18 = aten.slice.Tensor(v8, 3, 0, 8) : f32[1,4,8,8]
v19 = aten.slice.Tensor(v8, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v20 = aten.neg(v19) : f32[1,4,8,8]
v21 = aten.cat([v20, v18], -1) : f32[1,4,8,16]
v22 = aten.mul.Tensor(v21, v16) : f32[1,4,8,16]
v23 = aten.add.Tensor(v17, v22) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v11, v15) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v16) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = aten.unsqueeze(v30, 2) : f32[1,2,1,8,16]
v32 = aten.expand(v31, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v33 = aten.reshape(v32, [1, 4, 8, 16]) : f32[1,4,8,16]
v34 = aten.unsqueeze(v14, 2) : f32[1,2,1,8,16]
v35 = aten.expand(v34, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v36 = aten.reshape(v35, [1, 4, 8, 16]) : f32[1,4,8,16]
v37 = aten.scaled_dot_product_attention(v23, v33, v36, ext3, scale=0.25) : f32[1,4,8,16]
v38 = aten.transpose.int(v37, 1, 2) : f32[1,8,4,16]
v39 = aten.reshape(v38, [1, 8, -1]) : f32[1,8,64]
v40 = aten.linear(v39, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v41 = aten.add.Tensor(ext0, v40) : f32[1,8,64]
v42 = aten.pow.Tensor_Scalar(v41, 2) : f32[1,8,64]
v43 = aten.mean.dim(v42, [-1], True) : f32[1,8,1]
v44 = aten.add.Tensor(v43, 1e-06) : f32[1,8,1]
v45 = aten.rsqrt(v44) : f32[1,8,1]
v46 = aten.mul.Tensor(v41, v45) : f32[1,8,64]
v47 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v46) : f32[1,8,64]
v48 = aten.linear(v47, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v49 = aten.silu(v48) : f32[1,8,88]
v50 = aten.linear(v47, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v51 = aten.mul.Tensor(v49, v50) : f32[1,8,88]
v52 = aten.linear(v51, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v53 = aten.add.Tensor(v41, v52) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: mistral

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract mistral (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_qwen2(spinfx_golden):
    _, prog, rep = traced("qwen2")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight, $model.layers.0.self_attn.q_proj.bias) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight, $model.layers.0.self_attn.k_proj.bias) : f32[1,8,32]
v10 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,2,8,16]
v12 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight, $model.layers.0.self_attn.v_proj.bias) : f32[1,8,32]
v13 = aten.reshape(v12, [1, 8, -1, 16]) : f32[1,8,2,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,2,8,16]
v15 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v16 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v17 = aten.mul.Tensor(v8, v15) : f32[1,4,8,16]
v18 = aten.slice.Tensor(v8, 3, 0, 8) : f32[1,4,8,8]
v19 = aten.slice.Tensor(v8, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v20 = aten.neg(v19) : f32[1,4,8,8]
v21 = aten.cat([v20, v18], -1) : f32[1,4,8,16]
v22 = aten.mul.Tensor(v21, v16) : f32[1,4,8,16]
v23 = aten.add.Tensor(v17, v22) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v11, v15) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v16) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = aten.unsqueeze(v30, 2) : f32[1,2,1,8,16]
v32 = aten.expand(v31, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v33 = aten.reshape(v32, [1, 4, 8, 16]) : f32[1,4,8,16]
v34 = aten.unsqueeze(v14, 2) : f32[1,2,1,8,16]
v35 = aten.expand(v34, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v36 = aten.reshape(v35, [1, 4, 8, 16]) : f32[1,4,8,16]
v37 = aten.scaled_dot_product_attention(v23, v33, v36, ext3, scale=0.25) : f32[1,4,8,16]
v38 = aten.transpose.int(v37, 1, 2) : f32[1,8,4,16]
v39 = aten.reshape(v38, [1, 8, -1]) : f32[1,8,64]
v40 = aten.linear(v39, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v41 = aten.add.Tensor(ext0, v40) : f32[1,8,64]
v42 = aten.pow.Tensor_Scalar(v41, 2) : f32[1,8,64]
v43 = aten.mean.dim(v42, [-1], True) : f32[1,8,1]
v44 = aten.add.Tensor(v43, 1e-06) : f32[1,8,1]
v45 = aten.rsqrt(v44) : f32[1,8,1]
v46 = aten.mul.Tensor(v41, v45) : f32[1,8,64]
v47 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v46) : f32[1,8,64]
v48 = aten.linear(v47, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v49 = aten.silu(v48) : f32[1,8,88]
v50 = aten.linear(v47, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v51 = aten.mul.Tensor(v49, v50) : f32[1,8,88]
v52 = aten.linear(v51, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v53 = aten.add.Tensor(v41, v52) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: qwen2

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract qwen2 (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_gemma(spinfx_golden):
    _, prog, rep = traced("gemma")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.add.Tensor($model.layers.0.input_layernorm.weight, 1.0) : f32[64]
v6 = aten.mul.Tensor(v4, v5) : f32[1,8,64]
v7 = aten.linear(v6, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,96]
v8 = aten.reshape(v7, [1, 8, -1, 24]) : f32[1,8,4,24]
v9 = aten.transpose.int(v8, 1, 2) : f32[1,4,8,24]
v10 = aten.linear(v6, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,24]
v11 = aten.reshape(v10, [1, 8, -1, 24]) : f32[1,8,1,24]
v12 = aten.transpose.int(v11, 1, 2) : f32[1,1,8,24]
v13 = aten.linear(v6, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,24]
v14 = aten.reshape(v13, [1, 8, -1, 24]) : f32[1,8,1,24]
v15 = aten.transpose.int(v14, 1, 2) : f32[1,1,8,24]
v16 = aten.unsqueeze(ext1, 1) : f32[1,1,8,24]
v17 = aten.unsqueeze(ext2, 1) : f32[1,1,8,24]
v18 = aten.mul.Tensor(v9, v16) : f32[1,4,8,24]
v19 = aten.slice.Tensor(v9, 3, 0, 12) : f32[1,4,8,12]
v20 = aten.slice.Tensor(v9, 3, 12, 9223372036854775807) : f32[1,4,8,12]
v21 = aten.neg(v20) : f32[1,4,8,12]
v22 = aten.cat([v21, v19], -1) : f32[1,4,8,24]
v23 = aten.mul.Tensor(v22, v17) : f32[1,4,8,24]
v24 = aten.add.Tensor(v18, v23) : f32[1,4,8,24]
v25 = aten.mul.Tensor(v12, v16) : f32[1,1,8,24]
v26 = aten.slice.Tensor(v12, 3, 0, 12) : f32[1,1,8,12]
v27 = aten.slice.Tensor(v12, 3, 12, 9223372036854775807) : f32[1,1,8,12]
v28 = aten.neg(v27) : f32[1,1,8,12]
v29 = aten.cat([v28, v26], -1) : f32[1,1,8,24]
v30 = aten.mul.Tensor(v29, v17) : f32[1,1,8,24]
v31 = aten.add.Tensor(v25, v30) : f32[1,1,8,24]
v32 = aten.unsqueeze(v31, 2) : f32[1,1,1,8,24]
v33 = aten.expand(v32, [1, 1, 4, 8, 24]) : f32[1,1,4,8,24]
v34 = aten.reshape(v33, [1, 4, 8, 24]) : f32[1,4,8,24]
v35 = aten.unsqueeze(v15, 2) : f32[1,1,1,8,24]
v36 = aten.expand(v35, [1, 1, 4, 8, 24]) : f32[1,1,4,8,24]
v37 = aten.reshape(v36, [1, 4, 8, 24]) : f32[1,4,8,24]
v38 = aten.scaled_dot_product_attention(v24, v34, v37, ext3, scale=0.2041241452319315) : f32[1,4,8,24]
v39 = aten.transpose.int(v38, 1, 2) : f32[1,8,4,24]
v40 = aten.reshape(v39, [1, 8, -1]) : f32[1,8,96]
v41 = aten.linear(v40, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v42 = aten.add.Tensor(ext0, v41) : f32[1,8,64]
v43 = aten.pow.Tensor_Scalar(v42, 2) : f32[1,8,64]
v44 = aten.mean.dim(v43, [-1], True) : f32[1,8,1]
v45 = aten.add.Tensor(v44, 1e-06) : f32[1,8,1]
v46 = aten.rsqrt(v45) : f32[1,8,1]
v47 = aten.mul.Tensor(v42, v46) : f32[1,8,64]
v48 = aten.add.Tensor($model.layers.0.post_attention_layernorm.weight, 1.0) : f32[64]
v49 = aten.mul.Tensor(v47, v48) : f32[1,8,64]
v50 = aten.linear(v49, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v51 = aten.gelu(v50, approximate='tanh') : f32[1,8,88]
v52 = aten.linear(v49, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v53 = aten.mul.Tensor(v51, v52) : f32[1,8,88]
v54 = aten.linear(v53, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v55 = aten.add.Tensor(v42, v54) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: gemma

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract gemma (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_phi3(spinfx_golden):
    _, prog, rep = traced("phi3")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-05) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.qkv_proj.weight) : f32[1,8,128]
v7 = aten.slice.Tensor(v6, 2, 0, 64) : f32[1,8,64]
v8 = aten.slice.Tensor(v6, 2, 64, 96) : f32[1,8,32]
v9 = aten.slice.Tensor(v6, 2, 96, 9223372036854775807) : f32[1,8,32]
v10 = aten.reshape(v7, [1, 8, -1, 16]) : f32[1,8,4,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,4,8,16]
v12 = aten.reshape(v8, [1, 8, -1, 16]) : f32[1,8,2,16]
v13 = aten.transpose.int(v12, 1, 2) : f32[1,2,8,16]
v14 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v15 = aten.transpose.int(v14, 1, 2) : f32[1,2,8,16]
v16 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v17 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v18 = aten.slice.Tensor(v11, 3, 16, 9223372036854775807) : f32[1,4,8,0]
v19 = aten.slice.Tensor(v13, 3, 16, 9223372036854775807) : f32[1,2,8,0]
v20 = aten.mul.Tensor(v11, v16) : f32[1,4,8,16]
v21 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,4,8,8]
v22 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v23 = aten.neg(v22) : f32[1,4,8,8]
v24 = aten.cat([v23, v21], -1) : f32[1,4,8,16]
v25 = aten.mul.Tensor(v24, v17) : f32[1,4,8,16]
v26 = aten.add.Tensor(v20, v25) : f32[1,4,8,16]
v27 = aten.cat([v26, v18], -1) : f32[1,4,8,16]
v28 = aten.mul.Tensor(v13, v16) : f32[1,2,8,16]
v29 = aten.slice.Tensor(v13, 3, 0, 8) : f32[1,2,8,8]
v30 = aten.slice.Tensor(v13, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v31 = aten.neg(v30) : f32[1,2,8,8]
v32 = aten.cat([v31, v29], -1) : f32[1,2,8,16]
v33 = aten.mul.Tensor(v32, v17) : f32[1,2,8,16]
v34 = aten.add.Tensor(v28, v33) : f32[1,2,8,16]
v35 = aten.cat([v34, v19], -1) : f32[1,2,8,16]
v36 = aten.unsqueeze(v35, 2) : f32[1,2,1,8,16]
v37 = aten.expand(v36, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v38 = aten.reshape(v37, [1, 4, 8, 16]) : f32[1,4,8,16]
v39 = aten.unsqueeze(v15, 2) : f32[1,2,1,8,16]
v40 = aten.expand(v39, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v41 = aten.reshape(v40, [1, 4, 8, 16]) : f32[1,4,8,16]
v42 = aten.scaled_dot_product_attention(v27, v38, v41, ext3, scale=0.25) : f32[1,4,8,16]
v43 = aten.transpose.int(v42, 1, 2) : f32[1,8,4,16]
v44 = aten.reshape(v43, [1, 8, -1]) : f32[1,8,64]
v45 = aten.linear(v44, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v46 = aten.add.Tensor(ext0, v45) : f32[1,8,64]
v47 = aten.pow.Tensor_Scalar(v46, 2) : f32[1,8,64]
v48 = aten.mean.dim(v47, [-1], True) : f32[1,8,1]
v49 = aten.add.Tensor(v48, 1e-05) : f32[1,8,1]
v50 = aten.rsqrt(v49) : f32[1,8,1]
v51 = aten.mul.Tensor(v46, v50) : f32[1,8,64]
v52 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v51) : f32[1,8,64]
v53 = aten.linear(v52, $model.layers.0.mlp.gate_up_proj.weight) : f32[1,8,176]
v54 = aten.split.Tensor(v53, 88, -1) : (f32[1,8,88], f32[1,8,88])
v55 = getitem(v54, 0) : f32[1,8,88]
v56 = getitem(v54, 1) : f32[1,8,88]
v57 = aten.silu(v55) : f32[1,8,88]
v58 = aten.mul.Tensor(v56, v57) : f32[1,8,88]
v59 = aten.linear(v58, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v60 = aten.add.Tensor(v46, v59) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: phi3

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract phi3 (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_opt(spinfx_golden):
    _, prog, rep = traced("opt")
    spinfx_golden(graph_text(prog, module="model.decoder.layers.0"), """
v0 = aten.layer_norm(ext0, [64], $model.decoder.layers.0.self_attn_layer_norm.weight, $model.decoder.layers.0.self_attn_layer_norm.bias, 1e-05, False) : f32[1,8,64]
v1 = aten.linear(v0, $model.decoder.layers.0.self_attn.q_proj.weight, $model.decoder.layers.0.self_attn.q_proj.bias) : f32[1,8,64]
v2 = aten.mul.Tensor(v1, 0.25) : f32[1,8,64]
v3 = aten.reshape(v2, [1, -1, 4, 16]) : f32[1,8,4,16]
v4 = aten.transpose.int(v3, 1, 2) : f32[1,4,8,16]
v5 = aten.linear(v0, $model.decoder.layers.0.self_attn.k_proj.weight, $model.decoder.layers.0.self_attn.k_proj.bias) : f32[1,8,64]
v6 = aten.linear(v0, $model.decoder.layers.0.self_attn.v_proj.weight, $model.decoder.layers.0.self_attn.v_proj.bias) : f32[1,8,64]
v7 = aten.reshape(v5, [1, -1, 4, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.reshape(v6, [1, -1, 4, 16]) : f32[1,8,4,16]
v10 = aten.transpose.int(v9, 1, 2) : f32[1,4,8,16]
v11 = aten.scaled_dot_product_attention(v4, v8, v10, ext1, scale=1.0) : f32[1,4,8,16]
v12 = aten.transpose.int(v11, 1, 2) : f32[1,8,4,16]
v13 = aten.reshape(v12, [1, 8, -1]) : f32[1,8,64]
v14 = aten.linear(v13, $model.decoder.layers.0.self_attn.out_proj.weight, $model.decoder.layers.0.self_attn.out_proj.bias) : f32[1,8,64]
v15 = aten.add.Tensor(ext0, v14) : f32[1,8,64]
v16 = aten.reshape(v15, [-1, 64]) : f32[8,64]
v17 = aten.layer_norm(v16, [64], $model.decoder.layers.0.final_layer_norm.weight, $model.decoder.layers.0.final_layer_norm.bias, 1e-05, False) : f32[8,64]
v18 = aten.linear(v17, $model.decoder.layers.0.fc1.weight, $model.decoder.layers.0.fc1.bias) : f32[8,88]
v19 = aten.relu(v18) : f32[8,88]
v20 = aten.linear(v19, $model.decoder.layers.0.fc2.weight, $model.decoder.layers.0.fc2.bias) : f32[8,64]
v21 = aten.add.Tensor(v16, v20) : f32[8,64]
v22 = aten.reshape(v21, [1, 8, 64]) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: opt

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=0, rope=0, attention=2, residual-writers=5, residual-readers=5
  residual: embedding=model.decoder.embed_tokens.weight, writers=5, reader_norms=5, writer_kinds=embedding, linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                0 matches  nearest miss: 0.25: expected aten.silu|aten.gelu|aten.relu|aten.tanh|aten.sigmoid (trying at mul_tensor_1 [aten.mul.Tensor in model.decoder.layers.0.self_attn])
  rope                   0 matches  nearest miss: transpose_int [aten.transpose.int in model.decoder.layers.0.self_attn]: expected aten.cat (trying at scaled_dot_product_attention_default [aten.scaled_dot_product_attention in model.decoder.layers.0.self_attn])
  attention              2 matches

contract opt (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    0, found    0
  ok rope               expected    0, found    0
  ok attention          expected    2, found    2
  ok residual-writers   expected    5, found    5
""")


def test_golden_gpt2(spinfx_golden):
    _, prog, rep = traced("gpt2")
    spinfx_golden(graph_text(prog, module="transformer.h.0"), """
v0 = aten.layer_norm(ext0, [64], $transformer.h.0.ln_1.weight, $transformer.h.0.ln_1.bias, 1e-05, False) : f32[1,8,64]
v1 = aten.reshape(v0, [-1, 64]) : f32[8,64]
v2 = aten.addmm($transformer.h.0.attn.c_attn.bias, v1, $transformer.h.0.attn.c_attn.weight) : f32[8,192]
v3 = aten.reshape(v2, [1, 8, 192]) : f32[1,8,192]
v4 = aten.split.Tensor(v3, 64, 2) : (f32[1,8,64], f32[1,8,64], f32[1,8,64])
v5 = getitem(v4, 0) : f32[1,8,64]
v6 = getitem(v4, 1) : f32[1,8,64]
v7 = getitem(v4, 2) : f32[1,8,64]
v8 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v9 = aten.transpose.int(v8, 1, 2) : f32[1,4,8,16]
v10 = aten.reshape(v7, [1, 8, -1, 16]) : f32[1,8,4,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,4,8,16]
v12 = aten.reshape(v5, [1, 8, -1, 16]) : f32[1,8,4,16]
v13 = aten.transpose.int(v12, 1, 2) : f32[1,4,8,16]
v14 = aten.scaled_dot_product_attention(v13, v9, v11, ext1, scale=0.25) : f32[1,4,8,16]
v15 = aten.transpose.int(v14, 1, 2) : f32[1,8,4,16]
v16 = aten.reshape(v15, [1, 8, -1]) : f32[1,8,64]
v17 = aten.reshape(v16, [-1, 64]) : f32[8,64]
v18 = aten.addmm($transformer.h.0.attn.c_proj.bias, v17, $transformer.h.0.attn.c_proj.weight) : f32[8,64]
v19 = aten.reshape(v18, [1, 8, 64]) : f32[1,8,64]
v20 = aten.add.Tensor(v19, ext0) : f32[1,8,64]
v21 = aten.layer_norm(v20, [64], $transformer.h.0.ln_2.weight, $transformer.h.0.ln_2.bias, 1e-05, False) : f32[1,8,64]
v22 = aten.reshape(v21, [-1, 64]) : f32[8,64]
v23 = aten.addmm($transformer.h.0.mlp.c_fc.bias, v22, $transformer.h.0.mlp.c_fc.weight) : f32[8,88]
v24 = aten.reshape(v23, [1, 8, 88]) : f32[1,8,88]
v25 = aten.mul.Tensor(v24, 0.5) : f32[1,8,88]
v26 = aten.pow.Tensor_Scalar(v24, 3.0) : f32[1,8,88]
v27 = aten.mul.Tensor(v26, 0.044715) : f32[1,8,88]
v28 = aten.add.Tensor(v24, v27) : f32[1,8,88]
v29 = aten.mul.Tensor(v28, 0.7978845608028654) : f32[1,8,88]
v30 = aten.tanh(v29) : f32[1,8,88]
v31 = aten.add.Tensor(v30, 1.0) : f32[1,8,88]
v32 = aten.mul.Tensor(v25, v31) : f32[1,8,88]
v33 = aten.reshape(v32, [-1, 88]) : f32[8,88]
v34 = aten.addmm($transformer.h.0.mlp.c_proj.bias, v33, $transformer.h.0.mlp.c_proj.weight) : f32[8,64]
v35 = aten.reshape(v34, [1, 8, 64]) : f32[1,8,64]
v36 = aten.add.Tensor(v20, v35) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: gpt2

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=0, rope=0, attention=2, residual-writers=5, residual-readers=5
  residual: embedding=transformer.wte.weight, writers=5, reader_norms=5, writer_kinds=embedding, linear_t, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                0 matches  nearest miss: reshape_default_9 [aten.reshape in transformer.h.0.mlp.c_fc]: expected aten.silu|aten.gelu|aten.relu|aten.tanh|aten.sigmoid (trying at mul_tensor [aten.mul.Tensor in transformer.h.0.mlp.act])
  rope                   0 matches  nearest miss: transpose_int_2 [aten.transpose.int in transformer.h.0.attn]: expected aten.cat (trying at scaled_dot_product_attention_default [aten.scaled_dot_product_attention in transformer.h.0.attn])
  attention              2 matches

contract gpt2 (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    0, found    0
  ok rope               expected    0, found    0
  ok attention          expected    2, found    2
  ok residual-writers   expected    5, found    5
""")


def test_golden_qwen3(spinfx_golden):
    _, prog, rep = traced("qwen3")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.pow.Tensor_Scalar(v7, 2) : f32[1,8,4,16]
v9 = aten.mean.dim(v8, [-1], True) : f32[1,8,4,1]
v10 = aten.add.Tensor(v9, 1e-06) : f32[1,8,4,1]
v11 = aten.rsqrt(v10) : f32[1,8,4,1]
v12 = aten.mul.Tensor(v7, v11) : f32[1,8,4,16]
v13 = aten.mul.Tensor($model.layers.0.self_attn.q_norm.weight, v12) : f32[1,8,4,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,4,8,16]
v15 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v16 = aten.reshape(v15, [1, 8, -1, 16]) : f32[1,8,2,16]
v17 = aten.pow.Tensor_Scalar(v16, 2) : f32[1,8,2,16]
v18 = aten.mean.dim(v17, [-1], True) : f32[1,8,2,1]
v19 = aten.add.Tensor(v18, 1e-06) : f32[1,8,2,1]
v20 = aten.rsqrt(v19) : f32[1,8,2,1]
v21 = aten.mul.Tensor(v16, v20) : f32[1,8,2,16]
v22 = aten.mul.Tensor($model.layers.0.self_attn.k_norm.weight, v21) : f32[1,8,2,16]
v23 = aten.transpose.int(v22, 1, 2) : f32[1,2,8,16]
v24 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v25 = aten.reshape(v24, [1, 8, -1, 16]) : f32[1,8,2,16]
v26 = aten.transpose.int(v25, 1, 2) : f32[1,2,8,16]
v27 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v28 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v29 = aten.mul.Tensor(v14, v27) : f32[1,4,8,16]
v30 = aten.slice.Tensor(v14, 3, 0, 8) : f32[1,4,8,8]
v31 = aten.slice.Tensor(v14, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v32 = aten.neg(v31) : f32[1,4,8,8]
v33 = aten.cat([v32, v30], -1) : f32[1,4,8,16]
v34 = aten.mul.Tensor(v33, v28) : f32[1,4,8,16]
v35 = aten.add.Tensor(v29, v34) : f32[1,4,8,16]
v36 = aten.mul.Tensor(v23, v27) : f32[1,2,8,16]
v37 = aten.slice.Tensor(v23, 3, 0, 8) : f32[1,2,8,8]
v38 = aten.slice.Tensor(v23, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v39 = aten.neg(v38) : f32[1,2,8,8]
v40 = aten.cat([v39, v37], -1) : f32[1,2,8,16]
v41 = aten.mul.Tensor(v40, v28) : f32[1,2,8,16]
v42 = aten.add.Tensor(v36, v41) : f32[1,2,8,16]
v43 = aten.unsqueeze(v42, 2) : f32[1,2,1,8,16]
v44 = aten.expand(v43, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v45 = aten.reshape(v44, [1, 4, 8, 16]) : f32[1,4,8,16]
v46 = aten.unsqueeze(v26, 2) : f32[1,2,1,8,16]
v47 = aten.expand(v46, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v48 = aten.reshape(v47, [1, 4, 8, 16]) : f32[1,4,8,16]
v49 = aten.scaled_dot_product_attention(v35, v45, v48, ext3, scale=0.25) : f32[1,4,8,16]
v50 = aten.transpose.int(v49, 1, 2) : f32[1,8,4,16]
v51 = aten.reshape(v50, [1, 8, -1]) : f32[1,8,64]
v52 = aten.linear(v51, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v53 = aten.add.Tensor(ext0, v52) : f32[1,8,64]
v54 = aten.pow.Tensor_Scalar(v53, 2) : f32[1,8,64]
v55 = aten.mean.dim(v54, [-1], True) : f32[1,8,1]
v56 = aten.add.Tensor(v55, 1e-06) : f32[1,8,1]
v57 = aten.rsqrt(v56) : f32[1,8,1]
v58 = aten.mul.Tensor(v53, v57) : f32[1,8,64]
v59 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v58) : f32[1,8,64]
v60 = aten.linear(v59, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v61 = aten.silu(v60) : f32[1,8,88]
v62 = aten.linear(v59, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v63 = aten.mul.Tensor(v61, v62) : f32[1,8,88]
v64 = aten.linear(v63, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v65 = aten.add.Tensor(v53, v64) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: qwen3

[find-structure] 0 edits
  counts: norm=9, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   9 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract qwen3 (L=2): satisfied
  ok norm               expected    9, found    9
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_granite(spinfx_golden):
    _, prog, rep = traced("granite")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.mul.Tensor($model.layers.0.input_layernorm.weight, v4) : f32[1,8,64]
v6 = aten.linear(v5, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v7 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v8 = aten.transpose.int(v7, 1, 2) : f32[1,4,8,16]
v9 = aten.linear(v5, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v10 = aten.reshape(v9, [1, 8, -1, 16]) : f32[1,8,2,16]
v11 = aten.transpose.int(v10, 1, 2) : f32[1,2,8,16]
v12 = aten.linear(v5, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v13 = aten.reshape(v12, [1, 8, -1, 16]) : f32[1,8,2,16]
v14 = aten.transpose.int(v13, 1, 2) : f32[1,2,8,16]
v15 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v16 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v17 = aten.mul.Tensor(v8, v15) : f32[1,4,8,16]
v18 = aten.slice.Tensor(v8, 3, 0, 8) : f32[1,4,8,8]
v19 = aten.slice.Tensor(v8, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v20 = aten.neg(v19) : f32[1,4,8,8]
v21 = aten.cat([v20, v18], -1) : f32[1,4,8,16]
v22 = aten.mul.Tensor(v21, v16) : f32[1,4,8,16]
v23 = aten.add.Tensor(v17, v22) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v11, v15) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v11, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v11, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v16) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = aten.unsqueeze(v30, 2) : f32[1,2,1,8,16]
v32 = aten.expand(v31, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v33 = aten.reshape(v32, [1, 4, 8, 16]) : f32[1,4,8,16]
v34 = aten.unsqueeze(v14, 2) : f32[1,2,1,8,16]
v35 = aten.expand(v34, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v36 = aten.reshape(v35, [1, 4, 8, 16]) : f32[1,4,8,16]
v37 = aten.scaled_dot_product_attention(v23, v33, v36, ext3, scale=0.2) : f32[1,4,8,16]
v38 = aten.transpose.int(v37, 1, 2) : f32[1,8,4,16]
v39 = aten.reshape(v38, [1, 8, -1]) : f32[1,8,64]
v40 = aten.linear(v39, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v41 = aten.mul.Tensor(v40, 0.5) : f32[1,8,64]
v42 = aten.add.Tensor(ext0, v41) : f32[1,8,64]
v43 = aten.pow.Tensor_Scalar(v42, 2) : f32[1,8,64]
v44 = aten.mean.dim(v43, [-1], True) : f32[1,8,1]
v45 = aten.add.Tensor(v44, 1e-06) : f32[1,8,1]
v46 = aten.rsqrt(v45) : f32[1,8,1]
v47 = aten.mul.Tensor(v42, v46) : f32[1,8,64]
v48 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v47) : f32[1,8,64]
v49 = aten.linear(v48, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v50 = aten.silu(v49) : f32[1,8,88]
v51 = aten.linear(v48, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v52 = aten.mul.Tensor(v50, v51) : f32[1,8,88]
v53 = aten.linear(v52, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v54 = aten.mul.Tensor(v53, 0.5) : f32[1,8,64]
v55 = aten.add.Tensor(v42, v54) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: granite

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract granite (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_mixtral(spinfx_golden):
    # the attention is Mistral's (pinned above): the mixture is pinned, in the dense form spinfx traces
    _, prog, rep = traced("mixtral")
    spinfx_golden(graph_text(prog, module="model.layers.0.mlp"), """
v0 = aten.reshape(ext0, [-1, 64]) : f32[8,64]
v1 = aten.linear(v0, $model.layers.0.mlp.gate.weight) : f32[8,4]
v2 = aten.softmax.int(v1, -1) : f32[8,4]
v3 = aten.topk(v2, 2) : (f32[8,2], i64[8,2])
v4 = getitem(v3, 0) : f32[8,2]
v5 = getitem(v3, 1) : i64[8,2]
v6 = aten.sum.dim_IntList(v4, [-1], True) : f32[8,1]
v7 = aten.div.Tensor(v4, v6) : f32[8,2]
v8 = aten.eq.Scalar(v5, 0) : b8[8,2]
v9 = aten.mul.Tensor(v7, v8) : f32[8,2]
v10 = aten.sum.dim_IntList(v9, [-1], True) : f32[8,1]
v11 = aten.linear(v0, $model.layers.0.mlp.experts.0.gate_up_proj.weight) : f32[8,80]
v12 = aten.split.Tensor(v11, 40, -1) : (f32[8,40], f32[8,40])
v13 = getitem(v12, 0) : f32[8,40]
v14 = getitem(v12, 1) : f32[8,40]
v15 = aten.silu(v13) : f32[8,40]
v16 = aten.mul.Tensor(v15, v14) : f32[8,40]
v17 = aten.linear(v16, $model.layers.0.mlp.experts.0.down_proj.weight) : f32[8,64]
v18 = aten.mul.Tensor(v17, v10) : f32[8,64]
v19 = aten.eq.Scalar(v5, 1) : b8[8,2]
v20 = aten.mul.Tensor(v7, v19) : f32[8,2]
v21 = aten.sum.dim_IntList(v20, [-1], True) : f32[8,1]
v22 = aten.linear(v0, $model.layers.0.mlp.experts.1.gate_up_proj.weight) : f32[8,80]
v23 = aten.split.Tensor(v22, 40, -1) : (f32[8,40], f32[8,40])
v24 = getitem(v23, 0) : f32[8,40]
v25 = getitem(v23, 1) : f32[8,40]
v26 = aten.silu(v24) : f32[8,40]
v27 = aten.mul.Tensor(v26, v25) : f32[8,40]
v28 = aten.linear(v27, $model.layers.0.mlp.experts.1.down_proj.weight) : f32[8,64]
v29 = aten.mul.Tensor(v28, v21) : f32[8,64]
v30 = aten.add.Tensor(v18, v29) : f32[8,64]
v31 = aten.eq.Scalar(v5, 2) : b8[8,2]
v32 = aten.mul.Tensor(v7, v31) : f32[8,2]
v33 = aten.sum.dim_IntList(v32, [-1], True) : f32[8,1]
v34 = aten.linear(v0, $model.layers.0.mlp.experts.2.gate_up_proj.weight) : f32[8,80]
v35 = aten.split.Tensor(v34, 40, -1) : (f32[8,40], f32[8,40])
v36 = getitem(v35, 0) : f32[8,40]
v37 = getitem(v35, 1) : f32[8,40]
v38 = aten.silu(v36) : f32[8,40]
v39 = aten.mul.Tensor(v38, v37) : f32[8,40]
v40 = aten.linear(v39, $model.layers.0.mlp.experts.2.down_proj.weight) : f32[8,64]
v41 = aten.mul.Tensor(v40, v33) : f32[8,64]
v42 = aten.add.Tensor(v30, v41) : f32[8,64]
v43 = aten.eq.Scalar(v5, 3) : b8[8,2]
v44 = aten.mul.Tensor(v7, v43) : f32[8,2]
v45 = aten.sum.dim_IntList(v44, [-1], True) : f32[8,1]
v46 = aten.linear(v0, $model.layers.0.mlp.experts.3.gate_up_proj.weight) : f32[8,80]
v47 = aten.split.Tensor(v46, 40, -1) : (f32[8,40], f32[8,40])
v48 = getitem(v47, 0) : f32[8,40]
v49 = getitem(v47, 1) : f32[8,40]
v50 = aten.silu(v48) : f32[8,40]
v51 = aten.mul.Tensor(v50, v49) : f32[8,40]
v52 = aten.linear(v51, $model.layers.0.mlp.experts.3.down_proj.weight) : f32[8,64]
v53 = aten.mul.Tensor(v52, v45) : f32[8,64]
v54 = aten.add.Tensor(v42, v53) : f32[8,64]
v55 = aten.reshape(v54, [1, 8, 64]) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: mixtral

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=8, rope=2, attention=2, residual-writers=10, residual-readers=5, router=2, experts=8
  residual: embedding=model.embed_tokens.weight, writers=10, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  experts: model.layers.0.mlp.gate=4 experts (top-2) read its input: model.layers.0.mlp.experts.{0..3}, model.layers.1.mlp.gate=4 experts (top-2) read its input: model.layers.1.mlp.experts.{0..3}
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                8 matches
  rope                   2 matches
  attention              2 matches

contract mixtral (L=2, E=4): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    8, found    8
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected   10, found   10
  ok router             expected    2, found    2
  ok experts            expected    8, found    8
""")


def test_golden_qwen3_moe(spinfx_golden):
    _, prog, rep = traced("qwen3_moe")
    spinfx_golden(graph_text(prog, module="model.layers.0.mlp"), """
v0 = aten.reshape(ext0, [-1, 64]) : f32[8,64]
v1 = aten.linear(v0, $model.layers.0.mlp.gate.weight) : f32[8,4]
v2 = aten.softmax.int(v1, -1, f32) : f32[8,4]
v3 = aten.topk(v2, 2) : (f32[8,2], i64[8,2])
v4 = getitem(v3, 0) : f32[8,2]
v5 = getitem(v3, 1) : i64[8,2]
v6 = aten.sum.dim_IntList(v4, [-1], True) : f32[8,1]
v7 = aten.div.Tensor(v4, v6) : f32[8,2]
v8 = aten.eq.Scalar(v5, 0) : b8[8,2]
v9 = aten.mul.Tensor(v7, v8) : f32[8,2]
v10 = aten.sum.dim_IntList(v9, [-1], True) : f32[8,1]
v11 = aten.linear(v0, $model.layers.0.mlp.experts.0.gate_up_proj.weight) : f32[8,80]
v12 = aten.split.Tensor(v11, 40, -1) : (f32[8,40], f32[8,40])
v13 = getitem(v12, 0) : f32[8,40]
v14 = getitem(v12, 1) : f32[8,40]
v15 = aten.silu(v13) : f32[8,40]
v16 = aten.mul.Tensor(v15, v14) : f32[8,40]
v17 = aten.linear(v16, $model.layers.0.mlp.experts.0.down_proj.weight) : f32[8,64]
v18 = aten.mul.Tensor(v17, v10) : f32[8,64]
v19 = aten.eq.Scalar(v5, 1) : b8[8,2]
v20 = aten.mul.Tensor(v7, v19) : f32[8,2]
v21 = aten.sum.dim_IntList(v20, [-1], True) : f32[8,1]
v22 = aten.linear(v0, $model.layers.0.mlp.experts.1.gate_up_proj.weight) : f32[8,80]
v23 = aten.split.Tensor(v22, 40, -1) : (f32[8,40], f32[8,40])
v24 = getitem(v23, 0) : f32[8,40]
v25 = getitem(v23, 1) : f32[8,40]
v26 = aten.silu(v24) : f32[8,40]
v27 = aten.mul.Tensor(v26, v25) : f32[8,40]
v28 = aten.linear(v27, $model.layers.0.mlp.experts.1.down_proj.weight) : f32[8,64]
v29 = aten.mul.Tensor(v28, v21) : f32[8,64]
v30 = aten.add.Tensor(v18, v29) : f32[8,64]
v31 = aten.eq.Scalar(v5, 2) : b8[8,2]
v32 = aten.mul.Tensor(v7, v31) : f32[8,2]
v33 = aten.sum.dim_IntList(v32, [-1], True) : f32[8,1]
v34 = aten.linear(v0, $model.layers.0.mlp.experts.2.gate_up_proj.weight) : f32[8,80]
v35 = aten.split.Tensor(v34, 40, -1) : (f32[8,40], f32[8,40])
v36 = getitem(v35, 0) : f32[8,40]
v37 = getitem(v35, 1) : f32[8,40]
v38 = aten.silu(v36) : f32[8,40]
v39 = aten.mul.Tensor(v38, v37) : f32[8,40]
v40 = aten.linear(v39, $model.layers.0.mlp.experts.2.down_proj.weight) : f32[8,64]
v41 = aten.mul.Tensor(v40, v33) : f32[8,64]
v42 = aten.add.Tensor(v30, v41) : f32[8,64]
v43 = aten.eq.Scalar(v5, 3) : b8[8,2]
v44 = aten.mul.Tensor(v7, v43) : f32[8,2]
v45 = aten.sum.dim_IntList(v44, [-1], True) : f32[8,1]
v46 = aten.linear(v0, $model.layers.0.mlp.experts.3.gate_up_proj.weight) : f32[8,80]
v47 = aten.split.Tensor(v46, 40, -1) : (f32[8,40], f32[8,40])
v48 = getitem(v47, 0) : f32[8,40]
v49 = getitem(v47, 1) : f32[8,40]
v50 = aten.silu(v48) : f32[8,40]
v51 = aten.mul.Tensor(v50, v49) : f32[8,40]
v52 = aten.linear(v51, $model.layers.0.mlp.experts.3.down_proj.weight) : f32[8,64]
v53 = aten.mul.Tensor(v52, v45) : f32[8,64]
v54 = aten.add.Tensor(v42, v53) : f32[8,64]
v55 = aten.reshape(v54, [1, 8, 64]) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: qwen3_moe

[find-structure] 0 edits
  counts: norm=9, norm-linears=5, qkv=2, gate-up=8, rope=2, attention=2, residual-writers=10, residual-readers=5, router=2, experts=8
  residual: embedding=model.embed_tokens.weight, writers=10, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  experts: model.layers.0.mlp.gate=4 experts (top-2) read its input: model.layers.0.mlp.experts.{0..3}, model.layers.1.mlp.gate=4 experts (top-2) read its input: model.layers.1.mlp.experts.{0..3}
  norm                   9 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                8 matches
  rope                   2 matches
  attention              2 matches

contract qwen3_moe (L=2, E=4): satisfied
  ok norm               expected    9, found    9
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    8, found    8
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected   10, found   10
  ok router             expected    2, found    2
  ok experts            expected    8, found    8
""")


def test_golden_olmo2(spinfx_golden):
    _, prog, rep = traced("olmo2")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.linear(ext0, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v1 = aten.pow.Tensor_Scalar(v0, 2) : f32[1,8,64]
v2 = aten.mean.dim(v1, [-1], True) : f32[1,8,1]
v3 = aten.add.Tensor(v2, 1e-05) : f32[1,8,1]
v4 = aten.rsqrt(v3) : f32[1,8,1]
v5 = aten.mul.Tensor(v0, v4) : f32[1,8,64]
v6 = aten.mul.Tensor($model.layers.0.self_attn.q_norm.weight, v5) : f32[1,8,64]
v7 = aten.linear(ext0, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v8 = aten.pow.Tensor_Scalar(v7, 2) : f32[1,8,32]
v9 = aten.mean.dim(v8, [-1], True) : f32[1,8,1]
v10 = aten.add.Tensor(v9, 1e-05) : f32[1,8,1]
v11 = aten.rsqrt(v10) : f32[1,8,1]
v12 = aten.mul.Tensor(v7, v11) : f32[1,8,32]
v13 = aten.mul.Tensor($model.layers.0.self_attn.k_norm.weight, v12) : f32[1,8,32]
v14 = aten.linear(ext0, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v15 = aten.reshape(v6, [1, 8, -1, 16]) : f32[1,8,4,16]
v16 = aten.transpose.int(v15, 1, 2) : f32[1,4,8,16]
v17 = aten.reshape(v13, [1, 8, -1, 16]) : f32[1,8,2,16]
v18 = aten.transpose.int(v17, 1, 2) : f32[1,2,8,16]
v19 = aten.reshape(v14, [1, 8, -1, 16]) : f32[1,8,2,16]
v20 = aten.transpose.int(v19, 1, 2) : f32[1,2,8,16]
v21 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v22 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v23 = aten.mul.Tensor(v16, v21) : f32[1,4,8,16]
v24 = aten.slice.Tensor(v16, 3, 0, 8) : f32[1,4,8,8]
v25 = aten.slice.Tensor(v16, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v26 = aten.neg(v25) : f32[1,4,8,8]
v27 = aten.cat([v26, v24], -1) : f32[1,4,8,16]
v28 = aten.mul.Tensor(v27, v22) : f32[1,4,8,16]
v29 = aten.add.Tensor(v23, v28) : f32[1,4,8,16]
v30 = aten.mul.Tensor(v18, v21) : f32[1,2,8,16]
v31 = aten.slice.Tensor(v18, 3, 0, 8) : f32[1,2,8,8]
v32 = aten.slice.Tensor(v18, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v33 = aten.neg(v32) : f32[1,2,8,8]
v34 = aten.cat([v33, v31], -1) : f32[1,2,8,16]
v35 = aten.mul.Tensor(v34, v22) : f32[1,2,8,16]
v36 = aten.add.Tensor(v30, v35) : f32[1,2,8,16]
v37 = aten.unsqueeze(v36, 2) : f32[1,2,1,8,16]
v38 = aten.expand(v37, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v39 = aten.reshape(v38, [1, 4, 8, 16]) : f32[1,4,8,16]
v40 = aten.unsqueeze(v20, 2) : f32[1,2,1,8,16]
v41 = aten.expand(v40, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v42 = aten.reshape(v41, [1, 4, 8, 16]) : f32[1,4,8,16]
v43 = aten.scaled_dot_product_attention(v29, v39, v42, ext3, scale=0.25) : f32[1,4,8,16]
v44 = aten.transpose.int(v43, 1, 2) : f32[1,8,4,16]
v45 = aten.reshape(v44, [1, 8, -1]) : f32[1,8,64]
v46 = aten.linear(v45, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v47 = aten.pow.Tensor_Scalar(v46, 2) : f32[1,8,64]
v48 = aten.mean.dim(v47, [-1], True) : f32[1,8,1]
v49 = aten.add.Tensor(v48, 1e-05) : f32[1,8,1]
v50 = aten.rsqrt(v49) : f32[1,8,1]
v51 = aten.mul.Tensor(v46, v50) : f32[1,8,64]
v52 = aten.mul.Tensor($model.layers.0.post_attention_layernorm.weight, v51) : f32[1,8,64]
v53 = aten.add.Tensor(ext0, v52) : f32[1,8,64]
v54 = aten.linear(v53, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v55 = aten.silu(v54) : f32[1,8,88]
v56 = aten.linear(v53, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v57 = aten.mul.Tensor(v55, v56) : f32[1,8,88]
v58 = aten.linear(v57, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v59 = aten.pow.Tensor_Scalar(v58, 2) : f32[1,8,64]
v60 = aten.mean.dim(v59, [-1], True) : f32[1,8,1]
v61 = aten.add.Tensor(v60, 1e-05) : f32[1,8,1]
v62 = aten.rsqrt(v61) : f32[1,8,1]
v63 = aten.mul.Tensor(v58, v62) : f32[1,8,64]
v64 = aten.mul.Tensor($model.layers.0.post_feedforward_layernorm.weight, v63) : f32[1,8,64]
v65 = aten.add.Tensor(v53, v64) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: olmo2

[find-structure] 0 edits
  counts: norm=9, norm-linears=1, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=0, residual-readers=0
  residual: embedding=model.embed_tokens.weight, writers=0, reader_norms=0, writer_kinds=, stop=add_tensor_8 [aten.add.Tensor in model.layers.0] adds mul_tensor_12 [aten.mul.Tensor in model.layers.0.post_attention_layernorm], which is a norm's output: a post-norm writes the stream (its nonlinearity sits between the writer and the stream)
  norm                   9 matches
  norm-linears           1 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract olmo2 (L=2): satisfied
  ok norm               expected    9, found    9
  ok norm-linears       expected    1, found    1
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    0, found    0
""")


def test_golden_gemma2(spinfx_golden):
    _, prog, rep = traced("gemma2")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.add.Tensor($model.layers.0.input_layernorm.weight, 1.0) : f32[64]
v6 = aten.mul.Tensor(v4, v5) : f32[1,8,64]
v7 = aten.linear(v6, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v8 = aten.reshape(v7, [1, 8, -1, 16]) : f32[1,8,4,16]
v9 = aten.transpose.int(v8, 1, 2) : f32[1,4,8,16]
v10 = aten.linear(v6, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v11 = aten.reshape(v10, [1, 8, -1, 16]) : f32[1,8,2,16]
v12 = aten.transpose.int(v11, 1, 2) : f32[1,2,8,16]
v13 = aten.linear(v6, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v14 = aten.reshape(v13, [1, 8, -1, 16]) : f32[1,8,2,16]
v15 = aten.transpose.int(v14, 1, 2) : f32[1,2,8,16]
v16 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v17 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v18 = aten.mul.Tensor(v9, v16) : f32[1,4,8,16]
v19 = aten.slice.Tensor(v9, 3, 0, 8) : f32[1,4,8,8]
v20 = aten.slice.Tensor(v9, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v21 = aten.neg(v20) : f32[1,4,8,8]
v22 = aten.cat([v21, v19], -1) : f32[1,4,8,16]
v23 = aten.mul.Tensor(v22, v17) : f32[1,4,8,16]
v24 = aten.add.Tensor(v18, v23) : f32[1,4,8,16]
v25 = aten.mul.Tensor(v12, v16) : f32[1,2,8,16]
v26 = aten.slice.Tensor(v12, 3, 0, 8) : f32[1,2,8,8]
v27 = aten.slice.Tensor(v12, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v28 = aten.neg(v27) : f32[1,2,8,8]
v29 = aten.cat([v28, v26], -1) : f32[1,2,8,16]
v30 = aten.mul.Tensor(v29, v17) : f32[1,2,8,16]
v31 = aten.add.Tensor(v25, v30) : f32[1,2,8,16]
v32 = aten.unsqueeze(v31, 2) : f32[1,2,1,8,16]
v33 = aten.expand(v32, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v34 = aten.reshape(v33, [1, 4, 8, 16]) : f32[1,4,8,16]
v35 = aten.unsqueeze(v15, 2) : f32[1,2,1,8,16]
v36 = aten.expand(v35, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v37 = aten.reshape(v36, [1, 4, 8, 16]) : f32[1,4,8,16]
v38 = aten.transpose.int(v34, 2, 3) : f32[1,4,16,8]
v39 = aten.matmul(v24, v38) : f32[1,4,8,8]
v40 = aten.mul.Tensor(v39, 0.1767766952966369) : f32[1,4,8,8]
v41 = aten.div.Tensor(v40, 2.0) : f32[1,4,8,8]
v42 = aten.tanh(v41) : f32[1,4,8,8]
v43 = aten.mul.Tensor(v42, 2.0) : f32[1,4,8,8]
v44 = aten.add.Tensor(v43, ext3) : f32[1,4,8,8]
v45 = aten.softmax.int(v44, -1, f32) : f32[1,4,8,8]
v46 = aten.matmul(v45, v37) : f32[1,4,8,16]
v47 = aten.transpose.int(v46, 1, 2) : f32[1,8,4,16]
v48 = aten.reshape(v47, [1, 8, -1]) : f32[1,8,64]
v49 = aten.linear(v48, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v50 = aten.pow.Tensor_Scalar(v49, 2) : f32[1,8,64]
v51 = aten.mean.dim(v50, [-1], True) : f32[1,8,1]
v52 = aten.add.Tensor(v51, 1e-06) : f32[1,8,1]
v53 = aten.rsqrt(v52) : f32[1,8,1]
v54 = aten.mul.Tensor(v49, v53) : f32[1,8,64]
v55 = aten.add.Tensor($model.layers.0.post_attention_layernorm.weight, 1.0) : f32[64]
v56 = aten.mul.Tensor(v54, v55) : f32[1,8,64]
v57 = aten.add.Tensor(ext0, v56) : f32[1,8,64]
v58 = aten.pow.Tensor_Scalar(v57, 2) : f32[1,8,64]
v59 = aten.mean.dim(v58, [-1], True) : f32[1,8,1]
v60 = aten.add.Tensor(v59, 1e-06) : f32[1,8,1]
v61 = aten.rsqrt(v60) : f32[1,8,1]
v62 = aten.mul.Tensor(v57, v61) : f32[1,8,64]
v63 = aten.add.Tensor($model.layers.0.pre_feedforward_layernorm.weight, 1.0) : f32[64]
v64 = aten.mul.Tensor(v62, v63) : f32[1,8,64]
v65 = aten.linear(v64, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v66 = aten.gelu(v65, approximate='tanh') : f32[1,8,88]
v67 = aten.linear(v64, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v68 = aten.mul.Tensor(v66, v67) : f32[1,8,88]
v69 = aten.linear(v68, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v70 = aten.pow.Tensor_Scalar(v69, 2) : f32[1,8,64]
v71 = aten.mean.dim(v70, [-1], True) : f32[1,8,1]
v72 = aten.add.Tensor(v71, 1e-06) : f32[1,8,1]
v73 = aten.rsqrt(v72) : f32[1,8,1]
v74 = aten.mul.Tensor(v69, v73) : f32[1,8,64]
v75 = aten.add.Tensor($model.layers.0.post_feedforward_layernorm.weight, 1.0) : f32[64]
v76 = aten.mul.Tensor(v74, v75) : f32[1,8,64]
v77 = aten.add.Tensor(v57, v76) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: gemma2

[find-structure] 0 edits
  counts: norm=9, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=0, residual-readers=1
  residual: embedding=model.embed_tokens.weight, writers=0, reader_norms=1, writer_kinds=, stop=add_tensor_12 [aten.add.Tensor in model.layers.0] adds mul_tensor_13 [aten.mul.Tensor in model.layers.0.post_attention_layernorm], which is a norm's output: a post-norm writes the stream (its nonlinearity sits between the writer and the stream)
  norm                   9 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract gemma2 (L=2): satisfied
  ok norm               expected    9, found    9
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    0, found    0
""")


def test_golden_stablelm(spinfx_golden):
    _, prog, rep = traced("stablelm")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.layer_norm(ext0, [64], $model.layers.0.input_layernorm.weight, $model.layers.0.input_layernorm.bias, 1e-05, False) : f32[1,8,64]
v1 = aten.linear(v0, $model.layers.0.self_attn.q_proj.weight, $model.layers.0.self_attn.q_proj.bias) : f32[1,8,64]
v2 = aten.linear(v0, $model.layers.0.self_attn.k_proj.weight, $model.layers.0.self_attn.k_proj.bias) : f32[1,8,32]
v3 = aten.linear(v0, $model.layers.0.self_attn.v_proj.weight, $model.layers.0.self_attn.v_proj.bias) : f32[1,8,32]
v4 = aten.reshape(v1, [1, 8, 4, 16]) : f32[1,8,4,16]
v5 = aten.transpose.int(v4, 1, 2) : f32[1,4,8,16]
v6 = aten.reshape(v2, [1, 8, 2, 16]) : f32[1,8,2,16]
v7 = aten.transpose.int(v6, 1, 2) : f32[1,2,8,16]
v8 = aten.reshape(v3, [1, 8, 2, 16]) : f32[1,8,2,16]
v9 = aten.transpose.int(v8, 1, 2) : f32[1,2,8,16]
v10 = aten.slice.Tensor(v5, 3, 0, 4) : f32[1,4,8,4]
v11 = aten.slice.Tensor(v5, 3, 4, 9223372036854775807) : f32[1,4,8,12]
v12 = aten.slice.Tensor(v7, 3, 0, 4) : f32[1,2,8,4]
v13 = aten.slice.Tensor(v7, 3, 4, 9223372036854775807) : f32[1,2,8,12]
v14 = aten.unsqueeze(ext1, 1) : f32[1,1,8,4]
v15 = aten.unsqueeze(ext2, 1) : f32[1,1,8,4]
v16 = aten.mul.Tensor(v10, v14) : f32[1,4,8,4]
v17 = aten.slice.Tensor(v10, 3, 0, 2) : f32[1,4,8,2]
v18 = aten.slice.Tensor(v10, 3, 2, 9223372036854775807) : f32[1,4,8,2]
v19 = aten.neg(v18) : f32[1,4,8,2]
v20 = aten.cat([v19, v17], -1) : f32[1,4,8,4]
v21 = aten.mul.Tensor(v20, v15) : f32[1,4,8,4]
v22 = aten.add.Tensor(v16, v21) : f32[1,4,8,4]
v23 = aten.mul.Tensor(v12, v14) : f32[1,2,8,4]
v24 = aten.slice.Tensor(v12, 3, 0, 2) : f32[1,2,8,2]
v25 = aten.slice.Tensor(v12, 3, 2, 9223372036854775807) : f32[1,2,8,2]
v26 = aten.neg(v25) : f32[1,2,8,2]
v27 = aten.cat([v26, v24], -1) : f32[1,2,8,4]
v28 = aten.mul.Tensor(v27, v15) : f32[1,2,8,4]
v29 = aten.add.Tensor(v23, v28) : f32[1,2,8,4]
v30 = aten.cat([v22, v11], -1) : f32[1,4,8,16]
v31 = aten.cat([v29, v13], -1) : f32[1,2,8,16]
v32 = aten.unsqueeze(v31, 2) : f32[1,2,1,8,16]
v33 = aten.expand(v32, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v34 = aten.reshape(v33, [1, 4, 8, 16]) : f32[1,4,8,16]
v35 = aten.unsqueeze(v9, 2) : f32[1,2,1,8,16]
v36 = aten.expand(v35, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v37 = aten.reshape(v36, [1, 4, 8, 16]) : f32[1,4,8,16]
v38 = aten.scaled_dot_product_attention(v30, v34, v37, ext3, scale=0.25) : f32[1,4,8,16]
v39 = aten.transpose.int(v38, 1, 2) : f32[1,8,4,16]
v40 = aten.reshape(v39, [1, 8, -1]) : f32[1,8,64]
v41 = aten.linear(v40, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v42 = aten.add.Tensor(ext0, v41) : f32[1,8,64]
v43 = aten.layer_norm(v42, [64], $model.layers.0.post_attention_layernorm.weight, $model.layers.0.post_attention_layernorm.bias, 1e-05, False) : f32[1,8,64]
v44 = aten.linear(v43, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v45 = aten.silu(v44) : f32[1,8,88]
v46 = aten.linear(v43, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v47 = aten.mul.Tensor(v45, v46) : f32[1,8,88]
v48 = aten.linear(v47, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v49 = aten.add.Tensor(v42, v48) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: stablelm

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=2, gate-up=2, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    2 matches
  gate-up                2 matches
  rope                   2 matches
  attention              2 matches

contract stablelm (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    2, found    2
  ok gate-up            expected    2, found    2
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_phi(spinfx_golden):
    _, prog, rep = traced("phi")
    spinfx_golden(graph_text(prog, module="model.layers.0"), """
v0 = aten.layer_norm(ext0, [64], $model.layers.0.input_layernorm.weight, $model.layers.0.input_layernorm.bias, 1e-05, False) : f32[1,8,64]
v1 = aten.linear(v0, $model.layers.0.self_attn.q_proj.weight, $model.layers.0.self_attn.q_proj.bias) : f32[1,8,64]
v2 = aten.reshape(v1, [1, 8, -1, 16]) : f32[1,8,4,16]
v3 = aten.transpose.int(v2, 1, 2) : f32[1,4,8,16]
v4 = aten.linear(v0, $model.layers.0.self_attn.k_proj.weight, $model.layers.0.self_attn.k_proj.bias) : f32[1,8,32]
v5 = aten.reshape(v4, [1, 8, -1, 16]) : f32[1,8,2,16]
v6 = aten.transpose.int(v5, 1, 2) : f32[1,2,8,16]
v7 = aten.linear(v0, $model.layers.0.self_attn.v_proj.weight, $model.layers.0.self_attn.v_proj.bias) : f32[1,8,32]
v8 = aten.reshape(v7, [1, 8, -1, 16]) : f32[1,8,2,16]
v9 = aten.transpose.int(v8, 1, 2) : f32[1,2,8,16]
v10 = aten.slice.Tensor(v3, 3, 0, 8) : f32[1,4,8,8]
v11 = aten.slice.Tensor(v3, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v12 = aten.slice.Tensor(v6, 3, 0, 8) : f32[1,2,8,8]
v13 = aten.slice.Tensor(v6, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v14 = aten.unsqueeze(ext1, 1) : f32[1,1,8,8]
v15 = aten.unsqueeze(ext2, 1) : f32[1,1,8,8]
v16 = aten.mul.Tensor(v10, v14) : f32[1,4,8,8]
v17 = aten.slice.Tensor(v10, 3, 0, 4) : f32[1,4,8,4]
v18 = aten.slice.Tensor(v10, 3, 4, 9223372036854775807) : f32[1,4,8,4]
v19 = aten.neg(v18) : f32[1,4,8,4]
v20 = aten.cat([v19, v17], -1) : f32[1,4,8,8]
v21 = aten.mul.Tensor(v20, v15) : f32[1,4,8,8]
v22 = aten.add.Tensor(v16, v21) : f32[1,4,8,8]
v23 = aten.mul.Tensor(v12, v14) : f32[1,2,8,8]
v24 = aten.slice.Tensor(v12, 3, 0, 4) : f32[1,2,8,4]
v25 = aten.slice.Tensor(v12, 3, 4, 9223372036854775807) : f32[1,2,8,4]
v26 = aten.neg(v25) : f32[1,2,8,4]
v27 = aten.cat([v26, v24], -1) : f32[1,2,8,8]
v28 = aten.mul.Tensor(v27, v15) : f32[1,2,8,8]
v29 = aten.add.Tensor(v23, v28) : f32[1,2,8,8]
v30 = aten.cat([v22, v11], -1) : f32[1,4,8,16]
v31 = aten.cat([v29, v13], -1) : f32[1,2,8,16]
v32 = aten.unsqueeze(v31, 2) : f32[1,2,1,8,16]
v33 = aten.expand(v32, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v34 = aten.reshape(v33, [1, 4, 8, 16]) : f32[1,4,8,16]
v35 = aten.unsqueeze(v9, 2) : f32[1,2,1,8,16]
v36 = aten.expand(v35, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v37 = aten.reshape(v36, [1, 4, 8, 16]) : f32[1,4,8,16]
v38 = aten.scaled_dot_product_attention(v30, v34, v37, ext3, scale=0.25) : f32[1,4,8,16]
v39 = aten.transpose.int(v38, 1, 2) : f32[1,8,4,16]
v40 = aten.reshape(v39, [1, 8, -1]) : f32[1,8,64]
v41 = aten.linear(v40, $model.layers.0.self_attn.dense.weight, $model.layers.0.self_attn.dense.bias) : f32[1,8,64]
v42 = aten.linear(v0, $model.layers.0.mlp.fc1.weight, $model.layers.0.mlp.fc1.bias) : f32[1,8,88]
v43 = aten.mul.Tensor(v42, 0.5) : f32[1,8,88]
v44 = aten.pow.Tensor_Scalar(v42, 3.0) : f32[1,8,88]
v45 = aten.mul.Tensor(v44, 0.044715) : f32[1,8,88]
v46 = aten.add.Tensor(v42, v45) : f32[1,8,88]
v47 = aten.mul.Tensor(v46, 0.7978845608028654) : f32[1,8,88]
v48 = aten.tanh(v47) : f32[1,8,88]
v49 = aten.add.Tensor(v48, 1.0) : f32[1,8,88]
v50 = aten.mul.Tensor(v43, v49) : f32[1,8,88]
v51 = aten.linear(v50, $model.layers.0.mlp.fc2.weight, $model.layers.0.mlp.fc2.bias) : f32[1,8,64]
v52 = aten.add.Tensor(v41, v51) : f32[1,8,64]
v53 = aten.add.Tensor(v52, ext0) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: phi

[find-structure] 0 edits
  counts: norm=3, norm-linears=3, qkv=2, gate-up=0, rope=2, attention=2, residual-writers=4, residual-readers=3
  residual: embedding=model.embed_tokens.weight, writers=4, reader_norms=3, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   3 matches
  norm-linears           3 matches
  qkv                    2 matches
  gate-up                0 matches  nearest miss: 0.5: expected aten.silu|aten.gelu|aten.relu|aten.tanh|aten.sigmoid (trying at mul_tensor_7 [aten.mul.Tensor in model.layers.0.mlp.activation_fn])
  rope                   2 matches
  attention              2 matches

contract phi (L=2): satisfied
  ok norm               expected    3, found    3
  ok norm-linears       expected    3, found    3
  ok qkv                expected    2, found    2
  ok gate-up            expected    0, found    0
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


def test_golden_gpt_neox(spinfx_golden):
    _, prog, rep = traced("gpt_neox")
    spinfx_golden(graph_text(prog, module="gpt_neox.layers.0"), """
v0 = aten.layer_norm(ext0, [64], $gpt_neox.layers.0.input_layernorm.weight, $gpt_neox.layers.0.input_layernorm.bias, 1e-05, False) : f32[1,8,64]
v1 = aten.linear(v0, $gpt_neox.layers.0.attention.query_key_value.weight, $gpt_neox.layers.0.attention.query_key_value.bias) : f32[1,8,192]
v2 = aten.reshape(v1, [1, 8, -1, 48]) : f32[1,8,4,48]
v3 = aten.transpose.int(v2, 1, 2) : f32[1,4,8,48]
v4 = aten.split.Tensor(v3, 16, -1) : (f32[1,4,8,16], f32[1,4,8,16], f32[1,4,8,16])
v5 = getitem(v4, 0) : f32[1,4,8,16]
v6 = getitem(v4, 1) : f32[1,4,8,16]
v7 = getitem(v4, 2) : f32[1,4,8,16]
v8 = aten.unsqueeze(ext1, 1) : f32[1,1,8,4]
v9 = aten.unsqueeze(ext2, 1) : f32[1,1,8,4]
v10 = aten.slice.Tensor(v5, 3, 0, 4) : f32[1,4,8,4]
v11 = aten.slice.Tensor(v5, 3, 4, 9223372036854775807) : f32[1,4,8,12]
v12 = aten.slice.Tensor(v6, 3, 0, 4) : f32[1,4,8,4]
v13 = aten.slice.Tensor(v6, 3, 4, 9223372036854775807) : f32[1,4,8,12]
v14 = aten.mul.Tensor(v10, v8) : f32[1,4,8,4]
v15 = aten.slice.Tensor(v10, 3, 0, 2) : f32[1,4,8,2]
v16 = aten.slice.Tensor(v10, 3, 2, 9223372036854775807) : f32[1,4,8,2]
v17 = aten.neg(v16) : f32[1,4,8,2]
v18 = aten.cat([v17, v15], -1) : f32[1,4,8,4]
v19 = aten.mul.Tensor(v18, v9) : f32[1,4,8,4]
v20 = aten.add.Tensor(v14, v19) : f32[1,4,8,4]
v21 = aten.mul.Tensor(v12, v8) : f32[1,4,8,4]
v22 = aten.slice.Tensor(v12, 3, 0, 2) : f32[1,4,8,2]
v23 = aten.slice.Tensor(v12, 3, 2, 9223372036854775807) : f32[1,4,8,2]
v24 = aten.neg(v23) : f32[1,4,8,2]
v25 = aten.cat([v24, v22], -1) : f32[1,4,8,4]
v26 = aten.mul.Tensor(v25, v9) : f32[1,4,8,4]
v27 = aten.add.Tensor(v21, v26) : f32[1,4,8,4]
v28 = aten.cat([v20, v11], -1) : f32[1,4,8,16]
v29 = aten.cat([v27, v13], -1) : f32[1,4,8,16]
v30 = aten.scaled_dot_product_attention(v28, v29, v7, ext3, scale=0.25) : f32[1,4,8,16]
v31 = aten.transpose.int(v30, 1, 2) : f32[1,8,4,16]
v32 = aten.reshape(v31, [1, 8, -1]) : f32[1,8,64]
v33 = aten.linear(v32, $gpt_neox.layers.0.attention.dense.weight, $gpt_neox.layers.0.attention.dense.bias) : f32[1,8,64]
v34 = aten.layer_norm(ext0, [64], $gpt_neox.layers.0.post_attention_layernorm.weight, $gpt_neox.layers.0.post_attention_layernorm.bias, 1e-05, False) : f32[1,8,64]
v35 = aten.linear(v34, $gpt_neox.layers.0.mlp.dense_h_to_4h.weight, $gpt_neox.layers.0.mlp.dense_h_to_4h.bias) : f32[1,8,88]
v36 = aten.gelu(v35) : f32[1,8,88]
v37 = aten.linear(v36, $gpt_neox.layers.0.mlp.dense_4h_to_h.weight, $gpt_neox.layers.0.mlp.dense_4h_to_h.bias) : f32[1,8,64]
v38 = aten.add.Tensor(v37, v33) : f32[1,8,64]
v39 = aten.add.Tensor(v38, ext0) : f32[1,8,64]
""")
    spinfx_golden(rep.to_text(stable=True), """
spinfx report: gpt_neox

[find-structure] 0 edits
  counts: norm=5, norm-linears=5, qkv=0, gate-up=0, rope=2, attention=2, residual-writers=4, residual-readers=5
  residual: embedding=gpt_neox.embed_in.weight, writers=4, reader_norms=5, writer_kinds=linear, stop=end (no add extends the stream)
  norm                   5 matches
  norm-linears           5 matches
  qkv                    0 matches  nearest miss: getitem [getitem in gpt_neox.layers.0.attention]: expected aten.view|aten.reshape|aten.transpose.int|aten.permute|aten.contiguous (trying at scaled_dot_product_attention_default [aten.scaled_dot_product_attention in gpt_neox.layers.0.attention])
  gate-up                0 matches  nearest miss: _to_copy_default [aten._to_copy in gpt_neox.rotary_emb]: expected aten.silu|aten.gelu|aten.relu|aten.tanh|aten.sigmoid (trying at mul_tensor [aten.mul.Tensor in gpt_neox.rotary_emb])
  rope                   2 matches
  attention              2 matches

contract gpt_neox (L=2): satisfied
  ok norm               expected    5, found    5
  ok norm-linears       expected    5, found    5
  ok qkv                expected    0, found    0
  ok gate-up            expected    0, found    0
  ok rope               expected    2, found    2
  ok attention          expected    2, found    2
  ok residual-writers   expected    4, found    4
""")


GOLDEN_TESTS = ['llama', 'llama_untied', 'mistral', 'qwen2', 'qwen3', 'granite', 'gemma', 'phi3', 'opt', 'gpt2',
                'mixtral', 'qwen3_moe', 'olmo2', 'gemma2', 'stablelm', 'phi', 'gpt_neox']


@functools.lru_cache(maxsize=None)
def rewritten(recipe):
    zm = zoo.build("llama")
    return spinfx.rewrite(zm.model, recipe, zm.example_inputs)


def test_golden_llama_layer_after_fold(spinfx_golden):
    spinfx_golden(graph_text(rewritten("fold").program, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.linear(v4, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v6 = aten.reshape(v5, [1, 8, -1, 16]) : f32[1,8,4,16]
v7 = aten.transpose.int(v6, 1, 2) : f32[1,4,8,16]
v8 = aten.linear(v4, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v9 = aten.reshape(v8, [1, 8, -1, 16]) : f32[1,8,2,16]
v10 = aten.transpose.int(v9, 1, 2) : f32[1,2,8,16]
v11 = aten.linear(v4, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v12 = aten.reshape(v11, [1, 8, -1, 16]) : f32[1,8,2,16]
v13 = aten.transpose.int(v12, 1, 2) : f32[1,2,8,16]
v14 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v15 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v16 = aten.mul.Tensor(v7, v14) : f32[1,4,8,16]
v17 = aten.slice.Tensor(v7, 3, 0, 8) : f32[1,4,8,8]
v18 = aten.slice.Tensor(v7, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v19 = aten.neg(v18) : f32[1,4,8,8]
v20 = aten.cat([v19, v17], -1) : f32[1,4,8,16]
v21 = aten.mul.Tensor(v20, v15) : f32[1,4,8,16]
v22 = aten.add.Tensor(v16, v21) : f32[1,4,8,16]
v23 = aten.mul.Tensor(v10, v14) : f32[1,2,8,16]
v24 = aten.slice.Tensor(v10, 3, 0, 8) : f32[1,2,8,8]
v25 = aten.slice.Tensor(v10, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v26 = aten.neg(v25) : f32[1,2,8,8]
v27 = aten.cat([v26, v24], -1) : f32[1,2,8,16]
v28 = aten.mul.Tensor(v27, v15) : f32[1,2,8,16]
v29 = aten.add.Tensor(v23, v28) : f32[1,2,8,16]
v30 = aten.unsqueeze(v29, 2) : f32[1,2,1,8,16]
v31 = aten.expand(v30, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v32 = aten.reshape(v31, [1, 4, 8, 16]) : f32[1,4,8,16]
v33 = aten.unsqueeze(v13, 2) : f32[1,2,1,8,16]
v34 = aten.expand(v33, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v35 = aten.reshape(v34, [1, 4, 8, 16]) : f32[1,4,8,16]
v36 = aten.scaled_dot_product_attention(v22, v32, v35, ext3, scale=0.25) : f32[1,4,8,16]
v37 = aten.transpose.int(v36, 1, 2) : f32[1,8,4,16]
v38 = aten.reshape(v37, [1, 8, -1]) : f32[1,8,64]
v39 = aten.linear(v38, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v40 = aten.add.Tensor(ext0, v39) : f32[1,8,64]
v41 = aten.pow.Tensor_Scalar(v40, 2) : f32[1,8,64]
v42 = aten.mean.dim(v41, [-1], True) : f32[1,8,1]
v43 = aten.add.Tensor(v42, 1e-06) : f32[1,8,1]
v44 = aten.rsqrt(v43) : f32[1,8,1]
v45 = aten.mul.Tensor(v40, v44) : f32[1,8,64]
v46 = aten.linear(v45, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v47 = aten.silu(v46) : f32[1,8,88]
v48 = aten.linear(v45, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v49 = aten.mul.Tensor(v47, v48) : f32[1,8,88]
v50 = aten.linear(v49, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v51 = aten.add.Tensor(v40, v50) : f32[1,8,64]
""")


def test_golden_llama_layer_after_rotate(spinfx_golden):
    spinfx_golden(graph_text(rewritten("rotate").program, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.linear(v4, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v6 = aten.reshape(v5, [1, 8, -1, 16]) : f32[1,8,4,16]
v7 = aten.transpose.int(v6, 1, 2) : f32[1,4,8,16]
v8 = aten.linear(v4, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v9 = aten.reshape(v8, [1, 8, -1, 16]) : f32[1,8,2,16]
v10 = aten.transpose.int(v9, 1, 2) : f32[1,2,8,16]
v11 = aten.linear(v4, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v12 = aten.reshape(v11, [1, 8, -1, 16]) : f32[1,8,2,16]
v13 = aten.transpose.int(v12, 1, 2) : f32[1,2,8,16]
v14 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v15 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v16 = aten.mul.Tensor(v7, v14) : f32[1,4,8,16]
v17 = aten.slice.Tensor(v7, 3, 0, 8) : f32[1,4,8,8]
v18 = aten.slice.Tensor(v7, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v19 = aten.neg(v18) : f32[1,4,8,8]
v20 = aten.cat([v19, v17], -1) : f32[1,4,8,16]
v21 = aten.mul.Tensor(v20, v15) : f32[1,4,8,16]
v22 = aten.add.Tensor(v16, v21) : f32[1,4,8,16]
v23 = aten.mul.Tensor(v10, v14) : f32[1,2,8,16]
v24 = aten.slice.Tensor(v10, 3, 0, 8) : f32[1,2,8,8]
v25 = aten.slice.Tensor(v10, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v26 = aten.neg(v25) : f32[1,2,8,8]
v27 = aten.cat([v26, v24], -1) : f32[1,2,8,16]
v28 = aten.mul.Tensor(v27, v15) : f32[1,2,8,16]
v29 = aten.add.Tensor(v23, v28) : f32[1,2,8,16]
v30 = aten.unsqueeze(v29, 2) : f32[1,2,1,8,16]
v31 = aten.expand(v30, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v32 = aten.reshape(v31, [1, 4, 8, 16]) : f32[1,4,8,16]
v33 = aten.unsqueeze(v13, 2) : f32[1,2,1,8,16]
v34 = aten.expand(v33, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v35 = aten.reshape(v34, [1, 4, 8, 16]) : f32[1,4,8,16]
v36 = aten.scaled_dot_product_attention(v22, v32, v35, ext3, scale=0.25) : f32[1,4,8,16]
v37 = aten.transpose.int(v36, 1, 2) : f32[1,8,4,16]
v38 = aten.reshape(v37, [1, 8, -1]) : f32[1,8,64]
v39 = aten.linear(v38, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v40 = aten.add.Tensor(ext0, v39) : f32[1,8,64]
v41 = aten.pow.Tensor_Scalar(v40, 2) : f32[1,8,64]
v42 = aten.mean.dim(v41, [-1], True) : f32[1,8,1]
v43 = aten.add.Tensor(v42, 1e-06) : f32[1,8,1]
v44 = aten.rsqrt(v43) : f32[1,8,1]
v45 = aten.mul.Tensor(v40, v44) : f32[1,8,64]
v46 = aten.linear(v45, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v47 = aten.silu(v46) : f32[1,8,88]
v48 = aten.linear(v45, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v49 = aten.mul.Tensor(v47, v48) : f32[1,8,88]
v50 = aten.linear(v49, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v51 = aten.add.Tensor(v40, v50) : f32[1,8,64]
""")


def test_golden_llama_layer_after_spinquant(spinfx_golden):
    spinfx_golden(graph_text(rewritten("spinquant").program, module="model.layers.0"), """
v0 = aten.pow.Tensor_Scalar(ext0, 2) : f32[1,8,64]
v1 = aten.mean.dim(v0, [-1], True) : f32[1,8,1]
v2 = aten.add.Tensor(v1, 1e-06) : f32[1,8,1]
v3 = aten.rsqrt(v2) : f32[1,8,1]
v4 = aten.mul.Tensor(ext0, v3) : f32[1,8,64]
v5 = aten.linear(v4, $model.layers.0.self_attn.q_proj.weight) : f32[1,8,64]
v6 = aten.reshape(v5, [1, 8, -1, 16]) : f32[1,8,4,16]
v7 = aten.transpose.int(v6, 1, 2) : f32[1,4,8,16]
v8 = aten.linear(v4, $model.layers.0.self_attn.k_proj.weight) : f32[1,8,32]
v9 = aten.reshape(v8, [1, 8, -1, 16]) : f32[1,8,2,16]
v10 = aten.transpose.int(v9, 1, 2) : f32[1,2,8,16]
v11 = aten.linear(v4, $model.layers.0.self_attn.v_proj.weight) : f32[1,8,32]
v12 = aten.reshape(v11, [1, 8, -1, 16]) : f32[1,8,2,16]
v13 = aten.transpose.int(v12, 1, 2) : f32[1,2,8,16]
v14 = aten.unsqueeze(ext1, 1) : f32[1,1,8,16]
v15 = aten.unsqueeze(ext2, 1) : f32[1,1,8,16]
v16 = aten.mul.Tensor(v7, v14) : f32[1,4,8,16]
v17 = aten.slice.Tensor(v7, 3, 0, 8) : f32[1,4,8,8]
v18 = aten.slice.Tensor(v7, 3, 8, 9223372036854775807) : f32[1,4,8,8]
v19 = aten.neg(v18) : f32[1,4,8,8]
v20 = aten.cat([v19, v17], -1) : f32[1,4,8,16]
v21 = aten.mul.Tensor(v20, v15) : f32[1,4,8,16]
v22 = aten.add.Tensor(v16, v21) : f32[1,4,8,16]
v23 = spinfx.hadamard(v22, [], 16, False) : f32[1,4,8,16]
v24 = aten.mul.Tensor(v10, v14) : f32[1,2,8,16]
v25 = aten.slice.Tensor(v10, 3, 0, 8) : f32[1,2,8,8]
v26 = aten.slice.Tensor(v10, 3, 8, 9223372036854775807) : f32[1,2,8,8]
v27 = aten.neg(v26) : f32[1,2,8,8]
v28 = aten.cat([v27, v25], -1) : f32[1,2,8,16]
v29 = aten.mul.Tensor(v28, v15) : f32[1,2,8,16]
v30 = aten.add.Tensor(v24, v29) : f32[1,2,8,16]
v31 = spinfx.hadamard(v30, [], 16, False) : f32[1,2,8,16]
v32 = aten.unsqueeze(v31, 2) : f32[1,2,1,8,16]
v33 = aten.expand(v32, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v34 = aten.reshape(v33, [1, 4, 8, 16]) : f32[1,4,8,16]
v35 = aten.unsqueeze(v13, 2) : f32[1,2,1,8,16]
v36 = aten.expand(v35, [1, 2, 2, 8, 16]) : f32[1,2,2,8,16]
v37 = aten.reshape(v36, [1, 4, 8, 16]) : f32[1,4,8,16]
v38 = aten.scaled_dot_product_attention(v23, v34, v37, ext3, scale=0.25) : f32[1,4,8,16]
v39 = aten.transpose.int(v38, 1, 2) : f32[1,8,4,16]
v40 = aten.reshape(v39, [1, 8, -1]) : f32[1,8,64]
v41 = aten.linear(v40, $model.layers.0.self_attn.o_proj.weight) : f32[1,8,64]
v42 = aten.add.Tensor(ext0, v41) : f32[1,8,64]
v43 = aten.pow.Tensor_Scalar(v42, 2) : f32[1,8,64]
v44 = aten.mean.dim(v43, [-1], True) : f32[1,8,1]
v45 = aten.add.Tensor(v44, 1e-06) : f32[1,8,1]
v46 = aten.rsqrt(v45) : f32[1,8,1]
v47 = aten.mul.Tensor(v42, v46) : f32[1,8,64]
v48 = aten.linear(v47, $model.layers.0.mlp.gate_proj.weight) : f32[1,8,88]
v49 = aten.silu(v48) : f32[1,8,88]
v50 = aten.linear(v47, $model.layers.0.mlp.up_proj.weight) : f32[1,8,88]
v51 = aten.mul.Tensor(v49, v50) : f32[1,8,88]
v52 = spinfx.hadamard(v51, [44], 88, False) : f32[1,8,88]
v53 = aten.linear(v52, $model.layers.0.mlp.down_proj.weight) : f32[1,8,64]
v54 = aten.add.Tensor(v42, v53) : f32[1,8,64]
""")


def test_golden_mixtral_experts_after_spinquant(spinfx_golden):
    # R4 per expert: each down_proj reads its input through an online Hadamard; the router keeps its place
    zm = zoo.build("mixtral")
    r = spinfx.rewrite(zm.model, "spinquant", zm.example_inputs)
    spinfx_golden(graph_text(r.program, module="model.layers.0.mlp"), """
v0 = aten.reshape(ext0, [-1, 64]) : f32[8,64]
v1 = aten.linear(v0, $model.layers.0.mlp.gate.weight) : f32[8,4]
v2 = aten.softmax.int(v1, -1) : f32[8,4]
v3 = aten.topk(v2, 2) : (f32[8,2], i64[8,2])
v4 = getitem(v3, 0) : f32[8,2]
v5 = getitem(v3, 1) : i64[8,2]
v6 = aten.sum.dim_IntList(v4, [-1], True) : f32[8,1]
v7 = aten.div.Tensor(v4, v6) : f32[8,2]
v8 = aten.eq.Scalar(v5, 0) : b8[8,2]
v9 = aten.mul.Tensor(v7, v8) : f32[8,2]
v10 = aten.sum.dim_IntList(v9, [-1], True) : f32[8,1]
v11 = aten.linear(v0, $model.layers.0.mlp.experts.0.gate_up_proj.weight) : f32[8,80]
v12 = aten.split.Tensor(v11, 40, -1) : (f32[8,40], f32[8,40])
v13 = getitem(v12, 0) : f32[8,40]
v14 = getitem(v12, 1) : f32[8,40]
v15 = aten.silu(v13) : f32[8,40]
v16 = aten.mul.Tensor(v15, v14) : f32[8,40]
v17 = spinfx.hadamard(v16, [20], 40, False) : f32[8,40]
v18 = aten.linear(v17, $model.layers.0.mlp.experts.0.down_proj.weight) : f32[8,64]
v19 = aten.mul.Tensor(v18, v10) : f32[8,64]
v20 = aten.eq.Scalar(v5, 1) : b8[8,2]
v21 = aten.mul.Tensor(v7, v20) : f32[8,2]
v22 = aten.sum.dim_IntList(v21, [-1], True) : f32[8,1]
v23 = aten.linear(v0, $model.layers.0.mlp.experts.1.gate_up_proj.weight) : f32[8,80]
v24 = aten.split.Tensor(v23, 40, -1) : (f32[8,40], f32[8,40])
v25 = getitem(v24, 0) : f32[8,40]
v26 = getitem(v24, 1) : f32[8,40]
v27 = aten.silu(v25) : f32[8,40]
v28 = aten.mul.Tensor(v27, v26) : f32[8,40]
v29 = spinfx.hadamard(v28, [20], 40, False) : f32[8,40]
v30 = aten.linear(v29, $model.layers.0.mlp.experts.1.down_proj.weight) : f32[8,64]
v31 = aten.mul.Tensor(v30, v22) : f32[8,64]
v32 = aten.add.Tensor(v19, v31) : f32[8,64]
v33 = aten.eq.Scalar(v5, 2) : b8[8,2]
v34 = aten.mul.Tensor(v7, v33) : f32[8,2]
v35 = aten.sum.dim_IntList(v34, [-1], True) : f32[8,1]
v36 = aten.linear(v0, $model.layers.0.mlp.experts.2.gate_up_proj.weight) : f32[8,80]
v37 = aten.split.Tensor(v36, 40, -1) : (f32[8,40], f32[8,40])
v38 = getitem(v37, 0) : f32[8,40]
v39 = getitem(v37, 1) : f32[8,40]
v40 = aten.silu(v38) : f32[8,40]
v41 = aten.mul.Tensor(v40, v39) : f32[8,40]
v42 = spinfx.hadamard(v41, [20], 40, False) : f32[8,40]
v43 = aten.linear(v42, $model.layers.0.mlp.experts.2.down_proj.weight) : f32[8,64]
v44 = aten.mul.Tensor(v43, v35) : f32[8,64]
v45 = aten.add.Tensor(v32, v44) : f32[8,64]
v46 = aten.eq.Scalar(v5, 3) : b8[8,2]
v47 = aten.mul.Tensor(v7, v46) : f32[8,2]
v48 = aten.sum.dim_IntList(v47, [-1], True) : f32[8,1]
v49 = aten.linear(v0, $model.layers.0.mlp.experts.3.gate_up_proj.weight) : f32[8,80]
v50 = aten.split.Tensor(v49, 40, -1) : (f32[8,40], f32[8,40])
v51 = getitem(v50, 0) : f32[8,40]
v52 = getitem(v50, 1) : f32[8,40]
v53 = aten.silu(v51) : f32[8,40]
v54 = aten.mul.Tensor(v53, v52) : f32[8,40]
v55 = spinfx.hadamard(v54, [20], 40, False) : f32[8,40]
v56 = aten.linear(v55, $model.layers.0.mlp.experts.3.down_proj.weight) : f32[8,64]
v57 = aten.mul.Tensor(v56, v48) : f32[8,64]
v58 = aten.add.Tensor(v45, v57) : f32[8,64]
v59 = aten.reshape(v58, [1, 8, 64]) : f32[1,8,64]
""")
