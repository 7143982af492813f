"""The OpenAI API through a real TorchServe (Java frontend, async worker), spoken by the real openai client and curl."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import openai
import pytest

from engine import SamplingParams
from ts_http import http, wait_all_blocks_free

CHAT = [{"role": "user", "content": "Name three colors."}]


@dataclass
class Api:
    """The openai client, with the served model filled in (the client requires one)."""

    client: openai.OpenAI
    model: str

    def chat(self, **kwargs: Any) -> Any:
        return self.client.chat.completions.create(model=self.model, **kwargs)

    def complete(self, **kwargs: Any) -> Any:
        return self.client.completions.create(model=self.model, **kwargs)


@pytest.fixture(scope="module")
def api(torchserve: Any) -> Api:
    client = openai.OpenAI(base_url=torchserve.openai_base_url, api_key="unused", max_retries=0, timeout=300)
    return Api(client, torchserve.model_name)


@pytest.fixture(autouse=True)
def server_blocks_free_after_test(torchserve: Any) -> Iterator[None]:
    yield
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)


def test_models_lists_the_served_model_with_its_version(api: Api, torchserve: Any) -> None:
    models = api.client.models.list().data
    assert [model.id for model in models] == [torchserve.model_name]
    assert models[0].version == torchserve.model_version


def test_chat_completion_matches_the_offline_engine(api: Api, llm_factory: Any, smollm2_path: str) -> None:
    response = api.chat(messages=CHAT, max_tokens=12, temperature=0)
    offline = llm_factory(smollm2_path, dtype="auto", quantization="none")  # as the served engine (ts_server.py)
    tokenizer = offline.get_tokenizer()
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    token_ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = offline.generate([token_ids], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_completion_from_text_and_token_ids(api: Api) -> None:
    response = api.complete(prompt=["The sky is", [504, 3458, 282]],
                                         max_tokens=6, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert all(choice.text and choice.finish_reason == "length" for choice in response.choices)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == 3 + 3


def test_streamed_chat_equals_the_whole_response(api: Api) -> None:
    whole = api.chat(messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(api.chat(
        messages=CHAT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)


def test_streamed_completion_with_n_2_and_usage(api: Api) -> None:
    chunks = list(api.complete(
        prompt="Once upon a time", n=2, max_tokens=8, temperature=0.8, seed=3, stream=True,
        stream_options={"include_usage": True},
    ))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert all(texts.values())
    assert chunks[-1].usage.completion_tokens == 16


def test_n_2_gives_two_choices_and_counts_both(api: Api) -> None:
    response = api.chat(messages=CHAT, n=2, max_tokens=10, temperature=1.0, seed=11, logprobs=True)
    assert [choice.index for choice in response.choices] == [0, 1]
    produced = sum(len(choice.logprobs.content) for choice in response.choices)
    assert response.usage.completion_tokens == produced


def test_stop_string_ends_the_text_before_it(api: Api) -> None:
    free = api.complete(prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
    stop = free.strip()[:2]
    stopped = api.complete(prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and free.startswith(stopped.text)


def test_seed_makes_sampling_reproducible(api: Api) -> None:
    def sample(seed: int) -> str:
        return api.complete(prompt="My favourite word is", max_tokens=12, temperature=1.0, seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_completion_logprobs(api: Api) -> None:
    choice = api.complete(prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == choice.text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == logprob == max(top.values())  # greedy picks the most likely token


def test_chat_top_logprobs(api: Api) -> None:
    response = api.chat(messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for entry in content:
        assert [top.token for top in entry.top_logprobs][0] == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_usage_counts_every_generated_token(api: Api) -> None:
    response = api.complete(prompt=[504, 3458, 282, 1], max_tokens=9, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == 4
    assert response.usage.completion_tokens == len(response.choices[0].logprobs.tokens) == 9
    assert response.usage.total_tokens == 13


def test_top_k_1_sampling_equals_greedy(api: Api) -> None:
    greedy = api.complete(prompt="The capital of France is", max_tokens=8, temperature=0)
    top_k_1 = api.complete(prompt="The capital of France is", max_tokens=8, temperature=1.0,
                                        extra_body={"top_k": 1})
    assert top_k_1.choices[0].text == greedy.choices[0].text


def test_min_tokens_holds_off_the_end_of_sequence(api: Api) -> None:
    free = api.chat(messages=[{"role": "user", "content": "Say hi"}], max_tokens=60, temperature=0)
    assert free.choices[0].finish_reason == "stop"
    held = api.chat(messages=[{"role": "user", "content": "Say hi"}], max_tokens=60,
                                          temperature=0, extra_body={"min_tokens": 60})
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 60


def _curl_stream(url: str, index: int) -> str:
    body = {"prompt": f"Count to {index}:", "max_tokens": 8, "temperature": 0, "stream": True}
    command = ["curl", "-sS", "-N", "--max-time", "300", url, "-H", "Content-Type: application/json", "-d", json.dumps(body)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_32_concurrent_streams_finish_with_valid_sse(torchserve: Any) -> None:
    url = f"{torchserve.openai_base_url}/completions"
    with ThreadPoolExecutor(32) as pool:
        outputs = list(pool.map(lambda i: _curl_stream(url, i), range(32)))
    for output in outputs:
        events = [event for event in output.split("\n\n") if event]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
        assert all(event.startswith("data: ") for event in events)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(chunk["choices"][0]["text"] for chunk in chunks)


def test_request_names_its_own_routes_over_plain_http(torchserve: Any) -> None:
    status, body = http(f"{torchserve.openai_base_url}/models", method="GET")
    assert status == 200 and body["data"][0]["id"] == torchserve.model_name
