"""Retrieval for RAG: documents loaded from tests/data/rag_docs, chunked with SmolLM2's tokenizer, searched
dense, BM25 and hybrid; the on-disk cache's keys, hits and atomic entries; loading and chunking errors."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from handler.embeddings import EmbeddingModel
from handler.retrieval import RETRIEVAL_MODES, Document, DocumentIndex, chunk_documents, load_documents
from handler.retrieval.cache import TEMPORARY_PREFIX, new_entry
from handler.retrieval.index import MANIFEST_FILE, index_key

DOCS = Path(__file__).parent / "data" / "rag_docs"
FACT = "The code name of the Heliotrope Vault project is ZEPHYR-LANTERN and its access number is 7719-4402."
FACT_QUESTION = "What is the code name of the Heliotrope Vault project?"
CHUNK_TOKENS, OVERLAP_TOKENS = 48, 12
TOKENIZER_ID = "smollm2"


class CountingEmbedder:
    """The real model, counting the texts `embed_texts` is asked to embed."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model
        self.embedded_texts = 0

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.embedded_texts += len(texts)
        return self.model.embed_texts(texts)


@pytest.fixture(scope="module")
def embedder() -> EmbeddingModel:
    return EmbeddingModel()


@pytest.fixture(scope="module")
def smollm2(tokenizer_dir: Path) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """SmolLM2's encode and decode, as the RAG plugin passes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return (lambda text: tokenizer.encode(text, add_special_tokens=False)), tokenizer.decode


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag-cache")


@pytest.fixture(scope="module")
def build(
    embedder: EmbeddingModel, smollm2: tuple[Callable[[str], list[int]], Callable[[list[int]], str]]
) -> Callable[..., DocumentIndex]:
    """DocumentIndex.build with this file's chunk settings and SmolLM2; any argument may be overridden."""
    encode, decode = smollm2

    def make(folder: Path, cache: Path, mode: str, **overrides: object) -> DocumentIndex:
        settings: dict[str, object] = dict(
            embedder=embedder, encode=encode, decode=decode, chunk_tokens=CHUNK_TOKENS,
            overlap_tokens=OVERLAP_TOKENS, tokenizer_id=TOKENIZER_ID,
        )
        return DocumentIndex.build(folder, cache, mode, **{**settings, **overrides})

    return make


@pytest.fixture(scope="module")
def indexes(build: Callable[..., DocumentIndex], cache_dir: Path) -> dict[str, DocumentIndex]:
    return {mode: build(DOCS, cache_dir, mode) for mode in RETRIEVAL_MODES}


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DOCS, tmp_path / "docs"))


def whitespace_chunks(text: str, chunk_tokens: int, overlap_tokens: int) -> list[str]:
    document = Document("doc", text, {"source": "doc"})
    chunks = chunk_documents([document], str.split, " ".join, chunk_tokens, overlap_tokens)
    assert [chunk.id for chunk in chunks] == [f"doc#{index}" for index in range(len(chunks))]
    return [chunk.text for chunk in chunks]


# Documents

def test_documents_are_every_text_file_and_jsonl_line_sorted_by_path() -> None:
    documents = load_documents(DOCS)
    assert [document.id for document in documents] == [
        "heliotrope.md", "honeybees.txt", "kitchen/sourdough.txt", "volcanoes", "chess-openings", "notes.jsonl:3",
        "tides.md",
    ]
    by_id = {document.id: document for document in documents}
    assert FACT in by_id["heliotrope.md"].text
    assert by_id["kitchen/sourdough.txt"].metadata == {"source": "kitchen/sourdough.txt"}
    assert by_id["volcanoes"].metadata == {"source": "notes.jsonl", "topic": "geology", "reviewed": True}
    assert by_id["notes.jsonl:3"].text.startswith("Lighthouses guided ships")


@pytest.mark.parametrize("line, problem", [
    ('{"text": "fine"', "not valid JSON"),
    ('["text"]', "must be a JSON object"),
    ('{"id": "x"}', "`text` is missing or not a string"),
    ('{"text": 7}', "`text` is missing or not a string"),
    ('{"text": "a", "id": 3}', "`id` must be a non-empty string"),
    ('{"text": "a", "metadata": []}', "`metadata` must be a JSON object"),
    ('{"text": "a", "id": "first.txt"}', "already used by"),
])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    (tmp_path / "first.txt").write_text("a document")
    (tmp_path / "lines.jsonl").write_text('{"text": "good"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"lines\.jsonl:3: .*{re.escape(problem)}"):
        load_documents(tmp_path)


def test_a_duplicate_id_names_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": "same"}\n{"text": "two", "id": "same"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: document id 'same' is already used by .*a\.jsonl:1"):
        load_documents(tmp_path)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such documents folder"):
        load_documents(tmp_path / "missing")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"holds no \.txt, \.md or \.jsonl file"):
        load_documents(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        load_documents(tmp_path)


# Chunking

def test_windows_overlap_and_the_last_reaches_the_end() -> None:
    words = " ".join(f"w{number}" for number in range(10))
    assert whitespace_chunks(words, 4, 1) == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert whitespace_chunks(words, 4, 0) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert whitespace_chunks(words, 6, 3) == ["w0 w1 w2 w3 w4 w5", "w3 w4 w5 w6 w7 w8", "w6 w7 w8 w9"]


def test_short_and_empty_documents() -> None:
    assert whitespace_chunks("only three words", 4, 1) == ["only three words"]
    assert whitespace_chunks("exactly four words here", 4, 1) == ["exactly four words here"]
    assert whitespace_chunks("", 4, 1) == []


@pytest.mark.parametrize("chunk_tokens, overlap_tokens", [(4, 4), (4, 5), (4, -1), (0, 0)])
def test_overlap_must_be_below_the_chunk_size(chunk_tokens: int, overlap_tokens: int) -> None:
    with pytest.raises(ValueError, match="0 <= overlap_tokens < chunk_tokens"):
        whitespace_chunks("a b c", chunk_tokens, overlap_tokens)


def test_chunks_are_windows_of_llm_tokens(
    smollm2: tuple[Callable[[str], list[int]], Callable[[list[int]], str]]
) -> None:
    encode, decode = smollm2
    documents = load_documents(DOCS)
    chunks = chunk_documents(documents, encode, decode, CHUNK_TOKENS, OVERLAP_TOKENS)
    tides = next(document for document in documents if document.id == "tides.md")
    ids = encode(tides.text)
    stride = CHUNK_TOKENS - OVERLAP_TOKENS
    expected = [decode(ids[start:start + CHUNK_TOKENS]) for start in range(0, len(ids) - OVERLAP_TOKENS, stride)]
    assert [chunk.text for chunk in chunks if chunk.document_id == "tides.md"] == expected
    assert chunks[0].id == "heliotrope.md#0" and chunks[0].metadata == {"source": "heliotrope.md"}
    assert all(len(encode(chunk.text)) <= CHUNK_TOKENS + 1 for chunk in chunks)  # a re-encode may split differently


# Search

@pytest.mark.parametrize("mode", RETRIEVAL_MODES)
def test_the_invented_fact_is_found_first(indexes: dict[str, DocumentIndex], mode: str) -> None:
    best = indexes[mode].search(FACT_QUESTION, top_k=3)[0]
    assert best.document_id == "heliotrope.md" and "ZEPHYR-LANTERN" in best.text
    assert best.id.startswith("heliotrope.md#") and best.metadata == {"source": "heliotrope.md"}


@pytest.mark.parametrize("mode", RETRIEVAL_MODES)
@pytest.mark.parametrize("question, document_id", [
    ("Why does the Moon cause ocean tides?", "tides.md"),
    ("What makes a volcano erupt explosively?", "volcanoes"),
])
def test_other_topics_find_their_own_document(
    indexes: dict[str, DocumentIndex], mode: str, question: str, document_id: str
) -> None:
    passages = indexes[mode].search(question, top_k=3)
    assert passages[0].document_id == document_id
    assert [passage.score for passage in passages] == sorted((passage.score for passage in passages), reverse=True)


def test_dense_scores_are_cosine_similarities(indexes: dict[str, DocumentIndex], embedder: EmbeddingModel) -> None:
    passages = indexes["dense"].search(FACT_QUESTION, top_k=2)
    query, texts = embedder.embed_texts([FACT_QUESTION]), embedder.embed_texts([p.text for p in passages])
    np.testing.assert_allclose([p.score for p in passages], (texts @ query[0]), atol=1e-5)


def test_bm25_returns_only_chunks_with_a_query_word(indexes: dict[str, DocumentIndex]) -> None:
    bm25 = indexes["bm25"]
    passages = bm25.search("sourdough starter", top_k=100)
    assert passages and all(p.document_id == "kitchen/sourdough.txt" and p.score > 0 for p in passages)
    assert bm25.search("xylophone quasar", top_k=5) == []
    assert bm25.search("the of and", top_k=5) == []  # stopwords only


def test_hybrid_fuses_the_ranks(indexes: dict[str, DocumentIndex]) -> None:
    passages = indexes["hybrid"].search(FACT_QUESTION, top_k=5)
    assert passages[0].score == pytest.approx(2 / 61)  # first in both lists
    assert all(passage.score <= 2 / 61 for passage in passages)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_top_k_beyond_the_chunk_count_returns_every_chunk(indexes: dict[str, DocumentIndex], mode: str) -> None:
    index = indexes[mode]
    passages = index.search("bread", top_k=index.num_chunks + 10)
    assert sorted(passage.id for passage in passages) == sorted(chunk.id for chunk in index.chunks)


def test_top_k_must_be_positive(indexes: dict[str, DocumentIndex]) -> None:
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        indexes["bm25"].search("bread", top_k=0)


def test_modes_that_embed_need_an_embedder(build: Callable[..., DocumentIndex], tmp_path: Path) -> None:
    for mode in ("dense", "hybrid"):
        with pytest.raises(ValueError, match="needs an embedding model"):
            build(DOCS, tmp_path, mode, embedder=None)
    with pytest.raises(ValueError, match="retrieval mode must be one of dense, bm25, hybrid"):
        build(DOCS, tmp_path, "sparse")
    assert build(DOCS, tmp_path, "bm25", embedder=None).search(FACT_QUESTION, 1)[0].document_id == "heliotrope.md"


# The cache

def test_counts(indexes: dict[str, DocumentIndex]) -> None:
    for mode, index in indexes.items():
        assert index.num_documents == 7 and index.num_chunks == len(index.chunks) > 7
        assert index.embedded_chunks == (0 if mode == "bm25" or index.from_cache else index.num_chunks)


@pytest.mark.parametrize("mode", RETRIEVAL_MODES)
def test_a_second_build_is_a_hit_that_embeds_nothing(
    build: Callable[..., DocumentIndex], embedder: EmbeddingModel, docs_copy: Path, tmp_path: Path, mode: str
) -> None:
    counting = CountingEmbedder(embedder)
    first = build(docs_copy, tmp_path / "cache", mode, embedder=counting)
    assert not first.from_cache and counting.embedded_texts == first.embedded_chunks
    counting.embedded_texts = 0
    second = build(docs_copy, tmp_path / "cache", mode, embedder=counting)
    assert second.from_cache and second.key == first.key and counting.embedded_texts == 0
    assert (second.embedded_chunks, second.num_chunks, second.num_documents) == (0, first.num_chunks, 7)
    assert second.chunks == first.chunks
    assert second.search(FACT_QUESTION, 4) == first.search(FACT_QUESTION, 4)


def test_changed_bytes_miss_the_cache(build: Callable[..., DocumentIndex], docs_copy: Path, tmp_path: Path) -> None:
    first = build(docs_copy, tmp_path, "bm25")
    with (docs_copy / "honeybees.txt").open("a") as file:
        file.write("Beekeepers call a swarm's new home a nest cavity.\n")
    second = build(docs_copy, tmp_path, "bm25")
    assert second.key != first.key and not second.from_cache
    assert second.search("swarm cavity", 1)[0].document_id == "honeybees.txt"


def test_the_key_covers_every_setting(embedder: EmbeddingModel, docs_copy: Path) -> None:
    def key(**changes: object) -> str:
        settings: dict[str, object] = dict(
            documents_folder=docs_copy, mode="hybrid", embedder=embedder, chunk_tokens=CHUNK_TOKENS,
            overlap_tokens=OVERLAP_TOKENS, tokenizer_id=TOKENIZER_ID,
        )
        return index_key(**{**settings, **changes})

    base = key()
    variants = [
        key(chunk_tokens=CHUNK_TOKENS + 1), key(overlap_tokens=OVERLAP_TOKENS + 1), key(mode="dense"),
        key(mode="bm25"), key(tokenizer_id="another-tokenizer"),
    ]
    assert key() == base and len({base, *variants}) == 6
    assert key(mode="bm25", embedder=None) == key(mode="bm25")  # BM25 does not depend on the embedder
    (docs_copy / "kitchen" / "sourdough.txt").rename(docs_copy / "kitchen" / "bread.txt")
    renamed = key()
    (docs_copy / "unrelated.csv").write_text("a,b\n")
    assert len({base, renamed}) == 2 and key() == renamed


def test_entries_appear_whole_or_not_at_all(
    build: Callable[..., DocumentIndex], docs_copy: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        with new_entry(cache, "0" * 64) as folder:
            (folder / MANIFEST_FILE).write_text("{}")
            raise RuntimeError("crash while writing")
    assert list(cache.iterdir()) == []
    (cache / f"{TEMPORARY_PREFIX}left-by-a-crash").mkdir()
    index = build(docs_copy, cache, "bm25")
    assert not index.from_cache
    entries = sorted(path.name for path in cache.iterdir() if not path.name.startswith(TEMPORARY_PREFIX))
    assert entries == [index.key] and (cache / index.key / MANIFEST_FILE).is_file()


def test_the_shared_cache_holds_only_whole_entries(indexes: dict[str, DocumentIndex], cache_dir: Path) -> None:
    assert sorted(path.name for path in cache_dir.iterdir()) == sorted(index.key for index in indexes.values())
    assert all(re.fullmatch("[0-9a-f]{64}", path.name) for path in cache_dir.iterdir())
