"""Exact inner-product search over unit vectors with faiss: the scores are cosine similarities."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from handler.retrieval.ranking import Hit


class Embedder(Protocol):
    """What the index needs of an embedding model (handler.embeddings.EmbeddingModel has it)."""

    def fingerprint(self) -> str: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


class DenseIndex:
    def __init__(self, index: faiss.Index) -> None:
        self._index = index

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> DenseIndex:
        """An index over unit rows of a float32 (n, dimension) array."""
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    @classmethod
    def load(cls, file: Path) -> DenseIndex:
        return cls(faiss.read_index(str(file)))

    def save(self, file: Path) -> None:
        faiss.write_index(self._index, str(file))

    def search(self, query_vector: np.ndarray, depth: int) -> list[Hit]:
        """The `depth` rows most similar to one unit vector, best first."""
        query = np.ascontiguousarray(query_vector.reshape(1, -1), dtype=np.float32)
        scores, positions = self._index.search(query, min(depth, self._index.ntotal))
        return [Hit(int(position), float(score)) for position, score in zip(positions[0], scores[0]) if position >= 0]
