"""The error a request gets: OpenAI's error object with an HTTP status."""
from __future__ import annotations

from typing import Any, Optional


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), in OpenAI's error object shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: Optional[str] = None,
        code: Optional[str] = None,
        error_type: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
