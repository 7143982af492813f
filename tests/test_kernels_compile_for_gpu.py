"""Every Triton kernel, at the signatures the engine launches, compiles to an H100 cubin (no GPU needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KERNELS = ("_write_kv_cache_kernel", "_decode_split_kernel", "_merge_splits_kernel", "_prefill_kernel",
           "_rms_norm_kernel", "_rotary_kernel", "_weight_only_matmul_kernel")
FP8_CACHE_KERNELS = ("_write_kv_cache_kernel", "_decode_split_kernel", "_prefill_kernel")


def test_every_kernel_compiles_for_sm90_in_every_dtype_and_over_fp8_caches() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels_for_gpu.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=script.parent.parent, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    for kernel in KERNELS:
        for dtype in ("bf16", "fp16", "fp32"):
            assert any(line.startswith(f"ok {kernel}[") and dtype in line for line in compiled), (kernel, dtype)
    for kernel in FP8_CACHE_KERNELS:
        for dtype in ("bf16", "fp16", "fp32"):
            for cache in ("fp8e4nv", "fp8e5"):
                launch = f"ok {kernel}[{dtype}"
                assert any(line.startswith(launch) and cache in line for line in compiled), (kernel, dtype, cache)
