"""Greedy output is token-for-token what transformers `generate` produces from the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colours:",
    "1, 2, 3, 4,",
]


def transformers_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return output[0, len(prompt_ids) :].tolist()


def engine_greedy(llm, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts_ids, params)]


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2", "llama_odd_vocab"])
def test_tiny_random_model_matches_transformers(kind: str, tiny_model, llm_factory) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder: Path = tiny_model(kind)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts_ids = [tokenizer.encode(p) for p in PROMPTS]
    llm = llm_factory(folder, num_kv_blocks=256)
    ours = engine_greedy(llm, prompts_ids, 48)
    for prompt_ids, got in zip(prompts_ids, ours):
        assert got == transformers_greedy(reference, prompt_ids, 48)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path: Path, llm_factory) -> None:
    from transformers import AutoModelForCausalLM

    llm = llm_factory(None, quantization="none")  # transformers dequantizes the file
    tokenizer = llm.get_tokenizer()
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    prompts_ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS
    ]
    prompts_ids = [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in prompts_ids]
    ours = engine_greedy(llm, prompts_ids, 64)
    for prompt_ids, got in zip(prompts_ids, ours):
        assert got == transformers_greedy(reference, prompt_ids, 64)
