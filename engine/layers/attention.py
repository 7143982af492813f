"""The attention layer: owns its slice of the paged KV cache and calls the selected backend's paged attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.attention.torch_backend import paged_attention


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale: Optional[torch.Tensor] = None  # an fp8 cache's scales [1] (engine.attention.fp8)
        self.v_scale: Optional[torch.Tensor] = None
        self.kernel = paged_attention  # or the Triton backend's: LlamaForCausalLM.use_kernels

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] (heads may come flattened) -> [T, Hq*D]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.kernel(q, k, v, self.k_cache, self.v_cache, metadata, self.scale, self.k_scale, self.v_scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
