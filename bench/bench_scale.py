"""Rewriting models larger than memory: `spinfx rewrite` on synthetic Llama-shaped bf16 checkpoints.

Builds random checkpoints (safetensors shards, made here, cached under $SPINFX_CACHE/scale — never in the
repo) of Llama-3.2-1B's and Llama-3-8B's shapes, then runs

    spinfx rewrite DIR --recipe <data-free YAML: fold, Hadamard R1–R4, RTN 4-bit g128, 8-bit embedding/lm_head> --out OUT

as a subprocess, sampling the RSS of its process tree every 0.2 s. Prints one markdown row per model: wall
time, peak RSS, seconds per decoder layer (from the progress lines), and the 8B/1B per-layer ratio next to
the ratio of their layers' parameters (the bar: within 1.3×).

    .venv/bin/python bench/bench_scale.py            # both (the 8B checkpoint: 16 GB of disk, built once)
    .venv/bin/python bench/bench_scale.py 1b         # one
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MODELS = {
    # Llama-3.2-1B's shape (tied embedding)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    # Llama-3-8B's shape
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
}
RECIPE = """passes:
  - fold-norms: {}
  - rotate: {r1: hadamard, r2: hadamard, r3: true, r4: true}
  - quantize: {weights: {bits: 4, group_size: 128, symmetric: true, method: rtn},
               embedding: {bits: 8}, lm_head: {bits: 8}}
"""
SHARD_BYTES = 2 << 30


def cache() -> Path:
    from spinfx.checkpoint.hf import cache_root

    return cache_root() / "scale"


def layer_params(c: dict) -> int:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h


def build(name: str) -> Path:
    """The checkpoint directory (built once: config.json, bf16 shards, index)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = cache() / f"llama-{name}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    c = MODELS[name]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(**c, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                dtype="bfloat16", bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv, v = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["vocab_size"]

    def mat(n, k):
        return (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)

    def norm():
        return (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", lambda: mat(v, h)
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            yield p + "input_layernorm.weight", norm
            yield p + "self_attn.q_proj.weight", lambda: mat(q, h)
            yield p + "self_attn.k_proj.weight", lambda: mat(kv, h)
            yield p + "self_attn.v_proj.weight", lambda: mat(kv, h)
            yield p + "self_attn.o_proj.weight", lambda: mat(h, q)
            yield p + "post_attention_layernorm.weight", norm
            yield p + "mlp.gate_proj.weight", lambda: mat(i, h)
            yield p + "mlp.up_proj.weight", lambda: mat(i, h)
            yield p + "mlp.down_proj.weight", lambda: mat(h, i)
        yield "model.norm.weight", norm
        if not c["tie_word_embeddings"]:
            yield "lm_head.weight", lambda: mat(v, h)

    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            f = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, tmp / f, metadata={"format": "pt"})
            files.append(f)
            weight_map.update({k: f for k in shard})
            shard, size = {}, 0

    for key, make in tensors():
        t = make()
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        print(f"\r[bench] building {name}: {total / 1e9:.1f} GB", end="", file=sys.stderr, flush=True)
    flush()
    print(file=sys.stderr)
    # the conventional -of- names, now that the count is known
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for a, b in renamed.items():
        os.rename(tmp / a, tmp / b)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[f] for k, f in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    os.rename(tmp, out)
    return out


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(name: str) -> dict:
    src = build(name)
    recipe = cache() / "data-free.yaml"
    recipe.write_text(RECIPE)
    out = cache() / f"out-{name}"
    cmd = [str(Path(sys.executable).with_name("spinfx")), "rewrite", str(src), "--recipe", str(recipe),
           "--out", str(out), "--force", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    lines: list[tuple[float, str]] = []

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    def read_stderr():
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            print(f"[{name} {time.perf_counter() - t0:7.1f} s] {line.rstrip()}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in threads:
        t.start()
    stdout = proc.stdout.read()
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: spinfx rewrite exited {proc.returncode}: {lines[-1][1] if lines else ''}")
    layers = MODELS[name]["num_hidden_layers"]
    # seconds per layer between the first and the last progress line (the first window's start-up excluded)
    stamps = [(t, int(m.group(1))) for t, line in lines if (m := re.search(r"\] layer (\d+)/\d+ ·", line))]
    per_layer = ((stamps[-1][0] - stamps[0][0]) / (stamps[-1][1] - stamps[0][1]) if len(stamps) > 1
                 else wall / layers)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    report = json.loads(stdout)["report"]
    return {"model": name, "layers": layers, "layer_params": layer_params(MODELS[name]), "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak[0] / 2**30, 2), "s_per_layer": round(per_layer, 2),
            "out_gb": round(size, 2), "windows": len(report.get("windows", [])),
            "max_rel": max((v for w in report.get("windows", []) for v in w["certificates"].values()), default=None)}


def main(argv: list[str]) -> None:
    names = argv or ["1b", "8b"]
    rows = [run(n) for n in names]
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; CPU: {_cpu()}\n")
    print("| model | layers | layer params | wall s | peak RSS GB | s/layer | windows | max window cert (rel) | out GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['layer_params'] / 1e6:.1f} M | {r['wall_s']} | {r['peak_rss_gb']} | "
              f"{r['s_per_layer']} | {r['windows']} | {r['max_rel']:.1e} | {r['out_gb']} |")
    by = {r["model"]: r for r in rows}
    if {"1b", "8b"} <= set(by):
        a, b = by["1b"], by["8b"]
        want = b["layer_params"] / a["layer_params"]
        got = b["s_per_layer"] / a["s_per_layer"]
        print(f"\n8B/1B seconds per layer: {got:.2f} (layer parameters: {want:.2f}; ratio {got / want:.2f}, bar ≤ 1.3)")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} vCPU"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main(sys.argv[1:])
