"""The fp8 KV cache (kv_cache_dtype fp8_e4m3 / fp8_e5m2): each path's cache write stores value / scale within fp8
rounding and saturated, as the PyTorch path does; attention over an fp8 cache stays close to a float32 cache and
the native and Triton kernels give the PyTorch path's output on the same cache; engines get twice the blocks, take
kv_cache_scale or measure positive finite scales, agree across backends with prefix hits, chunked prefill and
tensor parallelism, and SmolLM2's greedy tokens mostly follow bfloat16's."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.attention import native_backend, torch_backend, triton_backend
from engine.attention.fp8 import dequantize, quantize
from engine.attention.metadata import AttentionMetadata, cache_slots
from engine.kernels.kv_cache_write import write_kv_cache as triton_write_kv_cache
from engine.perplexity import perplexity, token_logprobs
from engine.step_inputs import StepInputs
from generation_checks import assert_same_generation, greedy_with_logprobs
from paged_kv import TOLERANCE, relative_error

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 3, 64, 16, 40
# (cached prefix, query length): decodes first, then a whole prompt and chunks behind a cached prefix
CHUNKS = [(40, 1), (300, 1), (0, 45), (32, 20), (21, 7)]
# ||fp8 - float32 cache|| / ||float32 cache|| of the attention output: measured 0.044 (e4m3) and 0.085 (e5m2)
FP8_ATTENTION_ERROR = {"fp8_e4m3": 0.06, "fp8_e5m2": 0.12}
WRITERS: dict[str, Callable[..., None]] = {
    "torch": torch_backend.write_kv_cache,
    "native": lambda *args: torch.ops.pagedserve.write_kv_cache(*args),
    "triton": triton_write_kv_cache,
}
BACKENDS = {"native": native_backend.paged_attention, "triton": triton_backend.paged_attention}
ENGINE_SETTINGS = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=16, kv_cache_scale=0.05)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(autouse=True, scope="module")
def native_ops(native_kernels: None) -> None:
    """The native writer and backend need the build (the conftest fixture builds it once per session)."""


def realistic_kv(num_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose channels have log-normal magnitudes (a few large ones, as a trained model's keys), values normal."""
    channels = torch.randn(NUM_KV_HEADS, HEAD_DIM, generator=generator).exp()
    keys = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator) * channels
    return keys, torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)


def fp8_rounding_bound(expected: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of fp8 `dtype` at each value (subnormals included), scaled."""
    info = torch.finfo(dtype)
    return (expected.abs() + scale * info.tiny) * info.eps / 2


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_write_round_trips_within_fp8_rounding_saturated_as_the_pytorch_path_stores(
    writer: str, name: str, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(1)
    keys, values = realistic_kv(48, generator)
    fp8, scales = FP8[name], (torch.tensor([0.02]), torch.tensor([0.3]))
    keys[0, 0, :4] = torch.tensor([1e6, -1e6, 1e-9, -1e-9])  # saturated, and far below the smallest subnormal
    k, v = keys.to(dtype), values.to(dtype)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=generator)[:48]
    caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=fp8) for _ in range(2)]
    WRITERS[writer](k, v, *caches, slots, *scales)
    for x, cache, scale in zip((k, v), caches, scales):
        stored = cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots]
        limit = torch.finfo(fp8).max * scale
        expected = x.float().clamp(-limit, limit)
        error = (dequantize(stored, scale, torch.float32) - expected).abs()
        assert (error <= fp8_rounding_bound(expected, scale, fp8)).all()
        assert torch.equal(stored.float(), quantize(x, scale, fp8).float())
    fp8_max = torch.finfo(fp8).max
    assert caches[0].view(-1, NUM_KV_HEADS, HEAD_DIM)[slots[0], 0, :4].float().tolist() == [fp8_max, -fp8_max, 0, 0]


@pytest.mark.parametrize("writer", ["native", "triton"])
def test_the_kernel_writes_skip_padding_slots(writer: str) -> None:
    k, v = realistic_kv(6, torch.Generator().manual_seed(2))
    slots = torch.tensor([5, 17, -1, 0, 31, -1])
    caches = [torch.zeros(2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn) for _ in range(2)]
    WRITERS[writer](k, v, *caches, slots, torch.tensor([0.01]), torch.tensor([0.01]))
    written = torch.zeros(2 * BLOCK_SIZE, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    for cache in caches:
        rows = cache.view(-1, NUM_KV_HEADS * HEAD_DIM).float()
        assert rows[written].count_nonzero() > 0 and rows[~written].count_nonzero() == 0


class PagedBatch:
    """CHUNKS over random block tables: every context's keys and values, which of them are this step's (the rest
    are the cached prefixes), this step's queries and its metadata."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        context_lens = [prefix + query for prefix, query in CHUNKS]
        width = -(-max(context_lens) // BLOCK_SIZE)
        self.num_blocks = width * len(CHUNKS) + 3
        tables = torch.randperm(self.num_blocks, generator=generator)[: width * len(CHUNKS)].view(len(CHUNKS), width)
        self.keys, self.values = realistic_kv(sum(context_lens), generator)
        seq = torch.repeat_interleave(torch.arange(len(CHUNKS)), torch.tensor(context_lens))
        positions = torch.cat([torch.arange(length) for length in context_lens])
        self.slots = cache_slots(tables, seq, positions, BLOCK_SIZE)
        self.new = positions >= torch.tensor([prefix for prefix, _ in CHUNKS])[seq]
        self.q = torch.randn(int(self.new.sum()), NUM_KV_HEADS * GROUP, HEAD_DIM, generator=generator)
        self.metadata = self._metadata(tables, context_lens, positions[self.new])

    def _metadata(self, tables: torch.Tensor, context_lens: list[int], positions: torch.Tensor) -> AttentionMetadata:
        query_lens = torch.tensor([query for _, query in CHUNKS])
        inputs = StepInputs(
            input_ids=torch.zeros(len(positions), dtype=torch.long), positions=positions,
            slot_mapping=self.slots[self.new], block_tables=tables, context_lens=torch.tensor(context_lens),
            query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]),
            sample_indices=torch.zeros(0, dtype=torch.long), num_decodes=sum(query == 1 for _, query in CHUNKS),
        )
        return inputs.metadata(BLOCK_SIZE, torch.device("cpu"))

    def scales(self, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales the engine would measure: the largest |k| and |v| at half the fp8 maximum."""
        limit = torch.finfo(cache_dtype).max
        return torch.tensor([2 * self.keys.abs().max() / limit]), torch.tensor([2 * self.values.abs().max() / limit])

    def attend(self, kernel: Callable[..., torch.Tensor], dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.Tensor:
        """`kernel` over caches of `cache_dtype` holding the prefixes: it writes this step's keys and attends."""
        scales = self.scales(cache_dtype) if cache_dtype in FP8.values() else (None, None)
        caches = [torch.zeros(self.num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=cache_dtype) for _ in "kv"]
        k, v, cached = self.keys.to(dtype), self.values.to(dtype), ~self.new
        torch_backend.write_kv_cache(k[cached], v[cached], *caches, self.slots[cached], *scales)
        out = kernel(self.q.to(dtype), k[self.new], v[self.new], *caches, self.metadata, HEAD_DIM**-0.5, *scales)
        return out.float()


@pytest.fixture(scope="module")
def batch() -> PagedBatch:
    return PagedBatch()


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_an_fp8_cache_stays_close_to_a_float32_cache(
    backend: str, name: str, dtype: torch.dtype, batch: PagedBatch
) -> None:
    reference = batch.attend(torch_backend.paged_attention, torch.float32, torch.float32)
    kernel = BACKENDS.get(backend, torch_backend.paged_attention)
    error = relative_error(batch.attend(kernel, dtype, FP8[name]), reference)
    assert error < FP8_ATTENTION_ERROR[name]
    assert error > 3 * relative_error(batch.attend(kernel, dtype, dtype), reference)  # the cache did hold fp8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_and_triton_give_the_pytorch_paths_output_on_the_same_fp8_cache(
    backend: str, name: str, dtype: torch.dtype, batch: PagedBatch
) -> None:
    expected = batch.attend(torch_backend.paged_attention, dtype, FP8[name])
    assert relative_error(batch.attend(BACKENDS[backend], dtype, FP8[name]), expected) < TOLERANCE[dtype]


def test_an_fp8_cache_holds_twice_the_blocks_of_bfloat16_in_the_same_memory(
    tiny_model, llm_factory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dict(dtype="bfloat16", load_format="dummy", kv_cache_memory_gb=1 / 512)  # bfloat16 blocks of 4 KiB
    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        fp8 = llm_factory(tiny_model("llama"), kv_cache_dtype="fp8_e4m3", **settings).engine.runner
    bf16 = llm_factory(tiny_model("llama"), **settings).engine.runner
    assert bf16.num_kv_blocks == 512 and fp8.num_kv_blocks == 1024
    assert fp8.model.attention_layers()[0].k_cache.dtype == torch.float8_e4m3fn
    assert "1024 blocks of 16 tokens (0.00 GiB, fp8_e4m3, 2.0x the tokens of bfloat16)" in caplog.text


@pytest.mark.parametrize("backend,enforce_eager", [("native", False), ("native", True), ("triton", False)])
def test_fp8_engines_give_the_pytorch_paths_tokens_with_prefix_hits_and_chunked_prefill(
    backend: str, enforce_eager: bool, tiny_model, llm_factory
) -> None:
    folder = tiny_model("llama")
    settings = dict(kv_cache_dtype="fp8_e4m3", **ENGINE_SETTINGS)
    expected = greedy_with_logprobs(llm_factory(folder, attention_backend="torch", **settings), PROMPTS, 12)
    llm = llm_factory(folder, attention_backend=backend, enforce_eager=enforce_eager, **settings)
    assert_same_generation(greedy_with_logprobs(llm, PROMPTS, 12), expected)
    hits_before = llm.engine.stats().blocks.prefix_cache_hits
    assert_same_generation(greedy_with_logprobs(llm, PROMPTS, 12), expected)
    assert llm.engine.stats().blocks.prefix_cache_hits > hits_before


def test_tensor_parallel_ranks_keep_fp8_shards_of_the_cache(tiny_model, llm_factory) -> None:
    folder = tiny_model("llama")
    settings = dict(kv_cache_dtype="fp8_e4m3", **ENGINE_SETTINGS)
    expected = greedy_with_logprobs(llm_factory(folder, attention_backend="torch", **settings), PROMPTS, 12)
    tp2 = llm_factory(folder, tensor_parallel_size=2, **settings)
    assert_same_generation(greedy_with_logprobs(tp2, PROMPTS, 12), expected)


def test_kv_cache_scale_from_the_config_is_every_layers_scale(tiny_model, llm_factory) -> None:
    folder = tiny_model("llama")
    settings = dict(kv_cache_dtype="fp8_e4m3", **ENGINE_SETTINGS)
    llm = llm_factory(folder, **settings)
    layers = llm.engine.runner.model.attention_layers()
    assert all(torch.equal(scale, torch.tensor([0.05])) for layer in layers for scale in (layer.k_scale, layer.v_scale))
    saturating = llm_factory(folder, **{**settings, "kv_cache_scale": 1e-4})  # stores nothing above 0.045
    assert greedy_with_logprobs(saturating, PROMPTS, 4) != greedy_with_logprobs(llm, PROMPTS, 4)


@pytest.mark.parametrize("name", FP8)
def test_measured_scales_are_positive_finite_and_each_layers_own(name: str, tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), kv_cache_dtype=name, num_kv_blocks=64)
    layers = llm.engine.runner.model.attention_layers()
    scales = torch.cat([torch.cat([layer.k_scale, layer.v_scale]) for layer in layers])
    assert scales.isfinite().all() and (scales > 0).all()
    assert len(set(scales.tolist())) == len(scales)
    assert (scales * torch.finfo(FP8[name]).max < 100).all()  # about twice the largest |k| or |v|, not 1 x fp8 max


@pytest.mark.slow
def test_smollm2_with_an_fp8_cache_keeps_bfloat16s_first_tokens_and_nearly_its_perplexity(llm_factory) -> None:
    """Measured over the text's first 512 tokens: perplexity +1.2% (e4m3) and +1.4% (e5m2) against a bfloat16
    cache (+0.9% and +2.2% over 2,048 tokens)."""
    settings = dict(dtype="bfloat16", quantization="none")
    bf16 = llm_factory(None, **settings)  # test_cpu_bfloat16's engine
    token_ids = bf16.get_tokenizer().encode((Path(__file__).with_name("data") / "coriolanus_act1.txt").read_text())
    reference = perplexity(token_logprobs(bf16.engine.runner, token_ids[:512], 512))
    first_tokens = [seq[0][0] for seq in greedy_with_logprobs(bf16, PROMPTS, 1)]
    for name, limit in (("fp8_e4m3", 0.02), ("fp8_e5m2", 0.04)):
        fp8 = llm_factory(None, kv_cache_dtype=name, num_kv_blocks=32, **settings)
        assert [seq[0][0] for seq in greedy_with_logprobs(fp8, PROMPTS, 1)] == first_tokens, name
        change = perplexity(token_logprobs(fp8.engine.runner, token_ids[:512], 512)) / reference - 1
        assert 0 < abs(change) < limit, name
