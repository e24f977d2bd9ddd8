"""The shard pass and the tensor-parallel specs, in one process (ranks simulated by threads; the real
gloo runs are in test_tp_dist.py): every zoo layout exact in float64 at T = 2 and 4, quantized shards
equal to the unsharded quantized model, GQA head ownership, the row bias once, K/T % group ≠ 0 through
replicated scales, refusals in one line, and consolidate(shard(checkpoint)) bit for bit for every
tensor kind at T = 2, 4, 8."""
import pytest
import torch

import spinfx
from spinfx.checkpoint.read import read_safetensors
from spinfx.checkpoint.write import write_safetensors
from spinfx.dist import sharded
from spinfx.testing import zoo
from spinfx.kernels import tp_specs as specs
from spinfx.kernels.quant_rtn import quantize_rtn
from spinfx.kernels.quant_weight import QuantWeight, dequantize
from spinfx.passes import FoldNorms, Quantize, Rotate, Shard, shard_ranks
from spinfx.patterns.common import ALL_REDUCE
from spinfx.recipe import Recipe, load_recipe

W4 = load_recipe("w4a16").passes


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _logits_of(outs):
    return outs[0] if isinstance(outs, (tuple, list)) else outs


def _sharded_vs_unsharded(zm, passes, T):
    """(unsharded program, rank programs, max relative |Δ| of the ranks' logits on the example input)."""
    r = spinfx.rewrite(zm.model, Recipe("base", list(passes)), zm.example_inputs)
    prog = r.program
    ranks = shard_ranks.rank_programs(prog, T)
    xs = prog.flat_inputs(**zm.example_inputs)
    with torch.no_grad():
        ref = _logits_of(prog.gm(*xs))
    outs = shard_ranks.simulate(ranks, xs)
    return prog, ranks, max(_rel(_logits_of(o), ref) for o in outs)


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3", "mistral", "opt"])
def test_unquantized_float64_exact(name, T):
    zm = zoo.build(name, dtype=torch.float64)
    r = spinfx.rewrite(zm.model, Recipe("tp", [Shard(tp=T, rank=T - 1)]), zm.example_inputs)
    cert = r.report.pass_result("shard").certificate
    assert cert["rel"] <= 1e-10 and cert["ranks"] == T
    _, ranks, rel = _sharded_vs_unsharded(zm, [], T)
    assert rel <= 1e-10
    # the rank-local graph is smaller: q_proj (or the fused qkv) holds 1/T of the query rows
    e = zm.expect
    consts = ranks[0].consts()
    q = next(v for k, v in consts.items() if k.endswith(("q_proj.weight", "qkv_proj.weight")))
    kv_local = max(e.kv_heads // T, 1)
    rows = (e.heads // T) * e.head_dim + (2 * kv_local * e.head_dim if name == "phi3" else 0)
    assert q.shape[0] == rows


@pytest.mark.parametrize("name, T, passes", [
    ("llama", 4, "w4a16"),
    ("phi3", 2, "w4a16"),
    ("qwen2", 2, "spinquant-w4a16"),
    ("phi3", 4, "spinquant-w4a16"),
])
def test_quantized_equals_unsharded_quantized(name, T, passes):
    zm = zoo.build(name, dtype=torch.float64)
    inter = zm.expect.intermediate // T
    # R4 must stay rank-local: a Hadamard block dividing I/T (44 at T=2; 22 has none but 2)
    rot = [FoldNorms(), Rotate(r3=True, r4=True, r4_block=44 if inter % 44 == 0 else 2)]
    chain = (rot if passes.startswith("spinquant") else []) + list(W4)
    prog, ranks, rel = _sharded_vs_unsharded(zm, chain, T)
    assert rel <= 1e-10  # the generic qlinear is exact in float64: same packed values, same sums
    q = [n for n in ranks[0].graph.nodes if n.target is torch.ops.spinfx.qlinear.default]
    assert len(q) == zm.expect.layers * zm.expect.linears_per_layer + 1  # + the 8-bit lm_head, replicated
    assert len([n for n in ranks[0].graph.nodes if n.target is torch.ops.spinfx.qembedding.default]) == 1


def test_head_ownership_vllm_semantics():
    for h, kv in [(4, 2), (8, 2), (9, 3), (16, 4), (32, 8), (8, 8), (12, 1)]:
        for T in range(1, h + 1):
            try:
                q, k = specs.heads(h, kv, T)
            except specs.LayoutError:
                assert h % T or (T <= kv and kv % T) or (T > kv and T % kv)
                continue
            for r in range(T):
                assert q[r][1] - q[r][0] == h // T
                owners = {qh // (h // kv) for qh in range(*q[r])}  # the kv head each query head uses
                assert owners <= set(range(*k[r])), (h, kv, T, r)
                assert k[r][1] - k[r][0] == max(kv // T, 1)


@pytest.mark.parametrize("T", [2, 4])
def test_rank_holds_the_kv_heads_its_query_heads_use(T):
    zm = zoo.build("llama", dtype=torch.float64)
    prog = spinfx.trace(zm.model, zm.example_inputs)
    W = {k: v for k, v in prog.consts().items() if ".layers.0.self_attn." in k}
    e = zm.expect
    hd, rep = e.head_dim, e.heads // e.kv_heads
    for r, rp in enumerate(shard_ranks.rank_programs(prog, T)):
        c = rp.consts()
        q_heads = range(r * e.heads // T, (r + 1) * e.heads // T)
        kv_heads = sorted({h // rep for h in q_heads})
        wq = torch.cat([W["model.layers.0.self_attn.q_proj.weight"][h * hd:(h + 1) * hd] for h in q_heads])
        wk = torch.cat([W["model.layers.0.self_attn.k_proj.weight"][h * hd:(h + 1) * hd] for h in kv_heads])
        assert torch.equal(c["model.layers.0.self_attn.q_proj.weight"], wq)
        assert torch.equal(c["model.layers.0.self_attn.k_proj.weight"], wk)
        # o_proj keeps exactly the columns of the rank's query heads
        wo = W["model.layers.0.self_attn.o_proj.weight"][:, q_heads[0] * hd:(q_heads[-1] + 1) * hd]
        assert torch.equal(c["model.layers.0.self_attn.o_proj.weight"], wo)


def test_row_bias_added_exactly_once(monkeypatch):
    zm = zoo.build("opt", dtype=torch.float64)  # out_proj and fc2 carry biases
    prog = spinfx.trace(zm.model, zm.example_inputs)
    ranks = shard_ranks.rank_programs(prog, 2)
    for mod in ("self_attn.out_proj", "fc2"):
        name = f"model.decoder.layers.0.{mod}.bias"
        holders = [r for r, rp in enumerate(ranks) if name in rp.consts()]
        assert holders == [0]
        assert torch.equal(ranks[0].const(name), prog.const(name))
    for rp in ranks:
        assert sum(n.target is ALL_REDUCE for n in rp.graph.nodes) == 2 * zm.expect.layers
    # the trap: a bias kept on every rank is added T times, and the certificate says so
    from spinfx.kernels import tp_specs
    real = tp_specs.shard_tensors

    def keep_bias(lay, tensors, rank, zp_packed=True):
        out = real(lay, tensors, rank, zp_packed)
        if lay.kind == "row" and "bias" in tensors:
            out["bias"] = tensors["bias"]
        return out

    monkeypatch.setattr(tp_specs, "shard_tensors", keep_bias)
    with pytest.raises(spinfx.SpinfxError, match="changed the model's function"):
        spinfx.rewrite(zm.model, Recipe("tp", [Shard(tp=2)]), zm.example_inputs)


def test_k_over_t_not_a_multiple_of_group_uses_replicated_scales():
    # 11008 / 4 = 2752 = 21.5 groups of 128: each rank keeps all 86 scale columns and its slice of
    # the global group index
    zm = zoo.random_llama(layers=1, hidden=128, heads=4, kv_heads=2, intermediate=11008, vocab=64,
                          dtype=torch.float64)
    q = Quantize(weights={"bits": 4, "group_size": 128})
    r = spinfx.rewrite(zm.model, Recipe("w4+tp", [q, Shard(tp=4, rank=1)]), zm.example_inputs)
    sh = r.report.pass_result("shard")
    assert sh.certificate["rel"] <= 1e-10
    assert any("global group index" in n for n in sh.notes)
    c = r.program.consts()
    down = "model.layers.0.mlp.down_proj"
    assert c[f"{down}.weight_scale"].shape == (128, 86)                # replicated
    g_idx = c[f"{down}.weight_g_idx"]
    assert torch.equal(g_idx.long(), torch.arange(2752, 5504) // 128)  # rank 1's slice of the global index
    assert g_idx[0] == 21 and g_idx[-1] == 42                           # starts mid-group
    prog, _, rel = _sharded_vs_unsharded(zm, [q], 4)
    assert rel <= 1e-10


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("size, T, words", [
    (dict(heads=4, kv_heads=2), 3, ["attention heads = 4", "T = 3"]),
    (dict(hidden=96, heads=6, kv_heads=3), 2, ["kv heads = 3", "T = 2"]),
    (dict(hidden=96, heads=12, kv_heads=4), 6, ["T = 6", "kv heads = 4"]),
    (dict(heads=4, kv_heads=4, intermediate=90), 4, ["intermediate size = 90", "T = 4"]),
])
def test_unshardable_is_one_line_naming_dimension_and_t(size, T, words):
    zm = zoo.random_llama(layers=1, vocab=64, dtype=torch.float64, **size)
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("tp", [Shard(tp=T)]), zm.example_inputs)
    msg = _one_line(e)
    for w in words:
        assert w in msg, msg


def test_conv1d_linears_are_refused_in_one_line():
    zm = zoo.build("gpt2", dtype=torch.float64)
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("tp", [Shard(tp=2)]), zm.example_inputs)
    assert "addmm" in _one_line(e)


def test_split_values_follow_one_op_to_rule_table(monkeypatch):
    from spinfx.passes import shard

    table = shard.propagation()
    assert table[torch.ops.aten.transpose.int] == shard._Follower._transpose
    assert table[torch.ops.aten.silu.default] == shard._Follower._unary
    # the table decides: without transpose's rule, the head split stops there, refused by name
    monkeypatch.delitem(table, torch.ops.aten.transpose.int)
    zm = zoo.random_llama(layers=1, vocab=64, dtype=torch.float64, heads=4, kv_heads=2)
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("tp", [Shard(tp=2)]), zm.example_inputs)
    assert "aten.transpose.int" in _one_line(e) and "has no sharding rule" in _one_line(e)


def test_r4_block_that_does_not_divide_i_over_t_is_refused():
    zm = zoo.build("llama", dtype=torch.float64)
    with pytest.raises(spinfx.Unsupported) as e:
        spinfx.rewrite(zm.model, Recipe("tp", [FoldNorms(), Rotate(r4=True), Shard(tp=2)]), zm.example_inputs)
    msg = _one_line(e)
    assert "block 88" in msg and "44" in msg and "T = 2" in msg and "r4_block" in msg


# ---- specs: consolidate(shard(x)) == x, and shards mean what they say ------------------------------


def _quant_kinds(n, k, seed):
    """Compressed-tensors dicts of every layout the kernels write: sym/asym, grouped, per channel,
    act-order g_idx, 2/3/4/8 bits, with a bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(torch.bfloat16)
    out = {}
    for bits, group, sym in [(4, 32, True), (4, 32, False), (3, 16, False), (2, None, True), (8, None, False)]:
        qw = quantize_rtn(w, bits, group, sym, scale_dtype=torch.bfloat16)
        out[f"b{bits}g{group}{'s' if sym else 'a'}"] = (qw, {**qw.to_compressed_tensors(), "bias": b})
    # act-order: a permuted group index (GPTQ's layout)
    qw = quantize_rtn(w, 4, 32, False, scale_dtype=torch.bfloat16)
    perm = torch.randperm(k, generator=g)
    gi = (torch.arange(k) // 32)[perm.argsort()].to(torch.int32)
    qa = QuantWeight(qw.weight_packed, qw.weight_scale, qw.weight_zero_point, gi, 4, 32, qw.weight_shape)
    out["act_order"] = (qa, {**qa.to_compressed_tensors(), "bias": b, "input_perm": perm})
    return w, out


@pytest.mark.parametrize("T", [2, 4, 8])
def test_consolidate_shard_is_bit_exact_for_every_tensor_kind(T):
    H, KV, hd, I, K = 16, 2, 8, 96 * 8, 64  # T = 8 > KV = 2: replicated kv heads
    qr, kr = specs.heads(H, KV, T)
    hdr = lambda rs: [(a * hd, b * hd) for a, b in rs]  # noqa: E731
    fused = specs.column([("q", H * hd, hdr(qr)), ("k", KV * hd, hdr(kr)), ("v", KV * hd, hdr(kr))], T, K)
    k_only = specs.column([("k", KV * hd, hdr(kr))], T, K)
    gate_up = specs.column([("gate", I, [(r * I // T, (r + 1) * I // T) for r in range(T)]),
                            ("up", I, [(r * I // T, (r + 1) * I // T) for r in range(T)])], T, K)
    tensors, layouts, checks = {}, {}, []
    for lname, lay, n, k in [("qkv", fused, (H + 2 * KV) * hd, K), ("k", k_only, KV * hd, K),
                             ("gate_up", gate_up, 2 * I, K), ("down", specs.row(K, I, T, "I"), K, I),
                             ("down_unaligned", specs.row(K, 32 * 23, T, "I"), K, 32 * 23)]:
        w, kinds = _quant_kinds(n, k, seed=len(tensors))
        for kname, (qw, ts) in kinds.items():
            if lay.kind == "row" and "input_perm" in ts:
                ts = {k2: v for k2, v in ts.items() if k2 != "input_perm"}
            mod = f"m.{lname}.{kname}"
            layouts[mod] = lay.with_quant(qw.bits, qw.group_size, qw.weight_g_idx is not None)
            tensors.update({f"{mod}.{k2}": v for k2, v in ts.items()})
            checks.append((mod, qw, layouts[mod]))
        mod = f"m.{lname}.float"
        layouts[mod] = lay
        tensors[f"{mod}.weight"] = w.to(torch.bfloat16)
        tensors[f"{mod}.bias"] = torch.randn(n, dtype=torch.float64).to(torch.float16)
    tensors["m.embed.weight"] = torch.randn(10, K).to(torch.bfloat16)  # replicated
    assert any(l.synth_g_idx for l in layouts.values())                 # 736/T is not a multiple of 32 for any T
    ranks = sharded.shard_tensors_by_layout(tensors, layouts, T)
    back = sharded.consolidate_tensors(ranks, layouts)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # each rank's shard dequantizes to its slice of the full matrix (not merely some invertible code)
    for mod, qw, lay in checks:
        full = dequantize(qw, torch.float64)
        for r in (0, T - 1):
            pre = f"{mod}."
            local = {k[len(pre):]: v for k, v in ranks[r].items() if k.startswith(pre)}
            lq = QuantWeight.from_compressed_tensors(local, bits=qw.bits, group_size=qw.group_size)
            got = dequantize(lq, torch.float64)
            if lay.kind == "row":
                kl = lay.local_k()
                assert torch.equal(got, full[:, r * kl:(r + 1) * kl]), (mod, r)
                assert ("bias" in local) == (r == 0)
            else:
                want = torch.cat([full[a:b] for a, b in lay.rows[r]])
                assert torch.equal(got, want), (mod, r)


def test_sharded_files_consolidate_without_a_process_group(tmp_path):
    H, KV, hd, K = 4, 2, 8, 32
    qr, kr = specs.heads(H, KV, 4)
    lay = {"a.k_proj": specs.column([("k", KV * hd, [(a * hd, b * hd) for a, b in kr])], 4, K),
           "a.o_proj": specs.row(K, H * hd, 4, "K")}
    tensors = {"a.k_proj.weight": torch.randn(KV * hd, K), "a.k_proj.bias": torch.randn(KV * hd),
               "a.o_proj.weight": torch.randn(K, H * hd).double(), "a.o_proj.bias": torch.randn(K),
               "norm.weight": torch.randn(K).half()}
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(tensors, src)
    (src / "config.json").write_text("{}")
    out = sharded.shard_checkpoint(src, tmp_path / "tp4", 4, lay)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model.rank0{r}-of-04.safetensors" for r in range(4)]
    assert (out / "config.json").is_file() and (out / sharded.META).is_file()
    back = sharded.consolidate(out, tmp_path / "back")
    got = read_safetensors(back)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    with pytest.raises(spinfx.BadInput, match="exists"):
        sharded.consolidate(out, tmp_path / "back")


def test_cli_rewrite_tp_then_consolidate_is_the_unsharded_checkpoint(tmp_path):
    from spinfx.tools.cli import main

    zm = zoo.build("qwen2", layers=1)
    zm.model.save_pretrained(tmp_path / "src")
    src = str(tmp_path / "src")
    assert main(["rewrite", src, "--recipe", "w4a16", "--out", str(tmp_path / "tp4"), "--tp", "4"]) == 0
    assert main(["rewrite", src, "--recipe", "w4a16", "--out", str(tmp_path / "one")]) == 0
    assert main(["consolidate", str(tmp_path / "tp4"), "--out", str(tmp_path / "back")]) == 0
    ranks = sorted(p.name for p in (tmp_path / "tp4").glob("*.safetensors"))
    assert ranks == [f"model.rank0{r}-of-04.safetensors" for r in range(4)]
    one, back = read_safetensors(tmp_path / "one"), read_safetensors(tmp_path / "back")
    assert set(one) == set(back) and any(k.endswith("weight_packed") for k in one)
    for k, v in one.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
    # unshardable: exit code 3, one line
    assert main(["rewrite", src, "--recipe", "w4a16", "--out", str(tmp_path / "tp3"), "--tp", "3"]) == 3
    assert not (tmp_path / "tp3").exists()

