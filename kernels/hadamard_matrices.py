"""Hadamard matrices generated in code, and plans for rotating a dimension with them.

A Hadamard matrix H of order n has entries ±1 and HᵀH = nI; H/√n is orthonormal. Orders 1, 2 and
the multiples of 4 are the only candidates. This module builds them from three constructions and
Kronecker products (H_a ⊗ H_b is Hadamard of order ab):

* Sylvester: H_{2^m} = H_2^{⊗m}, natural (Walsh) order.
* Paley I, order q+1 for a prime power q ≡ 3 (mod 4), and Paley II, order 2(q+1) for a prime power
  q ≡ 1 (mod 4): both from the quadratic character χ of GF(q) (arithmetic below, in code).
* Goethals–Seidel, order 4t, from four ±1 circulants of odd order t whose periodic autocorrelations
  sum to zero (table `_GS_ROWS`, the orders t ∈ {23, 29, 39, 43, 47} that Paley cannot reach).

Every dense factor used by a plan is K = 4·o for an odd o ∈ [3, 63]; together with Sylvester this
makes every multiple of 4 in 4..256 constructible (K = 2^j·o is planned as (4o) ⊗ H_{2^(j-2)})
EXCEPT K = 236 = 4·59: Paley does not reach 59 (235 and 117 are not prime powers), Williamson
matrices of order 59 do not exist, and no T-sequences / difference family of length 59 is in the
table. Larger orders are constructible when they factor as 2^e·o₁·…·o_r with every o_i a constructible
odd part above and 2r ≤ e (e.g. 10944 = 36 ⊗ 76 ⊗ H_4); `plan` finds such a factorization or falls
back to a block-diagonal rotation whose block is the largest constructible divisor of n.

Factors are verified on construction (integer HᵀH = KI, cached); a Kronecker product of Hadamard
matrices is Hadamard, so composite orders need no dense check.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Largest dense factor K; a plan applies each factor as a K×K matmul over its axis.
MAX_FACTOR = 256

# Goethals–Seidel data: first rows of four ±1 circulants A, B, C, D of order t with
# Σ PAF = 0 at every nonzero shift, i.e. AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4tI. Found by our own searches:
# t = 23 (symmetric, i.e. Williamson), 39, 43 by exhaustive meet-in-the-middle over sequences
# constant on the orbits of a multiplier group (t=23: {±1}; t=39: <16>; t=43: <4>); t = 29, 47 by
# local search for base sequences BS(15, 14) and Turyn-type sequences TT(16), turned into
# T-sequences of length t and combined with the rows of H_4 (Cooper–Wallis).
_GS_ROWS = {
    23: ("++-+-++-+--++--+-++-+-+",
         "+--++---+-+--+-+---++--",
         "+-+++++---+--+---+++++-",
         "+---+++++++--+++++++---"),
    29: ("-+-+---+--+----+++--+--+-+---",
         "+-+--+---+++++-+---++--+++++-",
         "+-+-+++-++-+++++++--+--+-+---",
         "+-+--+---+++++--+++--++-----+"),
    39: ("++++-+-+++-+--+-+---+-+---++-+--+-++-+-",
         "++--+---+-+++-+-+--++++-++--++++-+-++--",
         "++++-+++++-+---++++++-++---++--++-+--++",
         "+++++++--++--+-++++---++-+++----+-----+"),
    43: ("++--+-++--++----+-+--+-++-+-++++--++--+-++-",
         "++-+++-+---++---+-++++----+-+++--+++-+---+-",
         "++++++--+--++---+--++++----+----++-+-+-+-++",
         "++--+----+-+-+++++---+---+---------++----+-"),
    47: ("--+--++-----+-+--++---+----++++-+----+-++--+-++",
         "++-++--+++++-+-+-++---+----+++++----+---+-+-++-",
         "++-++--+++++-+-++--+++-++++-----+----+-++--+-++",
         "++-++--+++++-+-+-++---+----++++-++++-+++-+-+--+"),
}


def _sylvester(m: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    for _ in range(m):
        h = np.block([[h, h], [h, -h]])
    return h


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _gf_nonzero_squares(p: int, k: int) -> np.ndarray:
    """Boolean mask over GF(p^k) (element = Σ c_i x^i labelled Σ c_i p^i) of the nonzero squares.

    Searches a monic f of degree k with f(0) ≠ 0 for which the powers of x mod f run through
    p^k − 1 distinct elements: then Z_p[x]/f has p^k − 1 units, so f is irreducible, x generates
    the multiplicative group, and the squares are the even powers of x.
    """
    q = p**k
    for tail in itertools.product(range(p), repeat=k):  # f = x^k + Σ tail[i] x^i
        if tail[0] == 0:
            continue
        elem, labels = [1] + [0] * (k - 1), []
        for _ in range(q - 1):
            labels.append(sum(c * p**i for i, c in enumerate(elem)))
            top = elem[-1]  # multiply by x, then reduce x^k ≡ −Σ tail[i] x^i
            elem = [(c - top * t) % p for c, t in zip([0] + elem[:-1], tail)]
        if len(set(labels)) == q - 1:
            squares = np.zeros(q, dtype=bool)
            squares[labels[::2]] = True
            return squares
    raise AssertionError(f"no primitive polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a − b) over GF(q): 0 on the diagonal, ±1 elsewhere; QQᵀ = qI − J, QJ = 0."""
    p, k = _prime_power(q)
    weights = p ** np.arange(k)
    digits = (np.arange(q)[:, None] // weights) % p
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    squares = _gf_nonzero_squares(p, k)
    return np.where(diff == 0, 0, np.where(squares[diff], 1, -1)).astype(np.int64)


def _paley1(q: int) -> np.ndarray:
    """Order q+1, q ≡ 3 (mod 4): Q is skew (χ(−1) = −1), H = I + [[0, 1ᵀ], [−1, Q]]."""
    h = np.ones((q + 1, q + 1), dtype=np.int64)
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + np.eye(q, dtype=np.int64)
    return h


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1), q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix
    (CCᵀ = qI), and H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


def _goethals_seidel(rows: tuple[str, str, str, str]) -> np.ndarray:
    """Order 4t from circulants A, B, C, D (ΣXXᵀ = 4tI) and the back-diagonal R:
    [[A, BR, CR, DR], [−BR, A, DᵀR, −CᵀR], [−CR, −DᵀR, A, BᵀR], [−DR, CᵀR, −BᵀR, A]]."""
    a, b, c, d = (
        np.stack([np.roll([1 if s == "+" else -1 for s in row], i) for i in range(len(row))])
        for row in rows
    )
    r = np.eye(len(rows[0]), dtype=np.int64)[::-1]
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ])


def _factor_construction(k: int):
    """The construction of the dense factor of order k = 4·o (o odd), or None."""
    o = k // 4
    q1, q2 = _prime_power(k - 1), _prime_power(k // 2 - 1)
    if q1:  # k − 1 ≡ 3 (mod 4) holds automatically for k ≡ 0 (mod 4)
        return _paley1, k - 1
    if q2:  # k/2 − 1 = 2o − 1 ≡ 1 (mod 4) holds automatically for odd o
        return _paley2, k // 2 - 1
    if o in _GS_ROWS:
        return _goethals_seidel, _GS_ROWS[o]
    return None


# Dense factors available to plans: K = 4·o, o odd in [3, 63].
FACTORS: tuple[int, ...] = tuple(
    4 * o for o in range(3, MAX_FACTOR // 4, 2) if _factor_construction(4 * o) is not None
)


@functools.lru_cache(maxsize=None)
def _factor_matrix(k: int) -> np.ndarray:
    """The verified ±1 Hadamard factor of order k ∈ FACTORS (read-only, cached)."""
    build, arg = _factor_construction(k)
    h = build(arg)
    if h.shape != (k, k) or not np.array_equal(h.T @ h, k * np.eye(k, dtype=np.int64)):
        raise AssertionError(f"construction of the Hadamard factor of order {k} is wrong")
    h.setflags(write=False)
    return h


@functools.lru_cache(maxsize=128)
def factor_tensor(
    k: int, dtype: torch.dtype, device: torch.device, transpose: bool = False, scale: float = 1.0
) -> torch.Tensor:
    """scale·H_k (or its transpose) as a contiguous tensor, cached per (k, dtype, device, ...).

    Read-only by convention: it is shared by every call of the online transform. k = 1 gives [[scale]].
    """
    h = torch.ones(1, 1, dtype=torch.float64) if k == 1 else torch.tensor(_factor_matrix(k), dtype=torch.float64)
    return (h.T if transpose else h).mul(scale).to(dtype=dtype, device=device).contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the online transform: float64 stays, every other float runs in float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"spinfx::hadamard needs a floating-point tensor, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _odd_factorizations(o: int, smallest: int = 3):
    """Non-decreasing tuples of odd factors in FACTORS/4 (each ≥ smallest) with product o."""
    if o == 1:
        yield ()
        return
    for f in range(smallest, o + 1, 2):
        if o % f == 0 and 4 * f in FACTORS:
            for rest in _odd_factorizations(o // f, f):
                yield (f, *rest)


@functools.lru_cache(maxsize=None)
def _exact_factors(n: int) -> tuple[tuple[int, ...], int] | None:
    """(ks, log2) with n = Π ks · 2^log2, or None when our constructions do not reach n.

    n = 2^e·o: split o into odd factors o_i, each costing the factor K_i = 4·o_i (two of the e
    powers of two). Preference: fewest dense factors (each is one memory pass / kernel launch),
    then the smallest Σ K_i (flops per element).
    """
    e = (n & -n).bit_length() - 1
    o = n >> e
    best = None
    for odd in _odd_factorizations(o):
        if 2 * len(odd) <= e:
            ks = tuple(4 * f for f in odd)
            key = (len(ks), sum(ks))
            if best is None or key < best[0]:
                best = key, ks
    if best is None:
        return None
    ks = best[1]
    return ks, e - 2 * len(ks)


def constructible_orders(limit: int = MAX_FACTOR) -> tuple[int, ...]:
    """All orders 1..limit for which `hadamard_matrix` succeeds."""
    return tuple(n for n in range(1, limit + 1) if _exact_factors(n) is not None)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ±1 Hadamard matrix of order n used by `plan(n)`: H_{K1} ⊗ … ⊗ H_{Kr} ⊗ H_{2^m}, HᵀH = nI.

    Raises ValueError naming n when n is not constructible (see the module docstring).
    Not cached: n² memory is the caller's choice.
    """
    factors = _exact_factors(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} is constructible here "
            "(need n = 2^e·o₁·…·o_r with each 4·o_i a known factor and 2r ≤ e)"
        )
    ks, log2 = factors
    h = _sylvester(log2).astype(np.float64)
    for k in reversed(ks):
        h = np.kron(_factor_matrix(k).astype(np.float64), h)
    return torch.from_numpy(h).to(dtype)


def _structure(ks: tuple[int, ...], log2: int) -> str:
    parts = [str(k) for k in ks]
    if log2 or not ks:
        parts.append(f"2^{log2}")
    return "×".join(parts)


@dataclass(frozen=True)
class HadamardPlan:
    """How a dimension n is rotated: `num_blocks` diagonal blocks of order `block`, each the
    normalized H_{ks[0]} ⊗ … ⊗ H_{ks[-1]} ⊗ H_{2^log2} / √block. Exact when block == n.

    The transform of a row vector x is x @ M with M = `matrix()`; the online op computes it in
    O(n·(Σks + log2)) without ever forming M.
    """

    n: int
    block: int
    ks: tuple[int, ...]
    log2: int
    # The ±1 factors H_k (float64, CPU, shared), held so that traced code reads them as tensor
    # attributes instead of looking them up by (possibly symbolic) ints.
    factors: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if any(k not in FACTORS for k in self.ks):
            raise ValueError(f"Hadamard factors {self.ks} not all in the constructible set")
        if self.log2 < 0 or math.prod(self.ks) << self.log2 != self.block:
            raise ValueError(f"block {self.block} != {_structure(self.ks, self.log2)}")
        if self.block < 1 or self.n % self.block:
            raise ValueError(f"block {self.block} does not divide n={self.n}")
        cpu = torch.device("cpu")
        object.__setattr__(self, "factors", tuple(factor_tensor(k, torch.float64, cpu) for k in self.ks))

    @classmethod
    def from_op_args(cls, n: int, ks: list[int] | tuple[int, ...], block: int) -> HadamardPlan:
        """Rebuild a plan from the plain ints `spinfx::hadamard` takes."""
        inner = math.prod(ks)
        if inner < 1 or block % inner or (block // inner) & (block // inner - 1):
            raise ValueError(f"block {block} is not Π{tuple(ks)} times a power of two")
        return cls(n, block, tuple(ks), (block // inner).bit_length() - 1)

    @property
    def is_exact(self) -> bool:
        return self.block == self.n

    @property
    def num_blocks(self) -> int:
        return self.n // self.block

    def describe(self) -> str:
        """'exact 172×2^6', 'exact 36×76×2^2', 'block-diagonal 64 × 171 blocks (2^6)'."""
        s = _structure(self.ks, self.log2)
        if self.is_exact:
            return f"exact {s}"
        return f"block-diagonal {self.block} × {self.num_blocks} blocks ({s})"

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense orthonormal n×n M (block-diagonal when not exact). Offline use only: n² memory."""
        h = hadamard_matrix(self.block, dtype).div_(math.sqrt(self.block))
        return h if self.is_exact else torch.block_diag(*[h] * self.num_blocks)


@functools.lru_cache(maxsize=None)
def plan(n: int, block: int | None = None) -> HadamardPlan:
    """The rotation plan for dimension n.

    block=None: exact when n is constructible, else block-diagonal with the largest constructible
    block that divides n. An explicit block (e.g. a head dimension) must divide n and be
    constructible. Raises ValueError when no block of order ≥ 2 applies (odd n).
    """
    if block is None:
        block = next((b for b in range(n, 1, -1) if n % b == 0 and _exact_factors(b)), None)
        if block is None:
            raise ValueError(f"no Hadamard block of order >= 2 divides n={n}")
    elif block < 2 or n % block or _exact_factors(block) is None:
        raise ValueError(f"block {block} must be a constructible Hadamard order >= 2 dividing n={n}")
    ks, log2 = _exact_factors(block)
    return HadamardPlan(n, block, ks, log2)


def random_hadamard(n: int, seed: int, block: int | None = None) -> torch.Tensor:
    """Randomized Hadamard rotation diag(s)·M, M = plan(n, block).matrix(), s = ±1 from the seed.

    Orthonormal float64. x @ R equals the online transform of x ⊙ s, so the signs fold into weights.
    """
    return random_signs(n, seed)[:, None] * plan(n, block).matrix()


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The ±1 float64 vector s of random_hadamard(n, seed) = diag(s)·M."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal float64 matrix: QR of a seeded Gaussian, column signs fixed so that
    diag(R) > 0 (without the fix QR's sign convention biases the distribution)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
