"""Tool calling through a real TorchServe with the openai client: tool_choice required and a named function
(constrained to the tools' schemas), auto (the model's own <tool_call> blocks read by the hermes parser), each whole
and streamed; a streamed response's deltas assemble into the whole response's calls; a conversation holding calls
and their results gets a normal answer."""
from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

pytestmark = pytest.mark.usefixtures("served_blocks_free")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a timezone",
                                      "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def few_shot(question: str) -> list[dict[str, Any]]:
    """Four earlier questions each answered by a get_weather call, its result and a reply, then `question`. With
    fewer examples SmolLM2-135M writes a <tool_response> block instead; with four its greedy choice of
    `<tool_call>` wins by about 4 nats (checked in test_auto_reads_the_model_s_own_tool_call)."""
    turns = []
    for city, degrees in (("Paris", 22), ("Berlin", 18), ("Madrid", 30), ("Oslo", 5)):
        call = {"id": f"call_{city}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        turns += [{"role": "user", "content": f"What's the weather in {city}?"},
                  {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": degrees})},
                  {"role": "assistant", "content": f"It is {degrees} degrees in {city}."}]
    return [*turns, {"role": "user", "content": question}]


def chat(client: Any, model: str, **fields: Any) -> Any:
    return client.chat.completions.create(model=model, temperature=0, **fields)


def whole_calls(reply: Any) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in reply.choices[0].message.tool_calls]


def streamed_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    """The calls OpenAI's stream deltas assemble into: a call's first delta has its id, type and name and empty
    arguments; the next ones only pieces of its arguments."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.arguments == ""
                calls[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index][1] += delta.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[index]) for index in sorted(calls)]


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]


def check_calls_fit_the_tools(calls: list[tuple[str, str]]) -> None:
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("tool_choice, parallel", [
    ({"type": "function", "function": {"name": "get_weather"}}, True),
    ("required", False),
], ids=["named", "required"])
def test_a_forced_call_fits_its_schema_whole_and_streamed(
    openai_client: Any, torchserve: Any, tool_choice: Any, parallel: bool
) -> None:
    fields = dict(messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel, max_tokens=60)
    reply = chat(openai_client, torchserve.model_name, **fields)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = whole_calls(reply)
    assert len(calls) == 1 and all(call.id.startswith("call_") for call in choice.message.tool_calls)
    check_calls_fit_the_tools(calls)
    if tool_choice != "required":
        assert calls[0][0] == "get_weather"
    chunks = list(chat(openai_client, torchserve.model_name, stream=True, **fields))
    assert streamed_calls(chunks) == calls
    assert finish_reasons(chunks) == ["tool_calls"]
    assert not any(chunk.choices[0].delta.content for chunk in chunks[1:])


def test_auto_reads_the_model_s_own_tool_call(openai_client: Any, torchserve: Any) -> None:
    fields = dict(messages=few_shot("What's the weather in Tokyo?"), tools=TOOLS, max_tokens=40)
    reply = chat(openai_client, torchserve.model_name, logprobs=True, top_logprobs=2, **fields)
    decision = [entry for entry in reply.choices[0].logprobs.content if entry.token in ("call", "response")][0]
    assert decision.token == "call", "the model no longer starts a <tool_call>: the few-shot example needs updating"
    assert decision.top_logprobs[0].logprob - decision.top_logprobs[1].logprob > 2
    assert whole_calls(reply) == [("get_weather", '{"city": "Tokyo"}')]
    assert reply.choices[0].message.content is None and reply.choices[0].finish_reason == "tool_calls"
    chunks = list(chat(openai_client, torchserve.model_name, stream=True, **fields))
    assert streamed_calls(chunks) == whole_calls(reply)
    assert finish_reasons(chunks) == ["tool_calls"]
    assert not any(chunk.choices[0].delta.content for chunk in chunks if chunk.choices)


def test_a_conversation_with_a_call_and_its_result_gets_an_answer(openai_client: Any, torchserve: Any) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    asked = chat(openai_client, torchserve.model_name, messages=QUESTION, tools=TOOLS, tool_choice=forced,
                 max_tokens=60).choices[0].message
    result = {"role": "tool", "tool_call_id": asked.tool_calls[0].id, "content": '{"temperature": 21, "sky": "clear"}'}
    history = [*QUESTION, asked, result]  # the reply's message object, as the openai client sends it back
    answer = chat(openai_client, torchserve.model_name, messages=history, tools=TOOLS, max_tokens=40).choices[0]
    assert answer.message.content and answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length")


def test_tool_choice_none_answers_as_without_tools(openai_client: Any, torchserve: Any) -> None:
    plain = chat(openai_client, torchserve.model_name, messages=QUESTION, max_tokens=16)
    none = chat(openai_client, torchserve.model_name, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and none.choices[0].message.tool_calls is None
