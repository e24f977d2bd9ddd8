"""Post-norm blocks (OLMo-2: the attention and MLP outputs are normalized before they are added to
the residual stream; per-projection q/k norms): fold and quantize are certified, R1 is refused naming
the post-norm. And a rewrite never hands back a program whose dtypes no longer fit together."""
import pytest
import torch

import spinfx
from spinfx.engine.certify import CertificateError
from spinfx.engine.pipeline import Pass, PassResult
from spinfx.testing.zoo import _randomize, hf_config


def olmo2(dtype=torch.float32):
    import transformers as tf

    cfg = hf_config("olmo2", layers=2, vocab=128, hidden=32, intermediate=48, heads=4, kv_heads=2)
    m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    _randomize(m, torch.Generator().manual_seed(0), "rms")  # norm scales ≠ 1: folding them shows
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    return m.to(dtype).eval(), ids


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_and_quantize_are_certified(dtype, tmp_path):
    # float64: the norm computes its core in float32 and γ (float64) promotes it back; folding γ away
    # must keep the value float64 for the linear after it ("expected m1 and m2 to have the same dtype")
    m, ids = olmo2(dtype)
    ref = m(ids).logits
    r = spinfx.rewrite(m, "fold", example_inputs=(ids,))
    # only the final norm feeds a linear (lm_head): post-norms feed the stream, q/k norms feed RoPE
    assert r.report.passes[0].certificate["rel"] <= 1e-10 and r.report.passes[0].edits == 1
    out = r.module(ids).logits
    assert out.dtype == dtype and _rel(out, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
    q = spinfx.rewrite(m, "w4a16", example_inputs=(ids,))
    cert = q.report.passes[-1].certificate
    assert cert["rel"] <= cert["tolerance"] and q.module(ids).logits.dtype == dtype
    if dtype == torch.float32:
        q.save(tmp_path / "q")  # verified by loading it back in transformers
        assert spinfx.load(tmp_path / "q")(ids).logits.shape == ref.shape


def test_r1_is_refused_naming_the_post_norm():
    m, ids = olmo2()
    with pytest.raises(spinfx.Unsupported, match=r"post_attention_layernorm.*post-norm"):
        spinfx.rewrite(m, "rotate", example_inputs=(ids,))


def test_spinquant_is_refused_for_r1_and_r4_alone_says_where_the_stream_stopped():
    # spinquant looked for R4's down projections before R1 and refused with "no MLP down projection
    # writes into the residual stream", which hid the reason (the stream stops at the first post-norm)
    from spinfx.passes import Rotate

    m, ids = olmo2()
    with pytest.raises(spinfx.Unsupported, match=r"^R1: .*post_attention_layernorm.*a post-norm writes the stream"):
        spinfx.rewrite(m, "spinquant", example_inputs=(ids,))
    r4 = spinfx.recipe.Recipe("r4", [Rotate(r1="none", r2="none", r4=True)])
    with pytest.raises(spinfx.Unsupported, match=r"^R4: .*post_attention_layernorm.*a post-norm writes the stream"):
        spinfx.rewrite(m, r4, example_inputs=(ids,))


@pytest.mark.parametrize("name", ["olmo2", "gemma2"])
def test_r2_and_r3_alone_are_certified_on_post_norm_models(name):
    # R2 (v/o per head) and R3 (q, k after RoPE) never touch the stream: with r1: none they apply
    # through OLMo-2's q/k norms over the whole projection and Gemma-2's soft-capped eager attention
    from spinfx.testing import zoo
    from spinfx.passes import FoldNorms, Rotate

    zm = zoo.build(name, dtype=torch.float64)
    recipe = spinfx.recipe.Recipe("r2r3", [FoldNorms(), Rotate(r1="none", r2="hadamard", r3=True)])
    r = spinfx.rewrite(zm.model, recipe, zm.example_inputs)
    rot = r.report.pass_result("rotate")
    assert rot.certificate["rel"] <= 1e-10
    assert rot.findings["r2"]["sites"] == rot.findings["r3"]["sites"] == zm.expect.layers
    # HF norms compute in float32 even in a float64 model: compare in float64 semantics, on fresh inputs
    from spinfx.engine.certify import compare

    assert compare(spinfx.trace(zm.model, zm.example_inputs), r.program, seeds=(7,))["max_abs"] <= 1e-9


class _Promote(torch.nn.Module):
    """y = W·(g · x.float()) with g = 1 in float64: the mul is what makes the linear's input float64."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
        self.lin = torch.nn.Linear(8, 4, dtype=torch.float64)

    def forward(self, x):
        return self.lin(self.g * x.float())


class _DropScale(Pass):
    """A wrong rewrite that is exact in float64: removes γ·x without restoring the dtype γ promoted to."""

    name = "drop-scale"
    certify = True

    def run(self, prog, ctx):
        mul = next(n for n in prog.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
        mul.replace_all_uses_with(next(a for a in mul.args if a.op != "get_attr"))
        prog.graph.erase_node(mul)
        return PassResult(self.name, {})


def test_a_rewrite_that_changes_dtypes_is_refused_not_returned():
    recipe = spinfx.recipe.Recipe("drop", [_DropScale()])
    with pytest.raises(CertificateError, match="dtype"):
        spinfx.rewrite(_Promote(), recipe, example_inputs=(torch.randn(2, 8, dtype=torch.float64),))
