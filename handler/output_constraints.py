"""What a request constrains its output to: OpenAI's `response_format`, vLLM's `structured_outputs` or its older
`guided_*` fields (or a chat's forced tool call), as one engine StructuredOutputsParams and the field it came from,
which errors about it name."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from engine.structured_output.params import StructuredOutputsParams
from handler.api_error import APIError, json_type

# name -> kind (handler.protocol.KINDS)
CONSTRAINT_FIELDS = {
    "response_format": "object", "structured_outputs": "object", "guided_json": "any", "guided_regex": "str",
    "guided_choice": "any", "guided_grammar": "str",
}
GUIDED_KINDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")


@dataclass(frozen=True)
class OutputConstraint:
    params: StructuredOutputsParams
    source: str  # the request field it came from


def output_constraint(fields: dict[str, Any], forced: Optional[OutputConstraint] = None) -> Optional[OutputConstraint]:
    """The one constraint among the CONSTRAINT_FIELDS values sent (None values are not sent) and `forced` (a chat's
    tool_choice); two at once are refused, naming both."""
    requested = [constraint_from(name, value) for name, value in fields.items() if value is not None]
    constraints = [c for c in [*requested, forced] if c is not None]
    if len(constraints) > 1:
        first, second = constraints[0].source, constraints[1].source
        raise APIError(f"{first} and {second} both constrain the output; send only one of them", param=second)
    return constraints[0] if constraints else None


def constraint_from(name: str, value: Any) -> Optional[OutputConstraint]:
    """The constraint one field asks for; None for a `response_format` of type text."""
    if name == "response_format":
        settings = _response_format(value)
    elif name == "structured_outputs":
        settings = _structured_outputs(value)
    else:
        settings = {GUIDED_KINDS[name]: value}
    return None if settings is None else constraint(settings, name)


def constraint(settings: dict[str, Any], source: str) -> OutputConstraint:
    """StructuredOutputsParams(**settings); what is wrong with them is a 400 naming `source`."""
    try:
        return OutputConstraint(StructuredOutputsParams(**settings), source)
    except ValueError as exc:
        raise APIError(relabeled(str(exc), source), param=source) from None


def relabeled(message: str, source: str) -> str:
    """A message about `structured_outputs` (the engine's name for any constraint) as one about the field sent."""
    return message if source == "structured_outputs" else re.sub(r"^structured_outputs(\.\w+)?", source, message)


def _response_format(value: dict[str, Any]) -> Optional[dict[str, Any]]:
    _reject_unknown("response_format", value, ("type", "json_schema"))
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise APIError(f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}",
                       param="response_format")
    if kind != "json_schema" and value.get("json_schema") is not None:
        raise APIError(f"response_format.json_schema is only for type json_schema, not {kind}", param="response_format")
    if kind == "json_schema":
        return _json_schema(value.get("json_schema"))
    return {"json_object": True} if kind == "json_object" else None


def _json_schema(value: Any) -> dict[str, Any]:
    """OpenAI's `json_schema`: a `name`, and a `schema` (without one, any JSON object)."""
    if not isinstance(value, dict):
        raise APIError(f"response_format.json_schema must be an object, got {json_type(value)}",
                       param="response_format")
    _reject_unknown("response_format.json_schema", value, JSON_SCHEMA_KEYS)
    expected = {"name": str, "schema": dict, "strict": bool, "description": str}
    for key, kind in expected.items():
        if value.get(key) is not None and not isinstance(value[key], kind):
            raise APIError(f"response_format.json_schema.{key} must be {_KIND_NAMES[kind]}, got "
                           f"{json_type(value[key])}", param="response_format")
    if not value.get("name"):
        raise APIError("response_format.json_schema.name is required", param="response_format")
    return {"json": value["schema"]} if value.get("schema") is not None else {"json_object": True}


def _structured_outputs(value: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown("structured_outputs", value, STRUCTURED_OUTPUTS_KEYS)
    return {key: item for key, item in value.items() if item is not None}


def _reject_unknown(where: str, value: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise APIError(f"{where}: unsupported field(s) {', '.join(unknown)}; supported: {', '.join(known)}",
                       param=where.split(".")[0])


_KIND_NAMES = {str: "a string", dict: "an object", bool: "a boolean"}
