"""allowed_token_ids: every generated token is one of them, logprobs stay raw but rank allowed tokens only, and bad
values are rejected before the engine is touched."""
from __future__ import annotations

import asyncio
import math
from typing import Any, Iterator

import pytest
import torch

from conftest import PROMPT, track_engine
from engine import AsyncLLMEngine, EngineConfig, SamplingParams
from handler.openai_serving import OpenAIServing
from handler.protocol import APIError, RequestLimits, parse_chat_request, parse_completion_request

VOCAB = 49152
ALLOWED = [7, 100, 2000, 30000, 45000]
CHAT = [{"role": "user", "content": "Hi"}]
PARSERS = [(parse_completion_request, {"prompt": "Hi"}), (parse_chat_request, {"messages": CHAT})]
BAD_VALUES = [[], [-1], [3, -5], [1.5], [True], ["7"], "7", 7]


@pytest.fixture(scope="module")
def llm(tiny_model: Any, llm_factory: Any) -> Any:
    return llm_factory(tiny_model("llama"), num_kv_blocks=512)


@pytest.fixture(scope="module")
def reference(tiny_model: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def async_engine(tiny_model: Any) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=64))
    yield track_engine(engine)
    engine.shutdown()


def raw_log_softmax(reference: Any, token_ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-probabilities for the token after token_ids[: i + 1]."""
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0].log_softmax(-1)


def greedy(**kwargs: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **kwargs})


def restricted_params(sampled: bool) -> list[SamplingParams]:
    """Restricted rows: all greedy (the plain-greedy fast path), or sampled, one of them through every filter."""
    if not sampled:
        return [greedy(allowed_token_ids=ALLOWED), greedy(allowed_token_ids=ALLOWED[:2] * 2)]
    common = dict(max_tokens=8, ignore_eos=True, allowed_token_ids=ALLOWED)
    filtered = SamplingParams(temperature=1.5, seed=9, top_k=3, top_p=0.9, repetition_penalty=1.3, **common)
    return [SamplingParams(temperature=1.0, seed=seed, **common) for seed in range(4)] + [filtered]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_restricted_rows_draw_only_allowed_ids_beside_an_unrestricted_one(llm: Any, sampled: bool) -> None:
    alone = llm.generate([PROMPT], greedy())[0].outputs[0].token_ids
    assert not set(alone) & set(ALLOWED)
    restricted = restricted_params(sampled)
    outputs = llm.generate([PROMPT] * (1 + len(restricted)), [greedy()] + restricted)
    assert outputs[0].outputs[0].token_ids == alone
    for out, params in zip(outputs[1:], restricted):
        assert len(out.outputs[0].token_ids) == 8
        assert set(out.outputs[0].token_ids) <= set(params.allowed_token_ids)
    if sampled:  # the seeds draw different allowed tokens: the rows are sampled, not argmaxed
        assert len({tuple(out.outputs[0].token_ids) for out in outputs[1:]}) > 1


def test_two_allowed_ids_return_their_raw_logprobs(llm: Any, reference: Any) -> None:
    a, b = 100, 30000
    out = llm.generate([PROMPT], greedy(allowed_token_ids=[a, b], logprobs=2, max_tokens=4))[0].outputs[0]
    expected = raw_log_softmax(reference, PROMPT + out.token_ids)
    for step, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[len(PROMPT) - 1 + step]
        assert set(entry) == {a, b}
        for token in (a, b):
            assert math.isclose(entry[token].logprob, row[token].item(), abs_tol=1e-4)
        assert token_id == (a if row[a] >= row[b] else b) and entry[token_id].rank == 1
        p_b = math.exp(entry[b].logprob) / (math.exp(entry[a].logprob) + math.exp(entry[b].logprob))
        assert math.isclose(p_b, row[[a, b]].softmax(-1)[1].item(), abs_tol=1e-4)


def test_sampled_token_rank_counts_allowed_tokens_only(llm: Any, reference: Any) -> None:
    a, b = 100, 30000
    params = [
        SamplingParams(temperature=2.0, seed=seed, max_tokens=1, allowed_token_ids=[a, b], logprobs=5)
        for seed in range(8)
    ]
    row = raw_log_softmax(reference, PROMPT)[-1]
    better = a if row[a] > row[b] else b
    outputs = [out.outputs[0] for out in llm.generate([PROMPT] * len(params), params)]
    for out in outputs:
        token = out.token_ids[0]
        assert set(out.logprobs[0]) == {a, b}  # logprobs=5, but only two tokens are allowed
        assert out.logprobs[0][token].rank == (1 if token == better else 2)
    assert {out.token_ids[0] for out in outputs} == {a, b}


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_bad_values_are_rejected_by_sampling_params(value: Any) -> None:
    with pytest.raises(ValueError, match="^allowed_token_ids"):
        SamplingParams(allowed_token_ids=value)


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(allowed_token_ids=[5, VOCAB]), rf"^allowed_token_ids must be in \[0, {VOCAB}\).*got {VOCAB}"),
        (SamplingParams(allowed_token_ids=[10**9]), r"^allowed_token_ids must be in"),
        (SamplingParams(allowed_token_ids=[2], min_tokens=1), r"^allowed_token_ids: every allowed token"),
        (SamplingParams(allowed_token_ids=[9, 2], stop_token_ids=[9], min_tokens=1), r"^allowed_token_ids: every"),
    ],
)
def test_the_engine_rejects_ids_outside_the_vocabulary_before_any_state(llm: Any, params: Any, message: str) -> None:
    engine = llm.engine
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=4), params])
    blocks = engine.stats().blocks
    assert not engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_total_blocks


def test_eos_allowed_with_min_tokens_is_fine_when_eos_is_ignored(llm: Any) -> None:
    params = SamplingParams(allowed_token_ids=[2], min_tokens=2, max_tokens=2, ignore_eos=True, temperature=0.0)
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == [2, 2]


@pytest.mark.parametrize("parse, base", PARSERS, ids=["completions", "chat"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_the_parser_turns_bad_values_into_a_400(parse: Any, base: dict[str, Any], value: Any) -> None:
    with pytest.raises(APIError) as caught:
        parse({**base, "allowed_token_ids": value}, RequestLimits())
    assert caught.value.status == 400 and caught.value.param == "allowed_token_ids"
    assert "allowed_token_ids" in caught.value.message


@pytest.mark.parametrize("parse, base", PARSERS, ids=["completions", "chat"])
def test_the_parser_passes_allowed_ids_to_the_engine(parse: Any, base: dict[str, Any]) -> None:
    assert parse({**base, "allowed_token_ids": [5, 9, 5]}, RequestLimits()).params.allowed_token_ids == [5, 9, 5]
    assert parse({**base, "allowed_token_ids": None}, RequestLimits()).params.allowed_token_ids is None


def test_ids_outside_the_vocabulary_are_a_400_like_stop_token_ids(async_engine: AsyncLLMEngine) -> None:
    serving = OpenAIServing(async_engine, "tiny", "1.0", "tiny-llama")
    for name in ("stop_token_ids", "allowed_token_ids"):
        body = {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, name: [3, VOCAB]}
        with pytest.raises(APIError, match=f"^{name} must be in") as caught:
            asyncio.run(serving.create_completion(body, f"oov-{name}"))
        assert caught.value.status == 400
    blocks = async_engine.stats().blocks
    assert not async_engine.engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_total_blocks
