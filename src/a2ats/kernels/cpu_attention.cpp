// Causal attention of the dense passes (a prompt's prefill, the calibration forward) with bf16 operands, on the
// CPU's bf16 dot-product unit (AVX-512 BF16): flash attention's blocked online softmax, fp32 scores and sums.
// torch's CPU kernel ran these at about a third of the rate the projections reach; most of a long prefill is here.
//
// Layout: per KV head, keys are packed once into tiles of 16 keys whose 32-bit lane l holds one key's pair of dims
// (2p, 2p + 1), so a query's dim pair broadcast against a tile gives 16 scores in one vdpbf16ps; values are packed
// by key pairs (lane d holds dim d of keys 2j and 2j + 1), so a row's bf16 probabilities of two keys, broadcast,
// add both into 16 output dims at once. A work item is a block of positions with every query head of its KV head,
// so each key block is read from memory once for all of them. Probabilities are rounded to bf16 for the product
// with V, as torch's own bf16 kernel does; their sum (the softmax denominator) is kept in fp32.

#include "cpu_common.h"

#if defined(__AVX512BF16__)
namespace {

constexpr int64_t D = 64;      // head dim the kernel takes (the models': other dims use torch's attention)
constexpr int64_t KB = 64;     // keys per block (4 tiles)
constexpr int64_t RB = 4;      // rows per micro-kernel: 4 x 4 score accumulators, then 4 x 4 output ones
constexpr int64_t POS = 16;    // positions per work item (x the group's heads = its rows)

// 2^x for x <= 0, -inf included (-> 0 after the caller's mask; here clamped to 2^-126): round to nearest, so the
// fraction is in [-1/2, 1/2], where a degree-6 Taylor series errs by ~1e-7 relative, far below bf16's rounding.
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));  // 2^f = e^(f ln 2)
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline uint32_t bf16_bits(const c10::BFloat16& x) {
  uint16_t raw;
  std::memcpy(&raw, &x, 2);
  return raw;
}

// A contiguous bf16 row read as its D / 2 dim pairs: word p holds dims 2p (low half) and 2p + 1 (x86 is
// little-endian), the pairs vdpbf16ps multiplies.
inline void row_pairs(const c10::BFloat16* row, uint32_t* out) { std::memcpy(out, row, D * sizeof(c10::BFloat16)); }

// keys (n, D) with row stride `rs` -> tiles (ceil(n / KB) * 4, D / 2, 16) of dim pairs, zero past n
void pack_keys(const c10::BFloat16* k, int64_t rs, int64_t n, uint32_t* out) {
  const int64_t tiles = (n + KB - 1) / KB * (KB / 16);
  uint32_t pairs[D / 2];
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t j = t * 16 + l;
      if (j < n)
        row_pairs(k + j * rs, pairs);
      else
        std::fill(pairs, pairs + D / 2, 0u);
      for (int64_t p = 0; p < D / 2; ++p) out[(t * (D / 2) + p) * 16 + l] = pairs[p];
    }
}

// values (n, D) -> key pairs (ceil(n / KB) * KB / 2, D): lane d of pair j holds dim d of keys 2j and 2j + 1
void pack_values(const c10::BFloat16* v, int64_t rs, int64_t n, uint32_t* out) {
  const int64_t pairs = (n + KB - 1) / KB * (KB / 2);
  for (int64_t j = 0; j < pairs; ++j)
    for (int64_t d = 0; d < D; ++d) {
      const uint32_t lo = 2 * j < n ? bf16_bits(v[2 * j * rs + d]) : 0u;
      const uint32_t hi = 2 * j + 1 < n ? bf16_bits(v[(2 * j + 1) * rs + d]) : 0u;
      out[j * D + d] = lo | (hi << 16);
    }
}

// Lanes of key block `base`.. that row limit `lim` (the last key it sees) keeps, per tile.
inline __mmask16 visible(int64_t base, int64_t lim) {
  const int64_t c = std::clamp<int64_t>(lim - base + 1, 0, 16);
  return c == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << c) - 1);
}

// RB rows of 64 floats (4 vectors each, held in registers) to dst, rows 64 floats apart: scores (KB keys) and
// outputs (D dims) alike
static_assert(KB == 64 && D == 64, "a block's rows and a head's dims are 4 vectors each");
inline void store_tile(const __m512 (&a)[RB][4], float* dst) {
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(dst + r * 64 + 16 * c, a[r][c]);
}

// Scores of RB query rows (D / 2 dim pairs each) against the KB keys of a packed block, into sc (RB x KB): the
// accumulators stay in registers through the loop (a loop the compiler does not unroll spills them every step).
inline void block_scores(const uint32_t* const* q, const uint32_t* Kb, float* sc) {
  __m512 s[RB][4];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) s[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh kv[4];
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) kv[t] = (__m512bh)_mm512_loadu_si512(Kb + (t * (D / 2) + p) * 16);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][p]));
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) s[r][t] = _mm512_dpbf16_ps(s[r][t], qb, kv[t]);
    }
  }
  store_tile(s, sc);
}

// o (RB x D) += p (RB x KB, bf16) . the block's packed values, in registers through the loop
inline void block_values(const c10::BFloat16* pbuf, const uint32_t* Vb, float* o) {
  __m512 acc[RB][4];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + 16 * c);
  const auto* P32 = reinterpret_cast<const uint32_t*>(pbuf);
  for (int64_t j = 0; j < KB / 2; ++j) {
    __m512bh vv[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(Vb + j * D + 16 * c);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(P32[r * (KB / 2) + j]));
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pp, vv[c]);
    }
  }
  store_tile(acc, o);
}

// One micro-kernel: RB rows q against key block kb, rows' last visible keys lim (ascending); online-softmax state
// m, l, o (RB x D) updated. sc: RB x KB scratch; pbuf: RB x KB bf16 scratch.
void block_rows(const uint32_t* const* q, const int64_t* lim, int64_t kb, const uint32_t* K, const uint32_t* V,
                float scale2, float* m, float* l, float* o, float* sc, c10::BFloat16* pbuf) {
  const int64_t base = kb * KB;
  block_scores(q, K + kb * 4 * (D / 2) * 16, sc);
  const bool edge = base + KB - 1 > lim[0];  // only a block past the first row's limit is masked
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < RB; ++r) {
    __m512 s[4];
    __mmask16 keep[4];
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      keep[t] = edge ? visible(base + 16 * t, lim[r]) : static_cast<__mmask16>(0xFFFF);
      s[t] = _mm512_mask_mov_ps(ninf, keep[t], _mm512_mul_ps(_mm512_loadu_ps(sc + r * KB + 16 * t), _mm512_set1_ps(scale2)));
    }
    const float bm = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(s[0], s[1]), _mm512_max_ps(s[2], s[3])));
    // the running max grows rarely once a row has seen a few blocks: only then are l and o rescaled
    if (bm > m[r]) {  // m is -inf before block 0, which holds key 0 (seen by every row): then the max is finite
      const float corr = _mm512_cvtss_f32(exp2_nonpositive(_mm512_set1_ps(m[r] - bm)));
      m[r] = bm;
      l[r] *= corr;
      float* orow = o + r * D;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(orow + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(orow + 16 * c), _mm512_set1_ps(corr)));
    }
    const __m512 mv = _mm512_set1_ps(m[r]);
    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      s[t] = _mm512_maskz_mov_ps(keep[t], exp2_nonpositive(_mm512_sub_ps(s[t], mv)));
      sum = _mm512_add_ps(sum, s[t]);
    }
    l[r] += _mm512_reduce_add_ps(sum);
    auto* pb = reinterpret_cast<__m512bh*>(pbuf + r * KB);
    pb[0] = _mm512_cvtne2ps_pbh(s[1], s[0]);  // keys 0..31 of the block, in order
    pb[1] = _mm512_cvtne2ps_pbh(s[3], s[2]);
  }
  block_values(pbuf, V + kb * (KB / 2) * D, o);
}

}  // namespace
#endif

bool bf16_attention() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// q (B, Hq, t, D) bf16, k and v (B, Hkv, start + t, D) bf16 (rows contiguous, any other strides): query i of a head
// sees keys 0 .. start + i of its KV head (head h: KV head h / (Hq / Hkv)). Returns (B, Hq, t, D) float32.
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scaling, int64_t start) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (B, heads, rows, d)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "q, k and v must be bfloat16");
  const int64_t B = q.size(0), Hq = q.size(1), t = q.size(2), d = q.size(3), Hkv = k.size(1), n = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && Hkv > 0 && Hq % Hkv == 0,
              "k and v must be (B, Hkv, n, d) with q's B and d and Hkv dividing q's heads");
  TORCH_CHECK(start >= 0 && n == start + t, "k and v must hold start + t rows (the earlier positions, then q's)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "rows must be contiguous");
#if defined(__AVX512BF16__)
  TORCH_CHECK(d == D, "the bf16 attention kernel takes head dim 64, got ", d);
  const int64_t G = Hq / Hkv, per_head = (n + KB - 1) / KB * KB * D / 2;  // words of a head's packed K (and V)
  auto out = at::empty({B, Hq, t, D}, q.options().dtype(at::kFloat));
  if (t == 0) return out;
  auto kp = at::empty({B * Hkv, per_head}, k.options().dtype(at::kInt));
  auto vp = at::empty({B * Hkv, per_head}, v.options().dtype(at::kInt));
  auto* KP = reinterpret_cast<uint32_t*>(kp.data_ptr<int32_t>());
  auto* VP = reinterpret_cast<uint32_t*>(vp.data_ptr<int32_t>());
  const auto* Kd = k.data_ptr<c10::BFloat16>();
  const auto* Vd = v.data_ptr<c10::BFloat16>();
  at::parallel_for(0, 2 * B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / 2, b = bh / Hkv, h = bh % Hkv;
      if (item % 2 == 0)
        pack_keys(Kd + b * k.stride(0) + h * k.stride(1), k.stride(2), n, KP + bh * per_head);
      else
        pack_values(Vd + b * v.stride(0) + h * v.stride(1), v.stride(2), n, VP + bh * per_head);
    }
  });
  const int64_t pblocks = (t + POS - 1) / POS, items = B * Hkv * pblocks;
  // A block's cost grows with its position: items go out largest first, interleaved with the smallest, so the
  // contiguous ranges parallel_for hands each thread carry about equal work.
  auto order = [&](int64_t i) {
    const int64_t rank = i % 2 == 0 ? i / 2 : items - 1 - i / 2;  // 0, last, 1, last - 1, ...
    const int64_t pb = pblocks - 1 - rank / (B * Hkv);
    return std::pair<int64_t, int64_t>{rank % (B * Hkv), pb};
  };
  const float scale2 = static_cast<float>(scaling * 1.4426950408889634);  // exp(x s) = 2^(x s log2 e)
  const auto* Qd = q.data_ptr<c10::BFloat16>();
  float* O = out.data_ptr<float>();
  const int64_t rows = G * POS;
  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> qs(rows * D / 2);
    std::vector<float> os(rows * D), ms(rows), ls(rows);
    std::vector<int64_t> lims(rows);
    alignas(64) c10::BFloat16 pbuf[RB * KB];
    alignas(64) float sc[RB * KB];
    for (int64_t i = lo; i < hi; ++i) {
      const auto [bh, pb] = order(i);
      const int64_t b = bh / Hkv, h = bh % Hkv, i0 = pb * POS, valid = std::min(POS, t - i0);
      // the item's rows, head-major; positions past t repeat the last one (computed, not written)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < POS; ++r) {
          const int64_t pos = i0 + std::min(r, valid - 1), row = g * POS + r;
          row_pairs(Qd + b * q.stride(0) + (h * G + g) * q.stride(1) + pos * q.stride(2), qs.data() + row * D / 2);
          lims[row] = start + pos;
        }
      std::fill(os.begin(), os.end(), 0.f);
      std::fill(ms.begin(), ms.end(), -std::numeric_limits<float>::infinity());
      std::fill(ls.begin(), ls.end(), 0.f);
      const uint32_t* K = KP + bh * per_head;
      const uint32_t* V = VP + bh * per_head;
      const int64_t last = (start + i0 + valid - 1) / KB;
      for (int64_t kb = 0; kb <= last; ++kb)
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
          if (kb * KB > lims[r0 + RB - 1]) continue;  // every row of these four sees none of this block
          const uint32_t* qr[RB];
          for (int r = 0; r < RB; ++r) qr[r] = qs.data() + (r0 + r) * D / 2;
          block_rows(qr, lims.data() + r0, kb, K, V, scale2, ms.data() + r0, ls.data() + r0, os.data() + r0 * D, sc, pbuf);
        }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < valid; ++r) {
          const int64_t row = g * POS + r;
          const float inv = 1.f / ls[row];
          float* dst = O + ((b * Hq + h * G + g) * t + i0 + r) * D;
          for (int64_t c = 0; c < D; ++c) dst[c] = os[row * D + c] * inv;
        }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "this build of the kernels has no bf16 attention (it needs AVX-512 BF16): use torch's attention");
#endif
}
