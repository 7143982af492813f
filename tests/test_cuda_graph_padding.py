"""The decode CUDA graphs' static buffers: a step padded to its bucket computes what the eager step computes and
writes no cache slot but its own. Run eagerly on the CPU with the (interpreted) Triton kernels; the capture
itself needs CUDA (tests/test_gpu_engine.py)."""
from __future__ import annotations

import torch

from engine import SamplingParams
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from engine.model_runner import ModelRunner


def test_buckets_cover_every_batch_size_up_to_max_num_seqs() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256] and len(graph_batch_sizes(256)) == 35


def test_padded_decode_step_matches_the_eager_step(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), attention_backend="triton", num_kv_blocks=64, block_size=8)
    engine = llm.engine
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True)))
    try:
        engine.step()  # the prompts' prefill: the next step is decode-only
        check_padded_step(engine.runner, engine.scheduler.schedule())
    finally:
        for i in range(len(prompts)):
            engine.abort(f"r{i}")


def check_padded_step(runner: ModelRunner, batch: list) -> None:
    assert [item.num_new_tokens for item in batch] == [1, 1, 1]
    inputs = runner._prepare_inputs(batch)
    graphs = DecodeGraphs(runner.model, max_num_seqs=8, max_model_len=64, block_size=8, device=runner.device)
    size = graphs.batch_size_for(inputs)
    assert size == 4
    layers = runner.model.attention_layers()
    before = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in layers]
    eager = runner.model(inputs.input_ids, inputs.positions, inputs.metadata(8, runner.device))
    eager_caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in layers]
    for layer, (k, v) in zip(layers, before):
        layer.k_cache.copy_(k)
        layer.v_cache.copy_(v)

    graphs.fill(inputs, size)
    padded = graphs.forward(size)

    close = dict(rtol=1e-5, atol=1e-5)  # not bit-equal: split counts and matmul shapes differ
    torch.testing.assert_close(padded[:3], eager, **close)
    assert padded[3:].isfinite().all()
    step_slots = torch.zeros(before[0][0].shape[:2], dtype=torch.bool).flatten()
    step_slots[inputs.slot_mapping] = True
    for layer, (k, v), (eager_k, eager_v) in zip(layers, before, eager_caches):
        for cache, old, new in ((layer.k_cache, k, eager_k), (layer.v_cache, v, eager_v)):
            assert torch.equal(cache.flatten(0, 1)[~step_slots], old.flatten(0, 1)[~step_slots])
            torch.testing.assert_close(cache.flatten(0, 1)[step_slots], new.flatten(0, 1)[step_slots], **close)
