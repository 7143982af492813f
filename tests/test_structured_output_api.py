"""Structured outputs through a real TorchServe with the openai client: response_format (JSON schema, JSON object),
vLLM's structured_outputs (regex, choice) and guided_* fields, logit_bias; a constraint that does not compile is a
400 naming the field sent, and the worker keeps serving."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from ts_http import http

pytestmark = pytest.mark.usefixtures("served_blocks_free")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                   "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def token_id(tokenizer_dir: Path) -> Any:
    """The id of a text that SmolLM2's vocabulary holds as one token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def single(text: str) -> int:
        [token] = tokenizer.encode(text, add_special_tokens=False)
        return token

    return single


def test_response_format_json_schema_gives_an_object_of_that_schema(openai_client: Any, torchserve: Any) -> None:
    reply = openai_client.chat.completions.create(
        model=torchserve.model_name, messages=[{"role": "user", "content": "Describe a programmer."}], temperature=0,
        max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object_on_completions(openai_client: Any, torchserve: Any) -> None:
    chunks = list(openai_client.completions.create(
        model=torchserve.model_name, prompt='Paris: {"city": "Paris", "country": "France"}\nRome:', temperature=0,
        max_tokens=80, extra_body={"response_format": {"type": "json_object"}}, stream=True,
    ))
    text = "".join(chunk.choices[0].text for chunk in chunks)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_structured_outputs_regex_and_choice(openai_client: Any, torchserve: Any) -> None:
    phone = openai_client.completions.create(
        model=torchserve.model_name, prompt="Call me at", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}},
    ).choices[0]
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.text) and phone.finish_reason == "stop"
    for constraint in ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
                       {"guided_choice": ["red", "green", "blue"]}):
        color = openai_client.chat.completions.create(
            model=torchserve.model_name, messages=[{"role": "user", "content": "Pick a color."}], max_tokens=10,
            temperature=0.8, seed=5, extra_body=constraint,
        ).choices[0]
        assert color.message.content in ("red", "green", "blue") and color.finish_reason == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format", "response_format: invalid JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "structured_outputs.regex: invalid regex"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "guided_grammar: invalid EBNF grammar"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools", "tools: invalid JSON schema"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias", "vocabulary"),
])
def test_a_constraint_that_does_not_compile_is_a_400_and_the_worker_serves_on(
    torchserve: Any, body: dict[str, Any], param: str, words: str
) -> None:
    status, reply = http(f"{torchserve.openai_base_url}/chat/completions",
                         body={"messages": [{"role": "user", "content": "Hi"}], **body})
    assert status == 400 and reply["error"]["param"] == param, reply
    assert words in reply["error"]["message"]
    status, reply = http(f"{torchserve.openai_base_url}/completions", body={"prompt": "Hi", "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_logit_bias_bans_and_forces_tokens(openai_client: Any, torchserve: Any, token_id: Any) -> None:
    def complete(**fields: Any) -> Any:
        return openai_client.completions.create(model=torchserve.model_name, prompt="The capital of France is",
                                                max_tokens=6, temperature=0, logprobs=0, **fields).choices[0]

    assert " Paris" in complete().logprobs.tokens  # greedy's choice, then banned
    banned = complete(logit_bias={str(token_id(" Paris")): -100})
    assert " Paris" not in banned.logprobs.tokens
    forced = complete(logit_bias={str(token_id(" banana")): 100})
    assert forced.logprobs.tokens == [" banana"] * 6


def test_the_openai_client_sends_a_bad_response_format_as_a_400(openai_client: Any, torchserve: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=torchserve.model_name, messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"},
        )
    assert caught.value.body["param"] == "guided_regex"
