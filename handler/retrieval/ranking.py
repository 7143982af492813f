"""Ranked lists of chunks, and their reciprocal-rank fusion."""
from __future__ import annotations

from typing import NamedTuple

DEFAULT_RRF_K = 60


class Hit(NamedTuple):
    """A chunk, by its position in the index's chunk list, and its score there (higher is better)."""

    position: int
    score: float


def reciprocal_rank_fusion(rankings: list[list[Hit]], rrf_k: int = DEFAULT_RRF_K) -> list[Hit]:
    """Every chunk in any ranking, scored by the sum of 1 / (rrf_k + rank) over the rankings holding it."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.position] = fused.get(hit.position, 0.0) + 1.0 / (rrf_k + rank)
    hits = [Hit(position, score) for position, score in fused.items()]
    return sorted(hits, key=lambda hit: (-hit.score, hit.position))
