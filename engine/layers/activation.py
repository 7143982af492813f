"""SwiGLU activation over a stacked gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = silu_and_mul  # or the native kernel: LlamaForCausalLM.use_kernels

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernel(gate_up)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
