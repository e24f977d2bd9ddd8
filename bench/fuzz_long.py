"""The fuzz campaign's long run (spinfx.testing.fuzz; the short run is tests/test_fuzz.py).

Case i is drawn from random.Random(f"{seed}:{i}"), so a run is reproducible case by case and any case
can be re-run alone (`--only I`). Each finished case is appended to a JSON-lines log; started again
with the same --log, the run skips the cases already there (resumable). Progress with rate and ETA
goes to stderr; the summary (counts per family, recipe and outcome; every crash / wrong model with its
case and traceback head; the refusal reasons) is rewritten to --out after every case.

    nice -n 19 .venv/bin/python bench/fuzz_long.py --cases 2000 --log /tmp/fuzz_long.jsonl --out bench/fuzz_long.json
    .venv/bin/python bench/fuzz_long.py --only 123 --log /tmp/fuzz_long.jsonl     # one case again, verbose
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch


SHORT = {"certified": "ok", "refused": "ref", "crash": "CRASH", "wrong": "WRONG"}


def summarize(records: list[dict], args) -> dict:
    from spinfx.testing import fuzz

    counts: dict = defaultdict(lambda: defaultdict(Counter))  # family -> recipe -> kind -> n
    reasons: dict = defaultdict(Counter)                       # family -> "recipe: reason" -> n
    bad = []
    for rec in records:
        fam = rec["case"]["family"]
        for o in rec["outcomes"]:
            counts[fam][o["recipe"]][o["kind"]] += 1
            if o["kind"] == "refused":
                reasons[fam][f"{o['recipe']}: {o['detail'][:160]}"] += 1
            elif o["kind"] in ("crash", "wrong"):
                bad.append({"index": rec["index"], "case": rec["case"], **o})
    total = Counter(o["kind"] for rec in records for o in rec["outcomes"])
    import transformers

    return {
        "cases": len(records), "planned": args.cases, "seed": args.seed,
        "rewrites": {k: total.get(k, 0) for k in fuzz.KINDS},
        "per_family": {f: {r: {k: c[r].get(k, 0) for k in fuzz.KINDS} for r in fuzz.RECIPES}
                       for f, c in sorted(counts.items())},
        "cases_per_family": dict(sorted(Counter(r["case"]["family"] for r in records).items())),
        "failures": bad,
        "refusals": {f: dict(c.most_common()) for f, c in sorted(reasons.items())},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": round(sum(r["seconds"] for r in records), 1),
    }


def table(summary: dict) -> str:
    """Markdown: per family, cases and per recipe certified / refused (crash and wrong in their own columns)."""
    from spinfx.testing import fuzz

    rows = ["| family | cases | " + " | ".join(f"{r} ✓ / refused" for r in fuzz.RECIPES) + " | crash | wrong |",
            "|---|---:|" + "---:|" * len(fuzz.RECIPES) + "---:|---:|"]
    for fam, per in summary["per_family"].items():
        cells = [f"{per[r]['certified']} / {per[r]['refused']}" for r in fuzz.RECIPES]
        bad = [sum(per[r][k] for r in fuzz.RECIPES) for k in ("crash", "wrong")]
        rows.append(f"| {fam} | {summary['cases_per_family'][fam]} | " + " | ".join(cells) + f" | {bad[0]} | {bad[1]} |")
    t = summary["rewrites"]
    rows.append(f"| **all** | **{summary['cases']}** | {t['certified']} certified, {t['refused']} refused"
                + " |" * (len(fuzz.RECIPES) - 1) + f" **{t['crash']}** | **{t['wrong']}** |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", type=Path, default=Path("fuzz_long.jsonl"), help="one JSON line per finished case")
    ap.add_argument("--out", type=Path, default=Path("fuzz_long.json"), help="the summary")
    ap.add_argument("--families", default="", help="comma-separated subset of spinfx.testing.fuzz.FAMILIES")
    ap.add_argument("--only", type=int, default=None, help="run case I alone and print its outcomes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print --out's summary as bench/README.md's table")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    torch.set_num_threads(args.threads)

    from spinfx.testing import fuzz

    families = [f for f in args.families.split(",") if f] or None
    draw = lambda i: fuzz.random_case(random.Random(f"{args.seed}:{i}"), families)  # noqa: E731
    if args.only is not None:
        case = draw(args.only)
        print(case)
        for o in fuzz.run_case(case):
            print(f"  {o.recipe}: {o.kind}: {o.detail}")
            if o.trace:
                print("    " + o.trace.replace("\n", "\n    "))
        return 0

    records = []
    if args.log.exists():
        records = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    done = {r["index"] for r in records}
    todo = [i for i in range(args.cases) if i not in done]
    print(f"[fuzz] {len(done)} cases already in {args.log}, {len(todo)} to run", file=sys.stderr)
    t0, n_bad = time.perf_counter(), sum(o["kind"] in ("crash", "wrong") for r in records for o in r["outcomes"])
    with args.log.open("a") as log:
        for k, i in enumerate(todo, 1):
            case = draw(i)
            t = time.perf_counter()
            outcomes = fuzz.run_case(case)
            rec = {"index": i, "case": case.to_dict(), "seconds": round(time.perf_counter() - t, 2),
                   "outcomes": [o.to_dict() for o in outcomes]}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            records.append(rec)
            for o in fuzz.failures(outcomes):
                n_bad += 1
                print(f"[fuzz] case {i} {case}\n  {o.recipe}: {o.kind}: {o.detail}", file=sys.stderr)
            args.out.write_text(json.dumps(summarize(records, args), indent=1) + "\n")
            rate = k / (time.perf_counter() - t0)
            eta = (len(todo) - k) / rate
            print(f"[fuzz] {len(records)}/{args.cases} cases, {rate * 60:.1f}/min, ETA {eta / 60:.0f} min, "
                  f"crash+wrong so far: {n_bad} ({case.family}: "
                  f"{' '.join(SHORT[o.kind] for o in outcomes)})", file=sys.stderr, flush=True)
    summary = summarize(records, args)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["rewrites"]))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
