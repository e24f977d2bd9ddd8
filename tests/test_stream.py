"""spinfx.checkpoint.stream: a checkpoint rewritten window by window (a few decoder layers and some vocabulary rows at a
time) is bit for bit the checkpoint of the in-memory rewrite; each window is certified; progress on stderr;
bad tensors are refused in one line before anything is written."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import spinfx
from spinfx.checkpoint import stream
from spinfx.testing import zoo
from spinfx.engine.errors import BadInput, Unsupported
from spinfx.checkpoint.read import read_safetensors
from spinfx.recipe import load_recipe


def _source(tmp_path, name, layers=3):
    zm = zoo.build(name, layers=layers)
    path = tmp_path / "src"
    zm.model.save_pretrained(path)
    return zm, path


def _same_checkpoints(a, b):
    ta, tb = read_safetensors(a), read_safetensors(b)
    assert set(ta) == set(tb)
    differ = [k for k in ta if not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                                    and torch.equal(ta[k], tb[k]))]
    assert not differ, differ
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("name, recipe", [
    ("llama", "hadamard-w4a16"),        # tied table kept tied: one 8-bit matrix, R1 online; R2 seeds per layer
    ("llama_untied", "spinquant"),      # untied lm_head, R1 into embedding rows and lm_head rows
    ("opt", "w4a16"),                   # LayerNorm (centering), biases, learned positions
    ("gpt2", "w4a16"),                  # Conv1D (transposed weights), fused q/k/v
    ("qwen3", "spinquant"),             # per-head q/k norms, R3 online at attention
])
def test_streamed_checkpoint_is_the_in_memory_checkpoint(tmp_path, name, recipe):
    zm, src = _source(tmp_path, name)
    rec = load_recipe(recipe)
    spinfx.rewrite(str(src), rec).save(tmp_path / "mem")
    plan = stream.plan(src, rec, layers_per_window=1)
    assert plan.windows == 3 and plan.rows < zm.expect.vocab
    res = stream.rewrite(plan, rec, tmp_path / "str", log=lambda m: None)
    _same_checkpoints(tmp_path / "mem", tmp_path / "str")
    windows = res.report.extra["windows"]
    assert [w["layers"] for w in windows] == [[0, 1], [1, 2], [2, 3]]
    assert windows[-1]["rows"][1] == zm.expect.vocab
    certified = [p.name for p in res.report.passes if p.certificate]
    assert certified and all(sorted(w["certificates"]) == sorted(certified) and max(w["certificates"].values())
                             <= 1e-10 for w in windows)
    ids = zm.example_inputs["input_ids"]
    assert torch.equal(spinfx.load(tmp_path / "str")(input_ids=ids).logits,
                       spinfx.load(tmp_path / "mem")(input_ids=ids).logits)


def test_report_counts_every_window(tmp_path):
    _, src = _source(tmp_path, "llama", layers=4)
    rec = load_recipe("spinquant")
    res = stream.rewrite(stream.plan(src, rec, layers_per_window=2), rec, tmp_path / "out", log=lambda m: None)
    rot = res.report.pass_result("rotate")
    assert rot.findings["r2"]["sites"] == 2  # window 0's findings …
    assert res.report.extra["linears"]["total"] == 4 * 7 + 1  # … but every window's linears
    assert sum(r.applied for r in res.report.pass_result("fold-norms").rules) == 2 * 4 + 1
    saved = json.loads((tmp_path / "out" / "spinfx_report.json").read_text())
    assert len(saved["windows"]) == 2 and saved["checkpoint"]["streamed"]
    assert "window by window" in (tmp_path / "out" / "report.html").read_text()


def test_a_recipe_that_calibrates_does_not_stream(tmp_path):
    _, src = _source(tmp_path, "llama")
    gptq = load_recipe("w4a16")
    gptq = type(gptq)("gptq", [type(p)(weights={"bits": 4, "method": "gptq"}) for p in gptq.passes])
    assert not gptq.streams and stream.plan(src, gptq) is None
    with pytest.raises(Unsupported, match="quantize needs the whole model"):
        stream.plan(src, gptq, layers_per_window=1)


def _edit(src, dst, fn):
    import shutil

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    fn(t)
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("case, needle", [
    ("shape", "tensor model.layers.1.mlp.up_proj.weight has shape [88, 63], but config.json makes it [88, 64]"),
    ("int", "tensor model.layers.2.self_attn.k_proj.weight is I32, where a float weight is expected"),
    ("nan", "tensor model.layers.1.input_layernorm.weight contains NaN or Inf"),
    ("missing", "tensor model.layers.2.mlp.down_proj.weight is missing"),
])
def test_bad_tensors_are_refused_before_anything_is_written(tmp_path, case, needle):
    _, src = _source(tmp_path, "llama")
    edits = {
        "shape": lambda t: t.update({"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:, :63].clone()}),
        "int": lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.ones(32, 64, dtype=torch.int32)}),
        "nan": lambda t: t["model.layers.1.input_layernorm.weight"].__setitem__(3, float("nan")),
        "missing": lambda t: t.pop("model.layers.2.mlp.down_proj.weight"),
    }
    bad = _edit(src, tmp_path / "bad", edits[case])
    rec = load_recipe("fold")
    with pytest.raises(BadInput) as e:
        stream.rewrite(stream.plan(bad, rec, layers_per_window=1), rec, tmp_path / "out", log=lambda m: None)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_streams_a_model_larger_than_a_window(tmp_path):
    """`spinfx rewrite` streams when the model is larger than one window (here: a window of 40 kB),
    shows layer i/N with a rate and an ETA on stderr, and prints one JSON object on stdout."""
    _, src = _source(tmp_path, "llama")
    code = ("import sys; from spinfx.checkpoint import stream; from spinfx.tools import cli; stream.WINDOW_BYTES = 40_000; "
            "sys.exit(cli.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "rewrite", str(src), "--recipe", "fold", "--out",
                          str(tmp_path / "out"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert len(data["report"]["windows"]) == 3
    assert "[spinfx] layer 3/3 ·" in out.stderr and "s/layer · ETA" in out.stderr
    m = spinfx.load(tmp_path / "out")
    assert m.config.num_hidden_layers == 3
