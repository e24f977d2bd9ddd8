"""Perplexity evaluation (`spinfx eval`) and calibration text that never overlaps it.

    evaluate("smollm2", text="hamlet", ctx=512, windows=8).ppl     # 42.56 (TESTBED.md)
    evaluate(rewritten.module, tokenizer=tok, text="hamlet", ctx=512)

Token-level perplexity over non-overlapping windows of one text (`spinfx.tools.data.perplexity`). `text` is
a file or the name of one of the Shakespeare texts ("hamlet", "macbeth", …). Calibration windows
(`calibration_tokens`) come from *other* texts than the evaluated one, so the two never overlap.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spinfx.tools import data
from spinfx.tools.data import perplexity, stderr_progress, text_names, text_path, tokenize_file
from spinfx.engine.errors import BadInput
from spinfx.checkpoint.hf import log

DEFAULT_TEXT = "hamlet"


@dataclass
class Perplexity:
    ppl: float
    text: str      # the file scored
    ctx: int
    windows: int
    tokens: int    # predicted tokens: windows · (ctx - 1)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_text(text: str | Path) -> Path:
    """A text file, or the name of a Shakespeare text ("hamlet" → …/hamlet_gut.txt)."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise BadInput(f"{text}: not a text file")
    if str(text) in text_names():
        return text_path(str(text))
    raise BadInput(f"{text}: no such file, nor a Shakespeare text ({', '.join(text_names()[:4])}, …)")


def load_source(src: str | Path):
    """(model, tokenizer or None) of "smollm2" or a model directory, a spinfx checkpoint included
    (`spinfx.load`: quantized linears and online rotations come back)."""
    import spinfx
    from spinfx.checkpoint.hf import load_tokenizer, resolve_source

    path = resolve_source(src)
    return spinfx.load(path), load_tokenizer(path)


def _traced_length(model) -> int | None:
    """The sequence length a rewritten (traced, shape-specialized) module accepts, or None."""
    prog = getattr(model, "_prog", None)
    if prog is None:
        return None
    ids = [e for e in prog.examples if isinstance(e, torch.Tensor) and not e.is_floating_point()]
    return ids[0].shape[-1] if ids else None


def evaluate(model, text: str | Path = DEFAULT_TEXT, ctx: int = 512, windows: int | None = None, *,
             tokenizer=None, label: str | None = None) -> Perplexity:
    """Perplexity of `model` ("smollm2", a model directory, or a module called as
    `model(input_ids=ids, use_cache=False).logits`) on the first `windows` (None: all) windows of
    `ctx` tokens of `text`. A module needs its `tokenizer`; a rewritten module traced for another
    sequence length is refused (its graph is specialized to the traced shape)."""
    if isinstance(model, (str, Path)):
        label = label or str(model)
        model, loaded = load_source(model)
        tokenizer = tokenizer or loaded
    if tokenizer is None:
        raise BadInput("evaluate needs a tokenizer (the model directory has none; pass tokenizer=)")
    traced = _traced_length(model)
    if traced is not None and traced != ctx:
        raise BadInput(f"the rewritten module was traced for sequences of {traced} tokens, not ctx={ctx}: "
                       f"rewrite it with example inputs of shape [1, {ctx}]")
    path = resolve_text(text)
    wins = data.windows(tokenize_file(tokenizer, path), ctx, windows)
    t0 = time.perf_counter()
    ppl = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, wins,
                     stderr_progress(f"{label or type(model).__name__} on {path.name}"))
    return Perplexity(ppl, str(path), ctx, len(wins), len(wins) * (ctx - 1), time.perf_counter() - t0)


def calibration_tokens(tokenizer, ctx: int = 512, windows: int = 128, exclude: str | Path = DEFAULT_TEXT) -> torch.Tensor:
    """`windows · ctx` tokens of Shakespeare (texts in name order) that never come from `exclude`,
    the evaluation text: a 1-D tensor, what `spinfx.rewrite(..., calib=)` takes."""
    skip = resolve_text(exclude).resolve()
    need, parts = windows * ctx, []
    for name in text_names():
        path = text_path(name)
        if path.resolve() == skip:
            continue
        parts.append(tokenize_file(tokenizer, path))
        if sum(p.numel() for p in parts) >= need:
            return torch.cat(parts)[:need]
    raise BadInput(f"the Shakespeare texts in {data.shakespeare_dir()} hold fewer than {need} tokens")


def cmd_eval(args) -> int:
    """`spinfx eval SRC [--text FILE] [--ctx N] [--windows N] [--json]`: progress on stderr; with
    --json one object on stdout (src, ppl, text, ctx, windows, tokens, seconds)."""
    log(f"evaluating {args.src} …")
    res = evaluate(args.src, text=args.text or DEFAULT_TEXT, ctx=args.ctx, windows=args.windows)
    if args.json:
        print(json.dumps({"src": str(args.src), **res.to_dict()}))
    else:
        print(f"{args.src}: perplexity {res.ppl:.3f} on {Path(res.text).name} "
              f"({res.windows} windows × {res.ctx} tokens, {res.seconds:.0f} s)")
    sys.stdout.flush()
    return 0
