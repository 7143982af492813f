"""Every reply the handler sends ends its request in the frontend, carries the right status, and is valid UTF-8
whatever the request held; the describe output is for the management API only."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import PROMPT, track_engine
from engine import AsyncLLMEngine, EngineConfig
from worker_harness import Reply, WorkerHarness


@pytest.fixture(scope="module")
def engine(tiny_model: Any) -> Iterator[AsyncLLMEngine]:
    engine = track_engine(AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=256)))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def worker(engine: AsyncLLMEngine, tmp_path_factory: pytest.TempPathFactory) -> WorkerHarness:
    return WorkerHarness(engine, tmp_path_factory.mktemp("metrics"))


def send(worker: WorkerHarness, route: str, body: Any, **headers: str) -> Reply:
    return asyncio.run(worker.request(route, body, headers))


def test_a_whole_response_is_one_chunk_that_ends_the_job(worker: WorkerHarness) -> None:
    reply = send(worker, "v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert reply.status == 200 and reply.streamed and reply.ends_the_job
    assert reply.frames[0].content_type == "application/json"
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_an_error_is_a_whole_reply_with_its_status_and_then_ends_the_job(worker: WorkerHarness) -> None:
    reply = send(worker, "v1/completions", {"prompt": PROMPT, "top_p": 7})
    first = reply.frames[0]
    assert first.status == 400 and "ts_stream_next" not in first.headers  # not chunked: the status reaches the client
    assert json.loads(first.body)["error"]["param"] == "top_p"
    assert reply.ends_the_job and reply.frames[-1].body == b""


def test_a_stream_ends_with_done_and_ends_the_job(worker: WorkerHarness) -> None:
    reply = send(worker, "v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert reply.streamed and reply.ends_the_job
    assert reply.body.decode().endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "\\ud800": 1}',  # a lone surrogate in a key, quoted by the error message
    b'{"prompt": "\\udfff tail", "max_tokens": 2}',
    b'{"prompt": "x", "stop": ["\\ud800"]}',
    b'{"model": "\\ud800", "prompt": "x"}',
])
def test_replies_are_valid_utf8_whatever_the_request_held(worker: WorkerHarness, raw: bytes) -> None:
    reply = send(worker, "v1/completions", raw)
    assert reply.status == 400 and reply.ends_the_job
    assert "surrogate" in reply.json()["error"]["message"]


def test_an_inference_client_sending_describe_gets_a_completion(worker: WorkerHarness) -> None:
    reply = send(worker, "v1/completions", {"prompt": PROMPT, "max_tokens": 2}, describe="True")
    assert reply.status == 200 and reply.json()["object"] == "text_completion"


def test_the_management_describe_sends_no_input_and_gets_the_engine_state(worker: WorkerHarness) -> None:
    context = worker.context({"describe": "True"})
    described = asyncio.run(worker.handler.handle([{}], context))
    assert "engine" in json.loads(described[0])
    assert context.get_response_headers(0)["ts_stream_next"] == "false"  # the frontend drops the job after it


def test_models_shows_no_absolute_path(worker: WorkerHarness) -> None:
    card = send(worker, "v1/models", b"").json()["data"][0]
    assert card["root"] == "tiny" and not Path(card["root"]).is_absolute()
