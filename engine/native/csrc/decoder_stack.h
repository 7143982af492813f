// Every decoder layer of a Llama-family model in one native call: the step's Python work is the embedding
// before it and the LM head after it.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <vector>

namespace pagedserve {

// One matmul's weights: oneDNN's packed weight and the plain row-major one (either may be empty), and the bias
// (empty when there is none).
struct Matmul {
  at::Tensor packed, plain, bias;
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
  static constexpr int64_t kWeightsPerLayer = 14;

  // `weights`: per layer input_norm, post_norm, then (packed, plain, bias) of qkv, o, gate_up and down; an empty
  // tensor for whatever a matmul lacks. One-row steps stream the plain weight when there is one (gemv); others
  // use the packed weight (PackableMatmul.pack) where there is one.
  DecoderStack(std::vector<at::Tensor> weights, at::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, double eps);

  // The hidden states after the final norm, for the step's tokens [T, H] embedded; cos, sin [T, D]. Each
  // layer's cache scales are float32 [1] tensors for an fp8 cache, empty tensors otherwise.
  at::Tensor forward(at::Tensor hidden, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> k_caches,
                     std::vector<at::Tensor> v_caches, std::vector<at::Tensor> k_scales,
                     std::vector<at::Tensor> v_scales, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor context_lens, at::Tensor query_start_loc) const;

 private:
  static at::Tensor linear(const at::Tensor& x, const Matmul& matmul);
  at::Tensor attention(const at::Tensor& normed, const LayerWeights& layer, const at::Tensor& cos,
                       const at::Tensor& sin, const KVCache& cache, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       const at::Tensor& query_start_loc) const;

  std::vector<LayerWeights> layers_;
  at::Tensor final_norm_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};

}  // namespace pagedserve
