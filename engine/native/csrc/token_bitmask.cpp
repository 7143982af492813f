// Grammar masks (engine/structured_output/bitmask.py has the PyTorch reference): in each constrained row, every
// logit whose bit is clear in the row's token bitmask becomes -inf. Words with every bit set are skipped, so a row
// costs one read of its bitmask and a write of the tokens it bans.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kernels.h"

namespace pagedserve {

void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous float32 [rows, vocab] tensor");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous(),
              "bitmask must be a contiguous int32 [rows, words] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64");
  const int64_t vocab = logits.size(1);
  const int64_t words = bitmask.size(1);
  TORCH_CHECK(words * 32 >= vocab, "the bitmask covers ", words * 32, " tokens, fewer than the vocabulary ", vocab);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < std::min(logits.size(0), bitmask.size(0)), "row out of range");
  }
  float* out = logits.data_ptr<float>();
  const auto* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const float banned = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = out + row_ids[i] * vocab;
      const uint32_t* row_bits = bits + row_ids[i] * words;
      for (int64_t word = 0; word * 32 < vocab; ++word) {
        const uint32_t allowed = row_bits[word];
        if (allowed == UINT32_MAX) continue;
        float* logit = row + word * 32;
        const int64_t width = std::min<int64_t>(32, vocab - word * 32);
        for (int64_t bit = 0; bit < width; ++bit) {  // branch-free, so it vectorizes
          logit[bit] = ((allowed >> bit) & 1u) ? logit[bit] : banned;
        }
      }
    }
  });
}

}  // namespace pagedserve
