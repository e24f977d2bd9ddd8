"""Streaming rewrite of a Hugging Face checkpoint: a window of decoder layers at a time.

A causal LM here is a token embedding, N decoder layers of one class, a final norm and an lm_head. The
stream driver cuts it into windows. Window w is the model class itself, built with `num_hidden_layers
= k` and `vocab_size = rows`, holding layers [i, i+k) of the source and rows [a, b) of every
vocabulary-sized tensor (the embedding table, the lm_head): a small causal LM of its own. The recipe
runs on each window exactly as `spinfx.rewrite` runs on a whole model — traced, rules, float64
certificates — and the windows' checkpoint parts are put back together under the source's names: layer
j of window w is layer i+j, row chunks are concatenated in order, everything else (the final norm, an
online matrix) must come out identical from every window.

Why the pieces compose: a recipe streams only when each of its passes says it does (`Pass.streams`):
every edit of a tensor reads that tensor, constants of its own window and values fixed by shapes and
options (a seeded rotation; R2's per-layer seed counts from `Context.site_base`). Then rewriting the
windows and concatenating equals rewriting the model; tests/test_stream.py checks it bit for bit
against the in-memory rewrite. Each window's certificate is a local certificate: a window maps token
ids to logits, so the rotations inside it (R1 on its stream, R2 in its attention) must cancel within it
for its certificate to hold — one certificate per window in the report.

Memory: one window's weights in float64 (`WINDOW_BYTES` decides k, at least one layer) plus its rows of
the vocabulary tensors. The source is read with safetensors slices (never whole); finished layers are
written to their shard at once; row chunks go to temporary files in the staged output directory and are
copied into the last shard at the end. A model that fits one window is rewritten in memory
(`spinfx.rewrite` + `Result.save`, whose checkpoint is also loaded back whole and verified); so is a
recipe that does not stream (calibration) and a model whose layers are not all alike.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from spinfx.engine.errors import BadInput, SpinfxError, Unsupported

WINDOW_BYTES = 1 << 30  # float64 bytes of decoder-layer weights one window may hold
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


@dataclass
class Plan:
    """How a source directory is cut into windows."""

    path: Path
    config: Any                      # the source's transformers config
    files: dict[str, Path]           # tensor name -> safetensors file
    layers: str                      # module path of the decoder layers ("model.layers")
    n: int                           # decoder layers
    k: int                           # layers per window
    vocab: int
    rows: int                        # vocabulary rows per window (a multiple of 8; the last window: the rest)
    vocab_modules: frozenset[str]    # the embedding and lm_head modules
    tied: bool
    linears: list[str]               # every nn.Linear of the whole model

    @property
    def windows(self) -> int:
        return -(-self.n // self.k)

    def window(self, w: int) -> tuple[range, tuple[int, int]]:
        """(layers, (first row, end row)) of window w; rows spread so every window gets some."""
        layers = range(w * self.k, min(self.n, (w + 1) * self.k))
        a = min(self.vocab, w * self.rows)
        b = self.vocab if w == self.windows - 1 else min(self.vocab, a + self.rows)
        return layers, (a, b)


@dataclass
class StreamResult:
    """What `spinfx rewrite` prints: the merged report of every window, and where it was written."""

    report: Any
    out: Path
    source_dir: Path
    windows: int = 0


def _progress(msg: str) -> None:
    from spinfx.api import progress

    progress(msg)


# ---- planning -----------------------------------------------------------------------------------------


def plan(path: Path, recipe, window_bytes: int | None = None, layers_per_window: int | None = None,
         log: Callable[[str], None] = _progress) -> Plan | None:
    """The windows for rewriting `path` with `recipe`, or None (with the reason logged) when it is
    rewritten in memory instead: the model fits one window, the recipe does not stream, or the model is
    not a stack of alike layers whose tensors are named as the model class names them."""
    from spinfx.checkpoint.hf import _transformers

    if not recipe.streams:
        if layers_per_window is not None:
            which = ", ".join(p.name for p in recipe.passes if not p.streams())
            raise Unsupported(f"recipe {recipe.name!r} cannot be streamed: {which} needs the whole model "
                              f"(calibration) or does not say it works window by window")
        return None
    found_files = _tensor_files(path)
    if found_files is None:
        return None
    files, numel = found_files
    if layers_per_window is None and 8 * numel <= (window_bytes or WINDOW_BYTES):
        return None  # the whole model fits one window in float64: read from the headers, no model class built
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = _skeleton(config)
    found = _decoder_layers(model)
    if found is None:
        log("streaming: no list of alike decoder layers found; rewriting in memory")
        return None
    layers, n = found
    layer_params = sum(p.numel() for p in model.get_submodule(f"{layers}.0").parameters())
    k = layers_per_window or max(1, (window_bytes or WINDOW_BYTES) // max(1, 8 * layer_params))
    if k >= n and layers_per_window is None:
        return None  # fits one window: the in-memory path (and its whole-model verification)
    k = min(k, n)
    names = {id(m): name for name, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab_modules = frozenset(names[id(m)] for m in (emb, head) if m is not None)
    tied = head is not None and head.weight is emb.weight
    vocab = emb.weight.shape[0]
    windows = -(-n // k)
    rows = -(-vocab // windows)
    rows = -(-rows // 8) * 8  # a multiple of 8: tensors packed along rows (8 codes per int32) split cleanly
    linears = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    p = Plan(path, config, files, layers, n, k, vocab, rows, vocab_modules, tied, linears)
    _check_names(p, model)
    return p


def _tensor_files(path: Path) -> tuple[dict[str, Path], int] | None:
    """(tensor name -> its safetensors file, the number of values in all of them), from the headers."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None  # pytorch_model.bin: read whole by the in-memory path
    out, numel = {}, 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                out[key] = f
                numel += int(torch.Size(h.get_slice(key).get_shape()).numel())
    return out, numel


def _skeleton(config) -> torch.nn.Module:
    """The model class for `config` with its parameters on the meta device (buffers real), tied as the
    config says."""
    from accelerate import init_empty_weights

    from spinfx.checkpoint.hf import _transformers, attention_impl

    tf = _transformers()
    with init_empty_weights(include_buffers=False):
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention_impl(config),
                                                    dtype=torch.float32)
    model.tie_weights()
    return model


def _decoder_layers(model: torch.nn.Module) -> tuple[str, int] | None:
    """(path, count) of the ModuleList whose children are the class's decoder layers (transformers names
    them in `_no_split_modules`), all of one class."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1 \
                and type(m[0]).__name__ in classes:
            return name, len(m)
    return None


def _check_names(p: Plan, model: torch.nn.Module) -> None:
    """Every tensor the model class expects is in the source under its name, with its shape, as a float."""
    from safetensors import safe_open

    want = {k: v for k, v in model.state_dict().items()}
    if p.tied:
        want.pop(_name_of(model, model.get_output_embeddings()) + ".weight", None)
    persistent = {k for k, _ in model.named_parameters()} | {
        k for k, _ in model.named_buffers() if k in model.state_dict()}
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for key, t in sorted(want.items()):
            if key not in persistent:
                continue
            f = p.files.get(key)
            if f is None:
                raise BadInput(f"{p.path}: tensor {key} is missing (config.json's {model.config.model_type} "
                               f"expects it)")
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt"))
            sl = handles[f].get_slice(key)
            shape = tuple(sl.get_shape())
            if shape != tuple(t.shape):
                raise BadInput(f"{f.name}: tensor {key} has shape {list(shape)}, but config.json makes it "
                               f"{list(t.shape)}")
            if sl.get_dtype() not in ("F64", "F32", "F16", "BF16") and t.is_floating_point():
                raise BadInput(f"{f.name}: tensor {key} is {sl.get_dtype()}, where a float weight is expected")


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# ---- one window ---------------------------------------------------------------------------------------


def _window_config(p: Plan, layers: range, rows: int):
    data = p.config.to_dict()
    data.update(num_hidden_layers=len(layers), vocab_size=rows, pad_token_id=None)
    if isinstance(data.get("layer_types"), list) and len(data["layer_types"]) == p.n:
        data["layer_types"] = data["layer_types"][layers.start:layers.stop]
    return p.config.__class__.from_dict(data)


def _local(p: Plan, name: str, layers: range) -> str | None:
    """The source name of window tensor `name` (layer j of the window is layer layers[j])."""
    pre = p.layers + "."
    if not name.startswith(pre):
        return name
    j, _, rest = name[len(pre):].partition(".")
    return f"{pre}{layers.start + int(j)}" + (f".{rest}" if rest else "")


def _read_window(p: Plan, model: torch.nn.Module, layers: range, rows: tuple[int, int]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    head = model.get_output_embeddings()
    skip = {_name_of(model, head) + ".weight"} if p.tied else set()
    vocab_tensors = {f"{m}.{leaf}" for m in p.vocab_modules for leaf in ("weight", "bias")}
    out = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    buffers = dict(model.named_buffers())
    for key in model.state_dict():
        if key in skip:
            continue
        src = _local(p, key, layers)
        if src not in p.files:
            if key in buffers:
                continue  # a buffer the class builds itself
            raise BadInput(f"{p.path}: tensor {src} is missing")
        by_file.setdefault(p.files[src], []).append((key, src))
    for f, keys in by_file.items():
        with safe_open(f, framework="pt") as h:  # closed per window: no mapped pages outlive it
            for key, src in keys:
                sl = h.get_slice(src)
                t = sl[rows[0]:rows[1]] if key in vocab_tensors else h.get_tensor(src)
                if not t.is_floating_point():
                    raise BadInput(f"{f.name}: tensor {src} is {t.dtype}, where a float weight is expected")
                if not torch.isfinite(t).all():
                    raise BadInput(f"{f.name}: tensor {src} contains NaN or Inf")
                out[key] = t.to(torch.float32)  # as hf.load_model reads a model for rewriting
    return out


def _rewrite_window(p: Plan, recipe, w: int):
    """(checkpoint parts renamed to the whole model's names, report, matches outside the layers) of window w."""
    from spinfx.api import RewrittenModule, Result, apply_recipe, load
    from spinfx.checkpoint.parts import checkpoint_parts

    layers, rows = p.window(w)
    model = _skeleton(_window_config(p, layers, rows[1] - rows[0]))
    tensors = _read_window(p, model, layers, rows)
    model.load_state_dict(tensors, strict=False, assign=True)
    if p.tied:
        model.tie_weights()
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise SpinfxError(f"streaming window {w}: tensors left unread: {', '.join(meta[:3])}")
    del tensors
    model.eval()
    prog, module = load(model)
    # The program holds the weights now. The module is kept for what a checkpoint needs of the model class
    # (names, shapes, ties): each parameter becomes a one-element tensor expanded to its shape, so the float32
    # copies are freed once the passes' float64 masters replace them in the program.
    for param in model.parameters():
        param.data = torch.zeros((), dtype=param.dtype).expand(param.shape)
    gc.collect()
    report = apply_recipe(prog, recipe, certify=True, site_base=layers.start)
    parts = checkpoint_parts(Result(RewrittenModule(prog), report, prog, module, p.path))
    # the report outlives the window: it keeps counts, not matches (their nodes hold the window's program);
    # per rule, the matches outside the decoder layers (the final norm → lm_head), found in every window
    outside = {}
    for i, res in enumerate(report.passes):
        for j, r in enumerate(res.rules):
            outside[i, j] = sum(not _in_layers(p, m) for m in r.found)
            r.found = []
    return _renamed(p, parts, layers), report, outside


def _renamed(p: Plan, parts, layers: range):
    from spinfx.checkpoint.parts import Parts

    def g(name: str) -> str:
        return _local(p, name, layers)

    out = Parts(config=dict(parts.config), notes=list(parts.notes))
    out.tensors = {g(k): v for k, v in parts.tensors.items()}
    out.quant_groups = {s: [g(m) for m in ms] for s, ms in parts.quant_groups.items()}
    out.tied = {g(a): g(b) for a, b in parts.tied.items()}
    out.transforms = {key: dict(grp, apply=[dict(a, targets=[g(t) for t in a["targets"]]) for a in grp["apply"]])
                      for key, grp in parts.transforms.items()}
    return out


# ---- the whole model ----------------------------------------------------------------------------------


class _Assembly:
    """The windows' parts put back together; layer tensors are written as each window finishes."""

    def __init__(self, p: Plan, tmp: Path):
        from spinfx.checkpoint.parts import Parts

        self.p, self.tmp = p, tmp
        self.parts = Parts()
        self.shards = p.windows + 1
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.rows: dict[str, tuple[torch.dtype, tuple[int, ...], int, Path]] = {}  # vocab tensor -> file
        self.shapes: dict[str, torch.Tensor] = {}   # vocab modules' weight_shape, rows fixed at the end
        self.others: dict[str, torch.Tensor] = {}   # the same in every window
        (tmp / ".rows").mkdir()

    def add(self, w: int, parts) -> None:
        from safetensors.torch import save_file

        layer_pre = self.p.layers + "."
        shard = {}
        _, (a, b) = self.p.window(w)
        for key, t in parts.tensors.items():
            module = key.rsplit(".", 1)[0]
            if key.startswith(layer_pre):
                shard[key] = t.detach().contiguous().clone()
            elif module in self.p.vocab_modules and key.endswith(".weight_shape"):
                self.shapes[key] = t  # [rows, in]: compressed-tensors' record of the unpacked shape
            elif module in self.p.vocab_modules:
                self._rows(key, t, b - a)
            elif key in self.others:
                if not (self.others[key].shape == t.shape and torch.equal(self.others[key], t)):
                    raise SpinfxError(f"streaming: {key} came out differently in window {w}; the recipe does "
                                      f"not stream")
            else:
                self.others[key] = t.detach().contiguous().clone()
        name = f"model-{w + 1:05d}-of-{self.shards:05d}.safetensors"
        if shard:
            save_file(shard, self.tmp / name, metadata={"format": "pt"})
            self.weight_map.update({k: name for k in shard})
            self.total += sum(t.numel() * t.element_size() for t in shard.values())
        self._merge(parts)

    def _rows(self, key: str, t: torch.Tensor, rows: int) -> None:
        packed = rows // 8 if rows % 8 == 0 else None  # codes packed 8 per int32 along the rows
        if t.dim() == 0 or t.shape[0] not in (rows, packed):
            raise SpinfxError(f"streaming: {key} {list(t.shape)} is not one row per vocabulary entry")
        f = self.tmp / ".rows" / key
        dtype, tail, n, _ = self.rows.get(key, (t.dtype, tuple(t.shape[1:]), 0, f))
        if (dtype, tail) != (t.dtype, tuple(t.shape[1:])):
            raise SpinfxError(f"streaming: {key} changed dtype or width between windows")
        with open(f, "ab") as fh:
            fh.write(_bytes(t))
        self.rows[key] = (dtype, tail, n + t.shape[0], f)

    def _merge(self, parts) -> None:
        mine = self.parts
        for k, v in parts.config.items():
            if k in mine.config and mine.config[k] != v:
                raise SpinfxError(f"streaming: windows disagree on config {k}: {mine.config[k]!r} vs {v!r}")
            mine.config[k] = v
        for s, ms in parts.quant_groups.items():
            mine.quant_groups.setdefault(s, [])
            mine.quant_groups[s] += [m for m in ms if m not in mine.quant_groups[s]]
        mine.tied.update(parts.tied)
        for key, grp in parts.transforms.items():
            have = mine.transforms.setdefault(key, dict(grp, apply=[]))
            for a in grp["apply"]:
                same = next((x for x in have["apply"] if x["location"] == a["location"]), None)
                if same is None:
                    have["apply"].append(dict(a, targets=list(a["targets"])))
                else:
                    same["targets"] += [t for t in a["targets"] if t not in same["targets"]]
        mine.notes += [n for n in parts.notes if n not in mine.notes]

    def finish(self) -> None:
        """The last shard (vocabulary tensors, assembled from their row files, and the rest) and the index."""
        name = f"model-{self.shards:05d}-of-{self.shards:05d}.safetensors"
        entries = []
        for key, (dtype, tail, n, f) in sorted(self.rows.items()):
            entries.append((key, dtype, (n, *tail), f))
        for key, t in sorted(self.shapes.items()):
            full = t.clone()
            full[0] = self.p.vocab
            entries.append((key, full.dtype, tuple(full.shape), full))
        for key, t in sorted(self.others.items()):
            entries.append((key, t.dtype, tuple(t.shape), t))
        self.total += write_streamed_safetensors(self.tmp / name, entries)
        self.weight_map.update({e[0]: name for e in entries})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in (self.tmp / ".rows").iterdir():
            f.unlink()
        (self.tmp / ".rows").rmdir()


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_streamed_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple, Any]]) -> int:
    """A safetensors file from (name, dtype, shape, tensor or raw-bytes file) entries, the files copied in
    blocks (never whole in memory). Returns the data bytes written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = []
    for name, dtype, shape, _ in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for (name, _, _, src), n in zip(entries, sizes):
            if isinstance(src, Path):
                if src.stat().st_size != n:
                    raise SpinfxError(f"streaming: {name} has {src.stat().st_size} bytes of rows, expected {n}")
                with open(src, "rb") as fi:
                    while block := fi.read(64 << 20):
                        fh.write(block)
            else:
                fh.write(_bytes(src))
    os.chmod(path, 0o666 & ~_umask())
    return offset


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _merge_reports(reports: list, counted_outside: list[dict], p: Plan):
    """One report: every window's rule counts summed, window 0's findings and layer picture, per-layer
    quantization findings of every window, one certificate per window."""
    import copy

    from spinfx.engine.report import Report

    first = reports[0]
    rep = Report(model=first.model, recipe=first.recipe, passes=[copy.copy(x) for x in first.passes],
                 extra={k: v for k, v in first.extra.items() if k in ("layer_graph",)})
    for i, res in enumerate(rep.passes):
        res.rules = [copy.copy(r) for r in res.rules]
        res.findings = dict(res.findings)
        res.seconds = sum(r.passes[i].seconds for r in reports)
        for other, outside in zip(reports[1:], counted_outside[1:]):
            o = other.passes[i]
            for j, (mine, theirs) in enumerate(zip(res.rules, o.rules)):
                again = outside[i, j]  # counted in window 0 already
                mine.matches += theirs.matches - again
                mine.applied += max(0, theirs.applied - again)
                mine.declined += theirs.declined
            if isinstance(o.findings.get("layers"), dict) and isinstance(res.findings.get("layers"), dict):
                res.findings["layers"] = {**res.findings["layers"], **o.findings["layers"]}
            res.notes += [n for n in o.notes if n not in res.notes]
            res.refusals += [n for n in o.refusals if n not in res.refusals]
        certs = [r.passes[i].certificate for r in reports if r.passes[i].certificate]
        if certs:  # the worst window's numbers; every window's in extra["windows"]
            res.certificate = dict(max(certs, key=lambda c: c["rel"]), windows=len(certs))
    # a linear cut into row chunks (the lm_head) is in every window: count the model's linears once each
    unchanged = sorted({_local(p, m, p.window(w)[0]) for w, r in enumerate(reports)
                        for m in r.extra.get("linears", {}).get("unchanged", [])})
    rep.extra["linears"] = {"total": len(p.linears), "changed": len(p.linears) - len(unchanged)}
    if unchanged:
        rep.extra["linears"]["unchanged"] = unchanged
    rep.extra["windows"] = []
    for w, r in enumerate(reports):
        layers, rows = p.window(w)
        rep.extra["windows"].append({
            "layers": [layers.start, layers.stop], "rows": list(rows),
            "certificates": {x.name: x.certificate["rel"] for x in r.passes if x.certificate}})
    return rep


def _in_layers(p: Plan, match) -> bool:
    root = getattr(match, "root", None)
    module = root.meta.get("module", "") if root is not None else ""
    return module.startswith(p.layers + ".")


def rewrite(p: Plan, recipe, out: Path, force: bool = False, log: Callable[[str], None] = _progress) -> StreamResult:
    """Rewrite plan `p`'s source window by window into the checkpoint directory `out` (staged: nothing is
    left at `out` unless every window certified and every file was written)."""
    from spinfx.checkpoint.hf import copy_tokenizer_files
    from spinfx.checkpoint.write import staged_dir, write_config
    from spinfx.tools.report_html import write_html

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise BadInput(f"{out} exists (use --force to replace it)")
    if out.resolve() == p.path.resolve():
        raise BadInput(f"{out} is the source directory; the source is never modified")
    log(f"streaming {p.n} layers in {p.windows} windows of {p.k} layer(s) and ≤{p.rows} vocabulary rows, "
        f"certified in float64 window by window …")
    reports, outsides = [], []
    t0 = time.perf_counter()
    with staged_dir(out) as tmp:
        asm = _Assembly(p, tmp)
        for w in range(p.windows):
            parts, report, outside = _rewrite_window(p, recipe, w)
            asm.add(w, parts)
            reports.append(report)
            outsides.append(outside)
            del parts
            gc.collect()
            layers, _ = p.window(w)
            done, dt = layers.stop, time.perf_counter() - t0
            rate = dt / done
            log(f"layer {done}/{p.n} · {rate:.1f} s/layer · ETA {_eta(rate * (p.n - done))}")
        asm.finish()
        write_config(p.config, asm.parts, p.linears, tmp)
        copy_tokenizer_files(p.path, tmp)
        rep = _merge_reports(reports, outsides, p)
        rep.extra["checkpoint"] = {"verified": False, "streamed": True, "notes": asm.parts.notes,
                                   "why": "streamed: every window certified in float64; not loaded back whole"}
        rep.extra["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "spinfx_report.json").write_text(json.dumps(rep.to_dict(), indent=1, default=str))
        write_html(StreamResult(rep, out, p.path), tmp / "report.html")
    return StreamResult(rep, out, p.path, p.windows)


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"
