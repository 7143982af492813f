"""Greedy generations with their log-probabilities, and their comparison: how tests check that two engine
configurations (backends, tensor parallelism, the native stack) generate the same thing."""
from __future__ import annotations

from typing import Any

import pytest

from engine import SamplingParams


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
