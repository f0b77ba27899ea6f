// Compiled CPU kernels of linear attention (the "cpp" backend); built on first use by
// fastattn/ops/linear/compiled.py with torch.utils.cpp_extension and cached.
//
// Causal: the token recurrence S_t = g_t S_{t-1} + k_t v_t^T, z_t = g_t z_{t-1} + k_t, read out as
// num_t = q_t S_t, den_t = q_t . z_t, one (batch, key/value head) row per task of one parallel region.
// The D x Ev state stays in L1; each token costs one pass over it that updates and reads it (forward),
// and the backward is two such passes: backwards for the suffix state R_t = dL/dS_t (giving dk, dv and
// dS_0), forwards again for S_t (giving dq). Gates are exact per token (no exp of differences). The
// gradient of the cumulative log-gate, dA_t = sum_j q_jt . dq_jt - k_t . dk_t, is returned per token;
// the Python side turns it into the log-gates' gradient (as the tiled kernels do).
// Non-causal: the state summed over the keys, then read out by the queries, tb tokens at a time (see
// rank_update / readout below); backward likewise (the tiled kernels' formulas).
//
// Ungated calls run code without the gate multiplies (template flag): two fused multiply-adds per state
// element and token forward, five backward. A token-wise feature map may be fused (``feature`` 1:
// elu(x) + 1 = max(x + 1, exp(min(x, 0))), derivative min(phi, 1)): q and k are then the raw inputs, the
// features of a token are computed into a small buffer when the token is visited (forward and both
// backward sweeps), and the gradients are chained through the map in place -- no feature tensor exists.
//
// Layout: q (B, H, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Ev) with any strides on the first three
// axes and a contiguous last one; H = gq * Hkv (grouped-query heads share a state); log_g (B, Hkv, L)
// per token or (B, Hkv, 1) constant per row; s0 (B, Hkv, D, Ev), z0 (B, Hkv, D).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../simd.h"

namespace {

using at::Tensor;

Tensor last_contiguous(const Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

template <typename T>
struct Rows {  // a (B, H, L, W) tensor addressed by (b, h, t)
  T* p;
  int64_t sb, sh, st;
  explicit Rows(const Tensor& x)
      : p(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

struct Gates {  // per-token or per-row log-gates as float64 (B, Hkv, L|1), contiguous
  const double* p = nullptr;
  int64_t len = 0, hkv = 1;
  bool per_token = false;
  explicit Gates(const c10::optional<Tensor>& lg, int64_t hkv_) : hkv(hkv_) {
    if (lg.has_value() && lg->defined()) {
      p = lg->data_ptr<double>();
      len = lg->size(2);
      per_token = len != 1;
    }
  }
  bool any() const { return p != nullptr; }
  double at(int64_t b, int64_t h, int64_t t) const {
    return std::exp(p[(b * hkv + h) * len + (per_token ? t : 0)]);
  }
};

// The value axis Ev is processed in blocks of up to NV vectors (ops/simd.h) held in registers across the
// loop over the feature axis D (the state's rows); what does not fill a vector is done in scalar code.

// The lane sums of N vectors of N lanes at once, lane r of the result = sum of vector r: a transpose-add
// tree (one shuffle pair and an add per vector, instead of a reduction tree per vector).
#define FA_SV __builtin_shufflevector
inline F16 reduce_rows(const F16* v) {
  F16 c[8], d[4], e[2];
  for (int m = 0; m < 8; ++m)
    c[m] = FA_SV(v[2 * m], v[2 * m + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           FA_SV(v[2 * m], v[2 * m + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  for (int m = 0; m < 4; ++m)
    d[m] = FA_SV(c[2 * m], c[2 * m + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           FA_SV(c[2 * m], c[2 * m + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  for (int m = 0; m < 2; ++m)
    e[m] = FA_SV(d[2 * m], d[2 * m + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           FA_SV(d[2 * m], d[2 * m + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  return FA_SV(e[0], e[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         FA_SV(e[0], e[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

inline D8 reduce_rows(const D8* v) {
  D8 c[4], d[2];
  for (int m = 0; m < 4; ++m)
    c[m] = FA_SV(v[2 * m], v[2 * m + 1], 0, 8, 2, 10, 4, 12, 6, 14) + FA_SV(v[2 * m], v[2 * m + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int m = 0; m < 2; ++m)
    d[m] = FA_SV(c[2 * m], c[2 * m + 1], 0, 1, 8, 9, 4, 5, 12, 13) + FA_SV(c[2 * m], c[2 * m + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return FA_SV(d[0], d[1], 0, 1, 2, 3, 8, 9, 10, 11) + FA_SV(d[0], d[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#undef FA_SV

constexpr int NV = 4;  // vectors per block of the value axis (64 floats / 32 doubles)

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using S = Simd<T>;
  typename S::V acc{};
  int64_t e = 0;
  for (; e + S::N <= n; e += S::N) acc += S::load(a + e) * S::load(b + e);
  T s = S::hsum(acc);
  for (; e < n; ++e) s += a[e] * b[e];
  return s;
}

// exp of float32 lanes <= 0; below -87 the result is exp(-87) ~ 2e-38 instead of a denormal or 0.
inline F16 exp_nonpositive(F16 x) {
  const F16 lo = F16{} + -87.0f;
  return exp_clamped(x < lo ? lo : x);
}

template <typename T>
inline T elu1(T x) {
  return std::max(x + T(1), std::exp(std::min(x, T(0))));
}

// The features of one token, phi(x) for D inputs, into f (feature 1: elu + 1).
inline void elu1_row(const float* __restrict__ x, float* __restrict__ f, int64_t D) {
  using SI = Simd<float>;
  int64_t i = 0;
  for (; i + SI::N <= D; i += SI::N) {
    const F16 xi = SI::load(x + i);
    const F16 zero{};
    const F16 e = exp_nonpositive(xi < zero ? xi : zero);
    const F16 y = xi + 1.0f;
    SI::store(f + i, y > e ? y : e);
  }
  for (; i < D; ++i) f[i] = elu1(x[i]);
}

inline void elu1_row(const double* __restrict__ x, double* __restrict__ f, int64_t D) {
  for (int64_t i = 0; i < D; ++i) f[i] = elu1(x[i]);
}

// A token's features: x itself (feature 0) or phi(x) written to buf.
template <typename T>
inline const T* features(int feature, const T* x, T* buf, int64_t D) {
  if (feature == 0) return x;
  elu1_row(x, buf, D);
  return buf;
}

// The chain rule through the feature map, in place: dx = dphi * phi'(x), phi' = min(phi, 1) for elu + 1.
template <typename T>
inline void chain(int feature, T* __restrict__ d, const T* __restrict__ f, int64_t D) {
  if (feature == 0) return;
  for (int64_t i = 0; i < D; ++i) d[i] *= std::min(f[i], T(1));
}

// Forward, one token, one block [e0, e0 + nv * N) of the value axis, one query head:
// (update) S_i = g S_i + k_i v for every row i, and acc = sum_i q_i S_i.
template <typename T, int nv, bool update, bool gated>
inline void fwd_block(T* __restrict__ S, int64_t Ev, int64_t e0, int64_t D, const T* __restrict__ kt,
                      const T* __restrict__ qt, const T* __restrict__ vt, T g, T* __restrict__ acc) {
  using SI = Simd<T>;
  using V = typename SI::V;
  V a[nv] = {}, vb[nv];
  const V gv = SI::splat(g);
  #pragma GCC unroll 16
  for (int u = 0; u < nv; ++u) vb[u] = SI::load(vt + e0 + u * SI::N);
  for (int64_t i = 0; i < D; ++i) {
    T* Sr = S + i * Ev + e0;
    const V qi = SI::splat(qt[i]);
    if (update) {
      const V ki = SI::splat(kt[i]);
      #pragma GCC unroll 16
      for (int u = 0; u < nv; ++u) {
        const V x = (gated ? gv * SI::load(Sr + u * SI::N) : SI::load(Sr + u * SI::N)) + ki * vb[u];
        SI::store(Sr + u * SI::N, x);
        a[u] += qi * x;
      }
    } else {
      #pragma GCC unroll 16
      for (int u = 0; u < nv; ++u) a[u] += qi * SI::load(Sr + u * SI::N);
    }
  }
  #pragma GCC unroll 16
  for (int u = 0; u < nv; ++u) SI::store(acc + e0 + u * SI::N, a[u]);
}

template <typename T, bool update, bool gated>
inline void fwd_token(T* S, int64_t Ev, int64_t D, const T* kt, const T* qt, const T* vt, T g, T* acc) {
  using SI = Simd<T>;
  int64_t e0 = 0;
  for (; e0 + NV * SI::N <= Ev; e0 += NV * SI::N) fwd_block<T, NV, update, gated>(S, Ev, e0, D, kt, qt, vt, g, acc);
  for (; e0 + SI::N <= Ev; e0 += SI::N) fwd_block<T, 1, update, gated>(S, Ev, e0, D, kt, qt, vt, g, acc);
  if (e0 < Ev) {
    for (int64_t e = e0; e < Ev; ++e) acc[e] = 0;
    for (int64_t i = 0; i < D; ++i) {
      T* Sr = S + i * Ev;
      for (int64_t e = e0; e < Ev; ++e) {
        if (update) Sr[e] = g * Sr[e] + kt[i] * vt[e];
        acc[e] += qt[i] * Sr[e];
      }
    }
  }
}

// Backward, backwards sweep, one token, one block of the value axis: R_i = gn R_i + sum_j q_ji G_j,
// dv += k_i R_i, dk_i += R_i . v (added to dk, which holds the normaliser's part on entry).
template <typename T, int nv, bool gated>
inline void rev_block(T* __restrict__ R, int64_t Ev, int64_t e0, int64_t D, int64_t gq, const T* const* qt,
                      const T* __restrict__ G, const T* __restrict__ kt, const T* __restrict__ vt, T gn,
                      T* __restrict__ dk, T* __restrict__ dv, typename Simd<T>::V* __restrict__ P) {
  using SI = Simd<T>;
  using V = typename SI::V;
  V dvb[nv] = {}, vb[nv], gb[nv];
  const T* __restrict__ q0 = qt[0];
  const V gv = SI::splat(gn);
  #pragma GCC unroll 16
  for (int u = 0; u < nv; ++u) vb[u] = SI::load(vt + e0 + u * SI::N);
  if (gq == 1)
    #pragma GCC unroll 16
    for (int u = 0; u < nv; ++u) gb[u] = SI::load(G + e0 + u * SI::N);
  auto row = [&](int64_t i) -> V {  // R_i updated; returns the lanes of R_i . v
    T* Rr = R + i * Ev + e0;
    const V ki = SI::splat(kt[i]);
    V part{};
    #pragma GCC unroll 16
    for (int u = 0; u < nv; ++u) {
      V x = gated ? gv * SI::load(Rr + u * SI::N) : SI::load(Rr + u * SI::N);
      if (gq == 1) {
        x += SI::splat(q0[i]) * gb[u];
      } else {
        for (int64_t j = 0; j < gq; ++j) x += SI::splat(qt[j][i]) * SI::load(G + j * Ev + e0 + u * SI::N);
      }
      SI::store(Rr + u * SI::N, x);
      dvb[u] += ki * x;
      part += x * vb[u];
    }
    return part;
  };
  for (int64_t i = 0; i < D; ++i) P[i] = row(i);  // the rows' lanes, summed below N rows at a time
  int64_t i = 0;
  for (; i + SI::N <= D; i += SI::N) SI::store(dk + i, SI::load(dk + i) + reduce_rows(P + i));
  for (; i < D; ++i) dk[i] += SI::hsum(P[i]);
  #pragma GCC unroll 16
  for (int u = 0; u < nv; ++u) SI::store(dv + e0 + u * SI::N, dvb[u]);
}

// Backward, forwards sweep, one token, one block: S_i = g S_i + k_i v, dq_ji += S_i . G_j.
template <typename T, int nv, bool gated>
inline void dq_block(T* __restrict__ S, int64_t Ev, int64_t e0, int64_t D, int64_t gq, T* const* dq,
                     const T* __restrict__ G, const T* __restrict__ kt, const T* __restrict__ vt, T g,
                     typename Simd<T>::V* __restrict__ P) {
  using SI = Simd<T>;
  using V = typename SI::V;
  V vb[nv];
  const V gv = SI::splat(g);
  #pragma GCC unroll 16
  for (int u = 0; u < nv; ++u) vb[u] = SI::load(vt + e0 + u * SI::N);
  int64_t i0 = 0;
  if (gq == 1) {  // N rows at a time: their lane sums in one vector
    V gb[nv];
    #pragma GCC unroll 16
    for (int u = 0; u < nv; ++u) gb[u] = SI::load(G + e0 + u * SI::N);
    for (int64_t i = 0; i < D; ++i) {  // the rows' lanes, summed below N rows at a time
      T* Sr = S + i * Ev + e0;
      const V ki = SI::splat(kt[i]);
      V part{};
      #pragma GCC unroll 16
      for (int u = 0; u < nv; ++u) {
        const V x = (gated ? gv * SI::load(Sr + u * SI::N) : SI::load(Sr + u * SI::N)) + ki * vb[u];
        SI::store(Sr + u * SI::N, x);
        part += x * gb[u];
      }
      P[i] = part;
    }
    T* __restrict__ d0 = dq[0];
    for (; i0 + SI::N <= D; i0 += SI::N) SI::store(d0 + i0, SI::load(d0 + i0) + reduce_rows(P + i0));
    for (; i0 < D; ++i0) d0[i0] += SI::hsum(P[i0]);
    return;
  }
  for (int64_t i = i0; i < D; ++i) {
    T* Sr = S + i * Ev + e0;
    const V ki = SI::splat(kt[i]);
    V x[nv];
    #pragma GCC unroll 16
    for (int u = 0; u < nv; ++u) {
      x[u] = (gated ? gv * SI::load(Sr + u * SI::N) : SI::load(Sr + u * SI::N)) + ki * vb[u];
      SI::store(Sr + u * SI::N, x[u]);
    }
    for (int64_t j = 0; j < gq; ++j) {
      V part{};
      #pragma GCC unroll 16
      for (int u = 0; u < nv; ++u) part += x[u] * SI::load(G + j * Ev + e0 + u * SI::N);
      dq[j][i] += SI::hsum(part);
    }
  }
}

// dst = src[0:n] (an initial state), or zeros where there is none.
template <typename T>
inline void init_state(T* __restrict__ dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src ? src[i] : T(0);
}

// Rows per task: small calls (a decoding step) run on the calling thread -- waking a thread pool costs
// more than their arithmetic, and on a loaded machine a whole scheduler slice.
inline int64_t grain(int64_t L, int64_t D, int64_t Ev) {
  const int64_t work = std::max<int64_t>(1, L * D * Ev);
  return std::max<int64_t>(1, (int64_t(1) << 20) / work);
}

template <typename T, bool gated>
void causal_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Gates& gates,
                    const c10::optional<Tensor>& s0, const c10::optional<Tensor>& z0, bool normalize, int feature,
                    Tensor& out, Tensor& den, Tensor& s_n, Tensor& z_n) {
  const int64_t B = k.size(0), Hkv = k.size(1), L = k.size(2), D = k.size(3), Ev = v.size(3);
  const int64_t gq = q.size(1) / Hkv;
  Rows<T> Q(q), K(k), V(v), O(out);
  T* dn = normalize ? den.data_ptr<T>() : nullptr;  // (B, H, L, 1) contiguous
  T* sn = s_n.data_ptr<T>();
  T* zn = normalize ? z_n.data_ptr<T>() : nullptr;
  const T* S0 = (s0.has_value() && s0->defined()) ? s0->data_ptr<T>() : nullptr;
  const T* Z0 = (normalize && z0.has_value() && z0->defined()) ? z0->data_ptr<T>() : nullptr;
  at::parallel_for(0, B * Hkv, grain(L, D, Ev), [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(Ev), fkb(D), fqb(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hkv, h = r % Hkv;
      T* __restrict__ S = sn + r * D * Ev;  // the running state lives in the output
      T* __restrict__ z = normalize ? zn + r * D : nullptr;
      init_state(S, S0 ? S0 + r * D * Ev : nullptr, D * Ev);
      if (normalize)
        init_state(z, Z0 ? Z0 + r * D : nullptr, D);
      for (int64_t t = 0; t < L; ++t) {
        const T g = gated ? static_cast<T>(gates.at(b, h, t)) : T(1);
        const T* kt = features(feature, K.at(b, h, t), fkb.data(), D);
        const T* vt = V.at(b, h, t);
        if (normalize) {
          if (gated)
            for (int64_t i = 0; i < D; ++i) z[i] = g * z[i] + kt[i];
          else
            for (int64_t i = 0; i < D; ++i) z[i] += kt[i];
        }
        for (int64_t j = 0; j < gq; ++j) {
          const int64_t hq = h * gq + j;
          const T* qt = features(feature, Q.at(b, hq, t), fqb.data(), D);
          if (j == 0)
            fwd_token<T, true, gated>(S, Ev, D, kt, qt, vt, g, acc.data());
          else
            fwd_token<T, false, gated>(S, Ev, D, kt, qt, vt, g, acc.data());
          T* o = O.at(b, hq, t);
          T inv = 1;
          if (normalize) {
            const T d = dot(qt, z, D);
            dn[(b * Hkv * gq + hq) * L + t] = d;
            inv = d == T(0) ? T(1) : T(1) / d;
          }
          for (int64_t e = 0; e < Ev; ++e) o[e] = acc[e] * inv;
        }
      }
    }
  });
}

template <typename T, bool gated>
void causal_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Gates& gates,
                     const c10::optional<Tensor>& s0, const c10::optional<Tensor>& z0, bool normalize, int feature,
                     const Tensor& out, const Tensor& den, const Tensor& dout, const c10::optional<Tensor>& dden,
                     const c10::optional<Tensor>& dsn, const c10::optional<Tensor>& dzn, Tensor& dq, Tensor& dk,
                     Tensor& dv, Tensor& ds0, Tensor& dz0, Tensor& dcum) {
  using SI = Simd<T>;
  const int64_t B = k.size(0), Hkv = k.size(1), L = k.size(2), D = k.size(3), Ev = v.size(3);
  const int64_t gq = q.size(1) / Hkv, H = q.size(1);
  Rows<T> Q(q), K(k), V(v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  const T* dn = normalize ? den.data_ptr<T>() : nullptr;
  const bool has_dden = normalize && dden.has_value() && dden->defined();
  const T* ddn = has_dden ? dden->data_ptr<T>() : nullptr;
  const T* S0 = (s0.has_value() && s0->defined()) ? s0->data_ptr<T>() : nullptr;
  const T* Z0 = (normalize && z0.has_value() && z0->defined()) ? z0->data_ptr<T>() : nullptr;
  const T* dSn = (dsn.has_value() && dsn->defined()) ? dsn->data_ptr<T>() : nullptr;
  const T* dZn = (normalize && dzn.has_value() && dzn->defined()) ? dzn->data_ptr<T>() : nullptr;
  T* dS0 = ds0.data_ptr<T>();
  T* dZ0 = normalize ? dz0.data_ptr<T>() : nullptr;
  T* dc = gated ? dcum.data_ptr<T>() : nullptr;  // (B, Hkv, L)
  at::parallel_for(0, B * Hkv, grain(L, D, Ev), [&](int64_t r0, int64_t r1) {
    std::vector<T> G(gq * Ev), gd(gq, T(0)), S(D * Ev), z(D), fqb(gq * D), fkb(D);
    std::vector<typename SI::V> P(D);  // per-row partial sums of a block (summed across lanes after it)
    std::vector<const T*> qs(gq);
    std::vector<T*> dqs(gq);
    // qs_j = phi(q_j), G_j = dout_j / den_j and gd_j = -(dout_j . out_j) / den_j + dden_j (0 + dden
    // where den == 0)
    // The denominator's gradient gd of every token of a row, computed in the backwards sweep and read in
    // the forwards one (which then does not read the output again).
    std::vector<T> gds(normalize ? gq * L : 0);
    auto grads = [&](int64_t b, int64_t h, int64_t t, bool first) {
      for (int64_t j = 0; j < gq; ++j) {
        const int64_t hq = h * gq + j;
        const T* __restrict__ o = dO.at(b, hq, t);
        T* __restrict__ Gj = G.data() + j * Ev;
        qs[j] = features(feature, Q.at(b, hq, t), fqb.data() + j * D, D);
        dqs[j] = dQ.at(b, hq, t);
        if (!normalize) {
          for (int64_t e = 0; e < Ev; ++e) Gj[e] = o[e];
          continue;
        }
        const T d = dn[(b * H + hq) * L + t];
        const T inv = d == T(0) ? T(1) : T(1) / d;
        for (int64_t e = 0; e < Ev; ++e) Gj[e] = o[e] * inv;
        if (first) {
          gds[j * L + t] = d == T(0) ? T(0) : -dot(o, O.at(b, hq, t), Ev) * inv;
          if (has_dden) gds[j * L + t] += ddn[(b * H + hq) * L + t];
        }
        gd[j] = gds[j * L + t];
      }
    };
    // The rows of token t of the inputs the sweeps read, fetched into the cache ahead of use.
    auto prefetch = [&](int64_t b, int64_t h, int64_t t) {
      if (t < 0 || t >= L) return;
      auto lines = [](const T* p, int64_t n) {
        for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + i);
      };
      for (int64_t j = 0; j < gq; ++j) {
        lines(dO.at(b, h * gq + j, t), Ev);
        lines(Q.at(b, h * gq + j, t), D);
        lines(O.at(b, h * gq + j, t), Ev);
      }
      lines(K.at(b, h, t), D);
      lines(V.at(b, h, t), Ev);
    };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hkv, h = r % Hkv;
      // backwards: R = dL/dS_t, rz = dL/dz_t
      T* __restrict__ R = dS0 + r * D * Ev;
      T* __restrict__ rz = normalize ? dZ0 + r * D : nullptr;
      init_state(R, dSn ? dSn + r * D * Ev : nullptr, D * Ev);
      if (normalize)
        init_state(rz, dZn ? dZn + r * D : nullptr, D);
      for (int64_t t = L - 1; t >= 0; --t) {
        const T gn = (gated && t + 1 < L) ? static_cast<T>(gates.at(b, h, t + 1)) : T(1);
        grads(b, h, t, true);
        prefetch(b, h, t - 4);
        const T* kt = features(feature, K.at(b, h, t), fkb.data(), D);
        const T* vt = V.at(b, h, t);
        T* dkt = dK.at(b, h, t);
        T* dvt = dV.at(b, h, t);
        if (normalize) {  // rz = gn rz + sum_j gd_j q_j; dk starts from it
          if (gated)
            for (int64_t i = 0; i < D; ++i) rz[i] *= gn;
          for (int64_t j = 0; j < gq; ++j) {
            const T* __restrict__ qj = qs[j];
            const T gdj = gd[j];
            for (int64_t i = 0; i < D; ++i) rz[i] += gdj * qj[i];
          }
          for (int64_t i = 0; i < D; ++i) dkt[i] = rz[i];
        } else {
          for (int64_t i = 0; i < D; ++i) dkt[i] = 0;
        }
        int64_t e0 = 0;
        for (; e0 + NV * SI::N <= Ev; e0 += NV * SI::N)
          rev_block<T, NV, gated>(R, Ev, e0, D, gq, qs.data(), G.data(), kt, vt, gn, dkt, dvt, P.data());
        for (; e0 + SI::N <= Ev; e0 += SI::N)
          rev_block<T, 1, gated>(R, Ev, e0, D, gq, qs.data(), G.data(), kt, vt, gn, dkt, dvt, P.data());
        for (int64_t e = e0; e < Ev; ++e) dvt[e] = 0;
        for (int64_t i = 0; i < D && e0 < Ev; ++i) {
          T* Rr = R + i * Ev;
          for (int64_t e = e0; e < Ev; ++e) {
            T x = gn * Rr[e];
            for (int64_t j = 0; j < gq; ++j) x += qs[j][i] * G[j * Ev + e];
            Rr[e] = x;
            dvt[e] += kt[i] * x;
            dkt[i] += x * vt[e];
          }
        }
        if (dc) dc[r * L + t] = -dot(kt, dkt, D);
        chain(feature, dkt, kt, D);
      }
      if (gated) {  // dS_0 = g_1 R_1
        const T g0 = L > 0 ? static_cast<T>(gates.at(b, h, 0)) : T(1);
        for (int64_t i = 0; i < D * Ev; ++i) R[i] *= g0;
        if (normalize)
          for (int64_t i = 0; i < D; ++i) rz[i] *= g0;
      }
      // forwards: S_t, z_t give dq
      init_state(S.data(), S0 ? S0 + r * D * Ev : nullptr, D * Ev);
      init_state(z.data(), Z0 ? Z0 + r * D : nullptr, D);
      for (int64_t t = 0; t < L; ++t) {
        const T g = gated ? static_cast<T>(gates.at(b, h, t)) : T(1);
        grads(b, h, t, false);
        prefetch(b, h, t + 4);
        const T* kt = features(feature, K.at(b, h, t), fkb.data(), D);
        const T* vt = V.at(b, h, t);
        {
          T* __restrict__ zz = z.data();
          if (gated)
            for (int64_t i = 0; i < D; ++i) zz[i] = g * zz[i] + kt[i];
          else
            for (int64_t i = 0; i < D; ++i) zz[i] += kt[i];
          for (int64_t j = 0; j < gq; ++j) {
            T* __restrict__ dqj = dqs[j];
            const T c = normalize ? gd[j] : T(0);
            for (int64_t i = 0; i < D; ++i) dqj[i] = c * zz[i];
          }
        }
        int64_t e0 = 0;
        for (; e0 + NV * SI::N <= Ev; e0 += NV * SI::N)
          dq_block<T, NV, gated>(S.data(), Ev, e0, D, gq, dqs.data(), G.data(), kt, vt, g, P.data());
        for (; e0 + SI::N <= Ev; e0 += SI::N)
          dq_block<T, 1, gated>(S.data(), Ev, e0, D, gq, dqs.data(), G.data(), kt, vt, g, P.data());
        for (int64_t i = 0; i < D && e0 < Ev; ++i) {
          T* Sr = S.data() + i * Ev;
          for (int64_t e = e0; e < Ev; ++e) {
            Sr[e] = g * Sr[e] + kt[i] * vt[e];
            for (int64_t j = 0; j < gq; ++j) dqs[j][i] += Sr[e] * G[j * Ev + e];
          }
        }
        if (dc) {
          T s = 0;
          for (int64_t j = 0; j < gq; ++j) s += dot(qs[j], dqs[j], D);
          dc[r * L + t] += s;
        }
        for (int64_t j = 0; j < gq; ++j) chain(feature, dqs[j], qs[j], D);
      }
    }
  });
}

// ---- non-causal -----------------------------------------------------------------------------------
// Two rank-blocked loops do all the work, tb tokens at a time so that each state element is loaded and
// stored once per tb tokens (GEMM-like: tb fused multiply-adds per load):
//   rank_update: S (D x W) += sum_u x_u y_u^T;      readout: out_u = x_u S (a W-vector per token).
// Forward: S = S_0 + sum_s k'_s v_s^T, z = z_0 + sum_s k'_s, out_t = q'_t S / q'_t . z. Backward (S, z
// the final state): dq'_t = S G_t + gd_t z (a readout of S^T), dS = dS_n + sum_t q'_t G_t^T, dz = dz_n
// + sum_t gd_t q'_t, then dv_s = dS^T k'_s (a readout of dS), dk'_s = dS v_s + dz (a readout of dS^T).
constexpr int TB = 8;  // tokens per block

template <typename T, int tb>
void rank_update_(T* __restrict__ S, int64_t D, int64_t W, const T* const* x, const T* const* y) {
  using SI = Simd<T>;
  using V = typename SI::V;
  const T* xu[tb];  // the pointers in registers (not reloaded after every store to S)
  #pragma GCC unroll 16
  for (int u = 0; u < tb; ++u) xu[u] = x[u];
  int64_t e = 0;
  for (; e + SI::N <= W; e += SI::N) {
    V yb[tb];
    #pragma GCC unroll 16
    for (int u = 0; u < tb; ++u) yb[u] = SI::load(y[u] + e);
    for (int64_t i = 0; i < D; ++i) {
      V s = SI::load(S + i * W + e);
      #pragma GCC unroll 16
      for (int u = 0; u < tb; ++u) s += SI::splat(xu[u][i]) * yb[u];
      SI::store(S + i * W + e, s);
    }
  }
  for (; e < W; ++e)
    for (int64_t i = 0; i < D; ++i)
      #pragma GCC unroll 16
      for (int u = 0; u < tb; ++u) S[i * W + e] += xu[u][i] * y[u][e];
}

template <typename T>
void rank_update(T* S, int64_t D, int64_t W, int tb, const T* const* x, const T* const* y) {
  if (tb == TB) return rank_update_<T, TB>(S, D, W, x, y);
  #pragma GCC unroll 16
  for (int u = 0; u < tb; ++u) rank_update_<T, 1>(S, D, W, x + u, y + u);
}

template <typename T, int tb>
void readout_(const T* __restrict__ S, int64_t D, int64_t W, const T* const* x, T* const* out) {
  using SI = Simd<T>;
  using V = typename SI::V;
  const T* xu[tb];
  #pragma GCC unroll 16
  for (int u = 0; u < tb; ++u) xu[u] = x[u];
  int64_t e = 0;
  for (; e + SI::N <= W; e += SI::N) {
    V acc[tb] = {};
    for (int64_t i = 0; i < D; ++i) {
      const V s = SI::load(S + i * W + e);
      #pragma GCC unroll 16
      for (int u = 0; u < tb; ++u) acc[u] += SI::splat(xu[u][i]) * s;
    }
    #pragma GCC unroll 16
    for (int u = 0; u < tb; ++u) SI::store(out[u] + e, acc[u]);
  }
  for (; e < W; ++e)
    #pragma GCC unroll 16
    for (int u = 0; u < tb; ++u) {
      T a = 0;
      for (int64_t i = 0; i < D; ++i) a += xu[u][i] * S[i * W + e];
      out[u][e] = a;
    }
}

template <typename T>
void readout(const T* S, int64_t D, int64_t W, int tb, const T* const* x, T* const* out) {
  if (tb == TB) return readout_<T, TB>(S, D, W, x, out);
  #pragma GCC unroll 16
  for (int u = 0; u < tb; ++u) readout_<T, 1>(S, D, W, x + u, out + u);
}

template <typename T>
void transpose(const T* __restrict__ a, T* __restrict__ at, int64_t R, int64_t C) {  // (R, C) -> (C, R)
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) at[j * R + i] = a[i * C + j];
}

template <typename T>
void noncausal_forward(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& s0,
                       const c10::optional<Tensor>& z0, bool normalize, int feature, Tensor& out, Tensor& den,
                       Tensor& s_n, Tensor& z_n) {
  const int64_t B = k.size(0), Hkv = k.size(1), Lk = k.size(2), D = k.size(3), Ev = v.size(3);
  const int64_t Lq = q.size(2), gq = q.size(1) / Hkv, H = q.size(1);
  Rows<T> Q(q), K(k), V(v), O(out);
  T* dn = normalize ? den.data_ptr<T>() : nullptr;
  T* sn = s_n.data_ptr<T>();
  T* zn = normalize ? z_n.data_ptr<T>() : nullptr;
  const T* S0 = (s0.has_value() && s0->defined()) ? s0->data_ptr<T>() : nullptr;
  const T* Z0 = (normalize && z0.has_value() && z0->defined()) ? z0->data_ptr<T>() : nullptr;
  at::parallel_for(0, B * Hkv, grain(std::max(Lq, Lk), D, Ev), [&](int64_t r0, int64_t r1) {
    std::vector<T> fb(TB * D);
    const T* xs[TB];
    const T* ys[TB];
    T* os[TB];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hkv, h = r % Hkv;
      T* __restrict__ S = sn + r * D * Ev;
      T* __restrict__ z = normalize ? zn + r * D : nullptr;
      init_state(S, S0 ? S0 + r * D * Ev : nullptr, D * Ev);
      if (normalize)
        init_state(z, Z0 ? Z0 + r * D : nullptr, D);
      for (int64_t t0 = 0; t0 < Lk; t0 += TB) {
        const int tb = static_cast<int>(std::min<int64_t>(TB, Lk - t0));
        #pragma GCC unroll 16
        for (int u = 0; u < tb; ++u) {
          xs[u] = features(feature, K.at(b, h, t0 + u), fb.data() + u * D, D);
          ys[u] = V.at(b, h, t0 + u);
          if (normalize)
            for (int64_t i = 0; i < D; ++i) z[i] += xs[u][i];
        }
        rank_update(S, D, Ev, tb, xs, ys);
      }
      for (int64_t j = 0; j < gq; ++j) {
        const int64_t hq = h * gq + j;
        for (int64_t t0 = 0; t0 < Lq; t0 += TB) {
          const int tb = static_cast<int>(std::min<int64_t>(TB, Lq - t0));
          #pragma GCC unroll 16
          for (int u = 0; u < tb; ++u) {
            xs[u] = features(feature, Q.at(b, hq, t0 + u), fb.data() + u * D, D);
            os[u] = O.at(b, hq, t0 + u);
          }
          readout(S, D, Ev, tb, xs, os);
          if (!normalize) continue;
          #pragma GCC unroll 16
          for (int u = 0; u < tb; ++u) {
            const T d = dot(xs[u], z, D);
            dn[(b * H + hq) * Lq + t0 + u] = d;
            const T inv = d == T(0) ? T(1) : T(1) / d;
            for (int64_t e = 0; e < Ev; ++e) os[u][e] *= inv;
          }
        }
      }
    }
  });
}

template <typename T>
void noncausal_backward(const Tensor& q, const Tensor& k, const Tensor& v, bool normalize, int feature,
                        const Tensor& out, const Tensor& den, const Tensor& s_n, const Tensor& z_n, const Tensor& dout,
                        const c10::optional<Tensor>& dden, const c10::optional<Tensor>& dsn,
                        const c10::optional<Tensor>& dzn, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& ds0,
                        Tensor& dz0) {
  const int64_t B = k.size(0), Hkv = k.size(1), Lk = k.size(2), D = k.size(3), Ev = v.size(3);
  const int64_t Lq = q.size(2), gq = q.size(1) / Hkv, H = q.size(1);
  Rows<T> Q(q), K(k), V(v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  const T* dn = normalize ? den.data_ptr<T>() : nullptr;
  const bool has_dden = normalize && dden.has_value() && dden->defined();
  const T* ddn = has_dden ? dden->data_ptr<T>() : nullptr;
  const T* sn = s_n.data_ptr<T>();
  const T* zn = normalize ? z_n.data_ptr<T>() : nullptr;
  const T* dSn = (dsn.has_value() && dsn->defined()) ? dsn->data_ptr<T>() : nullptr;
  const T* dZn = (normalize && dzn.has_value() && dzn->defined()) ? dzn->data_ptr<T>() : nullptr;
  T* dS0 = ds0.data_ptr<T>();
  T* dZ0 = normalize ? dz0.data_ptr<T>() : nullptr;
  at::parallel_for(0, B * Hkv, grain(std::max(Lq, Lk), D, Ev), [&](int64_t r0, int64_t r1) {
    std::vector<T> fb(TB * D), Gb(TB * Ev), ST(D * Ev), gd(TB);
    const T* xs[TB];
    const T* ys[TB];
    T* os[TB];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hkv, h = r % Hkv;
      T* __restrict__ dS = dS0 + r * D * Ev;
      T* __restrict__ dz = normalize ? dZ0 + r * D : nullptr;
      init_state(dS, dSn ? dSn + r * D * Ev : nullptr, D * Ev);
      if (normalize)
        init_state(dz, dZn ? dZn + r * D : nullptr, D);
      transpose(sn + r * D * Ev, ST.data(), D, Ev);
      const T* z = normalize ? zn + r * D : nullptr;
      for (int64_t j = 0; j < gq; ++j) {  // queries: dq, and dS, dz summed
        const int64_t hq = h * gq + j;
        for (int64_t t0 = 0; t0 < Lq; t0 += TB) {
          const int tb = static_cast<int>(std::min<int64_t>(TB, Lq - t0));
          #pragma GCC unroll 16
          for (int u = 0; u < tb; ++u) {
            const int64_t t = t0 + u;
            xs[u] = features(feature, Q.at(b, hq, t), fb.data() + u * D, D);
            const T* o = dO.at(b, hq, t);
            T* Gu = Gb.data() + u * Ev;
            ys[u] = Gu;
            os[u] = dQ.at(b, hq, t);
            if (!normalize) {
              for (int64_t e = 0; e < Ev; ++e) Gu[e] = o[e];
              continue;
            }
            const T d = dn[(b * H + hq) * Lq + t];
            const T inv = d == T(0) ? T(1) : T(1) / d;
            for (int64_t e = 0; e < Ev; ++e) Gu[e] = o[e] * inv;
            gd[u] = d == T(0) ? T(0) : -dot(o, O.at(b, hq, t), Ev) * inv;
            if (has_dden) gd[u] += ddn[(b * H + hq) * Lq + t];
          }
          readout(ST.data(), Ev, D, tb, ys, os);  // dq' = S G
          rank_update(dS, D, Ev, tb, xs, ys);      // dS += q' G^T
          #pragma GCC unroll 16
          for (int u = 0; u < tb; ++u) {
            if (normalize)
              for (int64_t i = 0; i < D; ++i) {
                os[u][i] += gd[u] * z[i];
                dz[i] += gd[u] * xs[u][i];
              }
            chain(feature, os[u], xs[u], D);
          }
        }
      }
      transpose(dS, ST.data(), D, Ev);  // now dS^T
      for (int64_t t0 = 0; t0 < Lk; t0 += TB) {  // keys: dv = dS^T k', dk' = dS v + dz
        const int tb = static_cast<int>(std::min<int64_t>(TB, Lk - t0));
        #pragma GCC unroll 16
        for (int u = 0; u < tb; ++u) {
          xs[u] = features(feature, K.at(b, h, t0 + u), fb.data() + u * D, D);
          os[u] = dV.at(b, h, t0 + u);
        }
        readout(dS, D, Ev, tb, xs, os);
        #pragma GCC unroll 16
        for (int u = 0; u < tb; ++u) {
          ys[u] = V.at(b, h, t0 + u);
          os[u] = dK.at(b, h, t0 + u);
        }
        readout(ST.data(), Ev, D, tb, ys, os);
        #pragma GCC unroll 16
        for (int u = 0; u < tb; ++u) {
          if (normalize)
            for (int64_t i = 0; i < D; ++i) os[u][i] += dz[i];
          chain(feature, os[u], xs[u], D);
        }
      }
    }
  });
}

// ---- entry points --------------------------------------------------------------------------------

std::vector<Tensor> forward(Tensor q, Tensor k, Tensor v, c10::optional<Tensor> log_g, c10::optional<Tensor> s0,
                            c10::optional<Tensor> z0, bool causal, bool normalize, int64_t feature) {
  q = last_contiguous(q);
  k = last_contiguous(k);
  v = last_contiguous(v);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Ev = v.size(3);
  TORCH_CHECK(!causal || k.size(2) == L, "the causal kernel needs equal query and key lengths");
  TORCH_CHECK(causal || !(log_g.has_value() && log_g->defined()), "gates (decay) need the causal form");
  TORCH_CHECK(feature == 0 || feature == 1, "unknown fused feature map ", feature);
  auto opts = v.options();
  Tensor out = at::empty({B, H, L, Ev}, opts);
  Tensor den = normalize ? at::empty({B, H, L, 1}, opts) : at::empty({0}, opts);
  Tensor s_n = at::empty({B, Hkv, D, Ev}, opts);
  Tensor z_n = normalize ? at::empty({B, Hkv, D}, opts) : at::empty({0}, opts);
  c10::optional<Tensor> lg;
  if (log_g.has_value() && log_g->defined()) lg = log_g->to(at::kDouble).contiguous();
  Gates gates(lg, Hkv);
  c10::optional<Tensor> s0c, z0c;
  if (s0.has_value() && s0->defined()) s0c = s0->contiguous();
  if (z0.has_value() && z0->defined()) z0c = z0->contiguous();
  const int f = static_cast<int>(feature);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastattn_linear_forward", [&] {
    if (!causal)
      noncausal_forward<scalar_t>(q, k, v, s0c, z0c, normalize, f, out, den, s_n, z_n);
    else if (gates.any())
      causal_forward<scalar_t, true>(q, k, v, gates, s0c, z0c, normalize, f, out, den, s_n, z_n);
    else
      causal_forward<scalar_t, false>(q, k, v, gates, s0c, z0c, normalize, f, out, den, s_n, z_n);
  });
  return {out, den, s_n, z_n};
}

std::vector<Tensor> backward(Tensor q, Tensor k, Tensor v, c10::optional<Tensor> log_g, c10::optional<Tensor> s0,
                             c10::optional<Tensor> z0, Tensor out, Tensor den, Tensor s_n, Tensor z_n,
                             Tensor dout, c10::optional<Tensor> dden, c10::optional<Tensor> dsn,
                             c10::optional<Tensor> dzn, bool causal, bool normalize, int64_t feature) {
  q = last_contiguous(q);
  k = last_contiguous(k);
  v = last_contiguous(v);
  out = last_contiguous(out);
  dout = last_contiguous(dout);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Ev = v.size(3);
  auto opts = v.options();
  auto present = [](const c10::optional<Tensor>& x) { return x.has_value() && x->defined(); };
  TORCH_CHECK(feature == 0 || feature == 1, "unknown fused feature map ", feature);
  Tensor dq = at::empty({B, H, L, D}, opts), dk = at::empty({B, Hkv, L, D}, opts);
  Tensor dv = at::empty({B, Hkv, L, Ev}, opts);
  Tensor ds0 = at::empty({B, Hkv, D, Ev}, opts);
  Tensor dz0 = normalize ? at::empty({B, Hkv, D}, opts) : at::empty({0}, opts);
  c10::optional<Tensor> lg;
  if (present(log_g)) lg = log_g->to(at::kDouble).contiguous();
  Gates gates(lg, Hkv);
  Tensor dcum = gates.any() ? at::empty({B, Hkv, L}, opts) : at::empty({0}, opts);
  auto cont = [&](const c10::optional<Tensor>& x) -> c10::optional<Tensor> {
    if (present(x)) return x->contiguous();
    return c10::nullopt;
  };
  Tensor denc = normalize ? den.contiguous() : den;
  const int f = static_cast<int>(feature);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fastattn_linear_backward", [&] {
    if (!causal)
      noncausal_backward<scalar_t>(q, k, v, normalize, f, out, denc, s_n.contiguous(),
                                   normalize ? z_n.contiguous() : z_n, dout, cont(dden), cont(dsn), cont(dzn), dq, dk,
                                   dv, ds0, dz0);
    else if (gates.any())
      causal_backward<scalar_t, true>(q, k, v, gates, cont(s0), cont(z0), normalize, f, out, denc, dout, cont(dden),
                                      cont(dsn), cont(dzn), dq, dk, dv, ds0, dz0, dcum);
    else
      causal_backward<scalar_t, false>(q, k, v, gates, cont(s0), cont(z0), normalize, f, out, denc, dout,
                                       cont(dden), cont(dsn), cont(dzn), dq, dk, dv, ds0, dz0, dcum);
  });
  return {dq, dk, dv, ds0, dz0, dcum};
}

}  // namespace

void fastattn_bind_sparse(pybind11::module_& m);  // the block-sparse kernels: ../sparse/sparse_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "linear attention forward: (out, den, s_n, z_n)");
  m.def("backward", &backward, "linear attention backward: (dq, dk, dv, ds0, dz0, dcum)");
  fastattn_bind_sparse(m);
}
