"""The whole engine on the Triton kernels (interpreted on CPU in CI): same greedy tokens as the PyTorch path, in
whole prompts, prefix-cache hits, chunked prefill and mixed batches; and how the backend is chosen."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kernel_backend import select_backend
from generation_checks import assert_same_generation, greedy_with_logprobs

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
# blocks of 8 and a 16-token step budget: prompts are chunked, steps mix decodes with prefill chunks
SETTINGS = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])  # GQA 2, 4 (one KV head) and 1
def test_triton_kernels_give_the_torch_paths_greedy_tokens(kind: str, tiny_model, llm_factory) -> None:
    folder: Path = tiny_model(kind)
    triton_llm = llm_factory(folder, attention_backend="triton", **SETTINGS)
    expected = greedy_with_logprobs(llm_factory(folder, attention_backend="torch", **SETTINGS), PROMPTS, 12)
    assert_same_generation(greedy_with_logprobs(triton_llm, PROMPTS, 12), expected)
    hits_before = triton_llm.engine.stats().blocks.prefix_cache_hits
    # the second time the prompts' blocks come from the prefix cache
    assert_same_generation(greedy_with_logprobs(triton_llm, PROMPTS, 12), expected)
    assert triton_llm.engine.stats().blocks.prefix_cache_hits > hits_before
    kernels = {layer.kernel.__module__ for layer in triton_llm.engine.runner.model.attention_layers()}
    assert kernels == {"engine.attention.triton_backend"}


def test_tensor_parallel_ranks_run_the_kernels_on_their_head_shards(tiny_model, llm_factory) -> None:
    folder: Path = tiny_model("llama")
    expected = greedy_with_logprobs(llm_factory(folder, attention_backend="torch", **SETTINGS), PROMPTS, 12)
    tp2 = llm_factory(folder, attention_backend="triton", tensor_parallel_size=2, **SETTINGS)
    assert_same_generation(greedy_with_logprobs(tp2, PROMPTS, 12), expected)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("triton", torch.device("cpu")).name == "triton"  # TRITON_INTERPRET=1 in these tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("key,value", [("attention_backend", "flash"), ("enforce_eager", "yes")])
def test_bad_backend_settings_are_rejected(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=key):
        EngineConfig(**{key: value})
