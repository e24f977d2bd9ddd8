"""`spinfx.load` speed work, checked for sameness: sibling quantized linears fused into one packed linear
(bit-identical to the separate ones, under torch.compile too) and R3 applied to the keys once, as they
enter the KV cache (the same tokens and logits as rotating the whole cached key every step, at a cost
that no longer grows with the cache)."""
import json
import shutil
from collections import Counter

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import spinfx
from spinfx.testing import zoo
from spinfx.kernels import qlinear_cpu
from spinfx.kernels.qlinear import FusedQLinear, QLinear, QLinearSlice
from spinfx.recipe import PRESETS

LAYERS = 2


def _recipe(tmp, name, steps):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"passes": steps}))
    return str(path)


@pytest.fixture(scope="module")
def sq4(tmp_path_factory):
    """SpinQuant (R1–R4, R3 online) + 4-bit RTN, group 64, on a Llama with GQA (q 64, k/v 32 features)
    and intermediate 96: q/k/v and gate/up all run on the int4 fast path (N % 16 == 0)."""
    tmp = tmp_path_factory.mktemp("sq4")
    zm = zoo.random_llama(LAYERS, intermediate=96)
    steps = PRESETS["spinquant"] + [{"quantize": {"weights": {"bits": 4, "group_size": 64}}}]
    r = spinfx.rewrite(zm.model, _recipe(tmp, "sq4", steps), zm.example_inputs)
    return zm, r, r.save(tmp / "ckpt")


@pytest.fixture(scope="module")
def w8(tmp_path_factory):
    """Qwen2 (q/k/v biases), 8-bit per channel (the int8 fast path), k_proj overridden to 4-bit group 64:
    q/k/v differ in scheme, gate/up (N = 88 each) agree."""
    tmp = tmp_path_factory.mktemp("w8")
    zm = zoo.build("qwen2")
    steps = [{"quantize": {"weights": {"bits": 8, "group_size": None},
                           "overrides": [{"pattern": "re:.*k_proj$", "bits": 4, "group_size": 64}]}}]
    r = spinfx.rewrite(zm.model, _recipe(tmp, "w8", steps), zm.example_inputs)
    return zm, r, r.save(tmp / "ckpt")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _kinds(model):
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, (QLinear, FusedQLinear, QLinearSlice)))


def test_fused_memo_never_returns_a_stale_slice():
    """take(x, i) answers fused(x)[slice i] whatever the call pattern: a new tensor, or x changed in
    place between two sibling calls, recomputes; the memo is dropped once every sibling has taken."""
    from spinfx.kernels.quant_rtn import quantize_rtn

    gen = torch.Generator().manual_seed(0)
    qws = [quantize_rtn(torch.randn(n, 64, generator=gen), 4, 32, True) for n in (64, 32, 32)]
    parts = [QLinear(q) for q in qws]
    fused = FusedQLinear.build(parts, qws)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(fused.take(x, 0), parts[0](x)) and fused._memo.x is x
    x.mul_(2)  # in place: same object, new version
    assert torch.equal(fused.take(x, 1), parts[1](x))
    y = torch.randn(3, 64, generator=gen)
    assert torch.equal(fused.take(y, 2), parts[2](y))
    assert torch.equal(fused.take(y, 0), parts[0](y)) and torch.equal(fused.take(y, 1), parts[1](y))
    assert fused._memo.x is None and fused._memo.ys is None  # all three taken: nothing held
    # refused: another bit width, a bias on one sibling only
    q8 = quantize_rtn(torch.randn(32, 64, generator=gen), 8, None, True)
    assert FusedQLinear.build([parts[0], QLinear(q8)], [qws[0], q8]) is None
    qb = quantize_rtn(torch.randn(32, 64, generator=gen), 4, 32, True, bias=torch.randn(32, generator=gen))
    assert FusedQLinear.build([parts[0], QLinear(qb)], [qws[0], qb]) is None


def test_qkv_and_gate_up_fuse_bit_identically(sq4):
    zm, r, ckpt = sq4
    fused, separate = spinfx.load(ckpt), spinfx.load(ckpt, fuse=False)
    # per layer: q/k/v -> one packed linear [64 + 32 + 32], gate/up -> one [96 + 96]; o/down and the
    # untied lm_head stay (the tied lm_head here is the float embedding)
    assert _kinds(separate) == {"QLinear": 7 * LAYERS}
    assert _kinds(fused) == {"FusedQLinear": 2 * LAYERS, "QLinearSlice": 5 * LAYERS, "QLinear": 4 * LAYERS}
    attn = fused.model.layers[0].self_attn
    packs = [m for m in attn.modules() if isinstance(m, FusedQLinear)]
    assert len(packs) == 1 and packs[0].sizes == (64, 32, 32)
    assert attn.k_proj.fused is packs[0] and attn.k_proj.out_features == 32
    int4 = "spinfx::qlinear_cpu" if qlinear_cpu.usable() else "spinfx::qlinear_int4pack"
    assert [c.op.name() for c in packs[0].linear.calls] == [int4]
    ids = zm.example_inputs["input_ids"]
    # the same codes and scales, stacked along N, through the same kernel: bitwise equal here
    assert torch.equal(_logits(fused, ids), _logits(separate, ids))
    assert torch.equal(_logits(fused, ids[:, :1]), _logits(separate, ids[:, :1]))  # decode-shaped, M = 1
    # round trip: the checkpoint keeps separate q/k/v tensors; the loaded model computes the program
    from safetensors.torch import load_file

    stored = load_file(ckpt / "model.safetensors")
    assert {f"model.layers.0.self_attn.{p}_proj.weight_packed" for p in "qkv"} <= set(stored)
    ref = _logits(r.module, ids)
    assert (_logits(fused, ids) - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 activations (int4pack)


def test_fusion_refused_where_schemes_differ(w8):
    zm, r, ckpt = w8
    fused, separate = spinfx.load(ckpt), spinfx.load(ckpt, fuse=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(getattr(attn, f"{p}_proj"), QLinear) for p in "qkv")  # k is 4-bit: separate
    assert isinstance(mlp.gate_proj, QLinearSlice) and isinstance(mlp.up_proj, QLinearSlice)
    assert [c.op.name() for c in mlp.gate_proj.fused.linear.calls] == ["spinfx::qlinear_int8pack"]
    ids = zm.example_inputs["input_ids"]
    assert torch.equal(_logits(fused, ids), _logits(separate, ids))


def test_a_sibling_with_its_own_input_transform_is_not_fused(sq4, tmp_path):
    """A checkpoint whose q_proj has an input transform (here an extra Hadamard on its input): q_proj
    stays separate, k/v (still one input) are fused, and the output is the unfused load's."""
    zm, _, ckpt = sq4
    edited = shutil.copytree(ckpt, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    groups["hadamard-input-64"] = {"type": "spinfx-hadamard", "head_dim": 64, "apply": [
        {"targets": ["model.layers.0.self_attn.q_proj"], "location": "input", "inverse": False, "ignore": []}]}
    (edited / "config.json").write_text(json.dumps(config))
    fused, separate = spinfx.load(edited), spinfx.load(edited, fuse=False)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QLinear) and attn.q_proj._forward_pre_hooks
    assert isinstance(attn.k_proj, QLinearSlice) and attn.k_proj.fused.sizes == (32, 32)
    assert isinstance(fused.model.layers[1].self_attn.q_proj, QLinearSlice)
    ids = zm.example_inputs["input_ids"]
    assert torch.equal(_logits(fused, ids), _logits(separate, ids))


def test_compiled_fused_model_one_packed_op_per_group(sq4):
    """torch.compile(model): Dynamo traces the first-call memo without a graph break (fullgraph) and the
    packed op appears once per group; the logits equal eager's bit for bit with a graph-capturing
    backend (no kernel changes), and within 1e-5 of eager with Inductor (which reorders float ops)."""
    zm, _, ckpt = sq4
    fused = spinfx.load(ckpt)
    ids = zm.example_inputs["input_ids"]
    eager = _logits(fused, ids)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    assert torch.equal(_logits(torch.compile(fused, backend=capture, fullgraph=True), ids), eager)
    ops = Counter(str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function")
    # per layer: packed q/k/v, o_proj, packed gate/up (int4 fast path); down_proj (K = 96, group 32)
    int4 = "spinfx.qlinear_cpu.default" if qlinear_cpu.usable() else "spinfx.qlinear_int4pack.default"
    assert ops[int4] == 4 * LAYERS
    torch._dynamo.reset()
    torch.testing.assert_close(_logits(torch.compile(fused), ids), eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("cache", ["static"])  # a DynamicCache traces the same way (and recompiles per length)
def test_compiled_decode_with_a_cache_is_one_graph(sq4, cache):
    """Prefill then decode steps through torch.compile(fullgraph=True): the cache wrapper that rotates
    keys on write and the fused siblings' memo trace without a graph break; logits eager's up to fp32
    rounding. Not bitwise: at the decode steps the captured graph's attention output comes out with other
    strides than eager's (another SDPA path, another summation order: ≈ 1e-6 apart); that was hidden
    while the int4 kernel rounded every linear's input to bf16, and shows with fp32 linears (the C++
    kernel, or the generic op: `cpu_compute_dtype=None`)."""
    from transformers import DynamicCache, StaticCache

    from spinfx.checkpoint.hf import cache_kwarg

    zm, _, ckpt = sq4
    model = spinfx.load(ckpt)
    ids = torch.randint(0, zm.expect.vocab, (1, 11), generator=torch.Generator().manual_seed(0))

    def run(m):
        kv = DynamicCache(config=model.config) if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=11)
        with torch.no_grad():
            out = [m(input_ids=ids[:, :8], **{cache_kwarg(model): kv}, cache_position=torch.arange(8)).logits]
            for t in range(8, 11):
                out.append(m(input_ids=ids[:, t:t + 1], **{cache_kwarg(model): kv},
                             cache_position=torch.tensor([t])).logits)
        return torch.cat(out, 1)

    torch._dynamo.reset()
    compiled = run(torch.compile(model, backend=lambda gm, ex: gm.forward, fullgraph=True))
    torch.testing.assert_close(compiled, run(model), rtol=1e-5, atol=1e-5)
    _check_qlinear_guards(model)
    torch._dynamo.reset()


def _guard_codes(manager) -> list[str]:
    """Every leaf guard of a Dynamo guard-manager tree, as its code."""
    out = [part for g in manager.get_leaf_guards() if type(g).__name__ != "NO_TENSOR_ALIASING"
           for part in g.verbose_code_parts()[:1]]
    kids = list(manager.get_child_managers())
    for k, v in getattr(manager, "get_key_value_managers", dict)().values():
        kids += [c for c in (k, v) if c is not None]
    return out + [c for kid in kids for c in _guard_codes(kid)]


def _check_qlinear_guards(model):
    """The compiled step's guards on each quantized linear (checked before every call): its type and
    forward, the op, one tuple of constants, its buffers dict, and each tensor (two guards; a None
    buffer one) — at most 2 per tensor + 8, where the general plan structure read cost ≈ 20 + 2 per tensor.
    Linears with hooks (R4's input Hadamard) are left out: their hooks' guards are the hooks'."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    (code,) = {type(model).forward.__code__}
    entries = _debug_get_cache_entry_list(code)
    assert entries
    guards = _guard_codes(entries[0].guard_manager.root)
    linears = {}  # Dynamo's source path of each plain QLinear (a fused group's packed one via its first slice)
    for name, m in model.named_modules():
        path = "".join(f"._modules['{p}']" for p in name.split("."))
        if isinstance(m, QLinear) and not m._forward_pre_hooks and not m._forward_hooks and name.count("spinfx_fused") == 0:
            linears[path] = m
        elif isinstance(m, QLinearSlice) and m.index == 0:
            linears[path + ".fused._modules['linear']"] = m.fused.linear
    assert len(linears) >= 3 * LAYERS
    for path, m in linears.items():
        mine = [g for g in guards if any(path + c in g for c in "._)[")]
        tensors = sum(t is not None for t in m._buffers.values())
        assert mine and len(mine) <= 2 * tensors + 8, (path, len(mine), mine)


def test_gqa_attention_keeps_the_kv_heads(sq4, monkeypatch):
    """A loaded GQA model attends with SDPA's own GQA (`enable_gqa`) on CPU: the compiled decode step's
    attention reads the cache's 2 KV heads, not 4 repeated copies (transformers' `repeat_kv` under
    torch.compile), and prefill + decode logits equal transformers' path bit for bit."""
    from transformers import StaticCache
    from transformers.integrations import sdpa_attention

    import spinfx.checkpoint.read as read
    from spinfx.checkpoint.hf import cache_kwarg

    zm, _, ckpt = sq4
    model = spinfx.load(ckpt)
    ids = torch.randint(0, zm.expect.vocab, (1, 10), generator=torch.Generator().manual_seed(0))

    def run(m):
        kv = StaticCache(config=model.config, max_cache_len=10)
        with torch.no_grad():
            out = [m(input_ids=ids[:, :8], **{cache_kwarg(model): kv}, cache_position=torch.arange(8)).logits]
            for t in (8, 9):
                out.append(m(input_ids=ids[:, t:t + 1], **{cache_kwarg(model): kv}, cache_position=torch.tensor([t])).logits)
        return torch.cat(out, 1)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ours = run(torch.compile(model, backend=capture, fullgraph=True))
    torch._dynamo.reset()
    sdpa = [n for g in graphs for n in g.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 2 * LAYERS  # prefill and decode graphs
    heads = {n.args[0].meta["example_value"].shape[1]: n.args[1].meta["example_value"].shape[1] for n in sdpa}
    assert heads == {4: 2}, heads
    eager = run(model)
    # transformers' path as torch.compile traces it: k and v repeated to every query head (in eager it
    # packs a decode step's queries instead, another summation order: ≈ 1e-6 apart)
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)
    monkeypatch.setattr(read, "_sdpa_gqa", lambda m, q, k, v, mask, scaling, is_causal:
                        sdpa_attention.sdpa_attention_forward(m, q, k, v, mask, scaling=scaling, is_causal=is_causal))
    assert torch.equal(eager, run(model))


class HadamardLog(TorchDispatchMode):
    """Every spinfx::hadamard call's input shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.spinfx.hadamard.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _unrotated_cache(model):
    """The model as before: keys enter the cache unrotated and attention rotates the whole cached key
    every step (the attention modules' pre-hooks that rotate keys on write removed)."""
    for layer in model.model.layers:
        layer.self_attn._forward_pre_hooks.clear()
    return model


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_r3_rotates_keys_once_as_they_enter_the_cache(sq4, cache):
    """generate() with a DynamicCache / StaticCache: the same tokens as before (whole cached key rotated
    every step) and logits within 1e-5 (fp32 rounding: the Hadamard of a key row is the same op on the
    same values either way, but SDPA sees differently laid out keys), while the keys R3 rotates per
    decode step are the step's own — the rotated sizes no longer grow with the cache."""
    from transformers import DynamicCache, StaticCache

    from spinfx.checkpoint.hf import cache_kwarg

    zm, _, ckpt = sq4
    new, old = spinfx.load(ckpt), _unrotated_cache(spinfx.load(ckpt))
    ids = zm.example_inputs["input_ids"]
    steps = 6

    def generate(model):
        kv = (DynamicCache(config=model.config) if cache == "dynamic"
              else StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps))
        log = HadamardLog()
        with torch.no_grad(), log:
            out = model.generate(ids, **{cache_kwarg(model): kv}, max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        return out, kv, log.shapes

    got, kv, shapes = generate(new)
    ref, ref_kv, ref_shapes = generate(old)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    # the cache holds H-rotated keys: the old model's cache rotated is the new one's
    from spinfx.kernels.hadamard import hadamard
    from spinfx.kernels.hadamard_matrices import plan

    k_new, k_old = kv.layers[0].keys, ref_kv.layers[0].keys
    torch.testing.assert_close(k_new, hadamard(k_old, plan(16)), rtol=1e-5, atol=1e-6)
    # per step and layer: q [1, 4, t, 16], R4's [1, t, 96], and the keys [1, 2, t, 16] of this step only
    per_call = LAYERS * 3
    calls = [shapes[i:i + per_call] for i in range(0, len(shapes), per_call)]
    assert len(calls) == steps and all(len(c) == per_call for c in calls)
    prompt = ids.shape[1]
    assert Counter(calls[0]) == Counter({(1, 4, prompt, 16): LAYERS, (1, 2, prompt, 16): LAYERS,
                                         (1, prompt, 96): LAYERS})
    decode = Counter({(1, 4, 1, 16): LAYERS, (1, 2, 1, 16): LAYERS, (1, 1, 96): LAYERS})
    assert all(Counter(c) == decode for c in calls[1:])
    # before, the key rotation read the whole cache: all cached positions (static: every slot)
    old_keys = [s for s in ref_shapes if s[:2] == (1, 2)]
    assert old_keys[-1][2] == (prompt + steps - 1 if cache == "dynamic" else prompt + steps)


def test_r3_without_a_cache_rotates_keys_in_attention(sq4):
    """use_cache=False: no cache to rotate on write, so attention rotates q and k (both [1, h, 8, 16])."""
    zm, r, ckpt = sq4
    model = spinfx.load(ckpt)
    log = HadamardLog()
    with log:
        got = _logits(model, zm.example_inputs["input_ids"])
    assert Counter(log.shapes)[(1, 2, 8, 16)] == LAYERS and Counter(log.shapes)[(1, 4, 8, 16)] == LAYERS
    ref = _logits(r.module, zm.example_inputs["input_ids"])
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
