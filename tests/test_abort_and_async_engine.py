"""Aborting frees blocks at once; the async engine streams deltas to many concurrent consumers."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import PROMPT, track_engine
from engine import AsyncLLMEngine, EngineConfig, SamplingParams

LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def async_engine(tiny_model):
    engine = track_engine(AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=512)))
    yield engine
    engine.shutdown()


def wait_until_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_offline_abort_mid_generation_frees_blocks(tiny_model, llm_factory) -> None:
    engine = llm_factory(tiny_model("llama"), num_kv_blocks=512).engine
    engine.add_request(engine.make_request("to-abort", PROMPT * 10, LONG))
    for _ in range(3):
        engine.step()
    assert engine.stats().blocks.num_used_blocks > 0
    final = engine.abort("to-abort")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.stats().blocks.num_used_blocks == 0
    assert engine.abort("to-abort") is None


def test_abort_of_a_waiting_request_frees_nothing_it_did_not_hold(tiny_model, llm_factory) -> None:
    engine = llm_factory(tiny_model("llama"), num_kv_blocks=512).engine
    engine.add_request(engine.make_request("queued", PROMPT, LONG))
    assert engine.abort("queued").outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_async_engine_streams_deltas_that_add_up(async_engine) -> None:
    async def run():
        deltas = [out async for out in async_engine.generate("stream", PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))]
        return deltas

    deltas = asyncio.run(run())
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 12
    assert all(d.outputs[0].token_ids for d in deltas)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
    assert all(not d.finished for d in deltas[:-1])
    text = "".join(d.outputs[0].text for d in deltas)
    assert text == async_engine.tokenizer.decode(sum((d.outputs[0].token_ids for d in deltas), []))
    metrics = deltas[-1].metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time <= metrics.finished_time


def test_a_consumer_that_falls_behind_gets_the_queued_deltas_merged(async_engine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)

    async def run():
        deltas = []
        async for delta in async_engine.generate("slow-reader", PROMPT, params):
            deltas.append(delta)
            while async_engine.engine.has_unfinished_requests() and len(deltas) == 1:
                await asyncio.sleep(0.01)  # the engine runs ahead while this reader is away
        return deltas

    deltas = asyncio.run(run())
    merged = sum((d.outputs[0].token_ids for d in deltas), [])
    assert len(deltas) <= 3 and deltas[-1].finished
    assert merged == asyncio.run(_collect(async_engine, "fast-reader", PROMPT, 40))
    assert sum(len(d.outputs[0].logprobs) for d in deltas) == 40
    assert "".join(d.outputs[0].text for d in deltas) == async_engine.tokenizer.decode(merged)


def test_async_engine_serves_32_concurrent_requests(async_engine) -> None:
    async def run():
        return await asyncio.gather(
            *(_collect(async_engine, f"concurrent-{i}", [100 + i] + PROMPT, 8 + i % 5) for i in range(32))
        )

    results = asyncio.run(run())
    assert [len(ids) for ids in results] == [8 + i % 5 for i in range(32)]
    alone = asyncio.run(asyncio.wait_for(_collect(async_engine, "alone", [105] + PROMPT, 8 + 5 % 5), 30))
    assert results[5] == alone


async def _collect(engine: AsyncLLMEngine, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    ids: list[int] = []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for out in engine.generate(request_id, prompt, params):
        ids += out.outputs[0].token_ids
    return ids


def test_cancelling_the_consumer_aborts_and_frees_blocks(async_engine) -> None:
    async def run():
        received = 0
        async for _ in async_engine.generate("cancelled", PROMPT * 10, LONG):
            received += 1
            if received == 3:
                break
        return received

    assert asyncio.run(run()) == 3
    wait_until_idle(async_engine)
    assert not async_engine.engine.has_unfinished_requests()
    assert async_engine.stats().blocks.num_used_blocks == 0


def test_explicit_abort_ends_the_stream_with_reason_abort(async_engine) -> None:
    async def run():
        last = None
        async for out in async_engine.generate("explicit", PROMPT * 10, LONG):
            last = out
            if len(out.outputs[0].token_ids) and not out.finished:
                async_engine.abort("explicit")
        return last

    last = asyncio.run(run())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    wait_until_idle(async_engine)


def test_async_generate_rejects_bad_input_before_queueing(async_engine) -> None:
    async def run(prompt: list[int]) -> None:
        async for _ in async_engine.generate("bad", prompt, SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(run(PROMPT + [10**9]))
    assert not async_engine.engine.has_unfinished_requests()
    asyncio.run(run(PROMPT))


def test_shutdown_stops_the_step_thread(tiny_model) -> None:
    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=64))
    assert engine.is_running
    engine.shutdown()
    assert not engine.is_running
