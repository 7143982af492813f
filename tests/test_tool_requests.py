"""A chat request's tools, tool_choice and tool messages: checked (every mistake a 400 naming the field), the JSON
schema a forced call constrains the output to, and the parser each tool_choice reads the output with."""
from __future__ import annotations

import json
from typing import Any

import pytest

from handler.protocol import APIError, RequestLimits, parse_chat_request
from handler.tool_calls.parsers import HermesToolParser, Llama3JsonToolParser, NamedCallParser, RequiredCallsParser

CHAT = [{"role": "user", "content": "Weather in Paris?"}]
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(**fields: Any) -> Any:
    return parse_chat_request({"messages": CHAT, **fields}, RequestLimits())


def test_tools_default_to_auto_with_the_configured_parser() -> None:
    tools = chat(tools=[WEATHER, TIME]).tools
    assert tools.choice == "auto" and tools.template_tools() == [WEATHER, TIME]
    assert tools.output_constraint() is None
    assert isinstance(tools.parser("hermes"), HermesToolParser)
    assert isinstance(tools.parser("llama3_json"), Llama3JsonToolParser)
    assert tools.parser("hermes").max_calls is None
    assert chat(tools=[WEATHER], parallel_tool_calls=False).tools.parser("hermes").max_calls == 1


def test_tool_choice_none_offers_no_tools_and_reads_no_calls() -> None:
    request = chat(tools=[WEATHER], tool_choice="none")
    assert request.tools.template_tools() is None and request.tools.parser("hermes") is None
    assert request.params.structured_outputs is None
    assert chat(tools=[]).tools is None and chat(tool_choice="none").tools is None


def test_a_named_function_constrains_the_output_to_its_parameters() -> None:
    request = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(request.params.structured_outputs.json) == PARAMETERS
    assert request.constraint_source == "tools"
    parser = request.tools.parser("hermes")
    assert isinstance(parser, NamedCallParser) and parser.name == "get_weather"
    without_parameters = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(without_parameters.params.structured_outputs.json) == {"type": "object"}


@pytest.mark.parametrize("parallel, max_items", [(True, None), (False, 1)])
def test_required_constrains_the_output_to_an_array_of_calls(parallel: bool, max_items: Any) -> None:
    request = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
    schema = json.loads(request.params.structured_outputs.json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema.get("maxItems") == max_items
    calls = schema["items"]["anyOf"]
    assert [call["properties"]["name"]["enum"] for call in calls] == [["get_weather"], ["get_time"]]
    assert [call["properties"]["parameters"] for call in calls] == [PARAMETERS, {"type": "object"}]
    assert all(call["required"] == ["name", "parameters"] for call in calls)
    assert isinstance(request.tools.parser("hermes"), RequiredCallsParser)


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": {"type": "function"}}, "tools", "list"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0].function must be an object"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "get_weather"}}]}, "tools", "repeated: get_weather"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools",
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools", "JSON schema object"),
    ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools", "extra"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "'get_time'"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "tool_choice must be"),
    ({"tools": [WEATHER], "tool_choice": {"function": {"name": "get_weather"}}}, "tool_choice", "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools",
     "response_format and tools"),
])
def test_bad_tools_are_a_400_naming_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(APIError) as caught:
        chat(**fields)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert words in caught.value.message


def test_a_conversation_with_calls_and_results_is_shaped_for_the_template() -> None:
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22 C"}]},
                {"role": "assistant", "tool_calls": [CALL]}]
    parsed = parse_chat_request({"messages": messages}, RequestLimits()).messages
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert parsed[1:] == [{"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
                          {"role": "assistant", "content": "", "tool_calls": [call]}]


def test_an_assistant_reply_sent_back_as_it_came_is_accepted() -> None:
    reply = {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None, "annotations": [],
             "audio": None, "function_call": None}
    parsed = parse_chat_request({"messages": [*CHAT, reply]}, RequestLimits()).messages
    assert parsed[1]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("message, param", [
    ({"role": "assistant", "content": "Hi", "refusal": "I cannot"}, "messages[1]"),
    ({"role": "tool", "content": "22 C"}, "messages[1].tool_call_id"),
    ({"role": "tool", "tool_call_id": "call_1"}, "messages[1].content"),
    ({"role": "assistant", "tool_calls": []}, "messages[1].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}, "messages[1].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{not json"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[" * 100_000}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "user", "content": "Hi", "tool_calls": [CALL]}, "messages[1]"),
    ({"role": "assistant", "content": "Hi", "tool_call_id": "call_1"}, "messages[1]"),
])
def test_bad_tool_messages_are_a_400_naming_the_message(message: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_chat_request({"messages": [*CHAT, message]}, RequestLimits())
    assert (caught.value.status, caught.value.param) == (400, param)
