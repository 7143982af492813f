"""CUDA graphs of the model's forward over decode-only steps, one per batch-size bucket.

Each graph reads static input buffers. A step of n decodes replays the smallest bucket that holds n: its rows
past n are padding, with slot -1 (the cache write skips it) and context length 0 (attention gives zeros), so
they touch no sequence's cache. The attention kernels' split count is fixed at capture from max_model_len.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Optional

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 below max_num_seqs, and max_num_seqs itself."""
    return sorted({size for size in (1, 2, 4) if size < max_num_seqs} | set(range(8, max_num_seqs, 8)) | {max_num_seqs})


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = block_size
        largest = self.batch_sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(largest, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, -(-max_model_len // block_size), dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, so that the smaller ones reuse its memory pool."""
        started = time.perf_counter()
        pool = None
        for size in reversed(self.batch_sizes):
            self.forward(size)  # compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs for decode batches of up to %d sequences in %.1f s",
            len(self.graphs), self.batch_sizes[-1], time.perf_counter() - started,
        )

    def batch_size_for(self, inputs: StepInputs) -> Optional[int]:
        """The smallest captured bucket that holds this step, or None when it is not decode-only or too large."""
        num_tokens = len(inputs.input_ids)
        if inputs.num_decodes != num_tokens or num_tokens > self.batch_sizes[-1]:
            return None
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_tokens)]

    def replay(self, inputs: StepInputs, size: int) -> torch.Tensor:
        """The model's hidden states of this decode-only step's tokens."""
        self.fill(inputs, size)
        self.graphs[size].replay()
        return self.outputs[size][: len(inputs.input_ids)]

    def fill(self, inputs: StepInputs, size: int) -> None:
        """Copy the step into the static buffers and mark rows n..size-1 as padding."""
        num_seqs = len(inputs.input_ids)
        for buffer, values, padding in (
            (self.input_ids, inputs.input_ids, 0),
            (self.positions, inputs.positions, 0),
            (self.slot_mapping, inputs.slot_mapping, -1),
            (self.context_lens, inputs.context_lens, 0),
        ):
            buffer[:num_seqs].copy_(values, non_blocking=True)
            buffer[num_seqs:size].fill_(padding)
        self.block_tables[:num_seqs, : inputs.block_tables.shape[1]].copy_(inputs.block_tables, non_blocking=True)

    def metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            num_decodes=size,
            block_size=self.block_size,
            query_start_loc_cpu=list(range(size + 1)),
            context_lens_cpu=[self.max_model_len] * size,
            max_decode_context_len=self.max_model_len,
        )

    def forward(self, size: int) -> torch.Tensor:
        """The model over the first `size` rows of the static buffers: what the graph of that bucket captures."""
        return self.model(self.input_ids[:size], self.positions[:size], self.metadata(size))
