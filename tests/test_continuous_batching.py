"""Batched generation (chunked prefill, prefix caching, preemption) gives what each prompt gives alone."""
from __future__ import annotations

from conftest import random_prompts, token_ids
from engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_mixed_batch_with_chunked_prefill_equals_each_alone(tiny_model, llm_factory, alone_llm) -> None:
    prompts = random_prompts(24, 3, 150)
    expected = [token_ids(alone_llm.generate([p], GREEDY))[0] for p in prompts]
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512, max_num_batched_tokens=64, enable_prefix_caching=False)
    steps = []
    original_step = llm.engine.step

    def recording_step():
        outputs = original_step()
        steps.append(llm.engine.scheduler.running.copy())
        return outputs

    llm.engine.step = recording_step
    try:
        assert token_ids(llm.generate(prompts, GREEDY)) == expected
    finally:
        del llm.engine.step
    assert max(len(p) for p in prompts) > 64, "the longest prompt must need several chunks"
    assert max(len(running) for running in steps) > 1


def test_chunk_boundaries_mix_prefill_and_decode_in_one_step(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512, max_num_batched_tokens=32, enable_prefix_caching=False)
    engine = llm.engine
    short, long = random_prompts(2, 5, 5, seed=1)[0], random_prompts(1, 100, 100, seed=2)[0]
    engine.add_request(engine.make_request("short", short, GREEDY))
    engine.step()
    engine.add_request(engine.make_request("long", long, GREEDY))
    scheduled = engine.scheduler.schedule()
    new_tokens = {item.seq.request.request_id: item.num_new_tokens for item in scheduled}
    assert new_tokens == {"short": 1, "long": 31}
    engine.runner.execute(scheduled)
    for item in scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
    engine.abort("short")
    engine.abort("long")


def test_shared_system_prompt_hits_prefix_cache(tiny_model, llm_factory, alone_llm) -> None:
    system = random_prompts(1, 96, 96, seed=3)[0]
    prompts = [system + tail for tail in random_prompts(6, 4, 20, seed=4)]
    expected = [token_ids(alone_llm.generate([p], GREEDY))[0] for p in prompts]
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512)
    before = llm.engine.stats().blocks
    first = token_ids(llm.generate(prompts[:1], GREEDY))
    rest = token_ids(llm.generate(prompts[1:], GREEDY))
    after = llm.engine.stats().blocks
    assert first + rest == expected
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 5 * 96
    assert after.prefix_cache_queries - before.prefix_cache_queries == sum(len(p) for p in prompts)


def test_cached_prefix_survives_free_until_evicted_lru(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=24, block_size=16)
    prompt = random_prompts(1, 64, 64, seed=5)[0]
    llm.generate([prompt], GREEDY)
    hits = llm.engine.stats().blocks.prefix_cache_hits
    llm.generate([prompt], GREEDY)
    assert llm.engine.stats().blocks.prefix_cache_hits - hits == 48
    for filler in random_prompts(3, 300, 300, seed=6):
        llm.generate([filler], SamplingParams(temperature=0.0, max_tokens=1))
    hits = llm.engine.stats().blocks.prefix_cache_hits
    llm.generate([prompt], GREEDY)
    assert llm.engine.stats().blocks.prefix_cache_hits == hits, "LRU eviction should have dropped the old prefix"


def test_kv_pressure_preempts_and_recomputes_identically(tiny_model, llm_factory, alone_llm) -> None:
    prompts = random_prompts(12, 20, 60, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = token_ids(alone_llm.generate(prompts, params))
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=24, block_size=8, enable_prefix_caching=False)
    before = llm.engine.stats().num_preemptions
    outputs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preemptions > before
    assert token_ids(outputs) == expected
    assert all(out.outputs[0].finish_reason == "length" for out in outputs)


def test_preemption_with_prefix_caching_keeps_outputs(tiny_model, llm_factory, alone_llm) -> None:
    system = random_prompts(1, 40, 40, seed=8)[0]
    prompts = [system + tail for tail in random_prompts(8, 5, 30, seed=9)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = token_ids(alone_llm.generate(prompts, params))
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=24, block_size=8)
    before = llm.engine.stats().num_preemptions
    assert token_ids(llm.generate(prompts, params)) == expected
    assert llm.engine.stats().num_preemptions > before


def test_n_completions_share_prompt_blocks(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512)
    prompt = random_prompts(1, 70, 70, seed=10)[0]
    before = llm.engine.stats().blocks.prefix_cache_hits
    [output] = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in output.outputs)
    assert llm.engine.stats().blocks.prefix_cache_hits - before == 2 * 64
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_greedy_n_completions_read_the_shared_blocks_correctly(tiny_model, llm_factory, alone_llm) -> None:
    prompt = random_prompts(1, 70, 70, seed=12)[0]
    expected = token_ids(alone_llm.generate([prompt], GREEDY))[0]
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512)
    [output] = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [c.token_ids for c in output.outputs] == [expected] * 3
