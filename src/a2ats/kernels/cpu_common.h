// Helpers shared by the CPU kernels' source files (one extension, several translation units).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace a2ats {

// Locality 3: into L1 (T0); 2: into L2 (T1), which holds more misses in flight for scattered rows.
template <int Locality = 3, typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, Locality);
}

inline float to_f(float x) { return x; }
inline float to_f(int8_t x) { return static_cast<float>(x); }  // int8 rows carry a scale per row
inline float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes (c10's conversion may not).
  uint16_t raw;
  std::memcpy(&raw, &x, 2);
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: a widening shift
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Lane j: the sum of the lanes of v[j]. A transposing tree (each level adds pairs of half-width parts) costs
// 3 instructions per sum where reducing each vector alone costs 9.
__attribute__((always_inline)) inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int p = 0; p < 8; ++p)  // blocks: v[2p] folded to 256 bits, then v[2p+1]
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
  for (int p = 0; p < 4; ++p)  // 128-bit block k: v[4p + k] folded to 4 lanes
    u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], 0xDD));
  const __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x44), _mm512_shuffle_ps(w0, w1, 0xEE));
  // lane 4k + p of z holds the sum of v[k + 4p]
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), z);
}

// sum16 of parts i * NG + g (R = 16 / NG items i of NG dots each; parts from NG * R on are zero) with its lanes
// reordered head-major: lane g * R + i holds the sum of part i * NG + g, so each head's R sums are contiguous
// (one masked store per head) and lane i + g * R is a fixed shift away for a max over heads.
template <int NG>
inline __m512 sum16_head_major(const __m512* part) {
  constexpr int R = 16 / NG;
  alignas(64) static constexpr int32_t order[16] = {
#define A2ATS_LANE(l) ((l) < NG * R ? ((l) % R) * NG + (l) / R : (l))
      A2ATS_LANE(0),  A2ATS_LANE(1),  A2ATS_LANE(2),  A2ATS_LANE(3),  A2ATS_LANE(4),  A2ATS_LANE(5),
      A2ATS_LANE(6),  A2ATS_LANE(7),  A2ATS_LANE(8),  A2ATS_LANE(9),  A2ATS_LANE(10), A2ATS_LANE(11),
      A2ATS_LANE(12), A2ATS_LANE(13), A2ATS_LANE(14), A2ATS_LANE(15)};
#undef A2ATS_LANE
  return _mm512_permutexvar_ps(_mm512_load_si512(order), sum16(part));
}
#endif

// a . b over d floats in 16 independent sums: one vector FMA per 16 dims, no serial chain (the k-means kernels')
inline float dot16(const float* __restrict a, const float* __restrict b, int64_t d) {
  float part[16] = {};
  int64_t e = 0;
  for (; e + 16 <= d; e += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[e + l] * b[e + l];
  for (; e < d; ++e) part[e % 16] += a[e] * b[e];
  float dot = 0.f;
  for (int l = 0; l < 16; ++l) dot += part[l];
  return dot;
}

// v's storage, grown to at least `size` elements (new elements are zero): per-thread scratch reused across calls
template <typename T>
T* grown(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  return v.data();
}

// The first argmax over c of x[g, i] . cents[g % Gc, c] - half[g % Gc, c] for points x (G, N, d) and centroid sets
// (Gc, k, d), fp32: points in blocks of 64, each block's (64, k) scores a GEMM (BLAS, one thread per block) left in
// cache, where the argmax is taken, instead of N x k scores written to memory and read back. NaN rows (never from
// finite points) give 0.
template <typename OutT>
void nearest_by_gemm(const at::Tensor& x, const at::Tensor& cents, const float* half, OutT* out) {
  const int64_t G = x.size(0), N = x.size(1), Gc = cents.size(0), k = cents.size(1);
  constexpr int64_t kRows = 64;
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, G * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = item / blocks, i0 = (item % blocks) * kRows, rows = std::min(kRows, N - i0);
      const auto sim = at::mm(x[g].narrow(0, i0, rows), cents[g % Gc].t()).contiguous();  // (rows, k)
      const float* S = sim.data_ptr<float>();
      const float* __restrict h = half + (g % Gc) * k;
      for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict s = S + r * k;
        float best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : best)
        for (int64_t c = 0; c < k; ++c) best = std::max(best, s[c] - h[c]);
        int64_t arg = 0;
        for (int64_t c = 0; c < k; ++c)
          if (s[c] - h[c] == best) {
            arg = c;
            break;
          }
        out[g * N + i0 + r] = static_cast<OutT>(arg);
      }
    }
  });
}

}  // namespace a2ats

