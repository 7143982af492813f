"""A chat request's tools: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, checked, and what they ask of
the output: the JSON schema a forced call constrains it to, and the parser that reads the calls from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from handler.api_error import APIError, json_type
from handler.output_constraints import OutputConstraint, constraint
from handler.tool_calls.parsers import (
    TOOL_CALL_PARSERS, NamedCallParser, RequiredCallsParser, ToolCallParser,
)

TOOL_KEYS = ("type", "function")
FUNCTION_KEYS = ("name", "description", "parameters", "strict")
CHOICES = ("none", "auto", "required")
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ChatTools:
    """The tools offered, as sent; `choice` is none, auto, required or function: then every answer calls `function`."""

    tools: list[dict[str, Any]]
    choice: str
    parallel: bool
    function: Optional[str] = None

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools the chat template lists; none when the model may not call them."""
        return None if self.choice == "none" else self.tools

    def output_constraint(self) -> Optional[OutputConstraint]:
        """A forced call: the named function's arguments, or (required) a JSON array of calls of any tool."""
        if self.choice in ("none", "auto"):
            return None
        if self.choice == "required":
            return constraint({"json": self._calls_schema()}, "tools")
        return constraint({"json": self._parameters(self.function)}, "tools")

    def parser(self, auto_parser: str) -> Optional[ToolCallParser]:
        """A fresh parser of one choice's output; None when no calls are read from it."""
        if self.choice == "none":
            return None
        if self.choice == "auto":
            return TOOL_CALL_PARSERS[auto_parser](max_calls=None if self.parallel else 1)
        return RequiredCallsParser() if self.choice == "required" else NamedCallParser(self.function)

    def _parameters(self, name: str) -> dict[str, Any]:
        function = next(tool["function"] for tool in self.tools if tool["function"]["name"] == name)
        return function.get("parameters") or ANY_OBJECT

    def _calls_schema(self) -> dict[str, Any]:
        names = [tool["function"]["name"] for tool in self.tools]
        calls = [_call_schema(name, self._parameters(name)) for name in names]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return schema if self.parallel else {**schema, "maxItems": 1}


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Optional[bool]) -> Optional[ChatTools]:
    """The request's tools, or None without any; every problem is a 400 naming the field."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError("tool_choice needs tools: this request offers none", param="tool_choice")
        if tools is not None and not isinstance(tools, list):
            raise APIError(f"tools must be a list of tools, got {json_type(tools)}", param="tools")
        return None
    names = _function_names(tools)
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None or tool_choice in CHOICES:
        return ChatTools(tools, tool_choice or "auto", parallel)
    return ChatTools(tools, "function", parallel, _named_function(tool_choice, names))


def _function_names(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        raise APIError(f"tools must be a list of tools, got {json_type(tools)}", param="tools")
    names = [_function_name(f"tools[{i}]", tool) for i, tool in enumerate(tools)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise APIError(f"tools: each function needs its own name; repeated: {', '.join(repeated)}", param="tools")
    return names


def _function_name(where: str, tool: Any) -> str:
    _check_object(where, tool, TOOL_KEYS)
    if tool.get("type") != "function":
        raise APIError(f"{where}.type must be \"function\", got {tool.get('type')!r}", param="tools")
    function = tool.get("function")
    _check_object(f"{where}.function", function, FUNCTION_KEYS)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(f"{where}.function.name must be a non-empty string, got {json_type(name)}", param="tools")
    for key, kind in (("parameters", dict), ("description", str), ("strict", bool)):
        if function.get(key) is not None and not isinstance(function[key], kind):
            what = {dict: "a JSON schema object", str: "a string", bool: "a boolean"}[kind]
            raise APIError(f"{where}.function.{key} must be {what}, got {json_type(function[key])}", param="tools")
    return name


def _check_object(where: str, value: Any, known: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise APIError(f"{where} must be an object, got {json_type(value)}", param="tools")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise APIError(f"{where}: unsupported field(s) {', '.join(unknown)}", param="tools")


def _named_function(tool_choice: Any, names: list[str]) -> str:
    """The function a tool_choice object names, one of `names`."""
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice == {"type": "function", "function": {"name": name}} and isinstance(name, str):
        if name not in names:
            raise APIError(f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(names)})", param="tool_choice")
        return name
    raise APIError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": '
                   'NAME}}', param="tool_choice")
