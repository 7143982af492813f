"""A long-running engine hands freed heap pages back to the OS and holds oneDNN's primitive cache small."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import PROMPT, track_engine, wait_until
from engine import AsyncLLMEngine, EngineConfig, SamplingParams
from engine import async_engine, host_memory


def test_the_async_engine_releases_the_heap_when_it_goes_idle(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    releases: list[None] = []
    monkeypatch.setattr(async_engine, "release_free_heap", lambda: releases.append(None))
    engine = track_engine(AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model("llama")), num_kv_blocks=64)))
    try:
        assert not releases  # nothing ran, nothing to give back

        async def run() -> None:
            async for _ in engine.generate("one", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)):
                pass

        asyncio.run(run())
        assert wait_until(lambda: len(releases) == 1)
        assert not wait_until(lambda: len(releases) > 1, timeout=0.5)  # idle: nothing more to give back
    finally:
        engine.shutdown()


def test_the_primitive_cache_limit_leaves_a_users_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.limit_onednn_primitive_cache()
    assert host_memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == host_memory.ONEDNN_PRIMITIVE_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
    host_memory.limit_onednn_primitive_cache()
    assert host_memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "4096"


def test_releasing_the_heap_is_safe_to_call_any_time() -> None:
    host_memory.release_free_heap()
    assert host_memory._MALLOC_TRIM is not None  # glibc: the Linux machines we serve on
