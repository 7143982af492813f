"""What a request constrains its output to: one of a JSON schema, any JSON object, a regex, a choice or a grammar."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's `structured_outputs`: exactly one field set.

    json: a JSON schema (a dict or its JSON text); json_object: any JSON object; regex: the whole output matches it;
    choice: the output is one of these strings; grammar: an EBNF grammar (GBNF style, with a `root` rule).
    """

    json: Union[None, str, dict[str, Any]] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", _checked_choice(self.choice))
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        _check_text("structured_outputs.regex", self.regex)
        _check_text("structured_outputs.grammar", self.grammar)
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        chosen = [item.name for item in fields(self) if getattr(self, item.name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(chosen) or 'none'}")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @property
    def spec(self) -> Union[str, tuple[str, ...], bool]:
        """The constraint itself: what compiles into a grammar, and with `kind` its cache key."""
        return getattr(self, self.kind)


def _schema_text(schema: Union[str, dict[str, Any]]) -> str:
    """A schema (a dict or JSON text) as JSON text, the cache key; key order is kept, as it orders the output."""
    try:
        parsed = json.loads(schema) if isinstance(schema, str) else schema
        if not isinstance(parsed, dict):
            raise ValueError(f"a schema is a JSON object, got {type(parsed).__name__}")
        return json.dumps(parsed, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured_outputs.json: invalid JSON schema: {exc}") from None


def _checked_choice(choice: Any) -> tuple[str, ...]:
    if not isinstance(choice, (list, tuple)) or not choice or not all(isinstance(c, str) and c for c in choice):
        raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got {choice!r}")
    return tuple(choice)


def _check_text(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
