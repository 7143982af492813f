"""Builds the native CPU kernels on first use and loads them as torch.ops.pagedserve.* and
torch.classes.pagedserve.DecoderStack.

The build is cached by torch.utils.cpp_extension under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
keyed by the sources and flags, so a restarted worker loads it in well under a second. The vector code is
compiled for the CPU capability ATen itself uses here (AVX-512, AVX2, or portable scalar code).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("paged_attention.cpp", "elementwise.cpp", "gemv.cpp", "decoder_stack.cpp", "registration.cpp")
CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


class NativeUnavailable(RuntimeError):
    """The native kernels could not be built or loaded here; the message says why."""


def load_native() -> None:
    """Build (once, cached) and load the native kernels; NativeUnavailable when that fails."""
    error = _build_and_load()
    if error is not None:
        raise NativeUnavailable(error)


def native_error() -> Optional[str]:
    """None when the native kernels load, else why they do not."""
    return _build_and_load()


@functools.lru_cache(maxsize=None)
def _build_and_load() -> Optional[str]:
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    started = time.perf_counter()
    try:
        cpp_extension.load(
            name=f"pagedserve_native_{capability.lower()}",
            sources=[str(CSRC / source) for source in SOURCES],
            extra_cflags=["-O3", "-fopenmp", *CAPABILITY_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # a missing compiler or ninja, a compile error: the PyTorch path takes over
        reason = f"{type(exc).__name__}: {_last_lines(str(exc))}"
        logger.warning("native CPU kernels unavailable (%s); the PyTorch path runs instead", reason)
        return reason
    logger.info(
        "native CPU kernels (%s) ready in %.1f s (built once, then cached in %s)",
        capability, time.perf_counter() - started,
        os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(),
    )
    return None


def _last_lines(text: str, count: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])
