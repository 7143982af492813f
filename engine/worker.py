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

import torch

from engine.config import EngineConfig
from engine.distributed import TPGroup, connect_store, join_group, rank_device
from engine.dtypes import resolve_dtype
from engine.loader import ModelSource, load_model
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
        dtype = resolve_dtype(config.dtype, device)
        logger.info("rank %d: weights and KV cache in %s on %s (dtype %s)", tp.rank, dtype, device, config.dtype)
        model = load_model(source, model_config, dtype, device, max_position, config.load_format, config.seed, tp)
        num_blocks = tp.min(_blocks_that_fit(config, model, device))
        self.runner = ModelRunner(model, model_config, config.block_size, num_blocks, config.seed, tp)


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


def _blocks_that_fit(config: EngineConfig, model: LlamaForCausalLM, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = ModelRunner.kv_block_bytes(model, config.block_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1 - config.gpu_memory_utilization)
    else:
        budget = config.kv_cache_memory_gb * 1024**3
    return max(int(budget // block_bytes), 1)
