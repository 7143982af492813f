"""GGUF files: model shape from the metadata, tensors renamed to Hugging Face names. Q4_0, Q4_1 and Q8_0 matrices
come out as GroupCodes, their codes as stored (the layers decide whether to keep them); other quantized formats are
dequantized, with a warning that names the format."""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

from engine.layers.quantized import GroupCodes
from engine.models.config import ModelConfig

logger = logging.getLogger(__name__)
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
LLAMA_ROTARY_LAYOUT = ("llama", "mistral")  # q/k rows stored interleaved by llama.cpp's converter
DENSE_TYPES = ("F32", "F16", "BF16")
Weight = Union[torch.Tensor, GroupCodes]
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFModel:
    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.fields = {name: _field_value(field) for name, field in self.reader.fields.items()}
        self.arch = self.fields.get("general.architecture")
        if self.arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValueError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; supported: {SUPPORTED_GGUF_ARCHITECTURES}"
            )

    def model_config(self) -> ModelConfig:
        tensor_names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in tensor_names:
            raise ValueError(f"{self.path}: GGUF rope frequency factors (llama3 scaling) are not supported")
        num_heads = self._required("attention.head_count")
        hidden_size = self._required("embedding_length")
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=self.arch,
            vocab_size=self._vocab_size(),
            hidden_size=hidden_size,
            intermediate_size=self._required("feed_forward_length"),
            num_layers=self._required("block_count"),
            num_heads=num_heads,
            num_kv_heads=self.fields.get(f"{self.arch}.attention.head_count_kv", num_heads),
            head_dim=self.fields.get(f"{self.arch}.attention.key_length", hidden_size // num_heads),
            rms_norm_eps=self._required("attention.layer_norm_rms_epsilon"),
            rope_theta=self.fields.get(f"{self.arch}.rope.freq_base", 10000.0),
            rope_scaling=self._rope_scaling(),
            max_position_embeddings=self._required("context_length"),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias=self.arch == "qwen2",
            eos_token_ids=[eos] if eos is not None else [],
        )

    def weights(self, config: ModelConfig) -> Iterator[tuple[str, Weight]]:
        warned: set[str] = set()
        for tensor in self.reader.tensors:
            name = _hf_name(tensor.name)
            if name is None:
                raise ValueError(f"{self.path}: unexpected tensor {tensor.name!r}")
            values = _block_codes(tensor)
            if values is None:
                values = self._dequantized(tensor, warned)
            yield name, self._unpermute(name, values, config)

    def _dequantized(self, tensor: Any, warned: set[str]) -> torch.Tensor:
        from gguf.quants import dequantize

        kind = tensor.tensor_type.name
        if kind not in DENSE_TYPES and kind not in warned:
            warned.add(kind)
            logger.warning("%s: %s tensors are dequantized at load (kept as stored: Q4_0, Q4_1, Q8_0)", self.path, kind)
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
        return values.reshape([int(d) for d in reversed(tensor.shape)])

    def _unpermute(self, name: str, values: Weight, config: ModelConfig) -> Weight:
        """llama.cpp stores llama q/k rows interleaved for its rotary layout; restore the half-split order."""
        if self.arch not in LLAMA_ROTARY_LAYOUT or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return values
        num_heads = config.num_heads if "q_proj" in name else config.num_kv_heads

        def unpermute(rows: torch.Tensor) -> torch.Tensor:
            shape = rows.shape
            return rows.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

        return values.map(unpermute) if isinstance(values, GroupCodes) else unpermute(values)

    def _required(self, key: str) -> Any:
        full_key = f"{self.arch}.{key}"
        if full_key not in self.fields:
            raise ValueError(f"{self.path}: GGUF metadata is missing {full_key!r}")
        return self.fields[full_key]

    def _vocab_size(self) -> int:
        if f"{self.arch}.vocab_size" in self.fields:
            return self.fields[f"{self.arch}.vocab_size"]
        return len(self.reader.fields["tokenizer.ggml.tokens"].data)

    def _rope_scaling(self) -> dict[str, Any]:
        if self.fields.get(f"{self.arch}.rope.scaling.type") == "linear":
            return {"rope_type": "linear", "factor": self.fields[f"{self.arch}.rope.scaling.factor"]}
        return {"rope_type": "default"}


@functools.lru_cache(maxsize=4)
def open_gguf(path: Path) -> GGUFModel:
    """The file's GGUFModel, parsed once per process (its metadata, a tokenizer's vocabulary among it, takes
    seconds to read; the tensors stay memory-mapped)."""
    return GGUFModel(path)


def _block_codes(tensor: Any) -> GroupCodes | None:
    """A Q4_0, Q4_1 or Q8_0 matrix's codes, scales and zeros as stored, else None. Each block of 32 values is a
    float16 scale d (Q4_1: then a float16 minimum m) and its codes: Q8_0 int8 q with value d*q; Q4_0/Q4_1 16 bytes,
    value j in the low nibble of byte j and value j + 16 in the high one, standing for d*(q - 8) and d*q + m."""
    kind = tensor.tensor_type.name
    if kind not in ("Q4_0", "Q4_1", "Q8_0") or len(tensor.shape) != 2:
        return None
    rows = int(tensor.shape[1])
    blocks = torch.from_numpy(np.array(tensor.data)).view(rows, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    if kind == "Q8_0":
        return GroupCodes(8, blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d)
    nibbles = blocks[..., -16:]
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(rows, -1)
    if kind == "Q4_0":
        return GroupCodes(4, codes, d, torch.zeros_like(d))
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    return GroupCodes(4, codes, d, m + 8 * d)


def _field_value(field: Any) -> Any:
    if len(field.types) != 1:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def _hf_name(gguf_name: str) -> str | None:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    return None
