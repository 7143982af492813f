"""One scrape of a real TorchServe's :metrics_port/metrics, parsed by prometheus_client, and waiting for one
that shows what a test expects."""
from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from handler.server import ServedModel


@dataclass
class Scrape:
    """One scrape of /metrics; `value` sums the samples of one model version that match the labels."""

    samples: list[Sample]

    def value(self, name: str, served: ServedModel, **labels: str) -> float:
        wanted = {"model_name": served.model_name, "model_version": served.model_version, **labels}
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
        )

    def since(self, before: "Scrape", name: str, served: ServedModel, **labels: str) -> float:
        return self.value(name, served, **labels) - before.value(name, served, **labels)

    def has_series(self, name: str, served: ServedModel) -> bool:
        return any(s.name == name and s.labels.get("model_version") == served.model_version for s in self.samples)


def scrape(served: ServedModel) -> Scrape:
    with urllib.request.urlopen(f"{served.metrics_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return Scrape([sample for family in text_string_to_metric_families(text) for sample in family.samples])


def wait_for_scrape(served: ServedModel, condition: Callable[[Scrape], bool], timeout: float = 30.0) -> Scrape:
    """Scrape until `condition` holds; the engine publishes its stats at a bounded rate, not at once."""
    deadline = time.monotonic() + timeout
    while True:
        current = scrape(served)
        if condition(current):
            return current
        assert time.monotonic() < deadline, "the metrics did not reach the expected state in time"
        time.sleep(0.2)
