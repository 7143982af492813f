"""Which slice of each checkpoint dimension a tensor-parallel rank holds, and which TP sizes a model allows."""
from __future__ import annotations

from dataclasses import dataclass

from engine.models.config import ModelConfig


@dataclass(frozen=True)
class Partition:
    """Indices [start, start + size) of a checkpoint dimension of length `total`."""

    total: int
    start: int
    size: int

    @classmethod
    def whole(cls, total: int) -> "Partition":
        return cls(total, 0, total)

    @property
    def stop(self) -> int:
        return self.start + self.size

    def scaled(self, factor: int) -> "Partition":
        """The same slice counted in units `factor` times smaller (heads -> rows of head_dim each)."""
        return Partition(self.total * factor, self.start * factor, self.size * factor)


def split_evenly(total: int, rank: int, size: int) -> Partition:
    share = total // size
    return Partition(total, rank * share, share)


def kv_heads(num_kv_heads: int, rank: int, size: int) -> Partition:
    """Split the KV heads; with fewer KV heads than ranks each rank keeps one, shared by size/num_kv_heads ranks."""
    if num_kv_heads >= size:
        return split_evenly(num_kv_heads, rank, size)
    return Partition(num_kv_heads, rank // (size // num_kv_heads), 1)


def vocab_rows_per_rank(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size)


def vocab_rows(vocab_size: int, rank: int, size: int) -> Partition:
    """Rank r's rows of the vocabulary; every rank holds `vocab_rows_per_rank` rows, the last ones padding."""
    share = vocab_rows_per_rank(vocab_size, size)
    start = min(rank * share, vocab_size)
    return Partition(vocab_size, start, min(share, vocab_size - start))


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    return [size for size in range(1, config.num_heads + 1) if not _split_problems(config, size)]


def check_tp_size(config: ModelConfig, size: int) -> None:
    """ValueError naming the counts that `size` ranks cannot split, and the TP sizes that would work."""
    problems = _split_problems(config, size)
    if problems:
        raise ValueError(
            f"tensor_parallel_size {size} cannot split this model: {'; '.join(problems)}. "
            f"Valid tensor_parallel_size values: {valid_tp_sizes(config)}"
        )


def _split_problems(config: ModelConfig, size: int) -> list[str]:
    problems = []
    if config.num_heads % size:
        problems.append(f"{config.num_heads} attention heads are not divisible by {size}")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads neither divide into {size} parts nor into copies for {size} ranks")
    if config.intermediate_size % size:
        problems.append(f"intermediate size {config.intermediate_size} is not divisible by {size}")
    return problems
