"""Checkpoint out and back in: plain HF checkpoints for rotations without online ops (transformers loads
them, same logits), online ops restored by spinfx.load (generate keeps working), compressed-tensors
pack-quantized linears readable by the real client, refusals that leave nothing behind."""
import hashlib
import json

import pytest
import torch

import spinfx
from spinfx.checkpoint import read, write
from spinfx.testing import zoo
from spinfx.engine.errors import BadInput, Unsupported


def logits(model, zm):
    with torch.no_grad():
        return model(**zm.example_inputs).logits


def plain_transformers(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def quant_recipe(tmp_path, rotations: str) -> str:
    """`rotations` + 4-bit RTN, group 16 (K = 88 of down_proj: no 64/32 group divides it → per channel)."""
    from spinfx.recipe import PRESETS

    import yaml

    steps = PRESETS[rotations] + [{"quantize": {"weights": {"bits": 4, "group_size": 16}}}]
    path = tmp_path / f"{rotations}-w4g16.yaml"
    path.write_text(yaml.safe_dump({"passes": steps}))
    return str(path)


@pytest.mark.parametrize("name", ["llama", "llama_untied", "gemma", "mistral"])
def test_rotate_checkpoint_is_a_plain_hf_checkpoint(tmp_path, name):
    zm = zoo.build(name)
    r = spinfx.rewrite(zm.model, "rotate", zm.example_inputs)
    out = r.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "report.html",
                                                      "spinfx_report.json"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == zm.config.model_type
    assert config["tie_word_embeddings"] is False  # R1 untied the lm_head (tie: untie)
    ref = logits(r.module, zm)
    torch.testing.assert_close(logits(plain_transformers(out), zm), ref, rtol=1e-5, atol=1e-5)
    assert r.report.extra["checkpoint"]["verified"]
    report = json.loads((out / "spinfx_report.json").read_text())
    assert report["recipe"] == "rotate" and report["checkpoint"]["rel"] <= 1e-4


def test_fold_checkpoint_writes_folded_norms_as_ones(tmp_path):
    zm = zoo.build("llama")
    out = spinfx.rewrite(zm.model, "fold", zm.example_inputs).save(tmp_path / "fold")
    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")
    assert torch.equal(w["model.layers.0.input_layernorm.weight"], torch.ones(zm.expect.hidden))
    assert not torch.equal(w["model.layers.0.self_attn.q_proj.weight"],
                           zm.model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("recipe", ["spinquant", "keep"])
def test_online_rotations_restored_by_load_and_refused_elsewhere(tmp_path, recipe):
    zm = zoo.build("qwen2")
    if recipe == "keep":  # tied embedding kept: R1 applied online as a matrix after the lookup
        (tmp_path / "keep.yaml").write_text(
            "passes:\n  - fold-norms: {tie: keep}\n  - rotate: {r3: true, r4: true}\n")
        recipe = str(tmp_path / "keep.yaml")
    r = spinfx.rewrite(zm.model, recipe, zm.example_inputs)
    out = r.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spinfx" and config["spinfx_model_type"] == "qwen2"
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    locations = {a["location"] for g in groups.values() for a in g["apply"]}
    assert {"input", "q_attn", "k_cache"} <= locations
    if "keep" in recipe:
        assert "spinfx.r1" in groups and groups["spinfx.r1"]["apply"][0]["location"] == "output"
    loaded = spinfx.load(out)
    torch.testing.assert_close(logits(loaded, zm), logits(r.module, zm), rtol=1e-5, atol=1e-5)
    if "keep" in recipe:  # the online matrix is a buffer of the model: it moves with loaded.to("cuda")
        assert [n for n, _ in loaded.named_buffers() if n.startswith("spinfx_transform_")]
    ids = zm.example_inputs["input_ids"]
    with torch.no_grad():  # the model class keeps generate and its KV cache
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False),
                           zm.model.generate(ids, max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match="spinfx"):  # transformers would drop R3/R4 silently: refused
        plain_transformers(out)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_with_a_kv_cache_after_r3_matches_prefill(tmp_path, cache):
    """R3 rotates q and k after RoPE; with a KV cache the keys of earlier steps come from the cache. Token
    by token decoding of the loaded spinquant model gives, at every position, the logits of one prefill
    of the whole sequence (and of the original model)."""
    from transformers import DynamicCache, StaticCache

    zm = zoo.build("llama")  # GQA 4/2 heads, R3 on head_dim 16, R4 on 88 = 44·2
    r = spinfx.rewrite(zm.model, "spinquant", zm.example_inputs)
    loaded = spinfx.load(r.save(tmp_path / "sq"))
    ids = zm.example_inputs["input_ids"]
    n, start = ids.shape[1], 3
    with torch.no_grad():
        full = loaded(input_ids=ids, use_cache=False).logits
        ref = zm.model(input_ids=ids, use_cache=False).logits
        kv = (DynamicCache(config=loaded.config) if cache == "dynamic"
              else StaticCache(config=loaded.config, max_cache_len=n))
        steps = [loaded(input_ids=ids[:, :start], past_key_values=kv, use_cache=True,
                        cache_position=torch.arange(start)).logits]
        for t in range(start, n):
            steps.append(loaded(input_ids=ids[:, t:t + 1], past_key_values=kv, use_cache=True,
                                cache_position=torch.tensor([t])).logits)
    decoded = torch.cat(steps, dim=1)
    assert kv.get_seq_length() == n
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)


def test_quantized_linears_are_compressed_tensors_pack_quantized(tmp_path, monkeypatch):
    zm = zoo.build("llama_untied")
    r = spinfx.rewrite(zm.model, quant_recipe(tmp_path, "spinquant"), zm.example_inputs)
    loads, load = [], read.load
    monkeypatch.setattr(read, "load", lambda *a, **k: loads.append(k) or load(*a, **k))
    out = r.save(tmp_path / "q")
    # save verifies the checkpoint in the program's dtype, not through the bf16 CPU kernels (whose rounding
    # put SmolLM2's logits 2.2 % off under a data-free W4 recipe and flipped a mixture's routing)
    assert loads == [{"cpu_compute_dtype": None, "fuse": False}]
    assert r.report.extra["checkpoint"]["rel"] == 0.0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert sorted(str(g["weights"]["group_size"]) for g in qc["config_groups"].values()) == ["16", "None"]
    assert {g["weights"]["strategy"] for g in qc["config_groups"].values()} == {"group", "channel"}
    assert qc["ignore"] == ["lm_head"] and "transform_config" in qc
    from safetensors.torch import load_file

    w = load_file(out / "model.safetensors")
    assert w["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert w["model.layers.0.self_attn.q_proj.weight_packed"].shape == (64, 8)
    assert w["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)
    assert torch.equal(w["model.layers.0.self_attn.q_proj.weight_shape"], torch.tensor([64, 64]))
    got, ref = logits(spinfx.load(out), zm), logits(r.module, zm)  # QLinear: bf16 activations on CPU
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_real_client_loads_a_quantized_checkpoint_without_online_ops(tmp_path):
    pytest.importorskip("compressed_tensors", reason="the real client needs `pip install spinfx[compressed]`")
    zm = zoo.build("llama_untied")
    r = spinfx.rewrite(zm.model, quant_recipe(tmp_path, "rotate"), zm.example_inputs)
    out = r.save(tmp_path / "q")
    model = plain_transformers(out)
    torch.testing.assert_close(logits(model, zm), logits(r.module, zm), rtol=1e-4, atol=1e-4)


def _tree_hash(path):
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_source_dir_untouched_existing_out_refused_force_replaces(tmp_path):
    zm = zoo.build("llama")
    src = tmp_path / "src"
    zm.model.save_pretrained(src)  # with generation_config.json, copied like the tokenizer files
    before = _tree_hash(src)
    r = spinfx.rewrite(str(src), "rotate")
    out = r.save(tmp_path / "out")
    assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    assert _tree_hash(src) == before
    with pytest.raises(BadInput, match="exists"):
        r.save(out)
    with pytest.raises(BadInput, match="source"):
        r.save(src, force=True)
    (out / "stale").write_text("x")
    r.save(out, force=True)
    assert not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dirs left
    assert _tree_hash(src) == before


def test_inexpressible_rewrite_is_refused_and_nothing_written(tmp_path):
    zm = zoo.build("opt")  # LayerNorm β of the final norm folds into a bias lm_head does not have
    r = spinfx.rewrite(zm.model, "fold", zm.example_inputs)
    with pytest.raises(Unsupported, match="lm_head.bias"):
        r.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sharded_write_reads_back(tmp_path):
    zm = zoo.build("llama")
    tensors = {k: v.clone() for k, v in zm.model.state_dict().items()}
    files = write.write_safetensors(tensors, tmp_path, max_shard=40_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    back = read.read_safetensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def _png_pixels(path) -> bytes:
    """The decompressed (filtered) scanlines of a PNG: enough to tell a blank page from a drawn one."""
    import struct
    import zlib

    data, pos, idat = path.read_bytes(), 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def test_report_html_renders_in_headless_chromium(tmp_path):
    import shutil
    import subprocess

    zm = zoo.build("llama")
    calib = torch.randint(0, zm.expect.vocab, (2048,), generator=torch.Generator().manual_seed(1))
    r = spinfx.rewrite(zm.model, quant_recipe(tmp_path, "spinquant"), zm.example_inputs, calib=calib)
    out = r.save(tmp_path / "out")
    page = (out / "report.html").read_text()
    assert page.count("<svg class=graph") == 2 and "passes/fold_norms.py:" in page
    assert "Quantization error per layer" in page and "certified in float64" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium); the page was written "
                    "and checked as text only")
    shot = tmp_path / "shot.png"
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}",
                          "--window-size=1200,1600", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    pixels = _png_pixels(shot)
    assert len(set(pixels)) > 32, "the screenshot is blank"
