// Compiled CPU kernels of the block-sparse engine (the "cpp" backend); linked into the same extension as
// fastattn/ops/linear/linear_cpu.cpp and built by fastattn/ops/linear/compiled.py (one build helper).
//
// The plan, flattened by fastattn/ops/sparse/compiled.py: query block j (b padded query rows; row r is
// query j*b + r - lpad) sees the W key *slots* kidx[j, :] (key positions; slots of the gathered blocks
// first, then the global keys), with the element mask allow[j, w, r] (uint8, transposed: one slot's b
// rows contiguous) and slot_any[j, w] (does any row of the block see slot w). Key padding kp (B, Lk)
// removes a key for one batch row. Scores are scale * q . k.
//
// Forward: one parallel region over (batch*heads x query blocks) (tasks handed out dynamically: see
// dynamic_for): the block's scaled queries are gathered transposed (E x b), the scores of its live slots
// computed into a (slots x b) tile, masked, softmax per row (max, exp, sum; rows with no live key: zero
// output, log-sum-exp -inf), then P V.
// Backward (flash-style, from out, lse, dout): delta = rowsum(dout * out) - dlse; one region over
// (batch*heads x query blocks) recomputes P and dP = dO V^T and gives dq = scale * dS K with
// dS = P * (dP - delta); a second region over key *tasks* (each key block, then the global keys b at a time) of
// every (batch, key head) walks the inverse plan (the (query block, slot) pairs that see the task's
// keys), recomputes the same tiles for every query head of the group and accumulates dk, dv in
// registers/buffers of the task: no atomics, each output row written by one task. Global keys'
// gradients come back separately (dkg, dvg) and are added by the caller.
// Grouped-query heads: H = group * Hk, query head h uses key head h / group.
//
// Small matrix products go through one register-blocked kernel (mm below) on GCC/Clang vector
// extensions (64-byte vectors); exp of float32 lanes is a Cephes-style polynomial, float64 uses std::exp.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../simd.h"

namespace {

using at::Tensor;

// C[r][d] (+)= sum_k A[r][k * sak] * B[k][d] for r < R, d < D: A and B given as row pointers, C with
// row stride ldc. Blocks of RT rows x CV vectors of columns stay in registers across the k loop.
// Optional ranges skip work that is known to be zero: per row r, only k in [klo[r], khi[r]) contributes
// (A is zero elsewhere) and only columns in [dlo[r], dhi[r]) are wanted (others are set to 0 when not
// adding); a block of rows takes the union of its rows' ranges (columns rounded out to whole vectors).
template <typename T, int RT, int CV>
inline void mm_block(int64_t k0, int64_t k1, const T* const* A, int64_t sak, const T* const* B, int64_t d0, T* C,
                     int64_t ldc, bool add) {
  using S = Simd<T>;
  typename S::V acc[RT][CV];
  for (int i = 0; i < RT; ++i)
    for (int c = 0; c < CV; ++c) acc[i][c] = add ? S::load(C + i * ldc + d0 + c * S::N) : typename S::V{};
  for (int64_t k = k0; k < k1; ++k) {
    const T* b = B[k] + d0;
    typename S::V bv[CV];
    for (int c = 0; c < CV; ++c) bv[c] = S::load(b + c * S::N);
    for (int i = 0; i < RT; ++i) {
      const typename S::V a = S::splat(A[i][k * sak]);
      for (int c = 0; c < CV; ++c) acc[i][c] += a * bv[c];
    }
  }
  for (int i = 0; i < RT; ++i)
    for (int c = 0; c < CV; ++c) S::store(C + i * ldc + d0 + c * S::N, acc[i][c]);
}

template <typename T, int RT>
inline void mm_rows(int64_t k0, int64_t k1, const T* const* A, int64_t sak, const T* const* B, int64_t dA, int64_t dB,
                    int64_t D, T* C, int64_t ldc, bool add) {
  constexpr int64_t N = Simd<T>::N;
  if (!add)
    for (int i = 0; i < RT; ++i) {
      std::fill(C + i * ldc, C + i * ldc + dA, T(0));
      std::fill(C + i * ldc + dB, C + i * ldc + D, T(0));
    }
  int64_t d0 = dA;
  for (; d0 + 4 * N <= dB; d0 += 4 * N) mm_block<T, RT, 4>(k0, k1, A, sak, B, d0, C, ldc, add);
  for (; d0 + N <= dB; d0 += N) mm_block<T, RT, 1>(k0, k1, A, sak, B, d0, C, ldc, add);
  for (int i = 0; i < RT; ++i) {  // a tail of columns narrower than a vector: scalar
    T* c = C + i * ldc;
    for (int64_t d = d0; d < dB; ++d) {
      T s = add ? c[d] : T(0);
      for (int64_t k = k0; k < k1; ++k) s += A[i][k * sak] * B[k][d];
      c[d] = s;
    }
  }
}

template <typename T>
void mm(int64_t R, int64_t K, const T* const* A, int64_t sak, const T* const* B, int64_t D, T* C, int64_t ldc,
        bool add, const int32_t* klo = nullptr, const int32_t* khi = nullptr, const int32_t* dlo = nullptr,
        const int32_t* dhi = nullptr) {
  constexpr int64_t N = Simd<T>::N;
  auto range = [](int64_t r, int64_t rt, const int32_t* lo, const int32_t* hi, int64_t full, int64_t& a,
                  int64_t& b) {
    if (!lo) {
      a = 0;
      b = full;
      return;
    }
    a = full;
    b = 0;
    for (int64_t i = r; i < r + rt; ++i) {
      if (lo[i] >= hi[i]) continue;
      a = std::min<int64_t>(a, lo[i]);
      b = std::max<int64_t>(b, hi[i]);
    }
    a = std::max<int64_t>(a, 0);
    b = std::min<int64_t>(b, full);
    if (a >= b) a = b = 0;
  };
  for (int64_t r = 0; r < R;) {
    const int64_t rt = R - r >= 4 ? 4 : 1;
    int64_t k0, k1, c0, c1;
    range(r, rt, klo, khi, K, k0, k1);
    range(r, rt, dlo, dhi, D, c0, c1);
    const int64_t dA = c0 / N * N, dB = std::min(D, (c1 + N - 1) / N * N);
    if (rt == 4)
      mm_rows<T, 4>(k0, k1, A + r, sak, B, dA, dB, D, C + r * ldc, ldc, add);
    else
      mm_rows<T, 1>(k0, k1, A + r, sak, B, dA, dB, D, C + r * ldc, ldc, add);
    r += rt;
  }
}

// Per row r < bp, the range [klo, khi) of the n keys whose row ranges [lo, hi) contain it.
inline void key_ranges(int64_t n, const int32_t* lo, const int32_t* hi, int64_t bp, int32_t* klo, int32_t* khi) {
  for (int64_t r = 0; r < bp; ++r) {
    klo[r] = static_cast<int32_t>(n);
    khi[r] = 0;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = lo[i]; r < hi[i]; ++r) {
      klo[r] = std::min<int32_t>(klo[r], static_cast<int32_t>(i));
      khi[r] = static_cast<int32_t>(i + 1);
    }
}

// exp(x) of float32 lanes, x <= ~88: 0 below -87 (so that exp(-inf) and masked scores give exactly 0).
inline F16 vexp(F16 x) {
  const F16 lo = F16{} + -87.0f, hi = F16{} + 88.0f;
  const auto dead = x < lo;
  F16 y = x < lo ? lo : x;
  y = y > hi ? hi : y;
  const F16 out = exp_clamped(y);
  return dead ? F16{} : out;
}

// x[i] = exp(x[i] - m[i]) for i < n (n a multiple of the vector width for float).
inline void exp_sub(float* x, const float* m, int64_t n) {
  using S = Simd<float>;
  for (int64_t i = 0; i < n; i += S::N) S::store(x + i, vexp(S::load(x + i) - S::load(m + i)));
}
inline void exp_sub(double* x, const double* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - m[i]);
}

template <typename T>
struct Rows {  // a (B, H, L, D) tensor addressed by (b, h, t)
  const T* p;
  int64_t sb, sh, st;
  explicit Rows(const Tensor& x) : p(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  const T* at(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

struct Geometry {
  int64_t B, H, Hk, group, Lq, Lk, E, Ev, nqb, W, bs, bp, lpad;
  double scale;
};

// The buffers of one task (a thread reuses them across its tasks).
template <typename T>
struct Work {
  std::vector<T> qT, dT, s, dp, m, l, delta, zeros, rows;
  std::vector<const T*> kp, vp, qrow, drow, a, bq, bd;
  std::vector<uint8_t> zu8;  // an all-masked allow row
  std::vector<int32_t> lo, hi, klo, khi;  // rows of each live key, keys of each row
  Work(const Geometry& g) {
    const int64_t bp = g.bp, W = std::max<int64_t>(g.W, g.bs);
    qT.assign(g.E * bp, T(0));
    dT.assign(g.Ev * bp, T(0));
    s.assign(W * bp, T(0));
    dp.assign(W * bp, T(0));
    m.assign(bp, T(0));
    l.assign(bp, T(0));
    delta.assign(bp, T(0));
    zeros.assign(std::max(g.E, g.Ev) + 64, T(0));
    rows.assign(bp * std::max(g.E, g.Ev), T(0));
    kp.resize(W);
    vp.resize(W);
    qrow.resize(bp);
    drow.resize(bp);
    a.resize(std::max(W, bp));
    zu8.assign(bp, 0);
    lo.assign(W, 0);
    hi.assign(W, 0);
    klo.assign(bp, 0);
    khi.assign(bp, 0);
    bq.resize(g.E);
    bd.resize(g.Ev);
    for (int64_t e = 0; e < g.E; ++e) bq[e] = qT.data() + e * bp;
    for (int64_t e = 0; e < g.Ev; ++e) bd[e] = dT.data() + e * bp;
  }
};

// Query block j of (batch bi, head h): rows' pointers into x (zeros outside [0, Lq)) and x transposed
// and multiplied by mul into xT (D x bp).
template <typename T>
void gather_rows(const Geometry& g, const Rows<T>& x, int64_t D, int64_t bi, int64_t h, int64_t j, T mul,
                 const T* zeros, const T** rowp, T* xT) {
  for (int64_t r = 0; r < g.bp; ++r) {
    const int64_t qi = j * g.bs + r - g.lpad;
    const bool in = r < g.bs && qi >= 0 && qi < g.Lq;
    const T* src = in ? x.at(bi, h, qi) : zeros;
    rowp[r] = src;
    for (int64_t e = 0; e < D; ++e) xT[e * g.bp + r] = in ? src[e] * mul : T(0);
  }
}

// The live key slots of query block j (batch bi, key head hk): a slot whose allow row has some 1, whose
// key is inside the call and not padding. Their key/value row pointers, allow rows and row ranges go to
// w.kp, w.vp, al, w.lo, w.hi; returns how many.
template <typename T>
int64_t live_slots(const Geometry& g, Work<T>& w, const uint8_t** al, const Rows<T>& K, const Rows<T>& V,
                   const int64_t* kidx, const uint8_t* allow, const uint8_t* slot_any, const int32_t* rlo,
                   const int32_t* rhi, const uint8_t* kpad, int64_t bi, int64_t hk, int64_t j) {
  int64_t n = 0;
  for (int64_t s = 0; s < g.W; ++s) {
    const int64_t p = kidx[j * g.W + s];
    if (!slot_any[j * g.W + s] || p < 0 || p >= g.Lk || (kpad && kpad[bi * g.Lk + p])) continue;
    w.kp[n] = K.at(bi, hk, p);
    w.vp[n] = V.at(bi, hk, p);
    al[n] = allow + (j * g.W + s) * g.bs;
    w.lo[n] = rlo[j * g.W + s];
    w.hi[n] = rhi[j * g.W + s];
    ++n;
  }
  return n;
}

// s (n x bp) = scores of the n keys (row pointers kp) against the gathered queries qT, masked by
// allow rows (uint8, b per key; nullptr: all allowed), -inf where masked.
template <typename T>
void masked_scores(const Geometry& g, Work<T>& w, int64_t n, const uint8_t* const* allow, T* s) {
  mm<T>(n, g.E, w.kp.data(), 1, w.bq.data(), g.bp, s, g.bp, false, nullptr, nullptr, w.lo.data(), w.hi.data());
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    T* si = s + i * g.bp;
    const uint8_t* a = allow[i];
    for (int64_t r = 0; r < g.bs; ++r) si[r] = a[r] ? si[r] : ninf;
    for (int64_t r = g.bs; r < g.bp; ++r) si[r] = ninf;
  }
}

// Tasks 0..n-1 over the threads, handed out in small chunks as threads ask (a thread descheduled on a
// shared machine holds up only its current chunk, not a fixed share): fn(get) runs once per thread and
// get(t0, t1) claims the next chunk (false when none is left).
template <typename F>
void dynamic_for(int64_t n, F&& fn) {
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, n / (nt * 8));
  auto get = [&](int64_t& t0, int64_t& t1) {
    t0 = next.fetch_add(chunk);
    if (t0 >= n) return false;
    t1 = std::min(n, t0 + chunk);
    return true;
  };
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { fn(get); });
}

// ---- forward ---------------------------------------------------------------------------------------
template <typename T>
void forward_kernel(const Geometry& g, const Tensor& q, const Tensor& k, const Tensor& v, const int64_t* kidx,
                    const uint8_t* allow, const uint8_t* slot_any, const int32_t* rlo, const int32_t* rhi,
                    const uint8_t* kpad, Tensor& out, Tensor& lse) {
  Rows<T> Q(q), K(k), V(v);
  T* O = out.data_ptr<T>();
  T* LSE = lse.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  dynamic_for(g.B * g.H * g.nqb, [&](auto& get) {
    Work<T> w(g);
    std::vector<const uint8_t*> al(std::max<int64_t>(g.W, 1));
    for (int64_t t0, t1, t = 0; get(t0, t1);)
    for (t = t0; t < t1; ++t) {
      const int64_t j = t % g.nqb, bh = t / g.nqb, bi = bh / g.H, h = bh % g.H, hk = h / g.group;
      gather_rows<T>(g, Q, g.E, bi, h, j, T(g.scale), w.zeros.data(), w.qrow.data(), w.qT.data());
      const int64_t n = live_slots<T>(g, w, al.data(), K, V, kidx, allow, slot_any, rlo, rhi, kpad, bi, hk, j);
      T* s = w.s.data();
      T* m = w.m.data();
      T* l = w.l.data();
      std::fill(m, m + g.bp, ninf);
      std::fill(l, l + g.bp, T(0));
      if (n) {
        masked_scores<T>(g, w, n, al.data(), s);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < g.bp; ++r) m[r] = std::max(m[r], s[i * g.bp + r]);
      }
      for (int64_t r = 0; r < g.bp; ++r) w.delta[r] = m[r] == ninf ? T(0) : m[r];  // finite shift
      for (int64_t i = 0; i < n; ++i) {
        exp_sub(s + i * g.bp, w.delta.data(), g.bp);
        for (int64_t r = 0; r < g.bp; ++r) l[r] += s[i * g.bp + r];
      }
      // out rows = P V / l, through a row buffer (rows outside the call are dropped)
      for (int64_t r = 0; r < g.bp; ++r) w.a[r] = s + r;
      T* buf = w.rows.data();
      if (n)
      {
        key_ranges(n, w.lo.data(), w.hi.data(), g.bp, w.klo.data(), w.khi.data());
        mm<T>(g.bs, n, w.a.data(), g.bp, w.vp.data(), g.Ev, buf, g.Ev, false, w.klo.data(), w.khi.data());
      }
      for (int64_t r = 0; r < g.bs; ++r) {
        const int64_t qi = j * g.bs + r - g.lpad;
        if (qi < 0 || qi >= g.Lq) continue;
        T* o = O + (bh * g.Lq + qi) * g.Ev;
        const bool dead = l[r] == T(0);
        const T inv = dead ? T(0) : T(1) / l[r];
        for (int64_t e = 0; e < g.Ev; ++e) o[e] = dead ? T(0) : buf[r * g.Ev + e] * inv;
        LSE[bh * g.Lq + qi] = dead ? ninf : m[r] + std::log(l[r]);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------------------
// The per-row softmax statistics of query block j: m = lse (+inf where the row sees nothing or is
// outside the call, so that its P is 0) and delta.
template <typename T>
void row_stats(const Geometry& g, const T* LSE, const T* DELTA, int64_t bh, int64_t j, T* m, T* delta) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < g.bp; ++r) {
    const int64_t qi = j * g.bs + r - g.lpad;
    const bool in = r < g.bs && qi >= 0 && qi < g.Lq;
    const T x = in ? LSE[bh * g.Lq + qi] : -inf;
    m[r] = std::isfinite(x) ? x : inf;
    delta[r] = in ? DELTA[bh * g.Lq + qi] : T(0);
  }
}

// P = exp(s - m) and dS = P * (dP - delta) of n keys (dP from the keys' value rows w.vp and dT).
template <typename T>
void probs_and_ds(const Geometry& g, Work<T>& w, int64_t n, const uint8_t* const* al) {
  T* s = w.s.data();
  T* dp = w.dp.data();
  masked_scores<T>(g, w, n, al, s);
  for (int64_t i = 0; i < n; ++i) exp_sub(s + i * g.bp, w.m.data(), g.bp);
  mm<T>(n, g.Ev, w.vp.data(), 1, w.bd.data(), g.bp, dp, g.bp, false, nullptr, nullptr, w.lo.data(), w.hi.data());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < g.bp; ++r) dp[i * g.bp + r] = s[i * g.bp + r] * (dp[i * g.bp + r] - w.delta[r]);
}

template <typename T>
void backward_kernel(const Geometry& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                     const Tensor& lse, const Tensor& delta, const int64_t* kidx, const uint8_t* allow,
                     const uint8_t* slot_any, const int32_t* rlo, const int32_t* rhi, const uint8_t* kpad,
                     const int64_t* tptr, const int64_t* tj,
                     const int64_t* to, const int64_t* gk, int64_t G, Tensor& dq, Tensor& dk, Tensor& dv,
                     Tensor& dkg, Tensor& dvg) {
  Rows<T> Q(q), K(k), V(v), DO(dout);
  const T* LSE = lse.data_ptr<T>();
  const T* DELTA = delta.data_ptr<T>();
  const T sc = T(g.scale);
  // dq: one task per (batch*head, query block)
  T* DQ = dq.data_ptr<T>();
  dynamic_for(g.B * g.H * g.nqb, [&](auto& get) {
    Work<T> w(g);
    std::vector<const uint8_t*> al(std::max<int64_t>(g.W, 1));
    for (int64_t t0, t1, t = 0; get(t0, t1);)
    for (t = t0; t < t1; ++t) {
      const int64_t j = t % g.nqb, bh = t / g.nqb, bi = bh / g.H, h = bh % g.H, hk = h / g.group;
      const int64_t n = live_slots<T>(g, w, al.data(), K, V, kidx, allow, slot_any, rlo, rhi, kpad, bi, hk, j);
      for (int64_t r = 0; r < g.bs; ++r) {
        const int64_t qi = j * g.bs + r - g.lpad;
        if (qi >= 0 && qi < g.Lq && n == 0)
          std::fill(DQ + (bh * g.Lq + qi) * g.E, DQ + (bh * g.Lq + qi + 1) * g.E, T(0));
      }
      if (!n) continue;
      gather_rows<T>(g, Q, g.E, bi, h, j, sc, w.zeros.data(), w.qrow.data(), w.qT.data());
      gather_rows<T>(g, DO, g.Ev, bi, h, j, T(1), w.zeros.data(), w.drow.data(), w.dT.data());
      row_stats<T>(g, LSE, DELTA, bh, j, w.m.data(), w.delta.data());
      probs_and_ds<T>(g, w, n, al.data());
      for (int64_t r = 0; r < g.bp; ++r) w.a[r] = w.dp.data() + r;
      T* buf = w.rows.data();
      key_ranges(n, w.lo.data(), w.hi.data(), g.bp, w.klo.data(), w.khi.data());
      mm<T>(g.bs, n, w.a.data(), g.bp, w.kp.data(), g.E, buf, g.E, false, w.klo.data(), w.khi.data());
      for (int64_t r = 0; r < g.bs; ++r) {
        const int64_t qi = j * g.bs + r - g.lpad;
        if (qi < 0 || qi >= g.Lq) continue;
        T* o = DQ + (bh * g.Lq + qi) * g.E;
        for (int64_t e = 0; e < g.E; ++e) o[e] = buf[r * g.E + e] * sc;
      }
    }
  });
  // dk, dv: one task per (batch, key head, key task); key tasks: nkb key blocks, then the G global keys
  // in groups of up to b (their slots are consecutive in every query block's list)
  const int64_t nkb = (g.Lk + g.bs - 1) / g.bs, ntask = nkb + (G + g.bs - 1) / g.bs;
  T* DK = dk.data_ptr<T>();
  T* DV = dv.data_ptr<T>();
  T* DKG = G ? dkg.data_ptr<T>() : nullptr;
  T* DVG = G ? dvg.data_ptr<T>() : nullptr;
  dynamic_for(g.B * g.Hk * ntask, [&](auto& get) {
    Work<T> w(g);
    std::vector<T> dkacc(g.bs * g.E), dvacc(g.bs * g.Ev);
    std::vector<const uint8_t*> al(g.bs);
    std::vector<uint8_t> off(g.bs);
    for (int64_t t0, t1, t = 0; get(t0, t1);)
    for (t = t0; t < t1; ++t) {
      const int64_t task = t % ntask, bhk = t / ntask, bi = bhk / g.Hk, hk = bhk % g.Hk;
      const bool glob = task >= nkb;
      const int64_t g0 = glob ? (task - nkb) * g.bs : 0, p0 = glob ? 0 : task * g.bs;
      const int64_t len = glob ? std::min(g.bs, G - g0) : std::min(g.bs, g.Lk - p0);
      std::fill(dkacc.begin(), dkacc.end(), T(0));
      std::fill(dvacc.begin(), dvacc.end(), T(0));
      bool any = false;
      for (int64_t i = 0; i < len; ++i) {
        const int64_t p = glob ? gk[g0 + i] : p0 + i;
        w.kp[i] = K.at(bi, hk, p);
        w.vp[i] = V.at(bi, hk, p);
        off[i] = kpad && kpad[bi * g.Lk + p];
        any = any || !off[i];
      }
      for (int64_t e = any ? tptr[task] : tptr[task + 1]; e < tptr[task + 1]; ++e) {
        const int64_t j = tj[e], o = to[e];
        for (int64_t i = 0; i < len; ++i) {
          al[i] = off[i] ? w.zu8.data() : allow + (j * g.W + o + i) * g.bs;
          w.lo[i] = off[i] ? 0 : rlo[j * g.W + o + i];
          w.hi[i] = off[i] ? 0 : rhi[j * g.W + o + i];
        }
        for (int64_t hh = 0; hh < g.group; ++hh) {
          const int64_t h = hk * g.group + hh, bh = bi * g.H + h;
          gather_rows<T>(g, Q, g.E, bi, h, j, sc, w.zeros.data(), w.qrow.data(), w.qT.data());
          gather_rows<T>(g, DO, g.Ev, bi, h, j, T(1), w.zeros.data(), w.drow.data(), w.dT.data());
          row_stats<T>(g, LSE, DELTA, bh, j, w.m.data(), w.delta.data());
          probs_and_ds<T>(g, w, len, al.data());
          for (int64_t i = 0; i < len; ++i) w.a[i] = w.s.data() + i * g.bp;
          mm<T>(len, g.bs, w.a.data(), 1, w.drow.data(), g.Ev, dvacc.data(), g.Ev, true, w.lo.data(), w.hi.data());
          for (int64_t i = 0; i < len; ++i) w.a[i] = w.dp.data() + i * g.bp;
          mm<T>(len, g.bs, w.a.data(), 1, w.qrow.data(), g.E, dkacc.data(), g.E, true, w.lo.data(), w.hi.data());
        }
      }
      T* dko = glob ? DKG + (bhk * G + g0) * g.E : DK + (bhk * g.Lk + p0) * g.E;
      T* dvo = glob ? DVG + (bhk * G + g0) * g.Ev : DV + (bhk * g.Lk + p0) * g.Ev;
      for (int64_t i = 0; i < len * g.E; ++i) dko[i] = dkacc[i] * sc;
      for (int64_t i = 0; i < len * g.Ev; ++i) dvo[i] = dvacc[i];
    }
  });
}

Geometry geometry(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kidx, int64_t lpad,
                  int64_t bs, double scale) {
  Geometry g;
  g.B = q.size(0);
  g.H = q.size(1);
  g.Lq = q.size(2);
  g.E = q.size(3);
  g.Hk = k.size(1);
  g.Lk = k.size(2);
  g.Ev = v.size(3);
  TORCH_CHECK(g.Hk > 0 && g.H % g.Hk == 0, "query heads must be a multiple of key heads");
  g.group = g.H / g.Hk;
  g.nqb = kidx.size(0);
  g.W = kidx.size(1);
  g.bs = bs;
  const int64_t N = q.scalar_type() == at::kFloat ? 16 : 8;
  g.bp = (bs + N - 1) / N * N;
  g.lpad = lpad;
  g.scale = scale;
  return g;
}

Tensor rows_contiguous(const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

const uint8_t* u8(const c10::optional<Tensor>& x) {
  return x.has_value() && x->defined() ? x->data_ptr<uint8_t>() : nullptr;
}

std::vector<Tensor> forward(Tensor q, Tensor k, Tensor v, Tensor kidx, Tensor allow, Tensor slot_any, Tensor rlo,
                            Tensor rhi, c10::optional<Tensor> kpad, int64_t lpad, int64_t bs, double scale) {
  q = rows_contiguous(q);
  k = rows_contiguous(k);
  v = rows_contiguous(v);
  Geometry g = geometry(q, k, v, kidx, lpad, bs, scale);
  auto opts = v.options();
  Tensor out = at::empty({g.B, g.H, g.Lq, g.Ev}, opts);
  Tensor lse = at::empty({g.B, g.H, g.Lq}, opts);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastattn_block_sparse_forward", [&] {
    forward_kernel<scalar_t>(g, q, k, v, kidx.data_ptr<int64_t>(), allow.data_ptr<uint8_t>(),
                             slot_any.data_ptr<uint8_t>(), rlo.data_ptr<int32_t>(), rhi.data_ptr<int32_t>(), u8(kpad),
                             out, lse);
  });
  return {out, lse};
}

std::vector<Tensor> backward(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor lse, Tensor delta, Tensor kidx,
                             Tensor allow, Tensor slot_any, Tensor rlo, Tensor rhi, c10::optional<Tensor> kpad,
                             Tensor tptr, Tensor tj,
                             Tensor to, Tensor gk, int64_t lpad, int64_t bs, double scale) {
  q = rows_contiguous(q);
  k = rows_contiguous(k);
  v = rows_contiguous(v);
  dout = rows_contiguous(dout);
  lse = lse.contiguous();
  delta = delta.contiguous();
  Geometry g = geometry(q, k, v, kidx, lpad, bs, scale);
  const int64_t G = gk.numel();
  auto opts = v.options();
  Tensor dq = at::empty({g.B, g.H, g.Lq, g.E}, opts);
  Tensor dk = at::empty({g.B, g.Hk, g.Lk, g.E}, opts);
  Tensor dv = at::empty({g.B, g.Hk, g.Lk, g.Ev}, opts);
  Tensor dkg = at::empty({g.B, g.Hk, G, g.E}, opts);
  Tensor dvg = at::empty({g.B, g.Hk, G, g.Ev}, opts);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastattn_block_sparse_backward", [&] {
    backward_kernel<scalar_t>(g, q, k, v, dout, lse, delta, kidx.data_ptr<int64_t>(), allow.data_ptr<uint8_t>(),
                              slot_any.data_ptr<uint8_t>(), rlo.data_ptr<int32_t>(), rhi.data_ptr<int32_t>(),
                              u8(kpad), tptr.data_ptr<int64_t>(),
                              tj.data_ptr<int64_t>(), to.data_ptr<int64_t>(), G ? gk.data_ptr<int64_t>() : nullptr,
                              G, dq, dk, dv, dkg, dvg);
  });
  return {dq, dk, dv, dkg, dvg};
}

}  // namespace

void fastattn_bind_sparse(pybind11::module_& m) {
  m.def("block_sparse_forward", &forward, "block-sparse attention forward on a flattened plan: (out, lse)");
  m.def("block_sparse_backward", &backward, "block-sparse attention backward: (dq, dk, dv, dk_global, dv_global)");
}
