// CPU kernels for calibration's k-means (torch references in a2ats.core.kmeans): k-means++ seeding, each point's
// nearest centroid over every centroid (assign: the cost of a pass that searches all centroids), and among the
// candidates of its current one (nearest_among: a neighbour pass).
//
// In builds with AVX-512 BF16 the scores are first approximated with bf16 dot products (twice the fp32
// multiply-add rate) under a proven error bound; only the centroids that bound cannot rule out are scored again
// in fp32, so the answer is the exact nearest centroid, not an approximation. Other builds score in fp32.

#include "cpu_common.h"

using a2ats::dot16;
using a2ats::grown;
using a2ats::prefetch_row;

namespace {

// Points (G, N, d), centroids (G, k, d) and their halves (G, k), float32, one set of each per G: the assignment
// kernels' inputs.
void check_sets(const at::Tensor& x, const at::Tensor& cents, const at::Tensor& half) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "points must be float32 (G, N, d)");
  TORCH_CHECK(cents.dim() == 3 && cents.scalar_type() == at::kFloat && cents.size(0) == x.size(0) &&
                  cents.size(2) == x.size(2),
              "cents must be float32 (G, k, d) matching the points");
  TORCH_CHECK(half.dim() == 2 && half.scalar_type() == at::kFloat && half.size(0) == cents.size(0) &&
                  half.size(1) == cents.size(1),
              "half must be float32 (G, k)");
}


// The first argmax over c of p . cents[c] - half[c] in fp32, every centroid scored (NaN scores never win; a
// point whose scores are all NaN gets 0).
inline int64_t nearest_exact(const float* p, const float* cents, const float* half, int64_t k, int64_t d) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  bool found = false;
  for (int64_t c = 0; c < k; ++c) {
    const float s = dot16(p, cents + c * d, d) - half[c];
    if (s > best || (!found && s == best)) {
      best = s;
      arg = c;
      found = true;
    }
  }
  return arg;
}


#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------------------
// bf16 shortlist, fp32 decision
// ---------------------------------------------------------------------------------------------------
//
// The error bound. Let u = 2^-8, the unit roundoff of bf16 (8 significant bits, round to nearest even), so
// x~_i = x_i (1 + a_i), c~_i = c_i (1 + b_i) with |a_i|, |b_i| <= u. A product of two bf16 is exact in fp32 (16
// significant bits), so
//   |sum x~_i c~_i - x . c| <= (2u + u^2) sum |x_i c_i| <= (2u + u^2) |x| |c|          (Cauchy-Schwarz).
// The fp32 sum s~ = -h + sum x~_i c~_i rounds at most d times (two products per instruction, added in whatever
// order), each time by at most 2^-24 of a partial sum, itself at most (1 + u)^2 |x| |c| + |h|. Hence, with
// eps = 2^-7 + 2^-15 + (d + 2) 2^-23 and eh = (d + 4) 2^-23 (the exact terms are 2^-7 + 2^-16 + 1.01 d 2^-24 and
// d 2^-24: the slack covers the norms' and the threshold's own rounding),
//   |s~_c - s_c| <= B_c = eps |x| |c| + eh |h_c| + f,   s_c = x . c - h_c,
// where f = 2^-100 (|x| + |c| + 1) bounds what flushing subnormal operands, products and sums to zero loses (the
// bf16 instructions flush: at most 2^-126 (sqrt(d) (|x| + |c|) + 2d) in all).
//
// The shortlist. Each centroid's bounds l_c = s~_c - B_c <= s_c <= s~_c + B_c = u_c; the true best c* has
// s_{c*} >= s_c for every c, so u_{c*} >= s_{c*} >= max_c l_c = L. Every centroid with u_c >= L (here: every
// centroid of a lane group whose maximum u reaches L, a superset) is scored again in fp32, in index order, the
// first maximum kept; no other can be the nearest. The bound per centroid, not one per point with the largest |c|:
// a few centroids of real keys' codebooks lie ten times farther out than the median one, and with their norm in
// every bound shortlists ran to 40-80 centroids (SmolLM2's keys); with each its own, ~2. The bounds are formed in
// fp32 (an FMA and an add from the rounded-up a = eps |x|, |c| and the other terms): each rounding, at most 2^-24
// of |s| + B, is within the slack eps and eh keep over their exact terms.
// The bound is ~1% of |x| |c| where the scores spread over ~|x| |c| / sqrt(d).

constexpr int kR = 8;  // points per block: kR x kT accumulators and kT tile vectors fill the 32 vector registers
constexpr int kT = 3;  // tiles (16 centroids each) per step: a lane group (measured: 6 x 4, 5 x 5, 4 x 6 no faster)

// x (d floats) -> (d + 1) / 2 pairs of bf16 (round to nearest even; odd d: the last pair's second half zero),
// pair p at out[p * stride]
inline void to_pairs(const float* x, int64_t d, uint32_t* out, int64_t stride) {
  alignas(64) uint32_t tmp[16];
  for (int64_t e = 0; e < d; e += 32) {
    const int64_t r = std::min<int64_t>(d - e, 32);
    const auto mask = [](int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); };
    const __m512 a = _mm512_maskz_loadu_ps(mask(std::min<int64_t>(r, 16)), x + e);
    const __m512 b = _mm512_maskz_loadu_ps(mask(std::max<int64_t>(r - 16, 0)), x + e + 16);
    _mm512_store_si512(tmp, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // bf16 lanes 0-15 from a, 16-31 from b
    for (int64_t q = 0; q < (r + 1) / 2; ++q) out[(e / 2 + q) * stride] = tmp[q];
  }
}

// |v|, rounded up: fp32 sums (16 partial sums: relative error ~(d / 16 + 4) 2^-24) scaled by 1 + 2^-16
inline double norm_up(const float* v, int64_t d) {
  return std::sqrt(static_cast<double>(dot16(v, v, d))) * (1.0 + std::ldexp(1.0, -16));
}

// Approximate scores of kR points against group q, tiles kT q .. kT q + kT - 1. Tile t, pair p is one vector of
// 16 centroids' dims (2p, 2p + 1); point r's pair p (xb[p * kR + r]) is broadcast against it; the sums start from
// -half (nh). Each score s~ then becomes its bounds s~ +- B_c, B_c = a_r |c| + (hb_c + f_r) (cn: |c|, hb: the
// centroid's other terms, a_r = eps |x_r|, f_r: the point's part of f). Kept: per point, the lane-wise maximum of
// the upper bounds over the group's tiles (to gm at (q * kR + r) * 16) and of the lower bounds over all tiles so
// far (lo). Lane j of a group stands for its kT centroids 16 t + j: a third of the bounds to write and scan again,
// for a shortlist of whole lanes.
inline void score_group(const uint32_t* __restrict xb, int64_t P, const __m512i* __restrict tiles, int64_t q,
                        const float* __restrict nh, const float* __restrict cn, const float* __restrict hb,
                        const float* __restrict a, const float* __restrict f, float* __restrict gm,
                        __m512* __restrict lo) {
  __m512 acc[kR][kT];
  for (int t = 0; t < kT; ++t) {
    const __m512 h = _mm512_load_ps(nh + (q * kT + t) * 16);
    for (int r = 0; r < kR; ++r) acc[r][t] = h;
  }
  const __m512i* tp = tiles + q * kT * P;
  for (int64_t p = 0; p < P; ++p) {
    __m512bh c[kT];
    for (int t = 0; t < kT; ++t) c[t] = (__m512bh)_mm512_load_si512(tp + t * P + p);
    for (int r = 0; r < kR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[p * kR + r]));
      for (int t = 0; t < kT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], c[t], xv);
    }
  }
  __m512 norms[kT], others[kT];
  for (int t = 0; t < kT; ++t) {
    norms[t] = _mm512_load_ps(cn + (q * kT + t) * 16);
    others[t] = _mm512_load_ps(hb + (q * kT + t) * 16);
  }
  for (int r = 0; r < kR; ++r) {
    const __m512 ar = _mm512_set1_ps(a[r]), fr = _mm512_set1_ps(f[r]);
    __m512 up = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int t = 0; t < kT; ++t) {
      const __m512 b = _mm512_fmadd_ps(ar, norms[t], _mm512_add_ps(others[t], fr));
      up = _mm512_max_ps(up, _mm512_add_ps(acc[r][t], b));
      lo[r] = _mm512_max_ps(lo[r], _mm512_sub_ps(acc[r][t], b));
    }
    _mm512_store_ps(gm + (q * kR + r) * 16, up);
  }
}

struct Scratch {
  std::vector<uint32_t> xb;
  std::vector<float> gm;
  std::vector<int32_t> cand;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}


// X, C, HF: the points, centroids and halves the bf16 scores and bounds use (centred); X0, C0, H0: the caller's,
// which the fp32 decision scores (the same argmax: centring shifts each point's scores by one constant, but it is
// not exact in fp32, and the decision keeps the caller's rounding).
void nearest_bf16(const float* X, const float* C, const float* HF, const float* X0, const float* C0, const float* H0,
                  int64_t G, int64_t N, int64_t k, int64_t d, int64_t* O) {
  const int64_t P = (d + 1) / 2, ng = (k + 16 * kT - 1) / (16 * kT), nt = ng * kT, kpad = nt * 16;
  const double eps = std::ldexp(1.0, -7) + std::ldexp(1.0, -15) + static_cast<double>(d + 2) * std::ldexp(1.0, -23);
  const double eh = static_cast<double>(d + 4) * std::ldexp(1.0, -23), tiny = std::ldexp(1.0, -100);
  const auto up = [](double v) {  // v as a float rounded up
    float r = static_cast<float>(v);
    return static_cast<double>(r) < v ? std::nextafter(r, std::numeric_limits<float>::infinity()) : r;
  };
  // Centroids as tiles (G, nt, P, 32 bf16): lane pair j of tile t, pair p = centroid 16t + j's dims 2p, 2p + 1
  // (centroids past k, up to whole groups: zeros, with half +inf so that they never score), and in tile order
  // -half, |c| and the bound's other terms eh |h| + tiny (|c| + 1), both rounded up. ATen's allocator aligns to 64
  // bytes.
  auto tiles_t = at::empty({G * nt * P * 16}, at::kInt);
  auto per_c = at::empty({3, G * kpad}, at::kFloat);
  uint32_t* TL = reinterpret_cast<uint32_t*>(tiles_t.data_ptr<int32_t>());
  float* NH = per_c.data_ptr<float>();
  float* CN = NH + G * kpad;
  float* HB = CN + G * kpad;
  at::parallel_for(0, G * nt, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = item / nt, t = item % nt;
      uint32_t* tile = TL + item * P * 16;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t c = t * 16 + j, at = g * kpad + c;
        if (c < k) {
          const float* cr = C + (g * k + c) * d;
          to_pairs(cr, d, tile + j, 16);
          const double norm = norm_up(cr, d), h = HF[g * k + c];
          NH[at] = static_cast<float>(-h);
          CN[at] = up(norm);
          // a centroid whose half is not finite: +inf never scores (its bounds stay -inf), -inf or NaN reach the
          // fp32 decision or its every-centroid fallback
          HB[at] = std::isfinite(h) ? up(eh * std::fabs(h) + tiny * (norm + 1.0)) : 0.f;
        } else {
          for (int64_t p = 0; p < P; ++p) tile[p * 16 + j] = 0u;
          NH[at] = -std::numeric_limits<float>::infinity();
          CN[at] = HB[at] = 0.f;
        }
      }
    }
  });

  const int64_t blocks = (N + kR - 1) / kR;
  at::parallel_for(0, G * blocks, 1, [&](int64_t lo, int64_t hi) {
    Scratch& sc = scratch();
    uint32_t* xb = grown(sc.xb, kR * P);
    float* gm = grown(sc.gm, kR * ng * 16 + 16);
    gm += (16 - (reinterpret_cast<uintptr_t>(gm) / 4) % 16) % 16;  // 64-byte aligned
    int32_t* cand = grown(sc.cand, kR * kpad);  // shortlists, point r's from r * kpad
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = item / blocks, i0 = (item % blocks) * kR, rows = std::min<int64_t>(kR, N - i0);
      const float* xg = X + (g * N + i0) * d;
      const float* cg = C0 + g * k * d;
      const float* hg = H0 + g * k;
      float a[kR], f[kR];
      bool finite[kR];
      for (int64_t r = 0; r < kR; ++r) {
        if (r < rows) {
          to_pairs(xg + r * d, d, xb + r, kR);
          const double xn = norm_up(xg + r * d, d);
          finite[r] = std::isfinite(xn);
          a[r] = finite[r] ? up(eps * xn) : 0.f;
          f[r] = finite[r] ? up(tiny * xn) : 0.f;
        } else {
          for (int64_t p = 0; p < P; ++p) xb[p * kR + r] = 0u;  // a short last block: zero points, ignored
          a[r] = f[r] = 0.f;
          finite[r] = false;
        }
      }
      const __m512i* tiles = reinterpret_cast<const __m512i*>(TL + g * nt * P * 16);
      const int64_t off = g * kpad;
      __m512 lower[kR];
      for (int r = 0; r < kR; ++r) lower[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t q = 0; q < ng; ++q) score_group(xb, P, tiles, q, NH + off, CN + off, HB + off, a, f, gm, lower);

      // Each point's threshold: the largest lower bound. The nearest centroid's upper bound reaches it, so one pass
      // over the group maxima of the upper bounds finds the shortlists: every centroid of a lane whose maximum
      // reaches the threshold (a superset of those whose own bound does). Rows past the block's points and points
      // that are not finite get none (the latter fall back to scoring every centroid).
      __m512 thr[kR];
      for (int r = 0; r < kR; ++r) {
        const float th = finite[r] ? _mm512_reduce_max_ps(lower[r]) : std::numeric_limits<float>::infinity();
        thr[r] = _mm512_set1_ps(th);
      }
      int64_t count[kR] = {};
      for (int64_t q = 0; q < ng; ++q) {
        const float* sv = gm + q * kR * 16;
        __mmask16 any = 0;  // the block's points together: one test per group, the masks again where one is set
        for (int r = 0; r < kR; ++r) any |= _mm512_cmp_ps_mask(_mm512_load_ps(sv + r * 16), thr[r], _CMP_GE_OQ);
        if (!any) continue;
        for (int r = 0; r < kR; ++r) {
          const uint32_t lanes = _mm512_cmp_ps_mask(_mm512_load_ps(sv + r * 16), thr[r], _CMP_GE_OQ);
          for (int64_t t = q * kT; t < (q + 1) * kT; ++t)  // in index order
            for (uint32_t b = lanes; b; b &= b - 1) {
              const int64_t c = t * 16 + __builtin_ctz(b);
              if (c < k) {
                cand[r * kpad + count[r]++] = static_cast<int32_t>(c);
                prefetch_row<3>(cg + c * d, d);  // the fp32 rows: misses in flight together, not one by one
              }
            }
        }
      }
      // The shortlist's exact fp32 scores, in index order (the first maximum wins)
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = X0 + (g * N + i0 + r) * d;
        float best = -std::numeric_limits<float>::infinity();
        int64_t arg = -1;
        for (int64_t i = 0; i < count[r]; ++i) {
          const int64_t c = cand[r * kpad + i];
          const float s = dot16(xr, cg + c * d, d) - hg[c];
          if (s > best) {
            best = s;
            arg = c;
          }
        }
        // Non-finite inputs (no bound holds): every centroid scored
        O[g * N + i0 + r] = arg >= 0 ? arg : nearest_exact(xr, cg, hg, k, d);
      }
    }
  });
}
#endif

}  // namespace

// The first argmax over c of x[g, i] . cents[g, c] - half[g, c]: x (G, N, d), cents (G, k, d), half (G, k) float32
// -> (G, N) int64. Exact: AVX-512 BF16 builds shortlist in bf16 under a proven bound and decide in fp32 (above).
at::Tensor kmeans_nearest(at::Tensor x, at::Tensor cents, at::Tensor half) {
  check_sets(x, cents, half);
  x = x.contiguous();
  cents = cents.contiguous();
  half = half.contiguous();
  const int64_t G = x.size(0), N = x.size(1), d = x.size(2), k = cents.size(1);
  auto out = at::empty({G, N}, at::kLong);
  if (G == 0 || N == 0) return out;
  TORCH_CHECK(k > 0, "no centroids to assign to");
  TORCH_CHECK(d > 0, "points must have at least one dim");
#if defined(__AVX512BF16__)
  // Centred on the points' mean mu: x - mu, c - mu, half - c . mu. Each point's scores all shift by one constant
  // (-x . mu + |mu|^2), so the argmax is the same, while the bound, which scales with |x| |c|, shrinks from the
  // data's offset to its spread: keys sit far from the origin, and uncentred their shortlists run to hundreds.
  auto xc = at::empty(x.sizes(), x.options()), cc = at::empty(cents.sizes(), cents.options()),
       hc = at::empty(half.sizes(), half.options());
  const float *X = x.data_ptr<float>(), *C = cents.data_ptr<float>(), *H = half.data_ptr<float>();
  float *XC = xc.data_ptr<float>(), *CC = cc.data_ptr<float>(), *HC = hc.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    std::vector<double> sum(d, 0.0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t e = 0; e < d; ++e) sum[e] += X[(g * N + i) * d + e];
    std::vector<float> mu(d);
    for (int64_t e = 0; e < d; ++e) mu[e] = static_cast<float>(sum[e] / N);
    at::parallel_for(0, N, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        for (int64_t e = 0; e < d; ++e) XC[(g * N + i) * d + e] = X[(g * N + i) * d + e] - mu[e];
    });
    for (int64_t c = 0; c < k; ++c) {
      const float* src = C + (g * k + c) * d;
      float* dst = CC + (g * k + c) * d;
      double dot = 0.0;
      for (int64_t e = 0; e < d; ++e) {
        dst[e] = src[e] - mu[e];
        dot += static_cast<double>(src[e]) * mu[e];
      }
      HC[g * k + c] = static_cast<float>(H[g * k + c] - dot);
    }
  }
  nearest_bf16(XC, CC, HC, X, C, H, G, N, k, d, out.data_ptr<int64_t>());
#else
  a2ats::nearest_by_gemm(x, cents, half.data_ptr<float>(), out.data_ptr<int64_t>());
#endif
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Kernel: k-means++ seeding (calibration)
// ---------------------------------------------------------------------------------------------------

// The k sequential draws of k-means++ over each point set: pick (G, k) int64 sample indices, given the first
// pick (G,) and the uniform draws u (G, k - 1) float64. Each draw is the first point whose running sum of
// squared distances to the picks so far reaches u * the total (float64 sums), as a2ats.core.kmeans's loop does;
// in torch that loop is ~10 small ops per draw, 4 s a layer in dispatch alone, here ~0.2 s.
at::Tensor kmeans_pp_picks(at::Tensor pts, at::Tensor first, at::Tensor u) {
  TORCH_CHECK(pts.dim() == 3 && pts.scalar_type() == at::kFloat, "pts must be float32 (G, S, d)");
  TORCH_CHECK(first.dim() == 1 && first.scalar_type() == at::kLong && first.size(0) == pts.size(0),
              "first must be int64 (G,)");
  TORCH_CHECK(u.dim() == 2 && u.scalar_type() == at::kDouble && u.size(0) == pts.size(0), "u must be float64 (G, k - 1)");
  pts = pts.contiguous();
  u = u.contiguous();
  first = first.contiguous();
  const int64_t G = pts.size(0), S = pts.size(1), d = pts.size(2), k = u.size(1) + 1;
  TORCH_CHECK(S > 0, "no points to seed from");
  auto out = at::empty({G, k}, at::kLong);
  int64_t* O = out.data_ptr<int64_t>();
  const float* PTS = pts.data_ptr<float>();
  const double* UU = u.data_ptr<double>();
  const int64_t* FIRST = first.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(FIRST[g] >= 0 && FIRST[g] < S, "first pick out of range");
  // One point set per thread, each draw's loop serial: a draw's work (S dot products, a running sum) is a few
  // microseconds, about what splitting it across threads costs in synchronization every draw.
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> pt(d * S), norms(S), mind(S), dot(S);
    std::vector<double> cdf(S);
    for (int64_t g = g0; g < g1; ++g) {
      const float* P = PTS + g * S * d;
      const double* U = UU + g * (k - 1);
      // the points dim-major (d, S): a draw's S dot products are then d vector FMAs per 16 points, no sums across lanes
      for (int64_t i = 0; i < S; ++i)
        for (int64_t e = 0; e < d; ++e) pt[e * S + i] = P[i * d + e];
      for (int64_t i = 0; i < S; ++i) {
        float acc = 0.f;
        for (int64_t e = 0; e < d; ++e) acc += P[i * d + e] * P[i * d + e];
        norms[i] = acc;
      }
      // mind = min(mind, |p - c|^2) for the new pick c, as norms - 2 p.c + |c|^2 clamped at 0 (the torch loop's form)
      auto update = [&](int64_t pick, bool init) {
        const float* __restrict c = P + pick * d;
        const float cn = norms[pick];
        float* __restrict dt = dot.data();
        const float* __restrict col = pt.data();
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) dt[i] = col[i] * c[0];
        for (int64_t e = 1; e < d; ++e) {
          const float ce = c[e];
          const float* __restrict ce_col = col + e * S;
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) dt[i] += ce_col[i] * ce;
        }
        float* __restrict md = mind.data();
        const float* __restrict nm = norms.data();
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          const float dist = std::max(nm[i] - 2.f * dt[i] + cn, 0.f);
          md[i] = init ? dist : std::min(md[i], dist);
        }
      };
      int64_t pick = FIRST[g];
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
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Kernel: k-means assignment among candidates (calibration)
// ---------------------------------------------------------------------------------------------------

// The nearest centroid (G, N) int64 of each point among the candidates of its current one: for point i of set g
// with current centroid a = cur[g, i], the first argmax over j of pts[g, i] . cents[g, c] - half[g, c] with
// c = cand[g, a, j]. A Lloyd pass that searches m neighbours instead of all k centroids costs N m d instead of
// N k d (the centroids, a few MB, stay in cache), which is what makes k-means' middle passes cheap.
at::Tensor kmeans_nearest_among(at::Tensor pts, at::Tensor cents, at::Tensor half, at::Tensor cand,
                                   at::Tensor cur) {
  check_sets(pts, cents, half);
  TORCH_CHECK(cand.dim() == 3 && cand.scalar_type() == at::kInt && cand.size(0) == cents.size(0) &&
                  cand.size(1) == cents.size(1) && cand.size(2) > 0,
              "cand must be int32 (G, k, m), m > 0");
  TORCH_CHECK(cur.dim() == 2 && cur.scalar_type() == at::kLong && cur.size(0) == pts.size(0) &&
                  cur.size(1) == pts.size(1),
              "cur must be int64 (G, N)");
  pts = pts.contiguous();
  cents = cents.contiguous();
  half = half.contiguous();
  cand = cand.contiguous();
  cur = cur.contiguous();
  const int64_t G = pts.size(0), N = pts.size(1), d = pts.size(2), k = cents.size(1), m = cand.size(2);
  auto out = at::empty({G, N}, at::kLong);
  if (G == 0 || N == 0) return out;
  TORCH_CHECK(cand.min().item<int32_t>() >= 0 && cand.max().item<int32_t>() < k, "candidates out of range");
  TORCH_CHECK(cur.min().item<int64_t>() >= 0 && cur.max().item<int64_t>() < k, "current centroids out of range");
  const float* P = pts.data_ptr<float>();
  const float* C = cents.data_ptr<float>();
  const float* HF = half.data_ptr<float>();
  const int32_t* CA = cand.data_ptr<int32_t>();
  const int64_t* CU = cur.data_ptr<int64_t>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, G * N, 512, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = item / N;
      const float* __restrict p = P + item * d;
      const int32_t* __restrict list = CA + (g * k + CU[item]) * m;
      float best = -std::numeric_limits<float>::infinity();
      int64_t arg = CU[item];  // NaN scores (never from finite points) keep the current centroid
      for (int64_t j = 0; j < m; ++j) {
        const int64_t c = list[j];
        const float s = dot16(p, C + (g * k + c) * d, d) - HF[g * k + c];
        if (s > best) {
          best = s;
          arg = c;
        }
      }
      O[item] = arg;
    }
  });
  return out;
}
