"""The OpenAI layer over a real AsyncLLMEngine, in process: chat templates, validation before state, aborts."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Iterator

import pytest

from conftest import track_engine
from engine import AsyncLLMEngine, EngineConfig
from handler.openai_serving import OpenAIServing
from handler.protocol import APIError

PLAIN_TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def engine(tiny_model: Any) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=256))
    yield track_engine(engine)
    engine.shutdown()


def _serving(engine: AsyncLLMEngine, chat_template: Any = None) -> OpenAIServing:
    return OpenAIServing(engine, "tiny", "1.0", "tiny-llama", chat_template)


def test_chat_template_from_the_yaml_replaces_the_tokenizer_s(engine: AsyncLLMEngine) -> None:
    body = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2}
    ours = asyncio.run(_serving(engine, PLAIN_TEMPLATE).create_chat_completion(body, "a"))
    theirs = asyncio.run(_serving(engine).create_chat_completion(body, "b"))
    expected = engine.tokenizer.encode("<user>Hi there", add_special_tokens=False)
    assert ours["usage"]["prompt_tokens"] == len(expected)
    assert theirs["usage"]["prompt_tokens"] > len(expected)  # SmolLM2's template adds a system turn


def test_an_invalid_second_prompt_adds_nothing_to_the_engine(engine: AsyncLLMEngine) -> None:
    body = {"prompt": [[1, 2, 3], [1, 10**9]], "max_tokens": 50}
    with pytest.raises(APIError, match="outside the vocabulary"):
        asyncio.run(_serving(engine).create_completion(body, "bad"))
    assert not engine.engine.has_unfinished_requests()


def test_closing_a_stream_early_aborts_every_prompt_of_the_call(engine: AsyncLLMEngine) -> None:
    body = {"prompt": [[5, 6, 7] * 10, [8, 9] * 10], "n": 2, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def read_two_events() -> list[dict[str, Any]]:
        events = await _serving(engine).create_completion(body, "early")
        first = [json.loads((await events.__anext__()).removeprefix("data: ")) for _ in range(2)]
        assert engine.stats().blocks.num_used_blocks > 0
        await events.aclose()
        await asyncio.sleep(0.2)
        return first

    first = asyncio.run(read_two_events())
    assert all(event["object"] == "text_completion.chunk" for event in first)
    _wait_idle(engine)
    assert engine.stats().blocks.num_used_blocks == 0


def _wait_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(wait(), timeout))


def test_a_constraint_is_compiled_off_the_event_loop_then_found_cached(
        engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    compile_grammar = engine.engine.compile_grammar
    calls: list[tuple[threading.Thread, Any]] = []

    def recording(constraint: Any) -> Any:
        calls.append((threading.current_thread(), compile_grammar(constraint)))
        return calls[-1][1]

    monkeypatch.setattr(engine.engine, "compile_grammar", recording)
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "structured_outputs": {"regex": "[a-z]{2,4}"}}
    reply = asyncio.run(_serving(engine).create_completion(body, "compiled"))
    (compiling_thread, compiled), (_, found) = calls
    assert compiling_thread is not threading.main_thread() and found is compiled
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_a_constraint_that_does_not_compile_is_refused_off_the_loop_naming_its_field(engine: AsyncLLMEngine) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "guided_regex": "(unclosed"}
    with pytest.raises(APIError, match="^guided_regex: invalid regex") as caught:
        asyncio.run(_serving(engine).create_completion(body, "uncompiled"))
    assert (caught.value.status, caught.value.param) == (400, "guided_regex")
    assert not engine.engine.has_unfinished_requests()
