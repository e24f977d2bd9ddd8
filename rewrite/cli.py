"""The `spinfx` command (INTERFACE.md). Exit codes: 0 ok, 2 bad input/usage, 3 unsupported model
structure, 1 internal error. Errors are one line on stderr; `--json` prints one object on stdout."""
from __future__ import annotations

import argparse
import json
import sys
import time

from spinfx.errors import SpinfxError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinfx", description="Declarative graph-rewrite compiler for PyTorch transformers.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job on the embedded default model (SmolLM2-135M)")
    d.add_argument("--json", action="store_true")
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


def cmd_demo(args) -> int:
    args.src = "smollm2"
    args.verbose = False
    return cmd_inspect(args)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one line of usage error
        return 2 if e.code else 0
    try:
        return {"inspect": cmd_inspect, "demo": cmd_demo}[args.cmd](args)
    except SpinfxError as e:
        print(f"spinfx: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("spinfx: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
