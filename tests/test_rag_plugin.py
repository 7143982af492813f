"""The rag plugin through a real TorchServe: the assistant model answers from tests/data/rag_docs."""
from __future__ import annotations

import re
from typing import Any

import openai
import pytest

from ts_http import http, management_call

QUESTION = [{"role": "user", "content": "What is the code name of the Heliotrope Vault project?"}]
FACT = "ZEPHYR-LANTERN"


@pytest.fixture(scope="module")
def client(plugin_server: Any) -> openai.OpenAI:
    base_url = plugin_server.models["assistant"].openai_base_url
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.create(model="assistant", messages=QUESTION, temperature=0, extra_body=extra)


def test_the_answer_holds_the_fact_only_with_retrieval(client: openai.OpenAI) -> None:
    with_rag = ask(client)
    without_rag = ask(client, rag=False)
    assert FACT in with_rag.choices[0].message.content
    assert FACT not in without_rag.choices[0].message.content
    assert with_rag.sources[0]["document_id"] == "heliotrope.md"
    assert FACT in with_rag.sources[0]["text"]
    assert not hasattr(without_rag, "sources") or not without_rag.sources


def test_sources_carry_id_score_and_text_best_first(client: openai.OpenAI) -> None:
    sources = ask(client, rag={"top_k": 2}).sources
    assert len(sources) == 2
    assert all(set(source) >= {"id", "document_id", "score", "text", "metadata"} for source in sources)
    assert re.fullmatch(r"heliotrope\.md#\d+", sources[0]["id"])
    assert sources[0]["score"] >= sources[1]["score"] > 0


def test_the_first_stream_chunk_carries_the_sources(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="assistant", messages=QUESTION, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].sources[0]["document_id"] == "heliotrope.md"
    assert all(not getattr(chunk, "sources", None) for chunk in chunks[1:])
    assert FACT in "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_text_completions_retrieve_per_prompt(client: openai.OpenAI) -> None:
    prompts = ["The Heliotrope Vault project's code name is", "Honeybees tell each other where flowers are by"]
    response = client.completions.create(model="assistant", prompt=prompts, max_tokens=8, temperature=0)
    by_prompt = {source["prompt_index"]: source["document_id"] for source in reversed(response.sources)}
    assert by_prompt == {0: "heliotrope.md", 1: "honeybees.txt"}


def test_a_bad_rag_field_is_a_400(plugin_server: Any) -> None:
    url = plugin_server.models["assistant"].openai_base_url + "/chat/completions"
    for value in ("yes", {"top_k": -1}, {"top_k": 1000}, {"depth": 3}):
        status, body = http(url, {"messages": QUESTION, "rag": value})
        assert status == 400, body
        assert body["error"]["param"] == "rag"


def test_a_new_worker_loads_the_index_from_disk_without_embedding(plugin_server: Any) -> None:
    management = plugin_server.server.management_url
    status, body = management_call(management, "PUT", "/models/assistant/1.0?min_worker=2&synchronous=true")
    assert status == 200, body
    try:
        lines = [line for line in plugin_server.model_log.splitlines() if "rag: " in line and " index " in line]
        assert len(lines) == 2, lines
        assert "built" in lines[0] and "loaded from the cache" not in lines[0]
        assert "loaded from the cache (0 chunks embedded)" in lines[1]
        assert _index_key(lines[0]) == _index_key(lines[1])
    finally:
        management_call(management, "PUT", "/models/assistant/1.0?min_worker=1&max_worker=1&synchronous=true")


def _index_key(line: str) -> str:
    return re.search(r"index ([0-9a-f]{12})", line).group(1)
