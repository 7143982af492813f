"""The shape of a Llama-family model, read from a Hugging Face `config.json`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: Optional[int] = None

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str) -> "ModelConfig":
        architecture = _architecture(hf, source)
        missing = [name for name in _REQUIRED if name not in hf]
        if missing:
            raise ValueError(f"{source}: config is missing required field(s) {missing}")
        num_heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope['rope_type']!r} is not supported; use {SUPPORTED_ROPE_TYPES}")
        eos = hf.get("eos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=architecture == "qwen2" or hf.get("attention_bias", False),
            o_proj_bias=architecture != "qwen2" and hf.get("attention_bias", False),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        )


def _architecture(hf: dict[str, Any], source: str) -> str:
    names = hf.get("architectures") or []
    if not names:
        raise ValueError(f"{source}: config has no 'architectures' field; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if names[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {names[0]!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return SUPPORTED_ARCHITECTURES[names[0]]
