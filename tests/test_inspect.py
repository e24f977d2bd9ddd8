"""Front-ends, inspect and its CLI: what users see when structure is found, almost found, or missing."""
import json
import subprocess
import sys

import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.engine.graph import from_dynamo
from spinfx.testing import graph_text


class _Scale(torch.nn.Module):
    def forward(self, x):
        return x * 1.5


def test_perturbed_model_miss_names_node_and_reason():
    zm = zoo.build("llama")
    attn = zm.model.model.layers[0].self_attn
    attn.q_proj = torch.nn.Sequential(_Scale(), attn.q_proj)  # an extra op between norm and q_proj
    rep = spinfx.inspect(zm.model, zm.example_inputs)
    c = rep.contract
    assert not c.ok
    assert c.found["norm-linears"] == 4 and c.expected["norm-linears"] == 5
    problem = next(p for p in c.problems if p.startswith("norm-linears"))
    # the node that broke the group, where it lives, and why
    assert "mul_tensor" in problem and "model.layers.0.self_attn.q_proj.0" in problem
    assert "not a consumer" in problem and "expected aten.linear" in problem
    assert any(p.startswith("qkv") for p in c.problems)


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2"])
def test_export_and_dynamo_give_the_same_canonical_graph(name):
    zm = zoo.build(name)
    exported = spinfx.trace(zm.model, zm.example_inputs)
    got = {}

    def backend(gm, example_inputs):
        got["prog"] = from_dynamo(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(zm.model, backend=backend, fullgraph=True)(**zm.example_inputs)
    assert graph_text(got["prog"]) == graph_text(exported)
    # and both run: same logits as eager
    ref = zm.model(**zm.example_inputs).logits
    assert torch.equal(exported(**zm.example_inputs).logits, ref)
    assert torch.equal(got["prog"](*got["prog"].examples)[0], ref)


def test_constants_keep_fqns_tied_weights_once_and_provenance():
    zm = zoo.build("llama")
    prog = spinfx.trace(zm.model, zm.example_inputs)
    names = {n.target for n in prog.graph.nodes if n.op == "get_attr"}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "lm_head.weight" not in names and prog.aliases["model.embed_tokens.weight"] == ["lm_head.weight"]
    lin = next(n for n in prog.graph.nodes if n.op == "call_function" and len(n.args) > 1 and getattr(n.args[1], "target", "") == "model.layers.0.mlp.up_proj.weight")
    assert lin.meta["module"] == "model.layers.0.mlp.up_proj" and lin.meta["module_type"] == "Linear"


class _RouterWeights(torch.nn.Module):
    def forward(self, x):  # Granite-MoE's router: softmax in float32, back to the stream's dtype
        return x.float().softmax(-1).type_as(x) + x


def test_type_as_is_a_cast_of_its_first_argument(spinfx_golden):
    # type_as(y, x) reads x for its dtype only: spelled as a cast, x keeps only its real readers (a float64 or
    # bf16 Granite-MoE's post-attention norm fed the router, the experts and this type_as: no norm → linears
    # group, its γ was not folded and R1 refused with "fold the norms first")
    x = torch.randn(2, 4, dtype=torch.float64)
    prog = spinfx.trace(_RouterWeights(), (x,))
    spinfx_golden(graph_text(prog), """
in0 = input : f64[2,4]
v0 = aten._to_copy(in0, dtype=f32) : f32[2,4]
v1 = aten.softmax.int(v0, -1) : f32[2,4]
v2 = aten._to_copy(v1, dtype=f64) : f64[2,4]
v3 = aten.add.Tensor(v2, in0) : f64[2,4]
return [v3]
""")
    assert torch.equal(prog(x), _RouterWeights()(x))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spinfx.tools.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_inspect_json_on_a_model_dir(tmp_path):
    zm = zoo.build("qwen2")
    zm.model.save_pretrained(tmp_path / "m")
    out = _cli("inspect", str(tmp_path / "m"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["contract"]["satisfied"] and rep["contract"]["found"]["qkv"] == 2
    assert rep["passes"][0]["findings"]["counts"]["norm-linears"] == 5


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a model directory"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, make, needle):
    out = _cli("inspect", str(make(tmp_path)), cwd=tmp_path)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("spinfx:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


def test_cli_usage_error_exit_2():
    assert _cli("inspect").returncode == 2
    assert _cli("frobnicate").returncode == 2


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_inspect_counts():
    out = _cli("inspect", "smollm2", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    counts = rep["passes"][0]["findings"]["counts"]
    assert counts["norm-linears"] == 61 and counts["qkv"] == 30 and counts["gate-up"] == 30
    assert counts["rope"] == 30 and counts["attention"] == 30
    res = rep["passes"][0]["findings"]["residual"]
    assert res["embedding"] == "model.embed_tokens.weight" and res["writers"] == 60
    assert rep["contract"]["satisfied"] and rep["contract"]["env"] == {"L": 30}


def test_spinfx_trace_levels(monkeypatch, capsys):
    zm = zoo.build("llama")
    monkeypatch.setenv("SPINFX_TRACE", "1")
    spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    err = capsys.readouterr().err
    assert "[spinfx] fold-norms:" in err and "fold-rms=5/5" in err and "matched at" not in err
    monkeypatch.setenv("SPINFX_TRACE", "2")
    spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    err = capsys.readouterr().err
    assert "fold-rms (passes/fold_norms.py:" in err and "matched at mul_tensor" in err
    monkeypatch.setenv("SPINFX_TRACE", "3")
    spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    assert "graph before fold-norms:" in capsys.readouterr().err


def test_model_dir_whose_class_refuses_sdpa_is_inspected(tmp_path):
    # transformers refuses attn_implementation="sdpa" for Gemma-2: spinfx asks for SDPA only where the
    # class supports it and loads the others with eager attention, like plain transformers does
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "g2")
    out = _cli("inspect", str(tmp_path / "g2"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout)["passes"][0]["findings"]["counts"]
    # 4 norms per layer + the final one; only the pre-norms and the final norm feed linears
    assert counts["norm"] == 9 and counts["norm-linears"] == 5
    rep = spinfx.inspect(tmp_path / "g2")
    assert rep.passes[0].findings["counts"] == counts
