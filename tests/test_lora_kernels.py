"""The multi-LoRA Triton kernels (shrink, expand, both) against a PyTorch gather over the adapter slots."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.lora import apply_lora_triton, lora_expand_, lora_shrink
from paged_kv import DEVICE, TOLERANCE, relative_error

# tokens, slots, rows (parts * max_rank), input features, output features: odd sizes, and sizes over the blocks
SHAPES = [(5, 3, 8, 64, 96), (7, 4, 48, 300, 200), (3, 2, 3, 17, 5)]
SHRINK_TOLERANCE = 1e-5  # both sides sum the same values in float32, in another order


def reference_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    z = torch.einsum("tk,trk->tr", x.float(), a[slots.clamp(min=0)].float())
    return z * (slots >= 0)[:, None]


def reference_expand(out: torch.Tensor, z: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    summed = (out.float() + torch.einsum("tr,trn->tn", z.float(), b[slots.clamp(min=0)].float())).to(out.dtype)
    return torch.where((slots >= 0)[:, None], summed, out)


def random_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """x, a, b, out and slots for `shape`: every slot and -1 at least once, then `tokens` random ones, shuffled."""
    tokens, num_slots, rows, k, n = shape
    generator = torch.Generator().manual_seed(seed)
    slots = torch.cat([torch.arange(-1, num_slots), torch.randint(-1, num_slots, (tokens,), generator=generator)])
    slots = slots[torch.randperm(len(slots), generator=generator)]
    tensors = {
        "x": torch.randn(len(slots), k, generator=generator), "a": torch.randn(num_slots, rows, k, generator=generator),
        "b": torch.randn(num_slots, rows, n, generator=generator), "out": torch.randn(len(slots), n, generator=generator),
    }
    return {**{name: t.to(DEVICE, dtype) for name, t in tensors.items()}, "slots": slots.to(DEVICE)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_gathers_each_tokens_adapter(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    case = random_case(shape, dtype, seed=shape[2])
    z = lora_shrink(case["x"], case["a"], case["slots"])
    assert z.dtype == torch.float32 and z.shape == (len(case["slots"]), shape[2])
    assert relative_error(z, reference_shrink(case["x"], case["a"], case["slots"])) < SHRINK_TOLERANCE
    assert torch.all(z[case["slots"] < 0] == 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expand_adds_in_place_and_leaves_rows_without_adapter_alone(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    case = random_case(shape, dtype, seed=shape[3])
    z = torch.randn(len(case["slots"]), shape[2], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, before = case["out"], case["out"].clone()
    lora_expand_(out, z, case["b"], case["slots"])
    with_slot = case["slots"] >= 0
    ref = reference_expand(before, z, case["b"], case["slots"])
    assert relative_error(out[with_slot], ref[with_slot]) < TOLERANCE[dtype]
    assert torch.equal(out[~with_slot], before[~with_slot])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_lora_writes_through_strided_output_rows(dtype: torch.dtype) -> None:
    case = random_case((9, 3, 48, 300, 200), dtype, seed=7)
    fused = torch.randn(len(case["slots"]), 260).to(DEVICE, dtype)
    out, before = fused[:, 30:230], fused.clone()  # one projection's columns of a fused output
    apply_lora_triton(out, case["x"], case["a"], case["b"], case["slots"])
    z = reference_shrink(case["x"], case["a"], case["slots"])
    assert relative_error(out, reference_expand(before[:, 30:230], z, case["b"], case["slots"])) < TOLERANCE[dtype]
    assert torch.equal(fused[:, :30], before[:, :30]) and torch.equal(fused[:, 230:], before[:, 230:])
    assert torch.equal(out[case["slots"] < 0], before[:, 30:230][case["slots"] < 0])


def test_no_token_with_an_adapter_changes_nothing() -> None:
    case = random_case((6, 2, 8, 64, 96), torch.bfloat16, seed=3)
    slots = torch.full_like(case["slots"], -1)
    out, before = case["out"], case["out"].clone()
    assert torch.equal(lora_shrink(case["x"], case["a"], slots), torch.zeros(len(slots), 8, device=DEVICE))
    apply_lora_triton(out, case["x"], case["a"], case["b"], slots)
    assert torch.equal(out, before)


def test_no_tokens_at_all() -> None:
    a, b = torch.randn(2, 8, 64, device=DEVICE), torch.randn(2, 8, 96, device=DEVICE)
    out, slots = torch.empty(0, 96, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE)
    assert lora_shrink(torch.empty(0, 64, device=DEVICE), a, slots).shape == (0, 8)
    apply_lora_triton(out, torch.empty(0, 64, device=DEVICE), a, b, slots)
