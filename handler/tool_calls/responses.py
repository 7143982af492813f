"""A chat choice's output in OpenAI's shapes once read for tool calls: the whole response's message, or a stream's
deltas (a call's first delta carries its id and name, the next ones pieces of its arguments)."""
from __future__ import annotations

import uuid
from typing import Any, Optional

from handler.tool_calls.parsers import CallDelta, ParsedDelta, ToolCall, ToolCallParser


def chat_message(text: str, parser: Optional[ToolCallParser]) -> dict[str, Any]:
    """The assistant message: its content, and the tool calls `parser` (None: no tools) reads in `text`; content is
    null when the output is calls alone."""
    parsed = parser.parse(text) if parser is not None else None
    if parsed is None or not parsed.calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": parsed.content, "tool_calls": [_whole_call(call) for call in parsed.calls]}


def finish_reason(reason: Optional[str], called: bool) -> Optional[str]:
    """A choice that stopped after producing tool calls finishes with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _whole_call(call: ToolCall) -> dict[str, Any]:
    return {"id": _call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatDeltas:
    """One streamed choice's text as OpenAI delta objects: its content, and with a parser its tool calls."""

    def __init__(self, parser: Optional[ToolCallParser]) -> None:
        self.parser = parser
        self.call_ids: dict[int, str] = {}

    def deltas(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The deltas of one engine delta's text: content first, then one per call delta."""
        if self.parser is None:
            return [{"content": text}] if text else []
        parsed = self.parser.feed(text)
        if finished:
            last = self.parser.finish()
            parsed = ParsedDelta(parsed.content + last.content, parsed.calls + last.calls)
        content = [{"content": parsed.content}] if parsed.content else []
        return content + [{"tool_calls": [self._call_delta(call)]} for call in parsed.calls]

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        return finish_reason(reason, bool(self.call_ids))

    def _call_delta(self, call: CallDelta) -> dict[str, Any]:
        if call.name is None:
            return {"index": call.index, "function": {"arguments": call.arguments}}
        self.call_ids[call.index] = _call_id()
        return {"index": call.index, "id": self.call_ids[call.index], "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}
