"""Builds the native CPU kernels on first use and loads them as torch.ops.pagedserve.* and
torch.classes.pagedserve.DecoderStack.

The build is cached by torch.utils.cpp_extension under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
keyed by the sources and flags, so a restarted worker loads it in well under a second. The vector code is
compiled for the CPU capability ATen itself uses here (AVX-512, AVX2, or portable scalar code).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "paged_attention.cpp", "elementwise.cpp", "gemv.cpp", "lora.cpp", "token_bitmask.cpp", "decoder_stack.cpp",
    "registration.cpp",
)
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
    name = f"pagedserve_native_{capability.lower()}"
    try:
        with _build_lock(cpp_extension._get_build_directory(name, False)), _own_ninja():
            cpp_extension.load(
                name=name,
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


@contextlib.contextmanager
def _build_lock(build_dir: str) -> Iterator[None]:
    """Serialise builds with a lock the kernel releases when its holder dies. torch's own lock is a file that a
    process killed mid-build leaves behind, after which every later build waits for it forever; under this lock no
    other build can be running, so such a file is stale and is removed."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "pagedserve.flock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("removing %s, left by a native build that did not finish", stale)
            os.remove(stale)
        yield


@contextlib.contextmanager
def _own_ninja() -> Iterator[None]:
    """This environment's ninja (the `ninja` package) first on PATH while torch builds: ninja versions keep logs
    of different formats, so builds by two ninjas (a venv's and the system's) would each start over from scratch."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        yield
        return
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _last_lines(text: str, count: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])
