"""The request body as JSON, strictly: every way a body can be malformed is a 400, never a 500.

TorchServe's worker parses an `application/json` body itself and forwards the raw bytes when that fails; the
launcher turns its parsing off, so the bytes arrive here either way. A body the worker did parse is checked
the same way as one parsed here: finite numbers, valid Unicode in every key and string, bounded nesting.
"""
from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from handler.protocol import APIError

MAX_DEPTH = 32


def request_body(row: dict[str, Any]) -> Any:
    """The JSON value of one TorchServe request row (its `body` or `data`), checked; APIError if malformed."""
    body = row.get("body", row.get("data"))
    if isinstance(body, (bytes, bytearray)):
        body = _utf8_text(bytes(body))
    if isinstance(body, str):
        body = _parse(body)
    check_json_value(body)
    return body


def check_json_value(value: Any) -> None:
    """APIError unless every number is finite, every string valid Unicode and nesting at most MAX_DEPTH deep."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                _reject(f"the request body is nested more than {MAX_DEPTH} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            _reject("the request body holds a number outside the range of a 64-bit float")
        elif isinstance(item, str) and not _is_unicode(item):
            _reject("the request body holds a string with a lone UTF-16 surrogate (\\ud800-\\udfff)")


def _utf8_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        _reject(f"the request body is not valid UTF-8: byte {exc.start} cannot start or continue a character")


def _parse(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        _reject(f"the request body is nested more than {MAX_DEPTH} levels deep")
    except json.JSONDecodeError as exc:
        _reject(f"the request body is not valid JSON: {exc}")
    except ValueError as exc:  # an integer literal longer than Python's int_max_str_digits
        _reject(f"the request body holds a number that cannot be read: {exc}")


def _no_constant(name: str) -> NoReturn:
    _reject(f"the request body is not valid JSON: {name} is not a JSON number")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject(message: str) -> NoReturn:
    raise APIError(message, code="invalid_json")
