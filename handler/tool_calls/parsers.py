"""Tool calls read from a model's output, as it streams or whole: one parser per output format.

A parser is fed each new piece of a choice's text and answers with what that piece adds: content text, and for each
call its first delta (the name) and then pieces of its arguments' JSON text. `finish` flushes what was held back
(text that might have become a tag); `parse` reads a whole text the same way, so a streamed output assembles into
exactly the whole one. A call's arguments are the JSON text the model wrote, unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from handler.tool_calls.json_scan import WHITESPACE, NotJSON, ObjectScan, ObjectScanner, skip_space


@dataclass
class CallDelta:
    index: int
    name: Optional[str]  # on the call's first delta only
    arguments: str  # the next piece of the arguments' JSON text


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedOutput:
    content: Optional[str]  # None when the output is calls alone
    calls: list[ToolCall]


def assemble(deltas: list[ParsedDelta]) -> ParsedOutput:
    """The content and calls that `deltas` add up to."""
    calls: dict[int, ToolCall] = {}
    for call in (call for delta in deltas for call in delta.calls):
        calls.setdefault(call.index, ToolCall(call.name or "", "")).arguments += call.arguments
    content = "".join(delta.content for delta in deltas)
    return ParsedOutput(content or None, [calls[index] for index in sorted(calls)])


class _CallObject:
    """One call's JSON object, `{"name": ..., "arguments": {...}}` (or another arguments key), read as it arrives:
    the call starts once its name is complete, then its arguments' text follows piece by piece."""

    def __init__(self, index: int, arguments_keys: tuple[str, ...]) -> None:
        self.index = index
        self.arguments_keys = arguments_keys
        self.started = False
        self.sent = 0  # characters of the arguments' text sent so far
        self.scanner = ObjectScanner()

    def read(self, text: str) -> tuple[list[CallDelta], Optional[int]]:
        """What `text` (the object from its '{', as far as it has come) adds, and the object's end once complete.
        Raises NotJSON when it is not a call; an object complete before its call started is checked whole first."""
        scan = self.scanner.scan(text)
        if scan.end is not None and not self.started:
            self._check_whole(text[:scan.end])
        return self._start(text, scan) + self._arguments(text, scan), scan.end

    def _check_whole(self, text: str) -> None:
        try:
            call = json.loads(text)
        except (ValueError, RecursionError) as exc:  # nesting deeper than json's recursion is not a call either
            raise NotJSON(str(exc)) from None
        arguments = next((call[key] for key in self.arguments_keys if key in call), {})
        if not isinstance(call.get("name"), str) or not call["name"] or not isinstance(arguments, dict):
            raise NotJSON(f"a tool call is {{\"name\": NAME, \"{self.arguments_keys[0]}\": {{...}}}}")

    def _start(self, text: str, scan: ObjectScan) -> list[CallDelta]:
        member = scan.member(("name",))
        if self.started or member is None or member.end is None:
            return []
        name = json.loads(text[member.start:member.end])
        if not isinstance(name, str) or not name:
            raise NotJSON("a tool call's name must be a non-empty string")
        self.started = True
        return [CallDelta(self.index, name, "")]

    def _arguments(self, text: str, scan: ObjectScan) -> list[CallDelta]:
        member = scan.member(self.arguments_keys)
        if not self.started or (member is None and scan.end is None):
            return []
        if member is not None and text[member.start:member.start + 1] not in ("{", ""):
            raise NotJSON("a tool call's arguments must be a JSON object")
        arguments = "{}" if member is None else text[member.start:member.end or len(text)]
        piece, self.sent = arguments[self.sent:], len(arguments)
        return [CallDelta(self.index, None, piece)] if piece else []


class ToolCallParser:
    """One choice's output read for tool calls: `feed` each new piece of text, then `finish`; or `parse` a whole
    text with a fresh parser. Calls past `max_calls` are read but dropped."""

    def __init__(self, max_calls: Optional[int] = None) -> None:
        self.max_calls = max_calls
        self.buffer = ""  # text received and not yet given out
        self.num_calls = 0

    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        return self._read(final=False)

    def finish(self) -> ParsedDelta:
        return self._read(final=True)

    def parse(self, text: str) -> ParsedOutput:
        return assemble([self.feed(text), self.finish()])

    def _read(self, final: bool) -> ParsedDelta:
        delta = ParsedDelta()
        while self._step(delta, final):
            pass
        return delta

    def _step(self, delta: ParsedDelta, final: bool) -> bool:
        """Read what the buffer allows into `delta`; False once nothing more can be read until more text comes."""
        raise NotImplementedError

    def _next_call(self, arguments_keys: tuple[str, ...]) -> _CallObject:
        """A call object that may follow; it takes the next index only once it turns out to be a call."""
        return _CallObject(self.num_calls, arguments_keys)

    def _read_object(self, call: _CallObject, text: str) -> tuple[list[CallDelta], Optional[int]]:
        calls, end = call.read(text)
        if call.started:
            self.num_calls = call.index + 1
        return [call for call in calls if self.max_calls is None or call.index < self.max_calls], end


class HermesToolParser(ToolCallParser):
    """Hermes, Qwen2 and SmolLM2 style: text, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    blocks. The text before and between them is content; the whitespace around a block belongs to it. A block that
    is not a call stays content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: Optional[int] = None) -> None:
        super().__init__(max_calls)
        self.call: Optional[_CallObject] = None
        self.opening = ""  # the text that opened the current block: whitespace before it and the tag
        self.after_block = False  # whitespace after a block is not content

    def _step(self, delta: ParsedDelta, final: bool) -> bool:
        return self._read_call(delta, final) if self.call is not None else self._read_content(delta, final)

    def _read_content(self, delta: ParsedDelta, final: bool) -> bool:
        if self.after_block:
            self.buffer = self.buffer.lstrip(WHITESPACE)
            self.after_block = not self.buffer
        start = self.buffer.find(self.OPEN)
        if start < 0:
            given = len(self.buffer) if final else _before_possible_tag(self.buffer, self.OPEN)
            delta.content, self.buffer = delta.content + self.buffer[:given], self.buffer[given:]
            return False
        content = self.buffer[:start].rstrip(WHITESPACE)
        delta.content += content
        self.opening = self.buffer[len(content):start + len(self.OPEN)]
        self.buffer = self.buffer[start + len(self.OPEN):]
        self.call = self._next_call(("arguments",))
        return True

    def _read_call(self, delta: ParsedDelta, final: bool) -> bool:
        start = skip_space(self.buffer, 0)
        if start == len(self.buffer) and not final:
            return False
        try:
            calls, end = self._read_object(self.call, self.buffer[start:])
        except NotJSON:
            return self._not_a_call(delta, final)
        delta.calls += calls
        if end is None:
            return self._cut_off(delta, final)
        return self._close(self.buffer[start + end:], final)

    def _not_a_call(self, delta: ParsedDelta, final: bool) -> bool:
        """A block that is not a call is content; one whose call already started is dropped up to its end."""
        if not self.call.started:
            delta.content += self.opening
            self.call = None
            return True
        end = self.buffer.find(self.CLOSE)
        if end < 0 and not final:
            return False
        self.buffer = "" if end < 0 else self.buffer[end + len(self.CLOSE):]
        self.call, self.after_block = None, True
        return True

    def _cut_off(self, delta: ParsedDelta, final: bool) -> bool:
        """At the end of the output, a block whose call never started is content."""
        if final and not self.call.started:
            delta.content += self.opening + self.buffer
        if final:
            self.buffer, self.call = "", None
        return False

    def _close(self, rest: str, final: bool) -> bool:
        """Past the call's object: its closing tag, which may still be arriving (or is cut off at the end)."""
        tail = rest.lstrip(WHITESPACE)
        if tail.startswith(self.CLOSE):
            rest = tail[len(self.CLOSE):]
        elif self.CLOSE.startswith(tail):
            if not final:
                return False
            rest = ""
        self.buffer, self.call, self.after_block = rest, None, True
        return True


class _CallSequenceParser(ToolCallParser):
    """Outputs that are call objects alone, one after another: an opening tag (or a bare object), the objects with
    a separator between them, and optionally a closing mark. Output that does not open so is content."""

    TAG = ""
    BARE_START: Optional[str] = None  # an object may also open the output without the tag
    SEPARATOR = ","
    END = ""
    ARGUMENTS_KEYS: tuple[str, ...] = ("arguments",)

    def __init__(self, max_calls: Optional[int] = None) -> None:
        super().__init__(max_calls)
        self.mode = "opening"  # then "calls", or "content" for the rest of the output
        self.received = ""  # everything fed: the content if no call comes of it
        self.call: Optional[_CallObject] = None

    def feed(self, text: str) -> ParsedDelta:
        self.received += text
        return super().feed(text)

    def _step(self, delta: ParsedDelta, final: bool) -> bool:
        if self.mode == "opening":
            return self._open(final)
        if self.mode == "calls":
            return self._read_call(delta, final) if self.call is not None else self._between_calls(delta, final)
        delta.content, self.buffer = delta.content + self.buffer, ""
        return False

    def _open(self, final: bool) -> bool:
        text = self.buffer.lstrip(WHITESPACE)
        if not final and self.TAG.startswith(text):
            return False
        self.mode = "calls"
        if text.startswith(self.TAG):
            self.buffer = text[len(self.TAG):]
        elif self.BARE_START is not None and text.startswith(self.BARE_START):
            self.buffer = text
        else:
            self.mode = "content"
        return True

    def _between_calls(self, delta: ParsedDelta, final: bool) -> bool:
        start = skip_space(self.buffer, 0)
        rest = self.buffer[start:]
        if not rest:
            return self._end(delta) if final else False
        if self.END and rest.startswith(self.END):
            self.buffer, self.mode = rest[len(self.END):], "content"
        elif self.num_calls and rest.startswith(self.SEPARATOR):
            self.buffer = rest[len(self.SEPARATOR):]
        else:
            self.buffer, self.call = rest, self._next_call(self.ARGUMENTS_KEYS)
        return True

    def _read_call(self, delta: ParsedDelta, final: bool) -> bool:
        try:
            calls, end = self._read_object(self.call, self.buffer)
        except NotJSON:
            return self._not_a_call()
        delta.calls += calls
        if end is None:
            return self._not_a_call() if final else False
        self.buffer, self.call = self.buffer[end:], None
        return True

    def _not_a_call(self) -> bool:
        """Text that is not a call (or a call cut off before its name) is content: all of the output if no call
        came before it. What follows a call that started and broke off (or was cut off) is dropped."""
        if self.call.started:
            self.buffer = ""
        elif self.call.index == 0:
            self.buffer = self.received
        self.mode, self.call = "content", None
        return True

    def _end(self, delta: ParsedDelta) -> bool:
        """The output ended between calls: with no call at all, it was content."""
        if self.num_calls == 0:
            delta.content += self.received
        self.mode = "content"
        return False


class Llama3JsonToolParser(_CallSequenceParser):
    """Llama 3.x JSON tool calls: `<|python_tag|>` (optional), then `{"name": ..., "parameters": {...}}` objects
    separated by `;`."""

    TAG = "<|python_tag|>"
    BARE_START = "{"
    SEPARATOR = ";"
    ARGUMENTS_KEYS = ("parameters", "arguments")


class RequiredCallsParser(_CallSequenceParser):
    """tool_choice "required": the output is a JSON array of `{"name": ..., "parameters": {...}}` objects."""

    TAG = "["
    END = "]"
    ARGUMENTS_KEYS = ("parameters",)


class NamedCallParser(ToolCallParser):
    """A tool_choice that names a function: the whole output is that call's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _step(self, delta: ParsedDelta, final: bool) -> bool:
        if self.num_calls == 0:
            delta.calls.append(CallDelta(0, self.name, ""))
            self.num_calls = 1
        if self.buffer:
            delta.calls.append(CallDelta(0, None, self.buffer))
        self.buffer = ""
        return False


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def _before_possible_tag(text: str, tag: str) -> int:
    """Where the text that may still become `tag` begins: a partial tag at the end, and the whitespace before it."""
    partial = next((size for size in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:size])), 0)
    return len(text[:len(text) - partial].rstrip(WHITESPACE))
