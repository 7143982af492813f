"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples."""
from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata
from engine.attention.metadata import cache_slots
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, block_size: int, num_kv_blocks: int, seed: int) -> None:
        self.model = model
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = model.lm_head.weight.device
        self.sampler = Sampler(config.vocab_size, config.eos_token_ids, seed)
        self._allocate_kv_cache(config, model.lm_head.weight.dtype)

    @staticmethod
    def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element_size = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[Sequence], SamplerOutput]:
        """Run one step; return the sequences that got a new token and what was sampled for them."""
        batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)
        input_ids, positions, metadata = self._prepare_inputs(batch)
        hidden = self.model(input_ids, positions, metadata)
        sample_rows = [i for i, item in enumerate(batch) if item.completes_prompt]
        to_sample = [batch[i].seq for i in sample_rows]
        if not to_sample:
            return [], SamplerOutput([], [])
        last_token_index = metadata.query_start_loc[1:][sample_rows] - 1
        logits = self.model.compute_logits(hidden[last_token_index])
        return to_sample, self.sampler(logits, to_sample)

    def _prepare_inputs(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        token_ids: list[int] = []
        for item in batch:
            start = item.seq.num_computed_tokens
            token_ids.extend(item.seq.token_ids[start : start + item.num_new_tokens])
        query_lens = torch.tensor([item.num_new_tokens for item in batch])
        starts = torch.tensor([item.seq.num_computed_tokens for item in batch])
        query_start_loc = torch.zeros(len(batch) + 1, dtype=torch.long)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        seq_index = torch.repeat_interleave(torch.arange(len(batch)), query_lens)
        positions = torch.arange(len(token_ids)) - query_start_loc[seq_index] + starts[seq_index]
        block_tables = _pad_block_tables([item.seq.block_table for item in batch])
        slots = cache_slots(block_tables, seq_index, positions, self.block_size)
        context_lens = starts + query_lens
        metadata = AttentionMetadata(
            slot_mapping=slots.to(self.device),
            block_tables=block_tables.to(self.device),
            context_lens=context_lens.to(self.device),
            query_start_loc=query_start_loc.to(self.device),
            num_decodes=sum(1 for item in batch if item.num_new_tokens == 1),
            block_size=self.block_size,
            query_start_loc_cpu=query_start_loc.tolist(),
            context_lens_cpu=context_lens.tolist(),
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return input_ids, positions.to(self.device), metadata

    def _allocate_kv_cache(self, config: ModelConfig, dtype: torch.dtype) -> None:
        shape = (self.num_kv_blocks, self.block_size, config.num_kv_heads, config.head_dim)
        for attention in self.model.attention_layers():
            attention.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attention.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens", self.num_kv_blocks, self.block_size)


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
