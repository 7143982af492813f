"""The native LoRA kernel (each token gathers its own slot; runs of one slot take matmuls) against the PyTorch
reference (every slot in use, masked), float32 and bfloat16, stacked parts of uneven widths, in mixed steps."""
from __future__ import annotations

import pytest
import torch

from engine.layers.lora import LoRAContext, LoRAStep, LoRAWeights, apply_lora
from engine.native.ops import apply_lora as native_apply_lora

# The reference rounds the shrunk rows to the dtype before expanding; the native kernel keeps them in float32.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=6e-2)}
SLOT_PATTERNS = {
    "decodes": [2, -1, 0, 1, 1, 3, -1, 0],
    "prefill runs and decodes": [1, -1, 3] + [2] * 20 + [-1] * 9 + [0] * 12 + [1],
    "base only": [-1] * 5,
    "one token": [3],
}


@pytest.fixture(autouse=True, scope="module")
def native_ops(native_kernels: None) -> None:
    """Every test here needs the native build."""


def random_slots(part_sizes: list[int], in_features: int, dtype: torch.dtype, seed: int) -> LoRAWeights:
    """Four slots of random A and B (products of unit scale), B zero outside each part's own columns, as
    LoRASlots.load leaves it."""
    generator = torch.Generator().manual_seed(seed)
    weights = LoRAWeights(LoRAContext(), 4, part_sizes, 8, in_features, dtype, torch.device("cpu"))
    weights.a.copy_(torch.randn(weights.a.shape, generator=generator) / in_features**0.5)
    weights.b.copy_(torch.randn(weights.b.shape, generator=generator) / 8**0.5)
    starts = [0] + weights.part_ends[:-1]
    for part, (start, end) in enumerate(zip(starts, weights.part_ends)):
        rows = weights.b[:, part * 8 : (part + 1) * 8]
        rows[:, :, :start] = 0
        rows[:, :, end:] = 0
    return weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("part_sizes,in_features", [([96, 32, 32], 64), ([200], 130), ([17, 17], 9)])
@pytest.mark.parametrize("pattern", SLOT_PATTERNS, ids=list(SLOT_PATTERNS))
def test_native_lora_matches_the_reference(
    dtype: torch.dtype, part_sizes: list[int], in_features: int, pattern: str
) -> None:
    token_slots = torch.tensor(SLOT_PATTERNS[pattern])
    weights = random_slots(part_sizes, in_features, dtype, seed=len(token_slots))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(len(token_slots), in_features, generator=generator).to(dtype)
    base = torch.randn(len(token_slots), sum(part_sizes), generator=generator).to(dtype)
    step = LoRAStep(token_slots, dtype)
    native, reference = base.clone(), base.clone()
    native_apply_lora(native, x, weights, step)
    if (token_slots >= 0).any():
        apply_lora(reference, x, weights, step)
    torch.testing.assert_close(native, reference, **TOLERANCE[dtype])
    untouched = token_slots < 0
    assert torch.equal(native[untouched], base[untouched])
    assert not torch.equal(native[~untouched], base[~untouched]) or not (~untouched).any()
