// The fp8 KV cache (engine/attention/fp8.py): float8_e4m3fn and float8_e5m2 loads as float vectors, the stores
// of value / scale saturated to the fp8 range, and the dispatch over a cache in the model's dtype or in fp8.
#pragma once

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>

#include "vec_utils.h"

namespace pagedserve {

inline bool is_fp8(at::ScalarType type) { return type == at::kFloat8_e4m3fn || type == at::kFloat8_e5m2; }

// An optional scale tensor's value; 1 when there is none.
inline float scale_value(const std::optional<at::Tensor>& scale) {
  if (!scale) return 1.f;
  TORCH_CHECK(scale->numel() == 1 && scale->scalar_type() == at::kFloat, "a cache scale is one float32");
  return scale->item<float>();
}

// Every value of an fp8 type as a float, indexed by its bits.
template <typename fp8_t>
const std::array<float, 256>& fp8_values() {
  static const std::array<float, 256> values = [] {
    std::array<float, 256> table{};
    for (int bits = 0; bits < 256; ++bits) table[bits] = static_cast<float>(fp8_t(bits, fp8_t::from_bits()));
    return table;
  }();
  return values;
}

// `n` (at most kVecSize) fp8 values as floats, looked up by their bits; the lanes past `n` are zero.
template <typename fp8_t>
inline Vec load_fp8(const fp8_t* p, int64_t n) {
  const float* table = fp8_values<fp8_t>().data();
  const auto* bits = reinterpret_cast<const uint8_t*>(p);
#if defined(CPU_CAPABILITY_AVX512)
  if (n == kVecSize) return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)bits)), table, 4);
#endif
  alignas(64) float buffer[kVecSize] = {};
  for (int64_t i = 0; i < n; ++i) buffer[i] = table[bits[i]];
  return Vec::loadu(buffer);
}

inline Vec load_float(const c10::Float8_e4m3fn* p, int64_t n = kVecSize) { return load_fp8(p, n); }
inline Vec load_float(const c10::Float8_e5m2* p, int64_t n = kVecSize) { return load_fp8(p, n); }

// dst[i] = src[i] / scale saturated to the fp8 range, rounded to nearest even, for i < n.
template <typename fp8_t, typename scalar_t>
inline void store_fp8(const scalar_t* src, fp8_t* dst, int64_t n, float scale) {
  const float limit = static_cast<float>(std::numeric_limits<fp8_t>::max());
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8_t(std::clamp(static_cast<float>(src[i]) / scale, -limit, limit));
}

// Runs body(cache_t()) with cache_t the element type of a cache of `type`: an fp8 type, or the model's `scalar_t`.
template <typename scalar_t, typename Body>
void dispatch_cache(at::ScalarType type, const Body& body) {
  if (type == at::kFloat8_e4m3fn) return body(c10::Float8_e4m3fn());
  if (type == at::kFloat8_e5m2) return body(c10::Float8_e5m2());
  body(scalar_t());
}

}  // namespace pagedserve
