// A decode layer's glue between the projections and attention, one call each where torch takes several small ops
// (at batch 1 their dispatch, ~3 us each, outweighs their arithmetic): RoPE on the step's q and k, and the step's
// new K/V rows written into the cache. Torch references: a2ats.runtime.model._rotate, SlotCache.put_rows' index
// copies; the tests hold them equal bit for bit.

#include "cpu_common.h"

namespace {

// x * cos + roll(x, rot / 2) * signed_sin on the first `rot` dims of each row, the rest copied: torch's three
// rounded operations, in the same order (contraction into an FMA would round once fewer).
__attribute__((optimize("fp-contract=off"))) void rope_row(const float* x, int64_t xs, const float* c, int64_t cs,
                                                          const float* s, int64_t ss, int64_t rot, int64_t d,
                                                          float* out) {
  const int64_t half = rot / 2;
  if (xs == 1 && cs == 1 && ss == 1) {  // the usual layout: two vectorized halves
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i] * c[i], b = x[i + half] * s[i];
      out[i] = a + b;
    }
#pragma omp simd
    for (int64_t i = half; i < rot; ++i) {
      const float a = x[i] * c[i], b = x[i - half] * s[i];
      out[i] = a + b;
    }
  } else {
    for (int64_t i = 0; i < rot; ++i) {
      const float a = x[i * xs] * c[i * cs], b = x[((i + half) % rot) * xs] * s[i * ss];
      out[i] = a + b;
    }
  }
  for (int64_t i = rot; i < d; ++i) out[i] = x[i * xs];
}

}  // namespace

// x (B, H, t, d) float32, any strides; cos and signed_sin (B, 1, t, rot) float32 (rot <= d, even), broadcast over
// heads: the rotated rows, contiguous (B, H, t, d).
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor signed_sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be float32 (B, H, t, d)");
  const int64_t B = x.size(0), H = x.size(1), t = x.size(2), d = x.size(3);
  for (const auto& a : {cos, signed_sin})
    TORCH_CHECK(a.dim() == 4 && a.scalar_type() == at::kFloat && a.size(0) == B && a.size(1) == 1 &&
                    a.size(2) == t && a.size(3) == cos.size(3) && a.size(3) <= d && a.size(3) % 2 == 0,
                "cos and signed_sin must be float32 (B, 1, t, rot) with rot even and at most x's d");
  const int64_t rot = cos.size(3);
  auto out = at::empty({B, H, t, d}, x.options());
  const float* X = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = signed_sin.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t cs[3] = {cos.stride(0), cos.stride(2), cos.stride(3)}, ss[3] = {signed_sin.stride(0),
                                                                                signed_sin.stride(2),
                                                                                signed_sin.stride(3)};
  // a decode step's few rows run on the calling thread; a prefill's many split across threads
  at::parallel_for(0, B * H * t, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / (H * t), h = (r / t) % H, j = r % t;
      rope_row(X + b * xs[0] + h * xs[1] + j * xs[2], xs[3], C + b * cs[0] + j * cs[1], cs[2],
               S + b * ss[0] + j * ss[1], ss[2], rot, d, O + r * d);
    }
  });
  return out;
}

namespace {

template <typename T>
inline T from_float(float f) {
  return static_cast<T>(f);  // c10::BFloat16 rounds to nearest even, as torch's .to(bfloat16)
}

template <typename T>
void store(T* dst, const int64_t* flat, int64_t rows, const at::Tensor& src, int64_t d) {
  const int64_t H = src.size(1), s0 = src.stride(0), s1 = src.stride(1);
  const float* p = src.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = p + (r / H) * s0 + (r % H) * s1;
    T* out = dst + flat[r] * d;
    for (int64_t i = 0; i < d; ++i) out[i] = from_float<T>(row[i]);
  }
}

}  // namespace

// k_dst, v_dst (N, d) float32 or bfloat16, contiguous (a layer's cache seen as rows); flat (S * H,) int64 row
// numbers; k, v (S, H, d) float32 with unit stride along d: row s * H + h of k goes to k_dst[flat[s * H + h]].
void store_rows(at::Tensor k_dst, at::Tensor v_dst, at::Tensor flat, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(k_dst.dim() == 2 && k_dst.is_contiguous() && v_dst.sizes() == k_dst.sizes() && v_dst.is_contiguous() &&
                  v_dst.scalar_type() == k_dst.scalar_type() &&
                  (k_dst.scalar_type() == at::kFloat || k_dst.scalar_type() == at::kBFloat16),
              "k_dst and v_dst must be contiguous float32 or bfloat16 (N, d) tensors of one shape");
  const int64_t N = k_dst.size(0), d = k_dst.size(1);
  for (const auto& a : {k, v})
    TORCH_CHECK(a.dim() == 3 && a.scalar_type() == at::kFloat && a.size(2) == d && a.stride(2) == 1 &&
                    a.sizes() == k.sizes(),
                "k and v must be float32 (S, H, d) of one shape with unit stride along d");
  const int64_t rows = k.size(0) * k.size(1);
  TORCH_CHECK(flat.dim() == 1 && flat.scalar_type() == at::kLong && flat.size(0) == rows,
              "flat must be int64 (S * H,)");
  flat = flat.contiguous();
  const int64_t* F = flat.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(F[r] >= 0 && F[r] < N, "row ", F[r], " outside the ", N, " rows");
  if (k_dst.scalar_type() == at::kBFloat16) {
    store(k_dst.data_ptr<c10::BFloat16>(), F, rows, k, d);
    store(v_dst.data_ptr<c10::BFloat16>(), F, rows, v, d);
  } else {
    store(k_dst.data_ptr<float>(), F, rows, k, d);
    store(v_dst.data_ptr<float>(), F, rows, v, d);
  }
}
