"""A full KV block becomes a prefix-cache hit only after the step that computed it has run."""
from __future__ import annotations

from typing import NoReturn

import pytest

from conftest import complete_step, make_request, make_seq, random_prompts
from engine import LLM, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import ScheduledSeq, Scheduler

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BLOCK_SIZE = 8
PROMPT_LEN = 40
PROMPT_HIT_BLOCKS = 4  # the full blocks of its first 39 tokens: a hit always leaves the last token to compute


@pytest.fixture(scope="module")
def llm(tiny_model, llm_factory) -> LLM:
    return llm_factory(tiny_model("llama"), num_kv_blocks=64, block_size=BLOCK_SIZE)


def fail_next_execute(monkeypatch: pytest.MonkeyPatch, engine: LLMEngine) -> None:
    """Make the engine's next model step raise, as a failing kernel would; the steps after it run normally."""
    original = engine.runner.execute

    def fail_once(scheduled: list[ScheduledSeq]) -> NoReturn:
        monkeypatch.setattr(engine.runner, "execute", original)
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine.runner, "execute", fail_once)


def test_allocated_blocks_are_hittable_only_once_committed() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq, probe = make_seq(list(range(9))), make_seq(list(range(9)))
    assert manager.allocate(seq, seq.num_tokens)
    assert manager.find_cached_prefix(probe) == []
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)
    assert manager.find_cached_prefix(probe) == seq.block_table[:2]
    manager.free(seq)


def test_blocks_freed_without_a_commit_never_become_hits() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(9)))
    assert manager.allocate(seq, seq.num_tokens)
    manager.free(seq)
    assert manager.find_cached_prefix(make_seq(list(range(9)))) == []
    assert manager.stats().num_cached_blocks == 0


def test_a_chunk_commits_only_the_blocks_it_filled() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq, probe = make_seq(list(range(13))), make_seq(list(range(13)))
    assert manager.allocate(seq, 6)
    seq.num_computed_tokens = 6
    manager.cache_computed_blocks(seq)
    assert manager.find_cached_prefix(probe) == seq.block_table[:1]
    assert manager.allocate(seq, 7)
    seq.num_computed_tokens = 13
    manager.cache_computed_blocks(seq)
    assert manager.find_cached_prefix(probe) == seq.block_table[:3]
    manager.free(seq)


def test_a_recomputed_sequence_commits_the_blocks_after_its_cached_prefix() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(6)))
    assert manager.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)
    seq.token_ids += [60, 61, 62, 63, 64]  # decoded tokens, then preempted: recomputed from its cached prefix
    manager.free(seq)
    seq.reset_for_recompute()
    prefix = manager.find_cached_prefix(seq)
    assert manager.allocate(seq, seq.num_tokens - 4, prefix) and seq.num_hashed_blocks == 1
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)
    assert seq.num_hashed_blocks == 2
    assert manager.find_cached_prefix(make_seq(seq.token_ids + [99])) == seq.block_table[:2]
    manager.free(seq)


def test_siblings_join_together_once_one_has_computed_their_prompt_blocks() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=16, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    request = make_request(list(range(10)), n=4)
    for seq in request.seqs:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [item.seq for item in first] == request.seqs[:1]
    complete_step(scheduler.block_manager, first)
    second = [(item.seq, item.num_new_tokens) for item in scheduler.schedule()]
    assert second == [(request.seqs[0], 1)] + [(seq, 2) for seq in request.seqs[1:]]  # 8 prompt tokens are hits
    assert all(seq.block_table[:2] == request.seqs[0].block_table[:2] for seq in request.seqs)


def test_a_failed_step_leaves_the_blocks_it_was_writing_unhittable(llm, monkeypatch) -> None:
    engine = llm.engine
    prompt = random_prompts(1, PROMPT_LEN, PROMPT_LEN, seed=30)[0]
    engine.add_request(engine.make_request("failed", prompt, GREEDY))
    fail_next_execute(monkeypatch, engine)
    try:
        with pytest.raises(RuntimeError, match="injected step failure"):
            engine.step()
        assert engine.block_manager.find_cached_prefix(make_seq(prompt)) == []
    finally:
        engine.abort("failed")
    assert engine.block_manager.find_cached_prefix(make_seq(prompt)) == []


def test_the_step_that_computes_a_prompt_makes_its_full_blocks_hits(llm, monkeypatch) -> None:
    engine = llm.engine
    request = engine.make_request("retried", random_prompts(1, PROMPT_LEN, PROMPT_LEN, seed=31)[0], GREEDY)
    engine.add_request(request)
    fail_next_execute(monkeypatch, engine)
    with pytest.raises(RuntimeError, match="injected step failure"):
        engine.step()
    engine.step()
    try:
        hits = engine.block_manager.find_cached_prefix(make_seq(request.prompt_token_ids))
        assert hits == request.seqs[0].block_table[:PROMPT_HIT_BLOCKS]
    finally:
        engine.abort("retried")


def test_greedy_output_with_a_prefix_hit_equals_output_without(llm) -> None:
    prompt = random_prompts(1, PROMPT_LEN, PROMPT_LEN, seed=32)[0]
    [cold] = llm.generate([prompt], GREEDY)
    [warm] = llm.generate([prompt], GREEDY)
    assert (cold.num_cached_tokens, warm.num_cached_tokens) == (0, PROMPT_HIT_BLOCKS * BLOCK_SIZE)
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
