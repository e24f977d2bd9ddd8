"""quantize: every linear becomes one `spinfx::qlinear` node with packed 2/3/4/8-bit weights.

    aten.linear(x, W, b)            ⇒  spinfx.qlinear(x, $m.weight_packed, $m.weight_scale,
    aten.addmm(b, x, W[in, out])    ⇒                 $m.weight_zero_point?, $m.weight_g_idx?, b, bits, group)
    aten.embedding(E, ids)          ⇒  spinfx.qembedding(ids, $e.weight_packed, $e.weight_scale,
                                                         $e.weight_zero_point?, bits, group)   (`embedding:`)

`m` is the linear's original module path (node meta "module"), so the new constants are named like a
compressed-tensors `pack-quantized` module's tensors and checkpoints mirror the graph. The graph keeps
this generic, device-independent op; `lower-qlinear` turns it into the CPU fast paths for execution.

Options (the recipe's words):
  weights      {bits: 4, group_size: 128, symmetric: true, method: rtn|gptq, act_order: false, damp: 0.01,
               clip: minmax|mse, target: quantized|float|original, target_damp: 0.1}  (GPTQ's target: TARGETS)
               group_size null = per channel. A layer whose K is not a multiple of the group takes the
               largest smaller one of 128, 64, 32 that divides K (SmolLM2's 576: 128 → 64), else per
               channel; the report says so.
  ignore       module names kept in float (default [lm_head]).
  router       false (default): a mixture of experts' routers stay in float (`patterns.moe`: the linear
               whose logits pick the top-k experts — a rounding there changes which experts run);
               true: quantized like every other linear.
  embedding    {bits: 8}: also quantize the token embedding table (`patterns.residual.token_embedding`),
               RTN, per row (group_size null, the default here) or group-wise ({bits: 4, group_size: 64}).
  lm_head      {bits: 8}: also quantize the lm_head — the linear producing the logits, found by structure
               (`patterns.residual.output_linear`), whatever its name and even if `ignore` names it —
               RTN, per output channel by default. Both are weight-only (no activation quantizer) and
               take the weight options of `weights:` (method rtn only). A tied pair (the lm_head reads
               the embedding's table) is one matrix: quantized once, read by spinfx.qembedding and
               spinfx.qlinear both, so its two options must be equal (or untie it: fold-norms tie: untie).
  overrides    [{pattern: "re:.*down_proj", bits: 8, ...}]: weight options per module, applied in order.
               A name is a module path or its last dotted parts ("down_proj", "mlp.down_proj");
               "re:<regex>" must match the whole path. Matched against the ORIGINAL module paths.
  activations  {bits: 8|4, symmetric: true, clip_ratio: 1.0}: per-token fake quantization of the quantized
               linears' inputs (`passes.actquant`); clip_ratio c ∈ (0, 1] shrinks each token's range to c
               times its own (QuaRot: 0.9).
  kv_cache     {bits: 4, symmetric: false, clip_ratio: 1.0}: per-head, per-token fake quantization of
               attention's k, v (QuaRot's clip ratio: 0.95).
  samples      calibration windows GPTQ uses (default 128), cut from `ctx.calib` (a 1-D token tensor).

Certificate (float64, ≤ 1e-10): the result equals the *input* program with every quantized W (embedding
table included) replaced by dequantize(Q(W)) (activation quantizers included on both sides): packing, op
and wiring are exact. What quantizing costs is reported per layer: ‖W − Ŵ‖/‖W‖, and for GPTQ the output
error on the calibration inputs next to the one RTN would give.

Drivers read `quantized_layers(prog)` → {module: QuantLayer}: the `QuantWeight` a checkpoint stores
(`QuantWeight.to_compressed_tensors()`), the float weight it replaced, method and errors. It lives in
`prog.meta["quant"]` and survives `lower-qlinear`, which swaps the graph's tensors for runtime-packed ones.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported
from spinfx.engine.graph import Program, add_const, drop_const
from spinfx.kernels.gptq import CrossAccumulator, HessianAccumulator, gptq_quantize_siblings, hessian_factor
from spinfx.kernels.hadamard import hadamard_by_gemm
import spinfx.kernels.qembedding  # noqa: F401  (registers spinfx::qembedding)
from spinfx.kernels.qlinear import generic_attrs, generic_tensors, plan_qlinear  # registers spinfx::qlinear*
from spinfx.kernels.quant_pack import rows_per_chunk
from spinfx.kernels.quant_rtn import group_for, quantize_rtn
from spinfx.kernels.quant_weight import QuantWeight, dequantize
from spinfx.engine.match import describe, find_all
from spinfx.passes.actquant import KINDS, check_bits, check_clip, quantize_inputs, quantize_kv, quantizer_outputs
from spinfx.passes.options import check_fields, check_rounding
from spinfx.patterns.common import EMBEDDING, LINEAR, linear_node
from spinfx.patterns.moe import routers
from spinfx.patterns.residual import output_linear, token_embedding
from spinfx.passes.calibration import THREADED as _THREADED, restore_threads as _restore_threads
from spinfx.passes.calibration import check_calibration, token_batches
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.engine.rule import Rule, apply_rules

EXACT = 1e-10


# ---- options ----------------------------------------------------------------------------------------


# GPTQ's target: which outputs Ŵ·x_q should reproduce, x_q being the input the already-quantized layers give.
#   quantized: W·x_q (plain sequential GPTQ: min ‖(W − Ŵ)X_q‖);
#   float:     W·x_f, the float model's own output (min ‖W·X_f − Ŵ·X_q‖, the earlier layers' error compensated):
#              = GPTQ of W* = W + W(Cᵀ − H)(H + λI)⁻¹ with H = X_qᵀX_q, C = X_qᵀX_f (exact for λ = 0).
#              λ = target_damp · mean(diag H): a ridge that shrinks W* toward W where the calibration tokens say
#              little (W* is a regression on K inputs: 16 windows × 512 tokens are few for K = 1536); SmolLM2
#              Hamlet 16×512, 16 windows: 0.01 → 45.36, 0.1 → 44.87 (bench/README.md "target_damp").
#              With activation / KV quantizers, X_f is the input the float weights give *through those
#              quantizers* (only the weights' error is compensated).
#   original:  as float, with X_f the original model's input — float weights and float activations / KV (the
#              quantizers skipped in the float program): Ŵ also compensates what the activation and KV
#              rounding changed before it. The same as float without activation / KV quantizers.
TARGETS = ("quantized", "float", "original")


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized (the `weights:` options)."""

    bits: int = 4
    group_size: int | None = 128  # None: per channel
    symmetric: bool = True
    method: str = "rtn"           # "rtn" | "gptq"
    act_order: bool = False       # GPTQ: process columns by decreasing Hessian diagonal (g_idx layout)
    damp: float = 0.01            # GPTQ: H += damp · mean(diag H) · I
    clip: str = "minmax"          # "minmax" | "mse": each group's range shrunk to its least squared error
    target: str = "quantized"     # GPTQ: the outputs Ŵ reproduces, see TARGETS
    target_damp: float = 0.1      # target: float / original — W*'s ridge λ = target_damp · mean(diag H), see TARGETS

    def updated(self, opts: dict, where: str) -> Scheme:
        known = {f.name for f in dataclasses.fields(self)}
        bad = set(opts) - known
        if bad:
            raise BadInput(f"quantize: {where} has no option(s) {', '.join(sorted(bad))}; "
                           f"weight options: {', '.join(sorted(known))}")
        s = dataclasses.replace(self, **opts)
        check_fields(s, f"quantize: {where}")
        check_rounding(dataclasses.asdict(s), f"quantize: {where}")
        if s.method not in ("rtn", "gptq"):
            raise BadInput(f"quantize: {where}: method must be 'rtn' or 'gptq', got {s.method!r}")
        if s.target not in TARGETS:
            raise BadInput(f"quantize: {where}: target must be one of {', '.join(TARGETS)}, got {s.target!r}")
        if not s.target_damp > 0:
            raise BadInput(f"quantize: {where}: target_damp must be a positive number, got {s.target_damp!r}")
        return s


def name_matches(pattern: str, module: str) -> bool:
    """`re:<regex>` matches the whole module path; a plain name is the path or its last dotted parts."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)


# ---- what the pass leaves for drivers ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantLayer:
    """One quantized weight, as drivers need it."""

    weight: QuantWeight            # what a checkpoint stores: weight.to_compressed_tensors()
    source: str                    # FQN of the float weight it replaced
    method: str                    # "rtn" | "gptq"
    error: float                   # ‖W − Ŵ‖ / ‖W‖
    input_bits: int | None = None  # per-token activation fake quantization of its input (None: float)
    input_symmetric: bool = True   # … symmetric or asymmetric (`activations: {symmetric}`)
    input_clip: float = 1.0        # … its clip ratio (`activations: {clip_ratio}`)
    output_error: float | None = None      # GPTQ: ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ on the calibration inputs X
    rtn_output_error: float | None = None  # the same for the RTN weight (what GPTQ improved on)
    embedding: bool = False        # the token embedding table (read by spinfx.qembedding)
    tied: tuple[str, ...] = ()     # modules of the linears reading this same matrix (a tied lm_head)
    router: bool = False           # a mixture of experts' router (`patterns.moe`; quantized with router: true)
    clip: str = "minmax"           # how each group's range was chosen (`Scheme.clip`)

    def to_dict(self) -> dict:
        qw = self.weight
        d = {"bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.symmetric,
             "act_order": qw.weight_g_idx is not None, "method": self.method, "shape": list(qw.weight_shape),
             "error": round(self.error, 6), "bits_per_weight": round(qw.bits_per_weight(), 4)}
        if self.embedding:
            d["embedding"] = True
        if self.tied:
            d["tied"] = list(self.tied)
        if self.router:
            d["router"] = True
        if self.clip != "minmax":
            d["clip"] = self.clip
        if self.input_bits is not None:
            d["input_bits"] = self.input_bits
            if not self.input_symmetric:
                d["input_symmetric"] = False
            if self.input_clip != 1.0:
                d["input_clip_ratio"] = self.input_clip
        if self.output_error is not None:
            d["output_error"] = round(self.output_error, 6)
            d["rtn_output_error"] = round(self.rtn_output_error, 6)
        return d


def quantized_layers(prog: Program) -> dict[str, QuantLayer]:
    """{original module path: QuantLayer} of every weight the quantize pass replaced."""
    return prog.meta.get("quant", {})


@dataclass(eq=False)
class _Layer:
    """One float weight to quantize and the linears that read it."""

    weight: str               # FQN of the float weight
    module: str               # module path of the first linear reading it: names the new tensors
    nodes: list[fx.Node]      # the linears reading it
    transposed: bool          # Conv1D addmm: W is stored [in, out]
    scheme: Scheme
    group_size: int | None = None  # after the fallback rule
    table: fx.Node | None = None   # the aten.embedding reading the same matrix ([V, D]: rows = tokens)

    def x_arg(self) -> int:
        return 1 if self.transposed else 0

    def w_arg(self) -> int:
        return 2 if self.transposed else 1

    def bias(self, node: fx.Node) -> fx.Node | None:
        if self.transposed:
            return node.args[0]
        return node.args[2] if len(node.args) > 2 else None

    def readers(self) -> list[tuple[fx.Node, int]]:
        """(node, index of its weight argument) for every node reading the weight."""
        return [(n, self.w_arg()) for n in self.nodes] + ([(self.table, 0)] if self.table is not None else [])

    def weight_node(self) -> fx.Node:
        node, i = self.readers()[0]
        return node.args[i]

    def master(self, prog: Program) -> torch.Tensor:
        """W as [out, in] (float64 during a pipeline run)."""
        w = prog.const(self.weight)
        return w.T if self.transposed else w

    def storage_dtype(self, prog: Program) -> torch.dtype:
        """The weight's dtype in the model; a constant a pass added (fold-norms' untied lm_head) has none
        recorded and takes the model's dtype, as `finalize` gives it — not its float64 master's."""
        from spinfx.engine.certify import model_dtype

        dtypes = prog.meta.get("dtypes", {})
        if self.weight in dtypes:
            return dtypes[self.weight]
        return model_dtype(prog) if dtypes else prog.const(self.weight).dtype


# ---- the pass -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    calibration_words: ClassVar[tuple[str, str]] = ("quantize: method gptq", "quantize: samples")  # for messages
    certify = False  # certified inside run(), against the dequantized reference (module docstring)
    changes_weights = True
    weights: dict = field(default_factory=dict)
    ignore: list = field(default_factory=lambda: ["lm_head"])
    overrides: list = field(default_factory=list)
    activations: dict | None = None
    kv_cache: dict | None = None
    embedding: dict | None = None
    lm_head: dict | None = None
    router: bool = False
    samples: int = 128

    def validate(self) -> None:
        """Every option's type and value, before any work (the graph-dependent checks stay in `run`)."""
        if not isinstance(self.weights, dict):
            raise BadInput(f"quantize: weights takes {{bits: 4, group_size: 128, ...}}, got {self.weights!r}")
        base = Scheme().updated(dict(self.weights), "weights")
        targets = {base.target}
        for o in self.overrides:
            if not isinstance(o, dict) or not isinstance(o.get("pattern"), str):
                raise BadInput(f"quantize: each override is {{pattern: NAME, <weight options>}}, got {o!r}")
            targets.add(base.updated({k: v for k, v in o.items() if k != "pattern"}, f"override {o['pattern']!r}").target)
        if {"float", "original"} <= targets:
            raise BadInput("quantize: GPTQ targets float and original in one recipe: the float program runs once, "
                           "with or without the activation quantizers — choose one")
        bad = [p for p in self.ignore if not isinstance(p, str)] if isinstance(self.ignore, (list, tuple)) else []
        if bad:
            raise BadInput(f"quantize: ignore lists module names (or 're:<regex>'), got {bad[0]!r}")
        for what, opts in (("activations", self.activations), ("kv_cache", self.kv_cache)):
            if opts is not None:
                _only(opts, {"bits", "symmetric", "clip_ratio"}, what)
                check_bits(opts.get("bits"), what)
                if not isinstance(opts.get("symmetric", False), bool):
                    raise BadInput(f"quantize: {what} symmetric must be true or false, got {opts['symmetric']!r}")
                check_clip(opts.get("clip_ratio", 1.0), what)
        self._end_scheme(self.embedding, "embedding")
        self._end_scheme(self.lm_head, "lm_head")
        check_fields(self, self.name)  # the rest (ignore, samples) by type; the options above said what they take
        if self.samples < 1:
            raise BadInput(f"quantize: samples (calibration windows) must be a positive integer, got {self.samples}")

    def calibration_windows(self) -> int:
        methods = [self.weights.get("method")] + [o.get("method") for o in self.overrides if isinstance(o, dict)]
        return self.samples if "gptq" in methods else 0

    def streams(self) -> bool:
        return not self.calibration_windows()  # RTN: per group of one row of one tensor

    def run(self, prog: Program, ctx: Context) -> PassResult:
        from spinfx.engine.certify import certify_equal

        res = PassResult(self.name, self.options())
        head = output_linear(prog.graph) if self.lm_head is not None else None
        moe_routers = routers(prog.graph)
        floats = set() if self.router else moe_routers
        layers, ignored = self._layers(prog, find_all(LINEAR, prog.graph)[0], res, skip=head, floats=floats)
        if ignored:
            res.notes.append(f"kept in float (ignore): {', '.join(sorted(set(ignored)))}")
        if floats:
            res.notes.append(f"kept in float (MoE routers; router: true quantizes them): "
                             f"{_examples(sorted(_module(n) for n in floats))}")
        inputs = self._quantize_activations(prog, layers, res)
        ends = self._ends(prog, head, res)  # embedding table / lm_head: weight-only

        t0 = time.perf_counter()
        gptq = [l for l in layers if l.scheme.method == "gptq"]
        done = _calibrate(prog, gptq, self._calibration(prog, ctx), ctx.progress, res) if gptq else {}
        st = _Subst(prog, prog.clone(), done, inputs, moe_routers, set(ends), seconds=time.perf_counter() - t0)
        # the substitution rules: the layers' linears, then the ends (embedding table, lm_head) by their options
        for rules, ls in ((LINEAR_RULES, layers), (END_RULES, ends)):
            st.layers = {n: l for l in ls for n in [*l.nodes, *([l.table] if l.table is not None else [])]}
            if ls or rules is LINEAR_RULES:
                res.rules += apply_rules(prog.gm, rules, st, max_sweeps=1).values()
        res.findings["seconds_quantizing"] = round(st.seconds, 2)
        cert = certify_equal(st.reference, prog, EXACT, what=f"{self.name} (qlinear against its dequantized weights)")
        cert["reference"] = "the input program with each quantized W replaced by dequantize(Q(W))"
        res.certificate = cert

        out = st.out
        prog.meta["quant"] = {**quantized_layers(prog), **out}
        _summarize(out, res)
        _say_ends(ends, out, res)
        return res

    # -- which weights, how ---------------------------------------------------------------------------
    def _layers(self, prog: Program, matches: list, res: PassResult, skip: fx.Node | None = None,
                floats: set = frozenset()) -> tuple[list[_Layer], list[str]]:
        base = Scheme().updated(dict(self.weights), "weights")  # options were checked when built (validate)
        by_weight: dict[str, _Layer] = {}
        ignored: list[str] = []
        for m in matches:
            node, transposed = linear_node(m)
            if node is skip or node in floats:  # the lm_head, quantized by its own option (_ends); routers
                continue
            w = node.args[2 if transposed else 1].target
            module = node.meta.get("module") or w.rsplit(".", 1)[0]
            if any(name_matches(p, module) for p in self.ignore):
                ignored.append(module)
            elif w in by_weight:
                by_weight[w].nodes.append(node)
            else:
                scheme = base
                for o in self.overrides:
                    if name_matches(o["pattern"], module):
                        scheme = scheme.updated({k: v for k, v in o.items() if k != "pattern"}, o["pattern"])
                by_weight[w] = _Layer(w, module, [node], transposed, scheme)
        fallbacks: dict[tuple, list[str]] = defaultdict(list)
        for l in by_weight.values():
            _fall_back(prog, l, fallbacks)
            if l.scheme.method == "gptq" and len(l.nodes) > 1:
                l.scheme = dataclasses.replace(l.scheme, method="rtn")
                res.notes.append(f"{l.module}: its weight is read by {len(l.nodes)} linears with different "
                                 f"inputs; quantized with RTN (GPTQ needs one input distribution)")
        _note_fallbacks(fallbacks, res)
        return list(by_weight.values()), ignored

    def _ends(self, prog: Program, head: fx.Node | None, res: PassResult) -> list[_Layer]:
        """The token embedding table and the lm_head, each quantized by its own option (`embedding:`,
        `lm_head:`): one layer per matrix, so a tied pair — the lm_head reading the embedding's table —
        is one layer whose readers are both."""
        if self.embedding is None and self.lm_head is None:
            return []
        g = prog.graph
        emb = token_embedding(g)
        head = head if head is not None else output_linear(g)
        e_scheme = self._end_scheme(self.embedding, "embedding")
        h_scheme = self._end_scheme(self.lm_head, "lm_head")
        if self.embedding is not None and emb is None:
            raise Unsupported("quantize: embedding: this graph has no token embedding (aten.embedding of a "
                              "constant table indexed by an input)")
        if self.lm_head is not None and head is None:
            raise Unsupported("quantize: lm_head: no single linear of a constant weight produces a graph output "
                              "(the logits) through views, casts, scalings by a number and soft-capping only")
        h_t = head is not None and head.target is torch.ops.aten.addmm.default
        h_w = _linear_weight(head) if head is not None else None
        tied = emb is not None and h_w is emb.args[0]
        out: list[_Layer] = []
        if tied:
            if e_scheme != h_scheme:
                raise Unsupported(
                    f"quantize: {emb.args[0].target} is the token embedding and the lm_head's weight (tied): one "
                    f"matrix takes one scheme — give `embedding:` and `lm_head:` the same options, or untie "
                    f"them first (fold-norms tie: untie)")
            out.append(_Layer(emb.args[0].target, _module(emb), [head], False, e_scheme, table=emb))
        else:
            if e_scheme is not None:
                out.append(_Layer(emb.args[0].target, _module(emb), [], False, e_scheme, table=emb))
            if h_scheme is not None:
                out.append(_Layer(h_w.target, _module(head), [head], h_t, h_scheme))
        for l in out:
            others = [u for u in l.weight_node().users if u not in {r for r, _ in l.readers()}]
            if others:
                raise Unsupported(f"quantize: {l.weight} is also read by {describe(others[0])}; only the "
                                  f"embedding lookup and the lm_head may read a matrix quantized by "
                                  f"`embedding:`/`lm_head:`")
        fallbacks: dict[tuple, list[str]] = defaultdict(list)
        for l in out:
            _fall_back(prog, l, fallbacks)
        _note_fallbacks(fallbacks, res)
        return out

    def _end_scheme(self, opts: dict | None, what: str) -> Scheme | None:
        if opts is None:
            return None
        if not isinstance(opts, dict):
            raise BadInput(f"quantize: {what} takes {{bits: 8, ...}} (weight options) or null, got {opts!r}")
        s = Scheme(bits=8, group_size=None).updated(dict(opts), what)
        if s.method != "rtn":
            raise BadInput(f"quantize: {what}: method must be 'rtn' (GPTQ is for the layers' linears), got {s.method!r}")
        return s

    def _quantize_activations(self, prog: Program, layers: list[_Layer], res: PassResult) -> dict | None:
        """Insert the activation and KV quantizers; return the linears' input scheme {bits, symmetric, clip}
        (None: inputs stay float)."""
        inputs = None
        if self.activations is not None:
            inputs = {"bits": self.activations["bits"], "symmetric": self.activations.get("symmetric", True),
                      "clip": float(self.activations.get("clip_ratio", 1.0))}
            n = quantize_inputs(prog, [(node, l.x_arg()) for l in layers for node in l.nodes], inputs["bits"],
                                inputs["symmetric"], inputs["clip"])
            res.findings["activations"] = {"bits": inputs["bits"], "quantizers": n,
                                           "scheme": _act_scheme("per-token", inputs["symmetric"], inputs["clip"])}
        if self.kv_cache is not None:
            kv_bits = self.kv_cache["bits"]
            symmetric = self.kv_cache.get("symmetric", False)
            clip = float(self.kv_cache.get("clip_ratio", 1.0))
            sizes = quantize_kv(prog, kv_bits, symmetric, clip)
            res.findings["kv_cache"] = {"bits": kv_bits, "attention_sites": len(sizes) // 2,
                                        "scheme": _act_scheme("per head and token", symmetric, clip)}
            # for checkpoints (spinfx.checkpoint.parts): the scheme and the sizes it quantizes over (head_dim)
            prog.meta["kv_cache"] = {"bits": kv_bits, "symmetric": symmetric, "clip": clip,
                                     "head_dims": sorted(set(sizes))}
        if self.activations is not None or self.kv_cache is not None:
            res.notes.append("activations/KV are fake-quantized (rounded to the integer grid and scaled back "
                             "in float): torch._int_mm is slower than the float matmul on this CPU")
        return inputs

    def _calibration(self, prog: Program, ctx: Context) -> list[list]:

        if not isinstance(ctx.calib, torch.Tensor) or ctx.calib.is_floating_point():
            raise BadInput("quantize: method gptq needs calibration text: pass calib=<1-D tensor of token ids> "
                           "(e.g. spinfx.rewrite(model, recipe, calib=tokens))")
        window = next(e.numel() for e in prog.examples if isinstance(e, torch.Tensor) and not e.is_floating_point())
        check_calibration(ctx.calib.numel(), self.samples, window)
        return token_batches(prog, ctx.calib.reshape(-1), limit=self.samples)


def _module(node: fx.Node) -> str:
    """The module a reader belongs to (names the quantized tensors), else its weight's owner."""
    w = node.args[0] if node.target is torch.ops.aten.embedding.default else _linear_weight(node)
    return node.meta.get("module") or w.target.rsplit(".", 1)[0]


def _linear_weight(node: fx.Node) -> fx.Node:
    """W of aten.linear(x, W, b) / Conv1D's aten.addmm(b, x, W)."""
    return node.args[2] if node.target is torch.ops.aten.addmm.default else node.args[1]


def _fall_back(prog: Program, l: _Layer, fallbacks: dict) -> None:
    """l.group_size after the fallback rule (module docstring); fallbacks collects what changed."""
    k = l.master(prog).shape[1]
    l.group_size = group_for(k, l.scheme.group_size)
    if l.group_size != l.scheme.group_size:
        fallbacks[(k, l.scheme.group_size, l.group_size)].append(l.module)


def _note_fallbacks(fallbacks: dict, res: PassResult) -> None:
    for (k, want, got), mods in sorted(fallbacks.items(), key=lambda kv: str(kv[0])):
        to = f"group {got}" if got else "per channel"
        res.notes.append(f"group {want} does not divide K={k}: {len(mods)} layer(s) use {to} "
                         f"({_examples(mods)})")


def _say_ends(ends: list[_Layer], out: dict[str, QuantLayer], res: PassResult) -> None:
    """What `embedding:` / `lm_head:` quantized, in the report's words."""
    for l in ends:
        q = out[l.module]
        how = f"{q.weight.bits}-bit " + (f"group {q.weight.group_size}" if q.weight.group_size else
                                         ("per row" if l.table is not None else "per channel"))
        what = []
        if l.table is not None:
            what.append(f"the token embedding {l.module} (spinfx.qembedding)")
        what += [f"the lm_head {m} (spinfx.qlinear)" for m in q.tied or ([l.module] if l.nodes else [])]
        tie = "; one matrix (tied), stored once" if l.table is not None and l.nodes else ""
        res.notes.append(f"quantized {' and '.join(what)}: {how} {q.method.upper()}, "
                         f"‖W − Ŵ‖/‖W‖ = {q.error:.4f}{tie}")
        res.findings.setdefault("ends", {})[l.module] = {
            "embedding": l.table is not None, "lm_head": [_module(n) for n in l.nodes], **q.to_dict()}


def _act_scheme(per: str, symmetric: bool, clip: float) -> str:
    return (f"{per}, {'symmetric' if symmetric else 'asymmetric'}, dynamic"
            + (f", range clipped to {clip:g} of its own" if clip != 1.0 else ""))


def _only(opts, keys: set, what: str) -> None:
    if not isinstance(opts, dict) or set(opts) - keys:
        raise BadInput(f"quantize: {what} takes {{{', '.join(sorted(keys))}}}, got {opts!r}")


def _examples(mods: list[str], n: int = 3) -> str:
    return ", ".join(mods[:n]) + (f", … (+{len(mods) - n})" if len(mods) > n else "")


def _summarize(out: dict[str, QuantLayer], res: PassResult) -> None:
    if not out:
        res.notes.append("no linear was quantized")
        return
    weights = {m: q.weight.out_features * q.weight.in_features for m, q in out.items()}
    stored = sum(q.weight.bits_per_weight() * weights[m] for m, q in out.items())
    worst = max(out, key=lambda m: out[m].error)
    res.findings["quantized"] = {
        "layers": len(out), "weights": sum(weights.values()),
        "bits_per_weight": round(stored / sum(weights.values()), 4),
        "error_mean": round(sum(q.error for q in out.values()) / len(out), 5),
        "error_max": round(out[worst].error, 5), "worst": worst}
    res.findings["layers"] = {m: q.to_dict() for m, q in out.items()}  # per layer: ‖W − Ŵ‖/‖W‖ and more


# ---- weights ----------------------------------------------------------------------------------------


def _rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖W − Ŵ‖/‖W‖ without a full-size difference (row chunks)."""
    rows = rows_per_chunk(w.shape[1])
    d2 = sum(float((w[r:r + rows] - w_hat[r:r + rows]).square().sum()) for r in range(0, w.shape[0], rows))
    n = float(w.norm())
    return d2 ** 0.5 / n if n > 0 else 0.0


def _rtn(prog: Program, l: _Layer) -> tuple[QuantLayer, torch.Tensor]:
    """(the layer, Ŵ [out, in] in float64)."""
    w = l.master(prog).double()
    s = l.scheme
    qw, w_hat = quantize_rtn(w, s.bits, l.group_size, s.symmetric, scale_dtype=l.storage_dtype(prog), clip=s.clip,
                             dequantized=True)
    return QuantLayer(qw, l.weight, "rtn", _rel_error(w, w_hat), clip=s.clip), w_hat


# ---- the substitution rules: W ← Q(W) at every reader of a planned weight ----------------------------


@dataclass
class _Subst:
    """What the substitution rules read: the plan (each reader's layer), GPTQ's results, the reference."""

    prog: Program
    reference: Program                 # the input program; each quantized W becomes dequantize(Q(W)) in it
    done: dict                         # weight FQN → (QuantLayer, Ŵ) already computed (GPTQ)
    inputs: dict | None                # the linears' input quantizer {bits, symmetric, clip} (None: float)
    moe_routers: set
    ends: set                          # the layers quantized by `embedding:` / `lm_head:` (weight-only)
    seconds: float = 0.0
    layers: dict = field(default_factory=dict)  # reader node (a linear, a lookup) → its _Layer
    consts: dict = field(default_factory=dict)  # _Layer → (its new named constants, the op's attributes)
    out: dict = field(default_factory=dict)     # module → QuantLayer


def quantize_linear(m, st: _Subst):
    """x·Wᵀ + b ⇒ spinfx.qlinear(x, Q(W), b): the linear reads dequantize(Q(W))."""
    node, _ = linear_node(m)
    if node not in st.layers:
        return None  # kept in float (ignore, a router) or another rule's (the lm_head)
    l = st.layers[node]
    c, attrs = _packed(st, l)
    _substitute(st.prog, node, l, torch.ops.spinfx.qlinear.default, (
        node.args[l.x_arg()], c["weight_packed"], c["weight_scale"], c.get("weight_zero_point"),
        c.get("weight_g_idx"), l.bias(node), attrs["bits"], attrs["group_size"]))
    return True


def quantize_table(m, st: _Subst):
    """E[ids] ⇒ spinfx.qembedding(ids, Q(E)): the lookup reads rows of dequantize(Q(E))."""
    if m.root not in st.layers:
        return None
    l = st.layers[m.root]
    c, attrs = _packed(st, l)
    _substitute(st.prog, m.root, l, torch.ops.spinfx.qembedding.default, (
        m.root.args[1], c["weight_packed"], c["weight_scale"], c.get("weight_zero_point"), attrs["bits"],
        attrs["group_size"]))
    return True


LINEAR_RULES = [Rule("W ← Q(W): linear ⇒ spinfx.qlinear", LINEAR, quantize_linear)]
END_RULES = [Rule("E ← Q(E): embedding ⇒ spinfx.qembedding (embedding:)", EMBEDDING, quantize_table),
             Rule("W ← Q(W): lm_head ⇒ spinfx.qlinear (lm_head:)", LINEAR, quantize_linear)]


def _substitute(prog: Program, node: fx.Node, l: _Layer, op, args: tuple) -> None:
    g = prog.graph
    w_node = node.args[0 if node is l.table else l.w_arg()]
    with g.inserting_before(node):
        q = g.call_function(op, args)
    q.meta = dict(node.meta)
    node.replace_all_uses_with(q)
    g.erase_node(node)
    drop_const(prog, w_node)  # once its last reader is gone


def _packed(st: _Subst, l: _Layer) -> tuple[dict, dict]:
    """Q(W) of l, computed once (at its first reader) as one set of new named constants; in the reference, W
    becomes dequantize(Q(W))."""
    if l in st.consts:
        return st.consts[l]
    prog = st.prog
    t0 = time.perf_counter()
    layer, w_hat = st.done.pop(l.weight) if l.weight in st.done else _rtn(prog, l)  # → (QuantLayer, Ŵ)
    st.seconds += time.perf_counter() - t0
    _dequantized_into(st.reference, l, w_hat)
    consts = {}
    for role, t in generic_tensors(layer.weight, None).items():
        if t is not None:
            fqn = f"{l.module}.{role}"
            if t.is_floating_point():  # stored as computed (the weight's dtype); finalize keeps it
                prog.meta.setdefault("dtypes", {})[fqn] = t.dtype
            consts[role] = add_const(prog.gm, fqn, t)
    i = None if l in st.ends else st.inputs
    st.out[l.module] = dataclasses.replace(layer, input_bits=i and i["bits"], input_symmetric=not i or i["symmetric"],
                                           input_clip=i["clip"] if i else 1.0,
                                           router=any(n in st.moe_routers for n in l.nodes))
    if l.table is not None:
        st.out[l.module] = dataclasses.replace(st.out[l.module], embedding=True, tied=tuple(
            n.meta.get("module", "") for n in l.nodes))
    st.consts[l] = consts, generic_attrs(layer.weight)
    return st.consts[l]


def _dequantized_into(ref: Program, l: _Layer, w_hat: torch.Tensor) -> None:
    """In the reference copy, make l's linears read Ŵ = dequantize(Q(W)) (a new constant, so a weight
    shared with a non-linear reader, e.g. a tied embedding, stays as it was)."""
    node = add_const(ref.gm, f"{l.module}.weight_dequantized", w_hat.T.contiguous() if l.transposed else w_hat)
    arg = {n.name: i for n, i in l.readers()}
    for n in [n for n in ref.graph.nodes if n.name in arg]:
        w = n.args[arg[n.name]]
        n.replace_input_with(w, node)
        drop_const(ref, w)


# ---- GPTQ calibration ---------------------------------------------------------------------------------


def _output_errors(h: torch.Tensor, w: torch.Tensor, *w_hats: torch.Tensor) -> list[float]:
    """‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ = √(tr(ΔHΔᵀ) / tr(WHWᵀ)) for each Ŵ, with H ∝ XᵀX (float32 is plenty here),
    as one product [W; W − Ŵ₁; …] H."""
    m = torch.cat([w] + [w - wh for wh in w_hats]).float()
    tr = ((m @ h.float()) * m).sum(-1).view(1 + len(w_hats), -1).sum(-1)
    return [(t / tr[0]).clamp_min(0).sqrt().item() for t in tr[1:]]


def _calibrate(prog: Program, layers: list[_Layer], batches: list[list], progress: Callable | None,
               res: PassResult) -> dict[str, tuple[QuantLayer, torch.Tensor]]:
    """GPTQ, layer by layer, with each layer's Hessian taken on inputs that already went through the
    quantized layers before it (sequential GPTQ).

    The graph runs on a copy in the model's dtype, segment by segment over all calibration windows:
    a segment ends right before the first linear of an input group (q/k/v share one input, gate/up
    another), whose Hessian is then complete; its linears are GPTQ-quantized and their Ŵ written into
    the copy, and the next segment continues from the values each window left alive. Memory: the
    Hessians of one group plus, per window, the values alive across a segment boundary (≈ the residual
    stream and a layer's input) — never the activations of the whole model. The lm_head and anything
    after the last quantized linear never run.
    """
    from spinfx.engine.certify import finalize

    t0 = time.perf_counter()
    hadamard_op = getattr(getattr(torch.ops, "spinfx", None), "hadamard", None)
    hadamard_op = hadamard_op.default if hadamard_op is not None else None
    run = prog.clone()
    finalize(run)  # float constants back to the model's dtype
    # target: float — the float program runs beside it (its inputs X_f at each group: C = X_qᵀX_f)
    ref, skip = None, {}
    targets = {l.scheme.target for l in layers} - {"quantized"}  # one at most (Quantize.validate)
    if targets:
        ref = prog.clone()
        finalize(ref)
    if targets == {"original"}:  # the float program skips every activation / KV quantizer: x̂ ← x
        skip = {n.name: x.name for n, x in quantizer_outputs(prog.graph).items()}
    nodes = list(run.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    skip = {by_name[a]: by_name[b] for a, b in skip.items()}
    quantizer_ops = {n for n in nodes if n.meta.get("module_type") in KINDS} if skip else set()
    groups: dict[fx.Node, list[_Layer]] = defaultdict(list)
    for l in layers:
        groups[by_name[l.nodes[0].name].args[l.x_arg()]].append(l)
    cuts: dict[int, list[fx.Node]] = defaultdict(list)
    for x, ls in groups.items():
        cuts[min(pos[by_name[l.nodes[0].name]] for l in ls)].append(x)
    last_read = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    for q, x in skip.items():  # x̂ ← x in the float program: x lives until x̂ is taken
        last_read[x] = max(last_read[x], pos[q])
    free_after: dict[int, list[fx.Node]] = defaultdict(list)  # values whose last reader is node i
    for a, i in last_read.items():
        free_after[i].append(a)
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def values(p: Program, env: dict):
        return lambda a: p.const(a.target) if a.op == "get_attr" else env[a]

    def step(n: fx.Node, p: Program, env: dict):
        fn = hadamard_by_gemm if n.target is hadamard_op else n.target
        torch.set_num_threads(threads if fn in _THREADED else 1)
        value = values(p, env)
        env[n] = fn(*fx.node.map_arg(n.args, value), **fx.node.map_arg(n.kwargs, value))

    grams: dict[fx.Node, HessianAccumulator] = {}  # made when its input is first computed
    cross: dict[fx.Node, CrossAccumulator] = {}     # target: float
    envs = [dict(zip(placeholders, b)) for b in batches]
    refs = [dict(zip(placeholders, b)) for b in batches] if ref is not None else [None] * len(batches)
    out: dict[str, tuple[QuantLayer, torch.Tensor]] = {}
    start, last_note = 0, t0
    spent: dict[str, float] = defaultdict(float)  # for the note: where the time went
    threads = torch.get_num_threads()
    with torch.no_grad(), _restore_threads():
        for cut in sorted(cuts):
            for env, env_f in zip(envs, refs):
                for i in range(start, cut):
                    n = nodes[i]
                    if n.op == "call_function":
                        step(n, run, env)
                        if n in skip:
                            env_f[n] = env_f[skip[n]]
                        elif env_f is not None and n not in quantizer_ops:
                            step(n, ref, env_f)
                        if n in groups:
                            if n not in grams:  # float32 products, float64 sums
                                grams[n] = HessianAccumulator(n.meta["val"].shape[-1], n.meta["val"].device,
                                                                    dtype=torch.float32)
                                if env_f is not None:
                                    cross[n] = CrossAccumulator(n.meta["val"].shape[-1])
                            torch.set_num_threads(threads)  # the Gram products are GEMMs
                            t1 = time.perf_counter()
                            grams[n].add(env[n])
                            if env_f is not None:
                                cross[n].add(env[n], env_f[n])
                            spent["Hessians"] += time.perf_counter() - t1
                    for dead in free_after.get(i, ()):
                        env.pop(dead, None)
                        if env_f is not None:
                            env_f.pop(dead, None)
            torch.set_num_threads(threads)
            t1 = time.perf_counter()
            for x in cuts[cut]:
                c = cross.pop(x).product() if x in cross else None
                out.update(_gptq_group(prog, run, groups[x], grams.pop(x).hessian(), c))
            spent["quantizing"] += time.perf_counter() - t1
            start = cut
            if progress is not None and (time.perf_counter() - last_note > 10 or len(out) == len(layers)):
                last_note = time.perf_counter()
                progress(f"gptq: {len(out)}/{len(layers)} layers ({groups[cuts[cut][-1]][-1].module}), "
                         f"{last_note - t0:.0f} s")
    total = time.perf_counter() - t0
    tokens = sum(t.numel() for b in batches for t in b if isinstance(t, torch.Tensor) and not t.is_floating_point())
    res.notes.append(f"GPTQ: {len(layers)} layers on {len(batches)} calibration windows ({tokens} tokens), "
                     f"sequential (each Hessian from the already-quantized layers' outputs"
                     + (f"; Ŵ toward the float model's outputs, target: {next(iter(targets))}" if ref is not None
                        else "") + "), "
                     f"{total:.0f} s (forwards {total - sum(spent.values()):.0f} s, "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()) + ")")
    return out


def _float_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W(Cᵀ − H)(H + λI)⁻¹, λ = damp · mean(diag H): the W with ‖W*·X_q − W·X_f‖ least (ridge),
    W itself where X_q = X_f."""
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return w + torch.cholesky_solve((c - h) @ w.T, torch.linalg.cholesky(hd)).T


def _gptq_group(prog: Program, run: Program, ls: list[_Layer], h: torch.Tensor,
                c: torch.Tensor | None = None) -> dict[str, tuple[QuantLayer, torch.Tensor]]:
    """GPTQ of the linears reading one input (one H): one factorization of H per (damp, act_order), and
    siblings of one scheme and storage dtype quantized in one column loop (kernels.gptq
    `gptq_quantize_siblings`: the same codes as one by one)."""
    factors, same = {}, defaultdict(list)
    for l in ls:
        same[(l.scheme, l.group_size, l.storage_dtype(prog))].append(l)
    out = {}
    for (s, group_size, dtype), sibs in same.items():
        key = (s.damp, s.act_order)
        if key not in factors:
            factors[key] = hessian_factor(h, s.damp, s.act_order)
        ws = [l.master(prog).double() for l in sibs]
        targets = ws
        if s.target != "quantized":  # one factorization, one solve for the siblings stacked (row by row: = one by one)
            targets = list(_float_target(torch.cat(ws), h, c, s.target_damp).split([w.shape[0] for w in ws]))
        qws = gptq_quantize_siblings(targets, factors[key], s.bits, group_size, s.symmetric, act_order=s.act_order,
                                     damp=s.damp, scale_dtype=dtype, clip=s.clip)
        for l, w, qw in zip(sibs, ws, qws):
            w_hat = dequantize(qw, torch.float64)
            rtn = dequantize(quantize_rtn(w, s.bits, group_size, s.symmetric, scale_dtype=dtype, clip=s.clip),
                             torch.float64)
            stored = w_hat.T if l.transposed else w_hat
            run.set_const(l.weight, stored.to(run.const(l.weight).dtype).contiguous())  # later layers see Ŵ
            err, rtn_err = _output_errors(h, w, w_hat, rtn)
            out[l.weight] = QuantLayer(qw, l.weight, "gptq", _rel_error(w, w_hat), output_error=err,
                                       rtn_output_error=rtn_err, clip=s.clip), w_hat
    return out


# ---- runtime lowering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowerQLinear(Pass):
    """lower-qlinear: each generic spinfx.qlinear becomes its CPU fast path (`kernels.qlinear.plan_qlinear`):
    spinfx.qlinear_cpu (≤ 4 bits, the C++ kernel, float32 math, where it builds), else
    spinfx.qlinear_int4pack (≤ 4 bits, N % 16 == 0, groups 32..256; act-order as one input
    index_select) or spinfx.qlinear_int8pack (8-bit symmetric per channel), over tensors repacked once
    and named `<module>.<role>`. Layouts without a fast path keep the generic op. Run it last: the aten
    kernels compute in `compute_dtype` (bfloat16: the only fast variant in torch 2.13), so the result is
    checked in the model's dtype against the generic graph with the declared `tolerance` (relative max
    |Δ| of the outputs), not in float64. Checkpoints still come from `quantized_layers(prog)`."""

    name = "lower-qlinear"
    tolerance = 3e-2
    device: str = "cpu"
    compute_dtype: str = "bfloat16"

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        dtype = getattr(torch, self.compute_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise BadInput(f"lower-qlinear: compute_dtype {self.compute_dtype!r} is not a torch dtype")
        generic = prog.clone()
        layers = quantized_layers(prog)
        ops: dict[str, int] = defaultdict(int)
        for node in [n for n in prog.graph.nodes if n.target is torch.ops.spinfx.qlinear.default]:
            module = node.args[1].target.rpartition(".")[0]
            plan = plan_qlinear(layers[module].weight, device=self.device, cpu_compute_dtype=dtype)
            (call,) = plan.calls
            ops[call.op.name()] += 1
            if call.op is not torch.ops.spinfx.qlinear.default:
                _lower_one(prog, node, module, plan.perm, call)
        res.findings["ops"] = dict(ops)
        res.certificate = _check_native(generic, prog, self.tolerance, self.name)
        return res


def _lower_one(prog: Program, node: fx.Node, module: str, perm: torch.Tensor | None, call) -> None:
    g = prog.graph
    x, bias = node.args[0], node.args[5]
    old = [a for a in node.args[1:5] if isinstance(a, fx.Node)]
    if any(u.target is not torch.ops.spinfx.qlinear.default for a in old for u in a.users):
        module = node.meta.get("module") or f"{module}.linear"  # a tied table's qembedding keeps reading them
    node.args = (x,)  # release the generic tensors before their names are reused
    for a in old:
        drop_const(prog, a)
    with g.inserting_before(node):
        if perm is not None:
            x_val = x.meta["val"]
            x = g.call_function(torch.ops.aten.index_select.default, (x, -1, add_const(prog.gm, f"{module}.input_perm", perm)))
            x.meta = {**node.meta, "val": x_val}
    kwargs = {}
    for role, t in call.tensors.items():
        if role == "bias" or t is None:  # an absent optional tensor (qlinear_cpu's zeros) stays None
            kwargs[role] = bias if role == "bias" else None
            continue
        fqn = f"{module}.{role}"
        if t.is_floating_point():
            prog.meta.setdefault("dtypes", {})[fqn] = t.dtype  # bf16 scales stay bf16 after finalize
        kwargs[role] = add_const(prog.gm, fqn, t)
    with g.inserting_before(node):
        new = g.call_function(call.op, (x,), {**kwargs, **call.attrs})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _check_native(before: Program, after: Program, tol: float, what: str) -> dict:
    """Relative max |Δ| of the outputs, both programs in their final dtypes, on seeded random inputs."""
    from torch.utils import _pytree as pytree

    from spinfx.engine.certify import CertificateError, finalize, random_inputs

    b, a = before.clone(), after.clone()
    finalize(b)
    finalize(a)
    xs = [x.to(e.dtype) if isinstance(x, torch.Tensor) else x for x, e in zip(random_inputs(before.examples, 0), before.examples)]
    with torch.no_grad():
        ob = [t for t in pytree.tree_leaves(b.gm(*xs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        oa = [t for t in pytree.tree_leaves(a.gm(*xs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    max_abs = max((x.double() - y.double()).abs().max().item() for x, y in zip(ob, oa))
    ref = max(x.double().abs().max().item() for x in ob)
    cert = {"max_abs": max_abs, "rel": max_abs / ref, "tolerance": tol, "seeds": [0],
            "dtype": f"{ob[0].dtype} (model dtype; the aten fast kernels compute in bfloat16)",
            "reference": "the generic spinfx.qlinear graph"}
    if not cert["rel"] <= tol:
        raise CertificateError(f"{what} changed the outputs by {cert['rel']:.3e} relative > tolerance {tol:.0e}")
    return cert
