"""Random paged KV caches and the PyTorch reference the Triton kernel tests compare against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.torch_backend import prefill_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # on ||out - ref|| / ||ref||


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, width], blocks shuffled over the cache
    context_lens: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def context(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [context_len, Hkv, D] of sequence `seq`, in order."""
        blocks = self.block_tables[seq]
        length = int(self.context_lens[seq])
        return self.k_cache[blocks].flatten(0, 1)[:length], self.v_cache[blocks].flatten(0, 1)[:length]


def random_paged_kv(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0
) -> PagedKV:
    """Caches of random values with every sequence's blocks scattered at random, plus some blocks no one owns."""
    generator = torch.Generator().manual_seed(seed)
    width = max(-(-length // block_size) for length in context_lens)
    num_blocks = width * len(context_lens) + 3
    order = torch.randperm(num_blocks, generator=generator)
    block_tables = order[: width * len(context_lens)].view(len(context_lens), width)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedKV(
        torch.randn(shape, generator=generator).to(DEVICE, dtype),
        torch.randn(shape, generator=generator).to(DEVICE, dtype),
        block_tables.to(DEVICE),
        torch.tensor(context_lens, device=DEVICE),
    )


def reference_attention(q: torch.Tensor, kv: PagedKV, seq: int, scale: float) -> torch.Tensor:
    """The PyTorch path: queries q [Lq, Hq, D] are the last Lq tokens of sequence `seq`'s context."""
    keys, values = kv.context(seq)
    return prefill_attention(q.cpu(), keys.cpu(), values.cpu(), scale).to(q.device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write fails the comparison."""
    return torch.full_like(tensor, float("nan"))
