"""Compile spinfx::qlinear's Triton kernels for sm_90 (H100) on a machine without a GPU: every GEMV
specialization `plan` picks for the bench's shapes and layouts, the dequantize and split-K reduce
kernels; print registers, local memory (spills) and the layout conversions left inside the GEMV's
K loop (each one is a shared-memory round trip per code position). Compilation errors show up here
before a GPU run does. Uses Triton's compiler API (ASTSource, GPUTarget) and the cuobjdump its wheel
ships; the numbers depend on the Triton version (the H100 machine had 3.6: run with that one on
PYTHONPATH to see what it will build).

    python bench/triton_sm90.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spinfx.kernels import qlinear_triton as qt
from spinfx.kernels.qlinear_triton import plan

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SHAPES = ((576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096))
LAYOUTS = ((4, 64, False, False), (4, 128, True, False), (4, 32, False, False), (8, None, False, False),
           (3, 64, True, False), (2, 64, False, False), (2, 32, True, False), (4, 64, False, True))
DIV16 = {"x_ptr", "w_ptr", "s_ptr", "out_ptr", "p_ptr", "y_ptr", "N", "K", "KW", "stride_xm", "stride_wn",
         "stride_os", "stride_om", "group_size"}


def compile_sm90(fn, sig: dict, consts: dict, num_warps: int = 4):
    """(registers, stack bytes, compiled kernel) of `fn` for sm_90, ints/pointers in DIV16 16-aligned."""
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if a in DIV16}
    sig = {**sig, **{c: "constexpr" for c in consts}}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)), kernel


def gemv(bits, zp, gidx, p, x="fp16", out="fp32", bias=False):
    sig = dict(x_ptr=f"*{x}", w_ptr="*i32", s_ptr="*fp16", z_ptr="*i8" if zp else "*fp16",
               g_ptr="*i32" if gidx else "*fp16", b_ptr="*fp16", out_ptr=f"*{out}", M="i32", M_BLOCKS="i32",
               N="i32", K="i32", KW="i32", STEPS="i32", stride_xm="i32", stride_wn="i32", stride_sn="i32",
               stride_os="i32", stride_om="i32", group_size="i32")
    consts = dict(BITS=bits, HAS_ZP=zp, HAS_GIDX=gidx, HAS_BIAS=bias, STEP_GROUPS=p.step_groups,
                  BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_KW=p.block_kw)
    return compile_sm90(qt._gemv_kernel, sig, consts, p.num_warps)


def main() -> int:
    print("triton", triton.__version__)
    seen, bad = set(), 0
    for k, n in SHAPES:
        for m in (1, 2, 5, 16):
            for bits, g, zp, gidx in LAYOUTS:
                p = plan(m, n, k, bits, g or k, gidx)
                key = (bits, zp, gidx, p.step_groups, p.block_m, p.block_n, p.num_warps)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    regs, stack, kernel = gemv(bits, zp, gidx, p)
                    ttgir = kernel.asm["ttgir"]
                    converts = ttgir[ttgir.index("scf.for"):].count("convert_layout") - 1  # - the epilogue's
                    bad += stack > 64 or converts > 0
                    print(f"gemv bits={bits} zp={zp:d} g_idx={gidx:d} step_groups={p.step_groups} "
                          f"block_m={p.block_m} block_n={p.block_n} warps={p.num_warps}: regs {regs} "
                          f"stack {stack} loop conversions {converts}")
                except Exception as e:  # noqa: BLE001 - report every specialization
                    bad += 1
                    print(f"gemv {key}: FAILED {type(e).__name__}: {str(e)[:2000]}")
    for bits, zp, gidx, out in ((4, False, False, "fp16"), (3, True, True, "fp32"), (8, True, False, "bf16")):
        sig = dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*i8" if zp else "*fp16", g_ptr="*i32" if gidx else "*fp16",
                   out_ptr=f"*{out}", N="i32", K="i32", stride_wn="i32", stride_sn="i32", group_size="i32")
        regs, stack, _ = compile_sm90(qt._dequant_kernel, sig, dict(BITS=bits, HAS_ZP=zp, HAS_GIDX=gidx,
                                      BLOCK_N=qt.DEQUANT_BLOCK[0], BLOCK_K=qt.DEQUANT_BLOCK[1]))
        print(f"dequant bits={bits} zp={zp:d} g_idx={gidx:d} -> {out}: regs {regs} stack {stack}")
    sig = dict(p_ptr="*fp32", b_ptr="*fp16", y_ptr="*fp16", MN="i32", N="i32", SPLIT="i32")
    regs, stack, _ = compile_sm90(qt._splitk_reduce_kernel, sig, dict(HAS_BIAS=True, BLOCK=qt.REDUCE_BLOCK))
    print(f"split-K reduce: regs {regs} stack {stack}")
    print(f"{bad} GEMV specializations failed, spill more than 64 bytes or convert layouts in the loop")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
