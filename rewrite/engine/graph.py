"""Front-ends to one canonical ATen graph.

Two ways in, one form out:
  * `from_module(model, args, kwargs)`   torch.export.export(strict=False) of an nn.Module;
  * `from_dynamo(gm, example_inputs)`   what a torch.compile backend receives (parameters arrive as
                                          graph inputs; their Dynamo sources give back the FQNs).
Both re-trace through torch.export + run_decompositions({}) and then canonicalize, so the same model
gives the same `Program` (tests/test_graph.py proves it on the printed form).

Canonical form (what every pattern may rely on):
  * ATen ops (`torch.ops.aten.*` overloads); higher-order ops inlined; `aten.linear` kept whole;
  * parameters, buffers and tensor constants are `get_attr` nodes whose target is the original
    fully-qualified name (`model.layers.0.self_attn.q_proj.weight`); tied tensors appear once, under
    their first name, the others recorded in `Program.aliases`;
  * placeholders only for the user inputs the graph reads;
  * no runtime asserts, no no-op casts/clones/aliases, no dead nodes; views as reshape, type_as as a cast;
  * every node has `meta["val"]` (a FakeTensor or a Python scalar) and `meta["module"]` (the module
    path it came from, "" for the top level) with `meta["module_type"]` (class name).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.utils import _pytree as pytree

from spinfx.engine.errors import SpinfxError

aten = torch.ops.aten

# Ops that are identity in an inference graph once their dtype/device do not change.
_NOOP_IF_SAME = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default}
_IDENTITY = {aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default, aten._assert_async.msg}
# view -> reshape: export records views that are valid for the strides seen at trace time; a rewrite
# that changes a producer's layout (an inserted op returning a contiguous tensor) would break them.
# In a functional inference graph reshape means the same and copies only when it must.
_RENAME = {aten._unsafe_view.default: aten.reshape.default, aten.view.default: aten.reshape.default}


@dataclass
class Program:
    """A model as one canonical ATen graph plus what is needed to call it like the original."""

    gm: fx.GraphModule
    in_spec: Any = None          # pytree spec of (args, kwargs) of the original call, or None (flat)
    out_spec: Any = None         # pytree spec of the original outputs, or None (flat tuple)
    input_positions: list[int] = field(default_factory=list)  # flat user-input index of each placeholder
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical FQN -> other (tied) names
    meta: dict[str, Any] = field(default_factory=dict)           # driver facts (model_type, layers, ...)
    examples: list = field(default_factory=list)                 # example value of each placeholder

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def const(self, fqn: str) -> torch.Tensor:
        return self.gm.get_buffer(fqn)

    def set_const(self, fqn: str, value: torch.Tensor) -> None:
        set_const(self.gm, fqn, value)

    def consts(self) -> dict[str, torch.Tensor]:
        return dict(self.gm.named_buffers())

    def clone(self) -> "Program":
        """Copy of the graph sharing the constant tensors (copy-on-write: constants are replaced with
        set_const, never modified in place), so certificates cost no copy of the weights."""
        gm = copy.deepcopy(self.gm, {id(t): t for t in itertools.chain(self.gm.buffers(), self.gm.parameters())})
        return Program(gm, self.in_spec, self.out_spec, list(self.input_positions),
                       copy.deepcopy(self.aliases), dict(self.meta), list(self.examples))

    def flat_inputs(self, *args, **kwargs) -> list:
        if self.in_spec is None:
            flat = list(args)
        else:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self.in_spec:
                raise SpinfxError(f"called with a different input structure than traced: {spec} vs {self.in_spec}")
        return [flat[i] for i in self.input_positions]

    def __call__(self, *args, **kwargs):
        out = self.gm(*self.flat_inputs(*args, **kwargs))
        if self.out_spec is None:
            return out
        return pytree.tree_unflatten(list(out), self.out_spec)


# ----------------------------------------------------------------------------------------------
# Front-ends


def from_module(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> Program:
    """torch.export (non-strict) of `model(*args, **kwargs)` into the canonical form."""
    kwargs = dict(kwargs or {})
    with torch.no_grad(), _quiet():
        ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        prog = _from_exported(ep, module_prefix="")
    flat = pytree.tree_leaves((tuple(args), kwargs))
    prog.examples = [flat[i] for i in prog.input_positions]
    return prog


@contextlib.contextmanager
def _quiet():
    """torch 2.13's export warns about its own pytree internals (LeafSpec); not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


# A module tensor's Dynamo source: ROOT + steps (`._modules['m']._parameters['w']` or `.m.w`). ROOT is `L['self']`,
# `L['args'][0]` (a traced `(*args, **kwargs)` wrapper: transformers ≥ 5.24) or any other: the graph says which.
_ROOT = re.compile(r"[A-Z]\[[^\]]+\](?:\[[^\]]+\])*")
_STEP = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def dynamo_inputs(gm: fx.GraphModule, example_inputs: list) -> tuple[list[str | None], str | None]:
    """Per Dynamo input, the FQN of the compiled module's tensor it is (None: a user input), and the
    root naming that module: the one most tensor sources reach into through `_modules`/`_parameters`/
    `_buffers` (a cache object's tensors never do); tensors of other roots stay inputs."""
    split = []
    for n, ex in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        name = getattr(getattr(n.meta.get("grapharg"), "source", None), "name", None)
        root = _ROOT.match(name) if isinstance(name, str) and isinstance(ex, torch.Tensor) else None
        steps = list(_STEP.finditer(name, root.end())) if root else []
        whole = steps and "".join(m.group(0) for m in steps) == name[root.end():]
        split.append((root.group(0), ".".join(m.group(2) or m.group(3) for m in steps),
                      any(m.group(1) for m in steps)) if whole else None)
    roots = [s[0] for s in split if s is not None and s[2]]
    root = max(set(roots), key=roots.count) if roots else None
    return [s[1] if s is not None and s[0] == root else None for s in split], root


class _Lifted(torch.nn.Module):
    """Holds a Dynamo graph's module tensors under their FQNs so that export sees them as constants."""

    def __init__(self, gm: fx.GraphModule, fqns: list[str | None], consts: list):
        super().__init__()
        object.__setattr__(self, "_gm", gm)  # not a submodule: its own attributes must not leak
        self._fqns = fqns  # per placeholder: the constant's FQN, or None for a user input
        for fqn, t in zip(fqns, consts):
            if fqn is not None:
                set_const(self, fqn, t.detach())

    def forward(self, *user_inputs):
        it = iter(user_inputs)
        flat = [next(it) if fqn is None else self.get_buffer(fqn) for fqn in self._fqns]
        with fx_traceback.preserve_node_meta():  # keep Dynamo's nn_module_stack on the new nodes
            return fx.Interpreter(self._gm).run(*flat)


def from_dynamo(gm: fx.GraphModule, example_inputs: list) -> Program:
    """A torch.compile backend's (gm, example_inputs) into the canonical form: inputs whose Dynamo source
    is a tensor of the compiled module become named constants, the others stay inputs, in order (flat)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    fqns, root = dynamo_inputs(gm, example_inputs)
    user = [ex for f, ex in zip(fqns, example_inputs) if f is None]
    with unset_fake_temporarily():
        lifted = _Lifted(gm, fqns, example_inputs)
        with torch.no_grad(), _quiet():
            ep = torch.export.export(lifted, tuple(user), strict=False)
            prog = _from_exported(ep, module_prefix=root or "L['self']")
    prog.in_spec = prog.out_spec = None
    prog.examples = [user[i] for i in prog.input_positions]
    return prog


# ----------------------------------------------------------------------------------------------
# Canonicalization


def _from_exported(ep: torch.export.ExportedProgram, module_prefix: str) -> Program:
    ep = ep.run_decompositions({})
    sig = ep.graph_signature
    gm_src = ep.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root = torch.nn.Module()
    state = {**ep.state_dict, **ep.constants}

    user_ph: list[tuple[int, fx.Node]] = []
    const_name: dict[str, str] = {}   # placeholder name -> canonical fqn
    by_storage: dict[tuple, str] = {}
    aliases: dict[str, list[str]] = {}
    from torch.export.graph_signature import InputKind

    user_index = 0
    for spec in sig.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.USER_INPUT:
            user_ph.append((user_index, name))
            user_index += 1
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise SpinfxError(f"unsupported exported input kind {spec.kind} for {spec.target}")
        tensor = state[spec.target].detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        fqn = spec.target.removeprefix("_lifted_tensor_constants.")
        if key in by_storage and tensor.numel() > 0:
            canon = by_storage[key]
            aliases.setdefault(canon, []).append(fqn)
        else:
            by_storage[key] = canon = fqn
            _ensure_path(root, canon)
            _set_tensor(root, canon, tensor)
        const_name[name] = canon

    # Placeholders for user inputs first (in order), then get_attrs, then the body.
    src_nodes = {n.name: n for n in gm_src.graph.nodes}
    input_positions = []
    for idx, name in user_ph:
        n = src_nodes[name]
        if not n.users:
            continue
        new = graph.placeholder(n.name)
        new.meta = dict(n.meta)
        env[n] = new
        input_positions.append(idx)
    attr_nodes: dict[str, fx.Node] = {}
    for name, canon in const_name.items():
        n = src_nodes[name]
        if not n.users:
            continue
        if canon not in attr_nodes:
            a = graph.get_attr(canon)
            a.meta = {"val": n.meta.get("val"), "module": _owner(canon), "module_type": ""}
            attr_nodes[canon] = a
        env[n] = attr_nodes[canon]

    for n in gm_src.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            graph.output(pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args[0]))
            continue
        if n.op != "call_function":
            raise SpinfxError(f"unexpected {n.op} node {n.name} after export")
        if n.target in _ASSERTS:
            continue
        new_args = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args)
        new_kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.kwargs)
        src = new_args[0] if new_args else None
        if n.target in _IDENTITY or (n.target in _NOOP_IF_SAME and _same_meta(src, n)):
            env[n] = src
            continue
        target = _RENAME.get(n.target, n.target)
        if target is aten.type_as.default:  # y is read for its dtype only: a cast, y keeps only its real readers
            target, new_args, new_kwargs = aten._to_copy.default, new_args[:1], {"dtype": n.meta["val"].dtype}
        if target is aten.reshape.default and isinstance(src, fx.Node) and _same_shape(src, n):
            env[n] = src
            continue
        new = graph.call_function(target, tuple(new_args), dict(new_kwargs))
        new.meta = {"val": n.meta.get("val"), **_provenance(n, module_prefix)}
        new.meta.update({k: n.meta[k] for k in ("stack_trace",) if k in n.meta})
        env[n] = new

    graph.eliminate_dead_code()
    gm = fx.GraphModule(root, graph)
    out_spec = ep.call_spec.out_spec
    return Program(gm, ep.call_spec.in_spec, out_spec, input_positions, aliases)


def _same_meta(src: Any, n: fx.Node) -> bool:
    a, b = src.meta.get("val") if isinstance(src, fx.Node) else None, n.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.dtype, a.device) == (b.dtype, b.device)


def _same_shape(src: fx.Node, n: fx.Node) -> bool:
    a, b = src.meta.get("val"), n.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape


def _provenance(n: fx.Node, prefix: str) -> dict:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return {"module": "", "module_type": ""}
    path, cls = list(stack.values())[-1]
    if prefix and (path == prefix or path.startswith(prefix + ".")):
        path = path[len(prefix) + 1:]
    cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return {"module": path, "module_type": cls.rsplit(".", 1)[-1]}


def _owner(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _ensure_path(root: torch.nn.Module, fqn: str) -> None:
    mod = root
    for part in fqn.split(".")[:-1]:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if (leaf := fqn.rsplit(".", 1)[-1]) not in mod._buffers:
        mod.register_buffer(leaf, torch.empty(0), persistent=True)


def _set_tensor(root: torch.nn.Module, fqn: str, value: torch.Tensor) -> None:
    root.get_submodule(_owner(fqn))._buffers[fqn.rsplit(".", 1)[-1]] = value


def set_const(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    """Create or replace the constant `fqn` (a buffer under its dotted path)."""
    _ensure_path(gm, fqn)
    _set_tensor(gm, fqn, value)


def add_const(gm: fx.GraphModule, fqn: str, value: torch.Tensor, before: fx.Node | None = None) -> fx.Node:
    """A new named constant and its get_attr node (placed before `before`, or after the last get_attr)."""
    set_const(gm, fqn, value)
    g = gm.graph
    if before is None:
        attrs = [n for n in g.nodes if n.op in ("get_attr", "placeholder")]
        ctx = g.inserting_after(attrs[-1]) if attrs else g.inserting_before(next(iter(g.nodes)))
    else:
        ctx = g.inserting_before(before)
    with ctx:
        node = g.get_attr(fqn)
    node.meta = {"val": _fake_like(value), "module": _owner(fqn), "module_type": ""}
    return node


def drop_const(prog: Program, node: fx.Node) -> None:
    """Remove an unused get_attr node and its tensor (canonical form: one get_attr per constant)."""
    if node.users:
        return
    prog.graph.erase_node(node)
    owner, _, leaf = node.target.rpartition(".")
    del (prog.gm.get_submodule(owner) if owner else prog.gm)._buffers[leaf]
    prog.aliases.pop(node.target, None)


def _fake_like(value: torch.Tensor):
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True).from_tensor(value)


def infer_meta(gm: fx.GraphModule, nodes: Iterable[fx.Node] | None = None) -> None:
    """Fill meta['val'] for nodes that lack it by running FakeTensorProp over the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    if all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output",)):
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    phs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in phs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
