"""Compile every Triton kernel for an H100 (CUDA sm_90) ahead of time, on a machine with no GPU.

The launches come from the wrappers themselves, called on CPU tensors with `JITFunction.run` swapped for a
recorder, so the compiled signatures and constexprs are exactly those the engine launches; each is then compiled
to a cubin (Triton's frontend, LLVM and ptxas all run on the CPU). This catches what the interpreter accepts but
the compiler does not (tl.dot shapes, types, constexpr misuse). Run with TRITON_INTERPRET unset; prints one line
per launch and exits 1 if any fails to compile.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from engine.kernels.decode_attention import decode_attention
from engine.kernels.kv_cache_write import write_kv_cache
from engine.kernels.lora import apply_lora_triton
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.quantized_matmul import int4_matmul, int8_matmul
from engine.kernels.rms_norm import rms_norm
from engine.kernels.rotary import apply_rotary

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 227 * 1024  # bytes one block may use
TYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32",
    torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5", torch.uint8: "u8", torch.int8: "i8",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    kernel: JITFunction
    arguments: dict[str, Any]
    options: dict[str, Any]

    def describe(self) -> str:
        constexprs = ", ".join(f"{name}={value}" for name, value in self.constexprs().items())
        pointers = sorted({TYPE_NAMES[value.dtype] for value in self.arguments.values() if torch.is_tensor(value)})
        return f"{self.kernel.fn.__name__}[{'/'.join(pointers)}]({constexprs})"

    def constexprs(self) -> dict[str, Any]:
        return {p.name: self.arguments[p.name] for p in self.kernel.params if p.is_constexpr}

    def signature(self) -> dict[str, str]:
        return {p.name: "constexpr" if p.is_constexpr else type_name(self.arguments[p.name]) for p in self.kernel.params}

    def compile(self) -> str:
        """Compile for the H100; a summary of the result, or ValueError if it needs more shared memory than it has."""
        source = ASTSource(self.kernel, self.signature(), constexprs=self.constexprs())
        compiled = triton.compile(source, target=H100, options=self.options)
        shared = compiled.metadata.shared
        if shared > H100_SHARED_MEMORY:
            raise ValueError(f"needs {shared} bytes of shared memory, the H100 has {H100_SHARED_MEMORY} per block")
        return f"{len(compiled.asm['cubin'])} bytes of sm_90 cubin, {shared} bytes of shared memory"


def type_name(value: Any) -> str:
    if torch.is_tensor(value):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    return "i64" if abs(value) >= 2**31 else "i32"


def record_launches(calls: list[Callable[[], object]]) -> list[Launch]:
    launches: list[Launch] = []

    def record(kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in LAUNCH_OPTIONS if name in kwargs}
        launches.append(Launch(kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}, options))

    with mock.patch.object(JITFunction, "run", record):
        for call in calls:
            call()
    return launches


def representative_calls(dtype: torch.dtype) -> list[Callable[[], object]]:
    """The wrappers at the shapes the engine uses: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128),
    a GQA-less head_dim 64 model, SmolLM2-like hidden sizes."""
    caches = {d: torch.zeros(4, 16, 8, d, dtype=dtype) for d in (64, 128)}
    tables, lens = torch.zeros(2, 4, dtype=torch.long), torch.tensor([40, 64])
    starts = torch.tensor([0, 1, 2, 70])
    q = {d: torch.zeros(70, 32 if d == 128 else 8, d, dtype=dtype) for d in (64, 128)}
    qkv = torch.zeros(70, 48, 128, dtype=dtype)
    angles = (torch.zeros(70, 1, 128, dtype=dtype), torch.zeros(70, 1, 128, dtype=dtype))
    hidden, weight = torch.zeros(70, 4096, dtype=dtype), torch.zeros(4096, dtype=dtype)
    int4 = (torch.zeros(1024, 2048, dtype=torch.uint8), torch.zeros(1024, 128, dtype=dtype))
    int8 = (torch.zeros(1024, 4096, dtype=torch.int8), torch.zeros(1024, dtype=dtype))
    lora_a, lora_b = torch.zeros(4, 48, 576, dtype=dtype), torch.zeros(4, 48, 960, dtype=dtype)
    token_slots = torch.zeros(70, dtype=torch.long)
    return [
        lambda: int4_matmul(hidden, int4[0], int4[1], int4[1]),
        lambda: int8_matmul(hidden[:1], *int8),
        lambda: write_kv_cache(qkv[:, 32:40], qkv[:, 40:], caches[128], caches[128], torch.zeros(70, dtype=torch.long)),
        lambda: decode_attention(q[128][:2], caches[128], caches[128], tables, lens, 0.1, num_splits=1),
        lambda: decode_attention(q[128][:2], caches[128], caches[128], tables, lens, 0.1, num_splits=7),
        lambda: decode_attention(q[64][:2], caches[64], caches[64], tables, lens, 0.1, num_splits=1),
        lambda: prefill_attention(q[128], caches[128], caches[128], tables, lens, starts, 2, 1, 68, 0.1),
        lambda: prefill_attention(q[64][:4], caches[64], caches[64], tables, lens, starts[:3], 0, 2, 2, 0.1),
        lambda: rms_norm(hidden, hidden, weight, 1e-5),
        lambda: rms_norm(hidden[:, :576], None, weight[:576], 1e-5),
        lambda: apply_rotary(qkv[:, :40], angles),
        lambda: apply_lora_triton(torch.zeros(70, 960, dtype=dtype), hidden[:, :576], lora_a, lora_b, token_slots),
    ]


def fp8_cache_calls(dtype: torch.dtype) -> list[Callable[[], object]]:
    """The cache write and the attention kernels over fp8 caches (e4m3 and e5m2) with their scales."""
    tables, lens, starts = torch.zeros(2, 4, dtype=torch.long), torch.tensor([40, 64]), torch.tensor([0, 1, 2, 70])
    q, qkv, scale = torch.zeros(70, 32, 128, dtype=dtype), torch.zeros(70, 48, 128, dtype=dtype), torch.ones(1)
    calls: list[Callable[[], object]] = []
    for cache in (torch.zeros(4, 16, 8, 128, dtype=fp8) for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2)):
        calls += [
            lambda c=cache: write_kv_cache(qkv[:, 32:40], qkv[:, 40:], c, c, torch.zeros(70, dtype=torch.long), scale,
                                           scale),
            lambda c=cache: decode_attention(q[:2], c, c, tables, lens, 0.1, 7, k_scale=scale, v_scale=scale),
            lambda c=cache: prefill_attention(q, c, c, tables, lens, starts, 2, 1, 68, 0.1, k_scale=scale,
                                              v_scale=scale),
        ]
    return calls


def main() -> int:
    if triton.knobs.runtime.interpret:
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    failed = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for launch in record_launches(representative_calls(dtype) + fp8_cache_calls(dtype)):
            try:
                print(f"ok {launch.describe()}: {launch.compile()}", flush=True)
            except Exception as exc:  # report every kernel that fails, not just the first
                failed += 1
                print(f"FAILED {launch.describe()}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
