"""Quantized linear ops: y = x @ dequantize(W)ᵀ (+ bias) over any leading dims of x, in x's dtype.

Four custom ops, all visible as single nodes in FX/Inductor graphs (tensors for data, ints for metadata):

  spinfx::qlinear(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? weight_zero_point,
                  Tensor? weight_g_idx, Tensor? bias, int bits, int group_size) -> Tensor
      Any `QuantWeight` (2/3/4/8 bits, sym/asym, per-channel as group_size = K, act-order g_idx), its
      tensors as stored. CPU (and any non-CUDA device): unpack + dequantize + linear in plain torch
      ops (`dequant_linear`); `qlinear_decompositions()` lets Inductor trace those ops and fuse them.
      CUDA: Triton (`qlinear_triton`): a split-K GEMV for M <= 16, dequantize + cuBLAS above.
  spinfx::qlinear_cpu(Tensor x, Tensor q4_weight, Tensor q4_scales, Tensor? q4_zeros, Tensor? bias,
                      int out_features, int group_size, int vector_bits) -> Tensor
      The CPU path for <= 4-bit layouts when its C++ body builds (kernels/qlinear_cpu.py): AVX2 /
      AVX-512, float32 math on x as given, weights exact; decode GEMV and prefill GEMM in one body.
  spinfx::qlinear_int4pack(Tensor x, Tensor weight_int4pack, Tensor scale_and_zeros, Tensor? bias,
                           int group_size) -> Tensor
      CPU fast path for every <= 4-bit layout with N % 16 == 0 and groups of 32..256 (or per-channel):
      aten._weight_int4pack_mm_for_cpu on 4-bit codes u4 repacked once by
      aten._convert_weight_to_int4pack_for_cpu; w = (u4 - 8) · scale + zero, scale_and_zeros [G, N, 2].
  spinfx::qlinear_int8pack(Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor? bias) -> Tensor
      CPU int8 symmetric per-channel fast path: aten._weight_int8pack_mm, w = q · scale[n].

The two aten CPU fast paths compute in the dtype of their scale tensor: x is cast to it and y back to x's
dtype. Plans store those scales in bfloat16, because in torch 2.13 only the bf16 variants of both aten
kernels are fast (4096×4096, M=1, one thread: int4 1.1 ms in bf16 vs 71 ms in fp32 and 82 ms in fp16;
int8 1.1 vs 31 ms) — so fp32 activations are rounded to bf16 on the way in (the "a16" of w4a16).
qlinear_cpu, preferred where it builds, has no such cast: one compute dtype (fp32) end to end.

Sibling linears that read one input (q/k/v, gate/up) run as one `FusedQLinear` (their codes and scales
concatenated along N, one op call, its output split); see that class.

`plan_qlinear(qw, device=, cpu_compute_dtype=)` turns a `QuantWeight`/`MixedQuantWeight` into a
`QLinearPlan`: an optional input-column permutation followed by one op call per K-range, summed. It
picks the op per K-range and does any repacking once, ahead of time. `QLinear` is the nn.Module form.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spinfx.kernels import qlinear_cpu
from spinfx.kernels.quant_pack import rows_per_chunk, unpack_bytes, unpack_int32
from spinfx.kernels.quant_rtn import quantize_rtn
from spinfx.kernels.quant_weight import MixedQuantWeight, QuantWeight

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


# --- the generic op ------------------------------------------------------------------------------------
def dequant_weight(weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_g_idx: Tensor | None, bits: int, group_size: int, k: int, dt: torch.dtype,
                   inplace: bool = False) -> Tensor:
    """W [N, K] in `dt` from `spinfx::qlinear`'s tensors: (u - zu) · s, rounded once.

    (u - zu) is an integer below 2^8, exact in every float dtype, so W is rounded once, in `dt`.
    `inplace=False`: functional ops only (the Inductor decomposition: decompositions run after
    functionalization); `inplace=True` (eager): one float temporary, edited in place — the same values."""
    n = weight_packed.shape[0]
    u = (unpack_bytes if inplace else unpack_int32)(weight_packed, bits, k)
    mid = 1 << (bits - 1)
    zu = mid if weight_zero_point is None else weight_zero_point.to(torch.int32) + mid
    if weight_g_idx is None:  # contiguous groups: broadcast [N, G, 1] over [N, G, group_size]
        g = k // group_size
        zu = zu if weight_zero_point is None else zu.unsqueeze(-1)
        scale = weight_scale.to(dt).unsqueeze(-1)
        if inplace:
            return u.view(n, g, group_size).to(dt).sub_(zu).mul_(scale).view(n, k)
        return ((u.view(n, g, group_size) - zu).to(dt) * scale).view(n, k)
    gi = weight_g_idx.long()
    return (u.to(torch.int32) - (zu if weight_zero_point is None else zu[:, gi])).to(dt) * weight_scale.to(dt)[:, gi]


def dequant_linear(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """`spinfx::qlinear` in plain torch ops: the Inductor decomposition (compiled, one fused dequant
    loop + mm). Eager, the [N, K] temporaries make this slow (4096×4096, M=1: ≈ 200 ms)."""
    w = dequant_weight(weight_packed, weight_scale, weight_zero_point, weight_g_idx, bits, group_size,
                       x.shape[-1], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def dequant_linear_chunked(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                           weight_g_idx: Tensor | None, bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """The generic op's eager body: `dequant_linear` over chunks of output rows, each chunk's W dequantized
    in place (`rows_per_chunk`): bounded temporaries, and at M = 16 ≈ 3× less CPU than the whole matrix at
    once. Same values (only the mm's blocking may differ)."""
    n, k = weight_packed.shape[0], x.shape[-1]
    step = rows_per_chunk(k)
    out = []
    for r in range(0, n, step):
        e = min(n, r + step)
        w = dequant_weight(weight_packed[r:e], weight_scale[r:e],
                           None if weight_zero_point is None else weight_zero_point[r:e], weight_g_idx, bits,
                           group_size, k, x.dtype, inplace=True)
        out.append(F.linear(x, w, None if bias is None else bias[r:e].to(x.dtype)))
    return out[0] if len(out) == 1 else torch.cat(out, -1)


@torch.library.custom_op(
    "spinfx::qlinear", mutates_args=(),
    schema="(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? weight_zero_point, Tensor? weight_g_idx, "
           "Tensor? bias, int bits, int group_size) -> Tensor")
def qlinear(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size):
    return dequant_linear_chunked(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size)


@qlinear.register_kernel("cuda")
def _qlinear_cuda(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size):
    from spinfx.kernels.qlinear_triton import qlinear_triton
    return qlinear_triton(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size)


@qlinear.register_fake
def _qlinear_fake(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], weight_packed.shape[0])


def _decompose_qlinear(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size):
    if x.device.type == "cuda":  # keep the Triton body
        return NotImplemented
    return dequant_linear(x, weight_packed, weight_scale, weight_zero_point, weight_g_idx, bias, bits, group_size)


def qlinear_decompositions() -> dict:
    """Extra decompositions for Inductor (`compile_fx(..., decompositions={**select_decomp_table(), **this})`):
    on non-CUDA devices `spinfx::qlinear` becomes its unpack/dequant/linear ops, which Inductor fuses.
    Without them the op stays one opaque node and runs its eager kernel. The table also holds the
    quantized embedding's (`spinfx::qembedding`, kernels/qembedding.py): one table for quantized weights."""
    from spinfx.kernels.qembedding import qembedding_decompositions

    return {torch.ops.spinfx.qlinear.default: _decompose_qlinear, **qembedding_decompositions()}


# --- CPU fast paths ------------------------------------------------------------------------------------
def _flat_linear(x: Tensor, mm, compute_dtype: torch.dtype, bias: Tensor | None, n: int) -> Tensor:
    """Run a 2-D [M, K] x [N, K]ᵀ kernel in `compute_dtype` over x's leading dims; result in x's dtype."""
    y = mm(x.reshape(-1, x.shape[-1]).to(compute_dtype).contiguous()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op(
    "spinfx::qlinear_int4pack", mutates_args=(), device_types="cpu",
    schema="(Tensor x, Tensor weight_int4pack, Tensor scale_and_zeros, Tensor? bias, int group_size) -> Tensor")
def qlinear_int4pack(x, weight_int4pack, scale_and_zeros, bias, group_size):
    return _flat_linear(
        x, lambda x2: torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight_int4pack, group_size, scale_and_zeros),
        scale_and_zeros.dtype, bias, scale_and_zeros.shape[1])


@qlinear_int4pack.register_fake
def _qlinear_int4pack_fake(x, weight_int4pack, scale_and_zeros, bias, group_size):
    return x.new_empty(*x.shape[:-1], scale_and_zeros.shape[1])


@torch.library.custom_op(
    "spinfx::qlinear_int8pack", mutates_args=(), device_types="cpu",
    schema="(Tensor x, Tensor weight_int8, Tensor weight_scale, Tensor? bias) -> Tensor")
def qlinear_int8pack(x, weight_int8, weight_scale, bias):
    return _flat_linear(x, lambda x2: torch.ops.aten._weight_int8pack_mm(x2, weight_int8, weight_scale),
                        weight_scale.dtype, bias, weight_int8.shape[0])


@qlinear_int8pack.register_fake
def _qlinear_int8pack_fake(x, weight_int8, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


# --- plans ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QLinearCall:
    """op(x[..., k_start:k_end], **tensors, **attrs) — one op node; `tensors` become graph constants."""

    op: torch._ops.OpOverload
    tensors: dict[str, Tensor | None]
    attrs: dict[str, int]
    k_start: int
    k_end: int

    def __call__(self, x: Tensor) -> Tensor:
        return self.op(x, **self.tensors, **self.attrs)


@dataclass(frozen=True, eq=False)
class QLinearPlan:
    """y = Σ_c c(x'[..., c.k_start:c.k_end]) with x' = x.index_select(-1, perm) (x' = x if perm is None)."""

    perm: Tensor | None
    calls: tuple[QLinearCall, ...]
    in_features: int
    out_features: int

    def __call__(self, x: Tensor) -> Tensor:
        return run_plan(x, self.perm, [(c, c.tensors) for c in self.calls])


def run_plan(x: Tensor, perm: Tensor | None, calls: list[tuple[QLinearCall, dict[str, Tensor | None]]]) -> Tensor:
    """Execute a plan's structure with the given tensors (a plan's own, or a module's buffers)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    y = None
    for c, tensors in calls:
        xs = x if len(calls) == 1 else x[..., c.k_start:c.k_end]
        yc = c.op(xs, **tensors, **c.attrs)
        y = yc if y is None else y + yc
    return y


def int4pack_group_size(qw: QuantWeight) -> int | None:
    """The group size to run `qw` on aten._weight_int4pack_mm_for_cpu with, or None if it cannot:
    at most 4 bits, N % 16 == 0, group 32..256 (per-channel: the largest of 256..32 dividing K, its one
    scale repeated), and groups that are contiguous after one input permutation (no g_idx, or every
    group has exactly group_size columns)."""
    n, k = qw.weight_shape
    if qw.bits > 4 or n % 16:
        return None
    if qw.group_size is None:
        return next((g for g in reversed(INT4PACK_GROUP_SIZES) if k % g == 0), None)
    if qw.group_size not in INT4PACK_GROUP_SIZES or k % qw.group_size:
        return None
    if qw.weight_g_idx is not None:
        counts = torch.bincount(qw.weight_g_idx.long(), minlength=qw.num_groups)
        if qw.num_groups != k // qw.group_size or not bool((counts == qw.group_size).all()):
            return None
    return qw.group_size


def int8pack_eligible(qw: QuantWeight) -> bool:
    """aten._weight_int8pack_mm: 8 bits, symmetric, per-channel, K % 16 == 0 (torch 2.13's bf16 AVX-512
    kernel reads K 16 at a time with no tail: other K segfault)."""
    return qw.bits == 8 and qw.group_size is None and qw.symmetric and qw.in_features % 16 == 0


def _int4pack_args(qw: QuantWeight, group_size: int, dtype: torch.dtype) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Repack for the CPU int4 kernel, which computes w = (u4 - 8)·scale + zero with u4 in [0, 15].

    The codes c = u - zu (w = c·s) are re-based to u4 = c + 8 with zero = 0 whenever they fit — always
    for 2/3 bits and symmetric 4 bits, so those run exactly (2/3-bit weights are held as 4-bit codes at
    run time). Otherwise (asymmetric 4-bit) u4 = u and zero = (8 - zu)·s, rounded to `dtype`.
    Act-order becomes an input permutation: sorting columns by group (stable) makes every group
    contiguous, and x @ Wᵀ = x[:, perm] @ W[:, perm]ᵀ.
    """
    u, zu, s = qw.unpack(), qw.zero_unsigned(), qw.weight_scale.double()
    codes = u - zu[:, qw.group_index()]
    if int(codes.min()) >= -8 and int(codes.max()) <= 7:
        u4, zero = codes + 8, torch.zeros_like(s)
    else:
        u4, zero = u, (8 - zu) * s
    perm = None
    if qw.weight_g_idx is not None:
        perm = torch.argsort(qw.weight_g_idx, stable=True)
        u4 = u4[:, perm]
    if qw.group_size is None:  # per-channel, run group-wise: repeat its one scale (and zero)
        groups = qw.in_features // group_size
        s, zero = s.expand(-1, groups), zero.expand(-1, groups)
    sz = torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(dtype)  # [G, N, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u4.contiguous(), 1)
    return perm, {"weight_int4pack": packed, "scale_and_zeros": sz}


def generic_tensors(qw: QuantWeight, bias: Tensor | None) -> dict[str, Tensor | None]:
    """Tensor arguments of `spinfx::qlinear` for `qw` (after x)."""
    return {"weight_packed": qw.weight_packed, "weight_scale": qw.weight_scale,
            "weight_zero_point": qw.weight_zero_point, "weight_g_idx": qw.weight_g_idx, "bias": bias}


def generic_attrs(qw: QuantWeight) -> dict[str, int]:
    """Non-tensor arguments of `spinfx::qlinear` for `qw`; per-channel is group_size = K."""
    return {"bits": qw.bits, "group_size": qw.group_size or qw.in_features}


def _plan_one(qw: QuantWeight, k_start: int, compute_dtype: torch.dtype | None, device: torch.device,
              bias: Tensor | None, cpp: bool = True) -> tuple[Tensor | None, QLinearCall]:
    """(input permutation or None, call) for one uniform-width matrix covering K-range k_start.."""
    qw = _to(qw, device)
    k_range = (k_start, k_start + qw.in_features)
    fast = device.type == "cpu" and compute_dtype is not None
    if fast and cpp and qlinear_cpu.eligible(qw) and qlinear_cpu.usable():
        perm, tensors, attrs = qlinear_cpu.repack(qw)
        return perm, QLinearCall(torch.ops.spinfx.qlinear_cpu.default, {**tensors, "bias": bias}, attrs, *k_range)
    int4_group = int4pack_group_size(qw) if fast else None
    if int4_group is not None:
        perm, tensors = _int4pack_args(qw, int4_group, compute_dtype)
        return perm, QLinearCall(torch.ops.spinfx.qlinear_int4pack.default, {**tensors, "bias": bias},
                                 {"group_size": int4_group}, *k_range)
    if fast and int8pack_eligible(qw):
        tensors = {"weight_int8": (qw.unpack() - 128).to(torch.int8),
                   "weight_scale": qw.weight_scale[:, 0].to(compute_dtype).contiguous(), "bias": bias}
        return None, QLinearCall(torch.ops.spinfx.qlinear_int8pack.default, tensors, {}, *k_range)
    return None, QLinearCall(torch.ops.spinfx.qlinear.default, generic_tensors(qw, bias), generic_attrs(qw),
                             *k_range)


def plan_qlinear(qw: QuantWeight | MixedQuantWeight, *, device: torch.device | str = "cpu",
                 cpu_compute_dtype: torch.dtype | None = torch.bfloat16, cpp: bool = True) -> QLinearPlan:
    """Choose ops and prepack for `device` (tensors are moved there); plans work for any activation dtype.

    CPU, unless `cpu_compute_dtype` is None (no fast paths, e.g. for exact float64 checks):
    - 2/3/4 bits, K % 8 == 0, groups of a multiple of 8 (or per-channel) -> qlinear_cpu, the C++
      kernel (kernels/qlinear_cpu.py), when it builds and `cpp`: float32 math on x as given (no bf16
      rounding; `cpu_compute_dtype` does not apply), exact weights; faster than the aten int4 kernel
      at every shape measured (bench/README.md "qlinear"), so it is preferred;
    - otherwise 2/3/4 bits with N % 16 == 0, group 32..256 or per-channel -> qlinear_int4pack
      (act-order as an input permutation; see `int4pack_group_size`); int8 symmetric per-channel with
      K % 16 == 0 -> qlinear_int8pack; both compute in `cpu_compute_dtype`.
    Everything else -> qlinear, exact in the activation dtype.
    CUDA: qlinear (Triton). A MixedQuantWeight is its permutation plus one call per segment, each chosen
    the same way.
    """
    device = torch.device(device)
    n, k = qw.weight_shape
    bias = None if qw.bias is None else qw.bias.to(device)
    if isinstance(qw, QuantWeight):
        perm, call = _plan_one(qw, 0, cpu_compute_dtype, device, bias, cpp)
        return QLinearPlan(perm, (call,), k, n)
    calls, start = [], 0
    for i, seg in enumerate(qw.segments):
        # segments have contiguous groups (no g_idx), so they never add a permutation of their own
        calls.append(_plan_one(seg, start, cpu_compute_dtype, device, bias if i == 0 else None, cpp)[1])
        start += seg.in_features
    return QLinearPlan(qw.perm.to(device), tuple(calls), k, n)


def _to(qw: QuantWeight, device: torch.device) -> QuantWeight:
    names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "bias")
    return replace(qw, **{n: None if getattr(qw, n) is None else getattr(qw, n).to(device) for n in names})


# --- module --------------------------------------------------------------------------------------------
class QLinear(nn.Module):
    """nn.Linear replacement running a `QLinearPlan`; the plan's tensors are buffers (state_dict, .to)."""

    def __init__(self, qw: QuantWeight | MixedQuantWeight, *, device: torch.device | str = "cpu",
                 cpu_compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
        super().__init__()
        plan = plan_qlinear(qw, device=device, cpu_compute_dtype=cpu_compute_dtype)
        self.in_features, self.out_features = plan.in_features, plan.out_features
        self.cpu_compute_dtype = cpu_compute_dtype  # how it was planned (FusedQLinear plans alike)
        # structure only (op, argument names, attrs, K-range); forward reads the tensors from buffers
        self.calls = tuple(QLinearCall(c.op, dict.fromkeys(c.tensors), c.attrs, c.k_start, c.k_end)
                           for c in plan.calls)
        self.register_buffer("perm", plan.perm)
        for i, c in enumerate(plan.calls):
            for name, t in c.tensors.items():
                self.register_buffer(f"c{i}_{name}", t)
        # One op call on x as given (no permutation, one K-range: every layout spinfx.load makes) runs from two
        # attributes, the op and one tuple of constants (buffer names, int arguments, in the op's schema order).
        # Under torch.compile each Python object forward reads is a guard checked before every call: the
        # general path (`calls`: tuples of dataclasses holding dicts) cost ≈ 2× the guards of this one
        # (bench/README.md "Session 10"). The tensors stay buffers: `.to()`, state_dict, load_state_dict.
        self._op = self._spec = None
        if plan.perm is None and len(plan.calls) == 1:
            (c,) = self.calls
            schema = [a.name for a in c.op._schema.arguments[1:]]
            if schema == [*c.tensors, *c.attrs]:
                self._op = c.op
                self._spec = (tuple(f"c0_{name}" for name in c.tensors), tuple(c.attrs.values()))

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                   cpu_compute_dtype: torch.dtype | None = torch.bfloat16) -> QLinear:
        """RTN-quantize an nn.Linear (for GPTQ: `QLinear(gptq_quantize(...))`)."""
        w = linear.weight.detach()
        qw = quantize_rtn(w, bits, group_size, symmetric,
                          bias=None if linear.bias is None else linear.bias.detach())
        return cls(qw, device=w.device, cpu_compute_dtype=cpu_compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._op is not None:  # the one-call plan (see __init__)
            names, ints = self._spec
            return self._op(x, *[self._buffers[name] for name in names], *ints)
        return run_plan(x, self.perm, [(c, {name: getattr(self, f"c{i}_{name}") for name in c.tensors})
                                       for i, c in enumerate(self.calls)])

    def extra_repr(self) -> str:
        ops = ", ".join(c.op.name() for c in self.calls)
        return f"in_features={self.in_features}, out_features={self.out_features}, ops=[{ops}]"


# --- siblings: one packed linear for several that read one input ----------------------------------------
class FusedQLinear(nn.Module):
    """Sibling QLinears reading one input (q/k/v, gate/up) as one packed QLinear: y = x @ [W_0; …; W_s]ᵀ,
    the same codes and scales concatenated along N (`QuantWeight.concat(dim=0)`), split back into the
    siblings' outputs (sizes N_0 … N_s; GQA's k/v are narrower than q).

    The model class keeps calling each sibling with the same x (HF attention: self.q_proj(x),
    self.k_proj(x), self.v_proj(x)), so each sibling becomes a `QLinearSlice` that asks `take(x, i)`:
    the first call runs the packed op once and memoizes (x, its output); a call with the same x returns
    its slice; once every sibling has taken its slice the memo is dropped (no activation outlives the
    group's calls). The memo key is x itself — identity, held by a strong reference, so x's storage
    cannot be freed and reused by another tensor while memoized (a bare data_ptr could) — and x's
    version counter, so an in-place change of x recomputes (eager, outside inference mode: see
    `_version`). Any other call pattern (one sibling alone, a sibling fed another tensor) recomputes.
    Under torch.compile Dynamo traces the memo as Python state: the identity test is decided at trace
    time and the packed op appears once per group in the graph, with no graph break (tests/
    test_load_speed.py compiles with fullgraph=True and compares the logits). Inductor does not
    deduplicate three identical calls of the packed op by itself: without the memo, the packed GEMM
    would run once per sibling.

    `build` fuses only what stays bit-identical: every runtime tensor of the fused plan must equal the
    siblings' tensors concatenated along their N dim (shared ones, such as an act-order permutation,
    equal), with the same ops and attributes per K-range — otherwise it returns None and the siblings
    stay separate (different bits, group sizes, symmetry, act-order, bias presence, or a kernel choice
    that depends on N, e.g. the int4 fast path's N % 16).
    """

    def __init__(self, linear: QLinear, sizes: list[int]) -> None:
        super().__init__()
        self.linear, self.sizes = linear, tuple(sizes)
        self._memo = _Memo()

    @classmethod
    def build(cls, parts: list[QLinear], weights: list[QuantWeight | MixedQuantWeight]) -> FusedQLinear | None:
        """The fused module of `parts` (built from their `weights`, in order), or None where fusing would
        not be bit-identical to running them separately."""
        if len(parts) < 2 or not all(isinstance(w, QuantWeight) for w in weights):
            return None
        if len({p.in_features for p in parts}) != 1 or len({w.bias is None for w in weights}) != 1:
            return None
        if len({p.cpu_compute_dtype for p in parts}) != 1 or len({p.perm is None for p in parts}) != 1:
            return None
        try:
            whole = QuantWeight.concat(weights, 0)
        except ValueError:  # bits, group size, symmetry or act-order differ
            return None
        device = next(iter(parts[0].buffers())).device
        fused = QLinear(whole, device=device, cpu_compute_dtype=parts[0].cpu_compute_dtype)
        return cls(fused, [p.out_features for p in parts]) if _concatenates(fused, parts) else None

    def take(self, x: Tensor, i: int) -> Tensor:
        """Sibling i's output for x: its slice of the packed output (see the class docstring)."""
        m = self._memo
        version = _version(x)
        if m.x is not x or m.version != version:
            m.x, m.version, m.taken = x, version, set()
            m.ys = self.linear(x).split(self.sizes, dim=-1)
        y = m.ys[i].contiguous()  # a separate sibling's output is contiguous; elementwise kernels (SiLU's
        m.taken.add(i)            # vectorized exp vs its strided loop) round differently on a strided view
        if len(m.taken) == len(self.sizes):
            m.x = m.ys = m.version = None
        return y

    def forward(self, x: Tensor) -> Tensor:
        """The packed output [..., Σ N_i]."""
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}"


def _version(x: Tensor) -> int | None:
    """x's version counter, where there is one to read: not for inference tensors (they have none) nor
    under Dynamo (it is data there, not a constant; the trace sees in-place ops on x as new values of the
    same variable, so an in-place change of x between two sibling calls is not noticed there)."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class _Memo:
    """FusedQLinear's last input and its split outputs (plain Python state, not module attributes)."""

    def __init__(self) -> None:
        self.x = self.ys = self.version = None
        self.taken: set[int] = set()


class QLinearSlice(nn.Module):
    """Sibling i of a `FusedQLinear`: forward(x) = its slice of the packed output. The fused module is
    registered elsewhere (on the siblings' common parent), so it is held here outside the module tree:
    its buffers are stored and moved once."""

    def __init__(self, fused: FusedQLinear, index: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused
        self.index = index
        self.in_features, self.out_features = fused.linear.in_features, fused.sizes[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.fused.take(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slice {self.index} of a FusedQLinear"


# aten._convert_weight_to_int4pack_for_cpu's layout is blocked along N: the repack of concatenated codes is
# not the parts' repacks stacked. It is compared through the kernel instead (`_concatenates`' probe).
_REPACKED = ("weight_int4pack", "q4_weight", "q4_scales", "q4_zeros")  # qlinear_cpu's: blocked, N padded
_N_ATTRS = ("out_features",)  # int args that grow with N: the fused call's is the parts' sum


def _concatenates(fused: QLinear, parts: list[QLinear]) -> bool:
    """The fused plan is the parts' plans stacked along N: same ops/attrs/K-ranges (an N-sized attr, such
    as qlinear_cpu's out_features, is the parts' sum); each runtime tensor equals the parts' tensors
    concatenated along one dim (or equals each of them: shared, such as an act-order permutation); and,
    for the repacked layouts, the kernel run on the identity (each output row one weight row, as the
    kernel dequantizes it) gives the parts' rows stacked."""
    if any(len(p.calls) != len(fused.calls) for p in parts):
        return False
    for i, c in enumerate(fused.calls):
        pcs = [p.calls[i] for p in parts]

        def key(call: QLinearCall) -> tuple:
            attrs = {k: v for k, v in call.attrs.items() if k not in _N_ATTRS}
            return call.op, attrs, call.k_start, call.k_end, tuple(call.tensors)

        if any(key(pc) != key(c) for pc in pcs) or any(
                c.attrs[k] != sum(pc.attrs[k] for pc in pcs) for k in _N_ATTRS if k in c.attrs):
            return False
    if any(list(p._buffers) != list(fused._buffers) for p in parts):  # None buffers included
        return False
    for name, whole in fused._buffers.items():
        ts = [p._buffers[name] for p in parts]
        if whole is None or any(t is None for t in ts):
            if whole is not None or any(t is not None for t in ts):
                return False
            continue
        if name.endswith(_REPACKED):
            continue
        if all(t.shape == whole.shape and torch.equal(t, whole) for t in ts):
            continue  # shared
        if not any(whole.shape[d] == sum(t.shape[d] for t in ts) and all(
                t.shape[:d] + t.shape[d + 1:] == whole.shape[:d] + whole.shape[d + 1:] for t in ts)
                and torch.equal(whole, torch.cat(ts, d)) for d in range(whole.dim())):
            return False
    eye = torch.eye(fused.in_features, device=next(iter(fused.buffers())).device)
    with torch.no_grad():
        return torch.equal(fused(eye), torch.cat([p(eye) for p in parts], -1))
