// CPU kernels for selection: lookup tables, LUT scoring and fused top-K (torch references: a2ats.kernels.reference).

#include "cpu_common.h"

#include <array>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

using a2ats::prefetch_row;
using a2ats::grown;
using a2ats::to_f;
#if defined(__AVX512F__)
using a2ats::load16;
using a2ats::sum16;
using a2ats::sum16_head_major;
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

// Buffers of the calling thread, kept between calls: allocated afresh, these (up to MiBs at long contexts) were
// new pages on every call, whose faults cost more than the selection itself.
struct Scratch {
  std::vector<uint8_t> always;  // row_info's
  std::vector<int32_t> cand;
  std::vector<int32_t> counts;  // all zero between calls: a call clears what it counted
  std::vector<int32_t> used;
  std::vector<uint8_t> bands;
  std::vector<uint32_t> keys, weights;
  std::vector<float> tables;
  std::vector<uint8_t> any, mrow;  // select_rows' (each worker thread its own)
  std::vector<int32_t> eq;
  std::vector<uint32_t> w;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}


// Per row b: which tokens are always kept (first `sinks` / last `window` valid ones) and the list of
// candidates (valid and not always kept), ascending. Mirrors selection.always_kept.
struct RowInfo {
  uint8_t* always = nullptr;     // (B, n), in the calling thread's scratch
  int32_t* cand = nullptr;       // (B, n): first m[b] entries used
  std::vector<int64_t> m;        // candidates per row
  std::vector<int64_t> n_always; // always-kept per row
};

RowInfo row_info(const at::Tensor& valid, int64_t sinks, int64_t window) {
  const int64_t B = valid.size(0), n = valid.size(1);
  RowInfo r;
  r.always = grown(scratch().always, B * n);  // every slot a row uses is written below
  r.cand = grown(scratch().cand, B * n);
  r.m.assign(B, 0);
  r.n_always.assign(B, 0);
  const bool* V = valid.data_ptr<bool>();  // contiguous (the caller makes it so)
  for (int64_t b = 0; b < B; ++b) {
    const bool* vb = V + b * n;
    uint8_t* al = r.always + b * n;
    int32_t* cd = r.cand + b * n;
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

void check_score_inputs(const at::Tensor& lut, const at::Tensor& codes, const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(lut.dim() == 4 && lut.scalar_type() == at::kFloat && lut.is_contiguous(),
              "lut must be a contiguous float32 (B, Hkv, G, T) tensor");
  TORCH_CHECK(lut.size(3) < (int64_t(1) << 31), "lookup table too long for int32 entry indices");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kShort && codes.stride(2) == 1,
              "codes must be int16 (B, Hkv, n) with unit stride along tokens");
  TORCH_CHECK(codes.size(0) == lut.size(0) && codes.size(1) == lut.size(1), "codes and lut disagree on (B, Hkv)");
  if (offsets.has_value()) {
    const auto& o = *offsets;
    TORCH_CHECK(o.dim() == 2 && o.scalar_type() == at::kInt && o.is_contiguous() && o.size(0) == codes.size(0) &&
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
at::Tensor score(at::Tensor lut, at::Tensor codes, std::optional<at::Tensor> offsets) {
  check_score_inputs(lut, codes, offsets);
  const int64_t B = lut.size(0), H = lut.size(1), G = lut.size(2), T = lut.size(3), n = codes.size(2);
  auto out = at::empty({B, H * G, n}, lut.options());
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

// ---------------------------------------------------------------------------------------------------
// Weighted radix select over table entries
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kSmall = 64;  // keys left at which a sort finishes the select (a radix pass costs its bins)

// The key of the `need`-th largest of u keys weighted by w; `need` ends as how many with exactly that key
// make the top.
inline uint32_t top_of_few(const uint32_t* keys, const uint32_t* w, int64_t u, int64_t& need) {
  std::pair<uint32_t, uint32_t> kw[kSmall];
  for (int64_t i = 0; i < u; ++i) kw[i] = {keys[i], w[i]};
  std::sort(kw, kw + u, [](const auto& a, const auto& b) { return a.first > b.first; });
  int64_t above = 0;
  for (int64_t i = 0; i < u;) {
    const uint32_t key = kw[i].first;
    int64_t same = 0;
    for (; i < u && kw[i].first == key; ++i) same += kw[i].second;
    if (above + same >= need) {
      need -= above;
      return key;
    }
    above += same;
  }
  return kw[u - 1].first;  // unreachable while need <= the total weight
}

// Radix selection over table entries weighted by how many candidates carry them: the u `keys` (entry keys,
// reordered and overwritten) share the bits above `shift` (given in `prefix`); returns the key of the
// `need`-th largest candidate, and `need` ends as how many candidates with exactly that key make the top.
inline uint32_t refine_weighted(uint32_t* keys, uint32_t* w, int64_t u, uint32_t prefix, int shift, int64_t& need) {
  uint32_t hist[2048];
  while (shift > 0) {
    if (u <= kSmall) return top_of_few(keys, w, u, need);
    const int bits = std::min(shift, 11);
    shift -= bits;
    const uint32_t nb = 1u << bits, mask = nb - 1;
    std::memset(hist, 0, sizeof(uint32_t) * nb);
    for (int64_t i = 0; i < u; ++i) hist[(keys[i] >> shift) & mask] += w[i];
    const uint32_t bin = top_bucket(hist, nb, need);
    prefix |= bin << shift;
    int64_t o = 0;
    for (int64_t i = 0; i < u; ++i) {  // branch-free: the bin's share of keys is data (up to most of them)
      const uint32_t key = keys[i], wi = w[i];
      keys[o] = key;
      w[o] = wi;
      o += ((key >> shift) & mask) == bin;
    }
    u = o;
  }
  return prefix;
}

// ---------------------------------------------------------------------------------------------------
// The entries in use
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kBlock = 16;  // codes per block of the listing

// A selection's inputs other than the entry values: each row's candidates and budget, and per (b, KV head)
// how many candidates carry each table entry and which entries those are. A row's radix select then reads
// only those entries, never the whole table, which banded WRoPE makes larger than the context (bands x C).
struct Entries {
  int64_t B = 0, H = 0, C = 0, bands = 0, T = 0, n = 0, Gr = 0;
  RowInfo info;
  std::vector<int64_t> keff;  // k per row, capped at its candidates
  const int16_t* codes = nullptr;
  const int32_t* offsets = nullptr;
  int64_t cs0 = 0, cs1 = 0;
  int32_t* counts = nullptr;  // (B*H, T): candidates per entry while counting (zero again once listed)
  int64_t cap = 0;            // room per (b, h) in the arrays below: at least its entries in use, plus a block
  int32_t* used = nullptr;    // (B*H, cap): per (b, h) its u[bh] entries in use (order: list_entries)
  uint8_t* band = nullptr;    // (B*H, cap): their bands (entry / C)
  std::vector<int64_t> u;
  uint32_t* keys = nullptr;     // (B*H, Gr, cap): each used entry's key in each row, once values are in
  uint32_t* weights = nullptr;  // (B*H, cap): each used entry's count of candidates (listed with it)
  // With a dense path (count_entries' `dense_cost`): per (b, h) the bands whose every entry is computed at once
  // (dense, (B*H, bands)), whose used entries are listed last, from rows[bh] on; the others' first.
  std::vector<uint8_t> dense;
  std::vector<int64_t> rows;

  bool ranked(int64_t b) const { return keff[b] > 0 && keff[b] < info.m[b]; }
  bool contiguous(int64_t b) const {
    const int32_t* cand = info.cand + b * n;
    return cand[info.m[b] - 1] - cand[0] == info.m[b] - 1;
  }
  const int16_t* code_row(int64_t bh) const { return codes + (bh / H) * cs0 + (bh % H) * cs1; }
  const int32_t* offset_row(int64_t b) const { return offsets ? offsets + b * n : nullptr; }

  Entries() = default;
  Entries(const Entries&) = delete;
};

// Writes to `list` / `bands_of` / `weights` the entries band * C + code with cnt > 0 and their counts, and
// zeroes `cnt` for the next call: codes in blocks of 16 ascending, within a block band by band (returns how
// many). A code's centroid row is then read from memory once for all its bands (the block's rows stay in L1
// while its bands are listed) and rows are visited in address order. The three arrays need kBlock slots of
// slack (whole blocks are stored, the count advanced by the used ones).
// `dense` (bands flags, or null): those bands' entries are left out of that order and listed after it, band by
// band in code order; `rows` receives where they begin.
int64_t list_entries(int32_t* cnt, int64_t bands, int64_t C, int32_t* list, uint8_t* bands_of, uint32_t* weights,
                     const uint8_t* dense = nullptr, int64_t* rows = nullptr) {
  int64_t u = 0;
  auto take = [&](int64_t band, int64_t c0, int64_t cn) {
    int32_t* cb = cnt + band * C + c0;
    const int32_t first = static_cast<int32_t>(band * C + c0);
#if defined(__AVX512F__)
    if (cn == kBlock) {
      const __m512i v = _mm512_loadu_si512(cb);
      const __mmask16 used = _mm512_test_epi32_mask(v, v);
      if (!used) return;
      const __m512i e = _mm512_add_epi32(_mm512_set1_epi32(first),
                                         _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
      _mm512_storeu_si512(list + u, _mm512_maskz_compress_epi32(used, e));  // a register compress, then a store
      _mm512_storeu_si512(weights + u, _mm512_maskz_compress_epi32(used, v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bands_of + u), _mm_set1_epi8(static_cast<char>(band)));
      _mm512_storeu_si512(cb, _mm512_setzero_si512());
      u += __builtin_popcount(used);
      return;
    }
#endif
    // Branch-free: which entries are used is data, so a branch on each would mispredict.
    for (int64_t l = 0; l < cn; ++l) {
      list[u] = first + static_cast<int32_t>(l);
      bands_of[u] = static_cast<uint8_t>(band);
      weights[u] = static_cast<uint32_t>(cb[l]);
      u += cb[l] != 0;
      cb[l] = 0;
    }
  };
  for (int64_t c0 = 0; c0 < C; c0 += kBlock)
    for (int64_t band = 0; band < bands; ++band)
      if (!dense || !dense[band]) take(band, c0, std::min(kBlock, C - c0));
  if (rows) *rows = u;
  if (dense)
    for (int64_t band = 0; band < bands; ++band)
      if (dense[band])
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) take(band, c0, std::min(kBlock, C - c0));
  return u;
}

// Counts, per (b, KV head) with a ranked row, the candidates of each entry (code + offset, which must lie in
// [0, T = bands * C): the reference's gather would fail too), then lists the entries in use (list_entries).
// Gr: the rows per (b, h) whose keys the entries will hold.
// `dense_cost` > 0: a band whose entries in use number at least C / dense_cost is marked dense (Entries::dense):
// computing its C entries at once costs less than its used ones one by one.
std::unique_ptr<Entries> count_entries(const at::Tensor& codes, const std::optional<at::Tensor>& offsets,
                                       at::Tensor valid, at::Tensor k, int64_t bands, int64_t C, int64_t Gr,
                                       int64_t sinks, int64_t window, double dense_cost = 0.0) {
  TORCH_CHECK(bands >= 1 && bands <= 256 && C >= 1 && bands * C < (int64_t(1) << 31),
              "1 to 256 bands whose entries fit int32 indices");
  auto owned = std::make_unique<Entries>();
  Entries& en = *owned;
  en.B = codes.size(0);
  en.H = codes.size(1);
  en.n = codes.size(2);
  en.C = C;
  en.bands = bands;
  en.T = bands * C;
  en.Gr = Gr;
  const int64_t B = en.B, H = en.H, n = en.n, T = en.T;
  TORCH_CHECK(valid.dim() == 2 && valid.scalar_type() == at::kBool && valid.size(0) == B && valid.size(1) == n,
              "valid must be a bool (B, n) tensor");
  TORCH_CHECK(k.dim() == 1 && k.size(0) == B && k.scalar_type() == at::kLong, "k must be int64 (B,)");
  valid = valid.contiguous();
  k = k.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  en.info = row_info(valid, sinks, window);
  en.keff.resize(B);
  int64_t mmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    en.keff[b] = std::max<int64_t>(0, std::min<int64_t>(kp[b], en.info.m[b]));
    mmax = std::max(mmax, en.info.m[b]);
  }
  en.codes = codes.data_ptr<int16_t>();
  en.offsets = offsets.has_value() ? offsets->data_ptr<int32_t>() : nullptr;
  en.cs0 = codes.stride(0);
  en.cs1 = codes.stride(1);
  en.cap = std::min(mmax, T) + kBlock;
  Scratch& s = scratch();
  en.counts = grown(s.counts, B * H * T);
  en.used = grown(s.used, B * H * en.cap);
  en.band = grown(s.bands, B * H * en.cap);
  en.keys = grown(s.keys, B * H * Gr * en.cap);
  en.weights = grown(s.weights, B * H * en.cap);
  en.u.assign(B * H, 0);
  en.rows.assign(B * H, 0);
  if (dense_cost > 0) en.dense.assign(B * H * bands, 0);
  std::vector<uint8_t> bad(B * H, 0);
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H;
      if (!en.ranked(b)) continue;
      const int16_t* crow = en.code_row(bh);
      const int32_t* orow = en.offset_row(b);
      const int32_t* cand = en.info.cand + b * n;
      int32_t* cnt = en.counts + bh * T;
      const int64_t m = en.info.m[b], c0 = cand[0];
      uint32_t out = 0;
      // An entry outside the table is counted at 0 (so listed, and cleared after) and reported below.
      auto add = [&](int64_t j) {
        const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(crow[j]) + (orow ? orow[j] : 0));
        const uint32_t o = e >= static_cast<uint64_t>(T);
        out |= o;
        ++cnt[o ? 0 : e];
      };
      if (en.contiguous(b)) {
        int64_t j = c0;
#if defined(__AVX512F__)
        // 16 entries at a time computed and checked as vectors; only the increments are scalar
        alignas(64) int32_t eb[16];
        const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(T));
        __mmask16 outside = 0;
        for (; j + 16 <= c0 + m; j += 16) {
          __m512i e = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(crow + j)));
          if (orow) e = _mm512_add_epi32(e, _mm512_loadu_si512(orow + j));
          const __mmask16 o = _mm512_cmpge_epu32_mask(e, tv);
          outside |= o;
          _mm512_store_si512(eb, _mm512_mask_mov_epi32(e, o, _mm512_setzero_si512()));
#pragma GCC unroll 16
          for (int l = 0; l < 16; ++l) ++cnt[eb[l]];
        }
        out |= outside != 0;
#endif
        for (; j < c0 + m; ++j) add(j);
      } else {
        for (int64_t i = 0; i < m; ++i) add(cand[i]);
      }
      bad[bh] = out != 0;
      uint8_t* dense = nullptr;
      if (dense_cost > 0) {
        dense = en.dense.data() + bh * bands;
        for (int64_t band = 0; band < bands; ++band) {
          int32_t used = 0;  // 32-bit lanes: twice the counts per vector of 64-bit ones
          const int32_t* cb = cnt + band * C;
#pragma omp simd reduction(+ : used)
          for (int64_t c = 0; c < C; ++c) used += cb[c] != 0;
          dense[band] = static_cast<double>(used) * dense_cost >= static_cast<double>(C);
        }
      }
      en.u[bh] = list_entries(cnt, bands, C, en.used + bh * en.cap, en.band + bh * en.cap, en.weights + bh * en.cap,
                              dense, &en.rows[bh]);
    }
  });
  for (int64_t bh = 0; bh < B * H; ++bh)
    TORCH_CHECK(!bad[bh], "code + offset outside the lookup table of ", T, " entries");
  return owned;
}

// ---------------------------------------------------------------------------------------------------
// Selection from the entries' values
// ---------------------------------------------------------------------------------------------------

// Marks, in `mrow`, the candidates (i < m: slot cand[i], or cand[0] + i when CONTIG, a row without padding)
// whose key is above `thr`, and lists in `eq` (ascending, returned count) those whose key equals it.
template <bool CONTIG, bool OFFS>
int64_t mark_row(uint8_t* __restrict mrow, const float* __restrict lrow, const int16_t* __restrict crow,
                 const int32_t* __restrict orow, const int32_t* __restrict cand, int64_t m, uint32_t thr,
                 int32_t* __restrict eq) {
  const int64_t c0 = cand[0];
  int64_t i = 0, ne = 0;
#if defined(__AVX512F__)
  if (CONTIG) {  // 16 candidates at a time: a gather of their entries' values, keys compared in registers
    const __m512i t = _mm512_set1_epi32(static_cast<int32_t>(thr)), top = _mm512_set1_epi32(INT32_MIN);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; i < m; i += 16) {
      const __mmask16 in = m - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (m - i)) - 1);
      __m512i e = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(in, crow + c0 + i));
      if (OFFS) e = _mm512_add_epi32(e, _mm512_maskz_loadu_epi32(in, orow + c0 + i));
      const __m512i bits = _mm512_castps_si512(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, e, lrow, 4));
      const __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), top));  // order_key
      const __mmask16 gt = _mm512_mask_cmpgt_epu32_mask(in, key, t), same = _mm512_mask_cmpeq_epi32_mask(in, key, t);
      _mm_mask_storeu_epi8(mrow + c0 + i, in, _mm_maskz_mov_epi8(gt, _mm_set1_epi8(1)));
      if (same) {
        _mm512_storeu_si512(eq + ne, _mm512_maskz_compress_epi32(same, _mm512_add_epi32(iota, _mm512_set1_epi32(i))));
        ne += __builtin_popcount(same);
      }
    }
    return ne;
  }
#endif
  for (; i < m; ++i) {
    const int64_t j = CONTIG ? c0 + i : cand[i];
    const uint32_t key = order_key(lrow[static_cast<int32_t>(crow[j]) + (OFFS ? orow[j] : 0)]);
    mrow[j] = key > thr;
    eq[ne] = static_cast<int32_t>(i);
    ne += key == thr;
  }
  return ne;
}

// The slots j < n with keep[j] != 0, ascending, into out (room for `cap`, at least their count); returns how many.
inline int64_t compact(const uint8_t* __restrict keep, int64_t n, int32_t* __restrict out, int64_t cap) {
  int64_t c = 0, j = 0;
#if defined(__AVX512F__)
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (; j + 16 <= n; j += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + j));
    const __mmask16 k = _mm_test_epi8_mask(v, v);
    const int pc = __builtin_popcount(k);
    // a register compress and a store of its first pc lanes (a compress straight to memory is slow on some CPUs)
    _mm512_mask_storeu_epi32(out + c, static_cast<__mmask16>((1u << pc) - 1),
                             _mm512_maskz_compress_epi32(k, _mm512_add_epi32(iota, _mm512_set1_epi32(j))));
    c += pc;
  }
#endif
  // Branch-free: kept slots are scattered, so a branch on each would mispredict. Every slot is written at the
  // current count and kept by advancing it; out[count] may be left holding an unkept one (the caller resets it).
  for (; j < n; ++j) {
    if (c < cap) out[c] = static_cast<int32_t>(j);
    c += keep[j] != 0;
  }
  return c;
}

// Union-reduction selection over the en.Gr rows per (b, KV head) whose entry values are `tables`
// (B*H*Gr, T) and keys en.keys (only the entries in use are read): (idx (B, Hkv, L) int32, ascending in the
// first count entries, -1 after; count (B, Hkv) int32).
//
// A token's score is its entry's, so the top-K of a row is a weighted radix select over the entries in use
// (weights: how many candidates carry each); one vectorized pass over the tokens then marks those above the
// threshold and lists those equal to it, of which the latest make up the rest of the K, as the reference's
// (score, rank) order has it.
std::vector<at::Tensor> select_rows(const Entries& en, const float* tables) {
  const int64_t B = en.B, H = en.H, T = en.T, n = en.n, Gr = en.Gr;
  const RowInfo& info = en.info;
  int64_t L = 0;
  for (int64_t b = 0; b < B; ++b) L = std::max(L, info.n_always[b] + std::min(Gr * en.keff[b], info.m[b]));
  auto idx = at::full({B, H, L}, -1, at::kInt);
  auto count = at::zeros({B, H}, at::kInt);
  int32_t* I = idx.data_ptr<int32_t>();
  int32_t* N = count.data_ptr<int32_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    Scratch& ts = scratch();  // this worker's buffers: no pages to fault in, nothing to zero
    uint32_t* w = grown(ts.w, en.cap);
    uint8_t* any = grown(ts.any, n);
    uint8_t* mrow = grown(ts.mrow, n);
    int32_t* eq = grown(ts.eq, n + 16);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, m = info.m[b], kk = en.keff[b];
      const int32_t* cand = info.cand + b * n;
      std::memcpy(any, info.always + b * n, n);
      if (kk == m) {  // every candidate fits: no ranking needed
        for (int64_t i = 0; i < m; ++i) any[cand[i]] = 1;
      } else if (kk > 0) {
        const int64_t u = en.u[bh];
        const int16_t* crow = en.code_row(bh);
        const int32_t* orow = en.offset_row(b);
        const bool contig = en.contiguous(b);
        for (int64_t g = 0; g < Gr; ++g) {
          const float* lrow = tables + (bh * Gr + g) * T;
          uint32_t* ek = en.keys + (bh * Gr + g) * en.cap;  // consumed by the select: one row, one select
          uint32_t kmin = 0xFFFFFFFFu, kmax = 0;
          for (int64_t i = 0; i < u; ++i) {
            kmin = std::min(kmin, ek[i]);
            kmax = std::max(kmax, ek[i]);
          }
          int64_t take = kk;
          uint32_t thr = kmin;  // every key equal: the threshold is that key, ties decide
          if (kmin != kmax) {
            const int common = __builtin_clz(kmin ^ kmax);  // leading bits shared by every entry key
            const uint32_t fixed = common ? (kmin >> (32 - common)) << (32 - common) : 0u;
            std::memcpy(w, en.weights + bh * en.cap, u * sizeof(uint32_t));
            thr = refine_weighted(ek, w, u, fixed, 32 - common, take);
          }
          uint8_t* mr = Gr == 1 ? any : mrow;  // one row: marked straight into the union
          if (Gr > 1) std::memset(mr, 0, n);
          int64_t ne;
          if (contig) ne = orow ? mark_row<true, true>(mr, lrow, crow, orow, cand, m, thr, eq)
                                : mark_row<true, false>(mr, lrow, crow, orow, cand, m, thr, eq);
          else ne = orow ? mark_row<false, true>(mr, lrow, crow, orow, cand, m, thr, eq)
                         : mark_row<false, false>(mr, lrow, crow, orow, cand, m, thr, eq);
          for (int64_t i = ne - take; i < ne; ++i) mr[contig ? cand[0] + eq[i] : cand[eq[i]]] = 1;  // the latest ties
          if (Gr > 1) {
            uint8_t* __restrict a = any;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) a[j] |= mr[j];
          }
        }
      }
      const int64_t c = compact(any, n, I + bh * L, L);
      N[bh] = static_cast<int32_t>(c);
      if (c < L) I[bh * L + c] = -1;
    }
  });
  return {idx, count};
}

// Keys of the entries in use from full tables (B*H*Gr, T).
void keys_from_tables(const Entries& en, const float* tables) {
  at::parallel_for(0, en.B * en.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int32_t* list = en.used + bh * en.cap;
      for (int64_t g = 0; g < en.Gr; ++g) {
        const float* lrow = tables + (bh * en.Gr + g) * en.T;
        uint32_t* ek = en.keys + (bh * en.Gr + g) * en.cap;
        for (int64_t i = 0; i < en.u[bh]; ++i) ek[i] = order_key(lrow[list[i]]);
      }
    }
  });
}

}  // namespace

// Union-reduction selection from lookup tables (see a2ats.selection.select): lut (B, Hkv, G, T), a row per
// query head (G = 1: one table per KV head, the "max" reduction already taken); returns (idx, count) as
// select_rows does.
std::vector<at::Tensor> score_select(at::Tensor lut, at::Tensor codes, std::optional<at::Tensor> offsets,
                                        at::Tensor valid, at::Tensor k, int64_t sinks, int64_t window) {
  check_score_inputs(lut, codes, offsets);
  const auto en = count_entries(codes, offsets, valid, k, 1, lut.size(3), lut.size(2), sinks, window);
  keys_from_tables(*en, lut.data_ptr<float>());
  return select_rows(*en, lut.data_ptr<float>());
}

// ---------------------------------------------------------------------------------------------------
// Kernel 1b: score + select straight from the centroids
// ---------------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kEntriesPerItem = 256;  // entries per work item: splits a KV head's entries across threads
constexpr int64_t kEntryAhead = 16;       // entries of software prefetch distance (their rows are scattered)
constexpr int64_t kBatch = 16;            // entries whose sums are reduced together

#if defined(__AVX512F__)
// Dot products' 16-lane partial sums, reduced 16 at a time (sum16) into consecutive floats of `out`.
struct Sums16 {
  __m512 acc[kBatch];
  int64_t t = 0, o = 0;
  float* out;
  explicit Sums16(float* dst) : out(dst) {}
  void push(__m512 v) {
    acc[t++] = v;
    if (t == kBatch) {
      _mm512_storeu_ps(out + o, sum16(acc));
      o += kBatch;
      t = 0;
    }
  }
  void finish() {  // the last, partial batch
    if (t == 0) return;
    for (int64_t l = t; l < kBatch; ++l) acc[l] = _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out + o, static_cast<__mmask16>((1u << t) - 1), sum16(acc));
  }
};
#endif

#if defined(__AVX512BF16__)
// A query row (64 floats) as bf16 dot-product operands: q = hi + lo, each two vectors of 32 bf16 (dims 0-31,
// 32-63). hi + lo holds q to 16 bits, far below the bf16 centroids' own rounding, so a score from them is the
// fp32 dot product with the bf16 centroid up to fp32-sized rounding; a dot costs 4 bf16 dot-product
// instructions on the stored rows instead of widening each row and 4 fp32 multiply-adds per query.
struct SplitQ {
  __m512bh hi[2], lo[2];
};

inline SplitQ split_q64(const float* q) {
  SplitQ r;
  for (int h = 0; h < 2; ++h) {
    const __m512 a = _mm512_loadu_ps(q + 32 * h), b = _mm512_loadu_ps(q + 32 * h + 16);
    r.hi[h] = _mm512_cvtne2ps_pbh(b, a);  // lanes 0-15 from a (dims 32h..), 16-31 from b
    const __m512i wide = (__m512i)r.hi[h];
    // widen the 32 bf16 back to fp32 (a 16-bit shift) and round what is left
    const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(wide)), 16));
    const __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(wide, 1)), 16));
    r.lo[h] = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
  }
  return r;
}

// batch_dots (below) for bf16 centroid rows at d = 64, from split query rows qs[g * bands + band].
inline void batch_dots_bf16(const SplitQ* qs, int64_t bands, int64_t G, const c10::BFloat16* const* rows,
                            const uint8_t* band, int64_t n, float* __restrict out) {
  Sums16 sums(out);
  for (int64_t i = 0; i < n; ++i) {
    const __m512bh c0 = (__m512bh)_mm512_loadu_si512(rows[i]);
    const __m512bh c1 = (__m512bh)_mm512_loadu_si512(rows[i] + 32);
    const SplitQ* qi = qs + band[i];
    for (int64_t g = 0; g < G; ++g) {
      const SplitQ& qg = qi[g * bands];
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qg.lo[0], c0);
      a = _mm512_dpbf16_ps(a, qg.lo[1], c1);
      a = _mm512_dpbf16_ps(a, qg.hi[0], c0);
      sums.push(_mm512_dpbf16_ps(a, qg.hi[1], c1));
    }
  }
  sums.finish();
}
#endif

#if defined(__AVX512F__)
// out[i * G + g] = q_{g, band[i]} · rows[i] for n <= 16 entries (query head g's row of band b at
// q + (g * bands + b) * d): each centroid row is loaded once for the G query rows, each product's 16-lane
// partial sums are reduced 16 at a time (sum16).
template <int64_t D, typename CT>
inline void batch_dots(const float* __restrict q, int64_t bands, int64_t G, const CT* const* rows,
                       const uint8_t* band, int64_t n, int64_t dd, float* __restrict out) {
  const int64_t d = D ? D : dd;
  Sums16 sums(out);
  for (int64_t i = 0; i < n; ++i) {
    const CT* c = rows[i];
    const float* qi = q + band[i] * d;
    if (D == 64) {
      const __m512 c0 = load16(c), c1 = load16(c + 16), c2 = load16(c + 32), c3 = load16(c + 48);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qi + g * bands * d;
        sums.push(_mm512_add_ps(_mm512_fmadd_ps(_mm512_loadu_ps(qg + 16), c1, _mm512_mul_ps(_mm512_loadu_ps(qg), c0)),
                                _mm512_fmadd_ps(_mm512_loadu_ps(qg + 48), c3, _mm512_mul_ps(_mm512_loadu_ps(qg + 32), c2))));
      }
    } else {
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qi + g * bands * d;
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < d; k += 16) {
          const __mmask16 m = d - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - k)) - 1);
          a = _mm512_fmadd_ps(load16(qg + k, m), load16(c + k, m), a);
        }
        sums.push(a);
      }
    }
  }
  sums.finish();
}
#else
// The same sums, portably: 16 interleaved partial sums (vertical vector work on any ISA), then a fixed tree.
template <int64_t D, typename CT>
inline void batch_dots(const float* __restrict q, int64_t bands, int64_t G, const CT* const* rows,
                       const uint8_t* band, int64_t n, int64_t dd, float* __restrict out) {
  const int64_t d = D ? D : dd;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const float* __restrict qg = q + (g * bands + band[i]) * d;
      const CT* __restrict c = rows[i];
      float acc[16] = {};
      int64_t k = 0;
      for (; k + 16 <= d; k += 16)
#pragma omp simd
        for (int64_t l = 0; l < 16; ++l) acc[l] += qg[k + l] * to_f(c[k + l]);
      for (int64_t l = 0; k + l < d; ++l) acc[l] += qg[k + l] * to_f(c[k + l]);
      for (int64_t w = 8; w > 0; w /= 2)
        for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
      out[i * G + g] = acc[0];
    }
}
#endif

#if defined(__AVX512F__)
// A centroid row at d = 64 loaded once for its entry's G dots. fp32 rows (and bf16 rows without bf16 dot
// products, widened) dot fp32 query rows in 4 multiply-adds; bf16 rows dot split queries (SplitQ) in 4 bf16
// dot-product instructions.
struct WideRows {
  const float* q;  // (G * bands, 64): query head g's row for band b at (g * bands + b) * 64
  int64_t bands;
  struct Row {
    __m512 c[4];
  };
  template <typename CT>
  Row load(const CT* p) const {
    return {{load16(p), load16(p + 16), load16(p + 32), load16(p + 48)}};
  }
  __m512 dot(const Row& r, int64_t g, int64_t band) const {
    const float* qg = q + (g * bands + band) * 64;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), r.c[0]);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16), r.c[1], a);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 32), r.c[2], a);
    return _mm512_fmadd_ps(_mm512_loadu_ps(qg + 48), r.c[3], a);
  }
};
#if defined(__AVX512BF16__)
struct SplitRows {
  const SplitQ* qs;  // query head g's split row for band b at g * bands + b
  int64_t bands;
  struct Row {
    __m512bh c0, c1;
  };
  Row load(const c10::BFloat16* p) const {
    return {(__m512bh)_mm512_loadu_si512(p), (__m512bh)_mm512_loadu_si512(p + 32)};
  }
  __m512 dot(const Row& r, int64_t g, int64_t band) const {
    const SplitQ& qg = qs[g * bands + band];
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qg.lo[0], r.c0);
    a = _mm512_dpbf16_ps(a, qg.lo[1], r.c1);
    a = _mm512_dpbf16_ps(a, qg.hi[0], r.c0);
    return _mm512_dpbf16_ps(a, qg.hi[1], r.c1);
  }
};
// SplitRows for queries that bf16 holds exactly (every lo zero: the score_precision "bf16" queries): the same
// sums without the two products by zero.
struct HiRows : SplitRows {
  __m512 dot(const Row& r, int64_t g, int64_t band) const {
    const SplitQ& qg = qs[g * bands + band];
    return _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qg.hi[0], r.c0), qg.hi[1], r.c1);
  }
};

inline bool lo_is_zero(const SplitQ* qs, int64_t n) {
  __m512i any = _mm512_setzero_si512();
  for (int64_t r = 0; r < n; ++r)
    any = _mm512_or_si512(any, _mm512_or_si512((__m512i)qs[r].lo[0], (__m512i)qs[r].lo[1]));
  return _mm512_test_epi32_mask(any, any) == 0;
}
#endif

// The values and keys of used entries s .. s + n - 1 of (b, h) `bh` (n <= R = 16 / NG, NG = G query heads): one
// sum16 for their NG * R dots, head-major lanes, then vector work for all of them at once: the max over the
// group (a shift of R lanes per head), the order keys and the values scattered into the table. (One entry at a
// time, the scalar stores and the loop around them cost as much as the dots.)
template <int NG, typename Rows, typename CT>
inline void fill_batch(const Entries& en, const Rows& rows, const CT* ch, int64_t bh, int64_t s, int n,
                       float* tables) {
  constexpr int R = 16 / NG;
  const int64_t C = en.C, cap = en.cap, T = en.T;
  const int32_t* list = en.used + bh * cap + s;
  const uint8_t* band = en.band + bh * cap + s;
  __m512 part[16];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if (i < n) {
      const int64_t p = s + i;
      if (p + kEntryAhead < en.u[bh]) {
        const int64_t ahead = en.used[bh * cap + p + kEntryAhead] - en.band[bh * cap + p + kEntryAhead] * C;
        prefetch_row(ch + ahead * 64, 64);
      }
      const auto row = rows.load(ch + (list[i] - band[i] * C) * 64);
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) part[i * NG + g] = rows.dot(row, g, band[i]);
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) part[i * NG + g] = _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 16
  for (int p = NG * R; p < 16; ++p) part[p] = _mm512_setzero_ps();
  const __m512 v = sum16_head_major<NG>(part);  // lane g * R + i: head g, entry s + i
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 mk = static_cast<__mmask16>((1u << n) - 1);
  const __m512i e = _mm512_maskz_loadu_epi32(mk, list);
  auto keys = [](__m512 x) {  // order_key, 16 at a time
    const __m512i bits = _mm512_castps_si512(x);
    return _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(INT32_MIN)));
  };
  if (en.Gr == 1) {
    __m512 m = v;
#pragma GCC unroll 8
    for (int g = 1; g < NG; ++g)
      m = _mm512_max_ps(m, _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(g * R)), v));
    _mm512_mask_storeu_epi32(en.keys + bh * cap + s, mk, keys(m));
    _mm512_mask_i32scatter_ps(tables + bh * T, mk, e, m, 4);
  } else {
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const __m512 vg = g == 0 ? v : _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(g * R)), v);
      _mm512_mask_storeu_epi32(en.keys + (bh * NG + g) * cap + s, mk, keys(vg));
      _mm512_mask_i32scatter_ps(tables + (bh * NG + g) * T, mk, e, vg, 4);
    }
  }
}

template <int NG, typename Rows, typename CT>
inline void fill_run(const Entries& en, const Rows& rows, const CT* ch, int64_t bh, int64_t first, int64_t end,
                     float* tables) {
  constexpr int R = 16 / NG;
  int64_t s = first;
  for (; s + R <= end; s += R) fill_batch<NG>(en, rows, ch, bh, s, R, tables);
  if (s < end) fill_batch<NG>(en, rows, ch, bh, s, static_cast<int>(end - s), tables);
}

// fill_run for G = 1 .. 8 query heads per KV head (returns false for more: the caller's general loop takes them).
template <typename Rows, typename CT>
inline bool fill_run_g(int64_t G, const Entries& en, const Rows& rows, const CT* ch, int64_t bh, int64_t first,
                       int64_t end, float* tables) {
  switch (G) {
    case 1: fill_run<1>(en, rows, ch, bh, first, end, tables); return true;
    case 2: fill_run<2>(en, rows, ch, bh, first, end, tables); return true;
    case 3: fill_run<3>(en, rows, ch, bh, first, end, tables); return true;
    case 4: fill_run<4>(en, rows, ch, bh, first, end, tables); return true;
    case 5: fill_run<5>(en, rows, ch, bh, first, end, tables); return true;
    case 6: fill_run<6>(en, rows, ch, bh, first, end, tables); return true;
    case 7: fill_run<7>(en, rows, ch, bh, first, end, tables); return true;
    case 8: fill_run<8>(en, rows, ch, bh, first, end, tables); return true;
    default: return false;
  }
}
#endif

// Fills, for every entry in use, its value in `tables` (B*H*Gr, T) and its keys in `en`:
// q̃_{g,band} · centroid[code] per query head row, or their max over the group (Gr = 1). Entries are computed
// once each, straight from the centroid rows, so a band with few tokens costs what its tokens use, not C dot
// products per head.
template <int64_t D, typename CT>
void fill_entries(const Entries& en, const float* Q, int64_t R, int64_t G, const CT* cent, int64_t d, float* tables) {
  const int64_t H = en.H, T = en.T, C = en.C, bands = en.bands, Gr = en.Gr;
  std::vector<std::array<int64_t, 3>> items;  // (bh, first, end) of a run of used[bh]
  for (int64_t bh = 0; bh < en.B * H; ++bh) {
    for (int64_t s = 0; s < en.rows[bh]; s += kEntriesPerItem)
      items.push_back({bh, s, std::min(en.rows[bh], s + kEntriesPerItem)});
    // the dense bands' entries (from rows[bh] on): their values are fill_dense's, their keys read them here
    for (int64_t s = en.rows[bh]; s < en.u[bh]; s += kEntriesPerItem)
      items.push_back({bh, s, std::min(en.u[bh], s + kEntriesPerItem)});
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> dots(kBatch * G);
    const CT* rows[kBatch];
#if defined(__AVX512BF16__)
    constexpr bool kSplit = D == 64 && std::is_same_v<CT, c10::BFloat16>;
    std::vector<SplitQ> qs(kSplit ? R : 0);
    int64_t split_for = -1;  // the KV head whose queries qs holds
    bool hi_only = false;    // ... and whether bf16 holds them exactly
#endif
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t bh = items[it][0], first = items[it][1], end = items[it][2];
      if (first >= en.rows[bh]) {  // a dense band's entries: their keys from the values fill_dense stored
        const int32_t* list = en.used + bh * en.cap;
        for (int64_t g = 0; g < Gr; ++g) {
          const float* lrow = tables + (bh * Gr + g) * T;
          uint32_t* ek = en.keys + (bh * Gr + g) * en.cap;
          for (int64_t i = first; i < end; ++i) ek[i] = order_key(lrow[list[i]]);
        }
        continue;
      }
      const float* qb = Q + bh * R * d;
#if defined(__AVX512BF16__)
      if (kSplit && split_for != bh) {
        for (int64_t r = 0; r < R; ++r) qs[r] = split_q64(qb + r * 64);
        split_for = bh;
        hi_only = lo_is_zero(qs.data(), R);
      }
#endif
      const CT* ch = cent + (bh % H) * C * d;
#if defined(__AVX512F__)
      if constexpr (D == 64) {
#if defined(__AVX512BF16__)
        if constexpr (kSplit) {
          if (hi_only ? fill_run_g(G, en, HiRows{{qs.data(), bands}}, ch, bh, first, end, tables)
                      : fill_run_g(G, en, SplitRows{qs.data(), bands}, ch, bh, first, end, tables))
            continue;
        } else
#endif
        if (fill_run_g(G, en, WideRows{qb, bands}, ch, bh, first, end, tables)) continue;
      }
#endif
      const int32_t* list = en.used + bh * en.cap;
      const uint8_t* band = en.band + bh * en.cap;
      auto row = [&](int64_t i) { return ch + (list[i] - band[i] * C) * d; };
      for (int64_t s = first; s < end; s += kBatch) {
        const int64_t nb = std::min(kBatch, end - s);
        for (int64_t i = s; i < s + nb; ++i) {
          rows[i - s] = row(i);
          if (i + kEntryAhead < en.u[bh]) prefetch_row(row(i + kEntryAhead), d);
        }
#if defined(__AVX512BF16__)
        if constexpr (kSplit) batch_dots_bf16(qs.data(), bands, G, rows, band + s, nb, dots.data());
        else
#endif
          batch_dots<D>(qb, bands, G, rows, band + s, nb, d, dots.data());
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t p = s + i, e = list[p];
          const float* v = dots.data() + i * G;
          if (Gr == 1) {
            float m = v[0];
            for (int64_t g = 1; g < G; ++g) m = std::max(m, v[g]);
            tables[bh * T + e] = m;
            en.keys[bh * en.cap + p] = order_key(m);
          } else {
            for (int64_t g = 0; g < G; ++g) {
              tables[(bh * G + g) * T + e] = v[g];
              en.keys[(bh * G + g) * en.cap + p] = order_key(v[g]);
            }
          }
        }
      }
    }
  });
}

#if defined(__AVX512BF16__)
constexpr int64_t kTilesPerItem = 16;  // 16-code tiles per work item of fill_dense
constexpr double kDenseCost = 4;       // a band is computed whole once C / 4 of its entries are in use (measured)

// A query row (64 floats) as bf16 pairs: word p holds dims 2p (low half) and 2p + 1, as in a bf16 centroid row.
struct PairQ {
  alignas(64) uint32_t hi[32], lo[32];
};

// tile (32 x 16 words) = the transpose of 16 rows of 32 words at `rows` (rows from `cn` on: zeros): two 16 x 16
// transposes of 32-bit words, each in 64 shuffles (pairs of words, pairs of pairs, then 128-bit lanes twice).
inline void transpose_tile(const uint32_t* rows, int64_t cn, uint32_t* tile) {
  for (int half = 0; half < 2; ++half) {
    __m512i r[16], a[16], b[16];
    for (int l = 0; l < 16; ++l)
      r[l] = l < cn ? _mm512_loadu_si512(rows + l * 32 + half * 16) : _mm512_setzero_si512();
    for (int i = 0; i < 8; ++i) {
      a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // b[4i + j], 128-bit lane L: word 4L + j of rows 4i .. 4i + 3
      b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
      b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
      b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
      b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    uint32_t* out = tile + half * 16 * 16;
    for (int j = 0; j < 4; ++j) {
      const __m512i s0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), s1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
      const __m512i s2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44),
                    s3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
      _mm512_store_si512(out + (0 * 4 + j) * 16, _mm512_shuffle_i32x4(s0, s2, 0x88));
      _mm512_store_si512(out + (1 * 4 + j) * 16, _mm512_shuffle_i32x4(s0, s2, 0xDD));
      _mm512_store_si512(out + (2 * 4 + j) * 16, _mm512_shuffle_i32x4(s1, s3, 0x88));
      _mm512_store_si512(out + (3 * 4 + j) * 16, _mm512_shuffle_i32x4(s1, s3, 0xDD));
    }
  }
}

// The dense bands' entries (Entries::dense) of every (b, KV head) from bf16 centroids at d = 64: a band's C
// values 16 codes at a time, from a tile of 16 centroid rows transposed so that a lane is a code (word p of the
// rows), dotted with each query row's pairs broadcast (bf16 dot products; SPLIT: the queries' low halves too,
// summed first). A tile is transposed once for every (b, band) of its head that reads it, and no sum crosses
// lanes, so a code costs 2 dot-product instructions per query head (4 with SPLIT) and nothing else.
template <int G, bool SPLIT>
void fill_dense(const Entries& en, const PairQ* pq, int64_t R, const c10::BFloat16* cent, float* tables) {
  constexpr int P = G <= 4 ? 2 : 1;
  const int64_t B = en.B, H = en.H, C = en.C, T = en.T, bands = en.bands, Gr = en.Gr, nt = (C + 15) / 16;
  std::vector<std::vector<std::array<int64_t, 2>>> work(H);  // per head: its (b, band) computed whole
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t band = 0; band < bands; ++band)
        if (en.dense[(b * H + h) * bands + band]) work[h].push_back({b, band});
  const int64_t per_h = (nt + kTilesPerItem - 1) / kTilesPerItem;
  at::parallel_for(0, H * per_h, 1, [&](int64_t lo, int64_t hi) {
    alignas(64) uint32_t tile[32 * 16];
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t h = item / per_h, t0 = (item % per_h) * kTilesPerItem, t1 = std::min(nt, t0 + kTilesPerItem);
      if (work[h].empty()) continue;
      const uint32_t* ch = reinterpret_cast<const uint32_t*>(cent + h * C * 64);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * 16, cn = std::min<int64_t>(16, C - c0);
        transpose_tile(ch + c0 * 32, cn, tile);
        const __mmask16 mk = static_cast<__mmask16>((1u << cn) - 1);
        // P rows (b, band) at a time: G * P independent sums in flight (a few heads alone would wait on each
        // dot-product instruction's latency)
        for (size_t w0 = 0; w0 < work[h].size(); w0 += P) {
          const int np = static_cast<int>(std::min<size_t>(P, work[h].size() - w0));
          const PairQ* qb[P];
          __m512 acc[P][G];
#pragma GCC unroll 2
          for (int i = 0; i < P; ++i) {
            const auto& [b, band] = work[h][w0 + std::min(i, np - 1)];  // a missing row repeats the last
            qb[i] = pq + (b * H + h) * R + band;                        // query head g's row: qb[i][g * bands]
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) acc[i][g] = _mm512_setzero_ps();
          }
          // the query rows' low halves first (SPLIT), then their high halves: each pass over the tile's 32 pairs
          auto accumulate = [&](bool low) __attribute__((always_inline)) {
#pragma GCC unroll 4
            for (int p = 0; p < 32; ++p) {
              const __m512bh tv = (__m512bh)_mm512_load_si512(tile + p * 16);
#pragma GCC unroll 2
              for (int i = 0; i < P; ++i)
#pragma GCC unroll 8
                for (int g = 0; g < G; ++g) {
                  const PairQ& qg = qb[i][g * bands];
                  const int word = static_cast<int>(low ? qg.lo[p] : qg.hi[p]);
                  acc[i][g] = _mm512_dpbf16_ps(acc[i][g], tv, (__m512bh)_mm512_set1_epi32(word));
                }
            }
          };
          if constexpr (SPLIT) accumulate(true);
          accumulate(false);
          for (int i = 0; i < np; ++i) {
            const auto& [b, band] = work[h][w0 + i];
            const int64_t bh = b * H + h;
            if (Gr == 1) {
              __m512 m = acc[i][0];
#pragma GCC unroll 8
              for (int g = 1; g < G; ++g) m = _mm512_max_ps(m, acc[i][g]);
              _mm512_mask_storeu_ps(tables + bh * T + band * C + c0, mk, m);
            } else {
#pragma GCC unroll 8
              for (int g = 0; g < G; ++g)
                _mm512_mask_storeu_ps(tables + (bh * G + g) * T + band * C + c0, mk, acc[i][g]);
            }
          }
        }
      }
    }
  });
}

template <bool SPLIT>
bool fill_dense_g(int64_t G, const Entries& en, const PairQ* pq, int64_t R, const c10::BFloat16* cent, float* tables) {
  switch (G) {
    case 1: fill_dense<1, SPLIT>(en, pq, R, cent, tables); return true;
    case 2: fill_dense<2, SPLIT>(en, pq, R, cent, tables); return true;
    case 3: fill_dense<3, SPLIT>(en, pq, R, cent, tables); return true;
    case 4: fill_dense<4, SPLIT>(en, pq, R, cent, tables); return true;
    case 5: fill_dense<5, SPLIT>(en, pq, R, cent, tables); return true;
    case 6: fill_dense<6, SPLIT>(en, pq, R, cent, tables); return true;
    case 7: fill_dense<7, SPLIT>(en, pq, R, cent, tables); return true;
    case 8: fill_dense<8, SPLIT>(en, pq, R, cent, tables); return true;
    default: return false;
  }
}

// fill_dense for q (B*H*R rows of 64 floats): their pairs, split when bf16 does not hold them exactly.
void fill_dense_q(const Entries& en, const float* Q, int64_t R, int64_t G, const c10::BFloat16* cent, float* tables) {
  const int64_t rows = en.B * en.H * R;
  std::vector<PairQ> pq(rows);
  bool split = false;
  for (int64_t r = 0; r < rows; ++r) {
    const SplitQ sq = split_q64(Q + r * 64);
    _mm512_store_si512(pq[r].hi, (__m512i)sq.hi[0]);
    _mm512_store_si512(pq[r].hi + 16, (__m512i)sq.hi[1]);
    _mm512_store_si512(pq[r].lo, (__m512i)sq.lo[0]);
    _mm512_store_si512(pq[r].lo + 16, (__m512i)sq.lo[1]);
    split = split || !lo_is_zero(&sq, 1);
  }
  const bool done = split ? fill_dense_g<true>(G, en, pq.data(), R, cent, tables)
                          : fill_dense_g<false>(G, en, pq.data(), R, cent, tables);
  TORCH_CHECK(done, "dense bands need at most 8 query heads per KV head");  // count_entries marks none beyond
}
#endif

}  // namespace

// The selection of score_select on the tables q · centroids^T (or their group max), without building them:
// q (B, Hkv, G*bands, d) float32, row g*bands + band the query head g's query for band `band`;
// centroids (Hkv, C, d) float32 or bfloat16, row-major; token j's entry is codes + offsets (band*C + code).
// Only the entries that candidates carry are computed, each as plain row dot products (another summation
// order than lookup_tables': values equal within fp32 rounding, so selections equal but for near-ties).
std::vector<at::Tensor> score_select_direct(at::Tensor q, at::Tensor centroids, int64_t bands, bool group_max,
                                               at::Tensor codes, std::optional<at::Tensor> offsets,
                                               at::Tensor valid, at::Tensor k, int64_t sinks, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "q must be float32 (B, Hkv, G*bands, d)");
  TORCH_CHECK(centroids.dim() == 3 && centroids.is_contiguous() &&
                  (centroids.scalar_type() == at::kFloat || centroids.scalar_type() == at::kBFloat16),
              "centroids must be a contiguous float32 or bfloat16 (Hkv, C, d) tensor");
  TORCH_CHECK(q.size(1) == centroids.size(0) && q.size(3) == centroids.size(2), "q and centroids disagree on Hkv or d");
  TORCH_CHECK(bands >= 1 && q.size(2) % bands == 0 && q.size(2) >= bands, "q's rows must be G*bands");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kShort && codes.stride(2) == 1 &&
                  codes.size(0) == q.size(0) && codes.size(1) == q.size(1),
              "codes must be int16 (B, Hkv, n) with unit stride along tokens, matching q");
  if (offsets.has_value()) {
    const auto& o = *offsets;
    TORCH_CHECK(o.dim() == 2 && o.scalar_type() == at::kInt && o.is_contiguous() && o.size(0) == codes.size(0) &&
                    o.size(1) == codes.size(2),
                "offsets must be a contiguous int32 (B, n) tensor");
  }
  q = q.contiguous();
  const int64_t C = centroids.size(1), d = centroids.size(2);
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), G = R / bands, Gr = group_max ? 1 : G;
#if defined(__AVX512BF16__)
  const bool dense_path = centroids.scalar_type() == at::kBFloat16 && d == 64 && G <= 8;
  const double dense_cost = dense_path ? kDenseCost : 0.0;
#else
  const double dense_cost = 0.0;
#endif
  const auto en = count_entries(codes, offsets, valid, k, bands, C, Gr, sinks, window, dense_cost);
  float* TB = grown(scratch().tables, B * H * Gr * en->T);  // only the entries in use are written and read
  const float* Q = q.data_ptr<float>();
#if defined(__AVX512BF16__)
  if (dense_path && std::find(en->dense.begin(), en->dense.end(), 1) != en->dense.end())
    fill_dense_q(*en, Q, R, G, centroids.data_ptr<c10::BFloat16>(), TB);
#endif
  if (centroids.scalar_type() == at::kFloat) {
    const float* cp = centroids.data_ptr<float>();
    if (d == 64) fill_entries<64>(*en, Q, R, G, cp, d, TB);
    else fill_entries<0>(*en, Q, R, G, cp, d, TB);
  } else {
    const c10::BFloat16* cp = centroids.data_ptr<c10::BFloat16>();
    if (d == 64) fill_entries<64>(*en, Q, R, G, cp, d, TB);
    else fill_entries<0>(*en, Q, R, G, cp, d, TB);
  }
  return select_rows(*en, TB);
}


// A copy of `src` (contiguous) in memory aligned to 2 MiB and advised as huge pages where the OS has them
// (Linux's transparent huge pages): score_select_direct reads centroid rows scattered over MiBs per head, and
// with 4 KiB pages nearly every row was a TLB miss, a page walk that costs more than the row's read (a
// virtual machine's walks cost twice).
at::Tensor huge_page_copy(at::Tensor src) {
  src = src.contiguous();
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = src.nbytes(), size = std::max<size_t>(1, (bytes + kHuge - 1) / kHuge) * kHuge;
  void* p = std::aligned_alloc(kHuge, size);
  TORCH_CHECK(p != nullptr, "out of memory for ", size, " bytes");
#if defined(__linux__)
  madvise(p, size, MADV_HUGEPAGE);  // a hint: where huge pages are off it changes nothing
#endif
  if (bytes) std::memcpy(p, src.data_ptr(), bytes);
  return at::from_blob(p, src.sizes(), [](void* q) { std::free(q); }, src.options());
}

// ---------------------------------------------------------------------------------------------------
// Kernel 5: lookup tables (query · centroid for every centroid)
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kTile = 16;  // centroids per tile: one AVX-512 register of fp32 lanes

// Centroids (H, C, d) -> tiles (H, ceil(C/16), d, 16): each tile's d x 16 block is contiguous, so a
// pass over the tiles streams memory in order; missing centroids of the last tile are zeros.
at::Tensor tile_centroids(at::Tensor cent) {
  TORCH_CHECK(cent.dim() == 3 && cent.scalar_type() == at::kFloat, "centroids must be float32 (H, C, d)");
  const int64_t H = cent.size(0), C = cent.size(1), d = cent.size(2), nt = (C + kTile - 1) / kTile;
  auto padded = at::zeros({H, nt * kTile, d}, cent.options());
  padded.narrow(1, 0, C).copy_(cent);
  return padded.view({H, nt, kTile, d}).transpose(2, 3).contiguous();
}

// lut (B, H, R, C) = q (B, H, R, d) · centroids^T, centroids given as tiles (see tile_centroids).
// A decode step reads every centroid of every layer once, so this streams memory: 16 centroids at a
// time, up to 8 query rows per pass, no horizontal sums (a batched GEMM of 3 rows by 4096 columns
// reaches a fraction of the bandwidth).
// groups > 1: rows r = g * (R / groups) + i, and the output keeps the max over g of each i (B, H, R / groups, C):
// the GQA "max" reduction taken on the tile in registers instead of as a pass over (B, H, R, C) afterwards.
at::Tensor lookup_tables(at::Tensor q, at::Tensor tiles, int64_t C, int64_t groups) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "q must be float32 (B, H, R, d)");
  TORCH_CHECK(tiles.dim() == 4 && tiles.scalar_type() == at::kFloat && tiles.is_contiguous() &&
                  tiles.size(0) == q.size(1) && tiles.size(2) == q.size(3) && tiles.size(3) == kTile &&
                  C > (tiles.size(1) - 1) * kTile && C <= tiles.size(1) * kTile,
              "tiles must be the contiguous (H, ceil(C/16), d, 16) layout of tile_centroids, matching q");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), d = q.size(3), nt = tiles.size(1);
  TORCH_CHECK(groups >= 1 && R % groups == 0, "groups must divide the rows of q");
  const int64_t Ro = R / groups;
  auto out = at::empty({B, H, Ro, C}, q.options());
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
