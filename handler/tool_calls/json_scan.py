"""Where JSON values end in text that may still be arriving: a model's tool-call objects, read while they stream.

The scan is lax inside a value (it only pairs brackets and quotes); whole objects are checked with `json.loads`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

WHITESPACE = " \t\r\n"
SCALAR_CHARS = frozenset("-+.0123456789eEtruefalsn")  # numbers, true, false, null


class NotJSON(ValueError):
    """The text cannot be (the start of) the JSON expected there."""


@dataclass
class Member:
    """One `"key": value` of an object: where its value starts, and ends (None while it is still arriving)."""

    key: str
    start: int
    end: Optional[int] = None


@dataclass
class ObjectScan:
    """An object's members as far as its text has arrived; `end` is past its closing brace once that has come."""

    members: list[Member] = field(default_factory=list)
    end: Optional[int] = None

    def member(self, keys: tuple[str, ...]) -> Optional[Member]:
        return next((member for member in self.members if member.key in keys), None)


def skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in WHITESPACE:
        position += 1
    return position


@dataclass
class _ValueScan:
    """How far the scan of a string, object or array value got; resumed, not restarted, as its text grows."""

    position: int
    in_string: bool
    depth: int = 0
    end: Optional[int] = None


class ObjectScanner:
    """Scans the text of one JSON object as it arrives: each `scan` reads its members again, from the start of the
    text, but takes up each long value where the previous scan left it, so reading an object token by token costs
    about one pass over its text."""

    def __init__(self) -> None:
        self.values: dict[int, _ValueScan] = {}  # by the value's start

    def scan(self, text: str) -> ObjectScan:
        """The members of the object that `text` starts with (its '{' first), as far as `text` goes."""
        if not text.startswith("{"):
            raise NotJSON("a tool call must be a JSON object")
        scan, position = ObjectScan(), 1
        while position is not None and scan.end is None:
            position = self._next_member(text, skip_space(text, position), scan)
        return scan

    def value_end(self, text: str, start: int) -> Optional[int]:
        """The index past the JSON value starting at `start`; None when the text ends first."""
        if start >= len(text):
            return None
        first = text[start]
        if first in '"{[':
            scan = self.values.setdefault(start, _ValueScan(start + (first == '"'), first == '"'))
            if scan.end is None:
                scan.end = _resume(text, scan)
            return scan.end
        if first in SCALAR_CHARS:
            return _scalar_end(text, start)
        raise NotJSON(f"a JSON value cannot start with {first!r}")

    def _next_member(self, text: str, position: int, scan: ObjectScan) -> Optional[int]:
        """Read one member (or the closing brace) at `position` into `scan`; where the next one starts, None if the
        text ended first."""
        if position < len(text) and text[position] == "}":
            scan.end = position + 1
            return position + 1
        key_end = self._key_end(text, position)
        colon = skip_space(text, key_end or len(text))
        if key_end is None or colon >= len(text):
            return None
        if text[colon] != ":":
            raise NotJSON(f"expected ':' after an object key, got {text[colon]!r}")
        member = Member(_string(text[position:key_end]), skip_space(text, colon + 1))
        scan.members.append(member)
        member.end = self.value_end(text, member.start)
        return None if member.end is None else _after_value(text, member.end)

    def _key_end(self, text: str, position: int) -> Optional[int]:
        if position >= len(text):
            return None
        if text[position] != '"':
            raise NotJSON(f"expected an object key, got {text[position]!r}")
        return self.value_end(text, position)


def _resume(text: str, scan: _ValueScan) -> Optional[int]:
    """Go on scanning a string, object or array; the index past its end, or None (`scan` keeps how far it got)."""
    position, in_string, depth = scan.position, scan.in_string, scan.depth
    while position < len(text):
        char = text[position]
        if in_string and char == "\\":
            position += 2  # past the end of the text when it ends in a backslash: the resumed scan skips the escape
            continue
        if in_string:
            in_string = char != '"'
        else:
            in_string = char == '"'
            depth += (char in "{[") - (char in "}]")
        position += 1
        if depth == 0 and not in_string:
            return position
    scan.position, scan.in_string, scan.depth = position, in_string, depth
    return None


def _scalar_end(text: str, start: int) -> Optional[int]:
    """A number or literal ends at the first other character; at the end of the text it may go on."""
    position = start
    while position < len(text) and text[position] in SCALAR_CHARS:
        position += 1
    return position if position < len(text) else None


def _after_value(text: str, position: int) -> Optional[int]:
    """Past the comma after a member; at the closing brace itself; None when the text ends first."""
    position = skip_space(text, position)
    if position >= len(text):
        return None
    if text[position] == ",":
        return position + 1
    if text[position] == "}":
        return position
    raise NotJSON(f"expected ',' or '}}' after an object member, got {text[position]!r}")


def _string(literal: str) -> str:
    try:
        return json.loads(literal)
    except ValueError as exc:
        raise NotJSON(f"not a JSON string: {exc}") from None
