"""The whole engine on the Triton kernels (interpreted on CPU in CI): same greedy tokens as the PyTorch path, in
whole prompts, prefix-cache hits, chunked prefill and mixed batches; and how the backend is chosen."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from engine.config import EngineConfig
from engine.kernel_backend import select_backend

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]


def greedy(llm, prompts: list, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])  # GQA 2, 4 (one KV head) and 1
def test_triton_kernels_give_the_torch_paths_greedy_tokens(kind: str, tiny_model, llm_factory) -> None:
    folder: Path = tiny_model(kind)
    # blocks of 8 and a 16-token step budget: prompts are chunked, steps mix decodes with prefill chunks
    settings = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16)
    triton_llm = llm_factory(folder, attention_backend="triton", **settings)
    torch_llm = llm_factory(folder, attention_backend="torch", **settings)
    expected = greedy(torch_llm, PROMPTS, 12)
    assert greedy(triton_llm, PROMPTS, 12) == expected
    hits_before = triton_llm.engine.stats().blocks.prefix_cache_hits
    assert greedy(triton_llm, PROMPTS, 12) == expected  # the second time the prompts' blocks come from the cache
    assert triton_llm.engine.stats().blocks.prefix_cache_hits > hits_before
    kernels = {layer.kernel.__module__ for layer in triton_llm.engine.runner.model.attention_layers()}
    assert kernels == {"engine.attention.triton_backend"}


def test_auto_picks_torch_on_cpu_and_triton_needs_cuda_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("auto", torch.device("cpu")).name == "torch"
    assert select_backend("triton", torch.device("cpu")).name == "triton"  # TRITON_INTERPRET=1 in these tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("key,value", [("attention_backend", "flash"), ("enforce_eager", "yes")])
def test_bad_backend_settings_are_rejected(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=key):
        EngineConfig(**{key: value})
