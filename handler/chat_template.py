"""`handler.chat_template`: a Jinja chat template's text, or the path of a file that holds one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def is_template_file(value: str) -> bool:
    """A value without Jinja markup names a file."""
    return "{" not in value


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """The template's text: `value` itself, or what the file it names holds."""
    if value is None or not is_template_file(value):
        return value
    try:
        return Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"handler.chat_template: cannot read the template file {value!r}: {exc}") from None
