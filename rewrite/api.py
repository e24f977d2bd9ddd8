"""The Python entry points: spinfx.inspect(...) and spinfx.rewrite(...) (INTERFACE.md)."""
from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from spinfx.engine.certify import CertificateError
from spinfx.engine.errors import BadInput, SpinfxError
from spinfx.engine.graph import Program, from_module
from spinfx.engine.pipeline import Context, run_pipeline
from spinfx.engine.printer import print_graph
from spinfx.engine.report import Report, check_contract
from spinfx.recipe import DEFAULT_RECIPE


def model_facts(model: torch.nn.Module) -> dict[str, Any]:
    """What a contract needs to know, read from an HF-style `config` if the module has one."""
    cfg = getattr(model, "config", None)
    facts: dict[str, Any] = {"class": type(model).__name__}
    if cfg is None:
        return facts
    for key, names in {"model_type": ("model_type",), "layers": ("num_hidden_layers", "n_layer"),
                       "vocab": ("vocab_size",), "hidden": ("hidden_size", "n_embd"),
                       "experts": ("num_local_experts", "num_experts")}.items():
        for n in names:
            if getattr(cfg, n, None) is not None:
                facts[key] = getattr(cfg, n)
                break
    return facts


CALIB_SEQ = 512  # the traced length when calibration text is given (GPTQ windows of real context)


def default_inputs(model: torch.nn.Module, seq: int = 16) -> tuple[tuple, dict]:
    facts = model_facts(model)
    if "vocab" not in facts:
        raise BadInput(f"{facts['class']} has no HF config: pass example_inputs=(args, kwargs)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(facts["vocab"]), (1, seq), generator=g)
    return (), {"input_ids": ids, "use_cache": False}


def _as_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        return tuple(example_inputs[0]), example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@contextlib.contextmanager
def _without_cache(model: torch.nn.Module):
    """Trace without a KV cache unless the call asks for one: a module whose `config` says
    `use_cache=True` (the HF default, read when the call does not pass `use_cache`) would return a
    cache object, which is not a traced output. Every config of the module is switched off for the
    trace and restored after; a `use_cache` passed in the call still wins over the config."""
    saved = {id(c): (c, c.use_cache) for m in model.modules()
             if getattr(c := getattr(m, "config", None), "use_cache", None)}
    for c, _ in saved.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c, value in saved.values():
            c.use_cache = value


def load(model: torch.nn.Module | str | Path, example_inputs=None) -> tuple[Program, torch.nn.Module]:
    """Trace a module (or an HF dir / "smollm2") into the canonical program."""
    if isinstance(model, (str, Path)):
        from spinfx.checkpoint.hf import load_model

        model, _ = load_model(model)  # checks what it loaded (hf.check_loaded)
    elif isinstance(model, torch.nn.Module):
        from spinfx.checkpoint.hf import check_finite

        check_finite(model)
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"expected an nn.Module or a model directory, got {type(model).__name__}")
    model.eval()
    args, kwargs = default_inputs(model) if example_inputs is None else _as_inputs(example_inputs)
    from spinfx.checkpoint.moe import dense_experts

    try:
        with _without_cache(model), dense_experts(model):
            prog = from_module(model, args, kwargs)
    except SpinfxError:
        raise
    except Exception as e:  # export failures are the model's structure, said in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpinfxError(f"torch.export could not trace {type(model).__name__}: {first}") from e
    prog.meta.update(model_facts(model))
    return prog, model


def inspect(model, example_inputs=None, name: str | None = None) -> Report:
    """What each structure finder sees in the model, and whether its family's contract holds."""
    from spinfx.passes.structure import FindStructure
    from spinfx.patterns.contracts import CONTRACTS

    prog, module = load(model, example_inputs)
    ctx = Context()
    results = run_pipeline(prog, [FindStructure()], ctx, certify=False)
    rep = Report(model=name or str(prog.meta.get("model_type") or prog.meta["class"]), passes=results)
    fam, layers = prog.meta.get("model_type"), prog.meta.get("layers")
    if fam in CONTRACTS and layers:
        counts = results[0].findings["counts"]
        misses = {r.name: r.nearest_miss for r in results[0].rules}
        env = {"L": int(layers)} | ({"E": int(prog.meta["experts"])} if prog.meta.get("experts") else {})
        rep.contract = check_contract(fam, CONTRACTS[fam], env, counts, misses)
    rep.extra["nodes"] = sum(1 for _ in prog.graph.nodes)
    return rep


class RewrittenModule(torch.nn.Module):
    """The rewritten program as an nn.Module with the original call signature (one traced shape:
    the graph is specialized to the example inputs' shapes)."""

    def __init__(self, prog: Program):
        super().__init__()
        self.gm = prog.gm
        self._prog = prog

    def forward(self, *args, **kwargs):
        return self._prog(*args, **kwargs)


@dataclass
class Result:
    """`module` runs the rewritten program for the traced input signature only (no `generate`, no KV
    cache). To keep the HF interface, `save` a checkpoint and `spinfx.load` it (the model class with
    the rewritten weights and online ops re-attached), or use `torch.compile(backend="spinfx")`."""

    module: torch.nn.Module
    report: Report
    program: Program
    source: torch.nn.Module | None = None  # the model that was rewritten (its config names the checkpoint)
    source_dir: Path | None = None         # its HF directory, when it was loaded from one (tokenizer files)

    def save(self, out, force: bool = False) -> Path:
        """Write a checkpoint directory (spinfx.checkpoint.write: safetensors, config, tokenizer, reports),
        verified by loading it back; an existing `out` is refused unless `force`."""
        from spinfx.checkpoint.write import save

        return save(self, out, force=force, progress=progress)


def rewrite(model, recipe=DEFAULT_RECIPE, example_inputs=None, calib=None, certify: bool = True, *,
            calib_source: str | None = None) -> Result:
    """Trace `model`, run the recipe's passes (certifying those that change weights), and return the
    runnable rewritten module with its report. `calib`: a 1-D tensor of token ids (real text); when
    given, the report carries activation statistics at every linear's input before and after, and
    for a recipe that calibrates on it (GPTQ) without `example_inputs`, the model is traced for
    [1, 512] windows of it."""
    from spinfx.passes.calibration import check_calibration, words
    from spinfx.recipe import load_recipe

    rec = load_recipe(recipe)
    src = model
    windows = calibration_windows(rec)
    if windows and calib is None and isinstance(model, (str, Path)):
        from spinfx.checkpoint.hf import resolve_source

        calib = builtin_calibration(resolve_source(model), windows)
        calib_source = BUILTIN_TEXT
    if windows:  # as much calibration text as the recipe asks, before any work
        check_calibration(calib.numel() if isinstance(calib, torch.Tensor) else None, windows,
                          CALIB_SEQ if example_inputs is None else token_window(example_inputs),
                          who=words(calibrating(rec)))
    if example_inputs is None and windows:
        # traced for windows of real context: GPTQ's Hessians are taken on [1, CALIB_SEQ] windows of
        # `calib` (the default 16-token trace would cut it into snippets)
        if isinstance(model, (str, Path)):
            from spinfx.checkpoint.hf import load_model

            model, _ = load_model(model)
        example_inputs = default_inputs(model, seq=CALIB_SEQ)
    prog, module = load(model, example_inputs)
    rep = apply_recipe(prog, rec, calib, certify, calib_source=calib_source)
    source_dir = None
    if isinstance(src, (str, Path)):
        from spinfx.checkpoint.hf import resolve_source

        source_dir = resolve_source(src)
    return Result(RewrittenModule(prog), rep, prog, module, source_dir)


BUILTIN_TEXT = "the built-in Shakespeare text (Hamlet, the evaluation text, excluded)"


def builtin_calibration(path: Path, windows: int) -> torch.Tensor | None:
    """`windows` × CALIB_SEQ tokens of the built-in Shakespeare text (never Hamlet, the evaluation text) in
    the tokenizer of the model directory `path`; None when it has no tokenizer. What a calibrated recipe
    runs on when no calibration text is given."""
    from spinfx.checkpoint.hf import load_tokenizer
    from spinfx.tools.evaluate import calibration_tokens

    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        return None
    progress(f"calibrating on {windows} windows × {CALIB_SEQ} tokens of the built-in Shakespeare text "
             f"(not Hamlet; calib= / --calib FILE for your own) …")
    return calibration_tokens(tokenizer, ctx=CALIB_SEQ, windows=windows)


def calibration_windows(recipe) -> int:
    """How many windows of calibration text the recipe runs the model on (0: it does not calibrate)."""
    return max((p.calibration_windows() for p in recipe.passes), default=0)


def calibrating(recipe):
    """The pass that calibrates on the most windows (None: the recipe does not calibrate)."""
    p = max(recipe.passes, key=lambda p: p.calibration_windows(), default=None)
    return p if p is not None and p.calibration_windows() else None


def token_window(example_inputs) -> int:
    """Tokens per calibration window when tracing for `example_inputs`: its token tensor's size (the first
    integer tensor, as `passes.calibration.token_batches` cuts calibration text)."""
    args, kwargs = _as_inputs(example_inputs)
    ids = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and not x.is_floating_point()]
    if not ids:
        raise BadInput("calibration needs example inputs with a tensor of token ids")
    return ids[0].numel()


STATS_WINDOWS = 4


def apply_recipe(prog: Program, recipe, calib=None, certify: bool = True, site_base: int = 0,
                 calib_source: str | None = None) -> Report:
    """Run `recipe` on `prog` in place and return the report: float64 master weights, the passes
    (certified), weights back to their dtypes. Shared by `rewrite` and the torch.compile backend."""
    from spinfx.engine.certify import finalize, to_master
    from spinfx.recipe import load_recipe
    from spinfx.passes.calibration import token_batches
    from spinfx.tools.stats import compare_stats, linear_input_stats

    rec = load_recipe(recipe)
    # the report's activation statistics: 4 windows (2048 tokens at every linear's input) — 16 took more
    # time than GPTQ itself in a 16-window rewrite (bench/README.md "GPTQ: … time")
    batches = token_batches(prog, calib, limit=STATS_WINDOWS) if calib is not None else None
    before = linear_input_stats(prog, batches) if batches else None
    layer = first_block(prog)  # one decoder layer's graph before/after, for the report's picture
    layer_before = print_graph(prog.gm, module=layer) if layer else None
    to_master(prog)
    linears = linear_weights(prog)
    ctx = Context(calib=calib, progress=progress, site_base=site_base)
    results = run_pipeline(prog, rec.passes, ctx, certify=certify)
    rep = Report(model=str(prog.meta.get("model_type") or prog.meta.get("class", "")), recipe=rec.name,
                 passes=results)
    if calib is not None:  # what the recipe calibrated on (the report says; issue 12)
        rep.extra["calibration"] = {"text": calib_source or "calib= (token ids given by the caller)",
                                    "tokens": int(calib.numel()), "windows_used": calibration_windows(rec),
                                    "statistics_windows": len(batches or [])}
    check_changed(prog, rec, linears, rep)
    note_untouched(prog, rec, rep)
    finalize(prog)
    if not any(isinstance(x, torch._subclasses.FakeTensor) for x in prog.examples):  # Dynamo's: nothing to run
        check_dtypes(prog)  # certificates run in float64: a changed dtype is invisible to them
    if batches:
        rep.extra["activations"] = compare_stats(before, linear_input_stats(prog, batches))
    if layer:
        rep.extra["layer_graph"] = {"module": layer, "before": layer_before,
                                    "after": print_graph(prog.gm, module=layer)}
    return rep


class _OneRank(fx.Interpreter):
    """Runs a program alone: a collective (all_reduce, wait) returns its input, whose dtype it keeps."""

    def call_function(self, target, args, kwargs):
        return args[0] if getattr(target, "namespace", "") == "_c10d_functional" else super().call_function(
            target, args, kwargs)


def check_dtypes(prog: Program) -> None:
    """Run the finalized program once in its dtypes: float64 certificates cannot see a dtype change (real
    tensors: fake tensors' meta functions let a float32 x float64 linear through)."""
    want = [getattr(getattr(a, "meta", {}).get("val"), "dtype", None) for a in pytree.tree_leaves(
        prog.graph.output_node().args[0])]
    try:
        with torch.no_grad():
            got = [getattr(t, "dtype", None) for t in pytree.tree_leaves(_OneRank(prog.gm).run(*prog.examples))]
    except Exception as e:  # the op's own error says which dtypes met where
        raise CertificateError(f"the rewritten program does not run in its dtypes: {str(e).strip()[:300]}") from e
    if got != want:
        raise CertificateError(f"the rewrite changed the output dtypes: {want} -> {got}")


def linear_weights(prog: Program) -> dict[str, tuple[str, weakref.ref]]:
    """Every float linear of the program: node name -> (weight FQN, a weak reference to the weight tensor
    now — a replaced weight is freed, not kept alive for this comparison)."""
    from spinfx.patterns.common import is_linear, linear_weight

    return {n.name: (linear_weight(n).target, weakref.ref(prog.const(linear_weight(n).target)))
            for n in prog.graph.nodes if is_linear(n)}


def check_changed(prog: Program, rec, before: dict[str, tuple[str, weakref.ref]], rep: Report) -> None:
    """A recipe that exists to change weights must change some linear: record how many it changed in
    the report, and raise `Unsupported` when it changed none of them (unless the recipe allows it).
    A linear counts as changed when its node is gone (replaced, e.g. by a quantized linear) or its
    weight is another tensor (constants are replaced, never edited in place).

    One exception, said in the report: a graph whose every linear reads the graph's own inputs (a
    fragment of a model cut by a graph break, e.g. an lm_head alone) holds no structure around its
    linears for the recipe to act on."""
    from spinfx.engine.errors import Unsupported
    from spinfx.patterns.common import reads_graph_input

    if not rec.changes_weights:
        return
    now = {n.name: n for n in prog.graph.nodes}
    unchanged = []
    for name, (fqn, t) in before.items():
        n = now.get(name)
        if n is not None and n.op == "call_function" and any(
                a.op == "get_attr" and a.target == fqn for a in n.all_input_nodes) and prog.const(fqn) is t():
            unchanged.append(n.meta.get("module") or name)
    changed = len(before) - len(unchanged)
    lin = rep.extra["linears"] = {"total": len(before), "changed": changed}
    if unchanged:
        lin["unchanged"] = sorted(set(unchanged))  # module paths
    if changed or rec.allow_unchanged:
        return
    if not before:
        lin["note"] = f"no linear in this graph: nothing for recipe {rec.name!r} to change"
        return
    if all(reads_graph_input(now[name]) for name in before):
        lin["note"] = "every linear here reads the graph's inputs: the structure around them is elsewhere"
        return
    why = []
    for p in rep.passes:
        why += [f"{p.name}: {r}" for r in p.refusals]
        why += [f"{p.name}: rule {r.name} found nothing ({r.nearest_miss})" for r in p.rules
                if not r.matches and r.nearest_miss]
    raise Unsupported(f"recipe {rec.name!r} changed none of the {len(before)} linears of "
                      f"{prog.meta.get('class') or 'the model'}" + (f" — {'; '.join(why[:3])}" if why else "")
                      + "; a recipe that may leave a model unchanged says so (allow_unchanged: true)")


def note_untouched(prog: Program, rec, rep: Report) -> None:
    """Weights of 3+ dimensions that no linear reads (a mixture's stacked experts as transformers runs them,
    grouped_mm / bmm over [E, N, K]: what Dynamo hands the torch.compile backend) are outside every
    rule's reach: the report names them (`linears.untouched`) so that "certified" is not read as "every
    weight rewritten". `spinfx.rewrite` traces such experts as per-expert linears (spinfx.checkpoint.moe) instead."""
    from spinfx.patterns.common import is_linear

    if not rec.changes_weights:
        return
    names = []
    for n in prog.graph.nodes:
        if n.op != "get_attr" or any(is_linear(u) for u in n.users):
            continue
        t = prog.const(n.target)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 3:
            names.append(n.target)
    if names:
        lin = rep.extra.setdefault("linears", {"total": 0, "changed": 0})
        lin["untouched"] = (f"{len(names)} weight(s) of 3+ dimensions read by no linear, left as they are: "
                            f"{', '.join(sorted(names)[:4])}{', …' if len(names) > 4 else ''}")


def first_block(prog: Program) -> str | None:
    """The module path of the first repeated block (`model.layers.0`, `transformer.h.0`): the module
    ending in `.0` whose `.1` sibling exists, shortest first."""
    modules = {n.meta.get("module", "") for n in prog.graph.nodes}
    prefixes = {m[: m.index(".0.") + 2] if ".0." in m else m for m in modules if m.endswith(".0") or ".0." in m}
    blocks = sorted((p for p in prefixes if any(m.startswith(p[:-1] + "1") for m in modules)), key=len)
    return blocks[0] if blocks else None


def progress(msg: str) -> None:
    print(f"[spinfx] {msg}", file=sys.stderr, flush=True)
