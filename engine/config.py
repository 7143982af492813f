"""Engine settings: one dataclass, filled from keyword arguments or the YAML `engine:` section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from engine.dtypes import TORCH_DTYPES
from engine.kernel_backend import ATTENTION_BACKENDS

DTYPES = ("auto", *TORCH_DTYPES)
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
T = TypeVar("T")


@dataclass
class EngineConfig:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"  # engine.dtypes.resolve_dtype: bfloat16 on GPUs and on CPUs with native bfloat16
    load_format: str = "auto"
    seed: int = 0
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_waiting: int = 256  # AsyncLLMEngine refuses new requests (EngineOverloadedError) while this many wait
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # engine.kernel_backend.select_backend: Triton on CUDA, native kernels on CPU
    enforce_eager: bool = False  # True: no CUDA graphs on GPU; on CPU the layers run one by one from Python
    num_threads: Optional[int] = None  # per rank; default: all cores, split evenly between CPU ranks
    tensor_parallel_size: int = 1
    stats_interval_s: float = 0.5  # AsyncLLMEngine calls its stat loggers at most once per this many seconds
    stream_interval: int = 1  # AsyncLLMEngine streams every k new tokens (the first and the last at once)
    # Weight-only quantization of the matmul weights (LM head included): int8 per output channel, int4 in groups of
    # quantization_group_size input columns. auto: a GGUF file's own format (Q4_0/Q4_1 -> int4, Q8_0 -> int8,
    # other tensors as stored), none for other checkpoints.
    quantization: str = "auto"
    quantization_group_size: int = 32
    # Steps of at least this many rows run a quantized matmul on a bfloat16 copy of its weight kept beside the
    # quantized one (weight-only kernels lose to dense ones at batch sizes); null: no copy, weights stay small.
    quantized_dense_rows: Optional[int] = 8
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8_e4m3 / fp8_e5m2 hold twice the tokens
    kv_cache_scale: Optional[float] = None  # fp8 cache: stored = value / scale; null: measured per layer at start
    enable_lora: bool = False  # serve PEFT LoRA adapters (engine.lora): requests name one, or the base model
    max_loras: int = 4  # adapters one step serves at once: preallocated slots beside the weights
    max_lora_rank: int = 16  # slots hold ranks up to this; an adapter of higher rank is refused
    max_cpu_loras: Optional[int] = None  # adapters kept read in memory, least recently used out; null: max_loras
    # Plugin logits processors (engine.logits_processors): "package.module:ClassName" each, applied in this order.
    logits_processors: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        for name in ("enforce_eager", "enable_lora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _require_choice(self, ("load_format", LOAD_FORMATS), ("quantization", QUANTIZATIONS),
                        ("kv_cache_dtype", KV_CACHE_DTYPES))
        _require_positive(
            self, "block_size", "max_num_seqs", "max_num_waiting", "max_num_batched_tokens", "tensor_parallel_size",
            "stream_interval", "quantization_group_size", "max_loras", "max_lora_rank",
        )
        if self.max_cpu_loras is not None:
            _require_positive(self, "max_cpu_loras")
            if self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.quantized_dense_rows is not None:
            _require_positive(self, "quantized_dense_rows")
        if self.kv_cache_scale is not None:
            _require_positive_number(self, "kv_cache_scale")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        _require_positive_number(self, "kv_cache_memory_gb", "stats_interval_s")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.logits_processors, (list, tuple)):
            raise ValueError(f"logits_processors must be a list of class paths, got {self.logits_processors!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineConfig":
        return settings_from_dict(cls, values, "engine")


def settings_from_dict(cls: type[T], values: dict[str, Any], where: str) -> T:
    """`cls(**values)`, refusing with a ValueError that names them any keys that are not fields of `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


def _require_choice(config: EngineConfig, *checks: tuple[str, tuple[str, ...]]) -> None:
    for name, choices in checks:
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")


def _require_positive(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _require_positive_number(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
