"""spinfx::qlinear_cpu — a C++ (AVX2 / AVX-512) kernel for <= 4-bit group-wise linears, float32 math.

    spinfx::qlinear_cpu(Tensor x, Tensor q4_weight, Tensor q4_scales, Tensor? q4_zeros, Tensor? bias,
                        int out_features, int group_size, int vector_bits) -> Tensor

Unlike `aten._weight_int4pack_mm_for_cpu` (fast only in bf16 in torch 2.13), it takes x in its own dtype
(fp32 or bf16/fp16 widened exactly to fp32) and keeps the weights exact: W = (c + z)·s with integer codes
c, z and the scales widened to fp32, over a layout repacked once (`repack`: 16 output rows per block,
8 codes per int32). One pass over a weight block serves a tile of up to 4 (AVX2) / 8 (AVX-512) rows
of x, so the same body is the decode GEMV and the prefill GEMM. fp64 x is computed exactly as the
reference does, dequantize + mm in fp64. The body is
kernels/qlinear_cpu.cpp, built on first use by torch's cpp extension loader into its cache
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; one build per torch version and source
hash). Where no compiler or no AVX2 is found, or the build fails, `available()` is False after one
warning line, and plans take the aten paths (kernels/qlinear.py); so they do with `SPINFX_CPP_KERNELS=0`
or inside `disabled()`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from spinfx.kernels.quant_weight import QuantWeight

SOURCE = Path(__file__).resolve().parent / "qlinear_cpu.cpp"
ROWS = 16  # output rows per block of the repacked layout
BUILD_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU wheels

_lib = torch.library.Library("spinfx", "FRAGMENT")
_lib.define("qlinear_cpu(Tensor x, Tensor q4_weight, Tensor q4_scales, Tensor? q4_zeros, Tensor? bias, "
            "int out_features, int group_size, int vector_bits) -> Tensor")


@torch.library.register_fake("spinfx::qlinear_cpu")
def _qlinear_cpu_fake(x, q4_weight, q4_scales, q4_zeros, bias, out_features, group_size, vector_bits):
    return x.new_empty(*x.shape[:-1], out_features)


def vector_bits() -> int | None:
    """512 or 256: the widest body this CPU runs as torch sees it (`ATEN_CPU_CAPABILITY` honoured);
    None: no AVX2 (no kernel)."""
    return {"AVX512": 512, "AVX2": 256}.get(torch.backends.cpu.get_cpu_capability())


_enabled = os.environ.get("SPINFX_CPP_KERNELS", "1") != "0"


@contextlib.contextmanager
def disabled():
    """Plans made inside take the aten paths (benchmarks compare both; `SPINFX_CPP_KERNELS=0` for a
    whole process)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def usable() -> bool:
    """Enabled and `available`."""
    return _enabled and available()


@functools.cache
def available() -> bool:
    """Build (first call in a fresh cache: ≈ 10–20 s) and load the extension; False, with one warning,
    when that fails or the CPU has no AVX2."""
    if vector_bits() is None:
        return False
    try:
        t = time.perf_counter()
        fresh = not _built()
        if fresh:  # a first build is seconds of silence otherwise
            print("[spinfx] building the C++ CPU qlinear kernel (once per machine) …", file=sys.stderr)
        _build()
        if fresh or os.environ.get("SPINFX_TRACE"):
            print(f"[spinfx] qlinear_cpu extension ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        return True
    except Exception as e:  # noqa: BLE001 — any failure means: use the aten paths
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"spinfx: the C++ CPU qlinear kernel is unavailable ({type(e).__name__}: {first[:200]}); "
                      f"using the aten int4 path", RuntimeWarning, stacklevel=2)
        return False


def _built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return (Path(_get_build_directory("spinfx_qlinear_cpu", verbose=False)) / "spinfx_qlinear_cpu.so").is_file()
    except Exception:  # noqa: BLE001 — only decides whether to say "building"
        return False


def _build() -> None:
    from torch.utils.cpp_extension import load

    load(name="spinfx_qlinear_cpu", sources=[str(SOURCE)], extra_cflags=BUILD_FLAGS,
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def eligible(qw: QuantWeight) -> bool:
    """<= 4 bits; K a multiple of 8 with groups of a multiple of 8 (per-channel: one group of K) that are
    contiguous after one input permutation (no g_idx, or every group has exactly group_size columns)."""
    n, k = qw.weight_shape
    if qw.bits > 4 or k % 8 or n == 0:
        return False
    if qw.group_size is None:
        return True
    if qw.group_size % 8 or k % qw.group_size:
        return False
    if qw.weight_g_idx is not None:
        counts = torch.bincount(qw.weight_g_idx.long(), minlength=qw.num_groups)
        return qw.num_groups == k // qw.group_size and bool((counts == qw.group_size).all())
    return True


def repack(qw: QuantWeight) -> tuple[Tensor | None, dict[str, Tensor | None], dict[str, int]]:
    """(input permutation or None, tensor args, int args) of `spinfx::qlinear_cpu` for an `eligible` qw.

    Codes c = u - zu go to the int32 words as signed nibbles when they fit [-8, 7] (always for 2/3 bits
    and symmetric 4 bits; z = 0, no zeros tensor); otherwise (asymmetric 4 bits) c = u - 8 and
    z = 8 - zu. Act-order becomes an input permutation (columns sorted by group, stable), as for the
    int4pack path. Rows are padded to a multiple of 16 with zero codes and scales."""
    n, k = qw.weight_shape
    u, zu = qw.unpack(), qw.zero_unsigned()
    gs = qw.group_size or k
    perm = None
    if qw.weight_g_idx is not None:
        perm = torch.argsort(qw.weight_g_idx, stable=True)
        u = u[:, perm]
        order = qw.weight_g_idx.long()[perm][::gs]  # the group of each contiguous run
        zu, s = zu[:, order], qw.weight_scale[:, order]
    else:
        s = qw.weight_scale
    g = k // gs
    codes = u - zu.repeat_interleave(gs, 1)
    zeros = None
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        codes, zeros = u - 8, (8 - zu).float()
    nb = -(-n // ROWS)
    pad = nb * ROWS - n
    nib = torch.nn.functional.pad(codes, (0, 0, 0, pad)).to(torch.int64) & 0xF  # [NB·16, K]
    words = (nib.view(nb * ROWS, k // 8, 8) << (torch.arange(8) * 4)).sum(-1)  # disjoint bit fields
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    q4 = words.view(nb, ROWS, k // 8).transpose(1, 2).contiguous()  # [NB, K/8, 16]

    def blocked(t: Tensor) -> Tensor:  # [N, G] -> [NB, G, 16]
        return torch.nn.functional.pad(t.float(), (0, 0, 0, pad)).view(nb, ROWS, g).transpose(1, 2).contiguous()

    tensors = {"q4_weight": q4, "q4_scales": blocked(s), "q4_zeros": None if zeros is None else blocked(zeros)}
    return perm, tensors, {"out_features": n, "group_size": gs, "vector_bits": vector_bits() or 256}
