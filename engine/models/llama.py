"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2): one forward over flattened tokens."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.distributed import TPGroup
from engine.kernel_backend import KernelBackend
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import ColumnParallelLinear, PackableMatmul, RowParallelLinear, check_shape
from engine.layers.norm import RMSNorm
from engine.layers.quantization import HoldsCodes, QuantizationPlan
from engine.layers.quantized import Int8Weight
from engine.layers.rotary import Angles, RotaryEmbedding, apply_rotary
from engine.layers.sharding import kv_heads, split_evenly
from engine.models.config import ModelConfig
from engine.native.decoder_stack import NativeDecoderStack

SHARDED_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabEmbedding)
# checkpoint projection name -> (our stacked module, part index)
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# checkpoint projection -> (our linear layer within a decoder layer, part index): where its LoRA applies
LORA_TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        head_dim = config.head_dim
        q_heads = split_evenly(config.num_heads, tp.rank, tp.size)
        kv = kv_heads(config.num_kv_heads, tp.rank, tp.size)
        self.q_size, self.kv_size = q_heads.size * head_dim, kv.size * head_dim
        kv_rows = kv.scaled(head_dim)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [q_heads.scaled(head_dim), kv_rows, kv_rows], config.qkv_bias
        )
        self.o_proj = RowParallelLinear(q_heads.scaled(head_dim), config.hidden_size, tp, config.o_proj_bias)
        self.attn = Attention(q_heads.size, kv.size, head_dim)
        self.apply_rotary = apply_rotary  # or the Triton kernel: LlamaForCausalLM.use_kernels

    def forward(self, angles: Angles, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        query_key = qkv[:, : self.q_size + self.kv_size].view(hidden.shape[0], -1, self.attn.head_dim)
        rotated = self.apply_rotary(query_key, angles)
        num_heads = self.attn.num_heads
        v = qkv[:, self.q_size + self.kv_size :]
        return self.o_proj(self.attn(rotated[:, :num_heads], rotated[:, num_heads:], v, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        columns = split_evenly(config.intermediate_size, tp.rank, tp.size)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [columns, columns])
        self.down_proj = RowParallelLinear(columns, config.hidden_size, tp)
        self.act = SiluAndMul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(
        self, angles: Angles, hidden: torch.Tensor, residual: torch.Tensor | None, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(angles, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.native_stack: Optional[NativeDecoderStack] = None  # LlamaForCausalLM.use_native_stack

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        angles = self.rotary(positions, hidden.dtype)
        if self.native_stack is not None:
            return self.native_stack(hidden, angles, metadata)
        for layer in self.layers:
            hidden, residual = layer(angles, hidden, residual, metadata)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """One tensor-parallel rank's shard of the model (the whole model when `tp.size` is 1)."""

    def __init__(self, config: ModelConfig, max_position: int, tp: TPGroup) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, tp)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits on rank 0; None on the other ranks."""
        return self.lm_head(hidden)

    def pack_weights(self, keep_plain_weights: bool = False, plan: QuantizationPlan = QuantizationPlan()) -> None:
        """Quantize the matmul weights as `plan` says and reorder the dense ones for the platform once loaded (see
        PackableMatmul), keeping the plain ones too when asked. An untied embedding stays dense."""
        embedding, tied = self.model.embed_tokens, self.config.tie_word_embeddings
        if tied:
            self.lm_head.staged, embedding.staged = embedding.staged, None
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.quantize(plan)
                module.pack(keep_plain_weight=keep_plain_weights)
        self.lm_head.quantize(plan, needs_rows=tied)
        embedding.quantize(QuantizationPlan())
        if tied:
            embedding.quantized = self.lm_head.quantized
        self.lm_head.pack(keep_plain_weight=keep_plain_weights or (tied and self.lm_head.quantized is None))

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of the weights as the matmuls read them, quantized or dense, and of the other parameters; bytes of
        the dense copies kept beside quantized weights)."""
        holders = [m for m in self.modules() if isinstance(m, HoldsCodes)]
        packed = {m: m.packed_weight for m in holders if getattr(m, "packed_weight", None) is not None}
        copies = [t for m in holders if m.quantized is not None for t in (m.weight, packed.get(m)) if t is not None]
        copy_ids = {id(t) for t in copies}
        dense = [t for t in [*self.parameters(), *packed.values()] if id(t) not in copy_ids]
        quantized = {id(m.quantized): m.quantized for m in holders if m.quantized is not None}
        return _nbytes(dense) + sum(q.nbytes() for q in quantized.values()), _nbytes(copies)

    def use_kernels(self, backend: KernelBackend) -> None:
        """Run attention, RMSNorm, rotary, SiLU·mul and one-row matmuls (dense and int8) with `backend`'s kernels."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.kernel = backend.paged_attention
            elif isinstance(module, RMSNorm):
                module.kernel = backend.rms_norm
            elif isinstance(module, LlamaAttention):
                module.apply_rotary = backend.apply_rotary
            elif isinstance(module, SiluAndMul):
                module.kernel = backend.silu_and_mul
            if isinstance(module, PackableMatmul):
                module.single_row_matmul = backend.single_row_matmul
            if isinstance(module, HoldsCodes) and isinstance(module.quantized, Int8Weight):
                module.quantized.single_row_matmul = backend.int8_single_row_matmul

    def use_native_stack(self) -> None:
        """Run every decoder layer of a step in one native call (CPU, one rank, after `pack_weights`)."""
        self.model.native_stack = NativeDecoderStack(self.model.layers, self.model.norm, self.config)

    def lora_target(self, layer: int, projection: str) -> tuple[PackableMatmul, int]:
        """The linear layer of decoder layer `layer` that checkpoint `projection` is part of, and the part."""
        module_name, part = LORA_TARGETS[projection]
        return self.model.layers[layer].get_submodule(module_name), part

    def lora_linears(self) -> list[PackableMatmul]:
        """Every linear layer that LoRA adapts."""
        names = sorted({module_name for module_name, _ in LORA_TARGETS.values()})
        return [layer.get_submodule(name) for layer in self.model.layers for name in names]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copy this rank's share of each checkpoint tensor (Hugging Face names) into the model.

        A tensor may be a torch tensor or a lazily read checkpoint slice: only the indexed rows are read.
        Returns the parameter names filled.
        """
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
            elif name not in params:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
            elif isinstance(module := self.get_submodule(module_name), SHARDED_LAYERS):
                module.load(kind, tensor)
                loaded.add(name)
            else:
                check_shape(name, tensor, tuple(params[name].shape))
                params[name].copy_(tensor[:])
                loaded.add(name)
        return loaded

    def expected_weights(self) -> set[str]:
        """The names `load_weights` must report for a complete checkpoint."""
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, ColumnParallelLinear) and len(module.parts) > 1:
                expected.update(f"{name}#{part}" for part in range(len(module.parts)))
            else:
                expected.add(name)
        return expected


def _nbytes(tensors: list[torch.Tensor]) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())
