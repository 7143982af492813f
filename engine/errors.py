"""Errors the engine raises to its callers, beyond the ValueError that names bad input."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine is shut down or has failed for good (a tensor-parallel worker died, a step raised unexpectedly);
    no request can run."""


class EngineOverloadedError(RuntimeError):
    """Refused before anything was queued: `max_num_waiting` requests already wait to run. Retry later."""

    def __init__(self, max_num_waiting: int) -> None:
        super().__init__(
            f"the engine is overloaded: {max_num_waiting} requests already wait to run "
            f"(max_num_waiting={max_num_waiting}); retry later"
        )
        self.max_num_waiting = max_num_waiting


class RequestFailedError(RuntimeError):
    """This request failed on its own (its sampling or the handling of its sampled token raised); the engine and
    the other requests go on."""


class RequestTimeoutError(TimeoutError):
    """The request did not finish within its timeout: it was aborted and its KV blocks freed."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request did not finish within its timeout of {timeout:g} s")
        self.timeout = timeout
