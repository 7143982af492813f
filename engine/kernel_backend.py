"""Which kernels run the model: PyTorch ops (the reference, and the fallback), the native CPU kernels, or the
Triton kernels (CUDA)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.attention import torch_backend
from engine.layers.activation import silu_and_mul
from engine.layers.lora import LoRAKernel, LoRAStep, LoRAWeights, apply_lora
from engine.layers.norm import rms_norm
from engine.layers.rotary import Angles, apply_rotary

ATTENTION_BACKENDS = ("auto", "torch", "native", "triton")


@dataclass(frozen=True)
class KernelBackend:
    name: str
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    apply_rotary: Callable[[torch.Tensor, Angles], torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
    single_row_matmul: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
    int8_single_row_matmul: Optional[Callable[..., torch.Tensor]] = None  # engine.native.ops's
    apply_lora: LoRAKernel = apply_lora


TORCH_BACKEND = KernelBackend("torch", torch_backend.paged_attention, rms_norm, apply_rotary)


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def select_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> KernelBackend:
    """`auto` is Triton on CUDA, and on CPU the native kernels where they build and take the dtype (else PyTorch;
    a failed build logs why); Triton on CPU only under Triton's interpreter (for tests)."""
    if name == "auto" and device.type == "cuda":
        name = "triton"
    if name == "auto":
        native = dtype in NATIVE_DTYPES and _native_error() is None
        return _native_backend() if native else TORCH_BACKEND
    if name == "torch":
        return TORCH_BACKEND
    if name == "native":
        return _checked_native_backend(device, dtype)
    if device.type != "cuda" and not _triton_interprets():
        raise ValueError(
            "attention_backend 'triton' needs a CUDA device (on CPU it runs only under TRITON_INTERPRET=1, "
            "for tests); use 'auto' or 'torch'"
        )
    return _triton_backend()


def _checked_native_backend(device: torch.device, dtype: torch.dtype) -> KernelBackend:
    if device.type != "cpu":
        raise ValueError(f"attention_backend 'native' runs on the CPU only, not on {device.type}; use 'auto'")
    if dtype not in NATIVE_DTYPES:
        raise ValueError(f"attention_backend 'native' takes float32 or bfloat16, not {dtype}; use 'auto' or 'torch'")
    error = _native_error()
    if error is not None:
        raise ValueError(f"attention_backend 'native': the native CPU kernels did not build: {error}")
    return _native_backend()


def _native_error() -> Optional[str]:
    from engine.native.build import native_error

    return native_error()


def _native_backend() -> KernelBackend:
    from engine.attention import native_backend
    from engine.native import ops

    return KernelBackend(
        "native", native_backend.paged_attention, ops.rms_norm, ops.apply_rotary,
        ops.silu_and_mul, ops.single_row_matmul, ops.int8_single_row_matmul, ops.apply_lora,
    )


def _triton_interprets() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _triton_backend() -> KernelBackend:
    from engine.attention import triton_backend
    from engine.kernels import rms_norm as triton_rms_norm
    from engine.kernels import rotary as triton_rotary

    return KernelBackend(
        "triton", triton_backend.paged_attention, triton_rms_norm.rms_norm, triton_rotary.apply_rotary,
        apply_lora=_triton_apply_lora,
    )


def _triton_apply_lora(out: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, step: LoRAStep) -> None:
    from engine.kernels.lora import apply_lora_triton

    apply_lora_triton(out, x, weights.a, weights.b, step.token_slots)
