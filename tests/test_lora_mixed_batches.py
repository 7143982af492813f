"""Steps that mix adapters and the base model: each request's output is what it gives alone, whether one or two
tensor-parallel ranks run it, whether the adapters fit the slots at once or must take turns, and the prefix
cache never hands one adapter's KV to another."""
from __future__ import annotations

from typing import Callable, Optional

import pytest

from conftest import TinyAdapters, random_prompts, token_ids
from engine import LLM, SamplingParams
from engine.lora import LoRARequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def each_alone(llm: LLM, prompts: list[list[int]], loras: list[Optional[LoRARequest]]) -> list[list[int]]:
    return [llm.generate([prompt], GREEDY, lora_request=lora)[0].outputs[0].token_ids
            for prompt, lora in zip(prompts, loras)]


def mixed_requests(adapters: TinyAdapters, count: int) -> tuple[list[list[int]], list[Optional[LoRARequest]]]:
    """`count` prompts cycling through the three adapters and the base model."""
    cycle = [*adapters.requests(), None]
    return random_prompts(count, 5, 40, seed=11), [cycle[i % len(cycle)] for i in range(count)]


@pytest.mark.parametrize("tensor_parallel_size", [1, 2], ids=["tp1", "tp2"])
def test_a_batch_of_three_adapters_and_the_base_model_equals_each_alone(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM], tensor_parallel_size: int
) -> None:
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128,
                      tensor_parallel_size=tensor_parallel_size)
    prompts, loras = mixed_requests(tiny_adapters, 8)
    alone = each_alone(llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128), prompts, loras)
    assert token_ids(llm.generate(prompts, GREEDY, lora_request=loras)) == alone


def test_more_adapters_than_slots_take_turns(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]
) -> None:
    """With two slots, at most two adapters run at once (the others wait), and slots are reloaded as they turn."""
    llm = llm_factory(tiny_adapters.base, enable_lora=True, max_loras=2, num_kv_blocks=128)
    prompts, loras = mixed_requests(tiny_adapters, 9)
    alone = each_alone(llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128), prompts, loras)
    engine = llm.engine
    for prompt, lora in zip(prompts, loras):
        engine.add_request(engine.make_request(f"turns-{len(engine.requests)}", prompt, GREEDY, lora_request=lora))
    results: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        running = {seq.request.lora.name for seq in engine.scheduler.running if seq.request.lora is not None}
        assert len(running) <= 2
        for output in engine.step():
            results.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
    assert [results[f"turns-{i}"] for i in range(len(prompts))] == alone


def test_the_same_prompt_under_two_adapters_gives_each_its_own_output(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]
) -> None:
    """A prompt of several full blocks, run under one adapter, then another, then the base model, then the first
    again: only the repeat hits the prefix cache."""
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128, block_size=4)
    prompt = random_prompts(1, 30, 30, seed=5)[0]
    full, rslora = tiny_adapters.requests()[:2]
    runs = [llm.generate([prompt], GREEDY, lora_request=lora)[0] for lora in (full, rslora, None, full)]
    assert [run.num_cached_tokens for run in runs] == [0, 0, 0, 28]
    reference = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128, enable_prefix_caching=False)
    expected = each_alone(reference, [prompt] * 4, [full, rslora, None, full])
    assert [run.outputs[0].token_ids for run in runs] == expected
    assert len({tuple(tokens) for tokens in expected[:3]}) == 3


def test_a_reloaded_adapter_does_not_hit_the_blocks_of_its_predecessor(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]
) -> None:
    """Same name, other folder: the new weights' KV is computed afresh."""
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128, block_size=4)
    prompt = random_prompts(1, 30, 30, seed=6)[0]
    first = llm.generate([prompt], GREEDY, lora_request=LoRARequest("swap", str(tiny_adapters.full)))[0]
    second = llm.generate([prompt], GREEDY, lora_request=LoRARequest("swap", str(tiny_adapters.rslora)))[0]
    assert second.num_cached_tokens == 0
    assert second.outputs[0].token_ids == each_alone(llm, [prompt], [tiny_adapters.requests()[1]])[0]
    assert second.outputs[0].token_ids != first.outputs[0].token_ids


def test_base_model_requests_pass_one_waiting_for_a_lora_slot_and_adapters_do_not(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]
) -> None:
    """One slot: `full` runs; `rslora` waits for the slot; a base-model request behind it runs at once; a second
    `full` request behind it waits too, so that `full` drains and `rslora` gets its turn."""
    llm = llm_factory(tiny_adapters.base, enable_lora=True, max_loras=1, num_kv_blocks=128)
    full, rslora = tiny_adapters.requests()[:2]
    prompts, loras = random_prompts(4, 5, 20, seed=13), [full, rslora, None, full]
    alone = each_alone(llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=128), prompts, loras)
    engine = llm.engine
    for index, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(engine.make_request(f"pass-{index}", prompt, GREEDY, lora_request=lora))
    results: dict[str, list[int]] = {}
    admitted: list[list[str]] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            results.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
        admitted.append(sorted({seq.request.request_id for seq in engine.scheduler.running}))
    assert admitted[0] == ["pass-0", "pass-2"]
    assert "pass-3" not in {request_id for step in admitted if "pass-1" not in step for request_id in step} or \
        admitted.index(next(step for step in admitted if "pass-3" in step)) > \
        admitted.index(next(step for step in admitted if "pass-1" in step))
    assert [results[f"pass-{i}"] for i in range(4)] == alone
