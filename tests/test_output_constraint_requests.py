"""response_format, structured_outputs, vLLM's guided_* fields, logit_bias and vllm_xargs read into SamplingParams;
each mistake is a 400 naming the field the client sent."""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

from engine.structured_output.params import StructuredOutputsParams
from handler.protocol import APIError, RequestLimits, parse_chat_request, parse_completion_request

CHAT = [{"role": "user", "content": "Hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def chat(**fields: Any) -> Any:
    return parse_chat_request({"messages": CHAT, **fields}, RequestLimits())


def completion(**fields: Any) -> Any:
    return parse_completion_request({"prompt": "Hi", **fields}, RequestLimits())


@pytest.mark.parametrize("parse", [chat, completion], ids=["chat", "completion"])
@pytest.mark.parametrize("fields, expected, source", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "anything"}}},
     StructuredOutputsParams(json_object=True), "response_format"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutputsParams(regex="[0-9]+"), "structured_outputs"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputsParams(choice=("yes", "no")),
     "structured_outputs"),
    ({"structured_outputs": {"json": SCHEMA, "regex": None}}, StructuredOutputsParams(json=SCHEMA),
     "structured_outputs"),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA), "guided_json"),
    ({"guided_regex": "a+"}, StructuredOutputsParams(regex="a+"), "guided_regex"),
    ({"guided_choice": ["x"]}, StructuredOutputsParams(choice=("x",)), "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputsParams(grammar='root ::= "a"'), "guided_grammar"),
])
def test_each_constraint_field_becomes_the_engine_s_structured_outputs(
    parse: Callable[..., Any], fields: dict[str, Any], expected: StructuredOutputsParams, source: str
) -> None:
    request = parse(**fields)
    assert request.params.structured_outputs == expected
    assert request.constraint_source == source


def test_response_format_text_constrains_nothing() -> None:
    request = chat(response_format={"type": "text"})
    assert request.params.structured_outputs is None and request.constraint_source is None


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, "response_format",
     "schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "extra": 1}}}, "response_format",
     "extra"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x"}}}, "response_format", "only for type"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "regexp"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "structured_outputs.choice"),
    ({"guided_choice": "yes"}, "guided_choice", "guided_choice must be"),
    ({"guided_json": 5}, "guided_json", "guided_json"),
    ({"guided_regex": ""}, "guided_regex", "guided_regex must be"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "response_format and guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}, "guided_choice",
     "structured_outputs and guided_choice"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": "high"}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": [1, 2]}, "logit_bias", "an object"),
    ({"vllm_xargs": {"k": {"nested": 1}}}, "vllm_xargs", "vllm_xargs.k"),
    ({"vllm_xargs": {"k": [1, None]}}, "vllm_xargs", "vllm_xargs.k"),
])
def test_a_bad_constraint_or_bias_is_a_400_naming_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    for parse in (chat, completion):
        with pytest.raises(APIError) as caught:
            parse(**fields)
        assert (caught.value.status, caught.value.param) == (400, param)
        assert words in caught.value.message


def test_logit_bias_keys_become_token_ids() -> None:
    assert chat(logit_bias={"42": -100, "7": 2.5}).params.logit_bias == {42: -100, 7: 2.5}
    assert completion(logit_bias={}).params.logit_bias is None


@pytest.mark.parametrize("xargs, expected", [
    ({"penalty": 0.5, "words": ["a", "b"], "mode": "x", "ids": [1, 2.5]},
     {"penalty": 0.5, "words": ["a", "b"], "mode": "x", "ids": [1, 2.5]}),
    ({}, None),
])
def test_vllm_xargs_become_extra_args(xargs: dict[str, Any], expected: Optional[dict[str, Any]]) -> None:
    assert completion(vllm_xargs=xargs).params.extra_args == expected
    assert chat(vllm_xargs=xargs).params.extra_args == expected
