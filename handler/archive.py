"""`python -m handler.archive`: a versioned TorchServe archive, EXPORT_PATH/NAME-VERSION.mar.

Register it with `POST /models?url=NAME-VERSION.mar` once it is in TorchServe's model store.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from handler.launcher import (
    ENGINE_HELP, add_lora_flags, add_tensor_parallel_flag, apply_lora_flags, apply_tensor_parallel_size, base_config,
    split_engine_overrides,
)
from handler.model_store import build_archive, model_yaml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m handler.archive", allow_abbrev=False,
        description="Build a versioned model archive (.mar) for TorchServe.",
        epilog=ENGINE_HELP,
    )
    p.add_argument("--model_name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--model_id", help="Hugging Face folder or GGUF file (default: the config's, else the embedded SmolLM2)")
    p.add_argument("--config", type=Path, help="model-config YAML (default: model-config/smollm2-135m-cpu.yaml)")
    add_tensor_parallel_flag(p)
    add_lora_flags(p)
    p.add_argument("--weights", choices=("inside", "referenced"), default="referenced",
                   help="copy the weights into the archive, or reference them by absolute path (default)")
    p.add_argument("--archive_format", choices=("default", "no-archive"), default="default",
                   help="a .mar file (default) or a folder")
    p.add_argument("--export_path", type=Path, required=True, help="where NAME-VERSION.mar is written")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args, overrides = split_engine_overrides(p, argv)
    try:
        config = model_yaml(base_config(args.config), args.model_id, overrides)
        config = apply_lora_flags(config, args.lora_modules, args.enable_lora)
        config = apply_tensor_parallel_size(config, args.tensor_parallel_size)
        path = build_archive(
            args.model_name, args.version, config, args.export_path, args.archive_format, args.weights == "inside"
        )
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
