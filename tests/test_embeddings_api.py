"""`/v1/embeddings` through a real TorchServe, spoken by the openai client (which asks for base64) and plain HTTP."""
from __future__ import annotations

from typing import Any

import numpy as np
import openai
import pytest

from ts_http import http

PARAPHRASES = ("The cat sat on the mat.", "A cat was sitting on the rug.")
UNRELATED = "Quarterly tax filings are due in April."


@pytest.fixture(scope="module")
def client(plugin_server: Any) -> openai.OpenAI:
    base_url = plugin_server.models["assistant"].openai_base_url
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def embed(client: openai.OpenAI, inputs: Any, **kwargs: Any) -> np.ndarray:
    response = client.embeddings.create(model="assistant", input=inputs, **kwargs)
    return np.array([item.embedding for item in sorted(response.data, key=lambda item: item.index)])


def test_shape_norm_and_usage(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="assistant", input=list(PARAPHRASES))
    assert [item.index for item in response.data] == [0, 1]
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 2 * 4


def test_float_and_base64_agree_and_repeat_exactly(client: openai.OpenAI) -> None:
    as_base64 = embed(client, UNRELATED)
    as_float = embed(client, UNRELATED, encoding_format="float")
    assert np.array_equal(as_base64, embed(client, UNRELATED))
    assert np.allclose(as_base64, as_float, atol=1e-7)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client: openai.OpenAI) -> None:
    first, paraphrase, unrelated = embed(client, [*PARAPHRASES, UNRELATED])
    assert first @ paraphrase > first @ unrelated + 0.2


def test_token_ids_embed_as_their_text(plugin_server: Any, client: openai.OpenAI) -> None:
    from handler.embeddings import EmbeddingModel

    ids = EmbeddingModel().tokenize(UNRELATED)
    assert np.allclose(embed(client, ids), embed(client, UNRELATED), atol=1e-5)
    assert np.allclose(embed(client, [ids, ids])[1], embed(client, UNRELATED)[0], atol=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": [10**9]}, "input"),
    ({"input": "word " * 400}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 64}, "dimensions"),
    ({"input": "a", "truncate": True}, "truncate"),
])
def test_bad_input_is_a_400_naming_the_field(plugin_server: Any, body: dict[str, Any], param: str) -> None:
    status, reply = http(plugin_server.models["assistant"].openai_base_url + "/embeddings", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param


def test_another_models_name_is_a_404(plugin_server: Any) -> None:
    status, reply = http(plugin_server.models["assistant"].openai_base_url + "/embeddings",
                         {"input": "a", "model": "text-embedding-3-small"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
