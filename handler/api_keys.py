"""Static API keys, as vLLM's --api-key: every request to the handler carries `Authorization: Bearer KEY`.

TorchServe's own token auth makes new random keys at every start, so the replicas behind one Kubernetes Service
cannot share them; a key file (a mounted Secret) can be shared, and rotated by listing the old and new keys.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Mapping, Optional

from handler.api_error import APIError

MIN_KEY_LENGTH = 16  # refuses placeholders such as the shipped Secret's "change-me"


def read_api_keys(path: str | Path) -> tuple[bytes, ...]:
    """The keys in `path`, one per line (blank lines and surrounding spaces ignored); ValueError if there is none or
    one is shorter than MIN_KEY_LENGTH."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"api_key_file {path}: {error.strerror or error}") from None
    keys = tuple(line.strip().encode() for line in text.splitlines() if line.strip())
    if not keys:
        raise ValueError(f"api_key_file {path} holds no key (one per line)")
    short = min(len(key) for key in keys)
    if short < MIN_KEY_LENGTH:
        raise ValueError(f"api_key_file {path}: a key of {short} characters; keys need at least {MIN_KEY_LENGTH}")
    return keys


def check_api_key(keys: tuple[bytes, ...], headers: Mapping[str, str]) -> None:
    """APIError 401 unless `headers` carry `Authorization: Bearer K` for one of `keys` (compared in constant time)."""
    scheme, _, token = (_header(headers, "authorization") or "").strip().partition(" ")
    presented = token.strip().encode()
    matched = [hmac.compare_digest(presented, key) for key in keys]
    if scheme.lower() != "bearer" or not any(matched):
        raise APIError("invalid or missing API key: send `Authorization: Bearer KEY`", status=401,
                       code="invalid_api_key")


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    return next((value for key, value in headers.items() if key.lower() == name), None)
