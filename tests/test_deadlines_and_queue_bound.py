"""Deadlines: a request still unfinished at its timeout is aborted (blocks freed) with finish_reason "timeout", and
its stream raises RequestTimeoutError. The queue bound: a request beyond `max_num_waiting` is refused with
EngineOverloadedError before anything is queued."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from conftest import PROMPT, run_to_completion, stream_token_ids, track_engine, wait_until
from engine import (
    LLM, AsyncLLMEngine, EngineConfig, EngineOverloadedError, LLMEngine, RequestOutput, RequestTimeoutError,
    SamplingParams,
)

TIMEOUT_S = 0.3
STEP_DELAY_S = 0.002  # added to every step, so that LONG outlasts TIMEOUT_S on any machine
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
INNOCENT_PROMPT = [100] + PROMPT


@pytest.fixture(scope="module")
def llm(tiny_model, llm_factory) -> LLM:
    return llm_factory(tiny_model("llama"), num_kv_blocks=256)


@pytest.fixture(scope="module")
def async_engine(tiny_model) -> AsyncIterator[AsyncLLMEngine]:
    engine = track_engine(AsyncLLMEngine.from_config(
        EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=256, dtype="float32")
    ))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def single_seq_engine(tiny_model) -> AsyncIterator[AsyncLLMEngine]:
    engine = track_engine(AsyncLLMEngine.from_config(EngineConfig(
        model=str(tiny_model("llama")), num_kv_blocks=256, dtype="float32", max_num_seqs=1, max_num_waiting=2,
    )))
    yield engine
    engine.shutdown()


def slow_down_steps(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    step = engine.step

    def slow_step() -> list[RequestOutput]:
        time.sleep(STEP_DELAY_S)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


def test_a_request_past_its_timeout_is_aborted_and_its_stream_raises(
    async_engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down_steps(async_engine.engine, monkeypatch)
    alone = asyncio.run(stream_token_ids(async_engine.generate("alone", INNOCENT_PROMPT, SHORT)))
    received: list[int] = []

    async def timed() -> None:
        async for output in async_engine.generate("timed", PROMPT, LONG, timeout=TIMEOUT_S):
            received.extend(output.outputs[0].token_ids)

    async def run() -> list[object]:
        innocent = stream_token_ids(async_engine.generate("innocent", INNOCENT_PROMPT, SHORT))
        return await asyncio.gather(timed(), innocent, return_exceptions=True)

    started = time.monotonic()
    error, innocent_tokens = asyncio.run(run())
    assert isinstance(error, RequestTimeoutError) and isinstance(error, TimeoutError)
    assert str(error) == "the request did not finish within its timeout of 0.3 s"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 5
    assert 0 < len(received) < LONG.max_tokens
    assert innocent_tokens == alone
    assert not async_engine.engine.has_unfinished_requests()
    assert async_engine.stats().blocks.num_used_blocks == 0


def test_a_request_waiting_behind_a_full_batch_times_out(
    single_seq_engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down_steps(single_seq_engine.engine, monkeypatch)

    async def run() -> list[int]:
        blocker = single_seq_engine.generate("blocker", PROMPT, LONG)
        await anext(blocker)  # it holds the only place in the running batch
        received: list[int] = []
        with pytest.raises(RequestTimeoutError):
            async for output in single_seq_engine.generate("waiter", INNOCENT_PROMPT, SHORT, timeout=TIMEOUT_S):
                received.extend(output.outputs[0].token_ids)
        assert single_seq_engine.stats().num_requests_running == 1
        await blocker.aclose()
        return received

    assert asyncio.run(run()) == []
    wait_until_idle(single_seq_engine)


def test_offline_request_past_its_timeout_finishes_with_reason_timeout(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down_steps(llm.engine, monkeypatch)
    timed = llm.engine.make_request("timed", PROMPT, LONG, timeout=TIMEOUT_S)
    innocent = llm.engine.make_request("innocent", INNOCENT_PROMPT, SHORT)
    outputs = run_to_completion(llm.engine, [timed, innocent])
    assert outputs["timed"].finished and outputs["timed"].outputs[0].finish_reason == "timeout"
    assert 0 < len(outputs["timed"].outputs[0].token_ids) < LONG.max_tokens
    assert outputs["innocent"].outputs[0].finish_reason == "length"


def test_a_request_beyond_max_num_waiting_is_refused_before_anything_is_queued(
    single_seq_engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_down_steps(single_seq_engine.engine, monkeypatch)

    async def run() -> tuple[list[list[int]], list[int]]:
        running = single_seq_engine.generate("running", PROMPT, LONG)
        await anext(running)
        waiting = [
            asyncio.create_task(stream_token_ids(single_seq_engine.generate(f"waiting-{i}", [100 + i] + PROMPT, SHORT)))
            for i in range(2)
        ]
        single_seq_engine.check_capacity(2)  # the two about to wait fit
        await asyncio.sleep(0)  # both open their streams
        with pytest.raises(EngineOverloadedError, match=r"max_num_waiting=2\)"):
            single_seq_engine.check_capacity(1)
        with pytest.raises(EngineOverloadedError, match=r"max_num_waiting=2\)"):
            await anext(single_seq_engine.generate("refused", PROMPT, SHORT))
        await running.aclose()
        waited = await asyncio.gather(*waiting)
        return waited, await stream_token_ids(single_seq_engine.generate("refused", PROMPT, SHORT))

    waited, refused_id_again = asyncio.run(run())
    assert [len(tokens) for tokens in waited] == [SHORT.max_tokens] * 2
    assert len(refused_id_again) == SHORT.max_tokens, "the refused request left its id in use"
    wait_until_idle(single_seq_engine)


def wait_until_idle(engine: AsyncLLMEngine) -> None:
    wait_until(lambda: not engine.engine.has_unfinished_requests())
