"""Errors that outlive a single request."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine is shut down or has failed for good (a tensor-parallel worker died); no request can run."""
