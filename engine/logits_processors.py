"""The logits-processor interface: what changes a step's logits before penalties and sampling.

A processor sees the float32 logits of the step's sampled rows (one per sequence, the vocabulary wide) and the
sequences themselves, and writes into the logits in place. Built in: OpenAI's logit_bias. Plugins name their own in
EngineConfig.logits_processors ("package.module:ClassName"); each class is built with no arguments, and a request
passes it arguments through SamplingParams.extra_args.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Union

import torch

from engine.sequence import Sequence


class LogitsProcessor(ABC):
    # True if it may set logits to -inf: a step it applies to then checks that every row keeps a token to sample.
    may_ban_tokens = True

    @abstractmethod
    def applies_to(self, seq: Sequence) -> bool:
        """True if this processor may change the sequence's row: a step where it applies to no row skips it, and a
        greedy step where no processor applies takes the raw argmax."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Change `logits` [len(seqs), vocab] in place; rows it does not apply to must stay as they are."""


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: each listed token's logit plus its bias."""

    may_ban_tokens = False

    def applies_to(self, seq: Sequence) -> bool:
        return bool(seq.params.logit_bias)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, columns, biases = [], [], []
        for row, seq in enumerate(seqs):
            for token_id, bias in (seq.params.logit_bias or {}).items():
                rows.append(row)
                columns.append(token_id)
                biases.append(float(bias))
        device = logits.device
        index = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
        logits.index_put_(index, torch.tensor(biases, device=device, dtype=logits.dtype), accumulate=True)


ProcessorSpec = Union[str, type[LogitsProcessor], LogitsProcessor]


def load_logits_processors(specs: list[ProcessorSpec]) -> list[LogitsProcessor]:
    """logit_bias, then the plugins' processors in the order given: instances, classes or "module:ClassName"."""
    return [LogitBias(), *(_load(spec) for spec in specs)]


def _load(spec: ProcessorSpec) -> LogitsProcessor:
    if isinstance(spec, LogitsProcessor):
        return spec
    cls = _import_class(spec) if isinstance(spec, str) else spec
    if not isinstance(cls, type) or not issubclass(cls, LogitsProcessor):
        raise ValueError(f"logits_processors: {spec!r} is not a LogitsProcessor subclass")
    return cls()


def _import_class(path: str) -> object:
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"logits_processors: cannot import {path!r}: {exc}") from None
