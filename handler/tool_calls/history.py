"""Tool calls and their results in a conversation: an assistant message's `tool_calls` and `tool` messages, checked
and shaped as chat templates read them (a call's arguments as an object, not as JSON text)."""
from __future__ import annotations

import json
from typing import Any, Callable

from handler.api_error import APIError, json_type

ContentReader = Callable[[str, Any], str]  # (where, content) -> the content's text


def assistant_calls(where: str, message: dict[str, Any], content_text: ContentReader) -> dict[str, Any]:
    """An assistant message with `tool_calls`; its content may be null or absent."""
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise APIError(f"{where}.tool_calls must be a non-empty list, got {json_type(calls)}",
                       param=f"{where}.tool_calls")
    content = message.get("content")
    return {
        "role": "assistant",
        "content": "" if content is None else content_text(where, content),
        "tool_calls": [_call(f"{where}.tool_calls[{i}]", call) for i, call in enumerate(calls)],
    }


def tool_result(where: str, message: dict[str, Any], content_text: ContentReader) -> dict[str, Any]:
    """A `tool` message: the result of the call `tool_call_id`."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise APIError(f"{where}.tool_call_id must be the id of the call answered, got {json_type(call_id)}",
                       param=f"{where}.tool_call_id")
    return {"role": "tool", "tool_call_id": call_id, "content": content_text(where, message.get("content"))}


def _call(where: str, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(function, dict):
        raise APIError(f'{where} must be {{"id": ID, "type": "function", "function": {{"name": NAME, "arguments": '
                       f'JSON}}}}', param=where)
    name, call_id = function.get("name"), call.get("id")
    if not isinstance(name, str) or not name or not isinstance(call_id, (str, type(None))):
        raise APIError(f"{where} needs a function name (a string) and a string id", param=where)
    arguments = _arguments(f"{where}.function.arguments", function.get("arguments"))
    return {"id": call_id or "", "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments(where: str, arguments: Any) -> dict[str, Any]:
    """A call's arguments, sent as the JSON text of an object."""
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise APIError(f"{where} must be the JSON text of an object, got {arguments!r:.80}", param=where)
    return value
