"""Calibration text as passes take it: `ctx.calib`, a 1-D tensor of token ids, cut into windows shaped
like the program's token input; a recipe that calibrates on more text than it was given is refused."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput
from spinfx.engine.graph import Program
from spinfx.kernels.hadamard import hadamard_by_gemm


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


# Ops of the calibration forward worth more than one thread. The rest (RoPE, norms, SiLU, views and
# copies on [512, ≤ 1536] activations) run single-threaded: on this shared 2-core machine under load,
# every parallel region waits for a descheduled thread, and a SmolLM2 window took 8–9 s with 2 threads
# against 1.3–3.2 s with 1 (HF eager forward, load average ≈ 5).
THREADED = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.addmm.default, torch.ops.aten.matmul.default,
            torch.ops.aten.scaled_dot_product_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, hadamard_by_gemm}


@contextlib.contextmanager
def restore_threads():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def float_values(prog: Program, batches: list[list], wanted: list[fx.Node]) -> Iterator[tuple[fx.Node, list]]:
    """The values of the `wanted` nodes of `prog` on every calibration window, in graph order: yields
    (node, [its value in window 0, 1, …]) once all windows computed it.

    The float program runs on a copy in the model's dtype, segment by segment over all windows (a segment
    ends right after a wanted node), keeping per window only the values alive across the boundary (≈ the
    residual stream) and dropping each value after its last reader; nothing after the last wanted node
    runs. Online Hadamards run as GEMMs (`hadamard_by_gemm`), and only `THREADED` ops use more than one thread."""
    from spinfx.engine.certify import finalize

    hadamard_op = getattr(getattr(torch.ops, "spinfx", None), "hadamard", None)
    hadamard_op = hadamard_op.default if hadamard_op is not None else None
    run = prog.clone()
    finalize(run)
    nodes = list(run.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    cuts = sorted({pos[n.name] + 1 for n in wanted})
    at_cut: dict[int, list[fx.Node]] = defaultdict(list)
    for n in wanted:
        at_cut[pos[n.name] + 1].append(n)
    mine = {n.name: n for n in nodes}
    last_read = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    free_after: dict[int, list[fx.Node]] = defaultdict(list)
    for a, i in last_read.items():
        free_after[i].append(a)
    keep = {mine[n.name] for n in wanted}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    envs = [dict(zip(placeholders, b)) for b in batches]
    threads = torch.get_num_threads()

    def value(env: dict):
        return lambda a: run.const(a.target) if a.op == "get_attr" else env[a]

    start = 0
    with torch.no_grad(), restore_threads():
        for cut in cuts:
            for env in envs:
                for i in range(start, cut):
                    n = nodes[i]
                    if n.op == "call_function":
                        fn = hadamard_by_gemm if n.target is hadamard_op else n.target
                        torch.set_num_threads(threads if fn in THREADED else 1)
                        v = value(env)
                        env[n] = fn(*fx.node.map_arg(n.args, v), **fx.node.map_arg(n.kwargs, v))
                    for dead in free_after.get(i, ()):
                        if dead not in keep:
                            env.pop(dead, None)
            torch.set_num_threads(threads)
            start = cut
            for n in at_cut[cut]:
                yield n, [env[mine[n.name]] for env in envs]
                keep.discard(mine[n.name])
                if last_read.get(mine[n.name], -1) < cut:
                    for env in envs:
                        env.pop(mine[n.name], None)
