"""docker/entrypoint.sh outside Docker: PAGEDSERVE_* variables become launcher flags; then a real TorchServe started
through it as Kubernetes runs it (API keys from a file), its health checks, and its stop on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from handler.launcher import parser, split_engine_overrides
from handler.server import free_ports
from ts_http import http
from ts_server import READY_LINE, STARTUP_TIMEOUT, read_until

ENTRYPOINT = Path(__file__).resolve().parent.parent / "docker" / "entrypoint.sh"
CONTAINER_DEFAULTS = ["--host", "0.0.0.0", "--management_host", "127.0.0.1", "--metrics_host", "0.0.0.0",
                      "--key_dir", "/var/lib/pagedserve/keys"]
PORTS = ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE", "GRPC_MANAGEMENT")
KUBERNETES_GRACE_S = 60 - 5  # terminationGracePeriodSeconds less the preStop sleep
KEYS = ("old-key-7d4f1c9a2b", "new-key-e81b3a60f5")
DRAINED_TOKENS = 48  # the length of the request in flight when SIGTERM comes


def clean_env(**variables: str) -> dict[str, str]:
    """This environment without PAGEDSERVE_* variables, the venv's python first on PATH, and `variables`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PAGEDSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **variables}


def run_entrypoint(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint run with a `python` on PATH that prints its arguments one per line instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**clean_env(**variables), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


def launcher_flags(tmp_path: Path, *args: str, **variables: str) -> list[str]:
    result = run_entrypoint(tmp_path, *args, **variables)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("-m")
    assert lines[start + 1] == "handler.launcher"
    return lines[start + 2:]


def test_inside_a_container_inference_and_metrics_listen_on_all_addresses_management_on_loopback(
        tmp_path: Path) -> None:
    assert launcher_flags(tmp_path) == CONTAINER_DEFAULTS


def test_every_launcher_flag_has_a_variable_and_the_launcher_takes_what_it_becomes(tmp_path: Path) -> None:
    values = {"model_id": "/models/m.gguf", "model_name": "m", "model_version": "2.0", "config": "/etc/c.yaml",
              "tensor_parallel_size": "1", "model_store": "/tmp/store", "metrics_config": "/etc/metrics.yaml",
              "host": "10.0.0.1", "management_host": "0.0.0.0", "metrics_host": "127.0.0.1",
              "key_dir": "/keys", "api_key_file": "/etc/keys", "token_expiration_min": "5.0", "startup_timeout": "9.0",
              "drain_timeout": "3.0",
              **{f"{port.lower()}_port": str(9000 + i) for i, port in enumerate(PORTS)}}
    switches = ("disable_token_auth", "enable_model_api", "enable_lora")
    variables = {f"PAGEDSERVE_{'MODEL' if key == 'model_id' else key.upper()}": value for key, value in values.items()}
    variables |= {f"PAGEDSERVE_{name.upper()}": "true" for name in switches}
    variables["PAGEDSERVE_LORA_MODULES"] = "a=/p b=/q"
    args, overrides = split_engine_overrides(parser(), launcher_flags(tmp_path, **variables))
    assert {key: str(getattr(args, key)) for key in values} == values and overrides == {}
    assert all(getattr(args, name) for name in switches) and args.lora_modules == ["a=/p", "b=/q"]
    flags = {action.dest for action in parser()._actions if action.option_strings and action.dest != "help"}
    assert flags == set(values) | set(switches) | {"lora_modules"}


def test_engine_variables_become_engine_overrides_and_arguments_come_last(tmp_path: Path) -> None:
    flags = launcher_flags(tmp_path, "--model_name", "x", PAGEDSERVE_ENGINE_MAX_NUM_SEQS="32",
                           PAGEDSERVE_ENGINE_KV_CACHE_MEMORY_GB="0.25")
    args, overrides = split_engine_overrides(parser(), flags)
    assert overrides == {"max_num_seqs": 32, "kv_cache_memory_gb": 0.25}
    assert flags[-2:] == ["--model_name", "x"] and args.model_name == "x"


def test_an_empty_variable_leaves_the_launcher_default(tmp_path: Path) -> None:
    assert "--key_dir" not in launcher_flags(tmp_path, PAGEDSERVE_KEY_DIR="", PAGEDSERVE_MODEL="")


def test_the_variables_kubernetes_gives_a_pods_services_are_not_settings(tmp_path: Path) -> None:
    links = {"PAGEDSERVE_SERVICE_HOST": "10.0.0.7", "PAGEDSERVE_SERVICE_PORT": "8080",
             "PAGEDSERVE_SERVICE_PORT_HTTP": "8080", "PAGEDSERVE_PORT": "tcp://10.0.0.7:8080",
             "PAGEDSERVE_PORT_8080_TCP": "tcp://10.0.0.7:8080", "PAGEDSERVE_PORT_8080_TCP_ADDR": "10.0.0.7",
             "PAGEDSERVE_PORT_8080_TCP_PORT": "8080", "PAGEDSERVE_PORT_8080_TCP_PROTO": "tcp",
             "PAGEDSERVE_METRICS_PORT_8082_TCP_ADDR": "10.0.0.8"}
    assert launcher_flags(tmp_path, **links) == CONTAINER_DEFAULTS


@pytest.mark.parametrize("variables, message", [
    ({"PAGEDSERVE_METRIC_PORT": "9000"}, "unknown variable PAGEDSERVE_METRIC_PORT"),
    ({"PAGEDSERVE_MODEL_ID": "/m"}, "unknown variable PAGEDSERVE_MODEL_ID"),
    ({"PAGEDSERVE_DISABLE_TOKEN_AUTH": "maybe"}, "PAGEDSERVE_DISABLE_TOKEN_AUTH must be true or false, got 'maybe'"),
])
def test_a_mistyped_variable_stops_the_container_naming_it(tmp_path: Path, variables: dict[str, str],
                                                           message: str) -> None:
    result = run_entrypoint(tmp_path, **variables)
    assert result.returncode == 2 and message in result.stderr and "handler.launcher" not in result.stdout


@dataclass
class Container:
    """The entrypoint serving the embedded SmolLM2 as a Kubernetes pod does: API keys from a mounted file."""

    process: subprocess.Popen[str]
    output: str
    env: dict[str, str]
    ports: dict[str, int]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['INFERENCE']}/predictions/smollm2/1.0/v1"

    def health_check(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "handler.health_check", *args], env=self.env,
                              capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    root = tmp_path_factory.mktemp("container")
    (root / "api-keys").write_text(f"{KEYS[0]}\n\n  {KEYS[1]}  \n")
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    env = clean_env(
        PAGEDSERVE_API_KEY_FILE=str(root / "api-keys"), PAGEDSERVE_KEY_DIR=str(root / "keys"),
        PAGEDSERVE_ENGINE_MAX_NUM_SEQS="4", PAGEDSERVE_ENGINE_KV_CACHE_MEMORY_GB="0.25",
        PAGEDSERVE_ENGINE_MAX_MODEL_LEN="512", **{f"PAGEDSERVE_{name}_PORT": str(port) for name, port in ports.items()},
    )
    process = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield Container(process, read_until(process, READY_LINE, STARTUP_TIMEOUT), env, ports)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def test_the_ready_check_passes_once_the_model_is_loaded_and_fails_where_nothing_listens(
        container: Container) -> None:
    assert container.health_check("--ready").stdout.strip() == "ready: smollm2"
    assert container.health_check().stdout.strip() == "alive"
    nothing = container.health_check("--ready", "--inference_port", str(free_ports(1)[0]))
    assert nothing.returncode == 1 and nothing.stdout.startswith("unhealthy:")


def test_requests_need_one_of_the_keys_but_ping_and_metrics_do_not(container: Container) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
        status, body = http(f"{container.base_url}/models", method="GET", headers=headers)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    for key in KEYS:
        status, body = http(f"{container.base_url}/models", method="GET", headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and body["data"][0]["id"] == "smollm2"
    assert http(f"http://127.0.0.1:{container.ports['INFERENCE']}/ping", method="GET") == (200, {"status": "Healthy"})
    status, metrics = http(f"http://127.0.0.1:{container.ports['METRICS']}/metrics", method="GET")
    assert status == 200 and "num_requests_waiting" in str(metrics)


def test_the_openai_client_streams_with_a_key(container: Container) -> None:
    import openai

    client = openai.OpenAI(base_url=container.base_url, api_key=KEYS[1], max_retries=0, timeout=120)
    messages: Any = [{"role": "user", "content": "Say hi."}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    chunks = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens == 6
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=container.base_url, api_key="wrong", max_retries=0).models.list()


def test_management_and_grpc_stay_on_loopback_and_token_auth_is_off(container: Container) -> None:
    run_dir = Path(next(line for line in container.output.splitlines() if line.startswith("Logs:")).split()[-1]).parent
    properties = dict(line.split("=", 1) for line in (run_dir / "config.properties").read_text().splitlines())
    assert properties["inference_address"].startswith("http://0.0.0.0:")
    assert properties["metrics_address"].startswith("http://0.0.0.0:")
    assert properties["management_address"].startswith("http://127.0.0.1:")
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    assert properties["disable_token_authorization"] == "true"


def test_sigterm_lets_the_request_in_flight_finish_then_stops_everything_within_the_grace_period(
        container: Container) -> None:
    """Last in this module: it stops the container's launcher."""
    import openai

    descendants = psutil.Process(container.process.pid).children(recursive=True)
    assert any("org.pytorch.serve.ModelServer" in proc.cmdline() for proc in descendants)
    client = openai.OpenAI(base_url=container.base_url, api_key=KEYS[0], max_retries=0, timeout=120)
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=DRAINED_TOKENS,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [next(stream)]
    started = time.monotonic()
    container.process.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == DRAINED_TOKENS
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert container.process.wait(timeout=KUBERNETES_GRACE_S) == 0
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, KUBERNETES_GRACE_S - (time.monotonic() - started)))
    assert alive == []
