"""`python -m handler.launcher`: serve one model with TorchServe in the foreground; Ctrl-C stops everything.

With no arguments it serves the embedded SmolLM2-135M-Instruct on CPU with model-config/smollm2-135m-cpu.yaml.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import signal
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, NoReturn, Optional

from engine.config import EngineConfig
from engine.layers.sharding import check_tp_size
from engine.loader import read_model_config, resolve_model
from handler.api_keys import read_api_keys
from handler.config import handler_config, read_model_yaml, with_absolute_paths, with_tensor_parallel_size
from handler.metrics import default_metrics_config
from handler.model_store import build_archive, engine_overrides, model_yaml
from handler.protocol import RequestLimits
from handler.server import ServedModel, ServerConfig, TorchServeProcess, reply_size_limit

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "model-config" / "smollm2-135m-cpu.yaml"
# Used when the package is installed without the repository's model-config/ folder.
FALLBACK_CONFIG: dict[str, Any] = {
    "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "asyncCommunication": True,
    "responseTimeout": 600, "startupTimeout": 600, "deviceType": "cpu",
    "handler": {"engine": {"max_num_seqs": 64, "kv_cache_memory_gb": 0.5}},
}
DEFAULT_NAME = "smollm2"
ENGINE_PREFIX = "--engine."
ENGINE_HELP = f"Engine overrides: --engine.KEY VALUE for any of: {', '.join(typing.get_type_hints(EngineConfig))}."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m handler.launcher", allow_abbrev=False,
        description="Serve one model with TorchServe (OpenAI API under /predictions/NAME/VERSION/v1).",
        epilog=ENGINE_HELP,
    )
    p.add_argument("--model_id", help="Hugging Face folder or GGUF file (default: the config's, else the embedded SmolLM2)")
    p.add_argument("--model_name", help=f"TorchServe model name (default: {DEFAULT_NAME}, or the model's file/folder name)")
    p.add_argument("--model_version", default="1.0")
    p.add_argument("--config", type=Path, help=f"model-config YAML (default: {DEFAULT_CONFIG.name})")
    add_tensor_parallel_flag(p)
    add_lora_flags(p)
    p.add_argument("--model_store", type=Path, help="where the model folder is written (default: a temporary folder)")
    p.add_argument("--host", default="127.0.0.1", help="address of the inference API")
    p.add_argument("--management_host", help="address of the management and gRPC APIs (default: --host)")
    p.add_argument("--metrics_host", default="127.0.0.1", help="address of the metrics API (default: loopback only)")
    p.add_argument("--inference_port", type=int, default=8080)
    p.add_argument("--management_port", type=int, default=8081)
    p.add_argument("--metrics_port", type=int, default=8082)
    p.add_argument("--grpc_inference_port", type=int, default=7070)
    p.add_argument("--grpc_management_port", type=int, default=7071)
    p.add_argument(
        "--metrics_config", type=Path, default=default_metrics_config(),
        help="model metrics YAML, merged with TorchServe's default metrics (default: model-config/metrics.yaml)",
    )
    add_auth_flags(p)
    p.add_argument("--enable_model_api", action="store_true", help="allow registering and deleting models")
    p.add_argument("--startup_timeout", type=float, default=600.0, help="seconds to wait for the model to be ready")
    p.add_argument(
        "--drain_timeout", type=float, default=20.0,
        help="seconds a stop (SIGTERM, Ctrl-C) waits for the requests in flight to finish before TorchServe stops",
    )
    return p


def add_auth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable_token_auth", action="store_true", help="serve without TorchServe's Bearer keys")
    p.add_argument(
        "--token_expiration_min", type=float, default=ServerConfig.token_expiration_min,
        help="minutes the printed keys stay valid (default: 30 days; TorchServe's own default is 60)",
    )
    p.add_argument("--key_dir", type=Path, help="folder where TorchServe writes key_file.json (default: a temporary one)")
    p.add_argument(
        "--api_key_file", type=Path,
        help="API keys, one per line, as vLLM's --api-key: every request must send `Authorization: Bearer KEY`, "
        "and TorchServe's own token auth is off (its keys change at every start, which replicas cannot share)",
    )


def add_tensor_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor_parallel_size", type=int,
        help="ranks (GPUs) the engine spans; sets parallelType: custom and parallelLevel "
        "(default: the config's, else the visible GPUs for a CUDA engine, else 1)",
    )


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora_modules", "--lora-modules", nargs="+", metavar="NAME=PATH", default=[],
        help="LoRA adapters (PEFT folders) served from startup, as vLLM's --lora-modules: requests name one as "
        "`model`; added to the config's handler.lora_modules, and turn on --enable_lora",
    )
    p.add_argument(
        "--enable_lora", "--enable-lora", action="store_true",
        help="serve LoRA adapters: startup ones, and ones loaded at runtime with POST v1/load_lora_adapter",
    )


def apply_lora_flags(config: dict[str, Any], modules: list[str], enable: bool) -> dict[str, Any]:
    """`config` with the --lora_modules adapters (NAME=PATH, a relative PATH from the current directory) added to
    `handler.lora_modules`, and `handler.engine.enable_lora` set by --enable_lora."""
    result = copy.deepcopy(config)
    handler = result["handler"]
    if modules:
        handler["lora_modules"] = {**(handler.get("lora_modules") or {}), **_lora_modules(modules)}
    if enable:
        handler["engine"] = {**(handler.get("engine") or {}), "enable_lora": True}
    return result


def _lora_modules(modules: list[str]) -> dict[str, str]:
    pairs = {}
    for module in modules:
        name, _, path = module.partition("=")
        if not name or not path:
            raise ValueError(f"--lora_modules takes NAME=PATH pairs, got {module!r}")
        pairs[name] = str(Path(path).expanduser().absolute())
    return pairs


def split_engine_overrides(
    p: argparse.ArgumentParser, argv: Optional[list[str]] = None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags, and the `--engine.KEY VALUE` (or `--engine.KEY=VALUE`) overrides in EngineConfig types."""
    args, rest = p.parse_known_args(argv)
    pairs: list[tuple[str, str]] = []
    while rest:
        flag = rest.pop(0)
        if not flag.startswith(ENGINE_PREFIX):
            p.error(f"unrecognized argument: {flag}")
        key, _, value = flag[len(ENGINE_PREFIX):].partition("=")
        if not value:
            if not rest:
                p.error(f"{flag} needs a value")
            value = rest.pop(0)
        pairs.append((key, value))
    try:
        overrides = engine_overrides(pairs)
    except ValueError as error:
        p.error(str(error))
    # TorchServe must reserve the ranks' devices too, so the engine key is handled like the flag.
    from_engine_key = overrides.pop("tensor_parallel_size", None)
    if args.tensor_parallel_size is None:
        args.tensor_parallel_size = from_engine_key
    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        p.error(f"--tensor_parallel_size must be >= 1, got {args.tensor_parallel_size}")
    return args, overrides


def apply_api_key_file(config: dict[str, Any], path: Optional[Path]) -> dict[str, Any]:
    """`config` with `handler.api_key_file` set to `path` (absolute), once it is known to hold a key."""
    if path is None:
        return config
    read_api_keys(path)
    result = copy.deepcopy(config)
    result["handler"]["api_key_file"] = str(path.expanduser().absolute())
    return result


def apply_tensor_parallel_size(config: dict[str, Any], requested: Optional[int]) -> dict[str, Any]:
    """`config` for the requested TP size (default: the config's own, else the visible GPUs of a CUDA engine),
    checked against the model's head counts before any TorchServe starts."""
    size = requested
    engine = config["handler"].get("engine") or {}
    if size is None and "parallelType" not in config and str(engine.get("device", "cpu")).startswith("cuda"):
        import torch

        size = max(torch.cuda.device_count(), 1)
    if size is not None:
        config = with_tensor_parallel_size(config, size)
    engine_config = handler_config(config).engine
    check_tp_size(read_model_config(resolve_model(engine_config.model)), engine_config.tensor_parallel_size)
    return config


def base_config(path: Optional[Path]) -> dict[str, Any]:
    """The model-config YAML at `path` (default: DEFAULT_CONFIG, else FALLBACK_CONFIG), its relative paths made
    absolute from its folder."""
    path = path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if path is None:
        return copy.deepcopy(FALLBACK_CONFIG)
    return with_absolute_paths(read_model_yaml(str(path)), path.resolve().parent)


def model_name(args: argparse.Namespace, config: dict[str, Any]) -> str:
    model = config["handler"].get("model")
    if args.model_name:
        return args.model_name
    if model is None:
        return DEFAULT_NAME
    return Path(model).stem if Path(model).is_file() else Path(model).name


def ready_message(served: ServedModel, api_key_file: Optional[Path] = None) -> str:
    server = served.server
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    curl = ["curl", f"{served.openai_base_url}/chat/completions", "-H", "Content-Type: application/json"]
    lines = [
        f"TorchServe is serving {served.model_name} version {served.model_version}.",
        f"OpenAI base URL: {served.openai_base_url}",
    ]
    if server.config.token_auth:
        curl += ["-H", f"Authorization: Bearer {server.keys()['inference']}"]
        lines.append(f"Token keys (inference, management): {server.key_file}")
    if api_key_file:
        curl += ["-H", "Authorization: Bearer KEY"]
        lines.append(f"API keys (send one as Bearer KEY): {api_key_file}")
    curl += ["-d", json.dumps(body)]
    lines += [f"Logs: {server.run_dir / 'logs'}", "Try:", "  " + shlex.join(curl), "Ctrl-C stops TorchServe."]
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> NoReturn:
    # The first signal stops TorchServe; a second one would cut that short and leave workers behind.
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)
    raise KeyboardInterrupt


def flags_server_config(
    args: argparse.Namespace, store: Path, run_dir: Path, models: dict[str, str], limits: RequestLimits
) -> ServerConfig:
    """The TorchServe settings the flags ask for."""
    return ServerConfig(
        model_store=store, run_dir=run_dir, models=models, host=args.host, management_host=args.management_host,
        metrics_host=args.metrics_host, inference_port=args.inference_port, management_port=args.management_port,
        metrics_port=args.metrics_port, grpc_inference_port=args.grpc_inference_port,
        grpc_management_port=args.grpc_management_port, max_response_size=reply_size_limit(limits),
        token_auth=not (args.disable_token_auth or args.api_key_file), token_expiration_min=args.token_expiration_min,
        key_dir=args.key_dir, model_api=args.enable_model_api, metrics_config=args.metrics_config,
    )


def serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    config = model_yaml(base_config(args.config), args.model_id, overrides)
    config = apply_lora_flags(config, args.lora_modules, args.enable_lora)
    config = apply_api_key_file(config, args.api_key_file)
    config = apply_tensor_parallel_size(config, args.tensor_parallel_size)
    name = model_name(args, config)
    limits = handler_config(config).limits
    with tempfile.TemporaryDirectory(prefix="pagedserve-") as tmp:
        store = args.model_store or Path(tmp) / "model_store"
        folder = build_archive(name, args.model_version, config, store)
        server_config = flags_server_config(args, store, Path(tmp) / "run", {name: folder.name}, limits)
        with TorchServeProcess(server_config) as server:
            served = ServedModel(server, name, args.model_version)
            try:
                server.wait_until_ready(name, args.model_version, args.startup_timeout)
                print(ready_message(served, args.api_key_file), flush=True)
                return watch(server)
            except KeyboardInterrupt:
                drain(served, args.drain_timeout)
                raise


def watch(server: TorchServeProcess) -> int:
    """Wait while TorchServe runs; it exiting on its own is a failure."""
    while server.poll() is None:
        time.sleep(0.5)
    print(f"TorchServe exited with code {server.poll()}; log tail:\n{server.log_tail()}", file=sys.stderr)
    return 1


def drain(served: ServedModel, timeout: float) -> None:
    """Wait until the engine has no request running or waiting, at most `timeout` seconds. A Kubernetes Service
    stops sending new requests once the pod is terminating; the ones it already sent finish here."""
    deadline, reported = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and served.server.poll() is None:
        try:
            in_flight = served.requests_in_flight()
        except (OSError, ValueError, LookupError):  # no worker answers: nothing is left to wait for
            return
        if in_flight == 0:
            return
        if in_flight != reported:
            print(f"Stopping: waiting for {in_flight} request(s) in flight", flush=True)
        reported = in_flight
        time.sleep(0.5)


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = split_engine_overrides(parser(), argv)
    # Ctrl-C and SIGTERM leave through the `with` blocks, which stop TorchServe and its workers.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return serve(args, overrides)
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
        return 0
    except (ValueError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
