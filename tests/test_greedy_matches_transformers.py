"""Greedy output is token-for-token what transformers `generate` produces from the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generation_checks import PROMPTS, engine_greedy, transformers_greedy


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
