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
  r.always.assign(B * n, 0);
  r.cand.assign(B * n, 0);
  r.m.assign(B, 0);
  r.n_always.assign(B, 0);
  auto vb = valid.accessor<bool, 2>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t length = 0;
    for (int64_t j = 0; j < n; ++j) length += vb[b][j] ? 1 : 0;
    int64_t rank = 0, m = 0, na = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (!vb[b][j]) continue;
      const bool keep = rank < sinks || rank >= length - window;
      ++rank;
      if (keep) {
        r.always[b * n + j] = 1;
        ++na;
      } else {
        r.cand[b * n + m++] = static_cast<int32_t>(j);
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

// Radix refinement of a threshold: `buf` holds the keys that share the already fixed high bits
// (above `shift + bits`); histogram the next `bits`, keep the boundary bucket, repeat down to bit 0.
// Returns the k-th largest key; `need` ends as how many keys equal to it make the top k.
inline uint32_t refine(std::vector<uint32_t>& buf, uint32_t prefix, int shift, int64_t& need) {
  uint32_t hist[2048];
  while (shift > 0) {
    const int bits = std::min(shift, 11);
    shift -= bits;
    const uint32_t nb = 1u << bits, mask = nb - 1;
    std::memset(hist, 0, sizeof(uint32_t) * nb);
    for (uint32_t key : buf) ++hist[(key >> shift) & mask];
    const uint32_t bin = top_bucket(hist, nb, need);
    prefix |= bin << shift;
    size_t w = 0;
    for (size_t i = 0; i < buf.size(); ++i)
      if (((buf[i] >> shift) & mask) == bin) buf[w++] = buf[i];
    buf.resize(w);
  }
  return prefix;
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

// Union-reduction selection (see a2ats.selection.select): returns (idx (B, Hkv, L) int32, ascending
// in the first count entries, -1 after; count (B, Hkv) int32).
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

  // One byte mask per query head row: rows run in parallel without sharing writes; the union over
  // the group is taken afterwards per KV head.
  auto chosen = torch::empty({B * H * G, n}, torch::kUInt8);
  uint8_t* M = chosen.data_ptr<uint8_t>();
  const float* Lp = lut.data_ptr<float>();
  const int16_t* C = codes.data_ptr<int16_t>();
  const int32_t* O = offsets.has_value() ? offsets->data_ptr<int32_t>() : nullptr;
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1);

  at::parallel_for(0, B * H * G, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys, buf, hist;
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
      const int16_t* crow = C + b * cs0 + h * cs1;
      const int32_t* orow = O ? O + b * n : nullptr;
      keys.resize(m);
      // First radix histogram: 16 bits (sign, exponent, 7 mantissa bits) for long rows, since float
      // scores crowd into few exponents and a coarser one would pile increments onto a handful of
      // counters; 11 bits for short rows, where clearing 64K counters would dominate.
      const int hbits = m >= 8192 ? 16 : 11, shift = 32 - hbits;
      hist.assign(size_t(1) << hbits, 0);
      uint32_t* __restrict kp = keys.data();
      const int32_t* __restrict cp = cand;
      const int16_t* __restrict cr = crow;
      int32_t bad = 0;
      // A gather per token, written branch-free (offsets or not, bounds as a flag instead of a throw)
      // so that it vectorizes; the histogram, which does not, is a separate loop.
      if (orow) {
        const int32_t* __restrict orr = orow;
#pragma omp simd reduction(| : bad)
        for (int64_t i = 0; i < m; ++i) {
          const int32_t e = static_cast<int32_t>(cr[cp[i]]) + orr[cp[i]];
          const int32_t out = static_cast<uint32_t>(e) >= static_cast<uint32_t>(T);
          bad |= out;
          kp[i] = order_key(lrow[out ? 0 : e]);
        }
      } else {
#pragma omp simd reduction(| : bad)
        for (int64_t i = 0; i < m; ++i) {
          const int32_t e = cr[cp[i]];
          const int32_t out = static_cast<uint32_t>(e) >= static_cast<uint32_t>(T);
          bad |= out;
          kp[i] = order_key(lrow[out ? 0 : e]);
        }
      }
      uint32_t* hp = hist.data();
      for (int64_t i = 0; i < m; ++i) ++hp[kp[i] >> shift];
      TORCH_CHECK(!bad, "code + offset outside the lookup table of ", T, " entries");
      int64_t take_equal = kk;
      const uint32_t b1 = top_bucket(hist.data(), hist.size(), take_equal);
      buf.clear();
      for (int64_t i = 0; i < m; ++i)
        if ((keys[i] >> shift) == b1) buf.push_back(keys[i]);
      const uint32_t thr = refine(buf, b1 << shift, shift, take_equal);
      // Backward scan: ties at the threshold go to the latest candidates, as the reference's
      // (score, rank among candidates) order does.
      for (int64_t i = m - 1; i >= 0; --i) {
        const uint32_t key = keys[i];
        if (key > thr) {
          mrow[cand[i]] = 1;
        } else if (key == thr && take_equal > 0) {
          mrow[cand[i]] = 1;
          --take_equal;
        }
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
      for (int64_t j = 0; j < n; ++j)
        if (any[j]) out[c++] = static_cast<int32_t>(j);
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
inline float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes (c10's conversion may not).
  uint16_t raw;
  std::memcpy(&raw, &x, 2);
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename TK, typename TV>
void attend_impl(const float* Q, const TK* K, const TV* V, const int32_t* I, const int32_t* N, int64_t B, int64_t H,
                 int64_t G, int64_t d, int64_t L, int64_t cap, const int64_t* ks, const int64_t* vs, float scaling,
                 float* out) {
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
    std::vector<float> s(kChunk * G);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t bh = owner[it], b = bh / H, h = bh % H;
      const int64_t start = (it - first[bh]) * kChunk, rows = std::min<int64_t>(kChunk, N[bh] - start);
      const int32_t* rowidx = I + bh * L + start;
      const TK* kbase = K + b * ks[0] + h * ks[1];
      const TV* vbase = V + b * vs[0] + h * vs[1];
      const float* qg = Q + (b * H + h) * G * d;  // the group's G query heads, contiguous
      // Pass 1: each K row is read once and dotted with all G queries.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = rowidx[r];
        TORCH_CHECK(t >= 0 && t < cap, "selected index ", t, " outside the cache of ", cap, " rows");
        // Gathered rows defeat the hardware prefetcher: ask for a row a few iterations ahead.
        if (r + kAhead < rows) prefetch_row(kbase + static_cast<int64_t>(rowidx[r + kAhead]) * ks[2], d);
        const TK* krow = kbase + t * ks[2];
        for (int64_t g = 0; g < G; ++g) {
          const float* q = qg + g * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < d; ++i) acc += q[i] * to_f(krow[i]);
          s[g * kChunk + r] = acc * scaling;
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
        const TV* vrow = vbase + static_cast<int64_t>(rowidx[r]) * vs[2];
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * kChunk + r];
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
                int64_t B, int64_t H, int64_t G, int64_t d, int64_t L, float scaling, float* out) {
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t cap = std::min(k.size(2), v.size(2));
  if (v.scalar_type() == torch::kBFloat16)
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<c10::BFloat16>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out);
  else
    attend_impl(Q, k.data_ptr<TK>(), v.data_ptr<float>(), I, N, B, H, G, d, L, cap, ks, vs, scaling, out);
}

}  // namespace

// Softmax attention of q (B, Hq, d) over rows idx[b, h // G, :count] of k_buf/v_buf (B, Hkv, cap, d).
torch::Tensor sparse_attention(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf, torch::Tensor idx,
                               torch::Tensor count, double scaling) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 4 && v_buf.dim() == 4, "q must be (B, Hq, d), k/v (B, Hkv, cap, d)");
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), H = k_buf.size(1);
  TORCH_CHECK(H > 0 && Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_buf.size(0) == B && v_buf.size(0) == B && v_buf.size(1) == H && k_buf.size(3) == d && v_buf.size(3) == d,
              "k/v shapes disagree with q");
  TORCH_CHECK(k_buf.stride(3) == 1 && v_buf.stride(3) == 1, "k/v rows must be contiguous (unit stride on d)");
  for (const auto& t : {k_buf, v_buf})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, "k/v must be float32 or bfloat16");
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
                              static_cast<float>(scaling), out.data_ptr<float>());
  else
    dispatch_v<float>(qf.data_ptr<float>(), k_buf, v_buf, idx.data_ptr<int32_t>(), N, B, H, G, d, L,
                      static_cast<float>(scaling), out.data_ptr<float>());
  return out.to(q.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("score", &score, "LUT scores (B, Hkv*G, n)");
  m.def("score_select", &score_select, "LUT scoring + union top-K selection -> (idx, count)");
  m.def("sparse_attention", &sparse_attention, "attention over selected rows");
}
