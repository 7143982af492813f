"""Starting real TorchServe servers for tests: the embedded SmolLM2 with small engine settings, free ports."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
