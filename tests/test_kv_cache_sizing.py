"""How many KV blocks a CUDA device gets: a profiling forward at max_num_batched_tokens, then
(total x gpu_memory_utilization - peak) / block bytes. The arithmetic and the profiling step run on CPU here."""
from __future__ import annotations

import pytest

from engine.model_runner import profile_step_inputs
from engine.worker import cuda_kv_blocks

GIB = 1024**3


def test_blocks_are_what_the_utilization_leaves_after_the_peak() -> None:
    assert cuda_kv_blocks(80 * GIB, 0.9, 20 * GIB, 2 * 1024**2) == (72 - 20) * 512
    assert cuda_kv_blocks(80 * GIB, 0.5, 39 * GIB, GIB) == 1


def test_no_room_for_one_block_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.3.*peak of 30.00 GiB"):
        cuda_kv_blocks(80 * GIB, 0.3, 30 * GIB, 2 * 1024**2)


def test_profile_step_is_the_largest_prefill_the_scheduler_can_make() -> None:
    step = profile_step_inputs(num_tokens=1000, max_model_len=512, max_num_seqs=256, block_size=16)
    assert step.query_start_loc.tolist() == [0, 512, 1000]
    assert step.context_lens.tolist() == [512, 488] and step.num_decodes == 0
    assert step.positions[510:514].tolist() == [510, 511, 0, 1]
    assert step.slot_mapping.max() < 16 and step.block_tables.shape == (2, 32) and not step.block_tables.any()
    assert step.sample_indices.tolist() == list(range(744, 1000))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_profile_step_runs_through_the_model(backend: str, tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), attention_backend=backend, num_kv_blocks=33, max_num_batched_tokens=300)
    runner = llm.engine.runner
    logits = runner.run(profile_step_inputs(300, 128, 4, runner.block_size))
    assert logits.shape == (4, 49152) and logits.isfinite().all()
