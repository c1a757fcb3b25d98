// Fused CPU kernels for A²ATS decode: LUT scoring + top-K selection, and attention over the selection.
//
// Semantics are those of the torch references (a2ats.kernels.reference, built on a2ats.selection and
// a2ats.attention); the tests compare the two bit-for-bit (selection) or within fp32 rounding (attention).
// Loops are plain C++ written so that -O3 vectorizes them for the ISA the extension was built for;
// parallelism goes through at::parallel_for so torch.set_num_threads governs it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------------------
// Kernel 1: score + select
// ---------------------------------------------------------------------------------------------------

// Order-preserving map float bits -> uint32: same total order on bit patterns as the reference's
// signed-int trick (negative floats reversed, -0 < +0, NaNs at the ends), so thresholds agree exactly.
inline uint32_t order_key(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);  // all ones if negative
  return bits ^ (sign | 0x80000000u);
}

// Per row b: which tokens are always kept (first `sinks` / last `window` valid ones) and the list of
// candidates (valid and not always kept), ascending. Mirrors selection.always_kept.
struct RowInfo {
  std::vector<uint8_t> always;   // (B, n)
  std::vector<int32_t> cand;     // (B, n): first m[b] entries used
  std::vector<int64_t> m;        // candidates per row
  std::vector<int64_t> n_always; // always-kept per row
};

RowInfo row_info(const torch::Tensor& valid, int64_t sinks, int64_t window) {
  const int64_t B = valid.size(0), n = valid.size(1);
  RowInfo r;
  r.always.resize(B * n);
  r.cand.resize(B * n);
  r.m.assign(B, 0);
  r.n_always.assign(B, 0);
  const bool* V = valid.data_ptr<bool>();  // contiguous (the caller makes it so)
  for (int64_t b = 0; b < B; ++b) {
    const bool* vb = V + b * n;
    uint8_t* al = r.always.data() + b * n;
    int32_t* cd = r.cand.data() + b * n;
    int64_t length = 0;
#pragma omp simd reduction(+ : length)
    for (int64_t j = 0; j < n; ++j) length += vb[j];
    if (length == n) {  // no padding (the usual row): sinks first, window last, candidates between
      const int64_t s = std::min(sinks, n), w0 = std::max(s, n - window);
      std::memset(al, 0, n);
      std::memset(al, 1, s);
      std::memset(al + w0, 1, n - w0);
      const int64_t m = w0 - s;
      for (int64_t i = 0; i < m; ++i) cd[i] = static_cast<int32_t>(s + i);
      r.m[b] = m;
      r.n_always[b] = n - m;
      continue;
    }
    int64_t rank = 0, m = 0, na = 0;
    for (int64_t j = 0; j < n; ++j) {
      al[j] = 0;
      if (!vb[j]) continue;
      const bool keep = rank < sinks || rank >= length - window;
      ++rank;
      if (keep) {
        al[j] = 1;
        ++na;
      } else {
        cd[m++] = static_cast<int32_t>(j);
      }
    }
    r.m[b] = m;
    r.n_always[b] = na;
  }
  return r;
}

// Bucket (of `hist`, nb bins) holding the `need`-th largest; `need` becomes the rank inside it.
inline uint32_t top_bucket(const uint32_t* hist, uint32_t nb, int64_t& need) {
  int64_t above = 0;
  for (int64_t bin = nb - 1; bin >= 0; --bin) {
    if (above + hist[bin] >= need) {
      need -= above;
      return static_cast<uint32_t>(bin);
    }
    above += hist[bin];
  }
  return 0;  // unreachable when need <= count
}

void check_score_inputs(const torch::Tensor& lut, const torch::Tensor& codes, const c10::optional<torch::Tensor>& offsets) {
  TORCH_CHECK(lut.dim() == 4 && lut.scalar_type() == torch::kFloat32 && lut.is_contiguous(),
              "lut must be a contiguous float32 (B, Hkv, G, T) tensor");
  TORCH_CHECK(lut.size(3) < (int64_t(1) << 31), "lookup table too long for int32 entry indices");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kInt16 && codes.stride(2) == 1,
              "codes must be int16 (B, Hkv, n) with unit stride along tokens");
  TORCH_CHECK(codes.size(0) == lut.size(0) && codes.size(1) == lut.size(1), "codes and lut disagree on (B, Hkv)");
  if (offsets.has_value()) {
    const auto& o = *offsets;
    TORCH_CHECK(o.dim() == 2 && o.scalar_type() == torch::kInt32 && o.is_contiguous() && o.size(0) == codes.size(0) &&
                    o.size(1) == codes.size(2),
                "offsets must be a contiguous int32 (B, n) tensor");
  }
}

// Table entry of token j for query head row `lrow`; throws on an index outside the table (the
// reference's gather would too) instead of reading out of bounds.
inline float lookup(const float* lrow, int64_t T, const int16_t* crow, const int32_t* orow, int64_t j) {
  const int64_t e = static_cast<int64_t>(crow[j]) + (orow ? orow[j] : 0);
  TORCH_CHECK(e >= 0 && e < T, "code + offset ", e, " outside the lookup table of ", T, " entries");
  return lrow[e];
}

}  // namespace

// Estimated scores alone: (B, Hkv*G, n) float32, score[b, h*G+g, j] = lut[b,h,g, codes[b,h,j] + offsets[b,j]].
torch::Tensor score(torch::Tensor lut, torch::Tensor codes, c10::optional<torch::Tensor> offsets) {
  check_score_inputs(lut, codes, offsets);
  const int64_t B = lut.size(0), H = lut.size(1), G = lut.size(2), T = lut.size(3), n = codes.size(2);
  auto out = torch::empty({B, H * G, n}, lut.options());
  const float* L = lut.data_ptr<float>();
  const int16_t* C = codes.data_ptr<int16_t>();
  const int32_t* O = offsets.has_value() ? offsets->data_ptr<int32_t>() : nullptr;
  float* S = out.data_ptr<float>();
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1);
  at::parallel_for(0, B * H * G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / (H * G), h = (r / G) % H;
      const float* lrow = L + r * T;
      const int16_t* crow = C + b * cs0 + h * cs1;
      const int32_t* orow = O ? O + b * n : nullptr;
      float* srow = S + r * n;
      for (int64_t j = 0; j < n; ++j) srow[j] = lookup(lrow, T, crow, orow, j);
    }
  });
  return out;
}

namespace {

// Radix selection over table entries weighted by how many candidates carry them: `keys` (entry keys)
// share the bits above `shift` (given in `prefix`); returns the key of the `need`-th largest candidate,
// and `need` ends as how many candidates with exactly that key make the top.
inline uint32_t refine_weighted(std::vector<uint32_t>& keys, std::vector<uint32_t>& w, uint32_t prefix, int shift,
                                int64_t& need) {
  uint32_t hist[2048];
  while (shift > 0) {
    const int bits = std::min(shift, 11);
    shift -= bits;
    const uint32_t nb = 1u << bits, mask = nb - 1;
    std::memset(hist, 0, sizeof(uint32_t) * nb);
    for (size_t i = 0; i < keys.size(); ++i) hist[(keys[i] >> shift) & mask] += w[i];
    const uint32_t bin = top_bucket(hist, nb, need);
    prefix |= bin << shift;
    size_t o = 0;
    for (size_t i = 0; i < keys.size(); ++i)
      if (((keys[i] >> shift) & mask) == bin) {
        keys[o] = keys[i];
        w[o++] = w[i];
      }
    keys.resize(o);
    w.resize(o);
  }
  return prefix;
}

// Marks, in `mrow`, candidates whose key is above `thr`, then the latest `take` whose key equals it.
// CONTIG: candidates are the slots cand0 .. cand0 + m - 1 (a row without padding), read straight.
template <bool CONTIG, bool OFFS>
void mark_row(uint8_t* __restrict mrow, const float* __restrict lrow, const int16_t* __restrict crow,
              const int32_t* __restrict orow, const int32_t* __restrict cand, int64_t m, uint32_t thr, int64_t take) {
  const int64_t c0 = cand[0];
  auto slot = [&](int64_t i) -> int64_t { return CONTIG ? c0 + i : cand[i]; };
  auto key = [&](int64_t i) -> uint32_t {
    const int64_t j = slot(i);
    return order_key(lrow[static_cast<int32_t>(crow[j]) + (OFFS ? orow[j] : 0)]);
  };
  if (CONTIG) {
    uint8_t* __restrict m0 = mrow + c0;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) m0[i] = key(i) > thr;
  } else {
    for (int64_t i = 0; i < m; ++i) mrow[cand[i]] = key(i) > thr;
  }
  // Ties at the threshold go to the latest candidates, as the reference's (score, rank) order does:
  // scan back in blocks, skipping blocks without a tie by a vectorized count.
  for (int64_t hi = m; take > 0 && hi > 0;) {
    const int64_t lo = std::max<int64_t>(0, hi - 256);
    int32_t eq = 0;
#pragma omp simd reduction(+ : eq)
    for (int64_t i = lo; i < hi; ++i) eq += key(i) == thr;
    for (int64_t i = hi - 1; eq > 0 && take > 0 && i >= lo; --i)
      if (key(i) == thr) {
        mrow[slot(i)] = 1;
        --take;
        --eq;
      }
    hi = lo;
  }
}

}  // namespace

// Union-reduction selection (see a2ats.selection.select): returns (idx (B, Hkv, L) int32, ascending
// in the first count entries, -1 after; count (B, Hkv) int32).
//
// The top-K of a query head is found on the lookup table, not on the tokens: a token's score is its
// table entry's, so counting how many candidates carry each entry (once per KV head, shared by its G
// query heads) turns the selection into a weighted radix select over T entries; one vectorized pass
// over the tokens then marks those above the threshold.
std::vector<torch::Tensor> score_select(torch::Tensor lut, torch::Tensor codes, c10::optional<torch::Tensor> offsets,
                                        torch::Tensor valid, torch::Tensor k, int64_t sinks, int64_t window) {
  check_score_inputs(lut, codes, offsets);
  const int64_t B = lut.size(0), H = lut.size(1), G = lut.size(2), T = lut.size(3), n = codes.size(2);
  TORCH_CHECK(valid.dim() == 2 && valid.scalar_type() == torch::kBool && valid.size(0) == B && valid.size(1) == n,
              "valid must be a bool (B, n) tensor");
  TORCH_CHECK(k.dim() == 1 && k.size(0) == B && k.scalar_type() == torch::kInt64, "k must be int64 (B,)");
  valid = valid.contiguous();
  k = k.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const RowInfo info = row_info(valid, sinks, window);
  std::vector<int64_t> keff(B);
  int64_t L = 0;
  for (int64_t b = 0; b < B; ++b) {
    keff[b] = std::max<int64_t>(0, std::min<int64_t>(kp[b], info.m[b]));
    L = std::max(L, info.n_always[b] + std::min(G * keff[b], info.m[b]));
  }
  const float* Lp = lut.data_ptr<float>();
  const int16_t* C = codes.data_ptr<int16_t>();
  const int32_t* O = offsets.has_value() ? offsets->data_ptr<int32_t>() : nullptr;
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1);
  auto ranked = [&](int64_t b) { return keff[b] > 0 && keff[b] < info.m[b]; };
  auto contiguous = [&](int64_t b) {
    const int32_t* cand = info.cand.data() + b * n;
    return cand[info.m[b] - 1] - cand[0] == info.m[b] - 1;
  };

  // Candidates per table entry, per (b, KV head), and the list of entries that carry any (in order of first
  // use): a row's radix select then reads only those, never the whole table, which banded WRoPE makes
  // larger than the context (bands x 4096 entries). An entry outside the table is an error.
  auto counts = torch::zeros({B * H, T}, torch::kInt32);
  int32_t* CNT = counts.data_ptr<int32_t>();
  std::vector<uint8_t> bad(B * H, 0);
  std::vector<std::vector<int32_t>> used(B * H);
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      if (!ranked(b)) continue;
      const int16_t* crow = C + b * cs0 + h * cs1;
      const int32_t* orow = O ? O + b * n : nullptr;
      const int32_t* cand = info.cand.data() + b * n;
      int32_t* cnt = CNT + bh * T;
      std::vector<int32_t>& list = used[bh];
      list.reserve(std::min<int64_t>(info.m[b], T));
      uint32_t out = 0;
      for (int64_t i = 0; i < info.m[b]; ++i) {
        const int64_t j = cand[i];
        const int64_t e = static_cast<int64_t>(crow[j]) + (orow ? orow[j] : 0);
        if (e < 0 || e >= T) {
          out = 1;
          continue;
        }
        if (cnt[e]++ == 0) list.push_back(static_cast<int32_t>(e));
      }
      bad[bh] = out != 0;
    }
  });
  for (int64_t bh = 0; bh < B * H; ++bh)
    TORCH_CHECK(!bad[bh], "code + offset outside the lookup table of ", T, " entries");

  // One byte mask per query head row: rows run in parallel without sharing writes; the union over
  // the group is taken afterwards per KV head.
  auto chosen = torch::empty({B * H * G, n}, torch::kUInt8);
  uint8_t* M = chosen.data_ptr<uint8_t>();
  at::parallel_for(0, B * H * G, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> ek, ew;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / (H * G), h = (r / G) % H;
      uint8_t* mrow = M + r * n;
      std::memset(mrow, 0, n);
      const int64_t m = info.m[b], kk = keff[b];
      if (kk == 0) continue;
      const int32_t* cand = info.cand.data() + b * n;
      if (kk == m) {  // every candidate fits: no ranking needed
        for (int64_t i = 0; i < m; ++i) mrow[cand[i]] = 1;
        continue;
      }
      const float* lrow = Lp + r * T;
      const int32_t* cnt = CNT + (b * H + h) * T;
      const std::vector<int32_t>& list = used[b * H + h];
      const int64_t u = static_cast<int64_t>(list.size());
      ek.resize(u);
      ew.resize(u);
      uint32_t kmin = 0xFFFFFFFFu, kmax = 0;
      for (int64_t i = 0; i < u; ++i) {
        const int32_t e = list[i];
        const uint32_t key = order_key(lrow[e]);
        ek[i] = key;
        ew[i] = static_cast<uint32_t>(cnt[e]);
        kmin = std::min(kmin, key);
        kmax = std::max(kmax, key);
      }
      int64_t take_equal = kk;
      uint32_t thr = kmin;  // every key equal: the threshold is that key, ties decide
      if (kmin != kmax) {
        const int common = __builtin_clz(kmin ^ kmax);  // leading bits shared by every entry key
        const uint32_t fixed = common ? (kmin >> (32 - common)) << (32 - common) : 0u;
        thr = refine_weighted(ek, ew, fixed, 32 - common, take_equal);
      }
      const int16_t* crow = C + b * cs0 + h * cs1;
      const int32_t* orow = O ? O + b * n : nullptr;
      if (contiguous(b)) {
        if (orow) mark_row<true, true>(mrow, lrow, crow, orow, cand, m, thr, take_equal);
        else mark_row<true, false>(mrow, lrow, crow, orow, cand, m, thr, take_equal);
      } else {
        if (orow) mark_row<false, true>(mrow, lrow, crow, orow, cand, m, thr, take_equal);
        else mark_row<false, false>(mrow, lrow, crow, orow, cand, m, thr, take_equal);
      }
    }
  });

  auto idx = torch::full({B, H, L}, -1, torch::kInt32);
  auto count = torch::zeros({B, H}, torch::kInt32);
  int32_t* I = idx.data_ptr<int32_t>();
  int32_t* N = count.data_ptr<int32_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> any(n);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H;
      std::memcpy(any.data(), info.always.data() + b * n, n);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* mrow = M + (bh * G + g) * n;
        uint8_t* a = any.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) a[j] |= mrow[j];
      }
      int32_t* out = I + bh * L;
      int64_t c = 0;
      // Branch-free compaction: kept slots are scattered, so a branch on each would mispredict. Every
      // slot is written at the current count and kept by advancing it; only out[count] can be left
      // holding an unkept slot, so it is reset to -1 after.
      const uint8_t* __restrict keep = any.data();
      for (int64_t j = 0; j < n; ++j) {
        if (c < L) out[c] = static_cast<int32_t>(j);
        c += keep[j];
      }
      if (c < L) out[c] = -1;
      N[bh] = static_cast<int32_t>(c);
    }
  });
  return {idx, count};
}

// ---------------------------------------------------------------------------------------------------
// Kernel 2: attention over the selection
// ---------------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kChunk = 256;  // selected rows per work item: splits long selections across threads
constexpr int64_t kAhead = 8;    // rows of software prefetch distance

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 3);
}

inline float to_f(float x) { return x; }
inline float to_f(int8_t x) { return static_cast<float>(x); }  // int8 rows carry a scale per row

// A row as floats: float rows are read in place; int8 rows are widened into ``buf`` first, in a loop of
// its own (the compiler vectorizes a plain widening loop, not one fused into the dot product).
inline const float* row_f(const float* row, float*, int64_t) { return row; }
inline const c10::BFloat16* row_f(const c10::BFloat16* row, float*, int64_t) { return row; }
inline const float* row_f(const int8_t* row, float* buf, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}
inline float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes (c10's conversion may not).
  uint16_t raw;
  std::memcpy(&raw, &x, 2);
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Row scales of int8 caches (nullptr for float caches): row t of (b, h) holds scale[b*s[0] + h*s[1] + t*s[2]].
struct Scales {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t ks[3] = {0, 0, 0};
  int64_t vs[3] = {0, 0, 0};
};

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
    std::vector<float> s(kChunk * G), widened(d);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t bh = owner[it], b = bh / H, h = bh % H;
      const int64_t start = (it - first[bh]) * kChunk, rows = std::min<int64_t>(kChunk, N[bh] - start);
      const int32_t* rowidx = I + bh * L + start;
      const TK* kbase = K + b * ks[0] + h * ks[1];
      const TV* vbase = V + b * vs[0] + h * vs[1];
      const float* kscale = sc.k ? sc.k + b * sc.ks[0] + h * sc.ks[1] : nullptr;
      const float* vscale = sc.v ? sc.v + b * sc.vs[0] + h * sc.vs[1] : nullptr;
      const float* qg = Q + (b * H + h) * G * d;  // the group's G query heads, contiguous
      // Pass 1: each K row is read once and dotted with all G queries.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = rowidx[r];
        TORCH_CHECK(t >= 0 && t < cap, "selected index ", t, " outside the cache of ", cap, " rows");
        // Gathered rows defeat the hardware prefetcher: ask for a row a few iterations ahead.
        if (r + kAhead < rows) prefetch_row(kbase + static_cast<int64_t>(rowidx[r + kAhead]) * ks[2], d);
        const auto* krow = row_f(kbase + t * ks[2], widened.data(), d);
        const float rs = scaling * (kscale ? kscale[t * sc.ks[2]] : 1.f);  // q . (scale k) = scale (q . k)
        for (int64_t g = 0; g < G; ++g) {
          const float* q = qg + g * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += q[i] * to_f(krow[i]);
          s[g * kChunk + r] = acc * rs;
        }
      }
      // Softmax partials of this chunk: (max, sum of exp, exp-weighted V).
      float* acc = pacc.data() + it * G * d;
      std::fill(acc, acc + G * d, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * kChunk;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t r = 0; r < rows; ++r) mx = std::max(mx, sg[r]);
        float sum = 0.f;
        for (int64_t r = 0; r < rows; ++r) {
          sg[r] = std::exp(sg[r] - mx);
          sum += sg[r];
        }
        pmax[it * G + g] = mx;
        psum[it * G + g] = sum;
      }
      // Pass 2: each V row is read once and added to all G accumulators.
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kAhead < rows) prefetch_row(vbase + static_cast<int64_t>(rowidx[r + kAhead]) * vs[2], d);
        const auto* vrow = row_f(vbase + static_cast<int64_t>(rowidx[r]) * vs[2], widened.data(), d);
        const float vsc = vscale ? vscale[static_cast<int64_t>(rowidx[r]) * sc.vs[2]] : 1.f;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * kChunk + r] * vsc;
          float* a = acc + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * to_f(vrow[i]);
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
void dispatch_v(const float* Q, const torch::Tensor& k, const torch::Tensor& v, const int32_t* I, const int32_t* N,
                int64_t B, int64_t H, int64_t G, int64_t d, int64_t L, float scaling, float* out, const Scales& sc) {
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t cap = std::min(k.size(2), v.size(2));
  if (v.scalar_type() == torch::kBFloat16)
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<c10::BFloat16>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
  else if (v.scalar_type() == torch::kChar)
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<int8_t>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
  else
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<float>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out, sc);
}

}  // namespace

// Softmax attention of q (B, Hq, d) over rows idx[b, h // G, :count] of k_buf/v_buf (B, Hkv, cap, d).
// An int8 cache (k or v) comes with float32 row scales (B, Hkv, cap): row = scale * int8 values.
torch::Tensor sparse_attention(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf, torch::Tensor idx,
                               torch::Tensor count, double scaling, c10::optional<torch::Tensor> k_scale,
                               c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 4 && v_buf.dim() == 4, "q must be (B, Hq, d), k/v (B, Hkv, cap, d)");
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), H = k_buf.size(1);
  TORCH_CHECK(H > 0 && Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_buf.size(0) == B && v_buf.size(0) == B && v_buf.size(1) == H && k_buf.size(3) == d && v_buf.size(3) == d,
              "k/v shapes disagree with q");
  TORCH_CHECK(k_buf.stride(3) == 1 && v_buf.stride(3) == 1, "k/v rows must be contiguous (unit stride on d)");
  for (const auto& t : {k_buf, v_buf})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kChar,
                "k/v must be float32, bfloat16 or int8");
  Scales sc;
  auto take_scale = [&](const torch::Tensor& buf, const c10::optional<torch::Tensor>& s, const float*& ptr, int64_t* st) {
    if (buf.scalar_type() != torch::kChar) return;
    TORCH_CHECK(s.has_value() && s->scalar_type() == torch::kFloat32 && s->dim() == 3 && s->size(0) == B &&
                    s->size(1) == H && s->size(2) >= buf.size(2),
                "an int8 k/v cache needs float32 row scales (B, Hkv, cap)");
    ptr = s->data_ptr<float>();
    for (int i = 0; i < 3; ++i) st[i] = s->stride(i);
  };
  take_scale(k_buf, k_scale, sc.k, sc.ks);
  take_scale(v_buf, v_scale, sc.v, sc.vs);
  TORCH_CHECK(idx.dim() == 3 && idx.scalar_type() == torch::kInt32 && idx.size(0) == B && idx.size(1) == H,
              "idx must be int32 (B, Hkv, L)");
  TORCH_CHECK(count.dim() == 2 && count.scalar_type() == torch::kInt32 && count.size(0) == B && count.size(1) == H,
              "count must be int32 (B, Hkv)");
  idx = idx.contiguous();
  count = count.contiguous();
  const int64_t L = idx.size(2);
  const int32_t* N = count.data_ptr<int32_t>();
  for (int64_t i = 0; i < B * H; ++i) TORCH_CHECK(N[i] >= 0 && N[i] <= L, "count outside [0, L]");
  const auto qf = q.to(torch::kFloat32).contiguous();
  auto out = torch::empty({B, Hq, d}, qf.options());
  const int64_t G = Hq / H;
  if (k_buf.scalar_type() == torch::kBFloat16)
    dispatch_v<c10::BFloat16>(qf.data_ptr<float>(), k_buf, v_buf, idx.data_ptr<int32_t>(), N, B, H, G, d, L,
                              static_cast<float>(scaling), out.data_ptr<float>(), sc);
  else if (k_buf.scalar_type() == torch::kChar)
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
torch::Tensor encode_nearest(torch::Tensor z, torch::Tensor t, torch::Tensor half) {
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == torch::kFloat32, "z must be float32 (B, H, n, d)");
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == torch::kFloat32 && t.size(0) == z.size(1) && t.size(2) == z.size(3),
              "t must be float32 (H, C, d) matching z");
  TORCH_CHECK(half.dim() == 2 && half.scalar_type() == torch::kFloat32 && half.size(0) == t.size(0) &&
                  half.size(1) == t.size(1),
              "half must be float32 (H, C)");
  TORCH_CHECK(t.size(1) <= 32768, "more than 32768 centroids do not fit int16 codes");
  z = z.contiguous();
  t = t.contiguous();
  half = half.contiguous();
  const int64_t B = z.size(0), H = z.size(1), n = z.size(2), C = t.size(1);
  auto out = torch::empty({B, H, n}, torch::kInt16);
  if (n == 0 || B == 0 || H == 0) return out;
  constexpr int64_t kRows = 64;
  const int64_t blocks = (n + kRows - 1) / kRows;
  int16_t* O = out.data_ptr<int16_t>();
  const float* HP = half.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / blocks, h = bh % H, j0 = (item % blocks) * kRows;
      const int64_t rows = std::min(kRows, n - j0);
      const auto sim = at::mm(z[bh / H][h].narrow(0, j0, rows), t[h].t()).contiguous();  // (rows, C)
      const float* S = sim.data_ptr<float>();
      const float* __restrict hp = HP + h * C;
      for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict s = S + r * C;
        float best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : best)
        for (int64_t c = 0; c < C; ++c) best = std::max(best, s[c] - hp[c]);
        int64_t arg = 0;  // NaN rows (never from finite keys) fall back to 0
        for (int64_t c = 0; c < C; ++c)
          if (s[c] - hp[c] == best) {
            arg = c;
            break;
          }
        O[bh * n + j0 + r] = static_cast<int16_t>(arg);
      }
    }
  });
  return out;
}

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

// ---------------------------------------------------------------------------------------------------
// Kernel 5: lookup tables (query · centroid for every centroid)
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kTile = 16;  // centroids per tile: one AVX-512 register of fp32 lanes

// Centroids (H, C, d) -> tiles (H, ceil(C/16), d, 16): each tile's d x 16 block is contiguous, so a
// pass over the tiles streams memory in order; missing centroids of the last tile are zeros.
torch::Tensor tile_centroids(torch::Tensor cent) {
  TORCH_CHECK(cent.dim() == 3 && cent.scalar_type() == torch::kFloat32, "centroids must be float32 (H, C, d)");
  const int64_t H = cent.size(0), C = cent.size(1), d = cent.size(2), nt = (C + kTile - 1) / kTile;
  auto padded = torch::zeros({H, nt * kTile, d}, cent.options());
  padded.narrow(1, 0, C).copy_(cent);
  return padded.view({H, nt, kTile, d}).transpose(2, 3).contiguous();
}

// lut (B, H, R, C) = q (B, H, R, d) · centroids^T, centroids given as tiles (see tile_centroids).
// A decode step reads every centroid of every layer once, so this streams memory: 16 centroids at a
// time, up to 8 query rows per pass, no horizontal sums (a batched GEMM of 3 rows by 4096 columns
// reaches a fraction of the bandwidth).
// groups > 1: rows r = g * (R / groups) + i, and the output keeps the max over g of each i (B, H, R / groups, C):
// the GQA "max" reduction taken on the tile in registers instead of as a pass over (B, H, R, C) afterwards.
torch::Tensor lookup_tables(torch::Tensor q, torch::Tensor tiles, int64_t C, int64_t groups) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32, "q must be float32 (B, H, R, d)");
  TORCH_CHECK(tiles.dim() == 4 && tiles.scalar_type() == torch::kFloat32 && tiles.is_contiguous() &&
                  tiles.size(0) == q.size(1) && tiles.size(2) == q.size(3) && tiles.size(3) == kTile &&
                  C > (tiles.size(1) - 1) * kTile && C <= tiles.size(1) * kTile,
              "tiles must be the contiguous (H, ceil(C/16), d, 16) layout of tile_centroids, matching q");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), d = q.size(3), nt = tiles.size(1);
  TORCH_CHECK(groups >= 1 && R % groups == 0, "groups must divide the rows of q");
  const int64_t Ro = R / groups;
  auto out = torch::empty({B, H, Ro, C}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* TL = tiles.data_ptr<float>();
  float* O = out.data_ptr<float>();
  constexpr int64_t kRows = 8;
  at::parallel_for(0, H * nt, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t h = item / nt, t = item % nt, c0 = t * kTile, cn = std::min(kTile, C - c0);
      const float* __restrict tp = TL + item * d * kTile;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r0 = 0; r0 < R; r0 += kRows) {
          const int64_t rows = std::min(kRows, R - r0);
          const float* qb = Q + ((b * H + h) * R + r0) * d;
          float acc[kRows][kTile] = {};
          for (int64_t i = 0; i < d; ++i) {
            const float* __restrict col = tp + i * kTile;
            for (int64_t rr = 0; rr < rows; ++rr) {
              const float qv = qb[rr * d + i];
#pragma omp simd
              for (int64_t l = 0; l < kTile; ++l) acc[rr][l] += qv * col[l];
            }
          }
          for (int64_t rr = 0; rr < rows; ++rr) {
            const int64_t r = r0 + rr;  // rows ascend, so g = 0 writes an output row before any other g
            float* o = O + ((b * H + h) * Ro + r % Ro) * C + c0;
            if (r < Ro)
              for (int64_t l = 0; l < cn; ++l) o[l] = acc[rr][l];
            else
              for (int64_t l = 0; l < cn; ++l) o[l] = std::max(o[l], acc[rr][l]);
          }
        }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Kernel: k-means++ seeding (calibration)
// ---------------------------------------------------------------------------------------------------

// The k sequential draws of k-means++ over each point set: pick (G, k) int64 sample indices, given the first
// pick (G,) and the uniform draws u (G, k - 1) float64. Each draw is the first point whose running sum of
// squared distances to the picks so far reaches u * the total (float64 sums), as a2ats.core.kmeans's loop does;
// in torch that loop is ~10 small ops per draw, 4 s a layer in dispatch alone, here ~0.2 s.
torch::Tensor kmeans_pp_picks(torch::Tensor pts, torch::Tensor first, torch::Tensor u) {
  TORCH_CHECK(pts.dim() == 3 && pts.scalar_type() == torch::kFloat32, "pts must be float32 (G, S, d)");
  TORCH_CHECK(first.dim() == 1 && first.scalar_type() == torch::kInt64 && first.size(0) == pts.size(0),
              "first must be int64 (G,)");
  TORCH_CHECK(u.dim() == 2 && u.scalar_type() == torch::kFloat64 && u.size(0) == pts.size(0), "u must be float64 (G, k - 1)");
  pts = pts.contiguous();
  u = u.contiguous();
  const int64_t G = pts.size(0), S = pts.size(1), d = pts.size(2), k = u.size(1) + 1;
  TORCH_CHECK(S > 0, "no points to seed from");
  auto out = torch::empty({G, k}, torch::kInt64);
  int64_t* O = out.data_ptr<int64_t>();
  std::vector<float> norms(S), mind(S);
  std::vector<double> cdf(S);
  for (int64_t g = 0; g < G; ++g) {
    const float* P = pts.data_ptr<float>() + g * S * d;
    const double* U = u.data_ptr<double>() + g * (k - 1);
    for (int64_t i = 0; i < S; ++i) {
      float acc = 0.f;
      for (int64_t e = 0; e < d; ++e) acc += P[i * d + e] * P[i * d + e];
      norms[i] = acc;
    }
    // mind = min(mind, |p - c|^2) for the new pick c, as norms - 2 p.c + |c|^2 clamped at 0 (the torch loop's form)
    auto update = [&](int64_t pick, bool init) {
      const float* __restrict c = P + pick * d;
      const float cn = norms[pick];
      at::parallel_for(0, S, 4096, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const float* __restrict p = P + i * d;
          float part[16] = {};  // 16 independent sums: one vector FMA per 16 dims, no serial chain
          int64_t e = 0;
          for (; e + 16 <= d; e += 16)
            for (int l = 0; l < 16; ++l) part[l] += p[e + l] * c[e + l];
          for (; e < d; ++e) part[e % 16] += p[e] * c[e];
          float dot = 0.f;
          for (int l = 0; l < 16; ++l) dot += part[l];
          const float dist = std::max(norms[i] - 2.f * dot + cn, 0.f);
          mind[i] = init ? dist : std::min(mind[i], dist);
        }
      });
    };
    int64_t pick = first.data_ptr<int64_t>()[g];
    TORCH_CHECK(pick >= 0 && pick < S, "first pick out of range");
    O[g * k] = pick;
    update(pick, true);
    for (int64_t j = 1; j < k; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < S; ++i) cdf[i] = (acc += mind[i]);
      const double target = U[j - 1] * acc;
      pick = std::min<int64_t>(std::lower_bound(cdf.begin(), cdf.end(), target) - cdf.begin(), S - 1);
      O[g * k + j] = pick;
      update(pick, false);
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("score", &score, "LUT scores (B, Hkv*G, n)");
  m.def("score_select", &score_select, "LUT scoring + union top-K selection -> (idx, count)");
  m.def("sparse_attention", &sparse_attention, "attention over selected rows", py::arg("q"), py::arg("k_buf"),
        py::arg("v_buf"), py::arg("idx"), py::arg("count"), py::arg("scaling"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("linear_bf16w", &linear_bf16w, "x @ w.T (+ bias) with bf16 weights, fp32 math");
  m.def("linear_int8w", &linear_int8w, "x @ w.T (+ bias) with int8 weights and a scale per output row, fp32 math");
  m.def("linear_int4w", &linear_int4w, "x @ w.T (+ bias) with 4-bit weights in groups of 32 (scale, min), fp32 math");
  m.def("tile_centroids", &tile_centroids, "centroids (H, C, d) -> tiles (H, ceil(C/16), d, 16)");
  m.def("lookup_tables", &lookup_tables, "q . centroids^T from tiles -> (B, H, R, C), or its max over groups",
        py::arg("q"), py::arg("tiles"), py::arg("C"), py::arg("groups") = 1);
  m.def("encode_nearest", &encode_nearest, "nearest centroid (argmax of z.t - half) -> int16 codes");
  m.def("kmeans_pp_picks", &kmeans_pp_picks, "k-means++ seeding: the sample index of each of k picks per point set");
}
