"""A wide or long request that fills the KV cache gives way: later small requests are not starved."""
from __future__ import annotations

import pytest

from conftest import complete_step, make_request, random_prompts
from engine import LLM, LLMEngine, RequestOutput, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler

BLOCK_SIZE = 4
WIDE = SamplingParams(n=4, temperature=0.0, max_tokens=48, ignore_eos=True)
SMALL = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def small_cache_llm(tiny_model, llm_factory) -> LLM:
    """16 blocks of 4 tokens: the wide request alone needs more than 50."""
    return llm_factory(tiny_model("llama"), num_kv_blocks=16, block_size=BLOCK_SIZE)


def make_scheduler(num_blocks: int) -> Scheduler:
    manager = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False)
    return Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)


def completions(outputs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[completion.token_ids for completion in out.outputs] for out in outputs]


def step_until_idle(engine: LLMEngine) -> dict[str, int]:
    """Step until every request has finished; the number of steps each request took to finish."""
    finished_after: dict[str, int] = {}
    num_steps = 0
    while engine.has_unfinished_requests():
        num_steps += 1
        finished_after.update((out.request_id, num_steps) for out in engine.step() if out.finished)
    return finished_after


def test_the_victim_is_the_request_holding_the_most_blocks_even_if_already_scheduled() -> None:
    scheduler = make_scheduler(num_blocks=5)
    big, small, late = make_request(list(range(15))), make_request([1, 2, 3, 4]), make_request([5, 6, 7, 8])
    for request in (big, small, late):
        scheduler.add(request.seqs[0])
    complete_step(scheduler.block_manager, scheduler.schedule())  # big holds 4 blocks, small 1; late finds none free
    scheduled = scheduler.schedule()  # big's decode fits its last block, small's needs a new one
    assert [item.seq for item in scheduled] == small.seqs
    assert list(scheduler.waiting) == big.seqs + late.seqs
    assert scheduler.num_preemptions == 1


def test_a_sequence_of_the_biggest_request_preempts_itself_and_the_step_goes_on() -> None:
    scheduler = make_scheduler(num_blocks=5)
    big, small = make_request(list(range(16))), make_request([1, 2, 3])
    scheduler.add(big.seqs[0])
    scheduler.add(small.seqs[0])
    complete_step(scheduler.block_manager, scheduler.schedule())  # every block is used; big's next token needs a fifth
    scheduled = scheduler.schedule()
    assert [item.seq for item in scheduled] == small.seqs
    assert list(scheduler.waiting) == big.seqs


def test_a_tie_in_blocks_held_preempts_the_newer_request() -> None:
    scheduler = make_scheduler(num_blocks=4)
    older, newer = make_request(list(range(8))), make_request(list(range(6)))
    scheduler.add(older.seqs[0])
    scheduler.add(newer.seqs[0])
    complete_step(scheduler.block_manager, scheduler.schedule())  # 2 blocks each; older's next token needs a third
    assert [item.seq for item in scheduler.schedule()] == older.seqs
    assert list(scheduler.waiting) == newer.seqs


def test_a_small_request_is_not_starved_by_a_wide_one_that_fills_the_cache(small_cache_llm) -> None:
    engine = small_cache_llm.engine
    preemptions = engine.stats().num_preemptions
    engine.add_request(engine.make_request("wide", random_prompts(1, 8, 8, seed=40)[0], WIDE))
    for _ in range(2):
        engine.step()
    engine.add_request(engine.make_request("small", random_prompts(1, 6, 6, seed=41)[0], SMALL))
    finished_after = step_until_idle(engine)
    assert engine.stats().num_preemptions > preemptions, "the wide request must outgrow the cache"
    assert finished_after["small"] <= SMALL.max_tokens + 2, "the small request was preempted"
    assert finished_after["wide"] > 2 * finished_after["small"]


def test_every_request_matches_its_output_alone_under_heavy_preemption(small_cache_llm, alone_llm) -> None:
    prompts = random_prompts(6, 4, 12, seed=42)
    params = [WIDE, SMALL, SMALL, WIDE, SMALL, SMALL]
    expected = [alone_llm.generate([prompt], p)[0] for prompt, p in zip(prompts, params)]
    preemptions = small_cache_llm.engine.stats().num_preemptions
    outputs = small_cache_llm.generate(prompts, params)
    assert small_cache_llm.engine.stats().num_preemptions - preemptions >= 10
    assert completions(outputs) == completions(expected)
