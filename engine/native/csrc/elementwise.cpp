// The decoder's elementwise work: RMSNorm fused with its residual add, rotary embedding in place, SiLU * up.
// Each op rounds to the activation dtype where the PyTorch reference does, so both paths agree bit for bit
// up to the order of float sums.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "vec_utils.h"

namespace pagedserve {
namespace {

constexpr int64_t kRowsPerTask = 16;

template <typename scalar_t>
void rms_norm_row(const scalar_t* x, const scalar_t* residual, const scalar_t* weight, scalar_t* out,
                  scalar_t* sum_out, int64_t hidden, float eps) {
  Vec squares(0.f);
  for (int64_t i = 0; i < hidden; i += kVecSize) {
    const int64_t width = std::min(kVecSize, hidden - i);
    Vec value = load_float(x + i, width);
    if (residual) value = value + load_float(residual + i, width);
    store_float(sum_out + i, value, width);
    value = load_float(sum_out + i, width);  // rounded to scalar_t, as the reference's add is
    squares = at::vec::fmadd(value, value, squares);
  }
  const Vec inverse_rms(1.f / std::sqrt(lane_sum(squares) / hidden + eps));
  for (int64_t i = 0; i < hidden; i += kVecSize) {
    const int64_t width = std::min(kVecSize, hidden - i);
    store_float(out + i, load_float(sum_out + i, width) * inverse_rms, width);
    store_float(out + i, load_float(weight + i, width) * load_float(out + i, width), width);
  }
}

template <typename scalar_t>
void rotate_row(scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t half) {
  for (int64_t d = 0; d < half; ++d) {
    const float first = static_cast<float>(x[d]);
    const float second = static_cast<float>(x[d + half]);
    x[d] = static_cast<scalar_t>(round_to<scalar_t>(first * static_cast<float>(cos[d])) +
                                 round_to<scalar_t>(-second * static_cast<float>(sin[d])));
    x[d + half] = static_cast<scalar_t>(round_to<scalar_t>(second * static_cast<float>(cos[d + half])) +
                                        round_to<scalar_t>(first * static_cast<float>(sin[d + half])));
  }
}

template <typename scalar_t>
void silu_and_mul_row(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t size) {
  alignas(64) float silu[kVecSize];
  for (int64_t i = 0; i < size; i += kVecSize) {
    const int64_t width = std::min(kVecSize, size - i);
    const Vec g = load_float(gate + i, width);
    (g / (Vec(1.f) + g.neg().exp_u20())).store(silu);
    for (int64_t j = 0; j < width; ++j) silu[j] = round_to<scalar_t>(silu[j]);
    store_float(out + i, Vec::loadu(silu) * load_float(up + i, width), width);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("pagedserve::rms_norm", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm takes contiguous x [T, H] and weight [H]");
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_residual || (residual->is_contiguous() && residual->sizes() == x.sizes()),
              "the residual must be contiguous and shaped like x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = at::empty_like(x);
  const int64_t hidden = x.size(1);
  PAGEDSERVE_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* res = has_residual ? residual->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rms_norm_row(x.data_ptr<scalar_t>() + t * hidden, res ? res + t * hidden : nullptr, weight.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>() + t * hidden, sum.data_ptr<scalar_t>() + t * hidden, hidden,
                     static_cast<float>(eps));
      }
    });
  });
  return {out, sum};
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("pagedserve::rotary_", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, D], heads contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2) &&
                  sin.numel() == cos.numel(), "cos and sin must be contiguous [T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "angles and x must share a dtype");
  const int64_t dim = x.size(2);
  PAGEDSERVE_DISPATCH(x.scalar_type(), "rotary", [&] {
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < x.size(1); ++h) {
          rotate_row(x.data_ptr<scalar_t>() + t * x.stride(0) + h * dim, cos.data_ptr<scalar_t>() + t * dim,
                     sin.data_ptr<scalar_t>() + t * dim, dim / 2);
        }
      }
    });
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  RECORD_FUNCTION("pagedserve::silu_and_mul", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_and_mul takes a contiguous [T, 2 * I] tensor");
  const int64_t size = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), size}, gate_up.options());
  PAGEDSERVE_DISPATCH(gate_up.scalar_type(), "silu_and_mul", [&] {
    at::parallel_for(0, gate_up.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = gate_up.data_ptr<scalar_t>() + t * 2 * size;
        silu_and_mul_row(row, row + size, out.data_ptr<scalar_t>() + t * size, size);
      }
    });
  });
  return out;
}

}  // namespace pagedserve
