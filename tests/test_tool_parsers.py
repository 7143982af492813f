"""Tool calls read from model output: each format whole and streamed in pieces of any size, which assemble into the
whole parse; text that is not a call stays content, and no partial tag leaks out as content while streaming."""
from __future__ import annotations

from typing import Callable

import pytest

from handler.tool_calls.parsers import (
    HermesToolParser, Llama3JsonToolParser, NamedCallParser, ParsedDelta, ParsedOutput, RequiredCallsParser, ToolCall,
    ToolCallParser, assemble,
)

WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}}'
WEATHER_ARGUMENTS = '{"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}'
HERMES_TWO_CALLS = (f"Let me look that up.\n<tool_call>\n{WEATHER_CALL}\n</tool_call>\n"
                    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
PARIS_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA3_TWO_CALLS = f'<|python_tag|>{PARIS_CALL}; {{"name": "get_time", "parameters": {{}}}}'
REQUIRED_TWO_CALLS = f'[{PARIS_CALL}, {{"name": "get_time", "parameters": {{}}}}]'


def streamed(parser: ToolCallParser, text: str, size: int) -> list[ParsedDelta]:
    return [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]


def check_every_split(make: Callable[[], ToolCallParser], text: str, expected: ParsedOutput) -> None:
    assert make().parse(text) == expected
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        assert assemble(streamed(make(), text, size)) == expected, f"pieces of {size} characters"


def test_hermes_reads_text_then_several_calls() -> None:
    expected = ParsedOutput("Let me look that up.",
                            [ToolCall("get_weather", WEATHER_ARGUMENTS), ToolCall("get_time", "{}")])
    check_every_split(HermesToolParser, HERMES_TWO_CALLS, expected)


def test_hermes_text_without_calls_is_all_content() -> None:
    for text in ("Plain answer.\n", "a < b and <tool_cal is not a tag", "  spaced out  ", "<tool_call"):
        check_every_split(HermesToolParser, text, ParsedOutput(text, []))


@pytest.mark.parametrize("block", [
    "<tool_call>\nnot json at all\n</tool_call>",
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": "not an object"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # the closing brace missing
    '<tool_call>\n{"name": "get_w',  # cut off by max_tokens
    '<tool_call>\n{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}\n</tool_call>",  # too deep
])
def test_hermes_malformed_block_stays_content_when_parsed_whole(block: str) -> None:
    text = f"Before.\n{block}\nAfter."
    assert HermesToolParser().parse(text) == ParsedOutput(text, [])


def test_hermes_malformed_block_before_the_name_stays_content_when_streamed() -> None:
    text = "Before.\n<tool_call>\nnot json at all\n</tool_call>"
    check_every_split(HermesToolParser, text, ParsedOutput(text, []))


def test_hermes_keeps_good_calls_around_a_malformed_block() -> None:
    text = f"<tool_call>\n[1, 2]\n</tool_call>\n<tool_call>\n{WEATHER_CALL}\n</tool_call>"
    parsed = HermesToolParser().parse(text)
    assert parsed.calls == [ToolCall("get_weather", WEATHER_ARGUMENTS)]
    assert parsed.content == "<tool_call>\n[1, 2]\n</tool_call>"


def test_hermes_streams_a_call_name_first_then_argument_pieces_and_never_leaks_tag_pieces() -> None:
    deltas = streamed(HermesToolParser(), HERMES_TWO_CALLS, 1)
    content = [delta.content for delta in deltas if delta.content]
    assert "".join(content) == "Let me look that up."
    assert not any("<" in piece for piece in content)
    calls = [call for delta in deltas for call in delta.calls]
    firsts = [call for call in calls if call.name is not None]
    assert [(call.index, call.name, call.arguments) for call in firsts] == [(0, "get_weather", ""), (1, "get_time", "")]
    assert len([call for call in calls if call.index == 0]) > 10  # the arguments came in many pieces
    assert calls.index(firsts[1]) > max(i for i, call in enumerate(calls) if call.index == 0)


def test_hermes_with_max_calls_1_drops_the_later_calls() -> None:
    parsed = HermesToolParser(max_calls=1).parse(HERMES_TWO_CALLS)
    assert parsed.calls == [ToolCall("get_weather", WEATHER_ARGUMENTS)]


def test_llama3_json_reads_calls_separated_by_semicolons() -> None:
    expected = ParsedOutput(None, [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}")])
    check_every_split(Llama3JsonToolParser, LLAMA3_TWO_CALLS, expected)
    check_every_split(Llama3JsonToolParser, LLAMA3_TWO_CALLS.removeprefix("<|python_tag|>"), expected)


@pytest.mark.parametrize("text", [
    "The weather is fine.", '{"name": 5, "parameters": {}}', '{"not": "a call"}', '<|python_tag|>{"nam',
    " {broken json",
])
def test_llama3_json_output_that_is_not_calls_is_content(text: str) -> None:
    check_every_split(Llama3JsonToolParser, text, ParsedOutput(text, []))


def test_a_call_cut_off_after_its_name_keeps_the_arguments_that_came() -> None:
    expected = ParsedOutput(None, [ToolCall("f", '{"city": "Pa')])
    check_every_split(HermesToolParser, '<tool_call>\n{"name": "f", "arguments": {"city": "Pa', expected)
    check_every_split(Llama3JsonToolParser, '{"name": "f", "parameters": {"city": "Pa', expected)


def test_required_calls_parser_reads_a_json_array_of_calls() -> None:
    expected = ParsedOutput(None, [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}")])
    check_every_split(RequiredCallsParser, REQUIRED_TWO_CALLS, expected)
    check_every_split(RequiredCallsParser, "no array here", ParsedOutput("no array here", []))


def test_named_call_output_is_the_arguments() -> None:
    check_every_split(lambda: NamedCallParser("get_weather"), WEATHER_ARGUMENTS,
                      ParsedOutput(None, [ToolCall("get_weather", WEATHER_ARGUMENTS)]))
