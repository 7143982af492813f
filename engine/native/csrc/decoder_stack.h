// Every decoder layer of a Llama-family model in one native call: the step's Python work is the embedding
// before it and the LM head after it.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <vector>

namespace pagedserve {

// One matmul's weights: oneDNN's packed weight and the plain row-major one (either may be empty), the bias (empty
// when there is none), and a weight-only quantized weight with its scales (engine/layers/quantized.py: int8 codes
// [N, K] and scales [N], or ATen's packed int4 codes and scales_and_zeros [K / group, N, 2]; empty when dense),
// and the LoRA slots (engine/layers/lora.py: A [slots, R, K], B [slots, R, N] and where each stacked part's
// output columns end; empty without LoRA).
struct Matmul {
  at::Tensor packed, plain, bias, quantized, scales, lora_a, lora_b;
  std::vector<int64_t> lora_part_ends;
};

// One layer's KV cache and, for an fp8 cache, its scales (engine/attention/fp8.py; none: 1).
struct KVCache {
  at::Tensor k, v;
  std::optional<at::Tensor> k_scale, v_scale;
};

struct LayerWeights {
  at::Tensor input_norm, post_norm;
  Matmul qkv, o, gate_up, down;
};

class DecoderStack : public torch::CustomClassHolder {
 public:
  static constexpr int64_t kWeightsPerMatmul = 8;
  static constexpr int64_t kWeightsPerLayer = 2 + 4 * kWeightsPerMatmul;

  // `weights`: per layer input_norm, post_norm, then (packed, plain, bias, quantized, scales, lora_a, lora_b,
  // lora_part_ends as int64) of qkv, o, gate_up and down; an empty tensor for whatever a matmul lacks. A
  // quantized matmul runs its weight-only kernel for steps of fewer than `dense_rows` rows (every step when
  // `dense_rows` is 0), else its dense weights. One-row steps stream the plain weight when there is one (gemv);
  // others use the packed weight (PackableMatmul.pack) where there is one. LoRA slots add each token's product.
  DecoderStack(std::vector<at::Tensor> weights, at::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, double eps, int64_t dense_rows);

  // The hidden states after the final norm, for the step's tokens [T, H] embedded; cos, sin [T, D]. Each
  // layer's cache scales are float32 [1] tensors for an fp8 cache, empty tensors otherwise. `lora_slots`: each
  // token's LoRA slot [T] (-1: none), empty when no token of the step has an adapter.
  at::Tensor forward(at::Tensor hidden, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> k_caches,
                     std::vector<at::Tensor> v_caches, std::vector<at::Tensor> k_scales,
                     std::vector<at::Tensor> v_scales, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor context_lens, at::Tensor query_start_loc, at::Tensor lora_slots) const;

 private:
  at::Tensor linear(const at::Tensor& x, const Matmul& matmul, const at::Tensor& lora_slots) const;
  at::Tensor attention(const at::Tensor& normed, const LayerWeights& layer, const at::Tensor& cos,
                       const at::Tensor& sin, const KVCache& cache, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       const at::Tensor& query_start_loc, const at::Tensor& lora_slots) const;

  std::vector<LayerWeights> layers_;
  at::Tensor final_norm_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  int64_t dense_rows_;
};

}  // namespace pagedserve
