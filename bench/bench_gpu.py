"""spinfx on a CUDA GPU: the Triton bodies against float64 references, their speed beside cuBLAS and
torch's int4 kernel, the product path (`spinfx.load` / `torch.compile(backend=spinfx)`) on CUDA, and
batch-1 decode (bench/README.md "## GPU").

CI never has a GPU: this is the check a session runs when it is lent one (one short run, ≈ 5 min on an
H100). Every section catches its own failure and reports it; results go to stdout and `--out` (JSON).

    python bench/bench_gpu.py --out /tmp/gpu.json                  # everything
    python bench/bench_gpu.py --only kernels --quick               # correctness only, small grid

Sections:
- kernels: `spinfx::qlinear` (Triton) for bits 2/3/4/8, group 32/128/per-channel, symmetric or not,
  act-order g_idx, bias, x in fp32/fp16/bf16, M = 1…512, against x·Wᵀ+b in float64 with W the
  dequantized weight — bound |y−ref| ≤ rtol·(|x|·Mᵀ+|b|) with tests/test_qlinear.py's M and rtol
  (1e-5 fp32; 2⁻⁸ fp16/bf16, one rounding of y and of x·W's terms); `spinfx::hadamard` (Triton) for
  the plans of common widths in fp64/fp32/bf16/fp16 against the float64 transform.
- speed: one linear at decode (M=1) and prefill (M=2048) shapes: Triton w4 g64 vs fp16 cuBLAS vs
  torch's tinygemm int4 (`aten._weight_int4pack_mm`, bf16); Hadamard Triton vs a dense fp16 matmul.
- product: a zoo Llama rewritten with spinquant-w4a16 and saved on the CPU, loaded with `spinfx.load`,
  moved to CUDA: logits against the CPU's; `torch.compile(model, backend=spinfx)` on CUDA.
- decode: HF Llama of SmolLM2-135M's shape and 4 layers of Llama-3-8B's shape (random weights, fp16),
  a static KV cache, batch 1: fp16 eager / compiled vs every Linear replaced by spinfx's w4 g64 QLinear
  (the layer `spinfx.load` builds) eager / compiled (`spinfx.backend.inductor`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

RESULTS: dict = {}
T0 = time.perf_counter()
OUT: list = []  # --out, once parsed: every log line rewrites it, so a run stopped at its limit keeps its results


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)
    if OUT:
        with open(OUT[0], "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def section(name):
    def wrap(fn):
        def run(args):
            log(f"== {name}")
            try:
                RESULTS[name] = fn(args)
            except Exception as e:  # noqa: BLE001 - a section's failure is a result, reported
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                log(f"{name} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
        run.name = name
        return run
    return wrap


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median ms per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ---- kernels: correctness ----------------------------------------------------------------------
RTOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -7}


def _term_magnitude(qw) -> torch.Tensor:
    """M = (|q| + |z|)·s in float64, [N, K] (tests/test_qlinear.py's term_magnitude)."""
    mid, g = 1 << (qw.bits - 1), qw.group_index()
    z = qw.zero_unsigned()[:, g] - mid
    return ((qw.unpack() - mid - z).abs() + z.abs()).double() * qw.weight_scale.double()[:, g]


@section("kernels")
def kernels(args):
    from spinfx.kernels.hadamard import hadamard, hadamard_transform
    from spinfx.kernels.hadamard_matrices import plan
    from spinfx.kernels.qlinear import generic_attrs, generic_tensors
    from spinfx.kernels.quant_rtn import quantize_rtn
    from spinfx.kernels.quant_weight import dequantize

    dev = args.device
    gen = torch.Generator().manual_seed(0)
    out = RESULTS["kernels"] = {"qlinear": [], "hadamard": []}  # filled as it goes
    # Each new specialization of the Triton kernel (bits, zero point, g_idx, bias, dtype, tile, M == 1,
    # sizes' divisibility) compiles once, ≈ 2 s on the H100 machine's CPU: the grid covers each
    # specialization once or twice instead of their product (a full product ran past 4 minutes).
    cases = [(576, 1536, 64), (4096, 4096, 128)] if not args.quick else [(256, 192, 64)]
    variants = [(4, 64, True, False), (4, 64, False, False), (4, 64, True, True), (8, None, True, False),
                (3, 64, False, False), (2, 64, True, False)]
    ms = (1, 512) if not args.quick else (1, 64)
    worst = 0.0
    for i, (k, n, group) in enumerate(cases):
        w = torch.randn(n, k, generator=gen)
        for bits, g, symmetric, act_order in variants:
            g = group if g is not None else None
            g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32) if act_order else None
            qw = quantize_rtn(w, bits, g, symmetric=symmetric, g_idx=g_idx, bias=torch.randn(n, generator=gen))
            wd, mag = dequantize(qw, torch.float64).to(dev), _term_magnitude(qw).to(dev)
            tensors = {name: None if t is None else t.to(dev) for name, t in generic_tensors(qw, qw.bias).items()}
            dtypes = (torch.float16, torch.float32, torch.bfloat16) if (bits, symmetric) == (4, True) and not act_order \
                else (torch.float16,) if i else (torch.float16, torch.float32)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(dev)
                b = qw.bias.double().to(dev)
                scale = x.double().abs() @ mag.T + b.abs()
                for dt in dtypes:
                    xd = x.to(dt)
                    y = torch.ops.spinfx.qlinear(xd, **tensors, **generic_attrs(qw)).double()
                    # the reference on the rounded input: the kernel's input is x in its dtype
                    ref_d = xd.double() @ wd.T + b
                    ratio = ((y - ref_d).abs() / (RTOL[dt] * scale)).max().item()
                    worst = max(worst, ratio)
                    out["qlinear"].append(dict(k=k, n=n, m=m, bits=bits, group=g, sym=symmetric,
                                               act_order=act_order, dtype=str(dt)[6:], ratio=ratio, ok=ratio <= 1.0))
                    log(out["qlinear"][-1])
    bad = [r for r in out["qlinear"] if not r["ok"]]
    log(f"qlinear: {len(out['qlinear'])} cases, {len(bad)} over the bound, worst |Δ|/bound {worst:.3f}")
    for r in bad[:10]:
        log("  over:", r)
    widths = (576, 4096, 14336) if not args.quick else (64, 192)
    hworst = {}
    for n in widths:
        p = plan(n)
        for rows in (1, 2048):
            x64 = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dev)
            for transpose in (False, True):
                for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16) if not transpose else \
                        (torch.float32,):
                    xd = x64.to(dt)
                    ref_d = hadamard_transform(xd.double(), p, transpose)
                    y = hadamard(xd, p, transpose).double()
                    err = ((y - ref_d).abs().max() / ref_d.abs().max()).item()
                    out["hadamard"].append(dict(n=n, rows=rows, transpose=transpose, dtype=str(dt)[6:], rel=err))
                    hworst[str(dt)[6:]] = max(hworst.get(str(dt)[6:], 0.0), err)
    bound = {"float64": 1e-12, "float32": 2e-6, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}
    out["hadamard_worst"] = hworst
    out["hadamard_ok"] = all(hworst[d] <= bound[d] for d in hworst)
    log("hadamard worst max|Δ|/max|ref| by dtype:", {d: f"{v:.2e}" for d, v in hworst.items()},
        "ok" if out["hadamard_ok"] else "OVER", bound)
    out["qlinear_ok"] = not bad
    out["qlinear_worst_ratio"] = worst
    return out


# ---- kernels: speed ----------------------------------------------------------------------------
def _tinygemm(w: torch.Tensor, group: int):
    """torch's int4 CUDA kernel (what torchao's int4 weight-only uses): (x_bf16) -> y."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8)·scale + zero
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wp = torch.ops.aten._convert_weight_to_int4pack(packed.cuda(), 8)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16).cuda()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, wp, group, sz)


@section("speed")
def speed(args):
    from spinfx.kernels.hadamard import hadamard
    from spinfx.kernels.hadamard_matrices import plan
    from spinfx.kernels.qlinear import generic_attrs, generic_tensors
    from spinfx.kernels.quant_rtn import quantize_rtn

    rows, had = [], []
    RESULTS["speed"] = {"qlinear": rows, "hadamard": had}
    gen = torch.Generator().manual_seed(1)
    for k, n in ((576, 1536), (4096, 4096), (4096, 14336), (14336, 4096)):
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        qw = quantize_rtn(w, 4, 64, symmetric=True)
        t = {name: None if v is None else v.cuda() for name, v in generic_tensors(qw, None).items()}
        a = generic_attrs(qw)
        w16 = w.half().cuda()
        try:
            tg = _tinygemm(w, 64)
        except Exception as e:  # noqa: BLE001
            tg, tg_err = None, f"{type(e).__name__}: {e}"
        for m in (1, 16, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.bfloat16()
            r = dict(k=k, n=n, m=m,
                     triton_w4_ms=cuda_ms(lambda: torch.ops.spinfx.qlinear(x, **t, **a)),
                     cublas_fp16_ms=cuda_ms(lambda: torch.nn.functional.linear(x, w16)))
            r["tinygemm_w4_ms"] = cuda_ms(lambda: tg(xb)) if tg else None
            if tg is None:
                r["tinygemm_error"] = tg_err
            rows.append(r)
            log(r)
    for n in (4096, 14336):
        p = plan(n)
        dense = hadamard(torch.eye(n, dtype=torch.float32, device="cuda"), p).half()
        for m in (1, 2048):
            x = torch.randn(m, n, device="cuda", dtype=torch.float16)
            r = dict(n=n, m=m, triton_ms=cuda_ms(lambda: hadamard(x, p)), dense_fp16_ms=cuda_ms(lambda: x @ dense))
            had.append(r)
            log(r)
    return {"qlinear": rows, "hadamard": had}


# ---- the product path on CUDA ------------------------------------------------------------------
@section("product")
def product(args):
    import spinfx
    import spinfx.backend
    from spinfx.testing import zoo

    out = {}
    dev = args.device
    zm = zoo.build("llama", layers=2)
    ids = zm.example_inputs["input_ids"]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = spinfx.rewrite(zm.model, "spinquant-w4a16", example_inputs=zm.example_inputs)
        res.save(f"{d}/ckpt")
        out["rewrite_save_s"] = time.perf_counter() - t
        model = spinfx.load(f"{d}/ckpt", cpu_compute_dtype=None).eval()
        with torch.no_grad():
            ref = model(input_ids=ids).logits.double()
            model.to(dev)
            y = model(input_ids=ids.to(dev)).logits.double().cpu()
            out["load_fp32_rel"] = ((y - ref).abs().max() / ref.abs().max()).item()
            model.half()
            y16 = model(input_ids=ids.to(dev)).logits.double().cpu()
            out["load_fp16_rel"] = ((y16 - ref).abs().max() / ref.abs().max()).item()
    log("spinfx.load on CUDA vs CPU, max|Δ|/max|logit|:", out)
    zm = zoo.build("llama", layers=2)
    inputs = {"input_ids": ids, "use_cache": False}
    ref = spinfx.rewrite(zm.model, "spinquant-w4a16", inputs).module(**inputs).logits.double()
    model = zm.model.to(dev)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=spinfx.backend.spinfx_backend, options={"recipe": "spinquant-w4a16"})
    t = time.perf_counter()
    y = compiled(input_ids=ids.to(dev), use_cache=False).logits.double().cpu()
    out["backend_first_call_s"] = time.perf_counter() - t
    # the offline rewrite on the CPU vs the backend's program on the device (tests/test_backend.py: < 1e-4)
    out["backend_vs_offline_rel"] = ((y - ref).abs().max() / ref.abs().max()).item()
    out["backend_graphs"] = len(spinfx.backend.reports())
    log("backend on CUDA:", {k: v for k, v in out.items() if k.startswith("backend")})
    return out


# ---- decode ------------------------------------------------------------------------------------
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "llama3-8b-4layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              tie_word_embeddings=False, head_dim=128),
}


def _quantize_linears(model, bits=4, group=64):
    from spinfx.kernels.qlinear import QLinear

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                q = QLinear.from_float(child, bits=bits, group_size=group, cpu_compute_dtype=None)
                setattr(mod, child_name, q)
    return model


def _decode_ms(model, vocab: int, dev: str, prompt: int = 128, steps: int = 32) -> tuple[float, float]:
    """(median ms of one decode step, ms of the `prompt`-token prefill): batch 1, a static cache."""
    from transformers import StaticCache

    from spinfx.checkpoint.hf import cache_kwarg

    ids = torch.randint(0, vocab, (1, prompt + steps + 2), device=dev)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 2)
    sync(dev)
    t = time.perf_counter()
    kv = {cache_kwarg(model): cache}
    model(input_ids=ids[:, :prompt], **kv, cache_position=torch.arange(prompt, device=dev), use_cache=True)
    sync(dev)
    prefill = (time.perf_counter() - t) * 1e3
    times = []
    for i in range(prompt, prompt + steps + 2):
        pos = torch.tensor([i], device=dev)
        t = time.perf_counter()
        model(input_ids=ids[:, i:i + 1], **kv, cache_position=pos, use_cache=True)
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3, prefill


@section("decode")
def decode(args):
    import transformers as tf

    import spinfx.backend

    rows, dev = RESULTS.setdefault("decode", []), args.device
    dtype = torch.float16 if dev == "cuda" else torch.float32
    shapes = SHAPES if not args.quick else {"tiny": dict(SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512)}
    for shape, cfg in shapes.items():
        torch.manual_seed(0)
        config = tf.LlamaConfig(**cfg)
        base = tf.LlamaForCausalLM(config).to(dtype).eval()
        variants = {"fp16 eager": lambda: base.to(dev),
                    "spinfx w4 g64 eager": lambda: _quantize_linears(base).to(dev)}
        if args.compile:
            variants["fp16 compiled"] = lambda: torch.compile(base.to(dev), mode="default")
            variants["spinfx w4 g64 compiled"] = lambda: torch.compile(base.to(dev), backend=spinfx.backend.inductor)
        order = ["fp16 eager", "fp16 compiled", "spinfx w4 g64 eager", "spinfx w4 g64 compiled"]
        for name in [o for o in order if o in variants]:
            if time.perf_counter() - T0 > args.budget_s:
                log(f"decode {shape} {name}: skipped (time budget)")
                continue
            torch._dynamo.reset()
            try:
                m = variants[name]()
                with torch.no_grad():
                    t = time.perf_counter()
                    _decode_ms(m, config.vocab_size, dev, steps=4)  # warm-up / compile
                    warm = time.perf_counter() - t
                    res = [_decode_ms(m, config.vocab_size, dev) for _ in range(3)]
                step = statistics.median(r[0] for r in res)
                pre = statistics.median(r[1] for r in res)
                mb = sum(b.numel() * b.element_size() for b in m.buffers()) + sum(
                    p.numel() * p.element_size() for p in m.parameters())
                row = dict(shape=shape, variant=name, decode_ms=step, prefill128_ms=pre, warmup_s=warm, mb=mb / 2 ** 20)
            except Exception as e:  # noqa: BLE001
                row = dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            log(row)
        del base
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated: kernels,speed,product,decode")
    ap.add_argument("--quick", action="store_true", help="small grids (a smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the kernels section "
                                                     "under TRITON_INTERPRET=1")
    ap.add_argument("--budget-s", type=float, default=420.0, help="decode variants are skipped past this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="decode: the compiled variants too (minutes each)")
    args = ap.parse_args()
    if args.out:
        OUT.append(args.out)
    torch.set_grad_enabled(False)
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        import transformers
        import triton
        env.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError as e:
        env["import_error"] = str(e)
    RESULTS["env"] = env
    log(env)
    sections = [kernels, speed, product, decode]
    only = [s for s in args.only.split(",") if s]
    for s in sections:
        if not only or s.name in only:
            s(args)
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and "error" in v]
    log("sections failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
