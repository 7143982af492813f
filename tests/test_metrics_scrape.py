"""LLM metrics as a user scrapes them: a real TorchServe's :metrics_port/metrics, parsed by prometheus_client.

Version 1.0 is the session's server model; version 2.0, registered here beside it, is the same model with a
KV cache of 8 blocks, so that it must preempt.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import openai
import pytest
from ts.metrics.metric_type_enum import MetricTypes

from handler.metrics import LLM_METRICS
from handler.model_store import build_archive
from handler.server import ServedModel
from metrics_scrape import Scrape, scrape, wait_for_scrape
from ts_http import http, management_call, wait_all_blocks_free
from ts_server import small_model_config

TINY_KV = {"num_kv_blocks": 8, "max_model_len": 128}
HISTOGRAMS = [name for name, (kind, _) in LLM_METRICS.items() if kind == MetricTypes.HISTOGRAM]
LONG_TEXT = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. "


def wait_for_finished(served: ServedModel, before: Scrape, count: int) -> Scrape:
    """Scrape once `count` more requests have been recorded (their e2e latency observed)."""
    name = "e2e_request_latency_seconds_count"
    return wait_for_scrape(served, lambda s: s.since(before, name, served) >= count)


def sample_name(metric: str) -> str:
    """The sample that every series of `metric` has: histograms are scraped as _bucket, _sum and _count."""
    return f"{metric}_count" if metric in HISTOGRAMS else metric


def client(served: ServedModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.openai_base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tiny_kv(torchserve: ServedModel) -> Iterator[ServedModel]:
    """smollm2 version 2.0 with an 8-block KV cache, registered on the session's server for this module."""
    store = torchserve.server.config.model_store
    folder = build_archive(torchserve.model_name, "2.0", small_model_config(**TINY_KV), store)
    path = f"/models?url={folder.name}&model_name={torchserve.model_name}&initial_workers=1&synchronous=true"
    status, body = management_call(torchserve.management_url, "POST", path)
    assert status == 200, body
    yield ServedModel(torchserve.server, torchserve.model_name, "2.0")
    status, body = management_call(torchserve.management_url, "DELETE", f"/models/{torchserve.model_name}/2.0")
    assert status == 200, body


@pytest.fixture(autouse=True)
def server_blocks_free_after_test(torchserve: ServedModel) -> Iterator[None]:
    yield
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)


def test_counters_and_histograms_add_up_to_the_responses(torchserve: ServedModel) -> None:
    api = client(torchserve)
    extra = {"min_tokens": 2}
    calls: list[Callable[[], Any]] = [
        lambda: api.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=9, extra_body=extra),
        lambda: api.completions.create(
            model="smollm2", prompt="1, 2, 3,", max_tokens=4, temperature=0, extra_body=extra
        ),
        lambda: api.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=40, temperature=0,
            extra_body=extra,
        ),
        lambda: api.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name a color."}], max_tokens=6, extra_body=extra,
        ),
        lambda: api.completions.create(model="smollm2", prompt="The sky is", max_tokens=12, extra_body=extra),
    ]
    before = scrape(torchserve)
    started = time.monotonic()
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda call: call(), calls))
    elapsed = time.monotonic() - started
    after = wait_for_finished(torchserve, before, len(calls))

    def delta(name: str, **labels: str) -> float:
        return after.since(before, name, torchserve, **labels)

    prompt_tokens = sum(r.usage.prompt_tokens for r in responses)
    completion_tokens = sum(r.usage.completion_tokens for r in responses)
    assert delta("prompt_tokens_total") == delta("request_prompt_tokens_sum") == prompt_tokens
    assert delta("generation_tokens_total") == delta("request_generation_tokens_sum") == completion_tokens
    reasons = Counter(choice.finish_reason for r in responses for choice in r.choices)
    for reason in ("stop", "length", "abort"):
        assert delta("request_success_total", finished_reason=reason) == reasons[reason], reason
    for name in HISTOGRAMS:
        assert delta(f"{name}_count") == len(calls), name
    ttft, e2e = delta("time_to_first_token_seconds_sum"), delta("e2e_request_latency_seconds_sum")
    assert 0 < delta("request_queue_time_seconds_sum") <= ttft < e2e <= elapsed * len(calls)
    assert 0 < delta("time_per_output_token_seconds_sum") < e2e


def test_the_same_long_prompt_twice_hits_the_prefix_cache(torchserve: ServedModel) -> None:
    prompt = f"{uuid.uuid4()} " + LONG_TEXT * 3  # unique, so the first request finds nothing cached
    api = client(torchserve)
    hits_by_request = []
    for _ in range(2):
        before = scrape(torchserve)
        api.completions.create(model="smollm2", prompt=prompt, max_tokens=2)
        after = wait_for_finished(torchserve, before, 1)
        hits_by_request.append(after.since(before, "prefix_cache_hits_total", torchserve))
        queries = after.since(before, "prefix_cache_queries_total", torchserve)
        assert queries == after.since(before, "request_prompt_tokens_sum", torchserve)
    assert hits_by_request[0] == 0
    assert hits_by_request[1] >= 48, "a prompt of over 64 tokens should find at least 3 cached blocks of 16"


def test_a_tiny_kv_cache_preempts_and_loses_no_request(torchserve: ServedModel, tiny_kv: ServedModel) -> None:
    api = client(tiny_kv)
    before = scrape(tiny_kv)

    def run(i: int) -> Any:
        return api.completions.create(
            model="smollm2", prompt=f"Story {i}: " + LONG_TEXT[:60], max_tokens=60, temperature=0,
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(run, range(3)))
    after = wait_for_finished(tiny_kv, before, 3)
    assert [(r.usage.completion_tokens, r.choices[0].finish_reason) for r in responses] == [(60, "length")] * 3
    assert after.since(before, "num_preemptions_total", tiny_kv) > 0
    assert after.since(before, "request_success_total", tiny_kv, finished_reason="length") == 3
    wait_all_blocks_free(tiny_kv.management_url, tiny_kv.model_name, tiny_kv.model_version)


def test_gauges_show_requests_in_flight_then_return_to_rest(torchserve: ServedModel) -> None:
    api = client(torchserve)

    def run(i: int) -> Any:
        return api.completions.create(
            model="smollm2", prompt=f"Count to {i + 100}:", max_tokens=60, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, i) for i in range(2)]
        busy = wait_for_scrape(torchserve, lambda s: s.value("num_requests_running", torchserve) > 0)
        assert busy.value("kv_cache_usage_perc", torchserve) > 0
        assert all(future.result().usage.completion_tokens == 60 for future in futures)
    rest = wait_for_scrape(torchserve, lambda s: s.value("num_requests_running", torchserve) == 0)
    assert rest.value("num_requests_waiting", torchserve) == 0
    assert rest.value("kv_cache_usage_perc", torchserve) == 0.0, "cached but unheld blocks count as free"


def test_two_versions_are_separate_series(torchserve: ServedModel, tiny_kv: ServedModel) -> None:
    before = {served.model_version: scrape(served) for served in (torchserve, tiny_kv)}
    for served, tokens in ((torchserve, 3), (tiny_kv, 5)):
        client(served).completions.create(
            model="smollm2", prompt="Hello", max_tokens=tokens, extra_body={"ignore_eos": True}
        )
    for served, tokens in ((torchserve, 3), (tiny_kv, 5)):
        after = wait_for_finished(served, before[served.model_version], 1)
        assert after.since(before[served.model_version], "generation_tokens_total", served) == tokens
        missing = [name for name in LLM_METRICS if not after.has_series(sample_name(name), served)]
        assert set(missing) <= {"request_rejected_total"}, f"version {served.model_version} lacks {missing}"
    wait_all_blocks_free(tiny_kv.management_url, tiny_kv.model_name, tiny_kv.model_version)


def test_rejected_requests_are_counted_by_error_type(torchserve: ServedModel) -> None:
    name, labels = "request_rejected_total", {"error_type": "invalid_request_error"}
    before = scrape(torchserve)
    status, body = http(f"{torchserve.openai_base_url}/completions", body={"prompt": "Hi", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    after = wait_for_scrape(torchserve, lambda s: s.since(before, name, torchserve, **labels) > 0)
    assert after.since(before, name, torchserve, **labels) == 1
    assert after.since(before, "prompt_tokens_total", torchserve) == 0


def test_each_worker_of_a_version_has_its_own_gauges(tiny_kv: ServedModel) -> None:
    path = f"/models/{tiny_kv.model_name}/{tiny_kv.model_version}?min_worker=2&synchronous=true"
    status, body = management_call(tiny_kv.management_url, "PUT", path)
    assert status == 200, body
    try:
        workers = wait_for_scrape(tiny_kv, lambda s: len(worker_pids(s, tiny_kv)) == 2)
        for pid in worker_pids(workers, tiny_kv):
            assert workers.value("kv_cache_usage_perc", tiny_kv, worker_pid=pid) == 0
    finally:
        status, body = management_call(tiny_kv.management_url, "PUT", path.replace("min_worker=2", "min_worker=1"))
        assert status == 200, body


def worker_pids(scraped: Scrape, served: ServedModel) -> set[str]:
    return {
        s.labels["worker_pid"] for s in scraped.samples
        if s.name == "num_requests_running" and s.labels.get("model_version") == served.model_version
    }
