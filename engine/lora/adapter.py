"""A PEFT LoRA adapter read from its folder and checked against the base model: for each targeted projection of
each layer, A [rank, in] and B [out, rank] in float32, with the scaling PEFT applies (alpha / rank, or
alpha / sqrt(rank) for rsLoRA). Any problem is a ValueError that names it; nothing is loaded then."""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.lora.request import LoRARequest
from engine.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_adapter_ids = itertools.count(1)


@dataclass(frozen=True)
class ProjectionLoRA:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank], scaling not applied
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    """`adapter_id` is unique per load, so that a reloaded adapter never shares prefix-cache blocks with the old."""

    name: str
    path: str
    rank: int
    projections: dict[tuple[int, str], ProjectionLoRA]  # (layer index, checkpoint projection name)
    adapter_id: int = field(default_factory=lambda: next(_adapter_ids))

    @property
    def request(self) -> LoRARequest:
        return LoRARequest(self.name, self.path)

    @property
    def cache_key(self) -> tuple[str, int]:
        """Where a sequence's prefix-cache hash chain starts (None for the base model)."""
        return ("lora", self.adapter_id)


def load_adapter(name: str, path: str, model: ModelConfig, max_rank: int) -> LoRAAdapter:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"LoRA adapter {name!r}: {path!r} is not a folder")
    config = _read_config(folder, name)
    rank, alpha = _rank_and_alpha(config, name, max_rank)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = _read_weights(folder, name)
    projections = _pair_tensors(tensors, name, model, ProjectionShape(rank, scaling))
    return LoRAAdapter(name, str(folder), rank, projections)


def _read_config(folder: Path, name: str) -> dict[str, Any]:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no {CONFIG_FILE} in the folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    _check_supported(config, name)
    return config


def _check_supported(config: dict[str, Any], name: str) -> None:
    """Refuse what this engine does not apply, rather than serve an adapter that computes something else."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": config.get("use_dora"), "fan_in_fan_out": config.get("fan_in_fan_out"),
        "modules_to_save": config.get("modules_to_save"), "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"), "bias": config.get("bias", "none") != "none",
    }
    found = sorted(key for key, value in unsupported.items() if value)
    if found:
        raise ValueError(f"LoRA adapter {name!r}: {CONFIG_FILE} sets {found}, which this engine does not support")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        missing = sorted(set(targets) - set(TARGET_MODULES))
        if missing:
            raise ValueError(
                f"LoRA adapter {name!r}: target modules {missing} are not in this model's adapted projections "
                f"{list(TARGET_MODULES)}"
            )


def _rank_and_alpha(config: dict[str, Any], name: str, max_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA adapter {name!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {name!r}: rank {rank} exceeds max_lora_rank ({max_rank})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"LoRA adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    return rank, float(alpha)


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no {WEIGHTS_FILE} in the folder (only safetensors are read)")
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} cannot be read: {exc}") from None


@dataclass(frozen=True)
class ProjectionShape:
    rank: int
    scaling: float


def _pair_tensors(
    tensors: dict[str, torch.Tensor], name: str, model: ModelConfig, shape: ProjectionShape
) -> dict[tuple[int, str], ProjectionLoRA]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, projection, half = _parse_key(key, name, model)
        halves.setdefault((layer, projection), {})[half] = tensor.float()
    if not halves:
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    return {where: _projection(where, pair, name, model, shape) for where, pair in sorted(halves.items())}


def _parse_key(key: str, name: str, model: ModelConfig) -> tuple[int, str, str]:
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA weight of a decoder-layer projection")
    layer, block, projection, half = int(match[1]), match[2], match[3], match[4]
    expected_block = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    if projection not in TARGET_MODULES or block != expected_block:
        raise ValueError(f"LoRA adapter {name!r}: tensor {key!r} targets {block}.{projection}, which this model lacks")
    if layer >= model.num_layers:
        raise ValueError(
            f"LoRA adapter {name!r}: tensor {key!r} is for layer {layer}; the model has {model.num_layers}"
        )
    return layer, projection, half


def _projection(
    where: tuple[int, str], pair: dict[str, torch.Tensor], name: str, model: ModelConfig, shape: ProjectionShape
) -> ProjectionLoRA:
    layer, projection = where
    if set(pair) != {"A", "B"}:
        missing = "B" if "A" in pair else "A"
        raise ValueError(f"LoRA adapter {name!r}: layer {layer} {projection} lacks its lora_{missing}")
    in_features, out_features = projection_shape(projection, model)
    rank = shape.rank
    for half, expected in (("A", (rank, in_features)), ("B", (out_features, rank))):
        if tuple(pair[half].shape) != expected:
            raise ValueError(
                f"LoRA adapter {name!r}: layer {layer} {projection}.lora_{half} has shape {tuple(pair[half].shape)}, "
                f"expected {expected} for this model"
            )
    return ProjectionLoRA(pair["A"], pair["B"], shape.scaling)


def projection_shape(projection: str, model: ModelConfig) -> tuple[int, int]:
    """(in_features, out_features) of a checkpoint projection of the whole (unsharded) model."""
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    hidden, intermediate = model.hidden_size, model.intermediate_size
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }[projection]
