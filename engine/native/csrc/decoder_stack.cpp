#include "decoder_stack.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>

#include "kernels.h"

namespace pagedserve {
namespace {

std::optional<at::Tensor> bias_or_none(const at::Tensor& bias) {
  return bias.numel() ? std::optional<at::Tensor>(bias) : std::nullopt;
}

// oneDNN's matmul over a weight reordered by mkldnn::_reorder_linear_weight.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

at::Tensor quantized_linear(const at::Tensor& x, const Matmul& matmul) {
  if (x.size(0) == 1 && matmul.quantized.scalar_type() == at::kChar) {
    return int8_gemv(x, matmul.quantized, matmul.scales, bias_or_none(matmul.bias));
  }
  at::Tensor out = matmul.quantized.scalar_type() == at::kByte
      ? at::_weight_int4pack_mm_for_cpu(x, matmul.quantized, x.size(1) / matmul.scales.size(0), matmul.scales)
      : at::_weight_int8pack_mm(x, matmul.quantized, matmul.scales);
  return matmul.bias.numel() ? out.add_(matmul.bias) : out;
}

std::vector<int64_t> int64s(const at::Tensor& values) {
  if (!values.numel()) return {};
  const at::Tensor longs = values.to(at::kLong).contiguous();
  return {longs.data_ptr<int64_t>(), longs.data_ptr<int64_t>() + longs.numel()};
}

Matmul matmul_at(std::vector<at::Tensor>::const_iterator w) {
  return {w[0], w[1], w[2], w[3], w[4], w[5], w[6], int64s(w[7])};
}

std::optional<at::Tensor> scale_or_none(const at::Tensor& scale) {
  return scale.numel() ? std::optional<at::Tensor>(scale) : std::nullopt;
}

}  // namespace

DecoderStack::DecoderStack(std::vector<at::Tensor> weights, at::Tensor final_norm, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, double eps, int64_t dense_rows)
    : final_norm_(std::move(final_norm)), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
      eps_(eps), scale_(1.0 / std::sqrt(static_cast<double>(head_dim))), dense_rows_(dense_rows) {
  TORCH_CHECK(weights.size() % kWeightsPerLayer == 0, "expected ", kWeightsPerLayer, " weights per layer");
  for (auto w = weights.cbegin(); w != weights.cend(); w += kWeightsPerLayer) {
    auto m = w + 2;
    layers_.push_back({w[0], w[1], matmul_at(m), matmul_at(m + kWeightsPerMatmul),
                       matmul_at(m + 2 * kWeightsPerMatmul), matmul_at(m + 3 * kWeightsPerMatmul)});
  }
}

at::Tensor DecoderStack::linear(const at::Tensor& x, const Matmul& matmul, const at::Tensor& lora_slots) const {
  at::Tensor out;
  const std::optional<at::Tensor> bias = bias_or_none(matmul.bias);
  if (matmul.quantized.numel() && (dense_rows_ == 0 || x.size(0) < dense_rows_)) {
    out = quantized_linear(x, matmul);
  } else if (x.size(0) == 1 && matmul.plain.numel()) {
    out = gemv(x, matmul.plain, bias);
  } else {
    out = matmul.packed.numel() ? packed_linear(x, matmul.packed, bias) : at::linear(x, matmul.plain, bias);
  }
  if (lora_slots.numel() && matmul.lora_a.numel()) lora_(out, x, matmul.lora_a, matmul.lora_b, lora_slots,
                                                         matmul.lora_part_ends);
  return out;
}

at::Tensor DecoderStack::attention(const at::Tensor& normed, const LayerWeights& layer, const at::Tensor& cos,
                                   const at::Tensor& sin, const KVCache& cache, const at::Tensor& slot_mapping,
                                   const at::Tensor& block_tables, const at::Tensor& context_lens,
                                   const at::Tensor& query_start_loc, const at::Tensor& lora_slots) const {
  const int64_t tokens = normed.size(0);
  const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
  at::Tensor qkv = linear(normed, layer.qkv, lora_slots);
  at::Tensor query_key = qkv.narrow(1, 0, q_size + kv_size).view({tokens, num_heads_ + num_kv_heads_, head_dim_});
  rotary_(query_key, cos, sin);
  at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads_, head_dim_});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
  at::Tensor k_cache = cache.k, v_cache = cache.v;
  write_kv_cache(k, v, k_cache, v_cache, slot_mapping, cache.k_scale, cache.v_scale);
  at::Tensor out = at::empty({tokens, num_heads_, head_dim_}, qkv.options());
  paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale_, out, cache.k_scale,
                  cache.v_scale);
  return linear(out.view({tokens, q_size}), layer.o, lora_slots);
}

at::Tensor DecoderStack::forward(at::Tensor hidden, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> k_caches,
                                 std::vector<at::Tensor> v_caches, std::vector<at::Tensor> k_scales,
                                 std::vector<at::Tensor> v_scales, at::Tensor slot_mapping, at::Tensor block_tables,
                                 at::Tensor context_lens, at::Tensor query_start_loc,
                                 at::Tensor lora_slots) const {
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one KV cache per layer");
  TORCH_CHECK(k_scales.size() == layers_.size() && v_scales.size() == layers_.size(), "one k and v scale per layer");
  at::Tensor residual, normed;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerWeights& layer = layers_[i];
    std::tie(normed, residual) = rms_norm(hidden, residual, layer.input_norm, eps_);
    const KVCache cache{k_caches[i], v_caches[i], scale_or_none(k_scales[i]), scale_or_none(v_scales[i])};
    hidden = attention(normed, layer, cos, sin, cache, slot_mapping, block_tables, context_lens, query_start_loc,
                       lora_slots);
    std::tie(normed, residual) = rms_norm(hidden, residual, layer.post_norm, eps_);
    hidden = linear(silu_and_mul(linear(normed, layer.gate_up, lora_slots)), layer.down, lora_slots);
  }
  return std::get<0>(rms_norm(hidden, residual, final_norm_, eps_));
}

}  // namespace pagedserve
