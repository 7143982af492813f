"""Plain HTTP against a running TorchServe, for what the openai client cannot send (bad JSON, odd routes)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from handler.server import engine_state

def http(url: str, body: Any = None, raw: Optional[bytes] = None, method: Optional[str] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    """(status, parsed JSON or text). `body` is sent as JSON; `raw` as is."""
    status, payload = http_bytes(url, body, raw, method, headers)
    return status, _parse(payload)


def http_bytes(url: str, body: Any = None, raw: Optional[bytes] = None, method: Optional[str] = None,
               headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
    """(status, the response body's bytes as sent)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def worker_pid(management_url: str, model: str, version: str) -> int:
    """The pid of the model's one TorchServe worker (a restart changes it)."""
    status, described = http(f"{management_url}/models/{model}/{version}", method="GET")
    assert status == 200, described
    [worker] = described[0]["workers"]
    return worker["pid"]


def management_call(management_url: str, method: str, path: str) -> tuple[int, Any]:
    """A management call as curl makes it: parameters in the query, no JSON body (TorchServe would read that)."""
    request = urllib.request.Request(f"{management_url}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_all_blocks_free(management_url: str, model: str, version: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until no request is live and every KV block is free; aborts settle on the engine's next step."""
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(management_url, model, version)
        blocks = state["blocks"]
        idle = state["num_requests_running"] == 0 and state["num_requests_waiting"] == 0
        if idle and blocks["num_free_blocks"] == blocks["num_total_blocks"]:
            return state
        assert time.monotonic() < deadline, f"KV blocks not all free: {state}"
        time.sleep(0.2)


def _parse(payload: bytes) -> Any:
    text = payload.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
