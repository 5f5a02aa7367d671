// Vectors of floats for the kernels that tile their products in registers (kvzip_score.cpp, attention.cpp),
// their shared logit tile, and the exp of the softmax weights and the head-dim dispatch (decode.cpp too):
// GCC/Clang vector extensions, so the code has no intrinsics and builds for any target.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace kvk {

// The vector width fills the registers without spilling the kernels' tiles: 32 registers of 16 floats with
// AVX-512, 16 registers of 8 floats otherwise (AVX2; two NEON registers per vector on AArch64).
#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int REGISTERS = 32;
#else
constexpr int LANES = 8;
constexpr int REGISTERS = 16;
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));
typedef float unaligned_vec __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<unaligned_vec*>(p) = x; }
inline vec splat(float x) { return vec{} + x; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// Horizontal max and sum by halving: log2(LANES) shuffles, not LANES scalar steps.
template <typename Op>
inline float reduce(vec x, Op op) {
#if defined(__AVX512F__)
  x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#else
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
  return x[0];
}

inline float hmax(vec x) { return reduce(x, vmax); }
inline float hsum(vec x) { return reduce(x, [](vec a, vec b) { return a + b; }); }

// 0, 1, .., LANES - 1.
inline vec iota() {
  vec x;
  for (int i = 0; i < LANES; ++i) x[i] = static_cast<float>(i);
  return x;
}

// exp(x) for x <= 0, of one float or lane by lane of a vector (std::exp is a scalar libm call: about half
// a decode kernel's time): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial
// (relative error below 2e-7, about 2 ulp), 2^n built in the exponent bits; below -87 the result is about
// 1e-38, and callers select 0 for lanes that must not count.
template <typename T>
inline T exp_nonpositive(T x) {
  constexpr bool scalar = std::is_same_v<T, float>;
  static_assert(scalar || std::is_same_v<T, vec>, "float or vec");
  if constexpr (scalar) {
    x = std::max(x, -87.f);
  } else {
    x = vmax(x, splat(-87.f));
  }
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const T n = (x * 1.44269504088896341f + shifter) - shifter;
  const T r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;  // ln2 split: exact n * hi
  T p = r * (1.f / 720.f) + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  if constexpr (scalar) {
    return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  } else {
    return p * __builtin_bit_cast(vec, (__builtin_convertvector(n, ivec) + 127) << 23);
  }
}

// The logit tile shared by the scoring kernels: ROWS query rows x KEYS keys of accumulators (keys are the
// lanes), fed per channel by KEY_VECS vector loads of keys and ROWS broadcasts of query values. 3 x 4
// vectors measured fastest with AVX-512 (12 accumulators of the 32 registers); 2 x 4 with 16 registers.
constexpr int KEY_VECS = REGISTERS == 32 ? 3 : 2;
constexpr int64_t KEYS = KEY_VECS * LANES;  // keys per tile; exported (kvk_keys_per_tile)
constexpr int ROWS = 4;

// acc[i][u] = q[row[i]] . keys j0 + u * LANES .. of kt [D, M] (keys contiguous, transposed).
template <int D>
inline void logit_tile(const float* q, const int64_t* row, const float* kt, int64_t M, int64_t j0,
                       vec (&acc)[ROWS][KEY_VECS]) {
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < KEY_VECS; ++u) acc[i][u] = vec{};
  for (int d = 0; d < D; ++d) {
    vec k[KEY_VECS];
    for (int u = 0; u < KEY_VECS; ++u) k[u] = load(kt + d * M + j0 + u * LANES);
    for (int i = 0; i < ROWS; ++i) {
      const float qs = q[row[i] * D + d];
      for (int u = 0; u < KEY_VECS; ++u) acc[i][u] += k[u] * qs;
    }
  }
}

// The kernel instance for head dim D (kvkernels' head dims: 64, 80, 96, 128, 256), or null: pick(d) returns the
// instance for the compile-time head dim decltype(d)::value.
template <typename Pick>
auto for_head_dim(int64_t D, Pick pick) -> decltype(pick(std::integral_constant<int, 64>{})) {
  switch (D) {
    case 64: return pick(std::integral_constant<int, 64>{});
    case 80: return pick(std::integral_constant<int, 80>{});
    case 96: return pick(std::integral_constant<int, 96>{});
    case 128: return pick(std::integral_constant<int, 128>{});
    case 256: return pick(std::integral_constant<int, 256>{});
    default: return nullptr;
  }
}

}  // namespace kvk
