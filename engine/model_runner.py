"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

Every tensor-parallel rank has a runner over its model shard and KV-cache shard (same block layout on all
ranks). Rank 0 builds each step's inputs and sends them to the others, which only run the model.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from engine.attention.fp8 import cache_dtype, is_fp8
from engine.attention.metadata import cache_slots
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.distributed import TPGroup
from engine.kv_scales import CALIBRATION_TOKENS, calibration_token_ids, recording_kv_amax, scale_for
from engine.logits_processors import load_logits_processors
from engine.lora.cache import AdapterCache
from engine.lora.request import LoRARequest
from engine.lora.slots import LoRASlots
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.step_inputs import StepInputs
from engine.structured_output.bitmask import GrammarBitmasks, GrammarMask

logger = logging.getLogger(__name__)


@dataclass
class SampledStep:
    """What a step sampled: a token (and logprobs) for each of `seqs`, and the sequences whose sampling raised."""

    seqs: list[Sequence] = field(default_factory=list)
    sampled: SamplerOutput = field(default_factory=lambda: SamplerOutput([], []))
    failures: list[tuple[Sequence, Exception]] = field(default_factory=list)

    def add(self, seq: Sequence, sampled: SamplerOutput) -> None:
        """Append what was sampled for `seq` alone."""
        self.seqs.append(seq)
        self.sampled.token_ids += sampled.token_ids
        self.sampled.logprobs += sampled.logprobs


class ModelRunner:
    """Built without a KV cache: the worker sets an fp8 cache's scales (`set_kv_scales`), sizes the cache (on CUDA,
    after `profile_forward`), then calls `allocate_kv_cache` and, for CUDA graphs, `capture_decode_graphs`."""

    def __init__(
        self, model: LlamaForCausalLM, model_config: ModelConfig, config: EngineConfig, max_model_len: int,
        tp: Optional[TPGroup] = None, lora: Optional[LoRASlots] = None,
    ) -> None:
        self.model = model
        self.lora = lora
        self.config = config
        self.max_model_len = max_model_len
        self.tp = tp or TPGroup()
        self.block_size = config.block_size
        self.num_kv_blocks = 0
        self.device = model.lm_head.weight.device
        self.dtype = model.model.norm.weight.dtype
        self.kv_cache_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        self.sampler: Optional[Sampler] = None
        self.grammar_bitmasks: Optional[GrammarBitmasks] = None
        if self.tp.rank == 0:
            processors = tuple(load_logits_processors(config.logits_processors))
            self.sampler = Sampler(model_config.vocab_size, model_config.eos_token_ids, config.seed, self.device,
                                   processors)
            self.grammar_bitmasks = GrammarBitmasks(model_config.vocab_size, config.max_num_seqs)
        self.decode_graphs: Optional[DecodeGraphs] = None
        self.received_adapters: Optional[AdapterCache] = None  # ranks > 0: the adapters rank 0 put in slots
        if lora is not None and self.tp.rank > 0:
            capacity = config.max_cpu_loras or config.max_loras
            self.received_adapters = AdapterCache(model_config, config.max_lora_rank, capacity)

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes in this rank's cache."""
        attention = self.model.attention_layers()
        element_size = self.kv_cache_dtype.itemsize
        return 2 * len(attention) * self.block_size * attention[0].num_kv_heads * attention[0].head_dim * element_size

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> SampledStep:
        """Rank 0: run one step; what was sampled for the sequences that complete their known tokens."""
        batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)
        inputs = self._prepare_inputs(batch)
        if self.lora is not None:
            inputs.lora_slots, inputs.lora_loads = self._assign_lora_slots(batch)
        if self.tp.size > 1:
            inputs.send(self.tp)
        seqs = [item.seq for item in batch if item.completes_prompt]
        filling = self.grammar_bitmasks.start(seqs)  # while the model runs
        try:
            logits = self.run(inputs)
        finally:
            grammar_mask = filling and filling.result()  # the matchers are free again before anything else moves
        if logits is None:
            return SampledStep()
        return self._sample(logits, seqs, grammar_mask)

    def _assign_lora_slots(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, list[tuple[int, LoRARequest]]]:
        """Each sequence's LoRA slot, loading adapters into slots as needed; and the loads, for the other ranks."""
        slots, loads = self.lora.assign([item.seq.request.lora for item in batch])
        return torch.tensor(slots, dtype=torch.long), [(slot, adapter.request) for slot, adapter in loads]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], grammar_mask: Optional[GrammarMask]) -> SampledStep:
        """The whole batch at once; only if that raises, each sequence alone from the same logits, so that a
        sequence whose parameters break the sampler fails by itself."""
        try:
            return SampledStep(seqs, self.sampler(logits, seqs, grammar_mask))
        except Exception:
            logger.exception("sampling a batch of %d sequences failed; sampling each alone", len(seqs))
        return self._sample_each(logits, seqs, grammar_mask)

    def _sample_each(
        self, logits: torch.Tensor, seqs: list[Sequence], grammar_mask: Optional[GrammarMask]
    ) -> SampledStep:
        step = SampledStep()
        for row, seq in enumerate(seqs):
            try:
                step.add(seq, self.sampler(logits[row : row + 1], [seq], grammar_mask and grammar_mask.row(row)))
            except Exception as exc:
                step.failures.append((seq, exc))
        return step

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> Optional[torch.Tensor]:
        """Every rank: the model over one step's tokens; logits of the sampled rows on rank 0, else None."""
        with self._lora_running(inputs):
            hidden = self._forward(inputs)
        if not len(inputs.sample_indices):
            return None
        return self.model.compute_logits(hidden[inputs.sample_indices.to(self.device)])

    def _lora_running(self, inputs: StepInputs) -> AbstractContextManager[None]:
        return nullcontext() if self.lora is None else self.lora.running(inputs.token_lora_slots())

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states of the step's tokens: a CUDA graph replay for decode-only steps that fit one and use no
        LoRA adapter, else eager."""
        uses_lora = self.lora is not None and self.lora.context.step is not None
        size = self.decode_graphs.batch_size_for(inputs) if self.decode_graphs and not uses_lora else None
        if size is not None:
            return self.decode_graphs.replay(inputs, size)
        metadata = inputs.metadata(self.block_size, self.device)
        return self.model(inputs.input_ids.to(self.device), inputs.positions.to(self.device), metadata)

    def serve_steps(self) -> None:
        """Ranks > 0: run each step rank 0 sends until it stops."""
        while (inputs := StepInputs.receive(self.tp)) is not None:
            for slot, lora in inputs.lora_loads:
                self.lora.load(slot, self.received_adapters.get(lora))
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

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._set_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks
        gib = num_blocks * self.kv_block_bytes() / 1024**3
        logger.info(
            "KV cache (rank %d): %d blocks of %d tokens (%.2f GiB, %s): %.1f requests of max_model_len %d at once",
            self.tp.rank, num_blocks, self.block_size, gib, self._describe_kv_cache_dtype(),
            num_blocks * self.block_size / self.max_model_len, self.max_model_len,
        )

    def _describe_kv_cache_dtype(self) -> str:
        model_dtype = str(self.dtype).removeprefix("torch.")
        if self.kv_cache_dtype == self.dtype:
            return model_dtype
        ratio = self.dtype.itemsize / self.kv_cache_dtype.itemsize
        return f"{self.config.kv_cache_dtype}, {ratio:.1f}x the tokens of {model_dtype}"

    @torch.inference_mode()
    def set_kv_scales(self) -> None:
        """An fp8 cache's scales [1] on every attention layer: kv_cache_scale, or measured (engine.kv_scales)."""
        if not is_fp8(self.kv_cache_dtype):
            return
        layers = self.model.attention_layers()
        fixed = self.config.kv_cache_scale
        scales = [(fixed, fixed)] * len(layers) if fixed is not None else self._measured_kv_scales()
        for layer, (k_scale, v_scale) in zip(layers, scales):
            layer.k_scale = torch.tensor([k_scale], dtype=torch.float32, device=self.device)
            layer.v_scale = torch.tensor([v_scale], dtype=torch.float32, device=self.device)

    def _measured_kv_scales(self) -> list[tuple[float, float]]:
        token_ids = calibration_token_ids(self.model.config.vocab_size, min(CALIBRATION_TOKENS, self.max_model_len))
        inputs = replace(profile_step_inputs(len(token_ids), len(token_ids), 1, self.block_size), input_ids=token_ids)
        self._set_kv_cache(1, self.dtype)
        with recording_kv_amax(self.model) as amax:
            self.run(inputs)
        self._set_kv_cache(0)
        scales = [(scale_for(k, self.kv_cache_dtype), scale_for(v, self.kv_cache_dtype)) for k, v in amax]
        logger.info("rank %d: fp8 KV cache scales measured over %d tokens (k, v per layer): %s", self.tp.rank,
                    len(token_ids), ", ".join(f"({k:.3g}, {v:.3g})" for k, v in scales))
        return scales

    def capture_decode_graphs(self) -> None:
        self.decode_graphs = DecodeGraphs(
            self.model, self.config.max_num_seqs, self.max_model_len, self.block_size, self.device
        )
        self.decode_graphs.capture()

    @torch.inference_mode()
    def profile_forward(self) -> None:
        """The largest step the scheduler can make (max_num_batched_tokens of prefill, logits for up to max_num_seqs
        rows) over a throwaway one-block cache: its peak memory is what the KV cache must leave room for."""
        self._set_kv_cache(1)
        tokens, seqs = self.config.max_num_batched_tokens, self.config.max_num_seqs
        self.run(profile_step_inputs(tokens, self.max_model_len, seqs, self.block_size))
        self._set_kv_cache(0)

    def _set_kv_cache(self, num_blocks: int, dtype: Optional[torch.dtype] = None) -> None:
        """Caches of `num_blocks` on every attention layer, in `dtype` (default: the KV cache's)."""
        dtype = dtype or self.kv_cache_dtype
        for attention in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attention.num_kv_heads, attention.head_dim)
            attention.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attention.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)


def profile_step_inputs(num_tokens: int, max_model_len: int, max_num_seqs: int, block_size: int) -> StepInputs:
    """Prefills of max_model_len tokens (the last one shorter) totalling num_tokens, all of them in block 0 of the
    cache (over and over); the last min(num_tokens, max_num_seqs) rows are sampled."""
    query_lens = torch.tensor([max_model_len] * (num_tokens // max_model_len) + [num_tokens % max_model_len])
    query_lens = query_lens[query_lens > 0]
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.long)
    torch.cumsum(query_lens, 0, out=query_start_loc[1:])
    seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens)
    positions = torch.arange(num_tokens) - query_start_loc[seq_index]
    return StepInputs(
        input_ids=torch.zeros(num_tokens, dtype=torch.long),
        positions=positions,
        slot_mapping=positions % block_size,
        block_tables=torch.zeros(len(query_lens), -(-int(query_lens.max()) // block_size), dtype=torch.long),
        context_lens=query_lens,
        query_start_loc=query_start_loc,
        sample_indices=torch.arange(num_tokens)[-max_num_seqs:],
        num_decodes=0,
    )


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
