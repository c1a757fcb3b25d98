// CPU kernels for a decode step's projections: compact weights (bf16, int8, 4-bit) times a few rows
// (torch reference: a2ats.kernels.weights.reference).

#include "cpu_common.h"

using a2ats::prefetch_row;
using a2ats::to_f;

namespace {

// ---------------------------------------------------------------------------------------------------
// Kernel 4: decode projections with bf16-stored weights and fp32 math
// ---------------------------------------------------------------------------------------------------

// The decode projections' shared loop: output rows in blocks of 16 across threads; in AVX-512 builds
// `four(o, o1)` takes rows o .. o + 3 (o1: the block's end, for prefetching), then `one(o, o1)` the rest.
template <class Four, class One>
void over_output_rows(int64_t O, Four four, One one) {
  constexpr int64_t kRowsPerItem = 16;  // enough to amortize the split
  at::parallel_for(0, (O + kRowsPerItem - 1) / kRowsPerItem, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t o0 = blk * kRowsPerItem, o1 = std::min(O, o0 + kRowsPerItem);
      int64_t o = o0;
#if defined(__AVX512F__)
      for (; o + 4 <= o1; o += 4) four(o, o1);
#else
      (void)four;
#endif
      for (; o < o1; ++o) one(o, o1);
    }
  });
}

#if defined(__AVX512F__)
// `out[k]` = x . w_k over I inputs for four output rows at once: four independent accumulators hide the FMA
// latency, and each x vector is loaded once for the four rows (a single-accumulator loop measured
// compute-bound at half the memory bandwidth on a 2-core Xeon). bf16 widens to fp32 by a 16-bit shift.
inline void dot4(const float* x, const c10::BFloat16* w, int64_t stride, int64_t I, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int k = 0; k < 4; ++k) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * stride + i));
      const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      acc[k] = _mm512_fmadd_ps(xv, wf, acc[k]);
    }
  }
  for (int k = 0; k < 4; ++k) {
    float t = _mm512_reduce_add_ps(acc[k]);
    for (int64_t j = i; j < I; ++j) t += x[j] * static_cast<float>(w[k * stride + j]);
    out[k] = t;
  }
}
#endif

// y = x @ w.T (+ bias) for bf16 rows.
void bf16_rows_times_x(const float* X, const c10::BFloat16* W, const float* bp, float* Y, int64_t M, int64_t I,
                       int64_t O) {
  over_output_rows(
      O,
      [&](int64_t o, int64_t o1) {
#if defined(__AVX512F__)
        if (o + 8 <= o1) prefetch_row(W + (o + 4) * I, 4 * I);
        for (int64_t r = 0; r < M; ++r) {
          float d[4];
          dot4(X + r * I, W + o * I, I, I, d);
          for (int k = 0; k < 4; ++k) Y[r * O + o + k] = d[k] + (bp ? bp[o + k] : 0.f);
        }
#endif
      },
      [&](int64_t o, int64_t o1) {
        const c10::BFloat16* __restrict wr = W + o * I;
        if (o + 2 < o1) prefetch_row(W + (o + 2) * I, I);
        for (int64_t r = 0; r < M; ++r) {
          const float* __restrict xr = X + r * I;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < I; ++i) acc += xr[i] * to_f(wr[i]);
          Y[r * O + o] = acc + (bp ? bp[o] : 0.f);
        }
      });
}

at::Tensor bias_or_empty(const std::optional<at::Tensor>& bias, int64_t O) {
  if (!bias.has_value()) return at::Tensor();
  auto b = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(b.dim() == 1 && b.size(0) == O, "bias must be (O,), got ", b.sizes(), " for ", O, " outputs");
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Kernel 4b/4c: decode projections with int8 or 4-bit weights, integer dot products
// ---------------------------------------------------------------------------------------------------
//
// Widening every int8 or 4-bit weight to fp32 for an FMA is compute-bound at a fraction of the memory
// bandwidth. Instead each activation row is quantized once per call, in blocks of 32 inputs (symmetric int8,
// one fp32 scale per block: torch reference a2ats.kernels.weights.quantize_activations), and the sums
// inside a block are exact integer dot products, 64 bytes of weights per instruction (VNNI dpbusd, or
// maddubs + madd), scaled once per block:
//
//   int8: y[o] = wscale[o] * sum_b xscale_b * sum_{i in b} w[o, i] * xq[i]
//   int4: y[o] = sum_g xscale_g * (scale[o, g] * sum_{i in g} q[o, i] * xq[i] + min[o, g] * sum_{i in g} xq[i])
//
// int4 groups are 32 inputs, as the blocks, so the min term needs only the blocks' sums of xq, once per
// call. The u8 x s8 instructions need one unsigned operand: int4's q (0..15) is; int8 weights are made
// unsigned by an offset of 128 (VNNI) or take the sign of x (maddubs: see dot_q8).

constexpr int64_t kBlock = 32;   // inputs per activation block, and per int4 weight group
constexpr int64_t kSuper = 128;  // int4: 4 groups, whose packed nibbles are one 64-byte load

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The activation rows of one call, quantized once for every output row.
struct QuantRows {
  int64_t stride = 0;        // bytes per row of q: I rounded up to kSuper, zero past I
  int64_t nscale = 0;        // floats per row of scale and bsum: >= stride / 32, a multiple of 16, zero past the blocks
  std::vector<int8_t> q;     // (M, stride)
  std::vector<float> scale;  // (M, nscale): per block
  std::vector<float> bsum;   // (M, nscale), int4 only: scale_b * sum_{i in b} q_i, the min term's factor
  std::vector<int32_t> corr;  // (M, stride / 4), int8 with VNNI only: -128 * the sum of each 4 bytes of q

  const int8_t* q_row(int64_t r) const { return q.data() + r * stride; }
  const float* scale_row(int64_t r) const { return scale.data() + r * nscale; }
  const float* bsum_row(int64_t r) const { return bsum.data() + r * nscale; }
  const int32_t* corr_row(int64_t r) const { return corr.data() + r * (stride / 4); }
};

// 32 inputs to int8: q = round(x / s), s = max|x| / 127, rounding half to even; an all-zero block has s = 0
// and q = 0. A division (not a multiply by 1/s) and torch.round's rounding, so the torch reference gets the
// same integers. Plain loops the compiler vectorizes for every build.
inline float quantize32(const float* x, int8_t* q) {
  // max |x| on the bit patterns: for non-negative floats they order as the values, NaN above inf, so a NaN
  // in the block makes the scale NaN (and the outputs), as in torch.
  uint32_t bits_max = 0;
  for (int i = 0; i < kBlock; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bits_max = std::max(bits_max, u & 0x7FFFFFFFu);
  }
  float amax;
  std::memcpy(&amax, &bits_max, 4);
  const float s = amax / 127.f;
  const float d = s > 0.f ? s : 1.f;
  for (int i = 0; i < kBlock; ++i) {
    float v = x[i] / d;
    v = (v + 0x1.8p23f) - 0x1.8p23f;  // round to nearest even (|v| <= 127, far below 2^22)
    v = v > 127.f ? 127.f : (v >= -127.f ? v : -127.f);  // no-op for finite x; keeps NaN from the int cast
    q[i] = static_cast<int8_t>(v);
  }
  return s;
}

// Quantizes the M rows of X (M, I) in blocks of 32, the last one partial. `nibble_order` (int4): each group
// of 4 blocks is laid out as the packed nibbles are, their 4 first halves (16 inputs each), then their 4
// second halves, so that one 64-byte load of x lines up with the low nibbles and the next with the high.
QuantRows quantize_rows(const float* X, int64_t M, int64_t I, bool nibble_order) {
  QuantRows r;
  const int64_t nb = (I + kBlock - 1) / kBlock;
  r.stride = round_up(std::max<int64_t>(I, 1), kSuper);
  r.nscale = round_up(r.stride / kBlock, 16);
  r.q.assign(M * r.stride, 0);
  r.scale.assign(M * r.nscale, 0.f);
  if (nibble_order) r.bsum.assign(M * r.nscale, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* row = r.q.data() + m * r.stride;
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = X + m * I + b * kBlock;
      float part[kBlock];
      const int64_t n = std::min(kBlock, I - b * kBlock);
      if (n < kBlock) {  // the last, partial block: zeros after it change neither its scale nor its sums
        std::fill(part, part + kBlock, 0.f);
        std::copy(src, src + n, part);
        src = part;
      }
      int8_t q[kBlock];
      const float s = quantize32(src, q);
      r.scale[m * r.nscale + b] = s;
      if (!nibble_order) {
        std::memcpy(row + b * kBlock, q, kBlock);
        continue;
      }
      int8_t* sup = row + (b / 4) * kSuper + (b % 4) * 16;
      std::memcpy(sup, q, 16);
      std::memcpy(sup + 64, q + 16, 16);
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) sum += q[i];
      r.bsum[m * r.nscale + b] = s * static_cast<float>(sum);
    }
  }
#if defined(__AVX512VNNI__)
  if (!nibble_order) {
    r.corr.assign(M * (r.stride / 4), 0);
    for (int64_t i = 0; i < M * (r.stride / 4); ++i) {
      const int8_t* g = r.q.data() + 4 * i;
      r.corr[i] = -128 * (g[0] + g[1] + g[2] + g[3]);
    }
  }
#endif
  return r;
}

// Output rows across threads, each thread's share read as 4 contiguous streams, a row of each at a time:
// `rows(o, n, step)` computes output rows o, o + step, .. (n of them: 4, else 1) for every activation row. 4
// rows at a time load each x vector once for the 4; 4 long sequential streams keep the hardware prefetchers
// ahead (4 adjacent rows at a time are 4 short streams that restart at every row: measured half the speed
// from memory).
template <class Rows>
void over_row_streams(int64_t O, Rows rows) {
  constexpr int64_t kMinRowsPerThread = 64;
  at::parallel_for(0, O, kMinRowsPerThread, [&](int64_t lo, int64_t hi) {
    const int64_t L = (hi - lo) / 4;
    for (int64_t i = 0; i < L; ++i) rows(lo + i, 4, L);
    for (int64_t o = lo + 4 * L; o < hi; ++o) rows(o, 1, 0);
  });
}

constexpr int kMaxR = 4;  // activation rows per pass over a block of weight rows
using Out = float[kMaxR][4];  // [activation row][weight row]

// The dot functions below: K weight rows (w + k * stride; int4 scales and mins S, Mn + k * sstride) times R
// activation rows (x's rows r0 .. r0 + R - 1), out[r][k] before the per-row weight scale (int8) and the bias.
// Each weight vector is loaded (and unpacked) once for the R activation rows, each x vector once for the K
// weight rows.
//   int8: out[r][k] = sum_b xs_r[b] * (w_k . xq_r over block b)
//   int4: out[r][k] = sum_g xs_r[g] * (S_k[g] * (q_k . xq_r over g) + Mn_k[g] * sum xq_r over g); xq in
//         nibble order, and xs_r[g] * sum xq_r over g from bsum.

#if defined(__AVX512F__) && defined(__AVX512BW__)
// One 64-byte load of int8 weights covers blocks 2j and 2j + 1: int32 lanes 0-7 hold the first's partial
// sums, 8-15 the second's. With VNNI, w + 128 is the unsigned operand of dpbusd (w XOR 0x80), and the
// accumulator starts at -128 * sum x (corr) to cancel the offset exactly; without, the sign of x moves onto
// w so that both maddubs operands stay within +-127 (no int16 saturation).
template <int K, int R>
inline void dot_q8(const QuantRows& x, int64_t r0, const int8_t* w, int64_t stride, int64_t I, Out& out) {
  __m512 acc[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = _mm512_setzero_ps();
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  auto step = [&](int64_t j, __mmask64 tail, bool full) {
    __m512i wk[K];
    for (int k = 0; k < K; ++k) {
      const int8_t* p = w + k * stride + 64 * j;
      wk[k] = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(tail, p);  // the tail never reads past I
#if defined(__AVX512VNNI__)
      wk[k] = _mm512_xor_si512(wk[k], _mm512_set1_epi8(static_cast<char>(0x80)));
#endif
    }
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(x.q_row(r0 + r) + 64 * j);
      const double* s2 = reinterpret_cast<const double*>(x.scale_row(r0 + r) + 2 * j);  // blocks 2j, 2j + 1
      const __m512 sv = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(s2))));
#if defined(__AVX512VNNI__)
      const __m512i c = _mm512_loadu_si512(x.corr_row(r0 + r) + 16 * j);
      for (int k = 0; k < K; ++k)
        acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, wk[k], xv)), sv, acc[r][k]);
#else
      const __m512i zero = _mm512_setzero_si512(), ax = _mm512_abs_epi8(xv);
      const __mmask64 neg = _mm512_movepi8_mask(xv);
      for (int k = 0; k < K; ++k) {
        const __m512i sw = _mm512_mask_sub_epi8(wk[k], neg, zero, wk[k]);  // w * sign(x)
        const __m512i d = _mm512_madd_epi16(_mm512_maddubs_epi16(ax, sw), _mm512_set1_epi16(1));
        acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[r][k]);
      }
#endif
    }
  };
  const int64_t full = I / 64;
  for (int64_t j = 0; j < full; ++j) step(j, 0, true);
  if (I % 64) step(full, (~0ULL) >> (64 - I % 64), false);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) out[r][k] = _mm512_reduce_add_ps(acc[r][k]);
}

// Per 32-bit lane: a1 . b1 + a2 . b2 over 4 bytes, a unsigned, b signed (int4: a nibbles <= 15, so maddubs'
// int16 sums stay below 2^15).
inline __m512i dot2_u8s8(__m512i a1, __m512i b1, __m512i a2, __m512i b2) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a1, b1), a2, b2);
#else
  const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(a1, b1), _mm512_maddubs_epi16(a2, b2));
  return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
#endif
}

// One 64-byte load of packed nibbles covers 4 groups: int32 lanes 4c .. 4c + 3 hold group 4t + c's partial sums.
template <int K, int R>
inline void dot_q4(const QuantRows& x, int64_t r0, const uint8_t* w, int64_t stride, const float* S,
                   const float* Mn, int64_t sstride, int64_t G, Out& out) {
  __m512 acc[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  auto step = [&](int64_t t, __mmask64 tail_bytes, __mmask8 tail_groups, bool full) {
    __m512i lo[K], hi[K];
    __m512 ws[K];
    for (int k = 0; k < K; ++k) {
      const uint8_t* p = w + k * stride + 64 * t;
      const float* sp = S + k * sstride + 4 * t;
      const __m512i b = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(tail_bytes, p);
      lo[k] = _mm512_and_si512(b, nib);
      hi[k] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      const __m128 s4 = full ? _mm_loadu_ps(sp) : _mm_maskz_loadu_ps(tail_groups, sp);
      ws[k] = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(s4));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xa = x.q_row(r0 + r) + kSuper * t;
      const __m512i xl = _mm512_loadu_si512(xa), xh = _mm512_loadu_si512(xa + 64);
      const __m512 sx = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(_mm_loadu_ps(x.scale_row(r0 + r) + 4 * t)));
      for (int k = 0; k < K; ++k) {
        const __m512 d = _mm512_cvtepi32_ps(dot2_u8s8(lo[k], xl, hi[k], xh));
        acc[r][k] = _mm512_fmadd_ps(_mm512_mul_ps(d, sx), ws[k], acc[r][k]);
      }
    }
  };
  const int64_t full = G / 4;
  for (int64_t t = 0; t < full; ++t) step(t, 0, 0, true);
  if (G % 4) step(full, (~0ULL) >> (64 - 16 * (G % 4)), static_cast<__mmask8>((1u << (G % 4)) - 1), false);
  for (int64_t g = 0; g < G; g += 16) {  // the min term; bsum is zero-padded to whole vectors
    const __mmask16 m = G - g >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (G - g)) - 1);
    for (int k = 0; k < K; ++k) {
      const __m512 mk = _mm512_maskz_loadu_ps(m, Mn + k * sstride + g);
      for (int r = 0; r < R; ++r) acc[r][k] = _mm512_fmadd_ps(mk, _mm512_loadu_ps(x.bsum_row(r0 + r) + g), acc[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) out[r][k] = _mm512_reduce_add_ps(acc[r][k]);
}

#elif defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One 32-byte load is one block; the sign of x moves onto w (_mm256_sign_epi8) so that both maddubs operands
// stay within +-127. 16 ymm registers: one activation row at a time.
template <int K>
inline void dot_q8_row(const int8_t* xq, const float* xs, const int8_t* w, int64_t stride, int64_t I, float* out) {
  __m256 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  auto step = [&](int64_t b, const int8_t* const* rows) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + kBlock * b));
    const __m256i ax = _mm256_sign_epi8(xv, xv);
    const __m256 sv = _mm256_broadcast_ss(xs + b);
    for (int k = 0; k < K; ++k) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k]));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones);
      acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[k]);
    }
  };
  const int64_t full = I / kBlock;
  const int8_t* rows[K];
  for (int64_t b = 0; b < full; ++b) {
    for (int k = 0; k < K; ++k) rows[k] = w + k * stride + kBlock * b;
    step(b, rows);
  }
  if (I % kBlock) {  // the partial block from zero-padded copies: never read past I
    alignas(32) int8_t tail[K][kBlock] = {};
    for (int k = 0; k < K; ++k) {
      std::memcpy(tail[k], w + k * stride + kBlock * full, I % kBlock);
      rows[k] = tail[k];
    }
    step(full, rows);
  }
  for (int k = 0; k < K; ++k) out[k] = hsum(acc[k]);
}

// One 32-byte load of packed nibbles covers 2 groups (int32 lanes 0-3 and 4-7).
template <int K>
inline void dot_q4_row(const int8_t* xa, const float* xs, const float* xm, const uint8_t* w, int64_t stride,
                       const float* S, const float* Mn, int64_t sstride, int64_t G, float* out) {
  __m256 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i half[2] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)};
  auto step = [&](int64_t t, const uint8_t* const* rows, const float* const* scales) {
    const __m256 sx4 = _mm256_castps128_ps256(_mm_loadu_ps(xs + 4 * t));
    for (int h = 0; h < 2; ++h) {
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + kSuper * t + 32 * h));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + kSuper * t + 64 + 32 * h));
      const __m256 sx = _mm256_permutevar8x32_ps(sx4, half[h]);
      for (int k = 0; k < K; ++k) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[k] + 32 * h));
        const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        const __m256 ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(scales[k])), half[h]);
        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(ws, sx), acc[k]);
      }
    }
  };
  const int64_t full = G / 4;
  const uint8_t* rows[K];
  const float* scales[K];
  for (int64_t t = 0; t < full; ++t) {
    for (int k = 0; k < K; ++k) {
      rows[k] = w + k * stride + 64 * t;
      scales[k] = S + k * sstride + 4 * t;
    }
    step(t, rows, scales);
  }
  if (G % 4) {  // the last 1-3 groups from zero-padded copies
    alignas(32) uint8_t tail[K][64] = {};
    float tail_s[K][4] = {};
    for (int k = 0; k < K; ++k) {
      std::memcpy(tail[k], w + k * stride + 64 * full, 16 * (G % 4));
      std::memcpy(tail_s[k], S + k * sstride + 4 * full, sizeof(float) * (G % 4));
      rows[k] = tail[k];
      scales[k] = tail_s[k];
    }
    step(full, rows, scales);
  }
  for (int k = 0; k < K; ++k) {
    float m = 0.f;
    for (int64_t g = 0; g < G; ++g) m += Mn[k * sstride + g] * xm[g];
    out[k] = hsum(acc[k]) + m;
  }
}

#else
// Portable builds: integer loops the compiler vectorizes.
template <int K>
inline void dot_q8_row(const int8_t* xq, const float* xs, const int8_t* w, int64_t stride, int64_t I, float* out) {
  for (int k = 0; k < K; ++k) {
    const int8_t* __restrict wr = w + k * stride;
    float acc = 0.f;
    for (int64_t b = 0; b * kBlock < I; ++b) {
      const int64_t n = std::min(kBlock, I - b * kBlock);
      int32_t s = 0;
      for (int64_t i = 0; i < n; ++i) s += static_cast<int32_t>(wr[b * kBlock + i]) * xq[b * kBlock + i];
      acc += xs[b] * static_cast<float>(s);
    }
    out[k] = acc;
  }
}

template <int K>
inline void dot_q4_row(const int8_t* xa, const float* xs, const float* xm, const uint8_t* w, int64_t stride,
                       const float* S, const float* Mn, int64_t sstride, int64_t G, float* out) {
  for (int k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* __restrict b = w + k * stride + 16 * g;
      const int8_t* __restrict xl = xa + (g / 4) * kSuper + (g % 4) * 16;
      const int8_t* __restrict xh = xl + 64;
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) s += (b[j] & 0x0F) * xl[j] + (b[j] >> 4) * xh[j];
      acc += S[k * sstride + g] * xs[g] * static_cast<float>(s) + Mn[k * sstride + g] * xm[g];
    }
    out[k] = acc;
  }
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
// Without AVX-512: one activation row at a time (the weight rows stay in L1 for the next).
template <int K, int R>
inline void dot_q8(const QuantRows& x, int64_t r0, const int8_t* w, int64_t stride, int64_t I, Out& out) {
  for (int r = 0; r < R; ++r) dot_q8_row<K>(x.q_row(r0 + r), x.scale_row(r0 + r), w, stride, I, out[r]);
}

template <int K, int R>
inline void dot_q4(const QuantRows& x, int64_t r0, const uint8_t* w, int64_t stride, const float* S,
                   const float* Mn, int64_t sstride, int64_t G, Out& out) {
  for (int r = 0; r < R; ++r)
    dot_q4_row<K>(x.q_row(r0 + r), x.scale_row(r0 + r), x.bsum_row(r0 + r), w, stride, S, Mn, sstride, G, out[r]);
}
#endif

// dot_q8 / dot_q4 for n (4 or 1) weight rows and R (1 .. kMaxR) activation rows, as templates.
template <int K, class... A>
void q8_rows(int R, A&&... a) {
  switch (R) {
    case 1: return dot_q8<K, 1>(a...);
    case 2: return dot_q8<K, 2>(a...);
    case 3: return dot_q8<K, 3>(a...);
    default: return dot_q8<K, 4>(a...);
  }
}

template <int K, class... A>
void q4_rows(int R, A&&... a) {
  switch (R) {
    case 1: return dot_q4<K, 1>(a...);
    case 2: return dot_q4<K, 2>(a...);
    case 3: return dot_q4<K, 3>(a...);
    default: return dot_q4<K, 4>(a...);
  }
}

constexpr int64_t kTile = 16;     // output rows per int8 tile: the 16 int32 lanes of a dpbusd
constexpr int64_t kTileRows = 8;  // activation rows per pass over a tile (times its streams: at most 8)
// one stream (5 to 8 rows) prefetched this far ahead: the loop is busy enough that the hardware's prefetch alone
// fell behind; two streams ran slower with it (both measured)
constexpr int64_t kPrefetchBytes = 2048;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// R activation rows (r0 ..) times K tiles (tile + k * apart) over nb blocks: out[k * R + r] = sum_b xs_r[b] *
// (w . xq_r over block b) for the tile's 16 output rows, before the weight scale. corr: -128 * each block's sum
// of xq (rows r0 ..). K = 2 reads two distant tiles side by side: with few rows the step is bound by reading the
// weights, and one sequential stream per thread left DRAM bandwidth unused (measured ~10% slower at one row
// than the row layout's 4 streams; two streams tie with it).
template <int R, int K>
inline void tile_q8(const QuantRows& x, const int32_t* corr, int64_t r0, const uint8_t* tile, int64_t apart,
                    int64_t nb, __m512* out) {
  __m512 acc[K][R];
  const int8_t* xr[R];
  const float* sr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    xr[r] = x.q_row(r0 + r);
    sr[r] = x.scale_row(r0 + r);
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc[k][r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m512i dot[K][R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i c = _mm512_set1_epi32(corr[r * nb + b]);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) dot[k][r] = c;
    }
    const uint8_t* wb = tile + b * kBlock * kTile;
#pragma GCC unroll 8
    for (int j = 0; j < kBlock / 4; ++j) {
      __m512i w[K];
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        if constexpr (K == 1) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes + 64 * j), _MM_HINT_T0);
        w[k] = _mm512_loadu_si512(wb + k * apart + 64 * j);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, xr[r] + b * kBlock + 4 * j, 4);
        const __m512i xv = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) dot[k][r] = _mm512_dpbusd_epi32(dot[k][r], w[k], xv);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sr[r][b]);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) acc[k][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[k][r]), s, acc[k][r]);
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[k * R + r] = acc[k][r];
}

// Tiles side by side for R rows: two while the 32 registers hold their accumulators (2 per row and tile).
inline int tile_streams(int R) { return R <= 4 ? 2 : 1; }

inline void tile_rows(int R, int K, const QuantRows& x, const int32_t* corr, int64_t r0, const uint8_t* tile,
                      int64_t apart, int64_t nb, __m512* out) {
  if (K == 2) {
    switch (R) {
      case 1: return tile_q8<1, 2>(x, corr, r0, tile, apart, nb, out);
      case 2: return tile_q8<2, 2>(x, corr, r0, tile, apart, nb, out);
      case 3: return tile_q8<3, 2>(x, corr, r0, tile, apart, nb, out);
      default: return tile_q8<4, 2>(x, corr, r0, tile, apart, nb, out);
    }
  }
  switch (R) {
    case 1: return tile_q8<1, 1>(x, corr, r0, tile, apart, nb, out);
    case 2: return tile_q8<2, 1>(x, corr, r0, tile, apart, nb, out);
    case 3: return tile_q8<3, 1>(x, corr, r0, tile, apart, nb, out);
    case 4: return tile_q8<4, 1>(x, corr, r0, tile, apart, nb, out);
    case 5: return tile_q8<5, 1>(x, corr, r0, tile, apart, nb, out);
    case 6: return tile_q8<6, 1>(x, corr, r0, tile, apart, nb, out);
    case 7: return tile_q8<7, 1>(x, corr, r0, tile, apart, nb, out);
    default: return tile_q8<8, 1>(x, corr, r0, tile, apart, nb, out);
  }
}
#endif

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "x must be a float32 (M, I) tensor, got ", x.scalar_type(), " ", x.sizes());
}

// The rows a projection multiplies, from x (M, I'): x itself; RMS-normalized, x * w / sqrt(mean(x^2) + eps),
// with weight `norm` (I',) as transformers' RMSNorm computes it in fp32; or, `gated`, a SiLU-gated MLP's
// silu(x[:, :I]) * x[:, I:] with I = I' / 2. A decode step's layer is a few such rows: done here, each
// costs a loop over the row instead of a handful of torch ops, whose dispatch outweighed the arithmetic.
at::Tensor prologue(at::Tensor x, const std::optional<at::Tensor>& norm, double eps, bool gated) {
  check_x(x);
  if (!norm.has_value() && !gated) return x.contiguous();
  TORCH_CHECK(!(norm.has_value() && gated), "a projection takes a norm or a gate, not both");
  x = x.contiguous();
  const int64_t M = x.size(0), In = x.size(1);
  const float* X = x.data_ptr<float>();
  if (gated) {
    TORCH_CHECK(In % 2 == 0, "a gated projection takes x = [gate, up] (M, 2I), got ", x.sizes());
    const int64_t I = In / 2;
    auto out = at::empty({M, I}, x.options());
    float* Y = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < I; ++i) {
        const float g = X[m * In + i];
        Y[m * I + i] = g / (1.f + std::exp(-g)) * X[m * In + I + i];
      }
    return out;
  }
  auto w = norm->to(at::kFloat).contiguous();
  TORCH_CHECK(w.dim() == 1 && w.size(0) == In, "norm must be (I,) = (", In, ",), got ", w.sizes());
  const float* Wn = w.data_ptr<float>();
  auto out = at::empty({M, In}, x.options());
  float* Y = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0.0;
    for (int64_t i = 0; i < In; ++i) ss += static_cast<double>(X[m * In + i]) * X[m * In + i];
    const float r = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(In)) + static_cast<float>(eps));
    for (int64_t i = 0; i < In; ++i) Y[m * In + i] = X[m * In + i] * r * Wn[i];
  }
  return out;
}

// y += residual (M, O): the residual stream's add, in the same call as the projection.
at::Tensor epilogue(at::Tensor y, const std::optional<at::Tensor>& residual) {
  if (!residual.has_value()) return y;
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->dim() == 2 &&
                  residual->size(0) == y.size(0) && residual->size(1) == y.size(1),
              "residual must be float32 ", y.sizes(), ", got ", residual->scalar_type(), " ", residual->sizes());
  const auto r = residual->contiguous();
  const float* R = r.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) Y[i] += R[i];
  return y;
}

}  // namespace

// y (M, O) = x (M, I) @ w (O, I)^T (+ bias): w bf16, x and y float32, fp32 accumulation. A decode
// step's projections read every weight once for a few rows, so they are bound by memory bandwidth:
// bf16 weights halve the bytes; widening bf16 to fp32 is a shift, so the math stays fp32 as with
// fp32 weights rounded to bf16.
at::Tensor linear_bf16w(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias,
                           std::optional<at::Tensor> norm, double eps, bool gated,
                           std::optional<at::Tensor> residual) {
  x = prologue(x, norm, eps, gated);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be a contiguous bfloat16 (O, I) tensor matching x");
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({M, O}, x.options());
  bf16_rows_times_x(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), bp, y.data_ptr<float>(), M, I, O);
  return epilogue(y, residual);
}

// y (M, O) = quantized x (M, I) @ w (O, I)^T * scale (+ bias): w int8 with a scale per output row, x
// quantized in blocks of 32 (see above).
at::Tensor linear_int8w(at::Tensor x, at::Tensor w, at::Tensor scale, std::optional<at::Tensor> bias,
                           std::optional<at::Tensor> norm, double eps, bool gated,
                           std::optional<at::Tensor> residual) {
  x = prologue(x, norm, eps, gated);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be a contiguous int8 (O, I) tensor matching x");
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == O,
              "scale must be float32 (O,)");
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({M, O}, x.options());
  const QuantRows xq = quantize_rows(x.data_ptr<float>(), M, I, false);
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  over_row_streams(O, [&](int64_t o, int n, int64_t step) {
    for (int64_t r = 0; r < M; r += kMaxR) {  // the weight rows stay in L1 for the next activation rows
      const int R = static_cast<int>(std::min<int64_t>(kMaxR, M - r));
      Out d;
      if (n == 4)
        q8_rows<4>(R, xq, r, W + o * I, step * I, I, d);
      else
        q8_rows<1>(R, xq, r, W + o * I, I, I, d);
      for (int i = 0; i < R; ++i)
        for (int k = 0; k < n; ++k) {
          const int64_t ok = o + k * step;
          Y[(r + i) * O + ok] = d[i][k] * S[ok] + (bp ? bp[ok] : 0.f);
        }
    }
  });
  return epilogue(y, residual);
}

// y (M, O) = quantized x (M, I) @ w^T (+ bias) for 4-bit w: groups of 32 inputs per output row, w = q * scale +
// min with q in 0..15 packed two to a byte (byte j of a group: element j in the low nibble, element j + 16 in
// the high one), x quantized in blocks of 32 (see above).
at::Tensor linear_int4w(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor mins,
                           std::optional<at::Tensor> bias, std::optional<at::Tensor> norm, double eps, bool gated,
                           std::optional<at::Tensor> residual) {
  x = prologue(x, norm, eps, gated);
  const int64_t M = x.size(0), I = x.size(1);
  TORCH_CHECK(I % kBlock == 0, "int4 weights need an input size divisible by 32, got ", I,
              ": pack this weight as int8 or bf16");
  const int64_t G = I / kBlock;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 2 == I,
              "w must be a contiguous uint8 (O, I/2) tensor of packed nibbles matching x");
  const int64_t O = w.size(0);
  for (const auto* t : {&scale, &mins})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == O * G,
                "scale and mins must be float32 (O, I/32)");
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({M, O}, x.options());
  const QuantRows xq = quantize_rows(x.data_ptr<float>(), M, I, true);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const float* Mn = mins.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t row_bytes = I / 2;
  over_row_streams(O, [&](int64_t o, int n, int64_t step) {
    for (int64_t r = 0; r < M; r += kMaxR) {  // the weight rows stay in L1 for the next activation rows
      const int R = static_cast<int>(std::min<int64_t>(kMaxR, M - r));
      Out d;
      if (n == 4)
        q4_rows<4>(R, xq, r, W + o * row_bytes, step * row_bytes, S + o * G, Mn + o * G, step * G, G, d);
      else
        q4_rows<1>(R, xq, r, W + o * row_bytes, row_bytes, S + o * G, Mn + o * G, G, G, d);
      for (int i = 0; i < R; ++i)
        for (int k = 0; k < n; ++k) {
          const int64_t ok = o + k * step;
          Y[(r + i) * O + ok] = d[i][k] + (bp ? bp[ok] : 0.f);
        }
    }
  });
  return epilogue(y, residual);
}

bool int8_tiles() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// y (M, O) = quantized x (M, I) @ w (O, I)^T * scale (+ bias) with w in tiles of 16 output rows (see
// weights.tiles): tile t, input quad j is 64 bytes, output row 16t + l's inputs 4j .. 4j + 3 at bytes 4l ..
// 4l + 3, stored as w + 128 (the unsigned operand of dpbusd). One dpbusd multiplies a broadcast quad of x by 16
// output rows, so a block of 32 inputs is 8 dpbusd into one int32 accumulator per activation row, converted
// and scaled once per block: ~10 instructions per 512 products where the row layout (a 64-byte load of one
// output row) needs a conversion and an FMA per 64. Each tile is read once for up to 8 activation rows. The
// offset cancels exactly: the accumulator starts at -128 * the block's sum of x.
at::Tensor linear_int8w_tiles(at::Tensor x, at::Tensor tiles, at::Tensor scale, int64_t O,
                              std::optional<at::Tensor> bias, std::optional<at::Tensor> norm, double eps, bool gated,
                              std::optional<at::Tensor> residual) {
  TORCH_CHECK(int8_tiles(), "int8 weights in tiles need a build with AVX-512 VNNI: use the row layout");
  x = prologue(x, norm, eps, gated);
  const int64_t M = x.size(0), I = x.size(1), nb = (I + kBlock - 1) / kBlock, T = (O + kTile - 1) / kTile;
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.size(0) == T &&
                  tiles.size(1) == nb * kBlock * kTile,
              "tiles must be a contiguous uint8 (ceil(O/16), ceil(I/32) * 512) tensor for O = ", O, ", I = ", I,
              "; got ", tiles.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == T * kTile,
              "scale must be float32 (16 * ceil(O/16),), zero past O");
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = at::empty({M, O}, x.options());
  float* Y = y.data_ptr<float>();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const QuantRows xq = quantize_rows(x.data_ptr<float>(), M, I, false);
  // -128 * the sum of each block of x, the offset's share (cancelled exactly): its 8 quads' corrections summed
  std::vector<int32_t> corr(M * nb, 0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b)
      for (int j = 0; j < kBlock / 4; ++j) corr[r * nb + b] += xq.corr_row(r)[b * (kBlock / 4) + j];
  const uint8_t* Wt = tiles.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const int64_t tile_bytes = nb * kBlock * kTile;
  // tiles t .. t + K - 1 apart by `apart` tiles, rows r .. r + R - 1: scaled, biased and stored (the last tile masked)
  auto store = [&](int64_t t, int K, int64_t apart, int64_t r, int R, const __m512* acc) {
    for (int k = 0; k < K; ++k) {
      const int64_t o = (t + k * apart) * kTile, n = std::min(kTile, O - o);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      const __m512 sv = _mm512_loadu_ps(S + o), bv = bp ? _mm512_maskz_loadu_ps(m, bp + o) : _mm512_setzero_ps();
      for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(Y + (r + i) * O + o, m, _mm512_fmadd_ps(acc[k * R + i], sv, bv));
    }
  };
  // K tiles side by side for the rows of a pass; with more than 8 rows, every pass over a tile while it is in cache
  const int K = tile_streams(static_cast<int>(std::min<int64_t>(M, kTileRows)));
  auto passes = [&](int64_t t, int k, int64_t apart) {
    __m512 acc[kTileRows];
    for (int64_t r = 0; r < M; r += kTileRows) {
      const int R = static_cast<int>(std::min<int64_t>(kTileRows, M - r));
      tile_rows(R, k, xq, corr.data() + r * nb, r, Wt + t * tile_bytes, apart * tile_bytes, nb, acc);
      store(t, k, apart, r, R, acc);
    }
  };
  at::parallel_for(0, T, 4, [&](int64_t lo, int64_t hi) {
    const int64_t L = (hi - lo) / K;  // K streams of L tiles, then the rest one by one
    for (int64_t i = 0; i < L; ++i) passes(lo + i, K, L);
    for (int64_t t = lo + K * L; t < hi; ++t) passes(t, 1, 0);
  });
#endif
  return epilogue(y, residual);
}

at::Tensor prepare_activations(at::Tensor x, std::optional<at::Tensor> norm, double eps, bool gated) {
  return prologue(std::move(x), norm, eps, gated);
}

// Activations as the int8 and int4 kernels quantize them: (q int8 (M, I), scale float32 (M, ceil(I / 32))), for
// tests against the torch reference.
std::vector<at::Tensor> quantize_activations(at::Tensor x) {
  check_x(x);
  x = x.contiguous();
  const int64_t M = x.size(0), I = x.size(1), nb = (I + kBlock - 1) / kBlock;
  const QuantRows xq = quantize_rows(x.data_ptr<float>(), M, I, false);
  auto q = at::empty({M, I}, x.options().dtype(at::kChar));
  auto s = at::empty({M, nb}, x.options());
  for (int64_t r = 0; r < M; ++r) {
    std::memcpy(q.data_ptr<int8_t>() + r * I, xq.q.data() + r * xq.stride, I);
    std::memcpy(s.data_ptr<float>() + r * nb, xq.scale.data() + r * xq.nscale, sizeof(float) * nb);
  }
  return {q, s};
}
