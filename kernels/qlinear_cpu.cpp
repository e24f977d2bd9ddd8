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
// feeds 4 / 8 FMAs, a GEMM micro-kernel; measured at or below fp32 at::mm up to M = 128 (bench/README.md),
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

// One micro-kernel call: MT rows of x times NBLK consecutive blocks (16 rows each) of W. Every output lane
// runs the same sequence whatever MT, NBLK and the vector width: acc = 0; acc = fma(c_k, x_k, acc) for k
// of the group in order; acc = fma(z, Σx, acc); tot = fma(acc, s, tot) — so a row's result does not
// depend on the batch (M), on N, on the thread split, or on AVX2 vs AVX-512 (bitwise). Latency is hidden
// by MT·NBLK (·2 halves on AVX2) independent chains instead of split sums.
// ---------------------------------------------------------------------------------------------- AVX2
template <int MT, int NBLK>
SPX_AVX2 void gemv_avx2(const int32_t* q, int64_t qstride, const float* s, const float* z, int64_t sstride,
                        const float* x, int64_t K, const float* xs, int64_t G, int64_t cpg, float* out) {
  __m256 tot[MT][NBLK][2];
  for (int m = 0; m < MT; ++m)
    for (int bb = 0; bb < NBLK; ++bb) tot[m][bb][0] = tot[m][bb][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT][NBLK][2];
    for (int m = 0; m < MT; ++m)
      for (int bb = 0; bb < NBLK; ++bb) acc[m][bb][0] = acc[m][bb][1] = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      __m256i w[NBLK][2];
      for (int bb = 0; bb < NBLK; ++bb) {
        w[bb][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + bb * qstride + c * R));
        w[bb][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + bb * qstride + c * R + 8));
      }
      const float* xc = x + c * 8;
#define SPX_STEP2(j)                                                                                       \
  {                                                                                                        \
    __m256 xb[MT];                                                                                         \
    for (int m = 0; m < MT; ++m) xb[m] = _mm256_broadcast_ss(xc + m * K + (j));                            \
    for (int bb = 0; bb < NBLK; ++bb)                                                                      \
      for (int h = 0; h < 2; ++h) {                                                                        \
        const __m256 v = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w[bb][h], 28 - 4 * (j)), 28)); \
        for (int m = 0; m < MT; ++m) acc[m][bb][h] = _mm256_fmadd_ps(v, xb[m], acc[m][bb][h]);             \
      }                                                                                                    \
  }
      SPX_STEP2(0) SPX_STEP2(1) SPX_STEP2(2) SPX_STEP2(3) SPX_STEP2(4) SPX_STEP2(5) SPX_STEP2(6) SPX_STEP2(7)
#undef SPX_STEP2
    }
    for (int bb = 0; bb < NBLK; ++bb)
      for (int h = 0; h < 2; ++h) {
        if (z != nullptr) {
          const __m256 zv = _mm256_loadu_ps(z + bb * sstride + g * R + 8 * h);
          for (int m = 0; m < MT; ++m)
            acc[m][bb][h] = _mm256_fmadd_ps(zv, _mm256_broadcast_ss(xs + m * G + g), acc[m][bb][h]);
        }
        const __m256 sv = _mm256_loadu_ps(s + bb * sstride + g * R + 8 * h);
        for (int m = 0; m < MT; ++m) tot[m][bb][h] = _mm256_fmadd_ps(acc[m][bb][h], sv, tot[m][bb][h]);
      }
  }
  for (int m = 0; m < MT; ++m)
    for (int bb = 0; bb < NBLK; ++bb)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (m * NBLK + bb) * R + 8 * h, tot[m][bb][h]);
}

// -------------------------------------------------------------------------------------------- AVX-512
template <int MT, int NBLK>
SPX_AVX512 void gemv_avx512(const int32_t* q, int64_t qstride, const float* s, const float* z, int64_t sstride,
                            const float* x, int64_t K, const float* xs, int64_t G, int64_t cpg, float* out) {
  __m512 tot[MT][NBLK];
  for (int m = 0; m < MT; ++m)
    for (int bb = 0; bb < NBLK; ++bb) tot[m][bb] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MT][NBLK];
    for (int m = 0; m < MT; ++m)
      for (int bb = 0; bb < NBLK; ++bb) acc[m][bb] = _mm512_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      __m512i w[NBLK];
      for (int bb = 0; bb < NBLK; ++bb) w[bb] = _mm512_loadu_si512(q + bb * qstride + c * R);
      const float* xc = x + c * 8;
#define SPX_STEP5(j)                                                                                       \
  {                                                                                                        \
    __m512 xb[MT];                                                                                         \
    for (int m = 0; m < MT; ++m) xb[m] = _mm512_set1_ps(xc[m * K + (j)]);                                  \
    for (int bb = 0; bb < NBLK; ++bb) {                                                                    \
      const __m512 v = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w[bb], 28 - 4 * (j)), 28));  \
      for (int m = 0; m < MT; ++m) acc[m][bb] = _mm512_fmadd_ps(v, xb[m], acc[m][bb]);                     \
    }                                                                                                      \
  }
      SPX_STEP5(0) SPX_STEP5(1) SPX_STEP5(2) SPX_STEP5(3) SPX_STEP5(4) SPX_STEP5(5) SPX_STEP5(6) SPX_STEP5(7)
#undef SPX_STEP5
    }
    for (int bb = 0; bb < NBLK; ++bb) {
      if (z != nullptr) {
        const __m512 zv = _mm512_loadu_ps(z + bb * sstride + g * R);
        for (int m = 0; m < MT; ++m) acc[m][bb] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[m * G + g]), acc[m][bb]);
      }
      const __m512 sv = _mm512_loadu_ps(s + bb * sstride + g * R);
      for (int m = 0; m < MT; ++m) tot[m][bb] = _mm512_fmadd_ps(acc[m][bb], sv, tot[m][bb]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int bb = 0; bb < NBLK; ++bb) _mm512_storeu_ps(out + (m * NBLK + bb) * R, tot[m][bb]);
}

using GemvFn = void (*)(const int32_t*, int64_t, const float*, const float*, int64_t, const float*, int64_t,
                        const float*, int64_t, int64_t, float*);

// Tiles: (rows of x, blocks of W) per call, most rows first; threads take chunks of kChunk blocks, each
// covered by kChunk / nblk calls per tile of x rows (a chunk's weights stay in cache across the tiles),
// a short last chunk block by block (nblk = 1). Every body does one unpack per (block, k) for mt FMAs.
struct Tile {
  int mt, nblk;
  GemvFn fn, tail;
};
constexpr int kChunk512 = 4, kChunk256 = 2;
const Tile kTiles512[] = {{8, 1, gemv_avx512<8, 1>, gemv_avx512<8, 1>},
                          {4, 2, gemv_avx512<4, 2>, gemv_avx512<4, 1>},
                          {2, 4, gemv_avx512<2, 4>, gemv_avx512<2, 1>},
                          {1, 4, gemv_avx512<1, 4>, gemv_avx512<1, 1>}};
const Tile kTiles256[] = {{4, 1, gemv_avx2<4, 1>, gemv_avx2<4, 1>},
                          {2, 2, gemv_avx2<2, 2>, gemv_avx2<2, 1>},
                          {1, 2, gemv_avx2<1, 2>, gemv_avx2<1, 1>}};

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
  const int64_t cpk = K / 8, cpg = group_size / 8;
  const bool wide = vector_bits == 512;
  const Tile* tiles = wide ? kTiles512 : kTiles256;
  const int ntiles = wide ? 4 : 3;
  const int64_t chunk = wide ? kChunk512 : kChunk256, nchunks = (nb + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    float tmp[8 * R];  // mt·nblk <= 8
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b_begin = ch * chunk, b_end = std::min(nb, b_begin + chunk);
      int64_t m0 = 0;
      for (int t = 0; t < ntiles; ++t) {
        const Tile& tl = tiles[t];
        for (; M - m0 >= tl.mt; m0 += tl.mt) {
          for (int64_t b = b_begin; b < b_end;) {
            const bool full = b + tl.nblk <= b_end;
            const int nblk = full ? tl.nblk : 1;
            (full ? tl.fn : tl.tail)(qp + b * cpk * R, cpk * R, sp + b * G * R, zp == nullptr ? nullptr : zp + b * G * R,
                                     G * R, xp + m0 * K, K, xsp == nullptr ? nullptr : xsp + m0 * G, G, cpg, tmp);
            const int64_t rows = std::min<int64_t>(nblk * R, n - b * R);
            for (int m = 0; m < tl.mt; ++m) {
              float* yrow = yp + (m0 + m) * n + b * R;
              const float* trow = tmp + m * nblk * R;
              if (bp == nullptr) {
                std::copy(trow, trow + rows, yrow);
              } else {
                for (int64_t r = 0; r < rows; ++r) yrow[r] = trow[r] + bp[b * R + r];
              }
            }
            b += nblk;
          }
        }
      }
    }
  });
  return (xt == at::kFloat ? y : y.to(xt)).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(spinfx, CPU, m) { m.impl("qlinear_cpu", &qlinear_cpu); }
