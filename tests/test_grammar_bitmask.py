"""The grammar bitmask: the native kernel and the PyTorch reference ban exactly what xgrammar's own apply bans, in
the constrained rows only, for vocabularies that do not fill the last word; the batched fill equals each matcher's."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import xgrammar

from engine.structured_output import StructuredOutputsParams
from engine.structured_output.bitmask import GrammarBitmasks, GrammarMask, apply_token_bitmask
from engine.structured_output.grammar import GrammarCompiler

ROWS = [0, 3, 5, 6]


def random_bitmask(rows: int, vocab: int) -> torch.Tensor:
    """Random words, with one row all allowed and one all banned."""
    generator = torch.Generator().manual_seed(0)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32, generator=generator)
    bitmask[3], bitmask[5] = -1, 0
    return bitmask


def xgrammar_masked(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, vocab_size=logits.shape[1], indices=ROWS)
    return expected


@pytest.mark.parametrize("vocab", [49152, 1000, 33])
def test_the_reference_bans_what_xgrammar_bans(vocab: int) -> None:
    logits, bitmask = torch.randn(7, vocab), random_bitmask(7, vocab)
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, ROWS)
    assert torch.equal(ours, xgrammar_masked(logits, bitmask))
    assert torch.equal(ours[[1, 2, 4]], logits[[1, 2, 4]])


@pytest.mark.parametrize("vocab", [49152, 1000, 33])
def test_the_native_kernel_bans_what_xgrammar_bans(native_kernels: None, vocab: int) -> None:
    logits, bitmask = torch.randn(7, vocab), random_bitmask(7, vocab)
    ours = logits.clone()
    torch.ops.pagedserve.apply_token_bitmask_(ours, bitmask, torch.tensor(ROWS))
    assert torch.equal(ours, xgrammar_masked(logits, bitmask))


def test_the_native_kernel_refuses_a_short_bitmask_or_a_row_outside(native_kernels: None) -> None:
    logits = torch.randn(2, 100)
    with pytest.raises(RuntimeError, match="covers 64 tokens"):
        torch.ops.pagedserve.apply_token_bitmask_(logits, torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="row out of range"):
        torch.ops.pagedserve.apply_token_bitmask_(logits, torch.zeros(2, 4, dtype=torch.int32), torch.tensor([2]))


def test_the_batched_fill_equals_each_matchers_own(alone_llm: Any) -> None:
    engine = alone_llm.engine
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, [0])
    grammar = compiler.compile(StructuredOutputsParams(json={"type": "object"}))
    matchers = [grammar.matcher() for _ in range(3)]
    matchers[1].accept_string('{"key": "va')
    seqs = [_Constrained(matchers[0]), _Constrained(None), _Constrained(matchers[1]), _Constrained(matchers[2])]
    mask: GrammarMask = GrammarBitmasks(engine.model_config.vocab_size, 8).start(seqs).result()
    assert mask.rows == [0, 2, 3]
    for row, matcher in zip(mask.rows, matchers):
        own = xgrammar.allocate_token_bitmask(1, engine.model_config.vocab_size)
        matcher.fill_next_token_bitmask(own)
        assert torch.equal(mask.bitmask[row], own[0])
    assert not torch.equal(mask.bitmask[0], mask.bitmask[2])


class _Constrained:
    """What GrammarBitmasks reads of a sequence: its matcher."""

    def __init__(self, grammar: Any) -> None:
        self.grammar = grammar
