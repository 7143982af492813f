"""`python -m handler.launcher` as a user runs it: a real TorchServe in the foreground, token auth on."""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from handler.launcher import parser, split_engine_overrides
from handler.protocol import RequestLimits
from handler.server import free_ports, reply_size_limit
from ts_http import http
from ts_server import READY_LINE, STARTUP_TIMEOUT, read_until

SMALL = ["--engine.max_num_seqs", "4", "--engine.kv_cache_memory_gb", "0.25", "--engine.max_model_len", "512"]


@dataclass
class Launched:
    process: subprocess.Popen[str]
    output: str
    inference_url: str
    management_url: str

    def line(self, prefix: str) -> str:
        return next(line[len(prefix):].strip() for line in self.output.splitlines() if line.strip().startswith(prefix))

    @property
    def key_file(self) -> Path:
        return Path(self.line("Token keys (inference, management):"))

    def keys(self) -> dict[str, str]:
        return {kind: entry["key"] for kind, entry in json.loads(self.key_file.read_text()).items()}


def free_port_flags() -> list[str]:
    """Every port flag of the launcher, each with a port that is free now, inference first, management second."""
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    return [part for name, port in zip(names, free_ports(len(names))) for part in (f"--{name}_port", str(port))]


def launch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "handler.launcher", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="module")
def launched() -> Iterator[Launched]:
    ports = free_port_flags()
    inference, management = ports[1], ports[3]
    process = launch(*ports, *SMALL)
    try:
        output = read_until(process, READY_LINE, STARTUP_TIMEOUT)
        yield Launched(process, output, f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def test_prints_the_openai_base_url_the_key_file_and_a_curl(launched: Launched) -> None:
    assert launched.line("OpenAI base URL:") == f"{launched.inference_url}/predictions/smollm2/1.0/v1"
    assert launched.key_file.name == "key_file.json" and launched.key_file.is_file()
    curl = launched.line("curl")
    assert f"Authorization: Bearer {launched.keys()['inference']}" in curl


def test_the_printed_curl_gets_a_chat_completion(launched: Launched) -> None:
    result = subprocess.run(shlex.split("curl -s " + launched.line("curl")), capture_output=True, text=True, timeout=120)
    response = json.loads(result.stdout)
    assert response["object"] == "chat.completion" and response["choices"][0]["message"]["role"] == "assistant"


def test_the_model_is_ready_behind_the_management_key(launched: Launched) -> None:
    url = f"{launched.management_url}/models/smollm2/1.0"
    status, described = http(url, method="GET", headers={"Authorization": f"Bearer {launched.keys()['management']}"})
    assert status == 200 and [worker["status"] for worker in described[0]["workers"]] == ["READY"]
    assert http(url, method="GET")[0] != 200


def test_the_printed_keys_last_30_days(launched: Launched) -> None:
    entries = json.loads(launched.key_file.read_text())
    for kind in ("inference", "management"):
        expires = datetime.fromisoformat(entries[kind]["expiration time"].replace("Z", "+00:00"))
        assert timedelta(days=29) < expires - datetime.now(timezone.utc) <= timedelta(days=30)


def test_torchserve_settings_keep_metrics_on_loopback_and_bodies_as_bytes(launched: Launched) -> None:
    lines = (launched.key_file.parent / "config.properties").read_text().splitlines()
    properties = dict(line.split("=", 1) for line in lines)
    assert properties["metrics_address"].startswith("http://127.0.0.1:")
    assert properties["decode_input_request"] == "false"
    assert int(properties["max_response_size"]) == reply_size_limit(RequestLimits())


def test_the_health_check_reads_the_keys_from_the_key_file(launched: Launched) -> None:
    ports = ["--inference_port", launched.inference_url.rsplit(":", 1)[1],
             "--management_port", launched.management_url.rsplit(":", 1)[1]]
    for args, expected in ((["--key_file", str(launched.key_file)], "ready: smollm2"),
                           ([], "unhealthy: http://127.0.0.1:{}/ping: HTTP 400")):
        result = subprocess.run([sys.executable, "-m", "handler.health_check", "--ready", *ports, *args],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith(expected.format(ports[1])) and result.returncode == (expected[0] == "u")


def test_a_request_without_the_key_is_refused(launched: Launched) -> None:
    # TorchServe 0.12.0 refuses a missing or wrong key with 400 InvalidKeyException, not 401.
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = http(f"{launched.inference_url}/predictions/smollm2/1.0/v1/models", method="GET", headers=headers)
        assert (status, body["type"]) == (400, "InvalidKeyException")


def test_the_inference_key_works(launched: Launched) -> None:
    headers = {"Authorization": f"Bearer {launched.keys()['inference']}"}
    base = f"{launched.inference_url}/predictions/smollm2/1.0/v1"
    status, models = http(f"{base}/models", method="GET", headers=headers)
    assert status == 200 and models["data"][0]["id"] == "smollm2"
    status, completion = http(f"{base}/completions", body={"prompt": "Hi", "max_tokens": 4}, headers=headers)
    assert status == 200 and completion["usage"]["completion_tokens"] == 4


def test_ctrl_c_stops_torchserve_and_leaves_no_process(launched: Launched) -> None:
    """Last in this module: it stops the shared launcher."""
    descendants = psutil.Process(launched.process.pid).children(recursive=True)
    assert any("org.pytorch.serve.ModelServer" in proc.cmdline() for proc in descendants)
    assert any(any("model_service_worker" in part for part in proc.cmdline()) for proc in descendants)
    launched.process.send_signal(signal.SIGINT)
    assert launched.process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(descendants, timeout=5)
    assert alive == []
    assert not launched.key_file.parent.exists(), "the launcher's temporary run directory is left behind"


@pytest.mark.parametrize("args, message", [
    (["--engine.max_num_seq", "8"], r"unknown engine key\(s\) \['max_num_seq'\]"),
    (["--engine.max_num_seqs", "eight"], r"engine\.max_num_seqs: cannot read 'eight' as int"),
    (["--engine.quantization", "int3"], r"quantization must be one of \('auto', 'none', 'int8', 'int4'\)"),
    (["--config", "{tmp}/typo.yaml"], r"unknown engine key\(s\) \['kv_cache_gb'\]"),
    (["--config", "{tmp}/frontend.yaml"], r"unknown model-config key\(s\) \['minWorker'\]"),
    (["--tensor_parallel_size", "2"], r"9 attention heads are not divisible by 2.*values: \[1, 3\]"),
    (["--engine.tensor_parallel_size", "4"], r"tensor_parallel_size 4 cannot split this model"),
    (["--config", "{tmp}/level.yaml"], r"parallelLevel: TorchServe ignores it unless parallelType is set"),
    (["--lora-modules", "sql={tmp}", "--engine.enable_lora", "false"],
     r"handler.lora_modules needs handler.engine.enable_lora: true, got False"),
    (["--api_key_file", "{tmp}/placeholder"], r"api_key_file .*: a key of 9 characters; keys need at least 16"),
])
def test_a_bad_setting_fails_fast_naming_it(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "typo.yaml").write_text("handler:\n  engine:\n    kv_cache_gb: 1\n")
    (tmp_path / "frontend.yaml").write_text("minWorker: 1\nhandler: {}\n")
    (tmp_path / "level.yaml").write_text("parallelLevel: 2\nhandler: {}\n")
    (tmp_path / "placeholder").write_text("change-me\n")
    process = launch(*[arg.format(tmp=tmp_path) for arg in args], *free_port_flags())
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert re.search(message, output), output
    assert "TorchServe is serving" not in output and "TorchServe exited" not in output  # refused before Java started


def test_engine_overrides_take_the_field_types() -> None:
    args, overrides = split_engine_overrides(parser(), [
        "--model_name", "m", "--engine.max_num_seqs", "8", "--engine.kv_cache_memory_gb=0.5",
        "--engine.enable_prefix_caching", "false", "--engine.max_model_len", "none", "--engine.dtype", "bfloat16",
        "--engine.quantization", "int4", "--engine.quantized_dense_rows", "null", "--engine.kv_cache_dtype",
        "fp8_e4m3",
    ])
    assert args.model_name == "m"
    assert overrides == {
        "max_num_seqs": 8, "kv_cache_memory_gb": 0.5, "enable_prefix_caching": False, "max_model_len": None,
        "dtype": "bfloat16", "quantization": "int4", "quantized_dense_rows": None, "kv_cache_dtype": "fp8_e4m3",
    }
