"""A Llama-family model's decoder layers as one native call (torch.classes.pagedserve.DecoderStack): RMSNorm with
the residual add, QKV, rotary, KV-cache write, paged attention, O, SwiGLU MLP, layer after layer, with no Python
between the ops. One tensor-parallel rank only: the C++ loop does no all-reduce."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.layers.lora import LoRAContext
from engine.layers.rotary import Angles

if TYPE_CHECKING:
    from engine.layers.linear import PackableMatmul
    from engine.models.config import ModelConfig

NO_WEIGHT = torch.empty(0)


class NativeDecoderStack:
    def __init__(self, layers: nn.ModuleList, final_norm: nn.Module, config: "ModelConfig") -> None:
        weights: list[torch.Tensor] = []
        dense_rows = 0
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
                weights += _matmul_weights(linear)
                dense_rows = linear.dense_rows or dense_rows
        attention = layers[0].self_attn.attn
        self.stack = torch.classes.pagedserve.DecoderStack(
            weights, final_norm.weight, attention.num_heads, attention.num_kv_heads, attention.head_dim,
            config.rms_norm_eps, dense_rows,
        )
        self.attention_layers = [layer.self_attn.attn for layer in layers]
        lora = layers[0].self_attn.qkv_proj.lora
        self.lora_context: Optional[LoRAContext] = None if lora is None else lora.context

    def __call__(self, hidden: torch.Tensor, angles: Angles, metadata: AttentionMetadata) -> torch.Tensor:
        cos, sin = angles
        layers = self.attention_layers
        return self.stack.forward(
            hidden, cos, sin, [layer.k_cache for layer in layers], [layer.v_cache for layer in layers],
            [_scale(layer.k_scale) for layer in layers], [_scale(layer.v_scale) for layer in layers],
            metadata.slot_mapping, metadata.block_tables, metadata.context_lens, metadata.query_start_loc,
            self._lora_token_slots(),
        )

    def _lora_token_slots(self) -> torch.Tensor:
        step = None if self.lora_context is None else self.lora_context.step
        return NO_WEIGHT if step is None else step.token_slots


def _matmul_weights(linear: "PackableMatmul") -> list[torch.Tensor]:
    """(packed, plain, bias, quantized, scales, lora_a, lora_b, lora_part_ends), an empty tensor for each that the
    layer lacks."""
    packed = NO_WEIGHT if linear.packed_weight is None else linear.packed_weight
    quantized = [NO_WEIGHT, NO_WEIGHT] if linear.quantized is None else linear.quantized.tensors()
    lora = [NO_WEIGHT] * 3
    if linear.lora is not None:
        lora = [linear.lora.a, linear.lora.b, torch.tensor(linear.lora.part_ends, dtype=torch.long)]
    return [packed, linear.weight, NO_WEIGHT if linear.bias is None else linear.bias, *quantized, *lora]


def _scale(scale: Optional[torch.Tensor]) -> torch.Tensor:
    """An fp8 cache's scale, or an empty tensor for a cache without one."""
    return NO_WEIGHT if scale is None else scale
