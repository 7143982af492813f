"""Model folders and versioned .mar archives for TorchServe, built with torch-model-archiver.

The model-config YAML written into an archive is the user's, with `handler.model` and `--engine.KEY VALUE`
overrides applied, and it is validated here, before any Java process starts.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from engine.config import EngineConfig
from engine.loader import resolve_model
from handler.chat_template import is_template_file, read_chat_template
from handler.config import handler_config

HANDLER = "handler.llm_handler"
CONFIG_FILE = "model-config.yaml"
ARCHIVE_FORMATS = ("no-archive", "default")
BURST_JOBS = 1024
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def engine_overrides(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Turn `--engine.KEY VALUE` strings into EngineConfig values of the field's type; unknown keys are errors."""
    types = typing.get_type_hints(EngineConfig)
    unknown = sorted({key for key, _ in pairs} - set(types))
    if unknown:
        raise ValueError(f"unknown engine key(s) {unknown}; valid keys: {sorted(types)}")
    return {key: _convert(key, value, types[key]) for key, value in pairs}


def _convert(key: str, value: str, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if type(None) in args:
        if value.lower() in ("none", "null"):
            return None
        annotation = next(arg for arg in args if arg is not type(None))
    try:
        if annotation is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"expected one of {_TRUE + _FALSE}")
            return value.lower() in _TRUE
        return annotation(value)
    except ValueError as error:
        raise ValueError(f"engine.{key}: cannot read {value!r} as {annotation.__name__}: {error}") from None


def model_yaml(config: dict[str, Any], model: Optional[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with `handler.model` (when given) and the engine overrides applied, validated."""
    result = copy.deepcopy(config)
    handler = result.setdefault("handler", {}) or {}
    result["handler"] = handler
    if model is not None:
        handler["model"] = model
    if overrides:
        handler["engine"] = {**(handler.get("engine") or {}), **overrides}
    engine = handler.get("engine") or {}
    if engine.get("model") is not None and handler.get("model") is None:
        handler["model"] = engine.pop("model")  # one place for the weights, which build_archive resolves
    result.setdefault("jobQueueSize", job_queue_size(result))
    return result


def job_queue_size(config: dict[str, Any]) -> int:
    """Jobs TorchServe's frontend queues for the model: every request its workers' engines admit (running or
    waiting), plus a burst that arrives faster than the frontend hands jobs to the workers; the engines refuse
    what they cannot queue with an OpenAI-style 503, while a full frontend queue answers with its own."""
    engine = handler_config(config).engine
    workers = config.get("maxWorkers") or config.get("minWorkers") or 1
    return workers * (engine.max_num_seqs + engine.max_num_waiting) + BURST_JOBS


def build_archive(
    name: str,
    version: str,
    config: dict[str, Any],
    export_dir: Union[str, Path],
    archive_format: str = "no-archive",
    weights_inside: bool = False,
) -> Path:
    """Write `export_dir/NAME-VERSION` (a folder) or `NAME-VERSION.mar`, replacing an older one.

    `config["handler"]["model"]` names the weights (None: the embedded SmolLM2). They are referenced by absolute
    path, or with `weights_inside` copied into the archive and referenced relative to the model dir. A chat template
    file named by absolute path is written into the archive's YAML as its text.
    """
    if archive_format not in ARCHIVE_FORMATS:
        raise ValueError(f"archive_format must be one of {ARCHIVE_FORMATS}, got {archive_format!r}")
    config = _with_template_text(config)
    model = (config.get("handler") or {}).get("model")
    weights = resolve_model(model).path.resolve() if model is not None or weights_inside else None
    if weights is not None:
        config = model_yaml(config, weights.name if weights_inside else str(weights), {})
    export_dir = Path(export_dir).resolve()
    export_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if archive_format == "no-archive" else ".mar"
    target = export_dir / f"{name}-{version}{suffix}"
    # The work dir sits beside the target so that the result is moved, not copied, into place.
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=f".{name}-") as work:
        built = _run_archiver(Path(work), name, version, config, archive_format, weights if weights_inside else None)
        _remove(target)
        built.rename(target)
    return target


def _with_template_text(config: dict[str, Any]) -> dict[str, Any]:
    handler = config.get("handler") or {}
    template = handler.get("chat_template")
    if not isinstance(template, str) or not is_template_file(template) or not Path(template).expanduser().is_absolute():
        return config
    return {**config, "handler": {**handler, "chat_template": read_chat_template(template)}}


def _run_archiver(
    work: Path, name: str, version: str, config: dict[str, Any], archive_format: str, weights: Optional[Path]
) -> Path:
    (work / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    # torch-model-archiver copies the handler as a file named HANDLER + ".py" from its cwd; TorchServe's worker
    # then imports the module HANDLER itself, i.e. the installed handler.llm_handler. This stub only satisfies the copy.
    (work / f"{HANDLER}.py").write_text(f"# TorchServe imports the installed module {HANDLER}; this file is unused.\n")
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", name, "--version", version, "--handler", HANDLER,
        "--config-file", CONFIG_FILE, "--archive-format", archive_format,
        "--export-path", str(work / "out"), "--force",
    ]
    if weights is not None:
        # A folder given to --extra-files is copied by content; a link inside one keeps the weights' own name.
        (work / "weights").mkdir()
        (work / "weights" / weights.name).symlink_to(weights)
        command += ["--extra-files", "weights"]
    (work / "out").mkdir()
    # The archiver stages files in TMPDIR/NAME: a private TMPDIR keeps parallel builds of one name apart.
    result = subprocess.run(
        command, cwd=work, env={**os.environ, "TMPDIR": str(work)}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return work / "out" / (name if archive_format == "no-archive" else f"{name}.mar")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
