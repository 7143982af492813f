"""AsyncLLMEngine: the engine core stepped by a background thread, streamed to asyncio consumers."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.llm_engine import LLMEngine, Prompt
from engine.metrics import EngineStats, StatLogger
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Request

logger = logging.getLogger(__name__)


class _Stream:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.error: Optional[BaseException] = None

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            logger.debug("consumer event loop is closed; dropping an output")

    async def next_output(self) -> RequestOutput:
        """The next delta, merged with every delta already queued behind it: a consumer that falls behind the
        engine (a busy server streaming to many clients) gets fewer, larger chunks instead of a growing backlog."""
        if self.error is not None:
            raise self.error
        output = await self.queue.get()
        if isinstance(output, BaseException):
            raise output
        while not output.finished and not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, BaseException):
                self.error = item  # raised on the next call, after the tokens that came before it
                break
            output.add(item)
        return output


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._to_add: deque[Request] = deque()
        self._to_abort: deque[str] = deque()
        self._wakeup = threading.Event()
        self._stopped = False
        self._stat_loggers: list[StatLogger] = []
        self._death_callbacks: list[Callable[[EngineDeadError], None]] = []
        self._fatal_error: Optional[EngineDeadError] = None
        self._stats_pending = False
        self._next_stats_time = 0.0
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()
        engine.watch_workers(self._worker_died)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def make_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None) -> Request:
        """Validate and tokenize with no state touched; ValueError names what is wrong."""
        return self.engine.make_request(request_id, prompt, params)

    async def generate(
        self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield output deltas until the request finishes; leaving the loop early aborts it."""
        async for output in self.stream(self.make_request(request_id, prompt, params)):
            yield output

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Run a request from `make_request`, yielding its deltas; leaving the loop early aborts it."""
        request_id = request.request_id
        if self._stopped:
            raise self._fatal_error or EngineDeadError("the engine is shut down")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream()
        self._to_add.append(request)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                output = await stream.next_output()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort at the start of the next step; the request's blocks are freed then."""
        self._to_abort.append(request_id)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Call `stat_logger(stats, finished_requests)` from the step thread, at most once per `stats_interval_s`.

        It is called while requests run and once more after the engine goes idle, so the gauges end at rest.
        """
        self.engine.counters.keep_finished = True
        self._stat_loggers.append(stat_logger)

    def add_death_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call `callback(error)` from the step thread if the engine fails for good (a tensor-parallel worker died).

        By then every running request has been failed with that error, and new ones are refused with it.
        """
        self._death_callbacks.append(callback)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join()
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for stream in self._streams.values():
            stream.put(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()

    def _run(self) -> None:
        while not self._stopped:
            self._wakeup.clear()
            if self._fatal_error is not None:
                self._die(self._fatal_error)
                return
            self._apply_commands()
            busy = self.engine.has_unfinished_requests()
            if busy:
                self._step()
            if self._seconds_to_stats() == 0.0:
                self._log_stats()
            if not busy:
                self._wakeup.wait(self._seconds_to_stats())

    def _step(self) -> None:
        self._stats_pending = True
        try:
            outputs = self.engine.step()
        except EngineDeadError as exc:
            self._die(exc)
            return
        except Exception as exc:
            logger.exception("engine step failed; aborting its requests")
            self._fail_all(exc)
            return
        for output in outputs:
            self._deliver(output)

    def _seconds_to_stats(self) -> Optional[float]:
        """How long an idle loop may sleep before stats are due; None when nothing changed since the last call."""
        if not self._stats_pending or not self._stat_loggers:
            return None
        return max(self._next_stats_time - time.monotonic(), 0.0)

    def _log_stats(self) -> None:
        self._stats_pending = False
        self._next_stats_time = time.monotonic() + self.engine.config.stats_interval_s
        stats, finished = self.engine.stats(), self.engine.counters.take_finished()
        for stat_logger in self._stat_loggers:
            try:
                stat_logger(stats, finished)
            except Exception:
                logger.exception("stat logger %r failed", stat_logger)

    def _apply_commands(self) -> None:
        self._stats_pending = self._stats_pending or bool(self._to_add or self._to_abort)
        while self._to_add:
            request = self._to_add.popleft()
            if request.request_id in self._streams:
                self.engine.add_request(request)
        while self._to_abort:
            output = self.engine.abort(self._to_abort.popleft())
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.put(output)

    def _worker_died(self, error: EngineDeadError) -> None:
        self._fatal_error = error
        self._wakeup.set()

    def _die(self, error: EngineDeadError) -> None:
        logger.error("the engine has failed for good: %s", error)
        self._fatal_error = error
        self._stopped = True
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for stream in list(self._streams.values()):  # requests not yet added to the engine too
            stream.put(error)
        self.engine.shutdown()
        for callback in self._death_callbacks:
            callback(error)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(exc)
