"""A step failure caused by one request's parameters fails that request alone; any other failure of a step kills the
async engine: every stream raises EngineDeadError, new requests are refused, the death callbacks run once."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import pytest
import torch

from conftest import PROMPT, run_to_completion, stream_token_ids, track_engine, wait_until
from engine import (
    LLM, AsyncLLMEngine, EngineConfig, EngineDeadError, LLMEngine, RequestFailedError, SamplingParams,
)
from engine.sampler import Sampler
from engine.sequence import Request

INNOCENTS = [
    ([100] + PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
    ([200] + PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5)),
]
CULPRIT_PARAMS = dict(temperature=1.0, max_tokens=8)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def huge_top_k(request: Request, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    request.params.top_k = 10**30


def stop_token_beyond_the_vocabulary(request: Request, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    request.params.stop_token_ids, request.params.min_tokens = [10**9], 5


def detokenizer_failing_on_it(request: Request, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    append_token = engine.output.detokenizer.append_token

    def failing_append_token(seq) -> None:
        if seq.request is request:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken tokenizer")
        append_token(seq)

    monkeypatch.setattr(engine.output.detokenizer, "append_token", failing_append_token)


BREAKAGES = [huge_top_k, stop_token_beyond_the_vocabulary, detokenizer_failing_on_it]


@pytest.fixture(scope="module")
def llm(tiny_model, llm_factory) -> LLM:
    return llm_factory(tiny_model("llama"), num_kv_blocks=256)


@pytest.fixture(scope="module")
def async_engine(tiny_model) -> AsyncIterator[AsyncLLMEngine]:
    config = EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=256, dtype="float32")
    engine = track_engine(AsyncLLMEngine.from_config(config))
    yield engine
    engine.shutdown()


@pytest.fixture
def doomed_engine(tiny_model) -> AsyncIterator[AsyncLLMEngine]:
    config = EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=64, dtype="float32")
    engine = track_engine(AsyncLLMEngine.from_config(config))
    yield engine
    engine.shutdown()


def innocent_requests(engine: LLMEngine) -> list[Request]:
    return [engine.make_request(f"innocent-{i}", prompt, params) for i, (prompt, params) in enumerate(INNOCENTS)]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_request_that_breaks_its_step_fails_alone_offline(
    llm: LLM, breakage: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt, params in INNOCENTS]
    culprit = llm.engine.make_request("culprit", PROMPT, SamplingParams(**CULPRIT_PARAMS))
    breakage(culprit, llm.engine, monkeypatch)
    innocents = innocent_requests(llm.engine)
    outputs = run_to_completion(llm.engine, [innocents[0], culprit, innocents[1]])
    assert outputs["culprit"].finished and outputs["culprit"].outputs[0].finish_reason == "error"
    assert [outputs[request.request_id].outputs[0].token_ids for request in innocents] == alone
    assert all(outputs[request.request_id].outputs[0].finish_reason == "length" for request in innocents)


@pytest.mark.parametrize(
    "breakage, what_failed",
    [(huge_top_k, "sampling failed"), (detokenizer_failing_on_it, "handling its sampled token failed")],
)
def test_a_request_that_breaks_its_step_raises_on_its_stream_alone(
    async_engine: AsyncLLMEngine, breakage: Callable[..., None], what_failed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def alone() -> list[list[int]]:
        return [await stream_token_ids(async_engine.stream(request)) for request in innocent_requests(async_engine.engine)]

    async def together() -> list[object]:
        innocents = [async_engine.stream(request) for request in innocent_requests(async_engine.engine)]
        firsts = [await anext(stream) for stream in innocents]  # running before the culprit comes
        culprit = async_engine.make_request("culprit", PROMPT, SamplingParams(**CULPRIT_PARAMS))
        breakage(culprit, async_engine.engine, monkeypatch)
        results = await asyncio.gather(
            stream_token_ids(async_engine.stream(culprit)), *map(stream_token_ids, innocents), return_exceptions=True
        )
        return [results[0]] + [first.outputs[0].token_ids + rest for first, rest in zip(firsts, results[1:])]

    expected = asyncio.run(alone())
    culprit_error, *innocent_tokens = asyncio.run(together())
    assert isinstance(culprit_error, RequestFailedError)
    assert str(culprit_error).startswith(f"{what_failed} for this request: ")
    assert innocent_tokens == expected
    assert async_engine.is_running


def test_sampling_leaves_the_logits_as_they_were_for_a_retry() -> None:
    request = Request("r", None, PROMPT, SamplingParams(temperature=1.0, repetition_penalty=1.5, min_tokens=2))
    logits = torch.randn(1, 49152)
    before = logits.clone()
    Sampler(49152, eos_token_ids=[2], seed=0, device=torch.device("cpu"))(logits, request.seqs)
    assert torch.equal(logits, before)


def break_the_step(engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.engine, "step", _raise_boom)


def break_the_commands(engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_apply_commands", _raise_boom)


def break_the_stats(engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.add_stat_logger(lambda stats, finished: None)
    monkeypatch.setattr(engine.engine, "stats", _raise_boom)


def _raise_boom(*args: object) -> None:
    raise RuntimeError("boom")


@pytest.mark.parametrize("breakage", [break_the_step, break_the_commands, break_the_stats])
def test_an_unexpected_failure_in_the_step_thread_kills_the_engine(
    doomed_engine: AsyncLLMEngine, breakage: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    deaths: list[EngineDeadError] = []
    doomed_engine.add_death_callback(deaths.append)

    async def run() -> list[object]:
        streams = [doomed_engine.generate(f"victim-{i}", [100 + i] + PROMPT, LONG) for i in range(2)]
        for stream in streams:
            await anext(stream)
        breakage(doomed_engine, monkeypatch)
        doomed_engine.abort("wake-up")  # a command, so that an idle step thread runs its loop once more
        return await asyncio.gather(*map(stream_token_ids, streams), return_exceptions=True)

    errors = asyncio.run(run())
    assert all(isinstance(error, EngineDeadError) and "RuntimeError('boom')" in str(error) for error in errors)
    wait_until(lambda: not doomed_engine.is_running)
    assert not doomed_engine.is_running
    assert deaths == [errors[0]]
    with pytest.raises(EngineDeadError, match="boom"):
        asyncio.run(stream_token_ids(doomed_engine.generate("late", PROMPT, LONG)))
    assert not doomed_engine.engine.has_unfinished_requests()
