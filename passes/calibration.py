"""Calibration text as passes take it: `ctx.calib`, a 1-D tensor of token ids, cut into windows shaped
like the program's token input; a recipe that calibrates on more text than it was given is refused."""
from __future__ import annotations

import torch

from spinfx.engine.errors import BadInput
from spinfx.engine.graph import Program


def words(p) -> tuple[str, str]:
    """For messages: (what makes the pass `p` calibrate, the option that sets its number of windows) — a
    calibrating pass's `calibration_words`, else its name and `samples`."""
    return getattr(p, "calibration_words", (p.name, f"{p.name}: samples"))


def check_calibration(tokens: int | None, windows: int, window: int, what: str = "the calibration text",
                      who: tuple[str, str] = ("quantize: method gptq", "quantize: samples")) -> None:
    """A recipe that calibrates on `windows` windows of `window` tokens gets at least that many
    tokens, else one BadInput saying how many are needed and how many `what` has (never a silent
    calibration on less than the recipe asks). `who`: the calibrating pass's `words(p)`."""
    if not windows:
        return
    if tokens is None:
        raise BadInput(f"the recipe calibrates on {windows} windows of {window} tokens ({who[0]}) "
                       f"and no calibration text was given: pass calib=<1-D tensor of token ids> (CLI: --calib FILE), "
                       f"or use a data-free recipe (hadamard-w4a16: Hadamard rotations, RTN weights)")
    if tokens < windows * window:
        have = tokens // window
        fewer = f", or ask for fewer windows ({who[1]}: {have})" if have else ""
        raise BadInput(f"the recipe calibrates on {windows} windows of {window} tokens ({windows * window} tokens); "
                       f"{what} has {tokens} tokens ({have} window{'' if have == 1 else 's'}): give more text{fewer}")


def token_batches(prog: Program, tokens: torch.Tensor, limit: int | None = None) -> list[list]:
    """Cut a 1-D token stream into graph inputs shaped like the program's token input (calibration), on
    that input's device (a model compiled on CUDA calibrates on CUDA with token ids given on the CPU)."""
    ex = list(prog.examples)
    pos = next(i for i, e in enumerate(ex) if isinstance(e, torch.Tensor) and not e.is_floating_point())
    t, n = ex[pos], tokens.numel() // ex[pos].numel()
    n = n if limit is None else min(limit, n)
    return [ex[:pos] + [tokens[i * t.numel():(i + 1) * t.numel()].reshape(t.shape).to(t.device, t.dtype)] + ex[pos + 1:]
            for i in range(n)]
