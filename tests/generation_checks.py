"""Greedy generations with their log-probabilities, and their comparison: how tests check that two engine
configurations (backends, tensor parallelism, the native stack) generate the same thing; and transformers' greedy
tokens, the reference they all must match."""
from __future__ import annotations

from typing import Any

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


def engine_greedy(llm: Any, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts_ids, params)]


def greedy_with_logprobs(llm: Any, prompts: list[Any], max_tokens: int = 24) -> list[list[tuple[int, float]]]:
    """Each prompt's greedy tokens, each with its log-probability (so a model whose argmax never moves still
    shows a difference in the numbers)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outputs = [out.outputs[0] for out in llm.generate(prompts, params)]
    return [
        [(token, entry[token].logprob) for token, entry in zip(out.token_ids, out.logprobs)] for out in outputs
    ]


def assert_same_generation(got: list[list[tuple[int, float]]], expected: list[list[tuple[int, float]]]) -> None:
    for got_seq, expected_seq in zip(got, expected, strict=True):
        assert [token for token, _ in got_seq] == [token for token, _ in expected_seq]
        for (_, got_logprob), (_, expected_logprob) in zip(got_seq, expected_seq):
            assert got_logprob == pytest.approx(expected_logprob, abs=1e-4)


def transformers_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """What a transformers model generates greedily after `prompt_ids`, exactly `max_new_tokens` (EOS ignored)."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
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
