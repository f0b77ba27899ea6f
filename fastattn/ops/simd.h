// Explicit SIMD shared by the compiled CPU kernels (ops/linear/linear_cpu.cpp, ops/sparse/sparse_cpu.cpp),
// through GCC/Clang vector extensions: a vector is 64 bytes (one AVX-512 register, two AVX2 ones, four SSE
// ones: the compiler splits it for the target). Both sources include this one header; the build hashes it.
#pragma once

#include <cstdint>

typedef float F16 __attribute__((vector_size(64)));
typedef double D8 __attribute__((vector_size(64)));
typedef int I16 __attribute__((vector_size(64)));

// The sum of the lanes of a 64-byte vector: halves added as vectors (a tree of log2 steps in registers,
// not a serial chain of scalar adds or a round trip through memory).
inline float lane_sum(F16 x) {
  auto a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  auto b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  auto c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

inline double lane_sum(D8 x) {
  auto a = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  auto b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// Loads, stores and broadcasts of the 64-byte vector of T (N lanes).
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(64)));
  static constexpr int64_t N = 64 / sizeof(T);
  static V load(const T* p) {
    V x;
    __builtin_memcpy(&x, p, sizeof(V));
    return x;
  }
  static void store(T* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }
  static V splat(T x) { return V{} + x; }
  static T hsum(V x) { return lane_sum(x); }
};

// exp of float32 lanes already clamped to [-87, 88] (Cephes' expf polynomial, about 1 ulp). The callers
// decide what happens below -87: the linear kernels keep exp(-87) ~ 2e-38 (a feature that small adds
// nothing), the block-sparse ones return 0 (masked scores must weigh exactly nothing).
inline F16 exp_clamped(F16 y) {
  const F16 n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const F16 r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  F16 p = F16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  F16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(F16));
  return p * scale;
}
