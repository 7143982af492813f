"""A searchable index over a folder of documents: dense (faiss), lexical (BM25) or both fused, cached on disk.

A cache entry holds the chunks, the index files of the mode and a manifest; its key hashes everything the
index depends on, so a hit is loaded without embedding anything.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from handler.retrieval.cache import content_key, entry_folder, new_entry
from handler.retrieval.dense import DenseIndex, Embedder
from handler.retrieval.documents import Chunk, chunk_documents, document_files, load_documents
from handler.retrieval.lexical import LexicalIndex
from handler.retrieval.ranking import DEFAULT_RRF_K, Hit, reciprocal_rank_fusion

RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
EMBEDDING_MODES = ("dense", "hybrid")
LEXICAL_MODES = ("bm25", "hybrid")
CACHE_FORMAT = 1  # raise when the files of an entry change, so old entries stop matching
CHUNKS_FILE = "chunks.jsonl"
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.faiss"
LEXICAL_FOLDER = "bm25"


@dataclass(frozen=True)
class Passage:
    id: str
    document_id: str
    text: str
    score: float
    metadata: dict


def candidate_depth(top_k: int) -> int:
    """How many hits hybrid search takes from each side before fusing them."""
    return max(4 * top_k, 20)


@dataclass
class DocumentIndex:
    key: str
    mode: str
    chunks: list[Chunk]
    num_documents: int
    from_cache: bool
    embedded_chunks: int
    dense: Optional[DenseIndex]
    lexical: Optional[LexicalIndex]
    embedder: Optional[Embedder]
    rrf_k: int = DEFAULT_RRF_K

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @classmethod
    def build(
        cls,
        documents_folder: Path,
        cache_dir: Path,
        mode: str,
        embedder: Optional[Embedder],
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        chunk_tokens: int,
        overlap_tokens: int,
        tokenizer_id: str,
        rrf_k: int = DEFAULT_RRF_K,
    ) -> DocumentIndex:
        """The index of `documents_folder`, from `cache_dir` when an entry has the same key, else built and saved."""
        check_mode(mode, embedder)
        key = index_key(documents_folder, mode, embedder, chunk_tokens, overlap_tokens, tokenizer_id)
        entry = entry_folder(cache_dir, key)
        if entry.is_dir():
            return cls.load(entry, key, mode, embedder, rrf_k)
        documents = load_documents(documents_folder)
        chunks = chunk_documents(documents, encode, decode, chunk_tokens, overlap_tokens)
        index = cls.from_chunks(key, mode, chunks, len(documents), embedder, rrf_k)
        with new_entry(cache_dir, key) as folder:
            index.save(folder)
        return index

    @classmethod
    def from_chunks(
        cls, key: str, mode: str, chunks: list[Chunk], num_documents: int, embedder: Optional[Embedder], rrf_k: int
    ) -> DocumentIndex:
        if not chunks:
            raise ValueError("the documents hold no text to index")
        texts = [chunk.text for chunk in chunks]
        dense = DenseIndex.from_vectors(embedder.embed_texts(texts)) if embedder and mode in EMBEDDING_MODES else None
        lexical = LexicalIndex.from_texts(texts) if mode in LEXICAL_MODES else None
        embedded = len(chunks) if dense is not None else 0
        return cls(key, mode, chunks, num_documents, False, embedded, dense, lexical, embedder, rrf_k)

    @classmethod
    def load(cls, entry: Path, key: str, mode: str, embedder: Optional[Embedder], rrf_k: int) -> DocumentIndex:
        """The index saved in a cache entry; nothing is embedded."""
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        lines = (entry / CHUNKS_FILE).read_text(encoding="utf-8").splitlines()
        chunks = [Chunk(**json.loads(line)) for line in lines]
        dense = DenseIndex.load(entry / DENSE_FILE) if mode in EMBEDDING_MODES else None
        lexical = LexicalIndex.load(entry / LEXICAL_FOLDER) if mode in LEXICAL_MODES else None
        return cls(key, mode, chunks, manifest["num_documents"], True, 0, dense, lexical, embedder, rrf_k)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(json.dumps({"num_documents": self.num_documents, "mode": self.mode}))
        lines = [json.dumps(asdict(chunk)) for chunk in self.chunks]
        (folder / CHUNKS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if self.dense is not None:
            self.dense.save(folder / DENSE_FILE)
        if self.lexical is not None:
            self.lexical.save(folder / LEXICAL_FOLDER)

    def search(self, query: str, top_k: int) -> list[Passage]:
        """The `top_k` passages that best match `query`, best first (fewer when fewer chunks match)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if self.mode == "hybrid":
            hits = reciprocal_rank_fusion(self._rankings(query, candidate_depth(top_k)), self.rrf_k)
        else:
            hits = self._rankings(query, top_k)[0]
        return [self._passage(hit) for hit in hits[:top_k]]

    def _rankings(self, query: str, depth: int) -> list[list[Hit]]:
        """One ranking from each index this mode holds: dense first, then BM25."""
        rankings = []
        if self.dense is not None and self.embedder is not None:
            rankings.append(self.dense.search(self.embedder.embed_texts([query])[0], depth))
        if self.lexical is not None:
            rankings.append(self.lexical.search(query, depth))
        return rankings

    def _passage(self, hit: Hit) -> Passage:
        chunk = self.chunks[hit.position]
        return Passage(chunk.id, chunk.document_id, chunk.text, hit.score, dict(chunk.metadata))


def check_mode(mode: str, embedder: Optional[Embedder]) -> None:
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval mode must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
    if mode in EMBEDDING_MODES and embedder is None:
        raise ValueError(f"retrieval mode {mode!r} needs an embedding model")


def index_key(
    documents_folder: Path,
    mode: str,
    embedder: Optional[Embedder],
    chunk_tokens: int,
    overlap_tokens: int,
    tokenizer_id: str,
) -> str:
    """The cache key: every document file's relative path and bytes, and every setting the index depends on."""
    files = [
        (file.relative_to(documents_folder).as_posix(), file.read_bytes()) for file in document_files(documents_folder)
    ]
    settings = {
        "format": CACHE_FORMAT,
        "mode": mode,
        "chunk_tokens": chunk_tokens,
        "overlap_tokens": overlap_tokens,
        "tokenizer_id": tokenizer_id,
        "embedder": embedder.fingerprint() if embedder and mode in EMBEDDING_MODES else None,
    }
    return content_key(files, settings)
