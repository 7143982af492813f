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
SMALL_INT = st.integers(min_value=-3, max_value=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                 "content": st.text(max_size=20) | ANY_JSON})
FIELDS = {
    "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 50_000), max_size=6) | st.lists(st.text(max_size=5)),
    "messages": st.lists(MESSAGE, max_size=3),
    "max_tokens": SMALL_INT, "n": SMALL_INT, "top_k": st.integers(), "seed": st.integers(),
    "temperature": st.floats(), "top_p": st.floats(), "min_p": st.floats(),
    "repetition_penalty": st.floats() | st.integers(), "presence_penalty": st.floats(),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=20),
    "stop_token_ids": st.lists(st.integers(), max_size=3), "min_tokens": SMALL_INT, "logprobs": SMALL_INT | st.booleans(),
    "top_logprobs": SMALL_INT, "stream": st.booleans(), "ignore_eos": st.booleans(), "timeout": st.floats(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
BODY = st.fixed_dictionaries({}, optional={name: value | ANY_JSON for name, value in FIELDS.items()}) | ANY_JSON
RAW_BODY = BODY.map(lambda body: json.dumps(body).encode()) | st.binary(max_size=64)


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
@given(route=st.sampled_from(ROUTES), raw=RAW_BODY)
def test_any_body_gets_a_2xx_or_a_4xx_from_the_handler(worker: WorkerHarness, route: str, raw: bytes) -> None:
    reply: Reply = asyncio.run(worker.request(route, raw))
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
@given(route=st.sampled_from(ROUTES), raw=RAW_BODY)
def test_any_body_gets_a_2xx_or_a_4xx_from_torchserve(unharmed_torchserve: Any, route: str, raw: bytes) -> None:
    url = f"{unharmed_torchserve.predictions_url}/{route}"
    check_reply(*http_bytes(url, raw=raw, method="POST"))
