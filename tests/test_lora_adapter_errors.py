"""A bad adapter is a ValueError that names the problem, before anything is loaded or queued; the engine goes on
serving."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import PROMPT, TinyAdapters
from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from lora_adapters import make_peft_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def broken_copy(adapters: TinyAdapters, tmp_path: Path, edit: Callable[[Path], None]) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(adapters.full, folder)
    edit(folder)
    return str(folder)


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    return edit


BROKEN = {
    "no config": (lambda folder: (folder / "adapter_config.json").unlink(), "no adapter_config.json"),
    "config not json": (lambda folder: (folder / "adapter_config.json").write_text("{r: 8"), "not valid JSON"),
    "no weights": (lambda folder: (folder / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "weights not safetensors": (
        lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"garbage"), "cannot be read"),
    "rank above max_lora_rank": (edit_config(r=32), "rank 32 exceeds max_lora_rank (16)"),
    "rank not an integer": (edit_config(r="eight"), "r must be a positive integer"),
    "rank unlike the tensors": (edit_config(r=4), "has shape (8, 128), expected (4, 128)"),
    "target the model lacks": (edit_config(target_modules=["q_proj", "lm_head"]), "['lm_head']"),
    "dora": (edit_config(use_dora=True), "['use_dora']"),
    "not lora": (edit_config(peft_type="IA3"), "peft_type 'IA3'"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_adapter_is_refused_by_name(
    case: str, tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM], tmp_path: Path
) -> None:
    edit, message = BROKEN[case]
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=64)
    loaded = llm.engine.list_loras()
    lora = LoRARequest("broken", broken_copy(tiny_adapters, tmp_path, edit))
    with pytest.raises(ValueError, match="'broken'") as error:
        llm.engine.add_lora(lora)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="'broken'"):
        llm.generate([PROMPT], GREEDY, lora_request=lora)
    assert llm.engine.list_loras() == loaded and not llm.engine.has_unfinished_requests()
    assert len(llm.generate([PROMPT], GREEDY, lora_request=tiny_adapters.requests()[0])[0].outputs[0].token_ids) == 4


def test_an_adapter_for_another_model_shape_is_refused(
    tiny_adapters: TinyAdapters, tiny_model: Callable[[str], Path], llm_factory: Callable[..., LLM], tmp_path: Path
) -> None:
    other = make_peft_adapter(tiny_model("qwen2"), tmp_path / "qwen2-lora", rank=4, targets=("k_proj",))
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=64)
    with pytest.raises(ValueError, match=r"layer 0 k_proj.lora_B has shape \(64, 4\), expected \(32, 4\)"):
        llm.engine.add_lora(LoRARequest("qwen2", str(other)))


def test_a_missing_folder_is_refused(tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]) -> None:
    llm = llm_factory(tiny_adapters.base, enable_lora=True, num_kv_blocks=64)
    with pytest.raises(ValueError, match="is not a folder"):
        llm.engine.add_lora(LoRARequest("nowhere", "/nonexistent/adapter"))


def test_adapters_need_enable_lora(tiny_adapters: TinyAdapters, llm_factory: Callable[..., LLM]) -> None:
    llm = llm_factory(tiny_adapters.base, num_kv_blocks=64)
    with pytest.raises(ValueError, match="enable_lora: true"):
        llm.generate([PROMPT], GREEDY, lora_request=tiny_adapters.requests()[0])


@pytest.mark.parametrize("settings, message", [
    ({"max_loras": 0}, "max_loras must be a positive integer"),
    ({"max_lora_rank": -1}, "max_lora_rank must be a positive integer"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2) must be >= max_loras (4)"),
    ({"enable_lora": "yes"}, "enable_lora must be true or false"),
])
def test_lora_settings_are_checked(settings: dict, message: str) -> None:
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**settings)
