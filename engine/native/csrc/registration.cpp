// torch.ops.pagedserve.* and torch.classes.pagedserve.DecoderStack.
#include <torch/library.h>

#include "decoder_stack.h"
#include "kernels.h"

TORCH_LIBRARY(pagedserve, m) {
  m.def(
      "write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "Tensor query_start_loc, float scale, Tensor(a!) out, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor codes, Tensor scales, Tensor? bias) -> Tensor");
  m.def("lora_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, Tensor token_slots, int[] part_ends) -> ()");
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
  m.class_<pagedserve::DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, at::Tensor, int64_t, int64_t, int64_t, double, int64_t>())
      .def("forward", &pagedserve::DecoderStack::forward);
}

TORCH_LIBRARY_IMPL(pagedserve, CPU, m) {
  m.impl("write_kv_cache", &pagedserve::write_kv_cache);
  m.impl("paged_attention", &pagedserve::paged_attention);
  m.impl("rms_norm", &pagedserve::rms_norm);
  m.impl("rotary_", &pagedserve::rotary_);
  m.impl("silu_and_mul", &pagedserve::silu_and_mul);
  m.impl("gemv", &pagedserve::gemv);
  m.impl("int8_gemv", &pagedserve::int8_gemv);
  m.impl("lora_", &pagedserve::lora_);
  m.impl("apply_token_bitmask_", &pagedserve::apply_token_bitmask_);
}
