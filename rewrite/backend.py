"""The torch.compile backend `spinfx` (found by name through the `torch_dynamo_backends` entry point):

    compiled = torch.compile(model, backend="spinfx", options={"recipe": "spinquant"})

Each graph Dynamo captures is lowered to the canonical program (`from_dynamo`: parameters, which
arrive as graph inputs, become named constants), rewritten by the recipe exactly as `spinfx.rewrite`
does (`api.apply_recipe`: float64 master weights, certified passes, weights back to their dtypes), and
handed to Inductor (`compile_fx`), or run as the rewritten FX graph with `"inductor": False`.

Options: `recipe` (preset, YAML path or Recipe), `inductor` (default True), `certify` (default True),
`strict` (default True: a graph that holds weights but whose structure the recipe refuses — e.g. a
layer split by a graph break — raises `Unsupported`; False: that graph runs unchanged and the refusal
is recorded in `reports()`), `calib` (a 1-D tensor of token ids: the calibration text of a recipe that
calibrates, e.g. the default's GPTQ, cut into windows shaped like each graph's token input; without it
such a recipe is refused before any work, naming the data-free alternative). Graphs without parameters (mask arithmetic between breaks) run as they
are; a graph with linear layers whose weights are not the module's (by Dynamo source) is refused,
and so is a recipe that changes none of a graph's linears (`api.check_changed`): never a silent
pass-through. Inference only: the rewritten weights are a snapshot taken at compile time.

Shapes. The canonical program is specialized to one set of input shapes (what export saw). When
Dynamo hands over a dynamic graph (symbolic sizes, e.g. a growing DynamicCache), the compiled
function dispatches on the concrete sizes of each call and rewrites + compiles each new shape once;
the weights of every specialization are shared. For `generate` with a KV cache use a static cache
(`cache_implementation="static"`): two shapes in all (prefill and one-token decode).

KV cache and certificates. Every graph is certified on its own, so a rewrite must keep each graph's
function — cache tensors in and out included. Folding norms does (tested with `generate` on static
and dynamic caches). R2 (values) and R3 (keys) change what the cache holds: exact over a whole
`generate`, not per graph, so cache-carrying graphs refuse them (today the q/k/v patterns do not
match through a cache update, so the refusal comes from the pattern). R1 and R4 leave the cache as it
was, so they rewrite prefill and one-token decode graphs (tested with `generate`). For generation with
every rotation, `spinfx.load` a saved checkpoint: the model class itself, online ops attached.

Mutated inputs (a static KV cache updated in place). Export would turn an in-place update of a graph
input into an extra output; the program stays functional for the passes and their certificates, and
the update is written back into the input by a `copy_` at the end of the compiled graph.

Cache. A rewrite is kept per process under a key over the rule sources (every spinfx source file),
the recipe, the torch version, the Dynamo graph's code and the input shapes, and is used only for
the very weight tensors it was made from (weak references, unmodified `_version`): a recompile of
the same graph (after `torch._dynamo.reset()`, a guard failure, a second `torch.compile` of the
same model) reuses the rewrite and the compiled function; another model never does, even one whose
tensors landed at a freed model's addresses. `clear_cache()` releases every tensor the backend holds.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
import time
import warnings
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from spinfx.engine.certify import CertificateError
from spinfx.engine.errors import BadInput, SpinfxError, Unsupported
from spinfx.recipe import DEFAULT_RECIPE

_MANY_SHAPES = 8  # warn once a graph has been specialized for this many input shapes


@dataclass(frozen=True)
class Options:
    recipe: Any = DEFAULT_RECIPE
    inductor: bool = True
    certify: bool = True
    strict: bool = True
    calib: Any = None

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise BadInput(f"spinfx backend: unknown option(s) {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(sorted(known))}")
        return cls(**options)


@dataclass
class GraphRecord:
    """What the backend did with one (graph, input shapes): `status` is "rewritten", "no parameters"
    or "refused" (with `reason`); `report` is the recipe's Report when it ran."""

    graph: int
    shapes: list
    status: str
    reason: str = ""
    report: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = {"graph": self.graph, "shapes": self.shapes, "status": self.status, "seconds": round(self.seconds, 3)}
        if self.reason:
            d["reason"] = self.reason
        if self.report is not None:
            d["report"] = self.report.to_dict()
        return d


_RECORDS: list[GraphRecord] = []
_CACHE: dict[str, "_Compiled"] = {}


def reports() -> list[GraphRecord]:
    """Every graph the backend handled in this process, in order."""
    return list(_RECORDS)


def clear_cache() -> None:
    """Forget the rewrites kept for recompiles, the weights shared between specializations, and the
    records: afterwards the backend holds no tensor."""
    _CACHE.clear()
    _POOL.clear()
    _RECORDS.clear()


# ---- the entry point ------------------------------------------------------------------------------


def spinfx_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """A Dynamo backend: `(gm, example_inputs) -> callable(*inputs)` (see the module docstring)."""
    from spinfx.recipe import load_recipe

    opts = Options.parse(options)
    recipe = load_recipe(opts.recipe)  # an unknown recipe fails here, before any work
    _check_calib(recipe, opts.calib, example_inputs)
    graph = _Graph(gm, example_inputs, recipe, opts, index=next(_GRAPH_IDS))
    if graph.dynamic:
        return graph.dispatch  # sizes are known call by call
    return graph.specialize(graph.user_values(example_inputs))


_GRAPH_IDS = itertools.count()


def _check_calib(recipe, calib, example_inputs: list) -> None:
    """A recipe that calibrates gets a 1-D tensor of token ids, else one BadInput before any work."""
    from spinfx.api import calibrating, calibration_windows
    from spinfx.passes.calibration import check_calibration, words

    windows = calibration_windows(recipe)
    if not windows:
        return
    if calib is not None and not (isinstance(calib, torch.Tensor) and not calib.is_floating_point()):
        raise BadInput(f"spinfx backend: option calib must be a tensor of token ids, got {type(calib).__name__}")
    check_calibration(None if calib is None else calib.numel(), windows, 1, who=words(calibrating(recipe)))


def _digest(t) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ---- one Dynamo graph -----------------------------------------------------------------------------


@dataclass
class _Compiled:
    fn: Callable          # compiled(*all Dynamo inputs) -> outputs
    record: GraphRecord
    sources: list         # (weakref to each weight it was rewritten from, that weight's _version)

    def made_from(self, weights: list) -> bool:
        """Rewritten from these very tensors, unmodified since? (A freed model's tensors are dead
        references, so another model at the same addresses never hits.)"""
        return len(weights) == len(self.sources) and all(
            ref() is t and t._version == v for (ref, v), (_, t) in zip(self.sources, weights))


class _Graph:
    """One Dynamo graph and its specializations (one per set of concrete input shapes)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, recipe, opts: Options, index: int):
        from spinfx.engine.graph import dynamo_inputs

        self.gm, self.recipe, self.opts, self.index = gm, recipe, opts, index
        self.functional, self.mutated = functionalize_inputs(gm)
        fqns, _ = dynamo_inputs(gm, example_inputs)  # which inputs are module tensors — as from_dynamo decides
        self.user_pos = [i for i, f in enumerate(fqns) if f is None]
        self.weights = [(f, ex) for f, ex in zip(fqns, example_inputs) if f is not None]
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.dynamic = any(isinstance(example_inputs[i], torch.SymInt) for i in self.user_pos) or any(
            _symbolic(n.meta.get("example_value")) for n in phs)
        self.n_outputs = len(_outputs(gm))
        self.specs: dict[tuple, Callable] = {}

    def user_values(self, inputs) -> list:
        return [inputs[i] for i in self.user_pos]

    def dispatch(self, *inputs):
        users = self.user_values(inputs)
        key = _shape_key(users)
        fn = self.specs.get(key) or self.specialize(users)
        return fn(*inputs)

    def specialize(self, users: list) -> Callable:
        key = _shape_key(users)
        cache_key = self._cache_key(key)
        hit = _CACHE.get(cache_key)
        if hit is not None and not hit.made_from(self.weights):
            hit = None
        if hit is None:
            hit = self._compile(users, key)
            _CACHE[cache_key] = hit
        self.specs[key] = hit.fn
        if len(self.specs) == _MANY_SHAPES:
            warnings.warn(f"spinfx backend: graph {self.index} was rewritten and compiled for {_MANY_SHAPES} input "
                          f"shapes; dynamic shapes cost one rewrite each — use a static KV cache "
                          f"(generate(..., cache_implementation='static')) or fixed shapes", stacklevel=2)
        return hit.fn

    def _cache_key(self, shapes: tuple) -> str:
        # which tensors (by identity and version) is checked on a hit: _Compiled.made_from
        weights = [(fqn, tuple(t.shape), str(t.stride()), str(t.dtype)) for fqn, t in self.weights]
        blob = json.dumps({"sources": sources_fingerprint(), "torch": torch.__version__,
                           "recipe": self.recipe.to_dict(), "options": [self.opts.inductor, self.opts.certify,
                                                                        self.opts.strict, _digest(self.opts.calib)],
                           "graph": self.gm.code, "shapes": repr(shapes), "weights": weights}, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _compile(self, users: list, shapes: tuple) -> _Compiled:
        t0 = time.perf_counter()
        record = GraphRecord(self.index, [list(s) if isinstance(s, tuple) else s for s in shapes], "rewritten")
        try:
            if self.weights:
                fn = self._lower_rewritten(users, record)
            else:
                linears = _linear_calls(self.gm)
                if linears and self.recipe.changes_weights and not self.recipe.allow_unchanged:
                    # weights that arrive in a form spinfx cannot name must not mean "nothing to do"
                    raise Unsupported(f"{len(linears)} linear(s) ({', '.join(linears[:3])}) read weights that are "
                                      f"not the compiled module's parameters or buffers (by their Dynamo sources), "
                                      f"so recipe {self.recipe.name!r} cannot be applied")
                record.status = "no parameters"
                fn = self._lower_original(users)
        except (Unsupported, CertificateError) as e:  # this graph cannot be rewritten soundly
            if self.opts.strict:
                raise Unsupported(f"graph {self.index}: {e}") from None
            record.status, record.reason = "refused", str(e)
            warnings.warn(f"spinfx backend: graph {self.index} runs unchanged: {e}", stacklevel=2)
            fn = self._lower_original(users)
        record.seconds = time.perf_counter() - t0
        _RECORDS.append(record)
        _log(f"graph {self.index}: {record.status} in {record.seconds:.1f} s"
             + (f" ({record.reason})" if record.reason else ""))
        return _Compiled(fn, record, [(weakref.ref(t), t._version) for _, t in self.weights])

    def _lower_rewritten(self, users: list, record: GraphRecord) -> Callable:
        from spinfx.api import apply_recipe
        from spinfx.engine.graph import from_dynamo

        examples = [t for _, t in self.weights]
        flat = _merge(self.user_pos, users, examples)
        prog = from_dynamo(self.functional, flat)
        n_out = len(_outputs(prog.gm))
        if n_out != self.n_outputs + len(self.mutated):
            raise Unsupported(f"a graph input is updated through a view ({n_out} outputs after export, "
                              f"expected {self.n_outputs} + {len(self.mutated)} updated inputs)")
        prog.meta.setdefault("class", f"dynamo graph {self.index}")
        record.report = apply_recipe(prog, self.recipe, calib=self.opts.calib, certify=self.opts.certify)
        _share_weights(prog)
        # mutated Dynamo input positions -> the program's placeholder positions
        ph_of_user = {u: j for j, u in enumerate(prog.input_positions)}
        writes = []
        for dyn in self.mutated:
            u = self.user_pos.index(dyn)
            if u not in ph_of_user:
                raise SpinfxError(f"updated input {dyn} is not read by the program")
            writes.append(ph_of_user[u])
        gm = write_back(prog.gm, self.n_outputs, writes)
        run = self._finish(gm, list(prog.examples))
        picks = [self.user_pos[u] for u in prog.input_positions]
        return lambda *inputs: run(*[inputs[i] for i in picks])

    def _lower_original(self, users: list) -> Callable:
        flat = _merge(self.user_pos, users, [t for _, t in self.weights])
        return self._finish(self.gm, flat)

    def _finish(self, gm: fx.GraphModule, examples: list) -> Callable:
        return inductor(gm, examples) if self.opts.inductor else gm.forward


def inductor(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor with spinfx's decompositions; itself a Dynamo backend for models that already hold
    spinfx ops: `torch.compile(spinfx.load(dir), backend=spinfx.backend.inductor)`."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, decompositions=inductor_decompositions())


def inductor_decompositions() -> dict:
    """Inductor's table plus spinfx::qlinear and spinfx::hadamard in plain torch ops (off CUDA), which
    Inductor fuses with their neighbours (the Hadamard's butterfly passes and small K-factor matmuls)."""
    from torch._inductor.decomposition import select_decomp_table

    from spinfx.kernels.hadamard import hadamard_decompositions
    from spinfx.kernels.qlinear import qlinear_decompositions

    return {**select_decomp_table(), **qlinear_decompositions(), **hadamard_decompositions()}


# ---- graph surgery --------------------------------------------------------------------------------

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("_") and n.target != "requires_grad_"
    if n.op == "call_function":
        if n.target in _INPLACE_FUNCTIONS:
            return True
        schema = getattr(n.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        name = getattr(n.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


# Ops whose result may share memory with their first argument (an update of the result updates it).
_ALIASING = {"to", "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "__getitem__", "select",
             "narrow", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten", "contiguous",
             "detach", "t", "type_as", "as_strided", "diagonal", "unfold", "split", "chunk", "unbind"}


def _aliases(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name in _ALIASING


def functionalize_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of `gm` where each graph input updated in place (directly or through an alias such as a
    no-op `.to()`) is first cloned, the clone's final value appended to the outputs. Returns it and
    the updated inputs' positions, in the order of the appended outputs.

    An update this misses (through an op not known to alias) is still caught by export, which then
    reports one more output than expected; the caller refuses that graph.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node meta copied shallowly (Dynamo's grapharg kept)
    order = {n: i for i, n in enumerate(graph.nodes)}
    mutated, clones = [], []
    for pos, ph in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        views, todo, updated = {ph}, [ph], False
        while todo and not updated:
            for u in todo.pop().users:
                updated |= _is_inplace(u) and u.args[0] in views
                if _aliases(u) and u not in views:
                    views.add(u)
                    todo.append(u)
        if not updated:
            continue
        first = min(ph.users, key=order.get)
        with graph.inserting_before(first):
            clone = graph.call_function(torch.clone, (ph,))
        ph.replace_all_uses_with(clone, delete_user_cb=lambda u: u is not clone)
        mutated.append(pos)
        clones.append(clone)
    if clones:
        out = graph.output_node()
        values = out.args[0]
        out.args = (tuple(values) + tuple(clones) if isinstance(values, (tuple, list)) else (values, *clones),)
    return fx.GraphModule(gm, graph), mutated


def write_back(gm: fx.GraphModule, n_outputs: int, placeholders: list[int]) -> fx.GraphModule:
    """Outputs n_outputs.. are new values of the given placeholders: copy them in, return the rest."""
    if not placeholders:
        return gm
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    out = graph.output_node()
    values = list(out.args[0])
    with graph.inserting_before(out):
        for j, v in zip(placeholders, values[n_outputs:]):
            node = graph.call_function(torch.ops.aten.copy_.default, (phs[j], v))
            node.meta["val"] = phs[j].meta.get("val")
    out.args = (tuple(values[:n_outputs]),)
    gm.recompile()
    return gm


def _share_weights(prog) -> None:
    """Point each constant at an equal tensor kept by an earlier specialization, if there is one, so
    shapes compiled one by one do not each hold a copy of the model."""
    for name, t in list(prog.gm.named_buffers()):
        key = (name, tuple(t.shape), t.dtype)
        for kept in _POOL.get(key, ()):
            if kept is t or torch.equal(kept, t):
                prog.set_const(name, kept)
                break
        else:
            _POOL.setdefault(key, []).append(t)


_POOL: dict[tuple, list[torch.Tensor]] = {}


# ---- helpers --------------------------------------------------------------------------------------


@functools.cache
def sources_fingerprint() -> str:
    """sha256 over every spinfx source file (rewrite/ with its sub-packages, passes, patterns, kernels): the
    rules' code."""
    import spinfx

    h = hashlib.sha256()
    # a package's folder from __path__: spinfx.kernels is a namespace package (no __init__.py, no __file__)
    roots = {Path(next(iter(m.__path__))).resolve() for m in _spinfx_packages(spinfx)}
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):  # spinfx's sub-packages (engine, checkpoint, ...) too
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _spinfx_packages(spinfx):
    import spinfx.kernels
    import spinfx.passes
    import spinfx.patterns

    return (spinfx, spinfx.passes, spinfx.patterns, spinfx.kernels)


_TORCH_LINEARS = {torch._C._nn.linear, torch.nn.functional.linear, torch.addmm}


def _linear_calls(gm: fx.GraphModule) -> list[str]:
    """The linear layers of a Dynamo (torch-level) graph, by node name."""
    mods = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and n.target in _TORCH_LINEARS)
            or (n.op == "call_module" and isinstance(mods.get(n.target), torch.nn.Linear))]


def _outputs(gm: fx.GraphModule) -> list:
    values = gm.graph.output_node().args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def _symbolic(v) -> bool:
    if isinstance(v, torch.SymInt):
        return True
    return isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape)


def _shape_key(users: list) -> tuple:
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else int(v) if isinstance(v, (int, torch.SymInt))
                 else repr(v) for v in users)


def _merge(user_pos: list[int], users: list, weights: list) -> list:
    """The full Dynamo input list from its user inputs and its weights, in placeholder order."""
    total = len(user_pos) + len(weights)
    out, u, w = [], iter(users), iter(weights)
    marks = set(user_pos)
    for i in range(total):
        out.append(next(u) if i in marks else next(w))
    return out


def _log(msg: str) -> None:
    from spinfx.api import progress

    progress(f"backend: {msg}")


