// Fused CPU kernels for A²ATS decode: LUT scoring + top-K selection, and attention over the selection.
//
// Semantics are those of the torch references (a2ats.kernels.reference, built on a2ats.selection and
// a2ats.attention); the tests compare the two bit-for-bit (selection) or within fp32 rounding (attention).
// Loops are plain C++ written so that -O3 vectorizes them for the ISA the extension was built for;
// parallelism goes through at::parallel_for so torch.set_num_threads governs it.
//
// The extension is built from every cpu_*.cpp file here: this one holds attention over the selection and key
// encoding; cpu_ops.h declares what each file exports and cpu_module.cpp binds it to Python.

#include "cpu_common.h"

#include <type_traits>

using a2ats::prefetch_row;
using a2ats::to_f;
#if defined(__AVX512F__)
using a2ats::load16;
using a2ats::sum16;
using a2ats::sum16_head_major;
#endif

// ---------------------------------------------------------------------------------------------------
// Kernel 2: attention over the selection
// ---------------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kChunk = 256;  // selected rows per work item: splits long selections across threads
constexpr int64_t kAhead = 32;   // rows of software prefetch distance (d = 64 rows: into L2, prefetch_row<2>)
constexpr int64_t kStreamAhead = 64;  // the same for consecutive rows (a dense step's), past the chunk's end

// A row as floats: float rows are read in place; bf16 and int8 rows are widened into ``buf`` once, in a loop
// of their own (the compiler vectorizes a plain widening loop; widening inside each of the G dot products
// would convert every element G times).
inline const float* row_f(const float* row, float*, int64_t) { return row; }
template <typename T>
inline const float* row_f(const T* row, float* buf, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) buf[i] = to_f(row[i]);
  return buf;
}
#if defined(__AVX512F__)
// bf16 is the top half of an fp32: 16 at a time by a widening shift (the generic loop above did not vectorize).
inline const float* row_f(const c10::BFloat16* row, float* buf, int64_t d) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
    _mm512_storeu_ps(buf + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
  }
  for (; i < d; ++i) buf[i] = to_f(row[i]);
  return buf;
}
#endif

// exp(x) for the softmax's x <= 0, in a form the compiler vectorizes (std::exp stays a scalar call, and was
// most of this kernel's time): x = k ln2 + f with |f| <= ln2 / 2, e^f by its degree-7 Taylor polynomial
// (relative error < 1e-8, below float rounding), 2^k by the exponent bits. Below -87 the result is 0.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float k = std::nearbyint(t);
  const float f = (t - k) * 0.693147180559945309f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : p * scale;
}

// A chunk's softmax partials per query head g (scores at s + g * kChunk, rows of them): the max, the scores
// replaced by exp(score - max), and their sum.
inline void chunk_softmax(float* s, int64_t G, int64_t rows, float* pmax, float* psum) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kChunk;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t r = 0; r < rows; ++r) mx = std::max(mx, sg[r]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < rows; ++r) {
      sg[r] = exp_nonpositive(sg[r] - mx);
      sum += sg[r];
    }
    pmax[g] = mx;
    psum[g] = sum;
  }
}

// Row scales of int8 caches (nullptr for float caches): row t of (b, h) holds scale[b*s[0] + h*s[1] + t*s[2]].
struct Scales {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t ks[3] = {0, 0, 0};
  int64_t vs[3] = {0, 0, 0};
};

#if defined(__AVX512F__)
// A d = 64 row as 4 fp32 vectors. fp32 rows are read as they are. A bf16 row is two 64-byte loads, each split
// into its even elements (a shift) and its odd ones (a mask): one instruction per 16 values where widening
// loads cost two. Its lanes then hold the elements in another order (element(lane) below), so the queries
// are permuted to match once per work item, and the weighted V rows are permuted back once per work item.
template <typename T>
struct Row64;
template <>
struct Row64<float> {
  static constexpr bool kPermuted = false;
  static inline void load(const float* p, __m512 v[4]) {
    for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(p + 16 * i);
  }
};
template <>
struct Row64<c10::BFloat16> {
  static constexpr bool kPermuted = true;
  static inline void load(const c10::BFloat16* p, __m512 v[4]) {
    const __m512i lo = _mm512_loadu_si512(p), hi = _mm512_loadu_si512(p + 32);
    const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));  // elements 0, 2, ..., 30
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(lo, odd));  // elements 1, 3, ..., 31
    v[2] = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));  // elements 32, 34, ..., 62
    v[3] = _mm512_castsi512_ps(_mm512_and_si512(hi, odd));  // elements 33, 35, ..., 63
  }
};
template <typename T>
constexpr bool kWide = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// The element of a d = 64 row that lane l (0..63, vector l / 16) of Row64<T>::load holds.
template <typename T>
inline int64_t element(int64_t l) {
  if constexpr (!Row64<T>::kPermuted) return l;
  const int64_t i = l / 16, j = l % 16;
  return (i / 2) * 32 + 2 * j + (i % 2);
}

// Dots of the query heads (NG of them, q: NG x 64 in the rows' lane order) with R = 16 / NG rows: NG * R dots
// reduced at once by sum16, scaled, and written to s[g * kChunk + r] by one masked store per head. (The
// earlier loop wrote every dot with a scalar store at a computed offset: more instructions than the dots.)
template <int NG, typename TK>
inline void dot_batch(const float* q, const TK* kbase, int64_t kstride, const int32_t* rowidx, int64_t r0, int n,
                      const int32_t* pf, int64_t pf_end, bool prefetch, __m512 scale, float* s) {
  constexpr int R = 16 / NG;
  __m512 part[16];
#pragma GCC unroll 16
  for (int rr = 0; rr < R; ++rr) {
    if (rr < n) {
      const int64_t r = r0 + rr;
      if (prefetch && r < pf_end) prefetch_row<2>(kbase + static_cast<int64_t>(pf[r]) * kstride, 64);
      __m512 k[4];
      Row64<TK>::load(kbase + static_cast<int64_t>(rowidx[r]) * kstride, k);
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) {
        const float* qg = q + g * 64;
        // one chain of 4 (a dot's 16 lanes summed later): the batch's NG * R chains hide the FMA latency
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16), k[1], acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 32), k[2], acc);
        part[rr * NG + g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 48), k[3], acc);
      }
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) part[rr * NG + g] = _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 16
  for (int p = NG * R; p < 16; ++p) part[p] = _mm512_setzero_ps();
  const __m512 sums = _mm512_mul_ps(sum16_head_major<NG>(part), scale);  // lane g * R + rr: head g, row r0 + rr
  const __mmask16 rowmask = static_cast<__mmask16>((1u << n) - 1);
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)  // lanes g * R .. g * R + n - 1 land on s[g * kChunk + r0 ..]; the others are masked
    _mm512_mask_storeu_ps(s + g * kChunk + r0 - g * R, static_cast<__mmask16>(rowmask << (g * R)), sums);
}

template <int NG, typename TK>
inline void dots64(const float* q, const TK* kbase, int64_t kstride, const int32_t* rowidx, int64_t rows,
                   const int32_t* pf, int64_t pf_end, bool prefetch, float scaling, float* s) {
  constexpr int R = 16 / NG;
  const __m512 scale = _mm512_set1_ps(scaling);
  int64_t r0 = 0;
  for (; r0 + R <= rows; r0 += R) dot_batch<NG>(q, kbase, kstride, rowidx, r0, R, pf, pf_end, prefetch, scale, s);
  if (r0 < rows) dot_batch<NG>(q, kbase, kstride, rowidx, r0, static_cast<int>(rows - r0), pf, pf_end, prefetch, scale, s);
}

// V rows weighted by the softmax's numerators (s) and summed, NG query heads at a time in NG x 4 accumulators
// held in registers; acc (NG x 64) is written in the rows' lane order.
template <int NG, typename TV>
inline void weighted_v64(const TV* vbase, int64_t vstride, const int32_t* rowidx, int64_t rows, const int32_t* pf,
                         int64_t pf_end, bool prefetch, const float* s, float* acc) {
  __m512 a[NG][4];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 4; ++i) a[g][i] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    if (prefetch && r < pf_end) prefetch_row<2>(vbase + static_cast<int64_t>(pf[r]) * vstride, 64);
    __m512 v[4];
    Row64<TV>::load(vbase + static_cast<int64_t>(rowidx[r]) * vstride, v);
    for (int g = 0; g < NG; ++g) {
      const __m512 w = _mm512_set1_ps(s[g * kChunk + r]);
      for (int i = 0; i < 4; ++i) a[g][i] = _mm512_fmadd_ps(w, v[i], a[g][i]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + g * 64 + 16 * i, a[g][i]);
}

// The chunk's softmax max and sum per query head (pmax, psum: G each), and its exp-weighted V rows in acc (G, 64),
// as the generic loop computes them. Dots take up to 8 query heads per pass over the K rows, the weighted sum up
// to 4 (its accumulators stay in registers).
template <typename TK, typename TV>
void chunk64(const float* qg, int64_t G, const TK* kbase, int64_t kstride, const TV* vbase, int64_t vstride,
             const int32_t* rowidx, int64_t rows, int64_t cap, float scaling, float* s, float* acc, float* pmax,
             float* psum, float* qperm) {
  const float* q = qg;
  if constexpr (Row64<TK>::kPermuted) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < 64; ++l) qperm[g * 64 + l] = qg[g * 64 + element<TK>(l)];
    q = qperm;
  }
  // Rows to prefetch: pf[r] is fetched while row r is read. A selection's scattered rows: kAhead rows ahead within
  // the chunk. Consecutive rows (a dense step's, or a run of selected ones): further ahead, and past the chunk's
  // end into the next one's rows, which the hardware prefetcher alone fetches too late at two streams per core.
  alignas(64) int32_t ahead[kChunk];
  const int32_t* pf = rowidx + kAhead;
  int64_t pf_end = rows - kAhead;
  if (rows > 0 && rowidx[rows - 1] - rowidx[0] == rows - 1) {
    const int64_t last = cap - 1;
    for (int64_t i = 0; i < rows; ++i) ahead[i] = static_cast<int32_t>(std::min<int64_t>(rowidx[0] + i + kStreamAhead, last));
    pf = ahead;
    pf_end = rows;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const bool first = g0 == 0;
    const float* qb = q + g0 * 64;
    float* sb = s + g0 * kChunk;
    switch (std::min<int64_t>(8, G - g0)) {
      case 8: dots64<8>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 7: dots64<7>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 6: dots64<6>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 5: dots64<5>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 4: dots64<4>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 3: dots64<3>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      case 2: dots64<2>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
      default: dots64<1>(qb, kbase, kstride, rowidx, rows, pf, pf_end, first, scaling, sb); break;
    }
  }
  chunk_softmax(s, G, rows, pmax, psum);
  float* out = Row64<TV>::kPermuted ? qperm : acc;  // the queries are read by now: their buffer is free
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const bool first = g0 == 0;
    float* a = out + g0 * 64;
    const float* sg = s + g0 * kChunk;
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: weighted_v64<4>(vbase, vstride, rowidx, rows, pf, pf_end, first, sg, a); break;
      case 3: weighted_v64<3>(vbase, vstride, rowidx, rows, pf, pf_end, first, sg, a); break;
      case 2: weighted_v64<2>(vbase, vstride, rowidx, rows, pf, pf_end, first, sg, a); break;
      default: weighted_v64<1>(vbase, vstride, rowidx, rows, pf, pf_end, first, sg, a); break;
    }
  }
  if constexpr (Row64<TV>::kPermuted)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < 64; ++l) acc[g * 64 + element<TV>(l)] = out[g * 64 + l];
}
#endif

template <typename TK, typename TV>
void attend_impl(const float* Q, const TK* K, const TV* V, const int32_t* I, const int32_t* N, int64_t B, int64_t H,
                 int64_t G, int64_t d, int64_t L, int64_t cap, const int64_t* ks, const int64_t* vs, float scaling,
                 float* out, const Scales& sc) {
  // Work items: (b, kv head, chunk of <= kChunk selected rows).
  std::vector<int64_t> first(B * H + 1, 0);
  for (int64_t bh = 0; bh < B * H; ++bh) first[bh + 1] = first[bh] + (N[bh] + kChunk - 1) / kChunk;
  const int64_t items = first[B * H];
  std::vector<float> pacc(std::max<int64_t>(items, 1) * G * d), pmax(std::max<int64_t>(items, 1) * G),
      psum(std::max<int64_t>(items, 1) * G);
  std::vector<int64_t> owner(items);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t it = first[bh]; it < first[bh + 1]; ++it) owner[it] = bh;

  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(kChunk * G), widened(d), qperm(G * d);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t bh = owner[it], b = bh / H, h = bh % H;
      const int64_t start = (it - first[bh]) * kChunk, rows = std::min<int64_t>(kChunk, N[bh] - start);
      const int32_t* rowidx = I + bh * L + start;
      const TK* kbase = K + b * ks[0] + h * ks[1];
      const TV* vbase = V + b * vs[0] + h * vs[1];
      const float* kscale = sc.k ? sc.k + b * sc.ks[0] + h * sc.ks[1] : nullptr;
      const float* vscale = sc.v ? sc.v + b * sc.vs[0] + h * sc.vs[1] : nullptr;
      const float* qg = Q + (b * H + h) * G * d;  // the group's G query heads, contiguous
      // Indices are checked once per chunk (a vectorized min/max), not per row inside the dot-product loop.
      int32_t lo_t = std::numeric_limits<int32_t>::max(), hi_t = std::numeric_limits<int32_t>::min();
#pragma omp simd reduction(min : lo_t) reduction(max : hi_t)
      for (int64_t r = 0; r < rows; ++r) {
        lo_t = std::min(lo_t, rowidx[r]);
        hi_t = std::max(hi_t, rowidx[r]);
      }
      TORCH_CHECK(rows == 0 || (lo_t >= 0 && hi_t < cap), "selected index ", lo_t < 0 ? lo_t : hi_t,
                  " outside the cache of ", cap, " rows");
#if defined(__AVX512F__)
      if constexpr (kWide<TK> && kWide<TV>) {
        if (d == 64) {
          chunk64(qg, G, kbase, ks[2], vbase, vs[2], rowidx, rows, cap, scaling, s.data(), pacc.data() + it * G * d,
                  pmax.data() + it * G, psum.data() + it * G, qperm.data());
          continue;
        }
      }
#endif
      // Pass 1: each K row is read once and dotted with all G queries.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = rowidx[r];
        // Gathered rows defeat the hardware prefetcher: ask for a row a few iterations ahead.
        if (r + kAhead < rows) prefetch_row(kbase + static_cast<int64_t>(rowidx[r + kAhead]) * ks[2], d);
        const auto* krow = row_f(kbase + t * ks[2], widened.data(), d);
        const float rs = scaling * (kscale ? kscale[t * sc.ks[2]] : 1.f);  // q . (scale k) = scale (q . k)
        for (int64_t g = 0; g < G; ++g) {
          const float* q = qg + g * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += q[i] * krow[i];
          s[g * kChunk + r] = acc * rs;
        }
      }
      // Softmax partials of this chunk: (max, sum of exp, exp-weighted V).
      float* acc = pacc.data() + it * G * d;
      std::fill(acc, acc + G * d, 0.f);
      chunk_softmax(s.data(), G, rows, pmax.data() + it * G, psum.data() + it * G);
      // Pass 2: each V row is read once and added to all G accumulators.
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kAhead < rows) prefetch_row(vbase + static_cast<int64_t>(rowidx[r + kAhead]) * vs[2], d);
        const auto* vrow = row_f(vbase + static_cast<int64_t>(rowidx[r]) * vs[2], widened.data(), d);
        const float vsc = vscale ? vscale[static_cast<int64_t>(rowidx[r]) * sc.vs[2]] : 1.f;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * kChunk + r] * vsc;
          float* a = acc + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * vrow[i];
        }
      }
    }
  });

  // Merge the chunks of each (b, kv head, g): rescale to the common max (online-softmax merge).
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (bh * G + g) * d;
        std::fill(o, o + d, 0.f);
        if (first[bh] == first[bh + 1]) continue;  // nothing selected: zeros, like SDPA with an all-False mask
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t it = first[bh]; it < first[bh + 1]; ++it) mx = std::max(mx, pmax[it * G + g]);
        float total = 0.f;
        for (int64_t it = first[bh]; it < first[bh + 1]; ++it) {
          const float w = std::exp(pmax[it * G + g] - mx);
          total += psum[it * G + g] * w;
          const float* a = pacc.data() + (it * G + g) * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] *= inv;
      }
    }
  });
}

template <typename TK>
void dispatch_v(const float* Q, const at::Tensor& k, const at::Tensor& v, const int32_t* I, const int32_t* N,
                int64_t B, int64_t H, int64_t G, int64_t d, int64_t L, float scaling, float* out, const Scales& sc) {
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t cap = std::min(k.size(2), v.size(2));
  if (v.scalar_type() == at::kBFloat16)
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<c10::BFloat16>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
  else if (v.scalar_type() == at::kChar)
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<int8_t>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
  else
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<float>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
}

}  // namespace

// Softmax attention of q (B, Hq, d) over rows idx[b, h // G, :count] of k_buf/v_buf (B, Hkv, cap, d).
// An int8 cache (k or v) comes with float32 row scales (B, Hkv, cap): row = scale * int8 values.
at::Tensor sparse_attention(at::Tensor q, at::Tensor k_buf, at::Tensor v_buf, at::Tensor idx,
                               at::Tensor count, double scaling, std::optional<at::Tensor> k_scale,
                               std::optional<at::Tensor> v_scale) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 4 && v_buf.dim() == 4, "q must be (B, Hq, d), k/v (B, Hkv, cap, d)");
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), H = k_buf.size(1);
  TORCH_CHECK(H > 0 && Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_buf.size(0) == B && v_buf.size(0) == B && v_buf.size(1) == H && k_buf.size(3) == d && v_buf.size(3) == d,
              "k/v shapes disagree with q");
  TORCH_CHECK(k_buf.stride(3) == 1 && v_buf.stride(3) == 1, "k/v rows must be contiguous (unit stride on d)");
  for (const auto& t : {k_buf, v_buf})
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kChar,
                "k/v must be float32, bfloat16 or int8");
  Scales sc;
  auto take_scale = [&](const at::Tensor& buf, const std::optional<at::Tensor>& s, const float*& ptr, int64_t* st) {
    if (buf.scalar_type() != at::kChar) return;
    TORCH_CHECK(s.has_value() && s->scalar_type() == at::kFloat && s->dim() == 3 && s->size(0) == B &&
                    s->size(1) == H && s->size(2) >= buf.size(2),
                "an int8 k/v cache needs float32 row scales (B, Hkv, cap)");
    ptr = s->data_ptr<float>();
    for (int i = 0; i < 3; ++i) st[i] = s->stride(i);
  };
  take_scale(k_buf, k_scale, sc.k, sc.ks);
  take_scale(v_buf, v_scale, sc.v, sc.vs);
  TORCH_CHECK(idx.dim() == 3 && idx.scalar_type() == at::kInt && idx.size(0) == B && idx.size(1) == H,
              "idx must be int32 (B, Hkv, L)");
  TORCH_CHECK(count.dim() == 2 && count.scalar_type() == at::kInt && count.size(0) == B && count.size(1) == H,
              "count must be int32 (B, Hkv)");
  idx = idx.contiguous();
  count = count.contiguous();
  const int64_t L = idx.size(2);
  const int32_t* N = count.data_ptr<int32_t>();
  for (int64_t i = 0; i < B * H; ++i) TORCH_CHECK(N[i] >= 0 && N[i] <= L, "count outside [0, L]");
  const auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({B, Hq, d}, qf.options());
  const int64_t G = Hq / H;
  if (k_buf.scalar_type() == at::kBFloat16)
    dispatch_v<c10::BFloat16>(qf.data_ptr<float>(), k_buf, v_buf, idx.data_ptr<int32_t>(), N, B, H, G, d, L,
                              static_cast<float>(scaling), out.data_ptr<float>(), sc);
  else if (k_buf.scalar_type() == at::kChar)
    dispatch_v<int8_t>(qf.data_ptr<float>(), k_buf, v_buf, idx.data_ptr<int32_t>(), N, B, H, G, d, L,
                       static_cast<float>(scaling), out.data_ptr<float>(), sc);
  else
    dispatch_v<float>(qf.data_ptr<float>(), k_buf, v_buf, idx.data_ptr<int32_t>(), N, B, H, G, d, L,
                      static_cast<float>(scaling), out.data_ptr<float>(), sc);
  return out.to(q.scalar_type());
}

// ---------------------------------------------------------------------------------------------------
// Kernel 3: key encoding (nearest centroid in the transformed space)
// ---------------------------------------------------------------------------------------------------

// codes[b, h, j] = argmax_c (z[b, h, j] · t[h, c] - half[h, c]), the first maximum, as torch.argmax.
// z (B, H, n, d) and t (H, C, d) float32, half (H, C). Tokens go in blocks of 64: the GEMM of a block
// (BLAS, one thread per block) leaves a 64 x C similarity tile in cache, and the argmax is taken
// there, instead of writing n x C similarities to memory and reading them back.
constexpr int64_t kBf16Keys = 256;  // keys per head from which encoding takes the bf16 path

at::Tensor encode_nearest(at::Tensor z, at::Tensor t, at::Tensor half) {
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat, "z must be float32 (B, H, n, d)");
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kFloat && t.size(0) == z.size(1) && t.size(2) == z.size(3),
              "t must be float32 (H, C, d) matching z");
  TORCH_CHECK(half.dim() == 2 && half.scalar_type() == at::kFloat && half.size(0) == t.size(0) &&
                  half.size(1) == t.size(1),
              "half must be float32 (H, C)");
  TORCH_CHECK(t.size(1) <= 32768, "more than 32768 centroids do not fit int16 codes");
  z = z.contiguous();
  t = t.contiguous();
  half = half.contiguous();
  const int64_t B = z.size(0), H = z.size(1), n = z.size(2), C = t.size(1);
  auto out = at::empty({B, H, n}, at::kShort);
  if (n == 0 || B == 0 || H == 0) return out;
#if defined(__AVX512BF16__)
  // Many keys (a prefill's): the k-means assignment kernel, bf16 dot products under a proven bound decided in fp32.
  // It packs the centroids to bf16 first, about one key's fp32 work: not worth it for a decode step's one key.
  if (n >= kBf16Keys) {
    for (int64_t b = 0; b < B; ++b) out[b].copy_(kmeans_nearest(z[b], t, half));
    return out;
  }
#endif
  a2ats::nearest_by_gemm(z.view({B * H, n, z.size(3)}), t, half.data_ptr<float>(), out.data_ptr<int16_t>());
  return out;
}
