"""Bad input gets an OpenAI error object with a 4xx status; the worker keeps serving and no KV block leaks."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest

from ts_http import http, wait_all_blocks_free

CHAT = [{"role": "user", "content": "Hi"}]
FAR_TOO_LONG = "far too long"  # replaced by a token-id prompt longer than the served max_model_len

# (id, route, body or raw bytes, status, param, code)
CASES: list[tuple[str, str, Any, int, Optional[str], Optional[str]]] = [
    ("invalid_json", "completions", b'{"prompt": "Hi",', 400, None, "invalid_json"),
    ("body_not_an_object", "completions", ["Hi"], 400, None, None),
    ("missing_prompt", "completions", {"max_tokens": 4}, 400, "prompt", None),
    ("missing_messages", "chat/completions", {"max_tokens": 4}, 400, "messages", None),
    ("max_tokens_wrong_type", "completions", {"prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("negative_max_tokens", "completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("temperature_5", "chat/completions", {"messages": CHAT, "temperature": 5}, 400, "temperature", None),
    ("top_p_0", "completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", None),
    ("n_0", "completions", {"prompt": "Hi", "n": 0}, 400, "n", None),
    ("logprobs_50", "completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs", None),
    ("top_logprobs_without_logprobs", "chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("presence_penalty_3", "completions", {"prompt": "Hi", "presence_penalty": 3}, 400, "presence_penalty", None),
    ("seed_not_an_integer", "completions", {"prompt": "Hi", "seed": "abc"}, 400, "seed", None),
    ("stop_not_strings", "completions", {"prompt": "Hi", "stop": 5}, 400, "stop", None),
    ("empty_prompt", "completions", {"prompt": ""}, 400, "prompt", None),
    ("token_id_outside_vocab", "completions", {"prompt": [1, 10**9]}, 400, "prompt", None),
    ("empty_messages", "chat/completions", {"messages": []}, 400, "messages", None),
    ("non_string_content", "chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ("unknown_role", "chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages[0].role", None),
    ("unknown_field", "completions", {"prompt": "Hi", "temprature": 0.5}, 400, "temprature", None),
    ("tool_without_function", "chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools",
     None),
    ("stream_options_without_stream", "completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("unknown_model", "completions", {"prompt": "Hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("unknown_route", "audio/speech", {"input": "Hi"}, 404, None, "unknown_url"),
    ("prompt_too_long", "completions", FAR_TOO_LONG, 400, "prompt", "context_length_exceeded"),
]


@pytest.fixture(autouse=True)
def server_blocks_free_after_test(torchserve: Any) -> Iterator[None]:
    yield
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)


@pytest.fixture(scope="module")
def max_model_len(torchserve: Any) -> int:
    return http(f"{torchserve.openai_base_url}/models", method="GET")[1]["data"][0]["max_model_len"]


@pytest.mark.parametrize("route, body, status, param, code", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(
    torchserve: Any, max_model_len: int, route: str, body: Any, status: int, param: Optional[str], code: Optional[str]
) -> None:
    if body == FAR_TOO_LONG:
        body = {"prompt": [100] * max_model_len, "max_tokens": 16}
    raw = body if isinstance(body, bytes) else None
    got_status, response = http(f"{torchserve.openai_base_url}/{route}", body=None if raw else body, raw=raw)
    assert got_status == status, response
    error = response["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


def test_context_length_error_states_the_limit_and_the_count(torchserve: Any, max_model_len: int) -> None:
    body = {"messages": [{"role": "user", "content": "word " * max_model_len}], "max_tokens": 10}
    status, response = http(f"{torchserve.openai_base_url}/chat/completions", body=body)
    message = response["error"]["message"]
    assert status == 400 and response["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {max_model_len} tokens" in message
    prompt_tokens = int(message.split("(")[1].split(" in the messages")[0])
    assert prompt_tokens > max_model_len - 10 and f"requested {prompt_tokens + 10} tokens" in message


def test_worker_still_serves_after_the_battery(torchserve: Any) -> None:
    for _, route, body, *_ in CASES[:10]:
        raw = body if isinstance(body, bytes) else None
        http(f"{torchserve.openai_base_url}/{route}", body=None if raw else body, raw=raw)
    status, response = http(f"{torchserve.openai_base_url}/completions", body={"prompt": "Hi", "max_tokens": 3})
    assert status == 200 and response["usage"]["completion_tokens"] == 3
