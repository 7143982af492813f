"""Starting real TorchServe servers for tests: the embedded SmolLM2 with small engine settings, free ports."""
from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from handler.launcher import base_config
from handler.model_store import model_yaml
from handler.server import ServerConfig, TorchServeProcess, free_ports

# Small enough to start fast on 2 cores; 32 sequences for the concurrency test.
# Dequantized weights: a request's greedy text then does not depend on the requests sharing its steps, which the
# served tests compare (with quantized weights a step of 8 rows or more runs on the dense copies instead).
SMALL_ENGINE: dict[str, Any] = {
    "max_num_seqs": 32, "kv_cache_memory_gb": 0.25, "max_model_len": 1024, "quantization": "none",
}
STARTUP_TIMEOUT = 300.0
READY_LINE = "Ctrl-C stops TorchServe."  # the launcher's last line once its model is ready
RAG_DOCUMENTS = Path(__file__).resolve().parent / "data" / "rag_docs"
EXAMPLE_PLUGINS = Path(__file__).resolve().parent / "example_plugins.py"
# Two short categories keep the guard prompt inside the tiny stand-in guard model's 512 positions.
GUARD_CATEGORIES = {"S1": "Violent Crimes", "S10": "Hate"}
GUARD_KV_CACHE_GB = 0.05  # the guard engine's, taken from its worker's budget (raised by as much)
PLUGGED_MAX_TOKENS = 48  # the ReplaceWords plugin's cap on every request of the assistant model


def small_model_config(**engine: Any) -> dict[str, Any]:
    """The default model-config (embedded SmolLM2 on CPU) with SMALL_ENGINE and `engine` applied."""
    return model_yaml(base_config(None), None, {**SMALL_ENGINE, **engine})


def torchserve_process(root: Path, models: dict[str, str], **options: Any) -> TorchServeProcess:
    """A (not yet started) TorchServe on free loopback ports serving `models` from `root / "store"`."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    config = ServerConfig(
        model_store=root / "store", run_dir=root / "run", models=models,
        inference_port=inference, management_port=management, metrics_port=metrics,
        grpc_inference_port=grpc_inference, grpc_management_port=grpc_management, **options,
    )
    config.model_store.mkdir(parents=True, exist_ok=True)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    return TorchServeProcess(config)


def plugin_model_configs(cache_dir: Path, guard_model: Path) -> dict[str, dict[str, Any]]:
    """Model-configs by model name: `assistant` (SmolLM2: users' plugins, then hybrid RAG over tests/data/rag_docs),
    `guarded` (input passes and is reported, every output is blocked) and `refusing` (every input is blocked); the
    last two serve the tiny random llama, which is also their guard: what they generate does not matter."""
    rag = {"documents": str(RAG_DOCUMENTS), "cache_dir": str(cache_dir), "chunk_tokens": 96, "chunk_overlap": 24}
    assistant = [
        {"plugin": "example_plugins:FailOn"},
        {"plugin": "example_plugins:CannedAnswer"},
        {"plugin": "example_plugins:ReplaceWords",
         "options": {"replacements": {"Zorblat": "France"}, "max_tokens": PLUGGED_MAX_TOKENS}},
        {"plugin": "example_plugins:RedactDigits"},
        {"plugin": "rag", "options": rag},
    ]
    guarded = model_yaml(small_model_config(max_model_len=512, kv_cache_memory_gb=GUARD_KV_CACHE_GB * 2),
                         str(guard_model), {})
    return {
        "assistant": with_plugins(small_model_config(), assistant),
        "guarded": with_plugins(guarded, [guard_plugin(guard_model, threshold=1.0, output_threshold=0.0)]),
        "refusing": with_plugins(guarded, [guard_plugin(guard_model, stages=["input"], threshold=0.0)]),
    }


def guard_plugin(guard_model: Path, **options: Any) -> dict[str, Any]:
    """The guard on the tiny random stand-in model, in float32 so that tests can recompute its verdicts exactly."""
    engine = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_gb": GUARD_KV_CACHE_GB}
    settings = {"model": str(guard_model), "categories": GUARD_CATEGORIES, "output_window_tokens": 8,
                "prompt_format": "llama_guard_3", "engine": engine}
    return {"plugin": "guard", "options": {**settings, **options}}


def with_plugins(config: dict[str, Any], plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return {**config, "handler": {**config["handler"], "plugins": plugins}}


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The launcher's output up to the line holding `marker`; fails if it exits or times out first."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output, deadline = "", time.monotonic() + timeout
    while marker not in output:
        try:
            output += lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no {marker!r} within {timeout:.0f}s (exit code {process.poll()}):\n{output}")
    return output
