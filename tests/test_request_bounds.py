"""Request bodies and what one request may ask for: every malformed body and every request beyond a limit is an
APIError with a 400 that names the problem, found before anything reaches the engine."""
from __future__ import annotations

import json
from typing import Any

import pytest

from handler.config import HandlerConfig
from handler.json_body import MAX_DEPTH, request_body
from handler.protocol import APIError, RequestLimits, parse_chat_request, parse_completion_request
from handler.response_budget import ResponseBudget

LIMITS = RequestLimits(max_choices=8, max_stop=2, max_stop_length=5, max_generated_tokens=100, default_max_tokens=20)
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "x",', "not valid JSON"),
    (b'{"prompt": "\xff"}', "not valid UTF-8"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "top_p": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "x", "top_p": 1e999}', "outside the range of a 64-bit float"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "number that cannot be read"),
    (b"[" * 100_000 + b"]" * 100_000, f"more than {MAX_DEPTH} levels"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels"),
    (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"\\udc80": 1}', "lone UTF-16 surrogate"),
])
def test_a_malformed_body_is_a_400_naming_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(APIError, match=message) as caught:
        request_body({"body": raw})
    assert caught.value.status == 400


def test_a_body_the_worker_already_parsed_is_checked_the_same_way() -> None:
    with pytest.raises(APIError, match="range of a 64-bit float"):
        request_body({"body": {"prompt": "x", "temperature": float("nan")}})
    assert request_body({"body": {"prompt": "x"}}) == {"prompt": "x"}


def test_a_body_nested_up_to_the_limit_is_read() -> None:
    raw = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert request_body({"body": raw.encode()}) == json.loads(raw)


@pytest.mark.parametrize("body, limit", [
    ({"prompt": ["a"] * 3, "n": 3}, "max_choices"),
    ({"prompt": "a", "n": 9}, "max_choices"),
    ({"prompt": "a", "stop": ["a", "b", "c"]}, "max_stop"),
    ({"prompt": "a", "stop": "abcdef"}, "max_stop_length"),
    ({"prompt": "a", "n": 5, "max_tokens": 21}, "max_generated_tokens"),
])
def test_a_completion_beyond_a_limit_names_the_limit(body: dict[str, Any], limit: str) -> None:
    with pytest.raises(APIError, match=rf"handler\.limits\.{limit}\)") as caught:
        parse_completion_request(body, LIMITS)
    assert caught.value.status == 400 and caught.value.code == "limit_exceeded"


def test_a_chat_without_max_tokens_counts_the_default_against_the_limit() -> None:
    assert parse_chat_request({"messages": CHAT, "n": 5}, LIMITS).params.max_tokens is None
    with pytest.raises(APIError, match=r"6 choice\(s\) x max_tokens 20"):
        parse_chat_request({"messages": CHAT, "n": 6}, LIMITS)


@pytest.mark.parametrize("timeout", [0, -1, "soon"])
def test_a_timeout_must_be_a_positive_number_of_seconds(timeout: Any) -> None:
    with pytest.raises(APIError, match="timeout"):
        parse_completion_request({"prompt": "a", "timeout": timeout}, LIMITS)
    assert parse_completion_request({"prompt": "a", "timeout": 2.5}, LIMITS).timeout == 2.5


def test_limits_are_read_from_the_model_config_and_checked() -> None:
    config = HandlerConfig.from_dict({"limits": {"max_choices": 4}})
    assert config.limits.max_choices == 4 and config.limits.max_stop == RequestLimits().max_stop
    with pytest.raises(ValueError, match=r"unknown handler.limits key\(s\) \['max_choice'\]"):
        HandlerConfig.from_dict({"limits": {"max_choice": 4}})
    with pytest.raises(ValueError, match="max_stop must be a positive integer"):
        HandlerConfig.from_dict({"limits": {"max_stop": 0}})


def test_a_relative_model_path_may_not_leave_the_model_folder(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="leaves the model folder"):
        HandlerConfig.from_dict({"model": "../../weights.gguf"}, str(tmp_path))
    inside = HandlerConfig.from_dict({"model": "weights/w.gguf"}, str(tmp_path)).model
    assert inside == str(tmp_path / "weights" / "w.gguf")


class _FourTokenVocabulary:
    def __len__(self) -> int:
        return 4

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["a", "\x01", "long token", "é"][: len(ids)]


def test_the_response_budget_takes_the_longest_token_and_the_logprobs() -> None:
    budget = ResponseBudget(_FourTokenVocabulary(), max_response_bytes=10_000)
    assert budget.token_bytes == len('"long token"') + 8
    assert budget.worst_case(2, 10, 5) > budget.worst_case(2, 10, None) > budget.worst_case(1, 10, None)
    budget.check(1, 10, None)
    with pytest.raises(ValueError, match=r"could reach \d+ bytes \(2 choice\(s\) x 100 tokens with 5 top logprobs\)"):
        budget.check(2, 100, 5)
