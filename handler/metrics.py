"""The engine's statistics as TorchServe metrics: the metrics YAML (checked, merged with TorchServe's defaults)
and the bridge that feeds `context.metrics`, which TorchServe serves at :8082/metrics in prometheus mode.

`python -m handler.metrics --output FILE` writes the merged YAML for a TorchServe started without our launcher.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import ts
import yaml
from ts.metrics.caching_metric import CachingMetric
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from engine.metrics import EngineStats, FinishedRequestStats

logger = logging.getLogger(__name__)

DEFAULT_METRICS_CONFIG = Path(__file__).resolve().parent.parent / "model-config" / "metrics.yaml"
TS_METRICS_CONFIG = Path(ts.__file__).resolve().parent / "configs" / "metrics.yaml"
MODEL = ("model_name", "model_version")
# Each worker process sets its own gauges: with several workers per version, one shared series would flip.
WORKER_GAUGE = (*MODEL, "worker_pid")
# What the bridge emits: name -> (type, dimensions). The YAML may leave a metric out, not change it.
LLM_METRICS: dict[str, tuple[MetricTypes, tuple[str, ...]]] = {
    "num_requests_running": (MetricTypes.GAUGE, WORKER_GAUGE),
    "num_requests_waiting": (MetricTypes.GAUGE, WORKER_GAUGE),
    "kv_cache_usage_perc": (MetricTypes.GAUGE, WORKER_GAUGE),
    "prompt_tokens_total": (MetricTypes.COUNTER, MODEL),
    "generation_tokens_total": (MetricTypes.COUNTER, MODEL),
    "prefix_cache_queries_total": (MetricTypes.COUNTER, MODEL),
    "prefix_cache_hits_total": (MetricTypes.COUNTER, MODEL),
    "num_preemptions_total": (MetricTypes.COUNTER, MODEL),
    "request_success_total": (MetricTypes.COUNTER, (*MODEL, "finished_reason")),
    "request_rejected_total": (MetricTypes.COUNTER, (*MODEL, "error_type")),
    "time_to_first_token_seconds": (MetricTypes.HISTOGRAM, MODEL),
    "time_per_output_token_seconds": (MetricTypes.HISTOGRAM, MODEL),
    "e2e_request_latency_seconds": (MetricTypes.HISTOGRAM, MODEL),
    "request_queue_time_seconds": (MetricTypes.HISTOGRAM, MODEL),
    "request_prompt_tokens": (MetricTypes.HISTOGRAM, MODEL),
    "request_generation_tokens": (MetricTypes.HISTOGRAM, MODEL),
}
# Per LoRA adapter (vLLM's lora_requests_info, as one gauge per state): each worker's requests using the adapter.
LORA_GAUGE = (*WORKER_GAUGE, "lora_name")
LORA_METRICS: dict[str, tuple[MetricTypes, tuple[str, ...]]] = {
    "lora_requests_running": (MetricTypes.GAUGE, LORA_GAUGE),
    "lora_requests_waiting": (MetricTypes.GAUGE, LORA_GAUGE),
}
ENGINE_METRICS = {**LLM_METRICS, **LORA_METRICS}  # what the engine's statistics feed
# What the built-in plugins emit, when a model uses them (handler/plugins/rag.py, guard.py).
PLUGIN_METRICS: dict[str, tuple[MetricTypes, tuple[str, ...]]] = {
    "rag_retrieval_seconds": (MetricTypes.HISTOGRAM, MODEL),
    "guard_verdicts_total": (MetricTypes.COUNTER, (*MODEL, "stage", "verdict")),
    "guard_latency_seconds": (MetricTypes.HISTOGRAM, (*MODEL, "stage")),
}
FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")
SECTIONS = ("ts_metrics", "model_metrics")
ENTRY_KEYS = ("name", "unit", "dimensions")
# TorchServe's metric lines allow only word characters in names and units; Prometheus names start with no digit.
NAME = re.compile(r"[A-Za-z_]\w*", re.ASCII)
UNIT = re.compile(r"[\w ]+", re.ASCII)


def default_metrics_config() -> Optional[Path]:
    """model-config/metrics.yaml, or None where the package runs without the repository's model-config/."""
    return DEFAULT_METRICS_CONFIG if DEFAULT_METRICS_CONFIG.is_file() else None


def read_metrics_yaml(path: Path) -> dict[str, Any]:
    """Load a metrics YAML and check it; ValueError names the file and the offending entry."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"metrics config {path}: {error}") from None
    check_metrics_yaml(config, str(path))
    return config


def check_metrics_yaml(config: Any, source: str) -> None:
    """What TorchServe's Java and Python sides both accept, and our LLM metrics with their type and dimensions."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: a metrics YAML must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - {"dimensions", *SECTIONS})
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; use dimensions, ts_metrics, model_metrics")
    dimensions = config.get("dimensions") or []
    if not isinstance(dimensions, list) or not all(isinstance(d, str) for d in dimensions):
        raise ValueError(f"{source}: dimensions must be a list of names, got {dimensions!r}")
    for section in SECTIONS:
        seen: set[str] = set()
        for where, kind, entry in _entries(config, section, source):
            _check_entry(where, entry, section)
            if entry["name"] in seen:
                raise ValueError(f"{where}: metric {entry['name']!r} is declared twice")
            seen.add(entry["name"])
            if section == "model_metrics":
                _check_llm_metric(where, kind, entry)


def merged_metrics_config(model_metrics_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """TorchServe's default metrics YAML with the given one laid over it; an entry of the same name replaces."""
    merged = yaml.safe_load(TS_METRICS_CONFIG.read_text())
    overlay = copy.deepcopy(model_metrics_config or {})
    merged["dimensions"] = list(dict.fromkeys([*merged.get("dimensions", []), *overlay.get("dimensions", [])]))
    for section in SECTIONS:
        ours = overlay.get(section) or {}
        names = {entry["name"] for entries in ours.values() for entry in entries}
        target = merged.setdefault(section, {})
        for kind in target:
            target[kind] = [entry for entry in target[kind] if entry["name"] not in names]
        for kind, entries in ours.items():
            target.setdefault(kind, []).extend(entries)
    check_metrics_yaml(merged, "merged metrics config")
    return merged


def write_metrics_config(model_metrics_config: Optional[Path], target: Path) -> Path:
    """Write TorchServe's defaults merged with `model_metrics_config` (None: the defaults alone) to `target`."""
    config = read_metrics_yaml(model_metrics_config) if model_metrics_config is not None else None
    target.write_text(yaml.dump(merged_metrics_config(config), Dumper=_NoAliasDumper, sort_keys=False))
    return target


class _NoAliasDumper(yaml.SafeDumper):
    """Every list written out in full: TorchServe appends Hostname to each metric's list, so none may be shared."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class TorchServeMetrics:
    """Feeds the engine's statistics into TorchServe's metrics cache, labelled with the model name and version.

    Metric lines reach TorchServe through the worker's stdout, where TorchServe's async worker also prints;
    so once `bind_loop` is called, every line is written from that event loop's thread, never mid-print.
    """

    def __init__(self, cache: MetricCacheAbstract, model_name: str, model_version: str) -> None:
        self.labels = {"model_name": model_name, "model_version": model_version, "worker_pid": str(os.getpid())}
        self.cache = cache
        self.metrics = _declared_llm_metrics(cache)
        self._sent: dict[tuple[str, ...], float] = {}  # each series' last gauge value or counter total
        self._busy_adapters: set[str] = set()  # adapters with requests as of the last stats
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, stats: EngineStats) -> None:
        """Publish the engine at rest, with every counter at 0, so each series exists before the first request."""
        for reason in FINISH_REASONS:
            self.emit("request_success_total", 0, finished_reason=reason)
        self._publish(stats, [])

    def record(self, stats: EngineStats, finished: list[FinishedRequestStats]) -> None:
        """A stat logger for AsyncLLMEngine.add_stat_logger: called from the engine's step thread."""
        if self._loop is None:
            self._publish(stats, finished)
            return
        try:
            self._loop.call_soon_threadsafe(self._publish, stats, finished)
        except RuntimeError:
            logger.debug("the worker's event loop is closed; dropping engine stats")

    def count_rejected(self, error_type: str) -> None:
        self.emit("request_rejected_total", 1, error_type=error_type)

    def _publish(self, stats: EngineStats, finished: list[FinishedRequestStats]) -> None:
        self._gauge("num_requests_running", stats.num_requests_running)
        self._gauge("num_requests_waiting", stats.num_requests_waiting)
        self._gauge("kv_cache_usage_perc", stats.kv_cache_usage)
        self._counter("prompt_tokens_total", stats.prompt_tokens)
        self._counter("generation_tokens_total", stats.generation_tokens)
        self._counter("prefix_cache_queries_total", stats.blocks.prefix_cache_queries)
        self._counter("prefix_cache_hits_total", stats.blocks.prefix_cache_hits)
        self._counter("num_preemptions_total", stats.num_preemptions)
        self._adapter_gauges(stats)
        for record in finished:
            self._finished_request(record)

    def _finished_request(self, record: FinishedRequestStats) -> None:
        for reason in record.finish_reasons:
            self.emit("request_success_total", 1, finished_reason=reason)
        observations = {
            "time_to_first_token_seconds": record.time_to_first_token,
            "time_per_output_token_seconds": record.time_per_output_token,
            "e2e_request_latency_seconds": record.e2e_latency,
            "request_queue_time_seconds": record.queue_time,
            "request_prompt_tokens": record.num_prompt_tokens,
            "request_generation_tokens": record.num_generation_tokens,
        }
        for name, value in observations.items():
            if value is not None:
                self.emit(name, value)

    def _adapter_gauges(self, stats: EngineStats) -> None:
        """Running and waiting requests of each adapter with any, and once more (at 0) of those that had some
        at the last stats: an adapter whose requests ended, or that was unloaded, leaves no stale count."""
        running, waiting = stats.lora_requests_running, stats.lora_requests_waiting
        adapters = self._busy_adapters | running.keys() | waiting.keys()
        for adapter in sorted(adapters):
            self._gauge("lora_requests_running", running.get(adapter, 0), lora_name=adapter)
            self._gauge("lora_requests_waiting", waiting.get(adapter, 0), lora_name=adapter)
        self._busy_adapters = {adapter for adapter in adapters if running.get(adapter) or waiting.get(adapter)}

    def _gauge(self, name: str, value: float, **labels: str) -> None:
        series = (name, *labels.values())
        if self._sent.get(series) != value:
            self.emit(name, value, **labels)
            self._sent[series] = value

    def _counter(self, name: str, total: float) -> None:
        """Counters are sent as increments; the first call sends 0 (or the total so far), creating the series."""
        previous = self._sent.get((name,))
        if previous is None or total > previous:
            self.emit(name, total - (previous or 0))
            self._sent[(name,)] = total

    def emit(self, name: str, value: float, **labels: str) -> None:
        """One observation of a metric the YAML declares (a counter: an increment); other names are dropped.
        Besides ours, a plugin's own metrics: any name the YAML declares, with the model's labels and its own."""
        metric = self.metrics.get(name) or self._declared(name)
        if metric is not None:
            values = {**self.labels, **labels}
            metric.add_or_update(value, [values[dimension] for dimension in metric.dimension_names])


    def _declared(self, name: str) -> Optional[CachingMetric]:
        for metric_type in MetricTypes:
            try:
                self.metrics[name] = self.cache.get_metric(name, metric_type)
                return self.metrics[name]
            except MetricsCacheKeyError:
                continue
        return None


def _entries(config: dict[str, Any], section: str, source: str) -> list[tuple[str, str, Any]]:
    """(where, type, entry) for each entry of a section, after checking the section's shape."""
    body = config.get(section) or {}
    if not isinstance(body, dict):
        raise ValueError(f"{source}: {section} must map metric types to lists, got {type(body).__name__}")
    entries = []
    for kind, listed in body.items():
        if kind not in {t.value for t in MetricTypes}:
            raise ValueError(f"{source}: {section}: unknown metric type {kind!r}; use counter, gauge or histogram")
        if not isinstance(listed, list):
            raise ValueError(f"{source}: {section}.{kind} must be a list of metrics, got {type(listed).__name__}")
        entries += [(_where(source, section, kind, i, entry), kind, entry) for i, entry in enumerate(listed)]
    return entries


def _where(source: str, section: str, kind: str, index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{source}: {section}.{kind}[{index}]" + (f" ({name})" if isinstance(name, str) else "")


def _check_entry(where: str, entry: Any, section: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a metric must be a mapping with {', '.join(ENTRY_KEYS)}")
    unknown, missing = sorted(set(entry) - set(ENTRY_KEYS)), [k for k in ENTRY_KEYS if k not in entry]
    problems = [f"{what} key(s) {keys}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys]
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)}; a metric has exactly {', '.join(ENTRY_KEYS)}")
    if not isinstance(entry["name"], str) or not NAME.fullmatch(entry["name"]):
        raise ValueError(f"{where}: name must be letters, digits and underscores, got {entry['name']!r}")
    if not isinstance(entry["unit"], str) or not UNIT.fullmatch(entry["unit"]):
        raise ValueError(f"{where}: unit must be letters, digits, underscores or spaces, got {entry['unit']!r}")
    dimensions = entry["dimensions"]
    if not isinstance(dimensions, list) or not all(isinstance(d, str) and NAME.fullmatch(d) for d in dimensions):
        raise ValueError(f"{where}: dimensions must be a list of label names, got {dimensions!r}")
    if len(set(dimensions)) != len(dimensions) or (section == "model_metrics" and "Hostname" in dimensions):
        raise ValueError(f"{where}: dimensions repeat a name (TorchServe adds Hostname itself): {dimensions}")


def _check_llm_metric(where: str, kind: str, entry: dict[str, Any]) -> None:
    expected = {**ENGINE_METRICS, **PLUGIN_METRICS}.get(entry["name"])
    if expected is None:
        return
    metric_type, dimensions = expected
    if kind != metric_type.value or sorted(entry["dimensions"]) != sorted(dimensions):
        raise ValueError(
            f"{where}: the handler emits {entry['name']} as a {metric_type.value} with dimensions "
            f"{list(dimensions)}, not a {kind} with {entry['dimensions']}"
        )


def _declared_llm_metrics(cache: MetricCacheAbstract) -> dict[str, CachingMetric]:
    """Our metrics that the worker's metrics YAML declares; a mismatched one is an error naming it."""
    declared = {}
    for name, (metric_type, dimensions) in ENGINE_METRICS.items():
        try:
            metric = cache.get_metric(name, metric_type)
        except MetricsCacheKeyError:
            continue
        if sorted(metric.dimension_names) != sorted(dimensions):
            raise ValueError(
                f"metrics config: {name} has dimensions {metric.dimension_names}, expected {list(dimensions)}"
            )
        declared[name] = metric
    missing = sorted(set(ENGINE_METRICS) - set(declared))
    if missing:
        logger.info("LLM metrics not in the metrics config, so not reported: %s", missing)
    return declared


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m handler.metrics",
        description="Write TorchServe's default metrics YAML merged with ours, for config.properties' "
        "metrics_config= (with metrics_mode=prometheus) when you start TorchServe yourself.",
    )
    p.add_argument("--config", type=Path, default=default_metrics_config(), help="default: model-config/metrics.yaml")
    p.add_argument("--output", type=Path, required=True, help="the merged YAML to write")
    args = p.parse_args(argv)
    try:
        write_metrics_config(args.config, args.output)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
