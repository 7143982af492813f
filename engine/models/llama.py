"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2): one forward over flattened tokens."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig

# checkpoint projection name -> (our stacked module, part index)
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], config.qkv_bias)
        self.o_proj = Linear(self.q_size, [config.hidden_size], config.o_proj_bias)
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.attn = Attention(config.num_heads, config.num_kv_heads, config.head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        query_key = qkv[:, : self.q_size + self.kv_size].view(hidden.shape[0], -1, self.attn.head_dim)
        rotated = self.rotary(positions, query_key)
        num_heads = self.attn.num_heads
        v = qkv[:, self.q_size + self.kv_size :]
        return self.o_proj(self.attn(rotated[:, :num_heads], rotated[:, num_heads:], v, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = Linear(config.intermediate_size, [config.hidden_size])
        self.act = SiluAndMul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, max_position)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, max_position) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the model; return the parameter names filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            module_name, _, kind = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            if proj in STACKED_PROJECTIONS:
                stacked, part = STACKED_PROJECTIONS[proj]
                self.get_submodule(f"{parent}.{stacked}").load(kind, tensor, part)
                loaded.add(f"{parent}.{stacked}.{kind}#{part}")
            elif name in params:
                _copy_checked(name, params[name], tensor)
                loaded.add(name)
            else:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        return loaded

    def expected_weights(self) -> set[str]:
        """The names `load_weights` must report for a complete checkpoint."""
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, Linear) and len(module.output_sizes) > 1:
                expected.update(f"{name}#{part}" for part in range(len(module.output_sizes)))
            else:
                expected.add(name)
        return expected


def _copy_checked(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"tensor {name!r}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
    param.copy_(tensor)
