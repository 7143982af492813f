"""AsyncLLMEngine: the engine core stepped by a background thread, streamed to asyncio consumers."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional, Union

from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError
from engine.host_memory import release_free_heap
from engine.llm_engine import LLMEngine, Prompt
from engine.lora.request import LoRARequest
from engine.metrics import EngineStats, StatLogger
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Request
from engine.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

Command = Union[Request, str]  # a request to add, or the id of a request to abort
HEAP_RELEASE_INTERVAL_S = 10.0


class _Stream:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.error: Optional[BaseException] = None
        self.held: Optional[RequestOutput] = None  # the step thread's tokens not yet due (stream_interval)
        self.sent_any = False

    def put(self, item: Any) -> None:
        _call_in_loop(self.loop, self.queue.put_nowait, item)

    def due(self, output: RequestOutput, interval: int) -> list[Any]:
        """Step thread: what to hand over now for `output`: nothing while fewer than `interval` new tokens are held
        back, else everything held merged into one delta. The first tokens and the end never wait; a request that
        failed hands over what was held, then its failure instead of its last output."""
        if self.request.failure is not None:
            held, self.held = self.held, None
            return [self.request.failure] if held is None else [held, self.request.failure]
        if self.held is None:
            self.held = output
        else:
            self.held.add(output)
        held_tokens = max((len(completion.token_ids) for completion in self.held.outputs), default=0)
        if not output.finished and self.sent_any and held_tokens < interval:
            return []
        merged, self.held, self.sent_any = self.held, None, True
        return [merged]

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


def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.debug("consumer event loop is closed; dropping an output")


def _put_all(items: list[tuple[_Stream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._commands: deque[Command] = deque()  # the step thread applies them in the order they were given
        self._wakeup = threading.Event()
        self._stopped = False
        self._num_running = 0  # requests in the running batch, published by the step thread
        self._stat_loggers: list[StatLogger] = []
        self._death_callbacks: list[Callable[[EngineDeadError], None]] = []
        self._fatal_error: Optional[EngineDeadError] = None
        self._stats_pending = False
        self._next_stats_time = 0.0
        self._heap_dirty = False
        self._next_heap_release = time.monotonic() + HEAP_RELEASE_INTERVAL_S
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

    def make_request(
        self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, timeout: Optional[float] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> Request:
        """Validate and tokenize with no state touched; ValueError names what is wrong. A request still unfinished
        `timeout` seconds from now is aborted, and its stream raises RequestTimeoutError. With `lora_request` it
        runs with that adapter (LLMEngine.make_request)."""
        return self.engine.make_request(request_id, prompt, params, timeout, lora_request)

    async def compile_grammar(self, structured_outputs: StructuredOutputsParams) -> None:
        """Compile a constraint into the engine's cache on a thread, so that a long compile holds up no other request
        of the event loop; make_request then finds it compiled. ValueError if it does not compile."""
        await asyncio.to_thread(self.engine.compile_grammar, structured_outputs)

    async def generate(
        self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, timeout: Optional[float] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield output deltas until the request finishes; leaving the loop early aborts it. Raises as `stream`."""
        async for output in self.stream(self.make_request(request_id, prompt, params, timeout, lora_request)):
            yield output

    def add_lora(self, lora_request: LoRARequest) -> None:
        """LLMEngine.add_lora: reads the adapter (blocking) in the calling thread; safe while the engine steps."""
        self.engine.add_lora(lora_request)

    def remove_lora(self, name: str) -> bool:
        return self.engine.remove_lora(name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Run a request from `make_request`, yielding its deltas; leaving the loop early aborts it.

        Before anything is queued it raises EngineDeadError once the engine has stopped, and EngineOverloadedError
        while `max_num_waiting` requests wait. A request that ends early raises after the deltas that came before:
        RequestTimeoutError past its timeout, RequestFailedError when its own sampling or token handling failed.
        """
        stream = self._open_stream(request)
        finished = False
        try:
            while not finished:
                output = await stream.next_output()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort at the start of the next step; the request's blocks are freed then."""
        self._commands.append(request_id)
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
        """Call `callback(error)` from the step thread if the engine fails for good (a tensor-parallel worker died,
        or a step raised anything but one request's own failure).

        By then every running request has been failed with that error, and new ones are refused with it.
        """
        self._death_callbacks.append(callback)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join()
        self._close(EngineDeadError("the engine was shut down"))

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise now what `stream` would raise for `num_requests` more requests (EngineDeadError,
        EngineOverloadedError), so that a caller can refuse a call before it starts answering it."""
        refusal = self._refusal(len(self._streams) - self._num_running + num_requests - 1)
        if refusal is not None:
            raise refusal

    def _open_stream(self, request: Request) -> _Stream:
        """Register the request's stream and queue the request, unless the engine refuses it."""
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        num_waiting = len(self._streams) - self._num_running
        stream = self._streams[request_id] = _Stream(request)
        refusal = self._refusal(num_waiting)  # after registering: a dying step thread stops first, then fails streams
        if refusal is not None:
            del self._streams[request_id]
            raise refusal
        self._commands.append(request)
        self._wakeup.set()
        return stream

    def _refusal(self, num_waiting: int) -> Optional[Exception]:
        """Why a new request cannot be taken, or None. `num_waiting` (open streams less the requests running) lags
        the step thread by up to one step: a request that started, finished or left since may count wrongly."""
        if self._stopped:
            return self._fatal_error or EngineDeadError("the engine is shut down")
        if num_waiting >= self.engine.config.max_num_waiting:
            return EngineOverloadedError(self.engine.config.max_num_waiting)
        return None

    def _run(self) -> None:
        """The step thread. An exception out of the loop leaves the engine's state untrusted, so the engine dies."""
        try:
            while not self._stopped:
                self._run_once()
        except EngineDeadError as error:
            self._die(error)
        except Exception as exc:
            logger.exception("the engine's step thread failed")
            error = EngineDeadError(f"the engine failed and was stopped, as its state cannot be trusted: {exc!r}")
            error.__cause__ = exc
            self._die(error)

    def _run_once(self) -> None:
        """Apply commands, then step; sleep only with no request in the engine (none waits for a deadline then)."""
        self._wakeup.clear()
        if self._fatal_error is not None:
            raise self._fatal_error
        self._apply_commands()
        self._num_running = self.engine.num_running_requests()
        busy = self.engine.has_unfinished_requests()
        if busy:
            self._step()
        if self._seconds_to_stats() == 0.0:
            self._log_stats()
        self._release_free_heap(busy)
        if not busy:
            self._wakeup.wait(self._seconds_to_stats())

    def _release_free_heap(self, busy: bool) -> None:
        """After steps ran: when the engine goes idle, and every HEAP_RELEASE_INTERVAL_S while it is busy."""
        now = time.monotonic()
        if self._heap_dirty and (not busy or now >= self._next_heap_release):
            release_free_heap()
            self._heap_dirty = busy
            self._next_heap_release = now + HEAP_RELEASE_INTERVAL_S

    def _step(self) -> None:
        self._stats_pending = True
        self._heap_dirty = True
        outputs = self.engine.step()
        self._num_running = self.engine.num_running_requests()  # before the outputs, which let consumers go on
        self._deliver(outputs)

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
        self._stats_pending = self._stats_pending or bool(self._commands)
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, Request):
                self._add(command)
            else:
                self._abort_now(command)

    def _add(self, request: Request) -> None:
        stream = self._streams.get(request.request_id)
        if stream is not None and stream.request is request:  # else its consumer left before it could be added
            self.engine.add_request(request)

    def _abort_now(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        if output is not None:
            self._deliver([output])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output that is due to its stream, with one wake-up per consumer event loop for the whole step;
        a request that ended early hands over its failure after its last tokens."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            due = [] if stream is None else stream.due(output, self.engine.config.stream_interval)
            if due:
                by_loop.setdefault(stream.loop, []).extend((stream, item) for item in due)
        for loop, items in by_loop.items():
            _call_in_loop(loop, _put_all, items)

    def _worker_died(self, error: EngineDeadError) -> None:
        self._fatal_error = error
        self._wakeup.set()

    def _die(self, error: EngineDeadError) -> None:
        logger.error("the engine has failed for good: %s", error)
        self._fatal_error = error
        self._stopped = True
        try:
            self._close(error)
        except Exception:
            logger.exception("freeing the failed engine's requests failed too")
        for callback in self._death_callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("death callback %r failed", callback)

    def _close(self, error: EngineDeadError) -> None:
        """The one way every request ends when the engine stops: each stream raises `error` (those of requests not
        yet added too), the engine's requests are aborted, which frees their blocks, and its ranks are stopped."""
        for stream in list(self._streams.values()):
            stream.put(error)
        try:
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
        finally:
            self.engine.shutdown()
