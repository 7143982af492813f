"""Run TorchServe's Java frontend ourselves: one run directory per server, so several can run at once.

The `torchserve` CLI keeps one pid file in the temp dir (a second server refuses to start) and can leave its
workers behind. Here the frontend's logs and temp dir (where the worker sockets live) sit in `run_dir`, and so do
its cwd and key file unless `key_dir` puts them elsewhere; `stop()` ends the frontend and every process under it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import ts

from handler.metrics import default_metrics_config, write_metrics_config
from handler.protocol import RequestLimits

TS_HOME = Path(ts.__file__).resolve().parent.parent
LOG_FILE = "torchserve.log"
METRICS_FILE = "metrics.yaml"
REPLY_FRAMING_BYTES = 64 * 1024  # request id, headers and lengths around a reply's body


def reply_size_limit(limits: RequestLimits) -> int:
    """TorchServe's `max_response_size` for a handler whose largest response is `limits.max_response_bytes`."""
    return limits.max_response_bytes + REPLY_FRAMING_BYTES


@dataclass
class ServerConfig:
    model_store: Path
    run_dir: Path
    models: dict[str, str] = field(default_factory=dict)  # name -> folder or .mar in model_store, loaded at start
    host: str = "127.0.0.1"
    management_host: Optional[str] = None  # the management and gRPC APIs; None: `host`
    metrics_host: str = "127.0.0.1"  # the metrics port stays on loopback unless asked
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe 0.12.0 always starts its gRPC servers; a second server on the default ports would not start.
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    token_expiration_min: float = 30 * 24 * 60  # TorchServe's own default, 60, expires the printed keys in an hour
    model_api: bool = False
    # Bytes of one reply from the worker; a larger one makes the frontend restart the worker.
    max_response_size: int = field(default_factory=lambda: reply_size_limit(RequestLimits()))
    # Model metrics merged with TorchServe's defaults; None: TorchServe's defaults alone (no LLM metrics).
    metrics_config: Optional[Path] = field(default_factory=default_metrics_config)
    key_dir: Optional[Path] = None  # where TorchServe writes key_file.json (its working folder); None: run_dir

    def url(self, port: int, host: Optional[str] = None) -> str:
        return f"http://{host or self.host}:{port}"

    @property
    def management_bind_host(self) -> str:
        return self.management_host or self.host

    def properties(self) -> dict[str, str]:
        return {
            "inference_address": self.url(self.inference_port),
            "management_address": self.url(self.management_port, self.management_bind_host),
            "metrics_address": self.url(self.metrics_port, self.metrics_host),
            "grpc_inference_address": self.management_bind_host,
            "grpc_management_address": self.management_bind_host,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_port": str(self.grpc_management_port),
            "metrics_mode": "prometheus",
            "metrics_config": str(self.run_dir.resolve() / METRICS_FILE),
            "disable_token_authorization": str(not self.token_auth).lower(),
            "token_expiration_min": str(self.token_expiration_min),
            "max_response_size": str(self.max_response_size),
            "decode_input_request": "false",  # the worker forwards bodies as bytes: handler.json_body parses them
            "enable_model_api": str(self.model_api).lower(),
            "model_store": str(self.model_store.resolve()),
            "load_models": ",".join(f"{name}={path}" for name, path in self.models.items()),
            # One worker per model unless its YAML says otherwise (the default is one per core or GPU).
            "default_workers_per_model": "1",
        }


def write_config_properties(config: ServerConfig) -> Path:
    path = config.run_dir / "config.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in config.properties().items()))
    return path


def java_command(config_properties: Path, run_dir: Path) -> list[str]:
    """The command `torchserve --start --foreground` would run, with the worker sockets under `run_dir`."""
    java_home = os.environ.get("JAVA_HOME")
    return [
        os.path.join(java_home, "bin", "java") if java_home else "java",
        f"-Dmodel_server_home={TS_HOME}",
        f"-Djava.io.tmpdir={run_dir / 'tmp'}",
        "-cp", f".:{TS_HOME / 'ts' / 'frontend' / '*'}",
        "org.pytorch.serve.ModelServer",
        "--python", sys.executable,
        "-f", str(config_properties.resolve()),
        "-ncs",  # no config snapshots: nothing is restored from a previous run
    ]


class TorchServeProcess:
    """A TorchServe frontend and its workers; a context manager that stops them all on exit."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir.resolve()
        self.log_path = self.run_dir / LOG_FILE
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._exit_stack = ExitStack()

    @property
    def inference_url(self) -> str:
        return self.config.url(self.config.inference_port)

    @property
    def management_url(self) -> str:
        return self.config.url(self.config.management_port, self.config.management_bind_host)

    @property
    def metrics_url(self) -> str:
        return self.config.url(self.config.metrics_port, self.config.metrics_host)

    @property
    def working_dir(self) -> Path:
        """The frontend's working folder, where TorchServe writes key_file.json."""
        return (self.config.key_dir or self.run_dir).resolve()

    @property
    def key_file(self) -> Path:
        return self.working_dir / "key_file.json"

    def start(self) -> "TorchServeProcess":
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.working_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_config(self.config.metrics_config, self.run_dir / METRICS_FILE)
        properties = write_config_properties(self.config)
        env = {**os.environ, "LOG_LOCATION": str(self.run_dir / "logs"), "METRICS_LOCATION": str(self.run_dir / "logs")}
        log = self._exit_stack.enter_context(self.log_path.open("ab"))
        # A session of its own: Ctrl-C in a terminal reaches only us, and we stop the frontend in order.
        self.process = subprocess.Popen(
            java_command(properties, self.run_dir), cwd=self.working_dir, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def __enter__(self) -> "TorchServeProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def poll(self) -> Optional[int]:
        assert self.process is not None, "TorchServe was not started"
        return self.process.poll()

    def keys(self) -> dict[str, str]:
        """The `inference`, `management` and `API` keys from key_file.json (written at startup when auth is on)."""
        values = json.loads(self.key_file.read_text())
        return {kind: entry["key"] for kind, entry in values.items()}

    def management_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['management']}"} if self.config.token_auth else {}

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_until_ready(self, model_name: str, version: Optional[str] = None, timeout: float = 600.0) -> None:
        """Poll the management API until the model has a READY worker; fail fast if the frontend exits."""
        path = f"/models/{model_name}" + (f"/{version}" if version else "")
        deadline = time.monotonic() + timeout
        while True:
            if self.poll() is not None:
                raise RuntimeError(f"TorchServe exited with code {self.poll()}; log tail:\n{self.log_tail()}")
            if _has_ready_worker(self.management_url + path, self._ready_headers()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model_name} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    def _ready_headers(self) -> Optional[dict[str, str]]:
        """Management headers, or None while token auth is on and the key file is not fully written yet."""
        try:
            return self.management_headers()
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the frontend, then its workers; SIGKILL whatever is left after `timeout`."""
        if self.process is not None and self.process.poll() is None:
            frontend = psutil.Process(self.process.pid)
            workers = frontend.children(recursive=True)
            frontend.terminate()
            _, alive = psutil.wait_procs([frontend], timeout=timeout / 2)
            for proc in alive + workers:
                _signal(proc, signal.SIGTERM)
            _, alive = psutil.wait_procs([frontend, *workers], timeout=timeout / 2)
            for proc in alive:
                _signal(proc, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
            self.process.wait()
        self._exit_stack.close()


@dataclass(frozen=True)
class ServedModel:
    """One model version on a running TorchServe, and the URLs a client needs for it."""

    server: TorchServeProcess
    model_name: str
    model_version: str

    @property
    def inference_url(self) -> str:
        return self.server.inference_url

    @property
    def management_url(self) -> str:
        return self.server.management_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}/{self.model_version}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.predictions_url}/v1"

    def requests_in_flight(self) -> int:
        """Requests running or waiting in the engine of this version's worker."""
        state = engine_state(self.management_url, self.model_name, self.model_version, self.server.management_headers())
        return state["num_requests_running"] + state["num_requests_waiting"]


def engine_state(management_url: str, model: str, version: str, headers: Optional[dict[str, str]] = None
                 ) -> dict[str, Any]:
    """The engine part of the handler's describe (`?customized=true`): live request counts and KV block stats."""
    url = f"{management_url}/models/{model}/{version}?customized=true"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        metadata = json.load(response)[0]["customizedMetadata"]
    return (json.loads(metadata) if isinstance(metadata, str) else metadata)["engine"]


def _has_ready_worker(url: str, headers: Optional[dict[str, str]]) -> bool:
    if headers is None:
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            models = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return False
    return any(worker.get("status") == "READY" for model in models for worker in model.get("workers", []))


def _signal(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free on `host` right now (for tests and parallel servers)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
