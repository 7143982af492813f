"""Hypothesis-generated request bodies: every reply is a 2xx or a 4xx with an OpenAI error object, in valid UTF-8,
and it ends its request in the frontend; in process against the handler, and against a real TorchServe, whose
worker is never restarted."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import track_engine
from engine import AsyncLLMEngine, EngineConfig
from handler.protocol import RequestLimits
from ts_http import http_bytes, wait_all_blocks_free, worker_pid
from worker_harness import Reply, WorkerHarness

ROUTES = ["v1/completions", "v1/chat/completions", "v1/models", "v1/embeddings", ""]
# Any JSON text can hold: huge integers, NaN and infinities, lone surrogates, nesting.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


TEXT = st.text(max_size=30)
SAMPLING = {
    "max_tokens": st.integers(1, 8), "n": st.integers(1, 3), "min_tokens": st.integers(0, 4),
    "temperature": st.sampled_from([0, 0.7]) | st.floats(0.01, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(1, 60) | st.just(-1), "min_p": st.floats(0, 0.5), "seed": st.integers(0, 2**64 - 1),
    "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "stop": TEXT | st.lists(TEXT, max_size=3), "stop_token_ids": st.lists(st.integers(0, 49151), max_size=2),
    "ignore_eos": st.booleans(), "stream": st.booleans(), "timeout": st.floats(1, 60),
}
PROMPT = TEXT | st.lists(st.integers(0, 49151), min_size=1, max_size=6) | st.lists(TEXT, min_size=1, max_size=3)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": TEXT}),
    min_size=1, max_size=3,
)
COMPLETION = st.fixed_dictionaries({"prompt": PROMPT}, optional={**SAMPLING, "logprobs": st.integers(0, 5)})
CHAT = st.fixed_dictionaries(
    {"messages": MESSAGES}, optional={**SAMPLING, "logprobs": st.just(True), "top_logprobs": st.integers(0, 5)},
)


def with_one_field_spoiled(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A plausible body in which one field (known or not) holds anything at all."""
    names = st.sampled_from(["prompt", "messages", "logprobs", *SAMPLING]) | st.text(max_size=6)
    return st.tuples(bodies, names, ANY_JSON).map(lambda spoil: {**spoil[0], spoil[1]: spoil[2]})


def as_json(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return bodies.map(lambda body: json.dumps(body).encode())


REQUEST = (
    st.tuples(st.just("v1/completions"), as_json(COMPLETION | with_one_field_spoiled(COMPLETION)))
    | st.tuples(st.just("v1/chat/completions"), as_json(CHAT | with_one_field_spoiled(CHAT)))
    | st.tuples(st.sampled_from(ROUTES), as_json(ANY_JSON) | st.binary(max_size=64))
)


def check_reply(status: int, body: bytes) -> None:
    """A 2xx or 4xx whose body is valid UTF-8: a JSON error object for a 4xx, whole JSON or SSE events for a 2xx."""
    text = body.decode("utf-8")
    assert 200 <= status < 500, (status, text[:300])
    if status >= 400:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"], error
    elif text.startswith("data: "):
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
    else:
        assert isinstance(json.loads(text), dict)


@pytest.fixture(scope="module")
def worker(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=512))
    limits = RequestLimits(max_generated_tokens=256)
    yield WorkerHarness(track_engine(engine), tmp_path_factory.mktemp("metrics"), limits)
    engine.shutdown()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=REQUEST)
def test_any_body_gets_a_2xx_or_a_4xx_from_the_handler(worker: WorkerHarness, request: tuple[str, bytes]) -> None:
    reply: Reply = asyncio.run(worker.request(*request))
    check_reply(reply.status, reply.body)
    assert reply.ends_the_job


@pytest.fixture
def unharmed_torchserve(torchserve: Any) -> Iterator[Any]:
    """The session's TorchServe; after all examples, its worker was never restarted and holds no KV block."""
    pid = worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    yield torchserve
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    assert worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version) == pid


@pytest.mark.slow
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=REQUEST)
def test_any_body_gets_a_2xx_or_a_4xx_from_torchserve(unharmed_torchserve: Any, request: tuple[str, bytes]) -> None:
    route, raw = request
    url = f"{unharmed_torchserve.predictions_url}/{route}"
    check_reply(*http_bytes(url, raw=raw, method="POST"))
