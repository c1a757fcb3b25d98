// CPU kernels for selection: lookup tables, LUT scoring and fused top-K (torch references: a2ats.kernels.reference).

#include "cpu_common.h"

using a2ats::prefetch_row;
using a2ats::to_f;

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

void register_selection(pybind11::module_& m) {
  m.def("score", &score, "LUT scores (B, Hkv*G, n)");
  m.def("score_select", &score_select, "LUT scoring + union top-K selection -> (idx, count)");
  m.def("tile_centroids", &tile_centroids, "centroids (H, C, d) -> tiles (H, ceil(C/16), d, 16)");
  m.def("lookup_tables", &lookup_tables, "q . centroids^T from tiles -> (B, H, R, C), or its max over groups",
        py::arg("q"), py::arg("tiles"), py::arg("C"), py::arg("groups") = 1);
}
