// Loads and stores between float vectors and the cache/activation dtypes (float32, bfloat16).
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

namespace pagedserve {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVecSize = Vec::size();

// `n` (at most kVecSize) elements of `p` as floats; the lanes past `n` are zero.
inline Vec load_float(const float* p, int64_t n = kVecSize) {
  return n == kVecSize ? Vec::loadu(p) : Vec::loadu(p, n);
}

inline Vec load_float(const c10::BFloat16* p, int64_t n = kVecSize) {
  if (n == kVecSize) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  alignas(64) float buffer[kVecSize] = {};
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
  return Vec::loadu(buffer);
}

inline Vec load_float(const int8_t* p, int64_t n = kVecSize) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n == kVecSize) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
  alignas(64) float buffer[kVecSize] = {};
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
  return Vec::loadu(buffer);
}

inline void store_float(float* p, const Vec& v, int64_t n = kVecSize) { v.store(p, n); }

inline void store_float(c10::BFloat16* p, const Vec& v, int64_t n = kVecSize) {
  if (n == kVecSize) {
    at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, n);
    return;
  }
  alignas(64) float buffer[kVecSize];
  v.store(buffer);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<c10::BFloat16>(buffer[i]);
}

// Rounds a float to `scalar_t` and back: the rounding PyTorch applies after each op in that dtype.
template <typename scalar_t>
inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

}  // namespace pagedserve

// Runs the body with scalar_t bound to float or c10::BFloat16, the dtypes the native kernels take.
#define PAGEDSERVE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pagedserve {

// Sum and maximum of a vector's lanes (Vectorized::reduce_add and reduce_max do not compile for ATen's portable
// vectors).
inline float lane_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  alignas(64) float lanes[kVecSize];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < kVecSize; ++i) total += lanes[i];
  return total;
#endif
}

inline float lane_max(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  alignas(64) float lanes[kVecSize];
  v.store(lanes);
  return *std::max_element(lanes, lanes + kVecSize);
#endif
}

}  // namespace pagedserve

namespace pagedserve {

// a . b for n elements, `a` in float32, bfloat16 or int8, in two independent FMA chains.
template <typename scalar_t>
inline float dot(const scalar_t* a, const float* b, int64_t n) {
  Vec even(0.f), odd(0.f);
  int64_t i = 0;
  for (; i + 2 * kVecSize <= n; i += 2 * kVecSize) {
    even = at::vec::fmadd(load_float(a + i), Vec::loadu(b + i), even);
    odd = at::vec::fmadd(load_float(a + i + kVecSize), Vec::loadu(b + i + kVecSize), odd);
  }
  for (; i < n; i += kVecSize) {
    const int64_t width = std::min(kVecSize, n - i);
    even = at::vec::fmadd(load_float(a + i, width), Vec::loadu(b + i, width), even);
  }
  return lane_sum(even + odd);
}

}  // namespace pagedserve
