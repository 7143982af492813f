"""What `bench_offline.py --peers` and a peer runner (run in the peer's own venv) exchange, as JSON files.

The job names the model, dtype, threads and workloads (warm-up first, untimed); the runner answers each timed
workload's wall time and output-token count. Runners import only this file and their own peer.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

# Generates greedily, ignoring EOS, `output_len` tokens for every prompt; returns the output-token count.
Generate = Callable[[list[list[int]], int], int]


def read_job() -> tuple[dict[str, Any], Path]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, required=True, help="JSON job written by bench_offline.py")
    parser.add_argument("--result", type=Path, required=True, help="where to write the timings")
    args = parser.parse_args()
    return json.loads(args.job.read_text()), args.result


def run_job(job: dict[str, Any], result_path: Path, generate: Generate) -> None:
    """Warm up untimed, then time each workload in order and write the timings."""
    warmup = job["warmup"]
    generate(warmup["prompts"], warmup["output_len"])
    timings = []
    for workload in job["workloads"]:
        start = time.perf_counter()
        produced = generate(workload["prompts"], workload["output_len"])
        timings.append({"workload": workload["name"], "wall_s": time.perf_counter() - start, "output_tokens": produced})
        print(f"[peer] {workload['name']}: {timings[-1]['wall_s']:.2f} s", flush=True)
    result_path.write_text(json.dumps({"timings": timings}) + "\n")
