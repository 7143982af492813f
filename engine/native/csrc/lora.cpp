// LoRA for a step that mixes adapters (engine/layers/lora.py has the layout and the PyTorch reference): each
// token adds x A_s^T B_s of its slot s. A run of at least kMinRunForMatmul consecutive tokens of one slot (a
// prefill chunk) takes two matmuls per stacked part; the other tokens (decodes) take one fused pass each, shrink
// into floats then expand within each part's own columns, with no matmul call per token.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <utility>
#include <vector>

#include "kernels.h"
#include "vec_utils.h"

namespace pagedserve {
namespace {

constexpr int64_t kMinRunForMatmul = 8;

struct LoRAShape {
  int64_t k, n, rows, rank;  // in features, out features, rows per slot (parts x rank), rank per part
  std::vector<int64_t> part_starts, part_ends;  // each part's output columns
};

// out += z[rows] B[rows, start:end] for one part's rows, a vector of columns at a time through all its rows.
template <typename scalar_t>
void expand_part(scalar_t* out, const float* shrunk, const scalar_t* b, int64_t n, int64_t first_row, int64_t rank,
                 int64_t start, int64_t end) {
  for (int64_t i = start; i < end; i += kVecSize) {
    const int64_t width = std::min(kVecSize, end - i);
    Vec sum = load_float(out + i, width);
    for (int64_t r = first_row; r < first_row + rank; ++r) {
      sum = at::vec::fmadd(Vec(shrunk[r]), load_float(b + r * n + i, width), sum);
    }
    store_float(out + i, sum, width);
  }
}

template <typename scalar_t>
void lora_token(scalar_t* out, const scalar_t* x, const scalar_t* a, const scalar_t* b, const LoRAShape& shape) {
  std::vector<float> x_float(shape.k), shrunk(shape.rows);
  for (int64_t i = 0; i < shape.k; ++i) x_float[i] = static_cast<float>(x[i]);
  for (int64_t r = 0; r < shape.rows; ++r) shrunk[r] = dot(a + r * shape.k, x_float.data(), shape.k);
  for (size_t p = 0; p < shape.part_starts.size(); ++p) {
    expand_part(out, shrunk.data(), b, shape.n, static_cast<int64_t>(p) * shape.rank, shape.rank,
                shape.part_starts[p], shape.part_ends[p]);
  }
}

void lora_run(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, int64_t slot,
              const LoRAShape& shape) {
  const at::Tensor shrunk = at::mm(x, a[slot].t());
  for (size_t p = 0; p < shape.part_starts.size(); ++p) {
    const int64_t start = shape.part_starts[p], width = shape.part_ends[p] - start;
    out.narrow(1, start, width).addmm_(shrunk.narrow(1, p * shape.rank, shape.rank),
                                       b[slot].narrow(0, p * shape.rank, shape.rank).narrow(1, start, width));
  }
}

// (start, length, slot) of each run of one slot, and the tokens outside long runs that have a slot.
std::pair<std::vector<std::tuple<int64_t, int64_t, int64_t>>, std::vector<int64_t>> split_runs(
    const at::Tensor& token_slots) {
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  std::vector<std::tuple<int64_t, int64_t, int64_t>> runs;
  std::vector<int64_t> single;
  for (int64_t start = 0, end = 0; start < token_slots.numel(); start = end) {
    while (end < token_slots.numel() && slots[end] == slots[start]) ++end;
    if (slots[start] < 0) continue;
    if (end - start >= kMinRunForMatmul) {
      runs.emplace_back(start, end - start, slots[start]);
    } else {
      for (int64_t t = start; t < end; ++t) single.push_back(t);
    }
  }
  return {runs, single};
}

LoRAShape lora_shape(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& part_ends) {
  LoRAShape shape{a.size(2), b.size(2), a.size(1), a.size(1) / static_cast<int64_t>(part_ends.size()), {}, {}};
  int64_t start = 0;
  for (const int64_t end : part_ends) {
    shape.part_starts.push_back(start);
    shape.part_ends.push_back(end);
    start = end;
  }
  return shape;
}

}  // namespace

void lora_(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
           const at::Tensor& token_slots, at::IntArrayRef part_ends) {
  RECORD_FUNCTION("pagedserve::lora_", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() && a.size(1) == b.size(1),
              "lora_ takes contiguous a [slots, R, K] and b [slots, R, N]");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.dim() == 2 && out.is_contiguous() && x.size(1) == a.size(2) &&
                  out.size(1) == b.size(2) && x.size(0) == out.size(0) && token_slots.numel() == x.size(0),
              "lora_ takes contiguous x [T, K] and out [T, N], and one slot per token");
  TORCH_CHECK(!part_ends.empty() && a.size(1) % static_cast<int64_t>(part_ends.size()) == 0 &&
                  part_ends.back() == b.size(2), "lora_: part_ends must split the output columns into R-row parts");
  TORCH_CHECK(token_slots.scalar_type() == at::kLong && token_slots.is_contiguous(), "token_slots must be int64");
  const LoRAShape shape = lora_shape(a, b, part_ends.vec());
  const auto [runs, single] = split_runs(token_slots);
  for (const auto& [start, length, slot] : runs) {
    at::Tensor rows = out.narrow(0, start, length);
    lora_run(rows, x.narrow(0, start, length), a, b, slot, shape);
  }
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  PAGEDSERVE_DISPATCH(x.scalar_type(), "lora_", [&] {
    at::parallel_for(0, static_cast<int64_t>(single.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = single[i], slot = slots[t];
        lora_token(out.data_ptr<scalar_t>() + t * shape.n, x.data_ptr<scalar_t>() + t * shape.k,
                   a.data_ptr<scalar_t>() + slot * shape.rows * shape.k,
                   b.data_ptr<scalar_t>() + slot * shape.rows * shape.n, shape);
      }
    });
  });
}

}  // namespace pagedserve
