"""BM25 over bm25s, with its own tokenizer (lowercase words, English stopwords removed)."""
from __future__ import annotations

from pathlib import Path

import bm25s
import numpy as np

from handler.retrieval.ranking import Hit

STOPWORDS = "en"


class LexicalIndex:
    def __init__(self, retriever: bm25s.BM25) -> None:
        self._retriever = retriever

    @classmethod
    def from_texts(cls, texts: list[str]) -> LexicalIndex:
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False), show_progress=False)
        return cls(retriever)

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        return cls(bm25s.BM25.load(str(folder), show_progress=False))

    def save(self, folder: Path) -> None:
        self._retriever.save(str(folder), show_progress=False)

    def search(self, query: str, depth: int) -> list[Hit]:
        """The `depth` best-scoring texts holding at least one of the query's words, best first."""
        tokenized = bm25s.tokenize(query, stopwords=STOPWORDS, return_ids=False, show_progress=False)
        words = [word for word in tokenized[0] if word]  # bm25s returns [""] for a query with no words
        if not words:
            return []
        scores = self._retriever.get_scores(words)
        matching = np.flatnonzero(scores > 0)
        best = matching[np.argsort(-scores[matching], kind="stable")][:depth]
        return [Hit(int(position), float(scores[position])) for position in best]
