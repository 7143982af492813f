"""Engine statistics: token totals, gauges, finished-request records and the stat loggers of the async engine."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import PROMPT, track_engine
from engine import AsyncLLMEngine, EngineConfig, SamplingParams
from engine.metrics import EngineStats, FinishedRequestStats

INTERVAL = 0.2


def test_token_totals_match_the_outputs(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512)
    before = llm.engine.stats()
    prompts = [PROMPT, PROMPT[:3] * 4, PROMPT[2:]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, n=2))
    after = llm.engine.stats()
    assert after.prompt_tokens - before.prompt_tokens == sum(len(p) for p in prompts)
    assert after.generation_tokens - before.generation_tokens == sum(
        len(c.token_ids) for out in outputs for c in out.outputs
    ) == 3 * 2 * 7


def test_gauges_while_running_and_at_rest(tiny_model, llm_factory) -> None:
    engine = llm_factory(tiny_model("llama"), num_kv_blocks=512, max_num_seqs=2).engine
    for i in range(3):
        engine.add_request(engine.make_request(f"gauge-{i}", PROMPT * 4, SamplingParams(max_tokens=4, ignore_eos=True)))
    engine.step()
    busy = engine.stats()
    assert (busy.num_requests_running, busy.num_requests_waiting) == (2, 1)
    assert busy.kv_cache_usage == busy.blocks.num_used_blocks / busy.blocks.num_total_blocks > 0
    while engine.has_unfinished_requests():
        engine.step()
    idle = engine.stats()
    assert (idle.num_requests_running, idle.num_requests_waiting, idle.kv_cache_usage) == (0, 0, 0.0)


def test_finished_records_are_kept_only_when_asked_for(tiny_model, llm_factory) -> None:
    engine = llm_factory(tiny_model("llama"), num_kv_blocks=512).engine
    engine.counters.keep_finished = False
    _run_to_end(engine, "unkept", SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.counters.take_finished() == []
    engine.counters.keep_finished = True
    try:
        _run_to_end(engine, "kept", SamplingParams(max_tokens=5, ignore_eos=True, n=2))
        [record] = engine.counters.take_finished()
    finally:
        engine.counters.keep_finished = False
    assert record.finish_reasons == ["length", "length"]
    assert (record.num_prompt_tokens, record.num_generation_tokens) == (len(PROMPT), 10)
    assert 0 <= record.queue_time <= record.time_to_first_token <= record.e2e_latency
    assert 0 < record.time_per_output_token <= (record.e2e_latency - record.time_to_first_token) / 4 + 1e-9
    assert engine.counters.take_finished() == []


def test_an_abort_before_the_first_token_has_no_ttft(tiny_model, llm_factory) -> None:
    engine = llm_factory(tiny_model("llama"), num_kv_blocks=512).engine
    engine.counters.keep_finished = True
    try:
        engine.add_request(engine.make_request("early-abort", PROMPT, SamplingParams(max_tokens=5)))
        engine.abort("early-abort")
        [record] = engine.counters.take_finished()
    finally:
        engine.counters.keep_finished = False
    assert record.finish_reasons == ["abort"]
    assert (record.queue_time, record.time_to_first_token, record.time_per_output_token) == (None, None, None)
    assert record.num_generation_tokens == 0 and record.e2e_latency >= 0


@pytest.fixture
def logged_engine(tiny_model):
    config = EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=512, stats_interval_s=INTERVAL)
    engine = track_engine(AsyncLLMEngine.from_config(config))
    calls: list[tuple[float, EngineStats, list[FinishedRequestStats]]] = []
    engine.add_stat_logger(lambda stats, finished: calls.append((time.monotonic(), stats, finished)))
    yield engine, calls
    engine.shutdown()


def test_stat_loggers_are_called_at_a_bounded_rate_and_end_at_rest(logged_engine) -> None:
    engine, calls = logged_engine
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def run() -> None:
        async def one(i: int) -> None:
            async for _ in engine.generate(f"logged-{i}", PROMPT * 3, params):
                await asyncio.sleep(0.005)  # keeps the requests in flight across several intervals

        await asyncio.gather(*(one(i) for i in range(4)))

    asyncio.run(run())
    _wait_for(lambda: calls and calls[-1][1].num_requests_running == 0)
    times = [t for t, _, _ in calls]
    assert all(later - earlier >= INTERVAL * 0.95 for earlier, later in zip(times, times[1:]))
    assert any(stats.num_requests_running > 0 and stats.kv_cache_usage > 0 for _, stats, _ in calls)
    last = calls[-1][1]
    assert (last.num_requests_running, last.num_requests_waiting, last.kv_cache_usage) == (0, 0, 0.0)
    finished = [record for _, _, records in calls for record in records]
    assert len(finished) == 4 and all(r.finish_reasons == ["length"] for r in finished)
    assert sum(r.num_generation_tokens for r in finished) == 4 * 60
    time.sleep(3 * INTERVAL)
    assert calls[-1][1] is last, "an idle engine with nothing new calls no logger"


def test_a_failing_stat_logger_does_not_stop_the_engine(logged_engine) -> None:
    engine, calls = logged_engine

    def broken(stats: EngineStats, finished: list[FinishedRequestStats]) -> None:
        raise RuntimeError("broken logger")

    engine.add_stat_logger(broken)

    async def run() -> int:
        outputs = [out async for out in engine.generate("after-broken", PROMPT, SamplingParams(max_tokens=3))]
        return len(outputs)

    assert asyncio.run(run()) >= 1
    _wait_for(lambda: any(records for _, _, records in calls))
    assert engine.is_running


def test_stats_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stats_interval_s"):
        EngineConfig(stats_interval_s=0)


def _run_to_end(engine, request_id: str, params: SamplingParams) -> None:
    engine.add_request(engine.make_request(request_id, PROMPT, params))
    while engine.has_unfinished_requests():
        engine.step()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
