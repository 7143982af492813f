"""`python -m handler.health_check [--ready]`: the health of the TorchServe on this host, for Docker's HEALTHCHECK
and Kubernetes' probes. Exit 0 when healthy, else 1 with the reason on stdout.

Alive: TorchServe's `/ping` answers Healthy. Ready (`--ready`): alive, and every registered model has a READY
worker; `/ping` says Healthy while a model still loads. With TorchServe's token auth on, the keys come from its
key_file.json. Settings default to the container entrypoint's PAGEDSERVE_* variables, then the launcher's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

HOST = "127.0.0.1"


class Unhealthy(Exception):
    """Why the server is not (yet) healthy."""


def parser() -> argparse.ArgumentParser:
    key_dir = os.environ.get("PAGEDSERVE_KEY_DIR")
    p = argparse.ArgumentParser(prog="python -m handler.health_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--ready", action="store_true", help="also require a READY worker for every registered model")
    p.add_argument("--inference_port", type=int, default=int(os.environ.get("PAGEDSERVE_INFERENCE_PORT", 8080)))
    p.add_argument("--management_port", type=int, default=int(os.environ.get("PAGEDSERVE_MANAGEMENT_PORT", 8081)))
    p.add_argument(
        "--key_file", type=Path, default=Path(key_dir) / "key_file.json" if key_dir else None,
        help="TorchServe's key_file.json, where token auth is on (default: in $PAGEDSERVE_KEY_DIR)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each request may take")
    return p


def token_keys(key_file: Optional[Path]) -> dict[str, str]:
    """TorchServe's `inference` and `management` keys; none where there is no key file (token auth off)."""
    if key_file is None or not key_file.exists():
        return {}
    try:
        return {kind: entry["key"] for kind, entry in json.loads(key_file.read_text()).items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise Unhealthy(f"{key_file} is not a complete key file yet") from None


def get_json(url: str, key: Optional[str], timeout: float) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise Unhealthy(f"{url}: HTTP {error.code} {error.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
        raise Unhealthy(f"{url}: {getattr(error, 'reason', error)}") from None


def check_alive(args: argparse.Namespace, keys: dict[str, str]) -> None:
    answer = get_json(f"http://{HOST}:{args.inference_port}/ping", keys.get("inference"), args.timeout)
    if answer.get("status") != "Healthy":
        raise Unhealthy(f"/ping says {answer.get('status')!r}")


def check_ready(args: argparse.Namespace, keys: dict[str, str]) -> list[str]:
    """The names of the registered models, each checked to have a READY worker."""
    base = f"http://{HOST}:{args.management_port}/models"
    names = [model["modelName"] for model in get_json(base, keys.get("management"), args.timeout)["models"]]
    if not names:
        raise Unhealthy("no model is registered")
    for name in names:
        versions = get_json(f"{base}/{urllib.parse.quote(name)}", keys.get("management"), args.timeout)
        if not any(worker.get("status") == "READY" for version in versions for worker in version.get("workers", [])):
            raise Unhealthy(f"model {name} has no READY worker yet")
    return names


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        keys = token_keys(args.key_file)
        check_alive(args, keys)
        models = check_ready(args, keys) if args.ready else []
    except Unhealthy as reason:
        print(f"unhealthy: {reason}")
        return 1
    print("ready: " + ", ".join(models) if args.ready else "alive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
