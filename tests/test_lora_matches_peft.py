"""Greedy output with a LoRA adapter equals transformers + PEFT on the same adapter, token for token in float32."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from conftest import PROMPT, TinyAdapters
from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from lora_adapters import load_base, make_peft_adapter, peft_greedy

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


PATHS = {  # the native kernel in the one-call decoder stack, then layer by layer; the PyTorch reference
    "native_stack": dict(),
    "native_layers": dict(enforce_eager=True),
    "torch_reference": dict(enforce_eager=True, attention_backend="torch"),
}


@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
def test_each_tiny_adapter_matches_peft(
    tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM], path: str
) -> None:
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=64, **PATHS[path])
    assert (llm.engine.runner.model.model.native_stack is not None) == (path == "native_stack")
    for lora in tiny_adapters.requests():
        ours = llm.generate([PROMPT], GREEDY, lora_request=lora)[0].outputs[0].token_ids
        assert ours == peft_greedy(tiny_adapters.base, Path(lora.path), PROMPT, MAX_TOKENS), lora.name


def test_adapters_change_the_output(tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]) -> None:
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=64)
    base = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert base == peft_greedy(tiny_adapters.base, None, PROMPT, MAX_TOKENS)
    outputs = [llm.generate([PROMPT], GREEDY, lora_request=lora)[0].outputs[0].token_ids
               for lora in tiny_adapters.requests()]
    assert len({tuple(tokens) for tokens in outputs + [base]}) == 4


@pytest.mark.slow
def test_smollm2_adapter_matches_peft(smollm2_path: Path, tmp_path: Path) -> None:
    """Its engine and the float32 transformers model are freed afterwards: the suite's memory is near its limit."""
    adapter = make_peft_adapter(smollm2_path, tmp_path / "smollm2-lora", rank=8, seed=5)
    with LLM(str(smollm2_path), dtype="float32", quantization="none", enable_lora=True, num_kv_blocks=64) as llm:
        lora = LoRARequest("smol", str(adapter))
        ours = llm.generate([PROMPT], GREEDY, lora_request=lora)[0].outputs[0].token_ids
    try:
        assert ours == peft_greedy(smollm2_path, adapter, PROMPT, MAX_TOKENS)
        assert ours != peft_greedy(smollm2_path, None, PROMPT, MAX_TOKENS)
    finally:
        load_base.cache_clear()
