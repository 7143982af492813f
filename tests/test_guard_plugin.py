"""The guard plugin: Llama Guard verdicts from a second engine, through a real TorchServe (the stand-in guard is the
tiny random llama; thresholds 0 and 1 force each branch), and its output windows in-process."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from conftest import wait_until
from engine import CompletionOutput, EngineConfig, EngineDeadError
from handler.plugins import PluginContext
from handler.plugins.guard import GuardOptions, GuardPlugin, OutputModeration, Verdict
from handler.plugins.llama_guard import conversation_turns, guard_prompt, guard_task, violated_categories
from handler.server import engine_state
from ts_http import http
from ts_server import GUARD_CATEGORIES

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"}]


def client_for(plugin_server: Any, name: str) -> openai.OpenAI:
    base_url = plugin_server.models[name].openai_base_url
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def test_a_blocked_input_is_a_400_that_never_reaches_the_main_engine(plugin_server: Any) -> None:
    served = plugin_server.models["refusing"]
    before = engine_state(served.management_url, "refusing", "1.0")
    for route, body in (("chat/completions", {"messages": CHAT}), ("completions", {"prompt": "Hello"}),
                        ("chat/completions", {"messages": CHAT, "stream": True})):
        status, reply = http(f"{served.openai_base_url}/{route}", body)
        assert status == 400, reply
        assert reply["error"]["code"] == "content_filter"
        assert "blocked by the content filter" in reply["error"]["message"] and "categories:" in reply["error"]["message"]
    after = engine_state(served.management_url, "refusing", "1.0")
    assert (after["prompt_tokens"], after["generation_tokens"]) == (before["prompt_tokens"], before["generation_tokens"])


def test_a_blocked_output_ends_with_content_filter(plugin_server: Any) -> None:
    response = client_for(plugin_server, "guarded").chat.completions.create(
        model="guarded", messages=CHAT, max_tokens=24, temperature=0)
    assert response.choices[0].finish_reason == "content_filter"
    assert response.choices[0].message.content == ""
    assert response.guard["input"]["verdict"] == "safe"


def test_a_stream_sends_nothing_of_an_unsafe_window(plugin_server: Any) -> None:
    stream = client_for(plugin_server, "guarded").chat.completions.create(
        model="guarded", messages=CHAT, max_tokens=24, temperature=0, stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "content_filter"


def test_each_prompt_and_choice_of_a_text_completion_is_moderated(plugin_server: Any) -> None:
    response = client_for(plugin_server, "guarded").completions.create(
        model="guarded", prompt=["Once upon a time", "The recipe calls for"], n=2, max_tokens=12, temperature=0.5)
    assert [len(response.guard["input"]), response.guard["input"][1]["verdict"]] == [2, "safe"]
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    assert all(choice.finish_reason == "content_filter" and choice.text == "" for choice in response.choices)


def test_the_reported_probability_is_the_guard_models_own(plugin_server: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    response = client_for(plugin_server, "guarded").chat.completions.create(
        model="guarded", messages=CHAT, max_tokens=1, temperature=0)
    reported = response.guard["input"]["unsafe_probability"]
    tokenizer = AutoTokenizer.from_pretrained(plugin_server.guard_model)
    text = guard_prompt(guard_task(conversation_turns(CHAT), GUARD_CATEGORIES), "llama_guard_3", tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(plugin_server.guard_model, dtype=torch.float32)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    safe, unsafe = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("safe", "unsafe"))
    expected = 1.0 / (1.0 + math.exp(float(logprobs[safe] - logprobs[unsafe])))
    assert reported == pytest.approx(expected, rel=1e-4)


def test_guard_metrics_count_verdicts_by_stage(plugin_server: Any) -> None:
    http(f"{plugin_server.models['refusing'].openai_base_url}/completions", {"prompt": "Hi"})
    _, text = http(plugin_server.server.metrics_url + "/metrics", method="GET")
    verdicts = [line for line in text.splitlines() if line.startswith("guard_verdicts_total{")]
    assert any('stage="input"' in line and 'verdict="unsafe"' in line and 'model_name="refusing"' in line
               for line in verdicts), verdicts
    assert any(line.startswith("guard_latency_seconds_count{") for line in text.splitlines())


class ScriptedGuard:
    """Judges output unsafe once it holds `word`: the windowing is what is under test here."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.judged: list[str] = []

    async def judge(self, conversation: list[tuple[str, str]], stage: str) -> Verdict:
        self.judged.append(conversation[-1][1])
        unsafe = self.word in conversation[-1][1]
        return Verdict(stage, 1.0 if unsafe else 0.0, unsafe, [])


def moderate(words: list[str], window: int, guard: ScriptedGuard) -> list[CompletionOutput]:
    moderation = OutputModeration(guard, [("User", "hi")], window)
    deltas = [CompletionOutput(0, word, [i], None, "stop" if i == len(words) - 1 else None)
              for i, word in enumerate(words)]

    async def run() -> list[CompletionOutput]:
        return [out for delta in deltas for out in await moderation(delta)]

    return asyncio.run(run())


def test_safe_windows_pass_whole_and_in_order() -> None:
    words = [f"w{i} " for i in range(10)]
    passed = moderate(words, 4, ScriptedGuard("BAD"))
    assert "".join(out.text for out in passed) == "".join(words)
    assert [len(out.token_ids) for out in passed] == [4, 4, 2]
    assert passed[-1].finish_reason == "stop"


def test_nothing_of_an_unsafe_window_or_after_it_is_passed() -> None:
    words = ["a ", "b ", "c ", "d ", "e ", "BAD ", "g ", "h ", "i ", "j "]
    guard = ScriptedGuard("BAD")
    passed = moderate(words, 4, guard)
    assert "".join(out.text for out in passed) == "a b c d "
    assert passed[-1].finish_reason == "content_filter"
    assert guard.judged == ["a b c d ", "a b c d e BAD g h "]  # the whole output so far, each time


def test_verdict_categories_are_parsed_from_the_second_line() -> None:
    assert violated_categories("\nS1,S10", GUARD_CATEGORIES) == ["S1", "S10"]
    assert violated_categories("\nS3, S1", GUARD_CATEGORIES) == ["S1"]
    assert violated_categories("\nnothing", GUARD_CATEGORIES) == []


def tiny_guard(tiny_model: Any, **context: Any) -> GuardPlugin:
    """The guard plugin in-process on the tiny llama, with a 256-token context."""
    guard = GuardPlugin(GuardOptions(model=str(tiny_model("llama")), categories=GUARD_CATEGORIES,
                                     engine={"max_model_len": 256, "kv_cache_memory_gb": 0.02}))
    guard.initialize(PluginContext(Path("."), EngineConfig(), lambda: None, lambda: None, lambda *a, **k: None,
                                   **context))
    return guard


def _boom(*args: object) -> None:
    raise RuntimeError("boom")


def test_a_dead_guard_engine_ends_the_worker_through_the_context(tiny_model: Any, monkeypatch: Any) -> None:
    deaths: list[EngineDeadError] = []
    guard = tiny_guard(tiny_model, engine_died=deaths.append)
    try:
        monkeypatch.setattr(guard.engine, "_apply_commands", _boom)
        guard.engine.abort("wake-up")  # a command: the idle step thread runs its loop once more, and fails
        assert wait_until(lambda: not guard.engine.is_running)
        assert len(deaths) == 1 and "boom" in str(deaths[0])
        with pytest.raises(EngineDeadError):
            asyncio.run(guard.judge([("User", "hi")], "input"))
    finally:
        guard.engine.shutdown()


def test_a_conversation_longer_than_the_guards_context_is_judged_on_its_end(tiny_model: Any) -> None:
    guard = tiny_guard(tiny_model)
    try:
        long_turns = [("User", "tell me a story " * 60), ("Agent", "once upon a time " * 80), ("User", "go on")]
        fitted = guard._prompt_ids(long_turns)
        assert len(fitted) <= 256 - guard.options.max_category_tokens - 2
        assert fitted == guard._render(long_turns[-1:])  # the two long turns before it did not fit
        verdict = asyncio.run(guard.judge([("User", "word " * 400)], "input"))
        assert 0 < verdict.unsafe_probability < 1
    finally:
        guard.engine.shutdown()


@pytest.mark.parametrize("options, named", [
    ({"model": ""}, "model"),
    ({"model": "g", "threshold": 1.5}, "threshold"),
    ({"model": "g", "stages": ["inputs"]}, "stages"),
    ({"model": "g", "prompt_format": "llama_guard_9"}, "prompt_format"),
    ({"model": "g", "output_window_tokens": 0}, "output_window_tokens"),
])
def test_bad_guard_options_are_refused_naming_them(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GuardOptions(**options)
