"""Hadamard library, plans, and the spinfx::hadamard op (CPU body, fake/compile, Triton body)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from spinfx.kernels.hadamard import (
    FACTORS,
    MAX_FACTOR,
    HadamardPlan,
    constructible_orders,
    hadamard,
    hadamard_decompositions,
    hadamard_dense_reference,
    hadamard_matrix,
    hadamard_transform,
    plan,
    random_hadamard,
    random_orthogonal,
)

# Model dims the library must plan, with the plan each gets (reviewed; update on purpose only).
MODEL_DIM_PLANS = {
    576: "exact 36×2^4",
    1536: "exact 12×2^7",
    2048: "exact 2^11",
    3072: "exact 12×2^8",
    4096: "exact 2^12",
    4864: "exact 76×2^6",
    5120: "exact 20×2^8",
    5632: "exact 44×2^7",
    8960: "exact 140×2^6",
    9728: "exact 76×2^7",
    10944: "exact 36×76×2^2",
    11008: "exact 172×2^6",
    13824: "exact 108×2^7",
    14336: "exact 28×2^9",
    18944: "exact 148×2^7",
    25600: "exact 100×2^8",
    29568: "exact 44×84×2^3",
}


def _assert_hadamard(h: torch.Tensor):
    n = h.shape[0]
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h.T @ h, n * torch.eye(n, dtype=torch.float64))  # integers: exact in fp64


# --- library ---------------------------------------------------------------------------------

def test_every_dense_factor_is_hadamard():
    assert FACTORS == tuple(4 * o for o in range(3, 64, 2) if o != 59)
    for k in FACTORS:
        _assert_hadamard(hadamard_matrix(k))


def test_constructible_orders_up_to_256():
    orders = constructible_orders(MAX_FACTOR)
    # The module docstring's claim: every multiple of 4 up to 256 except 236, plus 1 and 2.
    assert orders == (1, 2, *(k for k in range(4, 257, 4) if k != 236))
    for n in orders:
        _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", [236, 6, 4 * 3 * 23, 4 * 67])
def test_unconstructible_order_raises_naming_n(n):
    with pytest.raises(ValueError, match=rf"\b{n}\b"):
        hadamard_matrix(n)


def test_kronecker_layout_of_multi_factor_order():
    # 10944 = 36 ⊗ 76 ⊗ H_4 is reached only through a Kronecker product; check the layout on
    # 2080 = 20 ⊗ 52 ⊗ H_2 (65 = 5·13 and 4·65 > 256).
    p = plan(2080)
    assert (p.ks, p.log2, p.describe()) == ((20, 52), 1, "exact 20×52×2^1")
    h = hadamard_matrix(2080)
    expect = torch.kron(torch.kron(hadamard_matrix(20), hadamard_matrix(52)), hadamard_matrix(2))
    assert torch.equal(h, expect)
    assert plan(1040).describe() == "exact 20×52"
    _assert_hadamard(hadamard_matrix(1040))


def test_model_dim_plans():
    assert {n: plan(n).describe() for n in MODEL_DIM_PLANS} == MODEL_DIM_PLANS
    for n, text in MODEL_DIM_PLANS.items():
        p = plan(n)
        assert p.is_exact and p.num_blocks == 1 and math.prod(p.ks) << p.log2 == n
        assert all(k in FACTORS and k <= MAX_FACTOR for k in p.ks)


@pytest.mark.parametrize("n", [576, 1536])
def test_model_dims_dense_hadamard(n):
    _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", sorted(MODEL_DIM_PLANS))
def test_model_dims_transform_is_hadamard(n):
    """Without the dense n×n matrix (29568² fp64 is 7 GB): the factors are verified above; here
    the transform has entries ±1/√n on identity rows, is orthonormal, and inverts by its transpose."""
    p = plan(n)
    g = torch.Generator().manual_seed(n)
    rows = torch.zeros(6, n, dtype=torch.float64)
    rows[torch.arange(6), torch.randperm(n, generator=g)[:6]] = 1.0
    m_rows = hadamard(rows, p)  # six distinct rows of M
    assert torch.allclose(m_rows.abs() * math.sqrt(n), torch.ones_like(m_rows), rtol=0, atol=1e-12)
    assert torch.allclose(m_rows @ m_rows.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    y = hadamard(x, p)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    assert torch.allclose(hadamard(y, p, transpose=True), x, rtol=0, atol=1e-12)
    assert torch.allclose(y @ m_rows.T, x @ rows.T, rtol=0, atol=1e-12)  # <xM, e_iM> = x_i


def test_block_diagonal_plans():
    p = plan(64 * 67)  # 67 is prime and 4·67 > 256: no exact factorization
    assert (p.is_exact, p.block, p.num_blocks, p.describe()) == (
        False, 64, 67, "block-diagonal 64 × 67 blocks (2^6)")
    assert plan(4096, block=64).describe() == "block-diagonal 64 × 64 blocks (2^6)"
    assert plan(6).describe() == "block-diagonal 2 × 3 blocks (2^1)"
    m = plan(576, block=192).matrix()
    assert torch.equal(m, torch.block_diag(*[hadamard_matrix(192) / math.sqrt(192)] * 3))
    with pytest.raises(ValueError, match="n=7"):
        plan(7)
    with pytest.raises(ValueError, match="block 48"):
        plan(4096, block=48)
    with pytest.raises(ValueError, match="block 236"):
        plan(472, block=236)


def test_random_rotations_are_orthonormal_and_seeded():
    eye = torch.eye(172, dtype=torch.float64)
    for make in (random_hadamard, random_orthogonal):
        r = make(172, 0)
        assert r.dtype == torch.float64
        assert torch.allclose(r.T @ r, eye, rtol=0, atol=1e-12)
        assert torch.equal(r, make(172, 0)) and not torch.equal(r, make(172, 1))
    # diag(s)·M: each row is ± the matching row of M.
    r, m = random_hadamard(172, 3), plan(172).matrix()
    signs = torch.sign((r * m).sum(1))
    assert torch.equal(r, signs[:, None] * m) and (signs < 0).any() and (signs > 0).any()
    assert torch.equal(random_hadamard(96, 0, block=32) != 0, plan(96, block=32).matrix() != 0)
    # Haar sign fix: G = Q·R with diag(R) > 0 for the seeded Gaussian G.
    q = random_orthogonal(64, 5)
    gauss = torch.randn(64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = q.T @ gauss
    assert torch.allclose(r, r.triu(), rtol=0, atol=1e-12) and (r.diagonal() > 0).all()


def test_rotation_operator_on_weights_in_chunks_is_the_dense_product():
    # W @ R and Rᵀ @ W go through a weight a few rows / columns at a time (bounded temporaries): the same
    # products as the dense R, on matrices cut into several uneven chunks, 2-D and 3-D (R2's per-head view)
    import spinfx.kernels.quant_pack as pack
    from spinfx.kernels.hadamard import HadamardRotation

    r = HadamardRotation.randomized(172, 3)
    dense = r.dense()
    g = torch.Generator().manual_seed(0)
    w, wt = torch.randn(37, 172, generator=g, dtype=torch.float64), torch.randn(172, 29, generator=g, dtype=torch.float64)
    whole = pack.ROW_CHUNK
    try:
        pack.ROW_CHUNK = 5 * 172  # 5 rows / columns per chunk
        got, got_t = w @ r, r.T @ wt
    finally:
        pack.ROW_CHUNK = whole
    torch.testing.assert_close(got, w @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_t, dense.T @ wt, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.T @ wt.reshape(172, 1, 29).expand(172, 2, 29).transpose(0, 1),
                               (dense.T @ wt).expand(2, 172, 29), rtol=0, atol=1e-12)


# --- the op ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [64, 576, 1536, 1040, 2080, 11008])
def test_op_matches_dense_reference_fp64(n):
    p = plan(n)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for transpose in (False, True):
        ref = hadamard_dense_reference(x, p, transpose)
        out = hadamard(x, p, transpose)
        assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_op_block_diagonal_matches_dense_reference():
    for p in (plan(64 * 67), plan(576, block=64), plan(6)):
        x = torch.randn(2, 3, p.n, dtype=torch.float64)
        assert torch.allclose(hadamard(x, p), hadamard_dense_reference(x, p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_op_dtypes_and_leading_dims(dtype, atol):
    p = plan(576)
    x = torch.randn(2, 5, 576).to(dtype)
    out = hadamard(x, p)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    ref = hadamard_dense_reference(x.double(), p)
    # Half types are transformed in fp32; the error is the final rounding (≤ 1/2 ulp ~ |y|·2^-8).
    assert torch.allclose(out.double(), ref, rtol=0, atol=atol)
    with pytest.raises(TypeError, match="floating-point"):
        hadamard(torch.ones(2, 576, dtype=torch.int32), p)
    with pytest.raises(ValueError, match="block 576 does not divide n=512"):
        hadamard(torch.ones(2, 512), p)


def test_op_never_runs_a_dense_n_by_n_matmul():
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                seen.append(tuple(a.shape for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    for n in (11008, 10944, 4096):
        with Record():  # the op's CPU body (a mode sees a custom op as one call, not its insides)
            hadamard_transform(torch.randn(16, n), plan(n))
    assert len(seen) == 3  # one per K factor: 172; 36 and 76; none for 2^12
    # The contraction dim (last of the first operand) is a factor K, never n.
    assert sorted(shapes[0][-1] for shapes in seen) == [36, 76, 172]


def test_op_autograd_is_the_transpose():
    p = plan(1040)
    x = torch.randn(2, 1040, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 1040, dtype=torch.float64)
    (hadamard(x, p) * g).sum().backward()
    assert torch.allclose(x.grad, hadamard_dense_reference(g, p, transpose=True), rtol=0, atol=1e-12)


def test_opcheck_fake_and_autograd_registration():
    for p in (plan(576), plan(1040), plan(96, block=32)):
        x = torch.randn(3, p.n, requires_grad=True)
        torch.library.opcheck(torch.ops.spinfx.hadamard.default, (x, list(p.ks), p.block, False))
        torch.library.opcheck(torch.ops.spinfx.hadamard.default, (x.detach(), list(p.ks), p.block, True))


def test_compiled_op_and_compiled_transform():
    torch._dynamo.reset()
    p = plan(576)
    x = torch.randn(4, 576)

    def block(x):
        return hadamard(torch.relu(x), p) * 2.0

    out = torch.compile(block, backend="inductor", fullgraph=True)(x)
    assert torch.allclose(out, block(x), rtol=0, atol=1e-6)
    # The plain-torch body traces whole (no graph break) so Inductor can fuse the butterfly, also
    # when a second plan recompiles the same code with the plan's ints made dynamic.
    fused = torch.compile(hadamard_transform, backend="inductor", fullgraph=True)
    for p in (plan(576), plan(2080)):
        x = torch.randn(3, p.n)
        assert torch.allclose(fused(x, p), hadamard_transform(x, p), rtol=0, atol=1e-6)


def test_decompositions_open_the_op_for_inductor():
    p = plan(2080)
    x = torch.randn(2, 2080)

    def f(x):
        return hadamard(torch.relu(x), p)

    gm = make_fx(f, decomposition_table=hadamard_decompositions())(x)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.spinfx.hadamard.default not in calls and torch.ops.aten.bmm.default in calls
    # one matmul per Kronecker factor (2080 = 20·52·2), no butterfly (stack/add passes): few nodes, so a
    # model with ~100 online Hadamards compiles in about half the time
    products = [t for t in calls if t in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default)]
    assert len(products) == len(p.ks) + (p.log2 > 0) and torch.ops.aten.stack.default not in calls, calls
    assert torch.allclose(gm(x), f(x), rtol=0, atol=1e-6)
    # the factors are constants in x's dtype (once made: the first trace above also traced their making), so
    # no float64 constant is converted at every call
    gm = make_fx(f, decomposition_table=hadamard_decompositions())(x)
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(consts) == len(products) and {t.dtype for t in consts} == {torch.float32}
    assert torch.ops.aten._to_copy.default not in [n.target for n in gm.graph.nodes]


@pytest.mark.parametrize("n", [1536, 576, 64])
def test_decompositions_under_inductor_fake_tensors(n):
    """Inductor runs decompositions on fake tensors: a plan with a dense factor (1536 = 12·2^7) must
    not reach for a real cached tensor there (it crashed); the op is gone from the compiled code."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    p = plan(n)
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return compile_fx(gm, example_inputs, decompositions={**select_decomp_table(), **hadamard_decompositions()})

    def f(x, t):
        return hadamard(x * 2.0, p, transpose=t) + 1.0

    torch._dynamo.reset()
    x = torch.randn(3, n, dtype=torch.float32)
    for t in (False, True):
        got = torch.compile(f, backend=backend, fullgraph=True)(x, t)
        want = hadamard_dense_reference((x * 2.0).double(), p, transpose=t) + 1.0
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5)
    assert seen


def test_plan_from_op_args_roundtrip_and_validation():
    for n in (576, 1040, 29568, 4096):
        p = plan(n)
        assert HadamardPlan.from_op_args(n, list(p.ks), p.block) == p
    with pytest.raises(ValueError, match="power of two"):
        HadamardPlan.from_op_args(576, [36], 36 * 3)
    with pytest.raises(ValueError, match="constructible"):
        HadamardPlan.from_op_args(944, [236], 944)


# --- Triton body, under the interpreter --------------------------------------------------------

_TRITON_SCRIPT = textwrap.dedent("""
    import torch, triton
    from spinfx.kernels.hadamard import hadamard_transform, hadamard_triton, plan
    torch.manual_seed(0)  # deterministic inputs (unseeded, a bf16 output above 4 — one ulp 0.031 — failed 1 run in 12)
    # Interpreter cost ~ programs × K-loop steps: few rows; one row for the two-factor plan.
    cases = [(plan(64), 3), (plan(192), 2), (plan(1536), 2), (plan(12), 2), (plan(6), 2),
             (plan(96, block=32), 2), (plan(2080), 1)]
    for p, rows in cases:
        for dtype in (torch.float64, torch.float32):
            x = torch.randn(rows, p.n, dtype=dtype)
            for transpose in (False, True):
                out, ref = hadamard_triton(x, p, transpose), hadamard_transform(x, p, transpose)
                assert out.dtype == dtype and out.shape == x.shape, p
                atol = 1e-12 if dtype == torch.float64 else 2e-6
                assert torch.allclose(out, ref, rtol=0, atol=atol), (p, dtype, (out - ref).abs().max())
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    out = hadamard_triton(x, plan(192))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.allclose(out.float(), hadamard_transform(x, plan(192)).float(), rtol=0, atol=3e-2)
    print("ok", len(cases))
""")


def test_triton_body_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "7"]
