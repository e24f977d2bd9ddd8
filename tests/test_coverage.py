"""Architectures outside the zoo's goldens, by structure: tiny random configs of HF classes, each recipe
either certified (float64, ≤1e-10) or refused with `spinfx.Unsupported` naming why — never another
exception, never a silently different model. README's coverage table is this table."""
import pytest
import torch

import spinfx
from spinfx import zoo

SIZE = dict(vocab=128, hidden=64, intermediate=96, heads=4, kv_heads=2)  # 2 layers; GPT-NeoX has no KV heads


def _config(family: str):
    import transformers as tf

    hf = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=64)
    moe = dict(num_experts_per_tok=2, intermediate_size=40)  # 4 experts, top-2, traced densely (spinfx.moe)
    if family == "olmoe":  # q/k RMSNorm over the whole projection (all heads at once)
        return tf.OlmoeConfig(**hf | moe, num_experts=4)
    if family == "granitemoe":  # Granite's multipliers + a mixture (softmax over the top-k logits)
        return tf.GraniteMoeConfig(**hf | moe, num_local_experts=4, embedding_multiplier=2.0,
                                   residual_multiplier=0.5, logits_scaling=4.0)
    # stablelm: partial rotary, RoPE on the first quarter of each head; phi: parallel attention + MLP
    # on one LayerNorm, partial rotary (half), biases everywhere; gpt_neox: parallel residual, fused
    # q/k/v interleaved per head (spinfx.zoo.hf_config's defaults for these families)
    return zoo.hf_config(family, layers=2, **SIZE)


# family -> recipe -> "certified" or the refusal's reason (a regex)
OUTCOMES = {
    "stablelm": {"fold": "certified", "rotate": "certified", "spinquant": "certified", "w4a16": "certified"},
    "phi": {"fold": "certified", "rotate": "certified", "spinquant": "certified", "w4a16": "certified"},
    "gpt_neox": {"fold": "certified", "rotate": "R2: no attention with q/k/v projections",
                 "spinquant": "R2: no attention with q/k/v projections", "w4a16": "certified"},
    "olmoe": {"fold": "certified", "rotate": "R2: no attention with q/k/v projections",
              "spinquant": "R2: no attention with q/k/v projections", "w4a16": "certified"},
    "granitemoe": {"fold": "certified", "rotate": "certified", "spinquant": "certified", "w4a16": "certified"},
}


# A mixture's cells that others imply are not run again (its trace is the slowest): spinquant runs fold
# and R1-R2 certified (granitemoe: fold, rotate ⊂ spinquant), spinquant is refused where rotate is, at R2
# (olmoe), and w4a16 on a mixture is tested once (granitemoe; tests/test_moe.py on the zoo mixtures).
IMPLIED = {("granitemoe", "fold"), ("granitemoe", "rotate"), ("olmoe", "spinquant"), ("olmoe", "w4a16")}


@pytest.mark.parametrize("family, recipe", [(f, r) for f, rs in OUTCOMES.items() for r in rs
                                            if (f, r) not in IMPLIED])
def test_certified_or_refused_with_a_reason(family, recipe):
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa").eval()
    with torch.no_grad():  # spread the weights: HF's init (std 0.02) would hide a wrong rewrite
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    inputs = {"input_ids": torch.randint(0, 128, (1, 8)), "use_cache": False}
    want = OUTCOMES[family][recipe]
    if want != "certified":
        with pytest.raises(spinfx.Unsupported, match=want):
            spinfx.rewrite(model, recipe, inputs)
        return
    r = spinfx.rewrite(model, recipe, inputs)
    certs = [p.certificate for p in r.report.passes if p.certificate]
    assert certs and all(c["rel"] <= c["tolerance"] for c in certs)
    assert r.report.extra["linears"]["changed"] > 0
    ref = model(**inputs).logits
    got = r.module(**inputs).logits
    tol = 1e-4 if recipe != "w4a16" else 0.5  # w4a16 is certified against its dequantized weights
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= tol
