"""The model-config YAML: TorchServe's frontend keys beside our `handler:` section, both checked for typos."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.config import EngineConfig
from handler.chat_template import is_template_file
from handler.model_paths import path_in_model_dir
from handler.plugins import Plugin, load_plugins
from handler.plugins.pipeline import plugin_class
from handler.protocol import ADAPTER_NAME, ADAPTER_NAME_RULE, RequestLimits
from handler.tool_calls.parsers import TOOL_CALL_PARSERS

logger = logging.getLogger(__name__)

# The keys TorchServe 0.12.0's frontend and Python worker read from a model-config YAML.
FRONTEND_KEYS = frozenset({
    "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout",
    "deviceType", "deviceIds", "parallelType", "parallelLevel", "parallelMode", "torchrun",
    "jobQueueSize", "useJobTicket", "maxRetryTimeoutInSec", "clientTimeoutInMills",
    "sequenceMaxIdleMSec", "sequenceTimeoutMSec", "maxNumSequence", "maxSequenceJobQueueSize",
    "continuousBatching", "sequenceBatching", "asyncCommunication", "useVenv", "pt2",
})
HANDLER_KEYS = (
    "model", "served_model_name", "chat_template", "tool_call_parser", "engine", "limits", "plugins", "embedding_model",
    "lora_modules", "api_key_file",
)


@dataclass
class HandlerConfig:
    """The `handler:` section. `model` omitted means the embedded SmolLM2; relative paths are under the model dir."""

    model: Optional[str] = None
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None  # the template's text, or its file's path (handler.chat_template)
    tool_call_parser: str = "hermes"  # how the model writes its own tool calls: a key of TOOL_CALL_PARSERS
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    plugins: list[Plugin] = field(default_factory=list)  # handler.plugins.pipeline: in the order listed
    embedding_model: Optional[str] = None  # a sentence-transformers folder; None: the packaged all-MiniLM-L6-v2
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapter name -> PEFT folder, loaded at startup
    api_key_file: Optional[str] = None  # keys, one per line, that every request must send as a Bearer token

    @classmethod
    def from_dict(cls, section: dict[str, Any], model_dir: Optional[str] = None) -> "HandlerConfig":
        _reject_unknown("handler", section, HANDLER_KEYS)
        engine_values = dict(section.get("engine") or {})
        if section.get("model") is not None and engine_values.get("model") is not None:
            raise ValueError("handler.model and handler.engine.model are both set; keep one")
        model = section.get("model", engine_values.pop("model", None))
        for name in ("model", "served_model_name", "chat_template", "embedding_model", "api_key_file"):
            value = model if name == "model" else section.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"handler.{name} must be a non-empty string, got {value!r}")
        model = path_in_model_dir("handler.model", model, model_dir)
        chat_template = _template_in_model_dir(section.get("chat_template"), model_dir)
        lora_modules = _lora_modules(section.get("lora_modules") or {}, model_dir)
        engine = EngineConfig.from_dict({**_lora_enabled(engine_values, lora_modules), "model": model})
        limits = RequestLimits.from_dict(_mapping("handler.limits", section.get("limits") or {}))
        plugins = load_plugins(section.get("plugins") or [])
        embedding_model = path_in_model_dir("handler.embedding_model", section.get("embedding_model"), model_dir)
        api_key_file = path_in_model_dir("handler.api_key_file", section.get("api_key_file"), model_dir)
        return cls(model, section.get("served_model_name"), chat_template, _tool_call_parser(section), engine, limits,
                   plugins, embedding_model, lora_modules, api_key_file)


def _template_in_model_dir(chat_template: Optional[str], model_dir: Optional[str]) -> Optional[str]:
    if chat_template is None or not is_template_file(chat_template):
        return chat_template
    return path_in_model_dir("handler.chat_template", chat_template, model_dir)


def _tool_call_parser(section: dict[str, Any]) -> str:
    name = section.get("tool_call_parser")
    name = HandlerConfig.tool_call_parser if name is None else name
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"handler.tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}")
    return name


def _lora_modules(modules: Any, model_dir: Optional[str]) -> dict[str, str]:
    """`handler.lora_modules`, {adapter name: PEFT folder}, with relative folders inside the model folder."""
    for name, path in _mapping("handler.lora_modules", modules).items():
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"handler.lora_modules: the adapter name {name!r} must be {ADAPTER_NAME_RULE}")
        if not isinstance(path, str) or not path:
            raise ValueError(f"handler.lora_modules.{name} must be a PEFT folder's path, got {path!r}")
    # Spelled as the engine spells a folder (no trailing slash), so that its adapter cache knows the folder again.
    return {name: str(Path(path_in_model_dir(f"handler.lora_modules.{name}", path, model_dir)))
            for name, path in modules.items()}


def _lora_enabled(engine_values: dict[str, Any], lora_modules: dict[str, str]) -> dict[str, Any]:
    """Startup adapters need `enable_lora`: turned on when the YAML leaves it out, refused when it says otherwise."""
    if not lora_modules:
        return engine_values
    if "enable_lora" not in engine_values:
        logger.info("handler.lora_modules lists adapters: handler.engine.enable_lora is turned on")
    elif engine_values["enable_lora"] is not True:
        raise ValueError(
            f"handler.lora_modules needs handler.engine.enable_lora: true, got {engine_values['enable_lora']!r}"
        )
    return {**engine_values, "enable_lora": True}


def check_model_yaml(config: dict[str, Any]) -> None:
    """Raise ValueError naming any top-level key that neither TorchServe nor this handler reads, or parallel
    settings that TorchServe would act on differently from the engine."""
    _reject_unknown("model-config", config, FRONTEND_KEYS | {"handler"})
    _check_parallel(config)


def handler_config(config: dict[str, Any], model_dir: Optional[str] = None) -> HandlerConfig:
    """The checked `handler:` section; under `parallelType: custom` the engine's TP size is `parallelLevel`."""
    check_model_yaml(config)
    section = dict(config.get("handler") or {})
    if config.get("parallelType") == "custom":
        section["engine"] = {**(section.get("engine") or {}), "tensor_parallel_size": config["parallelLevel"]}
    return HandlerConfig.from_dict(section, model_dir)


def with_tensor_parallel_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """`config` set up for `size` ranks: `parallelType: custom` and `parallelLevel: size` when size > 1."""
    result = {key: value for key, value in config.items() if key not in ("parallelType", "parallelLevel")}
    handler = dict(result.get("handler") or {})
    engine = {key: value for key, value in (handler.get("engine") or {}).items() if key != "tensor_parallel_size"}
    result["handler"] = {**handler, "engine": engine}
    if size > 1:
        result.update(parallelType="custom", parallelLevel=size)
    return result


def _check_parallel(config: dict[str, Any]) -> None:
    parallel_type, level = config.get("parallelType"), config.get("parallelLevel")
    engine_size = ((config.get("handler") or {}).get("engine") or {}).get("tensor_parallel_size")
    if parallel_type is None:
        if level is not None:
            raise ValueError("parallelLevel: TorchServe ignores it unless parallelType is set; use parallelType: custom")
        if engine_size not in (None, 1):
            raise ValueError(
                f"handler.engine.tensor_parallel_size {engine_size} needs parallelType: custom and "
                f"parallelLevel: {engine_size}, so that TorchServe gives the worker that many devices"
            )
        return
    if parallel_type != "custom":
        raise ValueError(
            f"parallelType {parallel_type!r} makes TorchServe start one handler per rank under torchrun; "
            "this handler starts its own tensor-parallel ranks: use parallelType: custom"
        )
    if isinstance(level, bool) or not isinstance(level, int) or level < 1:
        raise ValueError(f"parallelType: custom needs parallelLevel, the tensor-parallel size (>= 1), got {level!r}")
    if engine_size is not None and engine_size != level:
        raise ValueError(
            f"handler.engine.tensor_parallel_size ({engine_size}) differs from parallelLevel ({level}); "
            "set parallelLevel only"
        )


def with_absolute_paths(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`config` with the relative paths of `handler.embedding_model`, `handler.api_key_file`,
    `handler.chat_template` (a file), `handler.lora_modules` and of the plugins' path options made absolute from
    `folder`: a YAML outside a model folder (the launcher's --config) means paths beside itself."""
    result = copy.deepcopy(config)
    section = result.get("handler") or {}
    for key in ("embedding_model", "api_key_file"):
        if isinstance(section.get(key), str):
            section[key] = str(folder / Path(section[key]).expanduser())
    if isinstance(section.get("chat_template"), str) and is_template_file(section["chat_template"]):
        section["chat_template"] = str(folder / Path(section["chat_template"]).expanduser())
    if isinstance(section.get("lora_modules"), dict):
        section["lora_modules"] = {name: str(folder / Path(path).expanduser()) if isinstance(path, str) else path
                                   for name, path in section["lora_modules"].items()}
    for i, entry in enumerate(section.get("plugins") or []):
        if isinstance(entry, dict) and isinstance(entry.get("options"), dict):
            cls = plugin_class(f"handler.plugins[{i}]", entry.get("plugin"))
            entry["options"] = _absolute_options(cls.Options, entry["options"], folder)
    return result


def _absolute_options(options_class: type, options: dict[str, Any], folder: Path) -> dict[str, Any]:
    paths = {f.name for f in dataclasses.fields(options_class) if f.metadata.get("path")}
    return {key: str(folder / Path(value).expanduser()) if key in paths and isinstance(value, str) else value
            for key, value in options.items()}


def read_model_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a model-config YAML must be a mapping")
    check_model_yaml(config)
    return config


def _mapping(where: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    return values


def _reject_unknown(where: str, values: Any, known: Any) -> None:
    _mapping(where, values)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid keys: {sorted(known)}")
