// CPU kernels for a decode step's projections: compact weights (bf16, int8, 4-bit) times a few rows
// (torch reference: a2ats.kernels.weights.unpack).

#include "cpu_common.h"

using a2ats::prefetch_row;
using a2ats::to_f;

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

// The same for int8 rows (the scale is applied by the caller).
inline void dot4(const float* x, const int8_t* w, int64_t stride, int64_t I, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int k = 0; k < 4; ++k) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * stride + i));
      acc[k] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), acc[k]);
    }
  }
  for (int k = 0; k < 4; ++k) {
    float t = _mm512_reduce_add_ps(acc[k]);
    for (int64_t j = i; j < I; ++j) t += x[j] * static_cast<float>(w[k * stride + j]);
    out[k] = t;
  }
}

#endif

// y = x @ w.T (+ bias) for bf16 or int8 rows, times a scale per output row where ``S`` is given (int8).
template <class T>
void rows_times_x(const float* X, const T* W, const float* S, const float* bp, float* Y, int64_t M, int64_t I,
                  int64_t O) {
  over_output_rows(
      O,
      [&](int64_t o, int64_t o1) {
#if defined(__AVX512F__)
        if (o + 8 <= o1) prefetch_row(W + (o + 4) * I, 4 * I);
        for (int64_t r = 0; r < M; ++r) {
          float d[4];
          dot4(X + r * I, W + o * I, I, I, d);
          for (int k = 0; k < 4; ++k) Y[r * O + o + k] = d[k] * (S ? S[o + k] : 1.f) + (bp ? bp[o + k] : 0.f);
        }
#endif
      },
      [&](int64_t o, int64_t o1) {
        const T* __restrict wr = W + o * I;
        if (o + 2 < o1) prefetch_row(W + (o + 2) * I, I);
        for (int64_t r = 0; r < M; ++r) {
          const float* __restrict xr = X + r * I;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < I; ++i) acc += xr[i] * to_f(wr[i]);
          Y[r * O + o] = acc * (S ? S[o] : 1.f) + (bp ? bp[o] : 0.f);
        }
      });
}

torch::Tensor bias_or_empty(const c10::optional<torch::Tensor>& bias, int64_t O) {
  if (!bias.has_value()) return torch::Tensor();
  auto b = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(b.dim() == 1 && b.size(0) == O, "bias must be (O,)");
  return b;
}

// y (M, O) = x (M, I) @ w (O, I)^T (+ bias): w bf16, x and y float32, fp32 accumulation. A decode
// step's projections read every weight once for a few rows, so they are bound by memory bandwidth:
// bf16 weights halve the bytes; widening bf16 to fp32 is a shift, so the math stays fp32 as with
// fp32 weights rounded to bf16.
torch::Tensor linear_bf16w(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 (M, I)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be a contiguous bfloat16 (O, I) tensor matching x");
  x = x.contiguous();
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = torch::empty({M, O}, x.options());
  const float* X = x.data_ptr<float>();
  const c10::BFloat16* W = w.data_ptr<c10::BFloat16>();
  float* Y = y.data_ptr<float>();
  rows_times_x(X, W, nullptr, bp, Y, M, I, O);
  return y;
}

// Kernel 4b/4c: decode projections with int8 or 4-bit weights, fp32 math
//
// int8: w (O, I) int8 with one fp32 scale per output row: y[o] = scale[o] * sum_i x[i] * w[o, i].
// int4: groups of 32 inputs per output row, w = q * scale + min with q in 0..15, packed two to a byte:
// byte j of a group holds element j (low nibble) and element j + 16 (high nibble), so both halves
// multiply contiguous x. sum_i x*w over a group = scale * sum x*q + min * sum x, the last term from
// per-group sums of x computed once per call.

constexpr int64_t kGroup4 = 32;

#if defined(__AVX512F__)
// The same for 4-bit groups (see dot4): `out[k]` = sum over groups of scale * (x . q), the min term added by the caller.
inline void dot4_int4(const float* x, const uint8_t* w, int64_t stride, const float* scale, int64_t G, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512i nib = _mm512_set1_epi32(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 xl = _mm512_loadu_ps(x + g * kGroup4), xh = _mm512_loadu_ps(x + g * kGroup4 + 16);
    for (int k = 0; k < 4; ++k) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * stride + g * 16)));
      __m512 t = _mm512_mul_ps(xl, _mm512_cvtepi32_ps(_mm512_and_si512(b, nib)));
      t = _mm512_fmadd_ps(xh, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), t);
      acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(scale[k * G + g]), t, acc[k]);
    }
  }
  for (int k = 0; k < 4; ++k) out[k] = _mm512_reduce_add_ps(acc[k]);
}
#endif


torch::Tensor linear_int8w(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 (M, I)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be a contiguous int8 (O, I) tensor matching x");
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == O,
              "scale must be float32 (O,)");
  x = x.contiguous();
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = torch::empty({M, O}, x.options());
  const float* X = x.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  rows_times_x(X, W, S, bp, Y, M, I, O);
  return y;
}

torch::Tensor linear_int4w(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor mins,
                           c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 (M, I)");
  const int64_t M = x.size(0), I = x.size(1);
  TORCH_CHECK(I % kGroup4 == 0, "int4 weights need an input size divisible by 32, got ", I);
  const int64_t G = I / kGroup4;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.size(1) * 2 == I,
              "w must be a contiguous uint8 (O, I/2) tensor of packed nibbles matching x");
  const int64_t O = w.size(0);
  for (const auto* t : {&scale, &mins})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == O * G,
                "scale and mins must be float32 (O, I/32)");
  x = x.contiguous();
  auto bias_f = bias_or_empty(bias, O);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const float* X = x.data_ptr<float>();
  std::vector<float> xsum(M * G);  // sum of x over each group, for the min term
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < kGroup4; ++j) s += X[r * I + g * kGroup4 + j];
      xsum[r * G + g] = s;
    }
  auto y = torch::empty({M, O}, x.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const float* Mn = mins.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t row_bytes = I / 2;
  over_output_rows(
      O,
      [&](int64_t o, int64_t o1) {
#if defined(__AVX512F__)
        if (o + 8 <= o1) prefetch_row(W + (o + 4) * row_bytes, 4 * row_bytes);
        for (int64_t r = 0; r < M; ++r) {
          float d[4];
          dot4_int4(X + r * I, W + o * row_bytes, row_bytes, S + o * G, G, d);
          for (int k = 0; k < 4; ++k) {
            float min_term = 0.f;
            for (int64_t g = 0; g < G; ++g) min_term += Mn[(o + k) * G + g] * xsum[r * G + g];
            Y[r * O + o + k] = d[k] + min_term + (bp ? bp[o + k] : 0.f);
          }
        }
#endif
      },
      [&](int64_t o, int64_t o1) {
        const uint8_t* __restrict wr = W + o * row_bytes;
        if (o + 2 < o1) prefetch_row(W + (o + 2) * row_bytes, row_bytes);
        const float* so = S + o * G;
        const float* mo = Mn + o * G;
        for (int64_t r = 0; r < M; ++r) {
          const float* __restrict xr = X + r * I;
          float lanes[16] = {0.f};  // per-lane sums across groups: one horizontal sum per row, not per group
          float min_term = 0.f;
          for (int64_t g = 0; g < G; ++g) {
            const uint8_t* __restrict b = wr + g * 16;
            const float* __restrict xg = xr + g * kGroup4;
            const float sg = so[g];
#pragma omp simd
            for (int j = 0; j < 16; ++j) {
              const float lo_q = static_cast<float>(b[j] & 0x0F), hi_q = static_cast<float>(b[j] >> 4);
              lanes[j] += sg * (xg[j] * lo_q + xg[j + 16] * hi_q);
            }
            min_term += mo[g] * xsum[r * G + g];
          }
          float acc = 0.f;
          for (int j = 0; j < 16; ++j) acc += lanes[j];
          Y[r * O + o] = acc + min_term + (bp ? bp[o] : 0.f);
        }
      });
  return y;
}

void register_linear(pybind11::module_& m) {
  m.def("linear_bf16w", &linear_bf16w, "x @ w.T (+ bias) with bf16 weights, fp32 math");
  m.def("linear_int8w", &linear_int8w, "x @ w.T (+ bias) with int8 weights and a scale per output row, fp32 math");
  m.def("linear_int4w", &linear_int4w, "x @ w.T (+ bias) with 4-bit weights in groups of 32 (scale, min), fp32 math");
}
