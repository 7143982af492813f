"""Plugin logits processors: named by import path in EngineConfig, they change only the rows they apply to, take
their arguments from SamplingParams.extra_args, and a path that names no processor fails the engine's start."""
from __future__ import annotations

from typing import Any

import pytest

from conftest import random_prompts, token_ids
from engine import LLM, SamplingParams
from engine.logits_processors import load_logits_processors

GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model: Any, llm_factory: Any) -> LLM:
    return llm_factory(tiny_model("llama"), num_kv_blocks=512, enable_prefix_caching=False,
                       logits_processors=["example_logits_processors:BanTokens"])


def test_a_plugin_processor_changes_only_the_rows_it_applies_to(llm: LLM, alone_llm: Any) -> None:
    prompts = random_prompts(3, 10, 30, seed=12)
    plain = SamplingParams(**GREEDY)
    expected = token_ids(alone_llm.generate(prompts, plain))
    banned = sorted({token for row in expected for token in row})
    outputs = token_ids(llm.generate(prompts, [plain, SamplingParams(**GREEDY, extra_args={"ban": banned}), plain]))
    assert [outputs[0], outputs[2]] == [expected[0], expected[2]]
    assert not set(outputs[1]) & set(banned)


@pytest.mark.parametrize("spec, message", [
    ("example_logits_processors:Missing", "cannot import 'example_logits_processors:Missing'"),
    ("no_such_module.Processor", "cannot import 'no_such_module.Processor'"),
    ("engine.sequence:Sequence", "is not a LogitsProcessor subclass"),
])
def test_a_path_that_names_no_processor_is_a_value_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^logits_processors: .*{message}"):
        load_logits_processors([spec])


def test_logits_processors_must_be_a_list(tiny_model: Any) -> None:
    with pytest.raises(ValueError, match="^logits_processors must be a list"):
        LLM(model=str(tiny_model("llama")), logits_processors="example_logits_processors:BanTokens")


def test_extra_args_must_be_a_dict() -> None:
    with pytest.raises(ValueError, match="^extra_args must be a dict"):
        SamplingParams(extra_args=[("ban", [1])])


def test_a_processor_given_as_an_instance_is_used_as_is() -> None:
    from example_logits_processors import BanTokens

    instance = BanTokens()
    assert load_logits_processors([instance])[1] is instance
