"""The metrics YAML (checked, merged with TorchServe's defaults), the bridge into TorchServe's metrics cache,
and the Grafana dashboard's use of the declared names."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from engine.block_manager import BlockStats
from engine.metrics import EngineStats, FinishedRequestStats
from handler.metrics import (
    DEFAULT_METRICS_CONFIG, LLM_METRICS, LORA_METRICS, PLUGIN_METRICS, TorchServeMetrics, check_metrics_yaml,
    merged_metrics_config, read_metrics_yaml, write_metrics_config,
)
from test_launcher import free_port_flags

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docker" / "grafana" / "pagedserve-dashboard.json"
GAUGE = {"name": "my_gauge", "unit": "Count", "dimensions": ["model_name"]}


def test_the_shipped_metrics_yaml_declares_every_llm_lora_and_plugin_metric_as_the_handler_emits_it() -> None:
    config = read_metrics_yaml(DEFAULT_METRICS_CONFIG)
    declared = {entry["name"]: (kind, entry["dimensions"]) for kind, entries in config["model_metrics"].items()
                for entry in entries}
    emitted = {**LLM_METRICS, **LORA_METRICS, **PLUGIN_METRICS}
    assert declared == {name: (kind.value, list(dims)) for name, (kind, dims) in emitted.items()}


def test_the_merge_keeps_torchserves_metrics_and_lets_ours_replace_by_name(tmp_path: Path) -> None:
    handler_time = {"name": "HandlerTime", "unit": "Seconds", "dimensions": ["model_name"]}
    merged = merged_metrics_config({"model_metrics": {"counter": [handler_time], "gauge": [GAUGE]}})
    assert "ts_inference_requests_total" in [e["name"] for e in merged["ts_metrics"]["counter"]]
    model_metrics = merged["model_metrics"]
    assert [e["name"] for e in model_metrics["gauge"]] == ["PredictionTime", "my_gauge"]
    assert model_metrics["counter"] == [handler_time]
    written = yaml.safe_load(write_metrics_config(DEFAULT_METRICS_CONFIG, tmp_path / "merged.yaml").read_text())
    assert {e["name"] for e in written["model_metrics"]["histogram"]} >= {"time_to_first_token_seconds"}
    assert "*" not in (tmp_path / "merged.yaml").read_text(), "TorchServe appends Hostname to each list: no aliases"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_metrics": {"summary": [GAUGE]}}, r"model_metrics: unknown metric type 'summary'"),
        ({"model_metrics": {"gauge": [{"name": "x", "dimensions": []}]}},
         r"gauge\[0\] \(x\): missing key\(s\) \['unit'\]"),
        ({"model_metrics": {"gauge": [{**GAUGE, "help": "?"}]}}, r"\(my_gauge\): unknown key\(s\) \['help'\]"),
        ({"model_metrics": {"gauge": [{**GAUGE, "name": "vllm:x"}]}}, r"gauge\[0\] \(vllm:x\): name must be"),
        ({"model_metrics": {"gauge": [{**GAUGE, "unit": "%"}]}}, r"\(my_gauge\): unit must be"),
        ({"model_metrics": {"gauge": [{**GAUGE, "dimensions": "model_name"}]}}, r"\(my_gauge\): dimensions must be"),
        ({"model_metrics": {"gauge": [{**GAUGE, "dimensions": ["Hostname"]}]}}, r"TorchServe adds Hostname"),
        ({"model_metrics": {"gauge": [GAUGE], "counter": [GAUGE]}}, r"counter\[0\] \(my_gauge\): .*declared twice"),
        ({"model_metrics": {"counter": [{"name": "num_requests_running", "unit": "Count",
                                         "dimensions": ["model_name", "model_version"]}]}},
         r"counter\[0\] \(num_requests_running\): the handler emits num_requests_running as a gauge"),
        ({"model_metrics": {"gauge": [{"name": "kv_cache_usage_perc", "unit": "Fraction",
                                       "dimensions": ["model_name"]}]}}, r"\(kv_cache_usage_perc\): .*dimensions"),
        ({"model_metrics": {"gauge": GAUGE}}, r"model_metrics.gauge must be a list"),
        ({"metrics": {}}, r"unknown top-level key\(s\) \['metrics'\]"),
        (["model_metrics"], r"must be a mapping"),
    ],
)
def test_a_bad_entry_is_named_in_the_error(config: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_metrics_yaml(config, "metrics.yaml")


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model_metrics:\n  gauge: [\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        read_metrics_yaml(path)


def test_the_launcher_refuses_a_bad_metrics_yaml_before_starting_torchserve(tmp_path: Path) -> None:
    path = tmp_path / "metrics.yaml"
    path.write_text(yaml.safe_dump({"model_metrics": {"summary": [GAUGE]}}))
    command = [sys.executable, "-m", "handler.launcher", "--metrics_config", str(path), *free_port_flags()]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "model_metrics: unknown metric type 'summary'" in result.stderr
    assert "TorchServe is serving" not in result.stdout


def test_the_merged_yaml_can_be_written_for_a_torchserve_started_by_hand(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "handler.metrics", "--output", str(tmp_path / "merged.yaml")]
    assert subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60).returncode == 0
    written = yaml.safe_load((tmp_path / "merged.yaml").read_text())
    assert written == merged_metrics_config(read_metrics_yaml(DEFAULT_METRICS_CONFIG))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_metrics": {"gauge": [{**GAUGE, "unit": "%"}]}}))
    command[-1:] = [str(tmp_path / "other.yaml"), "--config", str(bad)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "model_metrics.gauge[0] (my_gauge): unit must be" in result.stderr
    assert not (tmp_path / "other.yaml").exists()


def stats(running: int, prompt_tokens: int, usage: float = 0.0) -> EngineStats:
    blocks = BlockStats(10, 10, 0, 0, prefix_cache_queries=prompt_tokens, prefix_cache_hits=0)
    return EngineStats(running, 0, usage, 0, prompt_tokens, 2 * prompt_tokens, blocks)


FINISHED = FinishedRequestStats(["stop", "length"], 5, 7, 0.5, 0.01, 0.1, None)


@pytest.fixture
def bridge(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> TorchServeMetrics:
    """The bridge on TorchServe's own Python metrics cache, read from the merged YAML as a worker reads it."""
    cache = MetricsCacheYamlImpl(str(write_metrics_config(DEFAULT_METRICS_CONFIG, tmp_path / "metrics.yaml")))
    cache.initialize_cache()
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    return TorchServeMetrics(cache, "m", "1.0")


def metric_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, float, str]]:
    """(name, value, dimensions) of each TorchServe metric line logged, in order; then forget them."""
    lines = []
    for record in caplog.records:
        match = re.match(r"\[METRICS\](\w+)\.[\w ]+:([0-9.e-]+)\|#([^|]*)\|", record.getMessage())
        if match:
            lines.append((match[1], float(match[2]), match[3]))
    caplog.clear()
    return lines


def test_the_bridge_sends_counters_as_increments_and_gauges_only_when_they_change(bridge, caplog) -> None:
    bridge.start(stats(0, 0))
    started = metric_lines(caplog)
    assert ("request_success_total", 0.0, "model_name:m,model_version:1.0,finished_reason:abort") in started
    assert ("prompt_tokens_total", 0.0, "model_name:m,model_version:1.0") in started
    bridge.record(stats(2, 30, 0.25), [])
    bridge.record(stats(2, 42, 0.25), [FINISHED])
    sent = metric_lines(caplog)
    assert [value for name, value, _ in sent if name == "prompt_tokens_total"] == [30, 12]
    assert [(value, dims) for name, value, dims in sent if name == "num_requests_running"] == [
        (2, f"model_name:m,model_version:1.0,worker_pid:{os.getpid()}")
    ]
    assert [dims.split(",")[-1] for name, _, dims in sent if name == "request_success_total"] == [
        "finished_reason:stop", "finished_reason:length"
    ]
    histograms = {name for name, (kind, _) in LLM_METRICS.items() if kind == MetricTypes.HISTOGRAM}
    observed = {name: value for name, value, _ in sent if name in histograms}
    assert observed == {
        "time_to_first_token_seconds": 0.1, "e2e_request_latency_seconds": 0.5, "request_queue_time_seconds": 0.01,
        "request_prompt_tokens": 5, "request_generation_tokens": 7,
    }, "an undefined time per output token is not observed"
    bridge.count_rejected("invalid_request_error")
    assert metric_lines(caplog) == [
        ("request_rejected_total", 1.0, "model_name:m,model_version:1.0,error_type:invalid_request_error")
    ]


def test_per_adapter_gauges_are_sent_on_change_and_fall_to_0_with_no_request_left(bridge, caplog) -> None:
    bridge.start(stats(0, 0))
    metric_lines(caplog)
    for running, waiting in (({"a": 2, "b": 1}, {"a": 1}), ({"a": 2}, {}), ({}, {}), ({}, {})):
        by_adapter = {"lora_requests_running": running, "lora_requests_waiting": waiting}
        bridge.record(dataclasses.replace(stats(0, 0), **by_adapter), [])
    sent = [(name, value, dims) for name, value, dims in metric_lines(caplog) if name.startswith("lora_")]
    worker = f"model_name:m,model_version:1.0,worker_pid:{os.getpid()}"
    assert sent == [
        ("lora_requests_running", 2, f"{worker},lora_name:a"), ("lora_requests_waiting", 1, f"{worker},lora_name:a"),
        ("lora_requests_running", 1, f"{worker},lora_name:b"), ("lora_requests_waiting", 0, f"{worker},lora_name:b"),
        ("lora_requests_waiting", 0, f"{worker},lora_name:a"), ("lora_requests_running", 0, f"{worker},lora_name:b"),
        ("lora_requests_running", 0, f"{worker},lora_name:a"),
    ]


def test_once_bound_the_bridge_writes_from_the_event_loop_thread(bridge, caplog) -> None:
    async def run() -> None:
        bridge.bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(bridge.record, stats(1, 8), [])
        await asyncio.sleep(0.05)

    asyncio.run(run())
    threads = {record.threadName for record in caplog.records if record.getMessage().startswith("[METRICS]")}
    assert threads == {threading.current_thread().name}


def test_the_dashboard_uses_only_declared_metrics() -> None:
    merged = merged_metrics_config(read_metrics_yaml(DEFAULT_METRICS_CONFIG))
    series = set()
    for section in ("ts_metrics", "model_metrics"):
        for kind, entries in merged[section].items():
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            series |= {entry["name"] + suffix for entry in entries for suffix in suffixes}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"([A-Za-z_]\w*)\s*\{", expr)}
    assert exprs and used <= series, used - series
    assert used >= {"num_requests_running", "kv_cache_usage_perc", "time_to_first_token_seconds_bucket",
                    "rag_retrieval_seconds_bucket", "guard_verdicts_total", "guard_latency_seconds_bucket",
                    "lora_requests_running", "lora_requests_waiting"}
