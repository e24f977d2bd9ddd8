"""Every preset saves and loads: `spinfx.load` of the checkpoint computes the rewritten program's logits,
bit for bit, on a tiny zoo llama (GQA 4/2 heads, head_dim 16: R3, R4 on 88, KV quantization per head).

Bit for bit, not within a tolerance: loaded with `cpu_compute_dtype=None`, the model class runs the same
ATen ops on the same stored tensors as the program (quantized linears in the generic `spinfx::qlinear`,
fake quantizers from `spinfx.kernels.fake_quant`), and a 4-bit quantizer that rounds one value
differently moves it a whole grid step, which a tolerance would have to admit. (The default load of a
weight-only checkpoint computes its linears in bf16; `save` verifies that within 2e-2, see spinfx.checkpoint.write.verify.)

spinquant-w4a4kv4 also writes its activation / KV fake quantization in compressed-tensors' schema, which
compressed-tensors' own parser reads, and the loaded model applies the KV quantizer to the whole cache
at every decode step: token-by-token decoding and `generate` match one cacheless prefill.
"""
import dataclasses
import inspect
import json

import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.api import calibration_windows
from spinfx.recipe import PRESETS, load_recipe

# one preset per distinct list of passes (a preset spelled like another is covered by it)
DISTINCT = list({json.dumps(steps, sort_keys=True): name for name, steps in reversed(PRESETS.items())}.values())[::-1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """preset -> (zoo llama, Result, checkpoint dir): each preset rewritten and saved once for the module."""
    done = {}

    def get(preset):
        if preset not in done:
            zm = zoo.build("llama")
            rec, calib = load_recipe(preset), None
            if calibration_windows(rec):  # a calibrated preset, on 2 windows of random tokens (saving is the test)
                rec.passes = [dataclasses.replace(p, samples=2) if p.calibration_windows() else p for p in rec.passes]
                calib = torch.randint(0, zm.model.config.vocab_size, (2 * zm.example_inputs["input_ids"].numel(),),
                                      generator=torch.Generator().manual_seed(0))
            r = spinfx.rewrite(zm.model, rec, zm.example_inputs, calib=calib)
            done[preset] = zm, r, r.save(tmp_path_factory.mktemp(preset) / "ckpt")
        return done[preset]

    return get


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def program_logits(r, zm):
    """The rewritten program on its traced input (the zoo's example: input_ids, use_cache=False)."""
    with torch.no_grad():
        return r.module(**zm.example_inputs).logits


def parse_compressed_tensors(qc: dict):
    ct = pytest.importorskip("compressed_tensors.quantization", reason="needs `pip install spinfx[compressed]`")
    return ct.QuantizationConfig.model_validate(qc)


@pytest.mark.parametrize("preset", DISTINCT)
def test_every_preset_round_trips_with_the_programs_logits(saved, preset):
    zm, r, out = saved(preset)
    assert r.report.extra["checkpoint"]["verified"]  # save loaded it back (default compute dtype) and compared
    ids = zm.example_inputs["input_ids"]
    ref = program_logits(r, zm)
    assert torch.equal(logits(spinfx.load(out, cpu_compute_dtype=None), ids, use_cache=False), ref)
    qc = json.loads((out / "config.json").read_text()).get("quantization_config")
    if qc:
        parse_compressed_tensors(qc)


def test_w4a4kv4_writes_input_activations_and_kv_cache_scheme(saved):
    zm, r, out = saved("spinquant-w4a4kv4")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    # the preset's clip ratios (QuaRot's 0.9 / 0.95) in observer_kwargs: compressed-tensors has no field of its own
    act = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
           "observer_kwargs": {"clip_ratio": 0.9}}
    assert [g["input_activations"] for g in qc["config_groups"].values()] == [act] * len(qc["config_groups"])
    assert qc["kv_cache_scheme"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                     "group_size": zm.expect.head_dim, "dynamic": True,
                                     "observer_kwargs": {"clip_ratio": 0.95}}
    assert qc["ignore"] == ["lm_head"]  # the recipe's: in float, its input not quantized
    parsed = parse_compressed_tensors(qc)
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.strategy, kv.group_size, kv.dynamic, kv.symmetric) == (4, "group", 16, True, False)
    for g in parsed.config_groups.values():
        a = g.input_activations
        assert (a.num_bits, a.strategy, a.dynamic, a.symmetric) == (4, "token", True, True)
    # spinfx's rounding, not compressed-tensors': other clients must refuse it (as for online transforms)
    assert config["model_type"] == "spinfx" and config["spinfx_model_type"] == "llama"


def test_w4a4kv4_fused_siblings_quantize_their_shared_input_once(saved, tmp_path):
    """spinfx.load fuses q/k/v and gate/up of a fake-quantized checkpoint too: one packed linear per group
    whose input is quantized once (the quantizer hooked on the packed linear, not on its slices), one op
    call per group, the logits of fuse=False bit for bit (and the program's: the default load of a
    fake-quantized checkpoint runs its linears in the activation dtype). Siblings whose inputs are quantized differently
    are not fused together: with layer 0's k_proj moved to a group of its own with 8-bit activations, its
    q/v are fused, k stays separate, and the logits are still the unfused load's."""
    import shutil
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from spinfx.kernels.qlinear import FusedQLinear, QLinear, QLinearSlice

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func] += 1
            return func(*args, **(kwargs or {}))

    zm, r, out = saved("spinquant-w4a4kv4")
    ids, e = zm.example_inputs["input_ids"], zm.expect
    fused, separate = spinfx.load(out), spinfx.load(out, fuse=False)
    packs = [m for m in fused.modules() if isinstance(m, FusedQLinear)]
    kv = e.kv_heads * e.head_dim
    assert [p.sizes for p in packs] == [(e.heads * e.head_dim, kv, kv), (e.intermediate,) * 2] * e.layers
    assert all(len(p.linear._forward_pre_hooks) == 1 for p in packs)
    assert not any(m._forward_pre_hooks for m in fused.modules() if isinstance(m, QLinearSlice))
    ops = Ops()
    with ops:
        got = logits(fused, ids, use_cache=False)
    assert ops.calls[torch.ops.spinfx.qlinear.default] == 4 * e.layers  # packed q/k/v, o, packed gate/up, down
    assert torch.equal(got, logits(separate, ids, use_cache=False))
    assert torch.equal(got, program_logits(r, zm))

    edited = shutil.copytree(out, tmp_path / "k8")
    config = json.loads((edited / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    k0 = "model.layers.0.self_attn.k_proj"
    group = next(g for g in groups.values() if k0 in g["targets"])
    group["targets"].remove(k0)
    groups["k8"] = {**group, "targets": [k0], "input_activations": {**group["input_activations"], "num_bits": 8}}
    (edited / "config.json").write_text(json.dumps(config))
    fused, separate = spinfx.load(edited), spinfx.load(edited, fuse=False)
    attn0, attn1 = fused.model.layers[0].self_attn, fused.model.layers[1].self_attn
    assert isinstance(attn0.k_proj, QLinear) and attn0.q_proj.fused is attn0.v_proj.fused
    assert attn0.q_proj.fused.sizes == (e.heads * e.head_dim, kv) and attn1.k_proj.fused.sizes[1:] == (kv, kv)
    want = logits(separate, ids, use_cache=False)
    assert torch.equal(logits(fused, ids, use_cache=False), want)
    assert not torch.equal(want, program_logits(r, zm))  # k0's 8-bit quantizer matters: fusing it with q/v would show


def test_w4a4kv4_quantizes_the_kv_cache_when_decoding_and_generating(saved):
    from transformers import DynamicCache, StaticCache

    zm, r, out = saved("spinquant-w4a4kv4")
    loaded = spinfx.load(out)
    ids = zm.example_inputs["input_ids"]
    n, start = ids.shape[1], 3
    full = logits(loaded, ids, use_cache=False)
    assert torch.equal(full, program_logits(r, zm))
    key = "cache" if "cache" in inspect.signature(loaded.forward).parameters else "past_key_values"

    def decode(model, kv):
        steps = [logits(model, ids[:, :start], use_cache=True, cache_position=torch.arange(start), **{key: kv})]
        for t in range(start, n):  # each step's k/v come from the cache: quantized there too
            steps.append(logits(model, ids[:, t:t + 1], use_cache=True, cache_position=torch.tensor([t]),
                                **{key: kv}))
        assert kv.get_seq_length() == n
        return torch.cat(steps, dim=1)

    caches = (lambda: DynamicCache(config=loaded.config), lambda: StaticCache(config=loaded.config, max_cache_len=n))
    decoded = [decode(loaded, cache()) for cache in caches]
    for got in decoded:
        # 1e-5: one token against eight through the same linears (float32 sums in another order), far
        # below the one-step changes of 4-bit rounding (none happens here)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        seq = ids
        for _ in range(6):  # greedy without a cache: every token's k/v recomputed and quantized
            seq = torch.cat([seq, logits(loaded, seq, use_cache=False)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), seq)

    # keys rotated once on their way into the cache, then the whole cache quantized (rotate, then quantize:
    # the program's order) = as before: keys cached unrotated (the attention pre-hooks that rotate them on
    # write removed), the whole cache rotated and quantized every step — bit for bit (each key row's
    # Hadamard is the same op on the same values; the quantizer's output is contiguous either way)
    for layer in loaded.model.layers:
        layer.self_attn._forward_pre_hooks.clear()
    assert all(torch.equal(got, decode(loaded, cache())) for got, cache in zip(decoded, caches))

    for m in loaded.modules():  # and the KV quantizer matters: without it the logits move a lot
        del m.__dict__["_spinfx_kv"]
    assert (logits(loaded, ids, use_cache=False) - full).abs().max() > 0.1


def test_fake_quantization_alone_is_guarded_and_unknown_schemes_are_refused(saved, tmp_path):
    import shutil

    import transformers

    from spinfx.engine.errors import BadInput

    # no rotation, no online transform: the guard comes from the activation quantizers alone; their clip
    # ratios (no field of compressed-tensors' own: observer_kwargs) come back with spinfx.load, bit for bit
    (tmp_path / "a8.yaml").write_text("passes:\n  - quantize: {weights: {bits: 4, group_size: 16}, "
                                      "activations: {bits: 8, clip_ratio: 0.9}, kv_cache: {bits: 4, clip_ratio: 0.5}}\n")
    zm = zoo.build("llama")
    r = spinfx.rewrite(zm.model, str(tmp_path / "a8.yaml"), zm.example_inputs)
    out = r.save(tmp_path / "a8")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spinfx" and "transform_config" not in config["quantization_config"]
    qc = config["quantization_config"]
    assert {json.dumps(g["input_activations"]["observer_kwargs"]) for g in qc["config_groups"].values()} == \
        {'{"clip_ratio": 0.9}'}
    assert qc["kv_cache_scheme"]["observer_kwargs"] == {"clip_ratio": 0.5}
    parse_compressed_tensors(qc)
    with pytest.raises(ValueError, match="spinfx"):  # transformers would round by compressed-tensors' rules
        transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(logits(spinfx.load(out), zm.example_inputs["input_ids"], use_cache=False),
                       program_logits(r, zm))

    # a scheme spinfx does not apply (static per-tensor activations) is refused, not approximated
    _, _, w4a4 = saved("spinquant-w4a4kv4")
    edited = shutil.copytree(w4a4, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["input_activations"].update(strategy="tensor", dynamic=False)
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="input_activations"):
        spinfx.load(edited)
    config["quantization_config"]["kv_cache_scheme"]["observer_kwargs"] = {"clip_ratio": 2}  # not a clip ratio
    group["input_activations"].update(strategy="token", dynamic=True)
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=r"kv_cache_scheme observer_kwargs \{'clip_ratio': 2\} is not one spinfx applies"):
        spinfx.load(edited)
