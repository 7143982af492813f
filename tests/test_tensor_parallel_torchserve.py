"""A TP=2 engine behind a real TorchServe (`parallelType: custom`, `parallelLevel: 2`): it serves, survives a
killed worker through TorchServe's restart, and leaves no process behind when scaled down or stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
import urllib.request
from typing import Any, Iterator

import openai
import psutil
import pytest
import yaml
from ts.context import Context

from handler.config import handler_config, read_model_yaml, with_tensor_parallel_size
from handler.launcher import DEFAULT_CONFIG, apply_tensor_parallel_size, base_config
from handler.llm_handler import assigned_device
from handler.model_store import build_archive, model_yaml
from handler.server import ServedModel
from test_tensor_parallel import wait_gone
from ts_http import http, management_call
from ts_server import STARTUP_TIMEOUT, torchserve_process

NAME, VERSION = "tinytp", "1.0"
ENGINE = {"num_kv_blocks": 64, "max_model_len": 512, "max_num_seqs": 8}
CONFIG_DIR = DEFAULT_CONFIG.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Iterator[ServedModel]:
    root = tmp_path_factory.mktemp("tp-torchserve")
    config = apply_tensor_parallel_size(model_yaml(base_config(None), str(tiny_model("llama")), ENGINE), 2)
    folder = build_archive(NAME, VERSION, config, root / "store")
    with torchserve_process(root, {NAME: folder.name}, token_auth=False, model_api=True) as server:
        server.wait_until_ready(NAME, VERSION, STARTUP_TIMEOUT)
        yield ServedModel(server, NAME, VERSION)


def described(served: ServedModel) -> dict[str, Any]:
    status, body = http(f"{served.management_url}/models/{NAME}/{VERSION}?customized=true", method="GET")
    assert status == 200, body
    metadata = body[0]["customizedMetadata"]
    return {**body[0], "handler": json.loads(metadata) if isinstance(metadata, str) else metadata}


def frontend_workers(served: ServedModel) -> list[dict[str, Any]]:
    """The workers as the frontend lists them. Unlike `described`, this never reaches the worker process, so it
    cannot be lost to a worker that is exiting (TorchServe's async worker drops the jobs it had sent there)."""
    status, body = management_call(served.management_url, "GET", f"/models/{NAME}/{VERSION}")
    assert status == 200, body
    return body[0]["workers"]


def worker_pids(served: ServedModel) -> tuple[int, list[int]]:
    """The TorchServe worker's pid (rank 0) and its spawned tensor-parallel workers' pids."""
    [worker] = frontend_workers(served)
    children = psutil.Process(worker["pid"]).children()
    return worker["pid"], [child.pid for child in children if "spawn_main" in " ".join(child.cmdline())]


def chat(served: ServedModel) -> str:
    client = openai.OpenAI(base_url=served.openai_base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0.0
    )
    assert reply.usage.completion_tokens == 8
    return reply.choices[0].message.content


def wait_serving_again(served: ServedModel, old_rank0: int, timeout: float = 240.0) -> int:
    """Wait, asking the frontend only, until a worker other than `old_rank0` has started its engine; its pid.

    Nothing reaches the worker before then, and its management status cannot tell: TorchServe 0.12's async worker
    never marks a restarted worker READY again, and a request that reaches it while it loads fails the load
    ("Received more than 1 control command") and is never answered. The handler's gauges, labelled with the
    worker's pid and first written once its engine runs, show up on the frontend's /metrics.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = frontend_workers(served)
        pid = workers[0]["pid"] if workers else -1
        if pid not in (-1, old_rank0):
            _, scrape = http(served.metrics_url + "/metrics", method="GET")
            if f'worker_pid="{pid}"' in scrape:
                return pid
        time.sleep(0.5)
    pytest.fail(f"no new worker started its engine within {timeout:.0f}s:\n{served.server.log_tail()}")


def test_the_yaml_keys_and_the_engine_agree_on_the_size() -> None:
    config = with_tensor_parallel_size(model_yaml(base_config(None), None, {}), 3)
    assert (config["parallelType"], config["parallelLevel"]) == ("custom", 3)
    assert "tensor_parallel_size" not in config["handler"]["engine"]
    assert handler_config(config).engine.tensor_parallel_size == 3
    assert "parallelType" not in with_tensor_parallel_size(config, 1)


def test_the_shipped_model_configs_read_and_the_tp4_example_spans_four_ranks() -> None:
    sizes = {
        path.name: handler_config(read_model_yaml(str(path))).engine.tensor_parallel_size
        for path in CONFIG_DIR.glob("*.yaml") if path.name != "metrics.yaml"
    }
    assert sizes == {"smollm2-135m-cpu.yaml": 1, "llama-3.1-8b-gpu.yaml": 1, "llama-3.1-70b-gpu-tp4.yaml": 4,
                     "smollm2-rag.yaml": 1, "smollm2-rag-guard.yaml": 1, "smollm2-lora.yaml": 1}


def test_an_archive_built_for_three_ranks_asks_torchserve_for_them(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "handler.archive", "--model_name", "m", "--version", "3.0",
               "--export_path", str(tmp_path)]
    built = subprocess.run([*command, "--tensor_parallel_size", "3"], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    with zipfile.ZipFile(tmp_path / "m-3.0.mar") as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert (config["parallelType"], config["parallelLevel"]) == ("custom", 3)
    refused = subprocess.run([*command, "--tensor_parallel_size", "2"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "Valid tensor_parallel_size values: [1, 3]" in refused.stderr


@pytest.mark.parametrize("device, gpu_id, parallel_type, expected", [
    ("cuda", 2, None, "cuda:2"),  # one GPU per worker: the one TorchServe assigned
    ("cuda", 2, "custom", "cuda"),  # TorchServe made the worker's GPUs visible; rank r takes the r-th
    ("cuda:1", 2, None, "cuda:1"),  # an explicit device is kept
    ("cpu", None, None, "cpu"),
])
def test_the_handler_runs_on_the_devices_torchserve_assigned(
    device: str, gpu_id: Any, parallel_type: Any, expected: str
) -> None:
    yaml_config = {"parallelType": parallel_type, "parallelLevel": 2} if parallel_type else {}
    context = Context(NAME, "/models", {}, 1, gpu_id, "0.12.0", model_yaml_config=yaml_config)
    assert assigned_device(device, context) == expected


@pytest.mark.parametrize("yaml_keys, message", [
    ({"parallelLevel": 2}, "TorchServe ignores it unless parallelType is set"),
    ({"parallelType": "tp", "parallelLevel": 2}, "use parallelType: custom"),
    ({"parallelType": "custom"}, "needs parallelLevel"),
    ({"handler": {"engine": {"tensor_parallel_size": 2}}}, "needs parallelType: custom and parallelLevel: 2"),
    ({"parallelType": "custom", "parallelLevel": 2, "handler": {"engine": {"tensor_parallel_size": 3}}},
     r"tensor_parallel_size \(3\) differs from parallelLevel \(2\)"),
])
def test_parallel_settings_torchserve_would_misread_are_refused(yaml_keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        handler_config({"minWorkers": 1, **yaml_keys})


def test_custom_parallel_level_2_serves_chat_completions(served: ServedModel) -> None:
    description = described(served)
    assert (description["parallelType"], description["parallelLevel"]) == ("custom", 2)
    assert description["handler"]["tensor_parallel"]["size"] == 2
    assert chat(served)
    _, tp_workers = worker_pids(served)
    assert len(tp_workers) == 1
    assert described(served)["handler"]["tensor_parallel"]["worker_pids"] == tp_workers


def test_a_killed_tp_worker_fails_its_request_and_torchserve_restarts_the_worker(served: ServedModel) -> None:
    rank0, [tp_worker] = worker_pids(served)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{served.openai_base_url}/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        first_event = response.readline()
        assert first_event.startswith(b"data: {")
        os.kill(tp_worker, signal.SIGKILL)
        events = [line[len(b"data: "):].strip() for line in iter(response.readline, b"") if line.startswith(b"data: ")]
    errors = [json.loads(event)["error"] for event in events if event.startswith(b'{"error"')]
    assert len(errors) == 1 and f"rank 1 (pid {tp_worker}) was killed by SIGKILL" in errors[0]["message"], events[-3:]
    assert events[-1] == b"[DONE]"
    assert wait_gone([rank0, tp_worker]) == []
    new_rank0 = wait_serving_again(served, rank0)
    assert chat(served)
    assert worker_pids(served)[0] == new_rank0


def test_scaling_to_zero_workers_stops_every_rank(served: ServedModel) -> None:
    rank0, _ = worker_pids(served)
    ranks = [rank0, *(child.pid for child in psutil.Process(rank0).children(recursive=True))]
    assert len(ranks) >= 2
    path = f"/models/{NAME}/{VERSION}?min_worker=0&max_worker=0&synchronous=true"
    status, body = management_call(served.management_url, "PUT", path)
    assert status == 200, body
    assert wait_gone(ranks) == []
    path = f"/models/{NAME}/{VERSION}?min_worker=1&max_worker=1&synchronous=true"
    status, body = management_call(served.management_url, "PUT", path)
    assert status == 200, body
    wait_serving_again(served, rank0)
    assert chat(served)


def test_stopping_torchserve_leaves_no_process(served: ServedModel) -> None:
    """Last in this module: it stops the module's TorchServe, signalling only the Java frontend."""
    frontend = psutil.Process(served.server.process.pid)
    descendants = frontend.children(recursive=True)
    assert len(descendants) >= 2
    frontend.terminate()
    assert wait_gone([frontend.pid, *(process.pid for process in descendants)], timeout=60) == []
