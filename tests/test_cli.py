"""`spinfx rewrite` / `eval` / `demo`: progress on stderr, one JSON object with --json, and each bad input
one line with its exit code and no partial output."""
import json
import subprocess
import sys

import pytest

from spinfx.testing import zoo


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spinfx.tools.cli", *args], capture_output=True, text=True, cwd=cwd)


def one_error_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("spinfx:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "llama"
    zoo.build("llama").model.save_pretrained(path)
    return path


def test_rewrite_writes_a_checkpoint_with_progress_and_json(tmp_path, model_dir):
    out = cli("rewrite", str(model_dir), "--recipe", "rotate", "--out", str(tmp_path / "out"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)  # exactly one object
    assert data["out"] == str(tmp_path / "out") and data["report"]["recipe"] == "rotate"
    assert data["report"]["checkpoint"]["verified"]
    assert {"config.json", "model.safetensors", "spinfx_report.json", "report.html"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert "[spinfx] loading" in out.stderr and "[spinfx] wrote" in out.stderr
    text = cli("rewrite", str(model_dir), "--recipe", "fold", "--out", str(tmp_path / "out"), "--force")
    assert text.returncode == 0 and "wrote" in text.stdout and "fold-norms" in text.stdout


def _corrupt(tmp_path, model_dir):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return bad


@pytest.mark.parametrize("case, code, needle", [
    ("missing dir", 2, "no such directory"),
    ("non-model dir", 2, "not a model directory"),
    ("corrupted safetensors", 2, "corrupted safetensors"),
    ("unknown recipe", 2, "unknown recipe"),
    ("unsupported structure", 3, "lm_head.bias"),
    ("existing --out", 2, "exists"),
    ("recipe changes nothing", 3, "changed none of the 15 linears"),
])
def test_bad_inputs_one_line_exit_code_no_partial_output(tmp_path, model_dir, case, code, needle):
    work = tmp_path / "work"
    work.mkdir()
    src, recipe, out = str(model_dir), "fold", work / "out"
    if case == "missing dir":
        src = str(work / "nope")
    elif case == "non-model dir":
        (work / "empty").mkdir()
        src = str(work / "empty")
    elif case == "corrupted safetensors":
        src = str(_corrupt(work, model_dir))
    elif case == "unknown recipe":
        recipe = "no-such-recipe"
    elif case == "unsupported structure":  # OPT: the final LayerNorm's shift folds into a bias lm_head lacks
        opt = work / "opt"
        zoo.build("opt").model.save_pretrained(opt)
        src = str(opt)
    elif case == "recipe changes nothing":  # every linear ignored: a 4-bit recipe that would write a float model
        recipe = str(tmp_path / "nothing.yaml")
        (tmp_path / "nothing.yaml").write_text("passes:\n  - quantize: {weights: {bits: 4, group_size: 32}, "
                                               "ignore: ['re:.*']}\n")
    elif case == "existing --out":
        out.mkdir()
        (out / "mine").write_text("keep")
    before = sorted(p.name for p in work.iterdir())
    res = cli("rewrite", src, "--recipe", recipe, "--out", str(out), cwd=work)
    assert res.returncode == code, res.stderr[-3000:]
    assert needle in one_error_line(res)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, no temp dirs left
    if case == "existing --out":
        assert (out / "mine").read_text() == "keep"


def test_usage_errors_exit_2(tmp_path):
    assert cli("rewrite", "smollm2").returncode == 2  # --out is required
    assert cli("rewrite", "x", "--out", "y", "--frobnicate").returncode == 2
    res = cli("eval", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such directory" in one_error_line(res)


@pytest.mark.slow
@pytest.mark.smollm2
def test_demo_prints_the_table_and_writes_the_report(tmp_path):
    res = cli("demo", "--windows", "2", "--calib-windows", "16", "--no-compile", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout)
    rows = data["rows"]
    assert rows["weights on disk (MB)"]["original"] > 500
    assert rows["weights on disk (MB)"]["rewritten"] < 0.6 * rows["weights on disk (MB)"]["original"]
    # the default is rotations + GPTQ on 16 calibration windows: within 15 % of the fp32 perplexity on these
    # 2 windows (Hadamard + RTN was 2.28×: 22.06 → 50.27; bench/README.md "Default recipe"); a wrong
    # rotation or packing gives perplexities in the thousands.
    ratio = rows["perplexity (hamlet, ctx 512)"]["rewritten"] / rows["perplexity (hamlet, ctx 512)"]["original"]
    assert 1.0 < ratio < 1.15, ratio
    assert (tmp_path / "spinfx-demo" / "report.html").is_file()
    report = json.loads((tmp_path / "spinfx-demo" / "spinfx_report.json").read_text())
    acts = report["activations"]  # calibration text from other plays: statistics at every quantized input
    assert len(acts["layers"]) == 211 and acts["median"]["kurtosis_after"] < acts["median"]["kurtosis_before"]
    assert "decode step, compiled (ms)" not in rows  # --no-compile


def test_demo_compiled_rows_compile_both_models_and_leave_them_as_they_were():
    import torch
    from torch._dynamo.utils import counters

    from spinfx.tools.cli import _compiled_decode_ms

    a, b = zoo.build("llama"), zoo.build("llama", seed=1)
    forwards = (a.model.forward, b.model.forward)
    counters.clear()
    ms = _compiled_decode_ms(a.model, b.model, a.config.vocab_size)
    # each model's prefill and decode graphs were compiled (Dynamo resets between the two models)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    assert all(t > 0 for t in ms) and (a.model.forward, b.model.forward) == forwards


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_rewrite_then_eval_reproduces_the_in_memory_perplexity(tmp_path):
    """`spinfx rewrite smollm2 --recipe hadamard-w4a16 --out DIR` then `spinfx eval DIR` gives the
    perplexity of `spinfx.rewrite(...).module` in memory (the checkpoint runs the int4 CPU kernel in
    bfloat16 where the in-memory graph dequantizes in float32: kernel tolerance, not bit equality)."""
    import torch

    from spinfx.api import rewrite
    from spinfx.tools.evaluate import evaluate
    from spinfx.checkpoint.hf import load_model

    out = tmp_path / "sq"
    res = cli("rewrite", "smollm2", "--recipe", "hadamard-w4a16", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "tokenizer.json").is_file()  # the save copied the tokenizer (and verified the checkpoint's logits)
    ev = cli("eval", str(out), "--windows", "2", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    from_disk = json.loads(ev.stdout)["ppl"]
    model, tok = load_model("smollm2")
    r = rewrite(model, "hadamard-w4a16", {"input_ids": torch.zeros(1, 512, dtype=torch.long), "use_cache": False},
                certify=False)
    in_memory = evaluate(r.module, "hamlet", 512, 2, tokenizer=tok).ppl
    fp32 = evaluate(model, "hamlet", 512, 2, tokenizer=tok).ppl
    assert from_disk == pytest.approx(in_memory, rel=5e-3), (from_disk, in_memory)
    assert abs(from_disk - in_memory) < 0.1 * abs(in_memory - fp32), (from_disk, in_memory, fp32)
    # streamed in 3 windows of 10 layers (and a third of the vocabulary each): the very same checkpoint
    from spinfx.checkpoint import stream
    from spinfx.checkpoint.hf import smollm2_dir
    from spinfx.checkpoint.read import read_safetensors
    from spinfx.recipe import load_recipe

    rec = load_recipe("hadamard-w4a16")
    stream.rewrite(stream.plan(smollm2_dir(), rec, layers_per_window=10), rec, tmp_path / "streamed",
                   log=lambda m: None)
    a, b = read_safetensors(out), read_safetensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "streamed" / "config.json").read_text())


def test_decode_step_uses_the_current_cache_keyword():
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns with a
    # FutureWarning in the middle of `spinfx demo`'s output); 5.23 only knows `past_key_values`
    import warnings

    from spinfx.tools.cli import decode_step_ms

    zm = zoo.build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert decode_step_ms(zm.model, zm.config.vocab_size, prompt=8, reps=1) > 0


@pytest.mark.smollm2
def test_a_calibrated_recipe_takes_the_builtin_text_where_the_model_has_a_tokenizer(tmp_path, capsys):
    # issue 12: calibrated recipes use the built-in text unless --calib is given; a model without a
    # tokenizer cannot read it and is refused in one line naming --calib
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spinfx.checkpoint.hf import copy_tokenizer_files, resolve_source
    from spinfx.tools.cli import main

    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152)).save_pretrained(src)  # SmolLM2's vocabulary
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("passes:\n  - quantize: {weights: {bits: 4, group_size: 32, method: gptq}, samples: 2}\n")
    assert main(["rewrite", str(src), "--recipe", str(recipe), "--out", str(tmp_path / "bare")]) == 2
    assert "--calib FILE" in capsys.readouterr().err and not (tmp_path / "bare").exists()
    copy_tokenizer_files(resolve_source("smollm2"), src)
    assert main(["rewrite", str(src), "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--json"]) == 0
    out = capsys.readouterr()
    assert "2 windows × 512 tokens of the built-in Shakespeare text" in out.err
    report = json.loads(out.out)["report"]
    assert '"gptq"' in json.dumps(report), "the quantize pass did not calibrate"
    assert "built-in Shakespeare" in report["calibration"]["text"] and report["calibration"]["tokens"] == 2 * 512
