"""What a request names to run with a LoRA adapter instead of the base model alone."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """`name`: the adapter's served name (OpenAI `model`); `path`: a PEFT folder (adapter_config.json and
    adapter_model.safetensors)."""

    name: str
    path: str
