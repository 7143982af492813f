"""One tensor-parallel rank: its model shard, its KV-cache shard and the runner over them.

Rank 0 builds its Worker inside the engine's process; ranks 1..N-1 each run `run_worker` in a process of
their own, spawned by rank 0 (see tp_workers.py).
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from typing import Optional

import torch

from engine.config import EngineConfig
from engine.distributed import TPGroup, connect_store, join_group, rank_device
from engine.dtypes import resolve_dtype
from engine.host_memory import limit_onednn_primitive_cache
from engine.kernel_backend import KernelBackend, select_backend
from engine.layers.quantization import QuantizationPlan
from engine.loader import ModelSource, load_model
from engine.lora.slots import LoRASlots
from engine.model_runner import ModelRunner
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


class Worker:
    def __init__(
        self, config: EngineConfig, source: ModelSource, model_config: ModelConfig, max_position: int, tp: TPGroup
    ) -> None:
        _set_threads(config)
        device = rank_device(config.device, tp.rank)
        if device.type == "cpu":
            limit_onednn_primitive_cache()
        dtype = resolve_dtype(config.dtype, device)
        logger.info("rank %d: weights and KV cache in %s on %s (dtype %s)", tp.rank, dtype, device, config.dtype)
        backend = select_backend(config.attention_backend, device, dtype)
        model = load_model(
            source, model_config, dtype, device, max_position, config.load_format, config.seed, tp,
            keep_plain_weights=backend.single_row_matmul is not None, quantization=quantization_plan(config),
        )
        model.use_kernels(backend)
        logger.info("rank %d: %s kernels (attention_backend %s)", tp.rank, backend.name, config.attention_backend)
        lora = _lora_slots(config, model, backend, tp.rank)
        if backend.name == "native" and tp.size == 1 and not config.enforce_eager:
            model.use_native_stack()
            logger.info("rank %d: decoder layers run as one native call per step", tp.rank)
        self.runner = ModelRunner(model, model_config, config, max_position, tp, lora)
        self.runner.set_kv_scales()
        self.runner.allocate_kv_cache(tp.min(_blocks_that_fit(config, self.runner, device)))
        if device.type == "cuda" and not config.enforce_eager:
            if backend.name == "triton":
                self.runner.capture_decode_graphs()
            else:
                logger.info("rank %d: no CUDA graphs: they need the Triton attention backend", tp.rank)


def _lora_slots(
    config: EngineConfig, model: LlamaForCausalLM, backend: KernelBackend, rank: int
) -> Optional[LoRASlots]:
    """The model's LoRA slots (before the native stack takes the layers' tensors); None without LoRA."""
    if not config.enable_lora:
        return None
    slots = LoRASlots(model, config.max_loras, config.max_lora_rank, backend.apply_lora)
    logger.info("rank %d: %d LoRA slots of rank %d take %.1f MiB", rank, config.max_loras, config.max_lora_rank,
                slots.nbytes() / 2**20)
    return slots


def quantization_plan(config: EngineConfig) -> QuantizationPlan:
    return QuantizationPlan(config.quantization, config.quantization_group_size, config.quantized_dense_rows)


def run_worker(
    rank: int, config: EngineConfig, source: ModelSource, model_config: ModelConfig, max_position: int, store_port: int
) -> None:
    """The body of a rank > 0 process: join rank 0, load this rank's shard, run steps until rank 0 stops."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [tp rank {rank}] %(levelname)s %(message)s")
    _exit_with_parent(rank)
    store = connect_store(store_port, config.tensor_parallel_size)
    try:
        store.set(f"joining/{rank}", "1")
        tp = join_group(store, rank, config.tensor_parallel_size, rank_device(config.device, rank))
        Worker(config, source, model_config, max_position, tp).runner.serve_steps()
    except Exception as exc:
        logger.error("tensor-parallel rank %d failed: %s: %s", rank, type(exc).__name__, exc)
        store.set(f"failed/{rank}", f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def _exit_with_parent(rank: int) -> None:
    """Exit as soon as rank 0's process is gone, even when it was killed and could not stop this one."""
    sentinel = multiprocessing.parent_process().sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        logger.warning("rank 0 exited; tensor-parallel rank %d exits too", rank)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _set_threads(config: EngineConfig) -> None:
    """Ranks sharing the CPU split its cores unless `num_threads` says otherwise."""
    threads = config.num_threads
    if threads is None and config.tensor_parallel_size > 1 and torch.device(config.device).type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // config.tensor_parallel_size)
    if threads:
        torch.set_num_threads(threads)


def _blocks_that_fit(config: EngineConfig, runner: ModelRunner, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = runner.kv_block_bytes()
    if device.type != "cuda":
        return max(int(config.kv_cache_memory_gb * 1024**3 // block_bytes), 1)
    total, peak = _profile_cuda_memory(runner, device)
    return cuda_kv_blocks(total, config.gpu_memory_utilization, peak, block_bytes)


def _profile_cuda_memory(runner: ModelRunner, device: torch.device) -> tuple[int, int]:
    """(the device's total bytes, the peak in use during the profiling forward, memory outside PyTorch included)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    runner.profile_forward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) + outside_torch
    logger.info(
        "rank %d: a %d-token forward peaks at %.2f GiB of the device's %.2f GiB",
        runner.tp.rank, runner.config.max_num_batched_tokens, peak / 1024**3, total / 1024**3,
    )
    torch.cuda.empty_cache()
    return total, peak


def cuda_kv_blocks(total_bytes: int, gpu_memory_utilization: float, peak_bytes: int, block_bytes: int) -> int:
    """Blocks = (total x gpu_memory_utilization - peak) / block bytes; ValueError when not even one fits."""
    budget = total_bytes * gpu_memory_utilization - peak_bytes
    if budget < block_bytes:
        raise ValueError(
            f"no room for the KV cache: gpu_memory_utilization {gpu_memory_utilization} of {total_bytes / 1024**3:.2f} "
            f"GiB leaves {budget / 1024**3:.2f} GiB after the model's peak of {peak_bytes / 1024**3:.2f} GiB; raise "
            "gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return int(budget // block_bytes)
