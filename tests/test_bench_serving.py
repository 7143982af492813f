"""scripts/bench_serving.py against the real TorchServe: every request streams, and the report adds up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ts_http import wait_all_blocks_free

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_bench_serving_reports_every_streamed_request(torchserve: Any, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, str(SCRIPTS / "bench_serving.py"), "--base-url", torchserve.openai_base_url,
        "--num-prompts", "4", "--input-len", "16", "--output-len", "5", "--seed", "3", "--json", str(report_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    summary, requests = report["summary"], report["requests"]
    assert (summary["completed"], summary["failed"]) == (4, 0)
    assert requests["output_tokens"] == [5, 5, 5, 5] and requests["prompt_tokens"] == [16, 16, 16, 16]
    assert all(0 < ttft <= e2el for ttft, e2el in zip(requests["ttft_s"], requests["e2el_s"]))
    assert [len(itls) for itls in requests["itls_s"]] == [4, 4, 4, 4]
    assert summary["total_output_tokens"] == 20
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)
