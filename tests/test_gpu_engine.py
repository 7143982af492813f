"""The engine on CUDA: Triton kernels with decode CUDA graphs give the PyTorch path's greedy tokens (float32) and
transformers' tokens; half precision runs end to end. Skipped without a CUDA device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from generation_checks import PROMPTS, assert_same_generation, engine_greedy, greedy_with_logprobs, transformers_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2"])
def test_cuda_graphs_and_triton_match_the_torch_path_and_transformers(kind: str, tiny_model, llm_factory) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder: Path = tiny_model(kind)
    prompts_ids = [AutoTokenizer.from_pretrained(folder).encode(prompt) for prompt in PROMPTS]
    graphs = llm_factory(folder, device="cuda", num_kv_blocks=256, max_num_seqs=8)
    eager_torch = llm_factory(folder, device="cuda", num_kv_blocks=256, attention_backend="torch", enforce_eager=True)
    assert graphs.engine.runner.decode_graphs is not None
    ours = engine_greedy(graphs, prompts_ids, 32)
    assert ours == engine_greedy(eager_torch, prompts_ids, 32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt_ids, got in zip(prompts_ids, ours):
        assert got == transformers_greedy(reference, prompt_ids, 32)


@pytest.mark.slow
def test_smollm2_on_cuda_graphs_matches_transformers(smollm2_path: Path, llm_factory) -> None:
    from transformers import AutoModelForCausalLM

    llm = llm_factory(None, device="cuda", max_num_seqs=16, quantization="none")
    tokenizer = llm.get_tokenizer()
    prompts_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    for prompt_ids, got in zip(prompts_ids, engine_greedy(llm, prompts_ids, 48)):
        assert got == transformers_greedy(reference, prompt_ids, 48)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_end_to_end_with_graphs(dtype: str, llm_factory) -> None:
    llm = llm_factory(None, device="cuda", dtype=dtype, max_num_seqs=16, quantization="none")
    exact = llm_factory(None, device="cuda", max_num_seqs=16, quantization="none")
    assert llm.engine.runner.model.lm_head.weight.dtype == getattr(torch, dtype)
    tokenizer = llm.get_tokenizer()
    prompts_ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    half, full = engine_greedy(llm, prompts_ids, 8), engine_greedy(exact, prompts_ids, 8)
    agreeing = sum(got[:4] == expected[:4] for got, expected in zip(half, full))
    assert agreeing >= len(PROMPTS) - 1, (half, full)


def test_every_sampling_option_runs_on_cuda_and_a_seed_repeats(tiny_model, llm_factory) -> None:
    llm = llm_factory(tiny_model("llama"), device="cuda", num_kv_blocks=256)
    params = SamplingParams(
        n=2, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3,
        presence_penalty=0.2, seed=7, logprobs=3, max_tokens=16, min_tokens=4,
    )
    first, second = (llm.generate(["Once upon a time"], params)[0].outputs for _ in range(2))
    assert [out.token_ids for out in first] == [out.token_ids for out in second]
    assert all(len(out.token_ids) >= 4 and len(out.logprobs) == len(out.token_ids) for out in first)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_weights_run_the_triton_matmul_with_graphs(quantization: str, tiny_model, llm_factory) -> None:
    folder, settings = tiny_model("qwen2"), dict(device="cuda", quantization=quantization, num_kv_blocks=256)
    dense = llm_factory(folder, quantized_dense_rows=1, **settings)
    quantized = llm_factory(folder, quantized_dense_rows=None, **settings)
    assert_same_generation(greedy_with_logprobs(quantized, PROMPTS, 12), greedy_with_logprobs(dense, PROMPTS, 12))


def test_lora_adapters_on_cuda_match_peft_and_mix_with_graph_steps(tiny_adapters, llm_factory) -> None:
    """LoRA steps run the Triton shrink/expand kernels eagerly; base-model decode steps still replay graphs."""
    from lora_adapters import peft_greedy

    llm = llm_factory(tiny_adapters.base, device="cuda", enable_lora=True, num_kv_blocks=256, max_num_seqs=8)
    assert llm.engine.runner.decode_graphs is not None
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    loras = [*tiny_adapters.requests(), None]
    prompt = [510, 3458, 282, 4649, 314, 253, 1345, 30]
    mixed = llm.generate([prompt] * len(loras), params, lora_request=loras)
    for lora, output in zip(loras, mixed):
        expected = peft_greedy(tiny_adapters.base, None if lora is None else Path(lora.path), prompt, 16)
        assert output.outputs[0].token_ids == expected, lora


def test_grammar_bitmasks_constrain_cuda_logits_beside_unconstrained_rows(tiny_model, llm_factory) -> None:
    """The bitmask is filled on the CPU and applied to the logits on the GPU; unconstrained rows keep their tokens."""
    import re

    from engine.structured_output import StructuredOutputsParams

    llm = llm_factory(tiny_model("llama"), device="cuda", num_kv_blocks=256, max_num_seqs=8)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    phone = SamplingParams(temperature=1.0, seed=1, max_tokens=32,
                           structured_outputs=StructuredOutputsParams(regex=r"\d{3}-\d{4}"))
    prompt = [510, 3458, 282, 4649, 314, 253, 1345, 30]
    alone = llm.generate([prompt], free)[0].outputs[0].token_ids
    mixed = llm.generate([prompt, prompt], [free, phone])
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch(r"\d{3}-\d{4}", mixed[1].outputs[0].text) and mixed[1].outputs[0].finish_reason == "stop"
