"""Many requests at once through a real TorchServe: every request the engine's queue admits completes, the rest
get a clean 503 with an OpenAI error object (counted in the metrics), and the worker is never restarted."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx2

from conftest import wait_until
from ts_http import http, wait_all_blocks_free, worker_pid


async def _send_all(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, str]]:
    limits = httpx2.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=600, limits=limits) as client:
        async def send(body: dict[str, Any]) -> tuple[int, str]:
            response = await client.post(url, json=body)
            return response.status_code, response.text

        return await asyncio.gather(*(send(body) for body in bodies))


def _rejected_overloaded(metrics_url: str) -> float:
    text = http(f"{metrics_url}/metrics", method="GET")[1]
    found = re.findall(r'^request_rejected_total\{[^}]*error_type="overloaded_error"[^}]*\} (\S+)$', text, re.M)
    return sum(float(value) for value in found)


def test_256_concurrent_streams_all_end_with_done(torchserve: Any) -> None:
    pid = worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    body = {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "stream": True}
    results = asyncio.run(_send_all(f"{torchserve.openai_base_url}/completions", [body] * 256))
    for status, text in results:
        events = [event for event in text.split("\n\n") if event]
        assert status == 200 and events[-1] == "data: [DONE]", text[-300:]
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    assert worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version) == pid


def test_a_burst_beyond_the_queue_gets_completions_and_clean_503s(torchserve: Any) -> None:
    pid = worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    rejected_before = _rejected_overloaded(torchserve.metrics_url)
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    results = asyncio.run(_send_all(f"{torchserve.openai_base_url}/completions", [body] * 1000))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 256, sorted(set(statuses))
    assert statuses.count(503) > 0, "the burst never filled the engine's queue: nothing tested the bound"
    for status, text in results:
        payload = json.loads(text)
        if status == 503:
            assert payload["error"]["code"] == "overloaded" and "max_num_waiting" in payload["error"]["message"]
        else:
            assert payload["usage"]["completion_tokens"] == 2
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)
    assert worker_pid(torchserve.management_url, torchserve.model_name, torchserve.model_version) == pid
    assert wait_until(lambda: _rejected_overloaded(torchserve.metrics_url) - rejected_before == statuses.count(503))
