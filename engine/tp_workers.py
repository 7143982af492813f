"""Rank 0's side of tensor parallelism: the processes of ranks 1..N-1, from spawn to stop.

Workers are spawned (never forked: rank 0 may already run threads) as daemons, so they end with a rank 0 that
exits normally; each also watches rank 0 and exits when it dies. Rank 0 watches them in turn: a worker that
dies while the engine runs is reported, and the engine fails for good rather than hang.
"""
from __future__ import annotations

import logging
import multiprocessing.connection
from multiprocessing.process import BaseProcess
import signal
import threading
import time
from typing import Callable, Optional

import torch
import torch.multiprocessing

from engine.config import EngineConfig
from engine.distributed import TPGroup, create_store, join_group
from engine.loader import ModelSource
from engine.models.config import ModelConfig
from engine.step_inputs import StepInputs
from engine.worker import run_worker

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0


class TPWorkers:
    def __init__(self, config: EngineConfig, source: ModelSource, model_config: ModelConfig, max_position: int) -> None:
        """Start ranks 1..N-1; they load their shards while rank 0 loads its own."""
        self.size = config.tensor_parallel_size
        self.store = create_store(self.size)
        context = torch.multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=run_worker, args=(rank, config, source, model_config, max_position, self.store.port),
                name=f"pagedserve-tp-rank-{rank}", daemon=True,
            )
            for rank in range(1, self.size)
        ]
        self._stopping = threading.Event()
        # Reaping is not thread-safe: of two threads polling one dead child, the loser is told it still runs.
        self._reap_lock = threading.Lock()
        for process in self.processes:
            process.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def join_group(self, device: torch.device) -> TPGroup:
        """Rank 0's group, once every worker has reached the rendezvous; a worker that dies first is an error."""
        for rank, process in enumerate(self.processes, start=1):
            while not self.store.check([f"joining/{rank}"]):
                if not process.is_alive():
                    raise RuntimeError(self.failure("before joining the group"))
                time.sleep(0.05)
        return join_group(self.store, 0, self.size, device)

    def failure(self, when: str) -> str:
        """What went wrong with the workers, for an error raised `when` something failed."""
        with self._reap_lock:
            for process in self.processes:
                process.join(timeout=1.0)
            exited = [(rank, process) for rank, process in enumerate(self.processes, 1) if not process.is_alive()]
        dead = [_describe_exit(rank, process) for rank, process in exited]
        reasons = [self._stored_error(rank) for rank in range(1, self.size)]
        details = "; ".join(dead + [reason for reason in reasons if reason]) or "no worker exited"
        return f"tensor-parallel workers failed {when}: {details}"

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death(message)` from a watcher thread if a worker exits before `stop`."""

        def wait_for_exit() -> None:
            multiprocessing.connection.wait([process.sentinel for process in self.processes])
            if not self._stopping.is_set():
                on_death(self.failure("while the engine was running"))

        threading.Thread(target=wait_for_exit, name="tp-worker-watch", daemon=True).start()

    def stop(self, tp: Optional[TPGroup]) -> None:
        """Ask the workers to finish (when `tp` is given and all live), then kill any still running after a while."""
        self._stopping.set()
        with self._reap_lock:
            graceful = tp is not None and all(process.is_alive() for process in self.processes)
            if graceful:
                try:
                    StepInputs.send_stop(tp)
                except RuntimeError:
                    logger.warning("could not send the stop message to the tensor-parallel workers; killing them")
                    graceful = False
            for process in self.processes:
                process.join(timeout=STOP_TIMEOUT_S if graceful else 0)
                if process.is_alive():
                    process.kill()
                    process.join()

    def _stored_error(self, rank: int) -> Optional[str]:
        key = f"failed/{rank}"
        return f"rank {rank}: {self.store.get(key).decode()}" if self.store.check([key]) else None


def _describe_exit(rank: int, process: BaseProcess) -> str:
    code = process.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"rank {rank} (pid {process.pid}) {how}"
