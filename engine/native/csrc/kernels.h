// The native CPU kernels, callable from C++ (the decoder stack) and registered as torch.ops.pagedserve.*.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pagedserve {

// Scatters k and v [T, Hkv, D] (rows may be strided) into caches [blocks, block_size, Hkv, D] at flat
// slots [T]; a negative slot is skipped. Caches in fp8 store value / scale (engine/attention/fp8.py; a scale is a
// float32 [1], 1 when absent).
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale);

// Causal attention of q [T, Hq, D] (rows may be strided) over each sequence's context in the paged cache.
// Sequence i owns q rows [query_start_loc[i], query_start_loc[i + 1]): the last of its context_lens[i] positions.
// Writes out [T, Hq, D], contiguous. Caches in fp8 read as their values times k_scale and v_scale.
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_start_loc,
                     double scale, at::Tensor& out, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale);

// (weight * rms_norm(x + residual), x + residual); with no residual, (weight * rms_norm(x), x).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps);

// Rotates x [T, heads, D] (half-split layout) in place by cos, sin [T, D].
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// silu(gate) * up of a stacked [T, 2 * I] projection -> [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// x [1, K] @ weight [N, K]^T + bias, streaming a plain row-major weight (the single-row decode matmul).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// x [1, K] @ (codes [N, K] * scales [N, 1])^T + bias: a one-row int8 weight-only matmul.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias);

// out [T, N] += x [T, K] A_s^T B_s for each token with slot s = token_slots[t] >= 0, in place: LoRA slots a
// [slots, R, K] and b [slots, R, N] in x's dtype, R rows split evenly between the parts whose output columns end
// at part_ends (engine/layers/lora.py).
void lora_(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
           const at::Tensor& token_slots, at::IntArrayRef part_ends);

// In each of `rows`, logits [rows, vocab] float32 set to -inf wherever bitmask [rows, ceil(vocab / 32)] int32 has a
// clear bit (bit j of word w is token 32 w + j): a step's grammar masks (engine/structured_output/bitmask.py).
void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows);

}  // namespace pagedserve
