"""Which kernels run the model: PyTorch ops (the CPU path, and the reference) or the Triton kernels (CUDA)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.attention import torch_backend
from engine.layers.norm import rms_norm
from engine.layers.rotary import Angles, apply_rotary

ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelBackend:
    name: str
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    apply_rotary: Callable[[torch.Tensor, Angles], torch.Tensor]


TORCH_BACKEND = KernelBackend("torch", torch_backend.paged_attention, rms_norm, apply_rotary)


def select_backend(name: str, device: torch.device) -> KernelBackend:
    """`auto` is Triton on CUDA and PyTorch on CPU; Triton on CPU only under Triton's interpreter (for tests)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TORCH_BACKEND
    if device.type != "cuda" and not _triton_interprets():
        raise ValueError(
            "attention_backend 'triton' needs a CUDA device (on CPU it runs only under TRITON_INTERPRET=1, "
            "for tests); use 'auto' or 'torch'"
        )
    return _triton_backend()


def _triton_interprets() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _triton_backend() -> KernelBackend:
    from engine.attention import triton_backend
    from engine.kernels import rms_norm as triton_rms_norm
    from engine.kernels import rotary as triton_rotary

    return KernelBackend(
        "triton", triton_backend.paged_attention, triton_rms_norm.rms_norm, triton_rotary.apply_rotary
    )
