"""Tensor parallelism on CPU (gloo): TP=2 gives what TP=1 gives, token for token, and the worker processes
start, fail and stop with the engine."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from engine import LLM, AsyncLLMEngine, EngineConfig, EngineDeadError, SamplingParams
from engine.layers.sharding import kv_heads, vocab_rows
from conftest import PROMPT, track_engine
from generation_checks import assert_same_generation, greedy_with_logprobs
from generation_checks import PROMPTS

TINY = {"num_kv_blocks": 128, "dtype": "float32"}


def live(pids: list[int]) -> list[int]:
    """The pids still running (a zombie waiting for its parent to reap it counts as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while live(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live(pids)


def test_kv_heads_are_split_or_shared_and_the_vocabulary_padded() -> None:
    assert [kv_heads(4, rank, 2).start for rank in range(2)] == [0, 2]
    assert [kv_heads(2, rank, 4).start for rank in range(4)] == [0, 0, 1, 1]
    assert {kv_heads(2, rank, 4).size for rank in range(4)} == {1}
    shards = [vocab_rows(49155, rank, 2) for rank in range(2)]
    assert [(shard.start, shard.size) for shard in shards] == [(0, 24578), (24578, 24577)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama_odd_vocab"])
def test_tp2_matches_tp1(kind: str, tiny_model, llm_factory) -> None:
    """llama: 4 heads, 2 KV heads (one per rank); mistral: 1 KV head shared by both ranks; qwen2: QKV bias and
    tied embeddings; llama_odd_vocab: a vocabulary of 49155 rows (the second shard ends in padding)."""
    folder = tiny_model(kind)
    expected = greedy_with_logprobs(llm_factory(folder, **TINY), PROMPTS)
    tp2 = llm_factory(folder, tensor_parallel_size=2, **TINY)
    assert_same_generation(greedy_with_logprobs(tp2, PROMPTS), expected)
    attention = tp2.engine.runner.model.model.layers[0].self_attn
    config = tp2.engine.model_config
    assert attention.attn.num_heads == config.num_heads // 2
    assert attention.attn.num_kv_heads == max(config.num_kv_heads // 2, 1)
    assert attention.o_proj.weight.shape == (config.hidden_size, config.num_heads // 2 * config.head_dim)


def test_tp2_matches_tp1_with_chunked_prefill_and_prefix_hits(tiny_model, llm_factory) -> None:
    settings = {**TINY, "max_num_batched_tokens": 48, "max_num_seqs": 4}
    shared = PROMPT * 12  # 96 tokens: two steps of prefill chunks, six full blocks to share
    prompts = [shared + [100 + i, 200 + i] for i in range(4)]
    results = []
    for size in (1, 2):
        llm = llm_factory(tiny_model("llama"), tensor_parallel_size=size, **settings)
        first = greedy_with_logprobs(llm, prompts[:1])
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        cached = [out.num_cached_tokens for out in llm.generate(prompts[1:], params)]
        assert min(cached) >= 80, cached
        results.append(first + greedy_with_logprobs(llm, prompts[1:]))
    assert_same_generation(results[1], results[0])


def test_a_head_count_that_cannot_be_split_fails_before_any_worker_starts(llm_factory) -> None:
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ValueError) as error:
        llm_factory(None, tensor_parallel_size=2)
    message = str(error.value)
    assert "9 attention heads are not divisible by 2" in message
    assert "3 KV heads" in message
    assert "Valid tensor_parallel_size values: [1, 3]" in message
    assert psutil.Process().children(recursive=True) == before


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(llm_factory) -> None:
    tp1 = llm_factory(None)
    prompts = [tp1.get_tokenizer().encode(prompt) for prompt in PROMPTS[:3]]
    expected = greedy_with_logprobs(tp1, prompts)
    tp3 = llm_factory(None, tensor_parallel_size=3, kv_cache_memory_gb=0.1)
    assert_same_generation(greedy_with_logprobs(tp3, prompts), expected)


def test_shutdown_stops_the_workers_cleanly_and_leaves_no_shared_memory(tiny_model) -> None:
    shared_memory = set(os.listdir("/dev/shm"))
    with LLM(str(tiny_model("llama")), tensor_parallel_size=2, **TINY) as llm:
        processes = llm.engine.workers.processes
        assert all(process.is_alive() for process in processes)
        assert greedy_with_logprobs(llm, PROMPTS[:1])
    assert [process.exitcode for process in processes] == [0]
    assert set(os.listdir("/dev/shm")) <= shared_memory


def test_workers_exit_when_rank0_is_killed(tiny_model) -> None:
    script = (
        "from engine import LLM\n"
        "import sys, time\n"
        f"llm = LLM({str(tiny_model('llama'))!r}, tensor_parallel_size=2, num_kv_blocks=16)\n"
        "print(*llm.engine.workers.pids, flush=True)\n"
        "time.sleep(600)\n"
    )
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(pid) for pid in rank0.stdout.readline().split()]
        assert len(worker_pids) == 1 and live(worker_pids) == worker_pids
    finally:
        rank0.kill()
        rank0.wait()
    assert wait_gone(worker_pids) == []


class DyingEngine:
    """A TP=2 AsyncLLMEngine over the tiny llama, recording the error its death callbacks get."""

    def __init__(self, folder: Path) -> None:
        self.engine = AsyncLLMEngine.from_config(EngineConfig(model=str(folder), tensor_parallel_size=2, **TINY))
        track_engine(self.engine)
        self.died = threading.Event()
        self.errors: list[EngineDeadError] = []
        self.engine.add_death_callback(self._record)
        [self.worker_pid] = self.engine.engine.workers.pids

    def _record(self, error: EngineDeadError) -> None:
        self.errors.append(error)
        self.died.set()

    def kill_worker(self) -> None:
        os.kill(self.worker_pid, signal.SIGKILL)

    async def generate(self, request_id: str, max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens: list[int] = []
        async for output in self.engine.generate(request_id, PROMPT, params):
            tokens.extend(output.outputs[0].token_ids)
            if len(tokens) == 4:
                self.kill_worker()
        return tokens

    def assert_dead(self) -> None:
        assert self.died.wait(10)
        assert len(self.errors) == 1
        assert f"rank 1 (pid {self.worker_pid}) was killed by SIGKILL" in str(self.errors[0])
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            asyncio.run(self.generate("after-death", 4))
        blocks = self.engine.stats().blocks
        assert blocks.num_free_blocks == blocks.num_total_blocks


def test_a_worker_killed_mid_request_fails_the_request_and_the_engine(tiny_model) -> None:
    dying = DyingEngine(tiny_model("llama"))
    try:
        with pytest.raises(EngineDeadError, match="during a step"):
            asyncio.run(dying.generate("killed", 400))
        dying.assert_dead()
    finally:
        dying.engine.shutdown()
    assert not dying.engine.is_running


def test_a_worker_killed_while_idle_is_noticed_without_a_request(tiny_model) -> None:
    dying = DyingEngine(tiny_model("llama"))
    try:
        assert asyncio.run(dying.generate("before", 3)) and not dying.died.is_set()
        dying.kill_worker()
        assert dying.died.wait(10)
        assert "while the engine was running" in str(dying.errors[0])
        dying.assert_dead()
    finally:
        dying.engine.shutdown()
