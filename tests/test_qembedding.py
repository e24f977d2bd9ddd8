"""Quantized embedding and lm_head (quantize's `embedding:` / `lm_head:` options): the spinfx::qembedding op
against a reference gather, its fake impl and decomposition; the pass certified on tied and untied zoo
models (one matrix for a tied pair); found by structure, not by name; the checkpoint's config group and
round trip through spinfx.load; the presets; bad options refused in one line."""
import json

import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.engine.certify import compare
from spinfx.engine.errors import BadInput, Unsupported
from spinfx.kernels.qembedding import QEmbedding, dequant_embedding, qembedding_decompositions
from spinfx.kernels.qlinear import qlinear_decompositions
from spinfx.kernels.quant_rtn import quantize_rtn
from spinfx.kernels.quant_weight import dequantize
from spinfx.passes import Quantize
from spinfx.passes.quantize import quantized_layers
from spinfx.recipe import Recipe, load_recipe

aten = torch.ops.aten
QEMB, QLINEAR = torch.ops.spinfx.qembedding.default, torch.ops.spinfx.qlinear.default
W4 = {"bits": 4, "group_size": 16}
E8 = {"bits": 8}


def _ops(prog, target) -> list:
    return [n for n in prog.graph.nodes if n.op == "call_function" and n.target is target]


def _quantize(zm, **opts):
    return spinfx.rewrite(zm.model, Recipe("t", [Quantize(weights=W4, **opts)]), zm.example_inputs)


def _logits(model, zm):
    with torch.no_grad():
        return model(**zm.example_inputs).logits


# ---- the op -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (4, 16, True), (4, 16, False), (8, 32, False)])
def test_qembedding_equals_a_gather_of_the_dequantized_table(bits, group, symmetric):
    gen = torch.Generator().manual_seed(bits + (group or 0))
    table = torch.randn(50, 64, generator=gen, dtype=torch.float64)
    qw = quantize_rtn(table, bits, group, symmetric, scale_dtype=torch.float32)
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    ref = dequantize(qw, torch.float32)[ids]  # F.embedding of Ŵ
    got = QEmbedding(qw)(ids)
    assert got.dtype == torch.float32 and got.shape == (3, 7, 64)
    assert torch.equal(got, ref)
    # float64 scales: exactly Ŵ's rows (what the pass's certificate relies on)
    qw64 = quantize_rtn(table, bits, group, symmetric, scale_dtype=torch.float64)
    assert torch.equal(QEmbedding(qw64)(ids), dequantize(qw64, torch.float64)[ids])
    # a wrong code would show: the op reads the codes, not a float copy
    assert not torch.equal(got, torch.nn.functional.embedding(ids, table.float()))


def test_qembedding_fake_shapes_and_compiles_with_the_decomposition():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = quantize_rtn(torch.randn(40, 48, dtype=torch.float64), 4, 16, True, scale_dtype=torch.bfloat16)
    m = QEmbedding(qw)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = m(mode.from_tensor(torch.zeros(2, 5, dtype=torch.long)))
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    # the table the backend's Inductor uses holds it, next to qlinear's
    assert qlinear_decompositions()[QEMB] is dequant_embedding is qembedding_decompositions()[QEMB]
    ids = torch.tensor([[0, 39, 7, 7]])
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(ids), m(ids))


# ---- the pass ------------------------------------------------------------------------------------------

def test_tied_embedding_and_lm_head_are_one_quantized_matrix():
    zm = zoo.build("llama")  # lm_head.weight is the embedding matrix
    assert zm.expect.tied
    r = _quantize(zm, embedding=E8, lm_head=E8)
    q = r.report.pass_result("quantize")
    assert q.certificate["rel"] <= 1e-10 and q.certificate["tolerance"] == 1e-10
    prog = r.program
    (emb,), heads = _ops(prog, QEMB), [n for n in _ops(prog, QLINEAR) if n.meta["module"] == "lm_head"]
    assert len(heads) == 1 and not _ops(prog, aten.embedding.default)
    assert emb.args[1] is heads[0].args[1] and emb.args[2] is heads[0].args[2]  # the same packed codes and scales
    assert emb.args[1].target == "model.embed_tokens.weight_packed"
    assert not [n for n in _ops(prog, aten.linear.default)]  # nothing left in float
    layers = quantized_layers(prog)
    table = layers["model.embed_tokens"]
    assert table.embedding and table.tied == ("lm_head",) and "lm_head" not in layers
    assert (table.weight.bits, table.weight.group_size, table.weight.symmetric) == (8, None, True)
    assert table.weight.weight_shape == (zm.expect.vocab, zm.expect.hidden)
    assert "model.embed_tokens.weight" not in prog.consts()
    assert any("token embedding model.embed_tokens" in n and "lm_head lm_head" in n and "tied" in n
               for n in q.notes), q.notes
    assert q.findings["ends"]["model.embed_tokens"]["lm_head"] == ["lm_head"]
    # the certificate compares against the dequantized table; against the float model it sees the rounding
    float_prog = spinfx.rewrite(zm.model, Recipe("none", []), zm.example_inputs).program
    assert compare(float_prog, prog)["rel"] > 1e-6
    # 8-bit: logits move an order of magnitude less than the 4-bit layers move them
    only_w4 = _quantize(zm)
    ref, got, w4 = _logits(zm.model, zm), _logits(r.module, zm), _logits(only_w4.module, zm)
    assert (got - w4).abs().max() < 0.1 * (w4 - ref).abs().max()


def test_untied_embedding_and_lm_head_are_two_matrices():
    zm = zoo.build("llama_untied")
    r = _quantize(zm, embedding=E8, lm_head={"bits": 4, "group_size": 32})
    q = r.report.pass_result("quantize")
    assert q.certificate["rel"] <= 1e-10
    layers = quantized_layers(r.program)
    assert layers["model.embed_tokens"].embedding and layers["model.embed_tokens"].tied == ()
    assert (layers["lm_head"].weight.bits, layers["lm_head"].weight.group_size) == (4, 32)
    assert not layers["lm_head"].embedding
    (emb,) = _ops(r.program, QEMB)
    assert emb.args[1].target == "model.embed_tokens.weight_packed"
    assert sum(n.meta["module"] == "lm_head" for n in _ops(r.program, QLINEAR)) == 1
    assert len([n for n in q.notes if n.startswith("quantized the")]) == 2


def test_embedding_alone_and_group_wise_with_fallback():
    zm = zoo.build("llama_untied")
    r = _quantize(zm, embedding={"bits": 4, "group_size": 128})  # D = 64: 128 falls back to 64
    layers = quantized_layers(r.program)
    assert r.report.pass_result("quantize").certificate["rel"] <= 1e-10
    assert layers["model.embed_tokens"].weight.group_size == 64
    assert "lm_head" not in layers and [n.meta["module"] for n in _ops(r.program, aten.linear.default)] == ["lm_head"]
    assert any("group 128 does not divide K=64" in n and "model.embed_tokens" in n
               for n in r.report.pass_result("quantize").notes)


def test_lm_head_is_found_by_structure_not_by_name():
    """The lm_head option takes the linear producing the logits, whatever `ignore` says and whatever it is
    called: GPT-2 (Conv1D layers elsewhere, wte tied to an nn.Linear lm_head) and after R1 (untied copy)."""
    zm = zoo.build("gpt2")
    r = _quantize(zm, embedding=E8, lm_head=E8, ignore=["lm_head"])
    layers = quantized_layers(r.program)
    assert r.report.pass_result("quantize").certificate["rel"] <= 1e-10
    assert layers["transformer.wte"].tied == ("lm_head",)
    assert not _ops(r.program, aten.embedding.default) or all(  # the position table (wpe) stays float
        n.args[0].target == "transformer.wpe.weight" for n in _ops(r.program, aten.embedding.default))
    r = _rotated()
    layers = quantized_layers(r.program)
    assert r.report.pass_result("quantize").certificate["rel"] <= 1e-10
    assert layers["model.embed_tokens"].tied == () and layers["lm_head"].weight.bits == 8


def _rotated():
    """The tied zoo llama through `rotate` (fold-norms unties the lm_head) and 8-bit ends."""
    zm = zoo.build("llama")
    passes = load_recipe("rotate").passes + [Quantize(weights=W4, embedding=E8, lm_head=E8)]
    return spinfx.rewrite(zm.model, Recipe("t", passes), zm.example_inputs)


def test_untied_by_fold_norms_saves_two_tables(tmp_path):
    """A tied source untied by fold-norms (before R1): two quantized matrices, so the checkpoint must say
    tie_word_embeddings = false, or the loaded lm_head would read the embedding's table."""
    r = _rotated()
    out = r.save(tmp_path / "rot")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")  # the untied copy's scales in the model's dtype, not float64
    assert w["lm_head.weight_scale"].dtype == w["model.embed_tokens.weight_scale"].dtype == torch.float32
    zm = zoo.build("llama")
    got, ref = _logits(spinfx.load(out), zm), _logits(r.module, zm)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_tied_keep_with_online_r1_stays_one_matrix(tmp_path):
    """fold-norms tie: keep + R1 online at the embedding (rotate's existing structure): the table stays
    shared, so it is quantized once; the checkpoint keeps it tied and spinfx.load restores R1."""
    from spinfx.passes import REGISTRY

    zm = zoo.build("llama")
    passes = [REGISTRY["fold-norms"](tie="keep"), REGISTRY["rotate"](r1="hadamard", r2="hadamard", r3=True, r4=True),
              Quantize(weights=W4, embedding=E8, lm_head=E8)]
    r = spinfx.rewrite(zm.model, Recipe("t", passes), zm.example_inputs)
    assert r.report.pass_result("quantize").certificate["rel"] <= 1e-10
    layers = quantized_layers(r.program)
    assert layers["model.embed_tokens"].tied == ("lm_head",) and "lm_head" not in layers
    out = r.save(tmp_path / "keep")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    got, ref = _logits(spinfx.load(out), zm), _logits(r.module, zm)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("opts, err, match", [
    ({"embedding": E8}, Unsupported, "tied"),                          # tied: both or neither
    ({"embedding": E8, "lm_head": {"bits": 4}}, Unsupported, "one scheme"),
    ({"embedding": {"bits": 8, "method": "gptq"}, "lm_head": E8}, BadInput, "method must be 'rtn'"),
    ({"lm_head": {"bits": 6}}, BadInput, "bits must be one of"),
    ({"embedding": 8}, BadInput, "embedding takes"),
])
def test_bad_embedding_options_are_refused_in_one_line(opts, err, match):
    zm = zoo.build("llama")
    with pytest.raises(err, match=match) as e:
        _quantize(zm, **opts)
    assert "\n" not in str(e.value)


# ---- checkpoint ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "llama_untied"])
def test_checkpoint_round_trip_and_config_group(tmp_path, name):
    zm = zoo.build(name)
    r = _quantize(zm, embedding=E8, lm_head=E8)
    out = r.save(tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    (group,) = [g for g in qc["config_groups"].values() if g["weights"]["num_bits"] == 8]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"]
    want = ["model.embed_tokens"] if zm.expect.tied else ["lm_head", "model.embed_tokens"]
    assert group["targets"] == want and group["format"] == "pack-quantized"
    assert qc["ignore"] == [] and config["tie_word_embeddings"] is zm.expect.tied
    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")
    assert w["model.embed_tokens.weight_packed"].dtype == torch.int32
    assert w["model.embed_tokens.weight_packed"].shape == (zm.expect.vocab, zm.expect.hidden // 4)
    assert "model.embed_tokens.weight" not in w and "lm_head.weight" not in w
    assert ("lm_head.weight_packed" in w) is not zm.expect.tied
    m = spinfx.load(out)
    assert isinstance(m.get_input_embeddings(), QEmbedding)
    assert type(m.get_output_embeddings()).__name__ == "QLinear"
    got, ref = _logits(m, zm), _logits(r.module, zm)  # QLinear: bf16 activations on CPU
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    # and the table alone is exact: the loaded lookup equals the program's
    ids = zm.example_inputs["input_ids"]
    (emb,) = _ops(r.program, QEMB)
    table = r.program.consts()
    want = torch.ops.spinfx.qembedding(ids, table[emb.args[1].target], table[emb.args[2].target], None,
                                       emb.args[4], emb.args[5])
    assert torch.equal(m.get_input_embeddings()(ids), want)


def test_a_scaled_embedding_keeps_its_scale_when_loaded_quantized(tmp_path):
    """Gemma's embedding class multiplies its rows by √hidden (transformers' ScaledWordEmbedding): the
    loaded QEmbedding must too (it did not: save's verification refused the checkpoint, 0.9 relative)."""
    zm = zoo.build("gemma")
    r = _quantize(zm, embedding=E8, lm_head=E8)
    m = spinfx.load(r.save(tmp_path / "q"))
    emb = m.get_input_embeddings()
    assert isinstance(emb, QEmbedding) and emb.scale == pytest.approx(zm.expect.embed_scale)
    got, ref = _logits(m, zm), _logits(r.module, zm)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_checkpoint_shrinks(tmp_path):
    zm = zoo.build("llama_untied")
    float_head = _quantize(zm).save(tmp_path / "float")
    quant_head = _quantize(zm, embedding=E8, lm_head=E8).save(tmp_path / "q8")
    size = {p.name: (p / "model.safetensors").stat().st_size for p in (float_head, quant_head)}
    table = zm.expect.vocab * zm.expect.hidden  # two float32 tables → two int8 tables + a scale per row
    saved = 2 * (table * 4 - table - zm.expect.vocab * 4)
    assert size["float"] - size["q8"] >= 0.95 * saved


# ---- presets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["w4a16", "hadamard-w4a16", "spinquant-w4a16"])
def test_default_presets_quantize_embedding_and_lm_head_to_8_bits(preset):
    (q,) = [p for p in load_recipe(preset).passes if p.name == "quantize"]
    assert q.embedding == {"bits": 8} and q.lm_head == {"bits": 8}


def test_lower_qlinear_keeps_the_tied_table_read_by_qembedding():
    from spinfx.passes import LowerQLinear

    zm = zoo.build("llama")
    q = Quantize(weights={"bits": 4, "group_size": 32}, embedding=E8, lm_head=E8)
    generic = spinfx.rewrite(zm.model, Recipe("t", [q]), zm.example_inputs)
    lowered = spinfx.rewrite(zm.model, Recipe("t", [q, LowerQLinear()]), zm.example_inputs)
    prog = lowered.program
    (head,) = [n for n in prog.graph.nodes if n.meta.get("module") == "lm_head" and n.op == "call_function"
               and n.target is torch.ops.spinfx.qlinear_int8pack.default]
    assert head.args[0] is not None and head.kwargs["weight_int8"].target == "lm_head.weight_int8"
    (emb,) = _ops(prog, QEMB)  # still on the generic packed table, untouched
    consts = prog.consts()
    assert emb.args[2].target == "model.embed_tokens.weight_scale"
    assert consts["model.embed_tokens.weight_scale"].shape == (zm.expect.vocab, 1)
    assert torch.equal(consts["model.embed_tokens.weight_packed"],
                       quantized_layers(generic.program)["model.embed_tokens"].weight.weight_packed)
    got, ref = _logits(lowered.module, zm), _logits(generic.module, zm)
    assert (got - ref).abs().max() < 3e-2 * ref.abs().max()


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_a_scaled_embedding_keeps_its_scale_when_loaded(tmp_path, name):
    # Gemma's embedding module multiplies its lookup by √d in its forward: loading the quantized table
    # as a bare QEmbedding dropped it, and the checkpoint failed its verification (relative 0.84)
    zm = zoo.build(name)
    r = spinfx.rewrite(zm.model, "w4a16", zm.example_inputs)
    out = r.save(tmp_path / "q")  # verified: the loaded model computes the program
    emb = spinfx.load(out).get_input_embeddings()
    assert isinstance(emb, QEmbedding) and emb.scale == zm.expect.embed_scale != 1.0
    assert r.report.extra["checkpoint"]["rel"] <= 2e-2


def test_an_embedding_that_does_more_than_scale_is_refused_at_load():
    from spinfx.checkpoint.read import _lookup_scale

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    assert _lookup_scale("e", torch.nn.Embedding(8, 4)) == 1.0
    assert _lookup_scale("e", Scaled(8, 4)) == 3.0
    with pytest.raises(spinfx.Unsupported, match="e: Shifted computes more than its table lookup"):
        _lookup_scale("e", Shifted(8, 4))
