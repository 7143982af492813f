"""A Llama-family model's decoder layers as one native call (torch.classes.pagedserve.DecoderStack): RMSNorm with
the residual add, QKV, rotary, KV-cache write, paged attention, O, SwiGLU MLP, layer after layer, with no Python
between the ops. One tensor-parallel rank only: the C++ loop does no all-reduce."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.layers.rotary import Angles

if TYPE_CHECKING:
    from engine.layers.linear import PackableMatmul
    from engine.models.config import ModelConfig

NO_BIAS = torch.empty(0)


class NativeDecoderStack:
    def __init__(self, layers: nn.ModuleList, final_norm: nn.Module, config: "ModelConfig") -> None:
        weights: list[torch.Tensor] = []
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            weights += [
                layer.input_layernorm.weight, _matmul_weight(attention.qkv_proj), _bias(attention.qkv_proj.bias),
                _matmul_weight(attention.o_proj), _bias(attention.o_proj.bias), layer.post_attention_layernorm.weight,
                _matmul_weight(mlp.gate_up_proj), _matmul_weight(mlp.down_proj),
            ]
        attention = layers[0].self_attn.attn
        packed = layers[0].self_attn.qkv_proj.packed_weight is not None
        self.stack = torch.classes.pagedserve.DecoderStack(
            weights, final_norm.weight, attention.num_heads, attention.num_kv_heads, attention.head_dim,
            config.rms_norm_eps, packed,
        )
        self.attention_layers = [layer.self_attn.attn for layer in layers]

    def __call__(self, hidden: torch.Tensor, angles: Angles, metadata: AttentionMetadata) -> torch.Tensor:
        cos, sin = angles
        return self.stack.forward(
            hidden, cos, sin, [layer.k_cache for layer in self.attention_layers],
            [layer.v_cache for layer in self.attention_layers], metadata.slot_mapping, metadata.block_tables,
            metadata.context_lens, metadata.query_start_loc,
        )


def _matmul_weight(linear: "PackableMatmul") -> torch.Tensor:
    return linear.weight if linear.packed_weight is None else linear.packed_weight


def _bias(bias: Optional[torch.Tensor]) -> torch.Tensor:
    return NO_BIAS if bias is None else bias
