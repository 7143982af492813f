"""Hostile requests through a real TorchServe, each sent while innocent requests run: the hostile one gets a 4xx
with an OpenAI error object in valid UTF-8, the innocent ones complete unchanged, the worker is never restarted
and every KV block is free afterwards."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import pytest

from ts_http import http, http_bytes, wait_all_blocks_free, worker_pid

T = TypeVar("T")
INNOCENT = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
ONE_MB_OF_PROMPTS = json.dumps({"prompt": ["a"] * 200_000, "n": 100}).encode()

# (id, body as JSON or raw bytes, the field or words the error message must name)
HOSTILE: list[tuple[str, Any, str]] = [
    ("top_k_huge", {"prompt": "Hi", "top_k": 10**30}, "top_k"),
    ("repetition_penalty_huge", {"prompt": "Hi", "repetition_penalty": 10**400}, "repetition_penalty"),
    ("frequency_penalty_huge", {"prompt": "Hi", "frequency_penalty": -(10**20)}, "frequency_penalty"),
    ("stop_token_outside_vocab_with_min_tokens", {"prompt": "Hi", "stop_token_ids": [10**9], "min_tokens": 4},
     "stop_token_ids"),
    ("seed_beyond_64_bits", {"prompt": "Hi", "seed": 2**64}, "seed"),
    ("temperature_below_minimum", {"prompt": "Hi", "temperature": 1e-40}, "temperature"),
    ("repetition_penalty_nan", b'{"prompt": "Hi", "repetition_penalty": NaN}', "NaN"),
    ("top_p_infinity", b'{"prompt": "Hi", "top_p": Infinity}', "Infinity"),
    ("deep_nesting", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested"),
    ("integer_of_5000_digits", b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}", "number"),
    ("invalid_utf8", b'{"prompt": "\xc3\x28"}', "UTF-8"),
    ("lone_surrogate_in_prompt", b'{"prompt": "abc \\ud834 def"}', "surrogate"),
    ("lone_surrogate_in_a_key", b'{"prompt": "Hi", "\\udc80": 1}', "surrogate"),
    ("millions_of_sequences", ONE_MB_OF_PROMPTS, "max_choices"),
    ("too_many_stop_strings", {"prompt": "Hi", "stop": [f"s{i}" for i in range(100)]}, "max_stop"),
    ("response_too_large", {"prompt": "Hi", "n": 16, "max_tokens": 1000, "logprobs": 20}, "max_response_bytes"),
]


@pytest.fixture(autouse=True)
def same_worker_and_all_blocks_free(torchserve: Any) -> Iterator[None]:
    before = worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    yield
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    assert worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version) == before


@pytest.fixture(scope="module")
def innocent_text(torchserve: Any) -> str:
    status, response = http(f"{torchserve.openai_base_url}/completions", body=INNOCENT)
    assert status == 200, response
    return response["choices"][0]["text"]


def beside_innocents(torchserve: Any, innocent_text: str, hostile: Callable[[], T], count: int = 3) -> T:
    """Run `hostile` while `count` innocent completions run; they must all give the text they give alone."""
    url = f"{torchserve.openai_base_url}/completions"
    with ThreadPoolExecutor(count) as pool:
        innocents = [pool.submit(http, url, INNOCENT) for _ in range(count)]
        result = hostile()
        for innocent in innocents:
            status, response = innocent.result()
            assert status == 200 and response["choices"][0]["text"] == innocent_text, response
    return result


@pytest.mark.parametrize("body, named", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_a_hostile_completion_gets_a_400_and_harms_no_one(
    torchserve: Any, innocent_text: str, body: Any, named: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"{torchserve.openai_base_url}/completions"
    status, payload = beside_innocents(torchserve, innocent_text, lambda: http_bytes(url, raw=raw))
    error = json.loads(payload.decode("utf-8"))["error"]  # strict UTF-8: no reply may hold a lone surrogate
    assert status == 400 and named in error["message"] + str(error["param"]), error
    assert error["type"] == "invalid_request_error"


def test_a_request_past_its_timeout_is_aborted_with_408(torchserve: Any, innocent_text: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 900, "ignore_eos": True, "timeout": 0.5}
    url = f"{torchserve.openai_base_url}/completions"
    status, response = beside_innocents(torchserve, innocent_text, lambda: http(url, body=body))
    assert status == 408 and response["error"]["code"] == "timeout", response
    assert "0.5" in response["error"]["message"]


def test_a_stream_past_its_timeout_ends_with_an_error_event(torchserve: Any, innocent_text: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 900, "ignore_eos": True, "timeout": 0.5, "stream": True}
    url = f"{torchserve.openai_base_url}/completions"
    status, payload = beside_innocents(torchserve, innocent_text, lambda: http_bytes(url, body=body))
    events = [event.removeprefix("data: ") for event in payload.decode().split("\n\n") if event]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "timeout"


def test_a_client_that_leaves_mid_stream_is_ended_by_its_deadline(torchserve: Any, innocent_text: str) -> None:
    """TorchServe cannot tell the handler that a client went away: the request's deadline ends it."""
    body = {"prompt": "Hi", "max_tokens": 900, "ignore_eos": True, "timeout": 3, "stream": True}
    url = f"{torchserve.openai_base_url}/completions"

    def read_one_chunk_and_leave() -> bytes:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.readline()

    assert beside_innocents(torchserve, innocent_text, read_one_chunk_and_leave).startswith(b"data: {")
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version, timeout=30)


def test_a_client_sending_the_describe_header_gets_its_completion(torchserve: Any, innocent_text: str) -> None:
    url = f"{torchserve.openai_base_url}/completions"
    status, response = http(url, body=INNOCENT, headers={"describe": "True"})
    assert status == 200 and response["choices"][0]["text"] == innocent_text


def test_models_shows_no_absolute_path(torchserve: Any) -> None:
    status, response = http(f"{torchserve.openai_base_url}/models", method="GET")
    assert status == 200 and not response["data"][0]["root"].startswith("/")
