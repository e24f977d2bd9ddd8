"""Perplexity evaluation (`spinfx eval`): texts by file or name, modules and rewritten modules,
calibration text that never overlaps the evaluated text, the CLI function's JSON."""
import json
import math
from argparse import Namespace

import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.tools.data import perplexity, text_path, tokenize_file, windows
from spinfx.engine.errors import BadInput
from spinfx.tools.evaluate import calibration_tokens, cmd_eval, evaluate, resolve_text


class CharTokenizer:
    """One token per character (mod the zoo's vocabulary of 256): enough to drive the text plumbing."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % zoo.VOCAB for c in text]}


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question. " * 8)
    return path


def test_evaluate_a_module_is_data_perplexity(text):
    zm = zoo.build("llama")
    tok = CharTokenizer()
    got = evaluate(zm.model, text=text, ctx=8, windows=5, tokenizer=tok)
    wins = windows(tokenize_file(tok, text), 8, 5)
    want = perplexity(lambda ids: zm.model(input_ids=ids, use_cache=False).logits, wins)
    assert got.ppl == pytest.approx(want, rel=1e-6) and math.isfinite(got.ppl)
    assert (got.windows, got.tokens, got.ctx, got.text) == (5, 5 * 7, 8, str(text))
    assert set(got.to_dict()) == {"ppl", "text", "ctx", "windows", "tokens", "seconds"}


def test_evaluate_a_rewritten_module(text):
    zm = zoo.build("llama")  # traced for [1, 8] inputs
    r = spinfx.rewrite(zm.model, "w4a16", zm.example_inputs)
    tok = CharTokenizer()
    fp = evaluate(zm.model, text=text, ctx=8, windows=4, tokenizer=tok).ppl
    q = evaluate(r.module, text=text, ctx=8, windows=4, tokenizer=tok).ppl
    assert math.isfinite(q) and q != fp
    with pytest.raises(BadInput, match="traced for sequences of 8 tokens"):
        evaluate(r.module, text=text, ctx=16, tokenizer=tok)


def test_texts_by_name_or_file(text, tmp_path):
    assert resolve_text("hamlet") == text_path("hamlet")
    assert resolve_text(text) == text
    with pytest.raises(BadInput, match="no such file"):
        resolve_text(tmp_path / "missing.txt")
    with pytest.raises(BadInput, match="not a text file"):
        resolve_text(tmp_path)
    with pytest.raises(BadInput, match="tokenizer"):
        evaluate(zoo.build("llama").model, text=text, ctx=8)


def test_model_directory_without_tokenizer(text, tmp_path):
    zm = zoo.build("llama")
    zm.model.save_pretrained(tmp_path / "llama")
    with pytest.raises(BadInput, match="tokenizer"):
        evaluate(str(tmp_path / "llama"), text=text, ctx=8)


def test_calibration_never_comes_from_the_evaluated_text():
    tok = CharTokenizer()
    calib = calibration_tokens(tok, ctx=64, windows=3, exclude="alls_well_that_ends_well")
    assert calib.shape == (192,)
    # the first text in name order is skipped: the calibration starts with the next one
    assert torch.equal(calib, tokenize_file(tok, text_path("antony_and_cleopatra"))[:192])
    hamlet = tokenize_file(tok, text_path("hamlet"))
    assert not torch.equal(calibration_tokens(tok, ctx=64, windows=3)[:64], hamlet[:64])


@pytest.mark.slow
@pytest.mark.smollm2
def test_cmd_eval_smollm2_json(capsys):
    # TESTBED.md: SmolLM2 fp32 on Hamlet, ctx 512, first 8 windows: 42.56
    assert cmd_eval(Namespace(src="smollm2", text=None, ctx=512, windows=8, json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == pytest.approx(42.56, abs=0.05)
    assert (out["src"], out["windows"], out["tokens"], out["ctx"]) == ("smollm2", 8, 8 * 511, 512)
    assert out["text"].endswith("hamlet_gut.txt")
