"""The whole engine on the native CPU kernels: the decoder stack (every layer in one native call) and the
layer-by-layer path (enforce_eager) give the PyTorch path's greedy tokens and log-probabilities in whole
prompts, prefix-cache hits, chunked prefill and mixed batches; how the backend is chosen, and the fallback when the
native build fails; the builds for the portable and AVX2 capabilities."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import kernel_backend
from engine.kernel_backend import select_backend
from generation_checks import assert_same_generation, greedy_with_logprobs

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
# blocks of 8 and a 16-token step budget: prompts are chunked, steps mix decodes with prefill chunks
SETTINGS = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16)
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2"])  # GQA 2, 2, 4 and 1; qwen2's QKV bias
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_native_kernels_give_the_torch_paths_greedy_tokens(
    kind: str, enforce_eager: bool, tiny_model, llm_factory
) -> None:
    folder: Path = tiny_model(kind)
    native = llm_factory(folder, attention_backend="native", enforce_eager=enforce_eager, **SETTINGS)
    expected = greedy_with_logprobs(llm_factory(folder, attention_backend="torch", **SETTINGS), PROMPTS, 12)
    assert_same_generation(greedy_with_logprobs(native, PROMPTS, 12), expected)
    hits_before = native.engine.stats().blocks.prefix_cache_hits
    assert_same_generation(greedy_with_logprobs(native, PROMPTS, 12), expected)  # from the prefix cache
    assert native.engine.stats().blocks.prefix_cache_hits > hits_before
    model = native.engine.runner.model
    assert (model.model.native_stack is None) == enforce_eager
    kernels = {layer.kernel.__module__ for layer in model.attention_layers()}
    assert kernels == {"engine.attention.native_backend"}


def test_the_stack_runs_in_bfloat16_close_to_the_torch_path(tiny_model, llm_factory) -> None:
    folder: Path = tiny_model("llama")
    native = greedy_with_logprobs(llm_factory(folder, dtype="bfloat16", **SETTINGS), PROMPTS, 8)
    reference = greedy_with_logprobs(llm_factory(folder, dtype="bfloat16", attention_backend="torch", **SETTINGS),
                                     PROMPTS, 8)
    for got, expected in zip(native, reference, strict=True):
        assert got[0][0] == expected[0][0]  # the first token: no earlier divergence to follow
        assert got[0][1] == pytest.approx(expected[0][1], abs=0.05)


def test_auto_is_native_on_cpu_and_falls_back_to_torch_when_the_build_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native_kernels: None
) -> None:
    assert select_backend("auto", torch.device("cpu")).name == "native"
    monkeypatch.setattr(kernel_backend, "_native_error", lambda: "CalledProcessError: g++ not found")
    assert select_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="did not build: CalledProcessError: g\\+\\+ not found"):
        select_backend("native", torch.device("cpu"))


def test_a_failed_build_is_a_warning_that_says_why(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from engine.native import build

    monkeypatch.setattr(build, "SOURCES", ("missing.cpp",))
    build._build_and_load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="engine.native.build"):
            error = build.native_error()
    finally:
        build._build_and_load.cache_clear()
    assert error is not None and "missing.cpp" in error
    assert "the PyTorch path runs instead" in caplog.text


def test_builds_run_this_environments_ninja_whatever_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ninja versions keep logs of different formats: a build by the system's ninja after one by the venv's (a
    TorchServe worker's PATH against the test process's) would start over from scratch."""
    from engine.native import build

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with build._own_ninja():
        assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_native_runs_on_the_cpu_in_float32_and_bfloat16_only(native_kernels: None) -> None:
    with pytest.raises(ValueError, match="runs on the CPU only"):
        select_backend("native", torch.device("cuda"))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        select_backend("native", torch.device("cpu"), torch.float16)
    assert select_backend("auto", torch.device("cpu"), torch.float16).name == "torch"


CAPABILITY_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from engine.native.build import load_native
from engine.native import ops
from engine.layers.norm import rms_norm
from paged_kv import random_paged_kv, reference_attention, relative_error
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1]
load_native()
kv = random_paged_kv([40, 700, 30], 2, 64, 16, torch.bfloat16)
q = torch.randn(12, 6, 64).bfloat16()
out = torch.full_like(q, float("nan"))
torch.ops.pagedserve.paged_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens,
                                     torch.tensor([0, 1, 2, 12]), 0.125, out)
for i, rows in enumerate([[0], [1], list(range(2, 12))]):
    assert relative_error(out[rows], reference_attention(q[rows], kv, i, 0.125)) < 1.6e-2, i
fp8 = [cache.to(torch.float8_e4m3fn) for cache in (kv.k_cache, kv.v_cache)]
kv.k_cache, kv.v_cache = fp8[0].bfloat16(), fp8[1].bfloat16()
torch.ops.pagedserve.paged_attention(q, *fp8, kv.block_tables, kv.context_lens, torch.tensor([0, 1, 2, 12]), 0.125, out)
for i, rows in enumerate([[0], [1], list(range(2, 12))]):
    assert relative_error(out[rows], reference_attention(q[rows], kv, i, 0.125)) < 1.6e-2, ("fp8", i)
x, w = torch.randn(5, 100), torch.randn(100)
torch.testing.assert_close(ops.rms_norm(x, x, w, 1e-5)[0], rms_norm(x, x, w, 1e-5)[0])
weight = torch.randn(37, 100)
torch.testing.assert_close(ops.single_row_matmul(x[:1], weight, None), x[:1] @ weight.T, rtol=1e-5, atol=1e-5)
print("build ok")
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_the_builds_for_other_cpu_capabilities(capability: str) -> None:
    """ATen's portable and AVX2 capabilities (chosen with ATEN_CPU_CAPABILITY, as on CPUs without AVX-512): the
    kernels compile for them and still match the reference, over a bfloat16 and an fp8 cache."""
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    result = subprocess.run(
        [sys.executable, "-c", CAPABILITY_CHECK, capability], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "build ok" in result.stdout


STALE_LOCK_CHECK = """
from torch.utils import cpp_extension
import torch
from engine.native import build
name = "pagedserve_native_" + torch.backends.cpu.get_cpu_capability().lower()
stale = cpp_extension._get_build_directory(name, False) + "/lock"
open(stale, "w").close()
assert build.native_error() is None
import os
import shutil
assert not os.path.exists(stale)
print("loaded past the stale lock")
"""


def test_a_lock_left_by_a_killed_build_does_not_block_the_next(native_kernels: None) -> None:
    """torch's build lock is a plain file: a worker killed while building leaves it, and without our own lock every
    later worker would wait for it forever."""
    result = subprocess.run(
        [sys.executable, "-c", STALE_LOCK_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded past the stale lock" in result.stdout
