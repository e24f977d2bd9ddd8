// spinfx::qlinear_cpu — the CPU body of a 4-bit quantized linear, y = x·Wᵀ + b, in float32.
//
// Layout (made once by kernels/qlinear_cpu.py `repack`), N padded to NB·16 rows, K a multiple of 8:
//   q      int32 [NB, K/8, 16]  word (b, c, r): the signed 4-bit codes of row 16b+r at k = 8c..8c+7,
//                               nibble j (bits 4j..4j+3, two's complement) <-> k = 8c + j
//   scales float [NB, G, 16]    s[n, g], groups of `group_size` consecutive k (G = K / group_size)
//   zeros  float [NB, G, 16]    optional z[n, g], an integer: W[n, k] = (c[n, k] + z[n, g(k)])·s[n, g(k)]
// so y[n] = Σ_g s[n,g]·(Σ_{k∈g} c[n,k]·x[k] + z[n,g]·Σ_{k∈g} x[k]) + b[n].
//
// Body: vectors across 16 output rows; one load of 16 words feeds 8 k-steps; each
// nibble is sign-extended (shift left, arithmetic shift right), converted to float and FMA'd with the
// broadcast x[k]; per group the sum is scaled once (s·acc + tot, one FMA). Each FMA rounds once and the
// integer codes are exact, so a row's result carries at most group_size + G + 2 roundings in sequence
// (group sum, zero term, scaled sum, bias): |y - y_exact| <= γ_(group_size+G+2)·(|x|·|W|ᵀ + |b|), the
// bound tests/test_qlinear_cpu.py checks (|W| -> (|c| + |z|)·s with zeros).
// M > 1 runs tiles of up to 4 (AVX2) / 8 (AVX-512) rows of x per pass over a weight block: one unpack
// feeds 2·4 / 8 FMAs, a GEMM micro-kernel; measured at or below fp32 at::mm up to M = 128 (bench/README.md),
// so there is no dequantize + mm path for fp32. x in bf16/fp16 is widened to fp32 (exact) and y rounded
// back once. Any other dtype (fp64): W is dequantized once in it, w = (c + z)·s, and multiplied by at::mm.
//
// AVX2 and AVX-512 bodies are compiled in this one translation unit with function target attributes
// (no global -mavx flags: the baseline code runs anywhere); `vector_bits` (256/512) picks one per call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t R = 16;  // rows per block

#define SPX_AVX2 __attribute__((target("avx2,fma")))
#define SPX_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Accumulator chains: NA interleaved partial sums per (m, vector), so that >= 8 FMA chains are in flight.
// ---------------------------------------------------------------------------------------------- AVX2
template <int MT, int NA>
SPX_AVX2 void gemv_avx2(const int32_t* q, const float* s, const float* z, const float* x, int64_t K,
                        const float* xs, int64_t G, int64_t cpg, float* out) {
  __m256 tot[MT][2];
  for (int m = 0; m < MT; ++m) tot[m][0] = tot[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[NA][MT][2];
    for (int a = 0; a < NA; ++a)
      for (int m = 0; m < MT; ++m) acc[a][m][0] = acc[a][m][1] = _mm256_setzero_ps();
    const int32_t* qg = q + g * cpg * R;
    const float* xg = x + g * cpg * 8;
    for (int64_t c = 0; c < cpg; ++c) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + c * R));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + c * R + 8));
      const float* xc = xg + c * 8;
#define SPX_STEP2(j)                                                                                     \
  {                                                                                                      \
    const __m256 v0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w0, 28 - 4 * (j)), 28));    \
    const __m256 v1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w1, 28 - 4 * (j)), 28));    \
    for (int m = 0; m < MT; ++m) {                                                                       \
      const __m256 xb = _mm256_broadcast_ss(xc + m * K + (j));                                           \
      acc[(j) % NA][m][0] = _mm256_fmadd_ps(v0, xb, acc[(j) % NA][m][0]);                                \
      acc[(j) % NA][m][1] = _mm256_fmadd_ps(v1, xb, acc[(j) % NA][m][1]);                                \
    }                                                                                                    \
  }
      SPX_STEP2(0) SPX_STEP2(1) SPX_STEP2(2) SPX_STEP2(3) SPX_STEP2(4) SPX_STEP2(5) SPX_STEP2(6) SPX_STEP2(7)
#undef SPX_STEP2
    }
    for (int a = 1; a < NA; ++a)
      for (int m = 0; m < MT; ++m)
        for (int h = 0; h < 2; ++h) acc[0][m][h] = _mm256_add_ps(acc[0][m][h], acc[a][m][h]);
    if (z != nullptr) {
      const __m256 z0 = _mm256_loadu_ps(z + g * R), z1 = _mm256_loadu_ps(z + g * R + 8);
      for (int m = 0; m < MT; ++m) {
        const __m256 xb = _mm256_broadcast_ss(xs + m * G + g);
        acc[0][m][0] = _mm256_fmadd_ps(z0, xb, acc[0][m][0]);
        acc[0][m][1] = _mm256_fmadd_ps(z1, xb, acc[0][m][1]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(s + g * R), s1 = _mm256_loadu_ps(s + g * R + 8);
    for (int m = 0; m < MT; ++m) {
      tot[m][0] = _mm256_fmadd_ps(acc[0][m][0], s0, tot[m][0]);
      tot[m][1] = _mm256_fmadd_ps(acc[0][m][1], s1, tot[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    _mm256_storeu_ps(out + m * R, tot[m][0]);
    _mm256_storeu_ps(out + m * R + 8, tot[m][1]);
  }
}

// -------------------------------------------------------------------------------------------- AVX-512
template <int MT, int NA>
SPX_AVX512 void gemv_avx512(const int32_t* q, const float* s, const float* z, const float* x, int64_t K,
                            const float* xs, int64_t G, int64_t cpg, float* out) {
  __m512 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[NA][MT];
    for (int a = 0; a < NA; ++a)
      for (int m = 0; m < MT; ++m) acc[a][m] = _mm512_setzero_ps();
    const int32_t* qg = q + g * cpg * R;
    const float* xg = x + g * cpg * 8;
    for (int64_t c = 0; c < cpg; ++c) {
      const __m512i w = _mm512_loadu_si512(qg + c * R);
      const float* xc = xg + c * 8;
#define SPX_STEP5(j)                                                                                     \
  {                                                                                                      \
    const __m512 v = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 28 - 4 * (j)), 28));      \
    for (int m = 0; m < MT; ++m)                                                                         \
      acc[(j) % NA][m] = _mm512_fmadd_ps(v, _mm512_set1_ps(xc[m * K + (j)]), acc[(j) % NA][m]);          \
  }
      SPX_STEP5(0) SPX_STEP5(1) SPX_STEP5(2) SPX_STEP5(3) SPX_STEP5(4) SPX_STEP5(5) SPX_STEP5(6) SPX_STEP5(7)
#undef SPX_STEP5
    }
    for (int a = 1; a < NA; ++a)
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_add_ps(acc[0][m], acc[a][m]);
    if (z != nullptr) {
      const __m512 zv = _mm512_loadu_ps(z + g * R);
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[m * G + g]), acc[0][m]);
    }
    const __m512 sv = _mm512_loadu_ps(s + g * R);
    for (int m = 0; m < MT; ++m) tot[m] = _mm512_fmadd_ps(acc[0][m], sv, tot[m]);
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * R, tot[m]);
}

using GemvFn = void (*)(const int32_t*, const float*, const float*, const float*, int64_t, const float*, int64_t,
                        int64_t, float*);

// The body for a tile of mt rows of x (1 <= mt <= max_tile(bits)).
GemvFn pick(int64_t vector_bits, int64_t mt) {
  if (vector_bits == 512) {
    switch (mt) {
      case 1: return gemv_avx512<1, 8>;
      case 2: return gemv_avx512<2, 4>;
      case 3: return gemv_avx512<3, 2>;
      case 4: return gemv_avx512<4, 2>;
      case 5: return gemv_avx512<5, 1>;
      case 6: return gemv_avx512<6, 1>;
      case 7: return gemv_avx512<7, 1>;
      default: return gemv_avx512<8, 1>;
    }
  }
  switch (mt) {
    case 1: return gemv_avx2<1, 4>;
    case 2: return gemv_avx2<2, 2>;
    case 3: return gemv_avx2<3, 1>;
    default: return gemv_avx2<4, 1>;
  }
}

int64_t max_tile(int64_t vector_bits) { return vector_bits == 512 ? 8 : 4; }

// Wᵀ [K, NB·16] in T: w = fl((c + z)·s), one rounding, as the reference dequantizes.
template <typename T>
at::Tensor dequant_t(const at::Tensor& q, const at::Tensor& scales, const float* z, int64_t group_size,
                     at::ScalarType dt) {
  const int64_t nb = q.size(0), cpk = q.size(1), K = cpk * 8, ld = nb * R, G = scales.size(1);
  at::Tensor wt = at::empty({K, ld}, q.options().dtype(dt));
  const int32_t* qp = q.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  T* out = wt.data_ptr<T>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < cpk; ++c) {
        const int64_t g = c * 8 / group_size;
        const int32_t* w = qp + (b * cpk + c) * R;
        const float* s = sp + (b * G + g) * R;
        const float* zz = z == nullptr ? nullptr : z + (b * G + g) * R;
        for (int j = 0; j < 8; ++j) {
          T* row = out + (c * 8 + j) * ld + b * R;
          for (int64_t r = 0; r < R; ++r) {
            const int32_t code = static_cast<int32_t>(static_cast<uint32_t>(w[r]) << (28 - 4 * j)) >> 28;
            const T v = static_cast<T>(code) + (zz == nullptr ? T(0) : static_cast<T>(zz[r]));
            row[r] = v * static_cast<T>(s[r]);
          }
        }
      }
    }
  });
  return wt;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t n,
                       int64_t group_size, int64_t vector_bits) {
  TORCH_CHECK(q.scalar_type() == at::kInt && q.dim() == 3 && q.size(2) == R && q.is_contiguous(),
              "qlinear_cpu: q must be contiguous int32 [NB, K/8, 16]");
  const int64_t nb = q.size(0), K = q.size(1) * 8;
  TORCH_CHECK(x.size(-1) == K, "qlinear_cpu: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && K % group_size == 0, "qlinear_cpu: bad group_size");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == nb && scales.size(1) == G && scales.size(2) == R,
              "qlinear_cpu: scales must be contiguous float [NB, G, 16]");
  const bool has_z = zeros.has_value() && zeros->defined();
  if (has_z)
    TORCH_CHECK(zeros->scalar_type() == at::kFloat && zeros->is_contiguous() && zeros->sizes() == scales.sizes(),
                "qlinear_cpu: zeros must be like scales");
  TORCH_CHECK(0 < n && n <= nb * R, "qlinear_cpu: bad out_features");
  TORCH_CHECK(vector_bits == 256 || vector_bits == 512, "qlinear_cpu: vector_bits is 256 or 512");
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "qlinear_cpu: needs AVX2+FMA");
  TORCH_CHECK(vector_bits == 256 || __builtin_cpu_supports("avx512f"), "qlinear_cpu: this CPU has no AVX-512");
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "qlinear_cpu: bias must be [out_features]");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const at::ScalarType xt = x.scalar_type();
  const bool f32 = xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf;
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  const float* zp = has_z ? zeros->data_ptr<float>() : nullptr;

  if (!f32 || M == 0) {  // dequantize once + GEMM, in x's dtype
    const at::ScalarType dt = f32 ? at::kFloat : xt;
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "qlinear_cpu: unsupported activation dtype");
    at::Tensor wt = dt == at::kFloat ? dequant_t<float>(q, scales, zp, group_size, dt)
                                     : dequant_t<double>(q, scales, zp, group_size, dt);
    wt = wt.narrow(1, 0, n);
    const at::Tensor xin = x2.to(dt);
    at::Tensor y = has_b ? at::addmm(bias->to(dt), xin, wt) : at::mm(xin, wt);
    return y.to(xt).reshape(out_shape);
  }

  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xsum;
  if (has_z) {  // Σ_{k∈g} x[m, k]
    xsum.resize(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) acc += xp[m * K + k];
        xsum[m * G + g] = acc;
      }
  }
  at::Tensor bf;
  const float* bp = nullptr;
  if (has_b) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, xf.options());
  float* yp = y.data_ptr<float>();
  const int32_t* qp = q.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  const float* xsp = has_z ? xsum.data() : nullptr;
  const int64_t cpk = K / 8, cpg = group_size / 8, tile = max_tile(vector_bits);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    float tmp[8 * R];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min<int64_t>(R, n - b * R);
      for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t mt = std::min(tile, M - m0);
        pick(vector_bits, mt)(qp + b * cpk * R, sp + b * G * R, zp == nullptr ? nullptr : zp + b * G * R,
                              xp + m0 * K, K, xsp == nullptr ? nullptr : xsp + m0 * G, G, cpg, tmp);
        for (int64_t m = 0; m < mt; ++m)
          for (int64_t r = 0; r < rows; ++r)
            yp[(m0 + m) * n + b * R + r] = bp == nullptr ? tmp[m * R + r] : tmp[m * R + r] + bp[b * R + r];
      }
    }
  });
  return (xt == at::kFloat ? y : y.to(xt)).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(spinfx, CPU, m) { m.impl("qlinear_cpu", &qlinear_cpu); }
