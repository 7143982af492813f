// One-row matmul (y = x W^T + b for a single token) streaming a plain [N, K] weight: at one row the matmul is
// bound by reading the weight, and a plain row-major stream reads faster than oneDNN's blocked layout.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "vec_utils.h"

namespace pagedserve {
namespace {

constexpr int64_t kMinRowsPerTask = 128;

template <typename scalar_t>
void gemv_rows(const scalar_t* weight, const float* x, const scalar_t* bias, scalar_t* out, int64_t first,
               int64_t last, int64_t k) {
  for (int64_t n = first; n < last; ++n) {
    const float value = dot(weight + n * k, x, k) + (bias ? static_cast<float>(bias[n]) : 0.f);
    out[n] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t>
void int8_gemv_rows(const int8_t* codes, const scalar_t* scales, const float* x, const scalar_t* bias, scalar_t* out,
                    int64_t first, int64_t last, int64_t k) {
  for (int64_t n = first; n < last; ++n) {
    const float value = dot(codes + n * k, x, k) * static_cast<float>(scales[n]);
    out[n] = static_cast<scalar_t>(value + (bias ? static_cast<float>(bias[n]) : 0.f));
  }
}

}  // namespace

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("pagedserve::int8_gemv", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.scalar_type() == at::kChar && x.size(1) == codes.size(1) && scales.numel() == codes.size(0),
              "int8_gemv takes x [1, K], contiguous int8 codes [N, K] and scales [N]");
  TORCH_CHECK(x.stride(1) == 1 && scales.is_contiguous() && scales.scalar_type() == x.scalar_type(),
              "int8_gemv: x must have contiguous columns, scales be contiguous and of x's dtype");
  const bool has_bias = bias.has_value() && bias->defined() && bias->numel();
  const int64_t n = codes.size(0), k = codes.size(1);
  at::Tensor out = at::empty({1, n}, x.options());
  std::vector<float> x_float(k);
  PAGEDSERVE_DISPATCH(x.scalar_type(), "int8_gemv", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < k; ++i) x_float[i] = static_cast<float>(x_ptr[i]);
    const scalar_t* bias_ptr = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
      int8_gemv_rows(codes.data_ptr<int8_t>(), scales.data_ptr<scalar_t>(), x_float.data(), bias_ptr,
                     out.data_ptr<scalar_t>(), begin, end, k);
    });
  });
  return out;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("pagedserve::gemv", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && weight.dim() == 2 && weight.is_contiguous() &&
                  x.size(1) == weight.size(1), "gemv takes x [1, K] and a contiguous weight [N, K]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  const bool has_bias = bias.has_value() && bias->defined() && bias->numel();
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.stride(1) == 1, "x must have contiguous columns");
  at::Tensor out = at::empty({1, n}, x.options());
  std::vector<float> x_float(k);
  PAGEDSERVE_DISPATCH(x.scalar_type(), "gemv", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < k; ++i) x_float[i] = static_cast<float>(x_ptr[i]);
    const scalar_t* bias_ptr = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
      gemv_rows(weight.data_ptr<scalar_t>(), x_float.data(), bias_ptr, out.data_ptr<scalar_t>(), begin, end, k);
    });
  });
  return out;
}

}  // namespace pagedserve
