"""How the async engine hands a step's outputs to its consumers: `stream_interval` tokens per delta (the first and
the last at once, a failure after the tokens held back), and one event-loop wake-up per step, not per request."""
from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from conftest import PROMPT, track_engine
from engine import AsyncLLMEngine, EngineConfig, RequestFailedError, SamplingParams
from engine.outputs import RequestOutput
from worker_harness import Reply, WorkerHarness


@pytest.fixture(scope="module")
def make_engine(tiny_model) -> AsyncIterator[Callable[..., AsyncLLMEngine]]:
    engines: list[AsyncLLMEngine] = []

    def make(**settings: Any) -> AsyncLLMEngine:
        config = EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=256, dtype="float32", **settings)
        engines.append(track_engine(AsyncLLMEngine.from_config(config)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


async def deltas(engine: AsyncLLMEngine, request_id: str, params: SamplingParams) -> list[RequestOutput]:
    return [output async for output in engine.generate(request_id, PROMPT, params)]


def sizes(outputs: list[RequestOutput], index: int = 0) -> list[int]:
    return [len(output.outputs[index].token_ids) for output in outputs]


def boundaries(outputs: list[RequestOutput], index: int = 0) -> set[int]:
    """The token counts at which the consumer got a delta. A consumer that falls behind gets queued deltas
    merged, so it sees a subset of the engine's hand-over points, always with the last."""
    return set(itertools.accumulate(sizes(outputs, index)))


def joined(outputs: list[RequestOutput], index: int = 0) -> tuple[list[int], str]:
    tokens = [token for output in outputs for token in output.outputs[index].token_ids]
    return tokens, "".join(output.outputs[index].text for output in outputs)


def test_stream_interval_sends_the_first_token_then_every_k_then_the_rest(make_engine) -> None:
    every_token, every_four = make_engine(), make_engine(stream_interval=4)
    params = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)
    expected = asyncio.run(deltas(every_token, "one", params))
    grouped = asyncio.run(deltas(every_four, "four", params))
    assert boundaries(grouped) <= {1, 5, 9, 11} and 11 in boundaries(grouped)
    assert joined(grouped) == joined(expected)
    assert grouped[-1].finished and not any(output.finished for output in grouped[:-1])
    assert grouped[-1].outputs[0].finish_reason == "length"


def test_stream_interval_counts_each_sequence_of_a_request(make_engine) -> None:
    every_token, every_three = make_engine(), make_engine(stream_interval=3)
    params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=7, ignore_eos=True)
    expected = asyncio.run(deltas(every_token, "one", params))
    grouped = asyncio.run(deltas(every_three, "three", params))
    assert boundaries(grouped, 0) == boundaries(grouped, 1) and boundaries(grouped, 0) <= {1, 4, 7}
    assert [joined(grouped, index) for index in (0, 1)] == [joined(expected, index) for index in (0, 1)]


def test_a_failure_comes_after_the_tokens_held_back(make_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(stream_interval=4)
    request = engine.make_request("fails", PROMPT, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    append_token = engine.engine.output.detokenizer.append_token

    def fail_at_the_fourth_token(seq) -> None:
        if seq.request is request and seq.num_output_tokens >= 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken tokenizer")
        append_token(seq)

    monkeypatch.setattr(engine.engine.output.detokenizer, "append_token", fail_at_the_fourth_token)

    async def consume() -> tuple[list[RequestOutput], BaseException]:
        received: list[RequestOutput] = []
        with pytest.raises(RequestFailedError) as failure:
            async for output in engine.stream(request):
                received.append(output)
        return received, failure.value

    received, error = asyncio.run(consume())
    assert boundaries(received) <= {1, 3} and 3 in boundaries(received)
    assert "handling its sampled token failed" in str(error)


def test_one_wake_up_per_step_for_all_the_streams_of_a_loop(make_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    counts = {"steps": 0, "wake_ups": 0}
    step = engine.engine.step

    def counted_step() -> list[RequestOutput]:
        counts["steps"] += 1
        return step()

    monkeypatch.setattr(engine.engine, "step", counted_step)

    async def run() -> list[list[RequestOutput]]:
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted_call(*args: Any) -> Any:
            counts["wake_ups"] += 1
            return call_soon_threadsafe(*args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted_call)
        return await asyncio.gather(*(deltas(engine, f"r{i}", params) for i in range(8)))

    results = asyncio.run(run())
    assert all(sum(sizes(outputs)) == 6 for outputs in results)
    assert counts["wake_ups"] <= counts["steps"] < 8 * 6, counts


def sse_chunks(reply: Reply) -> list[dict[str, Any]]:
    events = reply.body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


@pytest.mark.parametrize("route, text_of", [
    ("v1/completions", lambda choice: choice.get("text", "")),
    ("v1/chat/completions", lambda choice: choice.get("delta", {}).get("content") or ""),
])
def test_served_chunks_of_k_tokens_add_up_to_the_whole_reply(
    make_engine, tmp_path: Path, route: str, text_of: Callable[[dict[str, Any]], str]
) -> None:
    worker = WorkerHarness(make_engine(stream_interval=4), tmp_path)
    body = {"max_tokens": 13, "temperature": 0, "ignore_eos": True, "n": 2}
    body.update({"prompt": PROMPT} if route == "v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    whole = asyncio.run(worker.request(route, body)).json()
    streamed = asyncio.run(worker.request(route, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    chunks = sse_chunks(streamed)
    for index in (0, 1):
        parts = [text_of(c["choices"][0]) for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        reference = whole["choices"][index]
        assert "".join(parts) == reference.get("text", reference.get("message", {}).get("content"))
        assert len([part for part in parts if part]) <= 4  # 13 tokens as 1 + 4 + 4 + 4
    assert chunks[-1]["usage"] == whole["usage"]
