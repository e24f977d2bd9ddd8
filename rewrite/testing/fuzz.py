"""Fuzzing: random small configs of every supported HF family, each preset certified or refused.

A case is one random configuration of one family (`FAMILIES`): sizes (heads, KV heads, head_dim,
hidden, intermediate, layers, vocab), a tied or untied embedding, and the options the family's HF
config has (biases, partial rotary, norm placement, parallel blocks, activation, multipliers...).
`run_case` builds the model in float64 (`spinfx.testing.zoo`: seeded random weights, no ones and zeros),
traces it once, runs every preset on a copy of the trace, and classifies each:

    certified   the rewritten program equals, in float64 semantics (`float64_semantics`: every cast to
                a lower float precision promoted, as the certificates run a graph) on the traced
                inputs and on a second batch,
                the original HF model (exact presets: fold, rotate, spinquant), or the original HF
                model with every quantized weight replaced by dequantize(Q(W)) (w4a16), within 1e-10
                relative to the largest logit
    refused     `spinfx.Unsupported` (its first line is the reason)
    crash       any other exception (CertificateError included: a rewrite the engine could not certify)
    wrong       the rewrite returned a program whose numbers differ (max |Δ| / max |ref| > 1e-10)

The reference is the HF module itself, not the trace, so a tracing or certificate mistake cannot hide.
Cases are drawn through a `draw(label, choices)` callable, so one definition of the space serves
hypothesis (tests/test_fuzz.py: `data.draw(st.sampled_from(choices))`, shrinking included) and a seeded
`random.Random` (bench/fuzz_long.py). A new family is one `Family` entry here plus its config factory
in `spinfx.testing.zoo` (e.g. a MoE family: `Family("mixtral", ..., options=(("num_local_experts", (2, 4)),
("num_experts_per_tok", lambda s: ...)))`).
"""
from __future__ import annotations

import contextlib
import random
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from spinfx.testing import zoo
from spinfx.engine.certify import _promote  # float32/16/bf16 -> float64, as the certificates promote a graph
from spinfx.engine.errors import Unsupported

RECIPES = ("fold", "rotate", "spinquant", "w4a16")
EXACT = 1e-10
KINDS = ("certified", "refused", "crash", "wrong")

Draw = Callable[[str, Sequence], Any]  # draw(label, choices) -> one of choices

BOOL = (False, True)
EXPERTS = (2, 3, 4)
HEAD_DIMS = (8, 12, 16, 20, 24, 32)
HEADS = (1, 2, 3, 4, 6, 8)
HIDDENS = (16, 24, 32, 48, 64)        # families whose config has head_dim (else hidden = heads · head_dim)
INTERMEDIATES = (16, 24, 40, 64, 88, 96, 128)
VOCABS = (64, 96, 128)
ACTS = ("silu", "gelu", "relu")
# RoPE variants (they change cos/sin only). Not "dynamic": its frequency update branches on
# max(position_ids), which torch.export refuses to guard on (tests/test_fuzz.py, an expected failure).
ROPES = (None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0})


def _top_k(s: dict) -> list[int]:
    """Experts per token: one, two, or every expert of the layer (its count, an option drawn before)."""
    experts = s.get("num_local_experts") or s["num_experts"]
    return sorted({k for k in (1, 2, experts) if k <= experts})


def _rotary(s: dict) -> list[float]:
    """Partial rotary fractions whose rotary dims are a whole, even, nonzero number of head dims."""
    return [f for f in (0.25, 0.5, 0.75, 1.0) if (s["head_dim"] * f).is_integer() and int(s["head_dim"] * f) % 2 == 0]


@dataclass(frozen=True)
class Family:
    """One HF family as the fuzzer varies it (its config factory: `spinfx.testing.zoo.hf_config(name, ...)`)."""

    name: str
    free_head_dim: bool        # the config has head_dim (else head_dim = hidden / heads)
    kv_heads: bool             # num_key_value_heads is an option (GQA / MQA)
    options: tuple = ()        # (HF config keyword, choices) in draw order; choices(sizes + options drawn so far)
    note: str = ""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", True, True, (("attention_bias", BOOL), ("mlp_bias", BOOL), ("hidden_act", ACTS),
                                 ("rope_parameters", ROPES))),
    Family("mistral", True, True, (("sliding_window", (None, 4)), ("hidden_act", ACTS))),
    Family("qwen2", False, True, (("hidden_act", ACTS),), "q/k/v biases always"),
    Family("qwen3", True, True, (("attention_bias", BOOL), ("hidden_act", ACTS)), "per-head q/k RMSNorm"),
    Family("granite", False, True, (("attention_bias", BOOL), ("mlp_bias", BOOL), ("hidden_act", ACTS),
                                    ("embedding_multiplier", (1.0, 2.0, 12.0)),
                                    ("residual_multiplier", (0.22, 0.5, 1.0)),
                                    ("attention_multiplier", (0.015625, 0.2)), ("logits_scaling", (1.0, 4.0, 8.0)))),
    Family("gemma", True, True, (("attention_bias", BOOL), ("hidden_activation", ("gelu_pytorch_tanh", "gelu"))),
           "RMSNorm x·(1 + w), embeddings · sqrt(hidden)"),
    Family("phi3", False, True, (("partial_rotary_factor", _rotary), ("hidden_act", ACTS)),
           "fused q/k/v and gate/up"),
    Family("olmo2", False, True, (("attention_bias", BOOL), ("hidden_act", ACTS)), "post-norms, q/k norms"),
    Family("opt", False, False, (("enable_bias", BOOL), ("do_layer_norm_before", BOOL),
                                 ("layer_norm_elementwise_affine", BOOL), ("activation_function", ("relu", "gelu")),
                                 ("word_embed_proj_dim", lambda s: (s["hidden"], s["hidden"] // 2)))),
    Family("gpt2", False, False, (("activation_function", ("gelu_new", "relu")),
                                  ("scale_attn_by_inverse_layer_idx", BOOL)), "Conv1D linears"),
    Family("stablelm", False, True, (("partial_rotary_factor", _rotary), ("use_qkv_bias", BOOL),
                                     ("qk_layernorm", BOOL), ("use_parallel_residual", BOOL), ("hidden_act", ACTS))),
    Family("phi", False, True, (("partial_rotary_factor", _rotary), ("qk_layernorm", BOOL),
                                ("hidden_act", ("gelu_new", "gelu"))), "parallel attention + MLP"),
    Family("gpt_neox", False, False, (("rotary_pct", _rotary), ("use_parallel_residual", BOOL),
                                      ("attention_bias", BOOL), ("hidden_act", ("gelu", "gelu_new")))),
    # mixtures of experts (traced densely, spinfx.checkpoint.moe): `intermediate` is each expert's
    Family("mixtral", True, True, (("num_local_experts", EXPERTS), ("num_experts_per_tok", _top_k),
                                   ("hidden_act", ACTS)), "router + experts, softmax then top-k"),
    Family("qwen3_moe", True, True, (("num_experts", EXPERTS), ("num_experts_per_tok", _top_k),
                                     ("norm_topk_prob", BOOL), ("mlp_only_layers", ([], [0])),
                                     ("attention_bias", BOOL)), "per-head q/k norms; layer 0 dense or a mixture"),
    Family("olmoe", False, True, (("num_experts", EXPERTS), ("num_experts_per_tok", _top_k), ("norm_topk_prob", BOOL)),
           "q/k RMSNorm over the whole projection"),
    Family("granitemoe", False, True, (("num_local_experts", EXPERTS), ("num_experts_per_tok", _top_k),
                                       ("residual_multiplier", (0.22, 1.0)), ("logits_scaling", (1.0, 4.0))),
           "Granite's multipliers, softmax over the top-k logits"),
)}


@dataclass(frozen=True)
class Case:
    """One random model: `config()` is its HF config, `model()` its float64 weights, `inputs()` its ids."""

    family: str
    layers: int
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    options: tuple = ()  # ((HF config keyword, value), ...)
    batch: int = 1
    seq: int = 8
    seed: int = 0

    def config(self):
        f = FAMILIES[self.family]
        kw = dict(vocab=self.vocab, hidden=self.hidden, heads=self.heads, intermediate=self.intermediate,
                  tied=self.tied, **dict(self.options))
        if f.kv_heads:
            kw["kv_heads"] = self.kv_heads
        if f.free_head_dim:
            kw["head_dim"] = self.head_dim
        return zoo.hf_config(self.family, self.layers, **kw)

    def model(self) -> torch.nn.Module:
        return zoo.from_config(self.config(), seed=self.seed, dtype=torch.float64)

    def inputs(self, which: int = 0) -> dict:
        g = torch.Generator().manual_seed(1000 * self.seed + 1 + which)
        return {"input_ids": torch.randint(0, self.vocab, (self.batch, self.seq), generator=g), "use_cache": False}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{**d, "options": tuple(d.get("options", {}).items())})

    def __str__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options)
        return (f"{self.family}(layers={self.layers}, vocab={self.vocab}, hidden={self.hidden}, heads={self.heads}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, intermediate={self.intermediate}, "
                f"tied={self.tied}{opts}; ids {self.batch}x{self.seq}, seed {self.seed})")


def draw_case(draw: Draw, families: Sequence[str] | None = None) -> Case:
    """One case, every choice made by `draw(label, choices)` (hypothesis or a seeded Random)."""
    fam = FAMILIES[draw("family", list(families or FAMILIES))]
    heads = draw("heads", HEADS)
    if fam.free_head_dim:
        head_dim = draw("head_dim", [d for d in HEAD_DIMS if heads * d <= 128])
        hidden = draw("hidden", [h for h in HIDDENS if h % heads == 0])  # transformers insists, head_dim or not
    else:  # hidden = heads · head_dim, kept within 16..64
        head_dim = draw("head_dim", [d for d in HEAD_DIMS if 16 <= heads * d <= 64])
        hidden = heads * head_dim
    kv_heads = draw("kv_heads", [k for k in range(1, heads + 1) if heads % k == 0]) if fam.kv_heads else heads
    sizes = dict(family=fam.name, layers=draw("layers", (1, 2)), vocab=draw("vocab", VOCABS), hidden=hidden,
                 heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=draw("intermediate", INTERMEDIATES),
                 tied=draw("tied", BOOL))
    options = []
    for key, choices in fam.options:
        options.append((key, draw(key, list(choices(sizes | dict(options)) if callable(choices) else choices))))
    return Case(**sizes, options=tuple(options), batch=draw("batch", (1, 2)), seq=draw("seq", (5, 8)),
                seed=draw("seed", range(1000)))


def random_case(rng: random.Random, families: Sequence[str] | None = None) -> Case:
    return draw_case(lambda label, choices: rng.choice(list(choices)), families)


# ---- running one case --------------------------------------------------------------------------------


@dataclass
class Outcome:
    recipe: str
    kind: str                   # certified | refused | crash | wrong
    detail: str = ""            # the refusal's reason, the exception, or the numbers
    rel: float | None = None    # max |Δ| / max |ref| against the reference (certified, wrong)
    trace: str = field(default="", repr=False)  # the traceback's last lines (crash)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _crash(recipe: str, e: BaseException, where: str = "") -> Outcome:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)).strip().splitlines()
    return Outcome(recipe, "crash", where + _first_line(e), trace="\n".join(tb[-12:]))


class _Float64(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map(_promote, (args, kwargs or {}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_semantics():
    """Run eager code (an HF model, a rewritten program) the way `spinfx.engine.certify` runs a graph in
    float64: every op asked for a lower float dtype (HF norms and RoPE cast to float32 on purpose)
    gets float64 instead, and new float tensors default to float64. Without it a float64 HF model
    still normalizes in float32, and R1 (which changes what the norm sees) moves its rounding by ~1e-7."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _Float64():
            yield
    finally:
        torch.set_default_dtype(default)


def _logits(module, inputs: dict, weights: dict | None = None) -> torch.Tensor:
    with torch.no_grad(), float64_semantics():
        out = torch.func.functional_call(module, weights, (), inputs) if weights else module(**inputs)
    return (out.logits if hasattr(out, "logits") else out["logits"]).double()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return ((got - want).abs().max() / want.abs().max()).item()


def dequantized_weights(model: torch.nn.Module, prog) -> dict[str, torch.Tensor]:
    """{parameter name of `model`: dequantize(Q(W))} for every weight the quantize pass replaced in `prog`
    (for `torch.func.functional_call(model, ...)`: the model itself is left as it is). An expert's
    weight (`<experts>.<e>.<w>.weight` in the program, spinfx.checkpoint.moe) goes into slice e of a copy of the
    stacked parameter `<experts>.<w>`, which transformers' own experts forward then reads."""
    from transformers.pytorch_utils import Conv1D

    from spinfx.kernels.quant_weight import dequantize
    from spinfx.checkpoint.moe import expert_linears
    from spinfx.passes.quantize import quantized_layers

    out = {}
    experts = expert_linears(model)
    for layer in quantized_layers(prog).values():
        w_hat = dequantize(layer.weight, torch.float64)
        module = layer.source.rpartition(".")[0]
        if module in experts:
            name, w, e = experts[module]
            stacked = out.setdefault(f"{name}.{w}", getattr(model.get_submodule(name), w).detach().double().clone())
            stacked[e] = w_hat
            continue
        owner = model.get_submodule(module)
        out[layer.source] = w_hat.T if isinstance(owner, Conv1D) else w_hat  # Conv1D stores W as [in, out]
    return out


def run_case(case: Case, recipes: Sequence = RECIPES) -> list[Outcome]:
    """Every recipe on `case`, classified (module docstring). The model is built and traced once; each
    recipe runs on a copy of the trace, as `spinfx.rewrite` would on a fresh one."""
    from spinfx.api import RewrittenModule, apply_recipe, load

    model = case.model()
    batches = [case.inputs(0), case.inputs(1)]
    refs = [_logits(model, b) for b in batches]
    try:
        prog, _ = load(model, batches[0])
    except Unsupported as e:
        return [Outcome(str(r), "refused", _first_line(e)) for r in recipes]
    except Exception as e:  # noqa: BLE001  (classifying is the point)
        return [_crash(str(r), e, "trace: ") for r in recipes]
    out = []
    for recipe in recipes:
        name = recipe if isinstance(recipe, str) else getattr(recipe, "name", str(recipe))
        p = prog.clone()
        try:
            apply_recipe(p, recipe)
        except Unsupported as e:
            out.append(Outcome(name, "refused", _first_line(e)))
            continue
        except Exception as e:  # noqa: BLE001
            out.append(_crash(name, e))
            continue
        try:
            quantized = bool(p.meta.get("quant"))
            want = [_logits(model, b, dequantized_weights(model, p)) for b in batches] if quantized else refs
            rewritten = RewrittenModule(p)
            rel = max(_rel(_logits(rewritten, b), w) for b, w in zip(batches, want))
        except Exception as e:  # noqa: BLE001
            out.append(_crash(name, e, "running the result: "))
            continue
        against = "its dequantized reference" if quantized else "the original model"
        if rel <= EXACT:
            out.append(Outcome(name, "certified", f"rel {rel:.1e} against {against}", rel))
        else:
            out.append(Outcome(name, "wrong", f"rel {rel:.3e} > {EXACT:.0e} against {against}", rel))
    return out


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.kind in ("crash", "wrong")]
