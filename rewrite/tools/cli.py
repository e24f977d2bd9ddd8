"""The `spinfx` command (INTERFACE.md). Exit codes: 0 ok, 2 bad input/usage, 3 unsupported model
structure, 1 internal error. Errors are one line on stderr; progress goes to stderr; `--json` prints
one object on stdout. Every input is checked before long work starts, and output directories are
written to a temporary sibling and renamed (spinfx.checkpoint.write), so a failure leaves nothing behind."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from spinfx.recipe import DEFAULT_RECIPE
from spinfx.engine.errors import BadInput, SpinfxError

DEMO_OUT = "spinfx-demo"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinfx", description="Declarative graph-rewrite compiler for PyTorch transformers.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job on the embedded default model (SmolLM2-135M): rewrite, "
                                    "perplexity and decode speed before/after, size on disk, report.html")
    d.add_argument("--recipe", default=DEFAULT_RECIPE)
    d.add_argument("--out", default=DEMO_OUT, help=f"checkpoint directory (default ./{DEMO_OUT}, replaced if it "
                                                   "holds an earlier spinfx output)")
    d.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens (default 8)")
    d.add_argument("--calib-windows", type=int, default=128,
                   help="calibration windows of 512 tokens from the other plays (default 128; GPTQ recipes "
                        "use them all, the activation statistics the first 16)")
    d.add_argument("--no-compile", action="store_true",
                   help="skip the compiled decode rows (torch.compile of both models: ≈ 1–2 min on 2 cores)")
    d.add_argument("--json", action="store_true")
    r = sub.add_parser("rewrite", help="HF model dir in → rewritten checkpoint dir out")
    r.add_argument("src", help="an HF model directory, or 'smollm2'")
    r.add_argument("--recipe", default=DEFAULT_RECIPE, help="a preset name or a YAML recipe file")
    r.add_argument("--out", required=True, help="the checkpoint directory to write")
    r.add_argument("--calib", help="a text file of calibration text (GPTQ, activation statistics)")
    r.add_argument("--force", action="store_true", help="replace --out if it exists")
    r.add_argument("--json", action="store_true")
    r.add_argument("--tp", type=int, default=1, help="tensor parallel: one shard per rank + metadata to consolidate")
    r.add_argument("--tp-attention", choices=("shard", "replicate"), default="shard",
                   help="with --tp: keep attention whole on every rank (heads not divisible by T)")
    c = sub.add_parser("consolidate", help="merge the rank shards of `rewrite --tp` back into the unsharded "
                                           "checkpoint, bit for bit (no process group)")
    c.add_argument("dir", help="a directory written by `spinfx rewrite --tp T`")
    c.add_argument("--out", required=True, help="the unsharded checkpoint directory to write")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    e = sub.add_parser("eval", help="perplexity (token-level, non-overlapping windows)")
    e.add_argument("src", help="an HF model directory, a spinfx checkpoint, or 'smollm2'")
    e.add_argument("--text", help="a text file or a Shakespeare text name (default hamlet)")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="at most this many windows (default: all)")
    e.add_argument("--json", action="store_true")
    i = sub.add_parser("inspect", help="what each rule finds in the model, contracts, refusals — nothing written")
    i.add_argument("src", help="an HF model directory, or 'smollm2'")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verbose", "-v", action="store_true", help="nearest misses for every rule")
    return p


def cmd_inspect(args) -> int:
    from spinfx.api import inspect, progress

    t0 = time.perf_counter()
    progress(f"loading and tracing {args.src} …")
    rep = inspect(args.src, name=args.src)
    progress(f"done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1, default=str))
    else:
        print(rep.to_text(verbose=args.verbose), end="")
    if rep.contract is not None and not rep.contract.ok:
        print("spinfx: contract broken: " + "; ".join(rep.contract.problems), file=sys.stderr)
        return 3
    return 0


def rewrite_to_dir(src: str, recipe: str, out: Path, force: bool, calib_file: str | None = None,
                   calib_tokens: torch.Tensor | None = None, calib_source: str | None = None):
    """`spinfx rewrite`: check every input first, then load → rewrite → save (verified). The Result; a
    model larger than one window with a recipe that streams is rewritten window by window (spinfx.checkpoint.stream)."""
    from spinfx.api import BUILTIN_TEXT, CALIB_SEQ, builtin_calibration, calibrating, calibration_windows, progress, rewrite
    from spinfx.tools.data import tokenize_file
    from spinfx.checkpoint.hf import load_model, load_tokenizer, resolve_source
    from spinfx.checkpoint.write import check_writable
    from spinfx.passes.calibration import check_calibration, words
    from spinfx.recipe import load_recipe

    if out.exists() and not force:
        raise BadInput(f"{out} exists (use --force to replace it)")
    check_writable(out)
    rec = load_recipe(recipe)
    path = resolve_source(src)
    if calib_file is not None and not Path(calib_file).is_file():
        raise BadInput(f"{calib_file}: no such calibration text file")
    calib = calib_tokens
    if calib_file is not None:
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise BadInput(f"{src} has no tokenizer to read the calibration text with")
        calib = tokenize_file(tokenizer, calib_file)
        calib_source = str(Path(calib_file).resolve())
    # as much calibration text as the recipe asks, checked before the model loads
    windows = calibration_windows(rec)
    if calib is None and windows:
        calib = builtin_calibration(path, windows)
        calib_source = BUILTIN_TEXT
    check_calibration(None if calib is None else calib.numel(), windows, CALIB_SEQ,
                      what=str(calib_file or "the calibration text"),
                      **({"who": words(calibrating(rec))} if windows else {}))
    t0 = time.perf_counter()
    if calib is None:
        from spinfx.checkpoint import stream

        windows = stream.plan(path, rec)  # None: the model fits one window, or the recipe needs it whole
        if windows is not None:
            result = stream.rewrite(windows, rec, out, force=force)
            progress(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
            return result
    progress(f"loading {src} …")
    model, _ = load_model(path)
    progress(f"tracing and rewriting with {rec.name} (certified in float64) …")
    result = rewrite(model, rec, calib=calib, calib_source=calib_source)
    result.source_dir = path
    progress(f"rewritten in {time.perf_counter() - t0:.1f} s")
    result.save(out, force=force)
    progress(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return result


def cmd_rewrite(args) -> int:
    if getattr(args, "tp", 1) != 1:
        from spinfx.dist.tp import cmd_rewrite_tp

        return cmd_rewrite_tp(args)
    out = Path(args.out)
    result = rewrite_to_dir(args.src, args.recipe, out, args.force, args.calib)
    if args.json:
        print(json.dumps({"out": str(out), "size_mb": round(dir_mb(out), 3), "report": result.report.to_dict()},
                         default=str))
    else:
        print(result.report.to_text(), end="")
        print(f"\nwrote {out} ({dir_mb(out):.1f} MB)")
    return 0


def cmd_consolidate(args) -> int:
    from spinfx.dist.tp import cmd_consolidate as run

    return run(args)


def cmd_eval(args) -> int:
    from spinfx.tools.evaluate import cmd_eval as run

    return run(args)


# ---- demo -----------------------------------------------------------------------------------------


def dir_mb(path: Path) -> float:
    """Megabytes of the weight files in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6


@torch.no_grad()
def decode_step_ms(model, vocab: int, prompt: int = 128, reps: int = 10) -> float:
    """Median ms of one decode step with a KV cache: batch 1, `prompt` tokens prefilled, then one token
    at a time. A static cache (what HF recommends with torch.compile): every step has the same shapes
    and attends over all `prompt + reps + 2` slots, the unwritten ones masked."""
    from transformers import StaticCache

    from spinfx.checkpoint.hf import cache_kwarg

    steps = reps + 2  # two warm-up steps
    ids = torch.randint(0, vocab, (1, prompt + steps), generator=torch.Generator().manual_seed(0))
    kv = {cache_kwarg(model): StaticCache(config=model.config, max_cache_len=prompt + steps)}
    model(input_ids=ids[:, :prompt], **kv, cache_position=torch.arange(prompt), use_cache=True)
    times = []
    for i in range(prompt, prompt + steps):
        t0 = time.perf_counter()
        model(input_ids=ids[:, i:i + 1], **kv, cache_position=torch.tensor([i]), use_cache=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def _compiled_decode_ms(original, rewritten, vocab: int) -> tuple[float, float]:
    """The decode step of both models under torch.compile: the original with Inductor, the rewritten one
    with `spinfx.backend.inductor` (Inductor plus the decompositions of spinfx's ops)."""
    import spinfx.backend
    from spinfx.api import progress

    out = []
    for label, m, backend in (("original", original, "inductor"), ("rewritten", rewritten, spinfx.backend.inductor)):
        progress(f"decode step of the {label}, compiled (the first call compiles: about a minute) …")
        torch._dynamo.reset()
        forward = m.forward
        m.forward = torch.compile(forward, backend=backend)
        try:
            out.append(decode_step_ms(m, vocab))
        finally:
            m.forward = forward
    return out[0], out[1]


def _demo_out(path: Path) -> None:
    """The demo replaces its own earlier output, nothing else."""
    if path.exists() and not (path / "spinfx_report.json").is_file():
        raise BadInput(f"{path} exists and is not an earlier spinfx output; choose another --out")


def cmd_demo(args) -> int:
    import spinfx
    from spinfx.api import BUILTIN_TEXT, progress
    from spinfx.tools.evaluate import evaluate
    from spinfx.checkpoint.hf import load_model, resolve_source

    recipe = args.recipe
    out = Path(args.out)
    _demo_out(out)
    src = resolve_source("smollm2")  # builds the SmolLM2 cache on first use
    t0 = time.perf_counter()
    model, tokenizer = load_model(src)
    vocab = model.config.vocab_size
    progress(f"perplexity of the original on hamlet ({args.windows} windows × 512 tokens) …")
    before = evaluate(model, "hamlet", 512, args.windows, tokenizer=tokenizer, label="original")
    progress("decode step of the original (KV cache, prefill 128) …")
    before_ms = decode_step_ms(model, vocab)
    from spinfx.tools.evaluate import calibration_tokens

    # calibration text from the other plays (never Hamlet): GPTQ if the recipe asks, and the report's
    # activation statistics before/after at every quantized linear's input
    calib = calibration_tokens(tokenizer, ctx=512, windows=args.calib_windows)
    result = rewrite_to_dir("smollm2", recipe, out, force=True, calib_tokens=calib, calib_source=BUILTIN_TEXT)
    progress("perplexity of the rewritten checkpoint (spinfx.load) …")
    rewritten = spinfx.load(out)
    after = evaluate(rewritten, "hamlet", 512, args.windows, tokenizer=tokenizer, label="rewritten")
    progress("decode step of the rewritten checkpoint …")
    after_ms = decode_step_ms(rewritten, vocab)
    rows = {"perplexity (hamlet, ctx 512)": (before.ppl, after.ppl),
            "decode step, eager (ms)": (before_ms, after_ms)}
    if not args.no_compile:
        rows["decode step, compiled (ms)"] = _compiled_decode_ms(model, rewritten, vocab)
    rows["weights on disk (MB)"] = (dir_mb(src), dir_mb(out))
    summary = {"model": "SmolLM2-135M-Instruct", "recipe": result.report.recipe, "out": str(out),
               "report_html": str(out / "report.html"), "seconds": round(time.perf_counter() - t0, 1),
               "rows": {k: {"original": round(a, 3), "rewritten": round(b, 3)} for k, (a, b) in rows.items()}}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"spinfx demo — {summary['model']}, recipe {summary['recipe']}")
    print(f"{'':32}{'original':>12}{'rewritten':>12}")
    for k, (a, b) in rows.items():
        print(f"{k:32}{a:>12.2f}{b:>12.2f}")
    print(f"checkpoint: {out}   report: {out / 'report.html'}   ({summary['seconds']:.0f} s)")
    return 0


# ---- entry ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one line of usage error
        return 2 if e.code else 0
    commands = {"inspect": cmd_inspect, "demo": cmd_demo, "rewrite": cmd_rewrite, "eval": cmd_eval, "consolidate": cmd_consolidate}
    try:
        return commands[args.cmd](args)
    except SpinfxError as e:
        print(f"spinfx: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spinfx: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, exit 1 (SPINFX_TRACE=1 shows the traceback)
        from spinfx.engine.rule import trace_level

        if trace_level():
            raise
        print(f"spinfx: internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
