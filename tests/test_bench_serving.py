"""scripts/bench_serving.py against real TorchServe servers: every request streams, and the report adds up."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ts_http import wait_all_blocks_free

from handler.server import free_ports

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
WORKLOAD = ["--num-prompts", "4", "--input-len", "16", "--output-len", "5"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPTS / "bench_serving.py"), *WORKLOAD, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def check_run(run: dict[str, Any]) -> None:
    summary, requests = run["summary"], run["requests"]
    assert (summary["completed"], summary["failed"]) == (4, 0)
    assert requests["output_tokens"] == [5, 5, 5, 5] and requests["prompt_tokens"] == [16, 16, 16, 16]
    assert all(0 < ttft <= e2el for ttft, e2el in zip(requests["ttft_s"], requests["e2el_s"]))
    assert [len(itls) for itls in requests["itls_s"]] == [4, 4, 4, 4]
    assert summary["total_output_tokens"] == 20


def test_bench_serving_reports_every_streamed_request(torchserve: Any, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    run_bench("--base-url", torchserve.openai_base_url, "--seed", "3", "--json", str(report_path))
    (run,) = json.loads(report_path.read_text())["runs"]
    check_run(run)
    assert run["server"] == "server" and run["server_cpu_s"] is None
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)


def consecutive_free_ports(count: int) -> int:
    """A port such that it and the `count - 1` above it can all be bound on loopback now."""
    for _ in range(20):
        base = free_ports(1)[0]
        if base + count < 65536 and all(can_bind(base + offset) for offset in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_bench_serving_starts_each_server_and_runs_every_rate(tmp_path: Path) -> None:
    """--servers starts our launcher on its own ports, runs an all-at-once and a Poisson run with seeds of their
    own, compares the first with the offline engine, counts the server's CPU, and stops the server."""
    port, report_path = consecutive_free_ports(5), tmp_path / "report.json"
    small = "--engine.max_num_seqs 4 --engine.kv_cache_memory_gb 0.25 --engine.max_model_len 256"
    result = run_bench(
        "--servers", "pagedserve", "--port", str(port), "--pagedserve-args", small, "--request-rate", "inf", "20",
        "--seed", "7", "--offline-baseline", "--log-dir", str(tmp_path / "logs"), "--json", str(report_path),
    )
    runs = json.loads(report_path.read_text())["runs"]
    assert [(run["request_rate"], run["seed"]) for run in runs] == [("inf", 7), (20.0, 8)]
    for run in runs:
        check_run(run)
        assert run["server_cpu_s"] > 0
    assert runs[0]["offline_baseline"]["output_tok_s"] > 0 and "offline_baseline" not in runs[1]
    assert "rate 20.0: medians of 1 run(s)" in result.stdout
    assert (tmp_path / "logs" / "pagedserve.log").stat().st_size > 0
    assert all(can_bind(port + offset) for offset in range(5)), "the server still holds its ports"
