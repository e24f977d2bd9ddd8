"""spinfx on a CUDA GPU: the Triton bodies against float64 references, their speed beside cuBLAS and
torch's int4 kernel, the product path (`spinfx.load` / `torch.compile(backend=spinfx)`) on CUDA, and
batch-1 decode (bench/README.md "## GPU").

CI never has a GPU: this is the check a session runs when it is lent one (one short run, ≈ 5 min on an
H100; `--only kernels,speed` ≈ 2 min). Every section catches its own failure and reports it; results go
to stdout and `--out` (JSON).

    python bench/bench_gpu.py --out /tmp/gpu.json                  # everything
    python bench/bench_gpu.py --only kernels --quick               # correctness only, small shapes
    TRITON_INTERPRET=1 python bench/bench_gpu.py --only kernels --quick --device cpu   # CPU smoke run

Sections:
- kernels: `spinfx::qlinear`'s Triton body on QLINEAR_CASES — both paths (split-K GEMV, dequantize +
  cuBLAS), bits 2/3/4/8, every way the GEMV loads scales, zeros, act-order g_idx, bias, x in
  fp16/fp32/bf16, one case per Triton specialization — against x·Wᵀ+b in float64 with W the
  dequantized weight: |y−ref| ≤ rtol·(|x|·Mᵀ+|b|) with tests/test_qlinear.py's M and rtol (1e-5 fp32;
  2⁻⁸ fp16, 2⁻⁷ bf16: one rounding of y and of x·W's terms); `spinfx::hadamard` (Triton) for the plans
  of common widths in fp64/fp32/bf16/fp16 against the float64 transform. With `--device cpu` under
  TRITON_INTERPRET=1 (and `--quick`) it is a CPU smoke run of the same code.
- speed: one linear at M = 1, 16, 2048 (4-bit g64): `spinfx::qlinear` (the path `plan` picks, reported)
  vs fp16 cuBLAS vs torch's tinygemm int4 (`aten._weight_int4pack_mm`, bf16), each as called (CUDA
  events around the call: Python dispatch and launches included) and replayed from a CUDA graph
  (`*_graph_ms`: device time); at M = 16 also the dequantize + cuBLAS path (the crossover); Hadamard
  Triton vs a dense fp16 matmul.
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


# (K, N, bits, group, symmetric, act_order, x dtype, M, forced split): one or two cases per Triton
# specialization of the qlinear kernels (each compiles once, ≈ 2 s on the H100 machine's CPU: a
# product of the options ran past 4 minutes). On the first shape (K = 576: 72 words per row, not a
# multiple of 16) the GEMV runs each way of loading scales (step_groups 1 / 4 / per code with and
# without g_idx), zeros, 8 bits with split = 1 (bias added in the GEMV), x rows in two row blocks,
# and the dequantize + cuBLAS path in fp16 and (3 bits, act-order, zeros) bf16; on the second
# (4096 × 4096, aligned words) fp16 and fp32 both paths: fp32 checks the long-K sums at 1e-5 (split-K
# partials, IEEE sgemm).
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
QLINEAR_CASES = [
    (576, 1536, 4, 64, True, False, F16, 1, None),   # GEMV, one scale group per step
    (576, 1536, 4, 64, True, False, F16, 5, None),   # GEMV, block_m 4 × 2 row blocks
    (576, 1536, 4, 64, True, False, F16, 512, None),  # dequantize + mm
    (576, 1536, 4, 64, False, False, BF16, 1, None),  # zeros, bf16
    (576, 1536, 4, 64, True, True, F16, 1, None),    # per-code scales via g_idx
    (576, 1536, 3, 64, False, False, F16, 1, None),  # per-code scales (groups split 3-bit words)
    (576, 1536, 3, 64, False, True, BF16, 512, None),  # dequantize: 3 bits, zeros, g_idx, bf16
    (576, 1536, 2, 32, False, False, F16, 1, None),  # 4 scale groups per step, zeros
    (576, 1536, 8, None, True, False, F16, 1, 1),    # per-channel, split 1: bias in the GEMV
    (4096, 4096, 4, 128, True, False, F16, 1, None),
    (4096, 4096, 4, 128, True, False, F32, 1, None),
    (4096, 4096, 4, 128, True, False, F16, 512, None),
    (4096, 4096, 4, 128, True, False, F32, 512, None),
]
QUICK_SHAPES = {576: (256, 96), 4096: (512, 128)}  # --quick (and the interpreter): small shapes, M <= 64


@section("kernels")
def kernels(args):
    from spinfx.kernels.hadamard import hadamard, hadamard_transform
    from spinfx.kernels.hadamard_matrices import plan
    from spinfx.kernels.qlinear import generic_attrs, generic_tensors
    from spinfx.kernels.qlinear_triton import plan as qplan
    from spinfx.kernels.qlinear_triton import qlinear_triton, sm_count
    from spinfx.kernels.quant_rtn import quantize_rtn
    from spinfx.kernels.quant_weight import dequantize

    dev = args.device
    gen = torch.Generator().manual_seed(0)
    out = RESULTS["kernels"] = {"qlinear": [], "hadamard": []}  # filled as it goes
    t0 = time.perf_counter()
    worst = 0.0
    for k, n, bits, g, symmetric, act_order, dt, m, split in QLINEAR_CASES:
        if args.quick:
            k, n = QUICK_SHAPES[k]
            m = min(m, 64)
        row = dict(k=k, n=n, m=m, bits=bits, group=g, sym=symmetric, act_order=act_order, dtype=str(dt)[6:])
        try:  # one case's failure (a compile error of one specialization) is a result, the others still run
            w = torch.randn(n, k, generator=gen)
            g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32) if act_order else None
            qw = quantize_rtn(w, bits, g, symmetric=symmetric, g_idx=g_idx, bias=torch.randn(n, generator=gen))
            wd, mag = dequantize(qw, torch.float64).to(dev), _term_magnitude(qw).to(dev)
            tensors = {name: None if t is None else t.to(dev) for name, t in generic_tensors(qw, qw.bias).items()}
            attrs = generic_attrs(qw)
            p = qplan(m, n, k, bits, attrs["group_size"], act_order, sm_count(torch.device(dev)), split=split)
            row["path"] = p.path
            if p.path == "gemv":
                row.update(split=p.split, step_groups=p.step_groups, m_blocks=p.m_blocks)
            x = torch.randn(m, k, generator=gen).to(dev).to(dt)
            b = qw.bias.double().to(dev)
            y = qlinear_triton(x, **tensors, **attrs, plan_=p).double()
            # the reference on the rounded input: the kernel's input is x in its dtype
            ref = x.double() @ wd.T + b
            row["ratio"] = ((y - ref).abs() / (RTOL[dt] * (x.double().abs() @ mag.T + b.abs()))).max().item()
            row["ok"] = row["ratio"] <= 1.0
            worst = max(worst, row["ratio"])
            if dev == "cuda" and split is None and m == 1:  # the op (its CUDA registration), same plan: same bits
                row["op_equal"] = torch.equal(torch.ops.spinfx.qlinear(x, **tensors, **attrs).double(), y)
                row["ok"] = row["ok"] and row["op_equal"]
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        out["qlinear"].append(row)
        log(row)
    bad = [r for r in out["qlinear"] if not r["ok"]]
    out["qlinear_s"] = time.perf_counter() - t0
    log(f"qlinear: {len(out['qlinear'])} cases, {len(bad)} failed, worst |Δ|/bound {worst:.3f}, "
        f"{out['qlinear_s']:.1f} s")
    for r in bad[:10]:
        log("  failed:", r)
    t0 = time.perf_counter()
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
    out["hadamard_s"] = time.perf_counter() - t0
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


def graph_ms(fn, inner: int = 20) -> float:
    """Median ms per call of `inner` calls captured in one CUDA graph and replayed: device time, without
    the Python dispatch and launch cost that `cuda_ms` includes when the kernels are short."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and compile) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return cuda_ms(graph.replay, reps=10, warmup=2) / inner


def _timed(row: dict, name: str, fn) -> None:
    """row[name_ms] = cuda_ms(fn), row[name_graph_ms] = graph_ms(fn); an error is recorded, not raised."""
    try:
        row[f"{name}_ms"] = cuda_ms(fn)
        row[f"{name}_graph_ms"] = graph_ms(fn)
    except Exception as e:  # noqa: BLE001 - one timing's failure is a result
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"


@section("speed")
def speed(args):
    from spinfx.kernels.hadamard import hadamard
    from spinfx.kernels.hadamard_matrices import plan
    from spinfx.kernels.qlinear import generic_attrs, generic_tensors
    from spinfx.kernels.qlinear_triton import plan as qplan
    from spinfx.kernels.qlinear_triton import qlinear_triton, sm_count
    from spinfx.kernels.quant_rtn import quantize_rtn

    rows, had = [], []
    RESULTS["speed"] = {"qlinear": rows, "hadamard": had}
    gen = torch.Generator().manual_seed(1)
    sms = sm_count(torch.device("cuda"))
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
            p = qplan(m, n, k, 4, 64, False, sms)
            r = dict(k=k, n=n, m=m, path=p.path, split=p.split, programs=p.programs)
            # the op as a model calls it (custom-op dispatch + launches), then the kernels alone
            _timed(r, "triton_w4", lambda: torch.ops.spinfx.qlinear(x, **t, **a))
            _timed(r, "cublas_fp16", lambda: torch.nn.functional.linear(x, w16))
            if tg is not None:
                _timed(r, "tinygemm_w4", lambda: tg(xb))
            else:
                r["tinygemm_error"] = tg_err
            if m == 16:  # the other side of the crossover at GEMV_MAX_M
                other = qplan(m, n, k, 4, 64, False, sms, path="dequant_mm")
                _timed(r, "triton_w4_dequant_mm", lambda: qlinear_triton(x, **t, **a, plan_=other))
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
    # the default recipe calibrates (GPTQ): random token ids stand in for text here, as in the tests
    calib = torch.randint(0, zm.model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = spinfx.rewrite(zm.model, "spinquant-w4a16", example_inputs=zm.example_inputs, calib=calib)
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
    ref = spinfx.rewrite(zm.model, "spinquant-w4a16", inputs, calib=calib).module(**inputs).logits.double()
    model = zm.model.to(dev)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=spinfx.backend.spinfx_backend,
                             options={"recipe": "spinquant-w4a16", "calib": calib})
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
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
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
    ap.add_argument("--shapes", default="", help=f"decode: comma-separated, of {', '.join(SHAPES)} (default all)")
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
    kern = RESULTS.get("kernels", {})
    failed += [f"kernels.{c}" for c in ("qlinear", "hadamard") if kern.get(f"{c}_ok") is False]
    log("sections failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
