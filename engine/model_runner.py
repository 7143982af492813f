"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

Every tensor-parallel rank has a runner over its model shard and KV-cache shard (same block layout on all
ranks). Rank 0 builds each step's inputs and sends them to the others, which only run the model.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from engine.attention.metadata import cache_slots
from engine.distributed import TPGroup
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, config: ModelConfig, block_size: int, num_kv_blocks: int, seed: int,
        tp: Optional[TPGroup] = None,
    ) -> None:
        self.model = model
        self.tp = tp or TPGroup()
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = model.lm_head.weight.device
        self.sampler = Sampler(config.vocab_size, config.eos_token_ids, seed) if self.tp.rank == 0 else None
        self._allocate_kv_cache()

    @staticmethod
    def kv_block_bytes(model: LlamaForCausalLM, block_size: int) -> int:
        """Bytes one KV block takes in this rank's cache."""
        attention = model.attention_layers()
        element_size = model.lm_head.weight.element_size()
        return 2 * len(attention) * block_size * attention[0].num_kv_heads * attention[0].head_dim * element_size

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[Sequence], SamplerOutput]:
        """Rank 0: run one step; return the sequences that got a new token and what was sampled for them."""
        batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)
        inputs = self._prepare_inputs(batch)
        if self.tp.size > 1:
            inputs.send(self.tp)
        logits = self.run(inputs)
        if logits is None:
            return [], SamplerOutput([], [])
        to_sample = [item.seq for item in batch if item.completes_prompt]
        return to_sample, self.sampler(logits, to_sample)

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> Optional[torch.Tensor]:
        """Every rank: the model over one step's tokens; logits of the sampled rows on rank 0, else None."""
        metadata = inputs.metadata(self.block_size, self.device)
        hidden = self.model(inputs.input_ids.to(self.device), inputs.positions.to(self.device), metadata)
        if not len(inputs.sample_indices):
            return None
        return self.model.compute_logits(hidden[inputs.sample_indices.to(self.device)])

    def serve_steps(self) -> None:
        """Ranks > 0: run each step rank 0 sends until it stops."""
        while (inputs := StepInputs.receive(self.tp)) is not None:
            self.run(inputs)

    def _prepare_inputs(self, batch: list[ScheduledSeq]) -> StepInputs:
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
        sample_rows = [i for i, item in enumerate(batch) if item.completes_prompt]
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=positions,
            slot_mapping=cache_slots(block_tables, seq_index, positions, self.block_size),
            block_tables=block_tables,
            context_lens=starts + query_lens,
            query_start_loc=query_start_loc,
            sample_indices=query_start_loc[1:][sample_rows] - 1,
            num_decodes=sum(1 for item in batch if item.num_new_tokens == 1),
        )

    def _allocate_kv_cache(self) -> None:
        for attention in self.model.attention_layers():
            shape = (self.num_kv_blocks, self.block_size, attention.num_kv_heads, attention.head_dim)
            dtype = self.model.lm_head.weight.dtype
            attention.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attention.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        logger.info("KV cache (rank %d): %d blocks of %d tokens", self.tp.rank, self.num_kv_blocks, self.block_size)


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
