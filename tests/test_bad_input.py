"""Bad input is rejected with a ValueError naming the field, before any engine state changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.sampling_params import (
    MAX_N, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY, MIN_TEMPERATURE,
)

PROMPT = [510, 3458, 282, 4649]
NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # an int no float can hold


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", 1e-40),
        ("temperature", 0.009),
        ("temperature", 2.01),
        ("temperature", NAN),
        ("temperature", INF),
        ("temperature", HUGE),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", NAN),
        ("top_p", HUGE),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", True),
        ("top_k", 5.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("min_p", NAN),
        ("min_p", -INF),
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", True),
        ("max_tokens", 0),
        ("max_tokens", 4.0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logprobs", True),
        ("min_tokens", -1),
        ("min_tokens", False),
        ("presence_penalty", 3.0),
        ("presence_penalty", NAN),
        ("presence_penalty", INF),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", -INF),
        ("frequency_penalty", HUGE),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-40),
        ("repetition_penalty", 2.5),
        ("repetition_penalty", NAN),
        ("repetition_penalty", INF),
        ("repetition_penalty", -HUGE),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.0),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", [2.0]),
        ("stop", [""]),
    ],
)
def test_sampling_params_reject_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be .+"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0),
        ("temperature", MIN_TEMPERATURE),
        ("temperature", MAX_TEMPERATURE),
        ("top_p", 1),
        ("min_p", 1.0),
        ("presence_penalty", -2),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", MIN_REPETITION_PENALTY),
        ("repetition_penalty", MAX_REPETITION_PENALTY),
        ("n", MAX_N),
        ("seed", 2**64 - 1),
        ("logprobs", 20),
    ],
)
def test_sampling_params_accept_the_bounds_themselves(field: str, value: object) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


@pytest.fixture(scope="module")
def llm(tiny_model, llm_factory) -> LLM:
    return llm_factory(tiny_model("llama"), num_kv_blocks=64, max_model_len=256)


def assert_untouched(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_requests_waiting == stats.num_requests_running == 0
    assert stats.blocks.num_free_blocks == stats.blocks.num_total_blocks


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([""], "prompt is empty"),
        ([[]], "prompt must be a non-empty"),
        ([PROMPT + [49152]], "outside the vocabulary"),
        ([PROMPT + [-1]], "outside the vocabulary"),
        ([PROMPT, PROMPT * 70], "exceeds max_model_len"),
    ],
)
def test_generate_rejects_bad_prompts_without_side_effects(llm: LLM, prompts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=4))
    assert_untouched(llm)


@pytest.mark.parametrize(
    "params, match",
    [
        (SamplingParams(temperature=1.0, top_k=10**30), r"^top_k must be -1 \(disabled\) or in \[1, 49152\]"),
        (SamplingParams(top_k=49153), r"^top_k must be .*got 49153"),
        (SamplingParams(stop_token_ids=[10**9], min_tokens=5), r"^stop_token_ids must be in \[0, 49152\)"),
        (SamplingParams(stop_token_ids=[2, 49152]), r"^stop_token_ids must be .*got 49152"),
        (SamplingParams(max_tokens=None, min_tokens=10**9), r"^min_tokens must be <= max_model_len \(256\)"),
    ],
)
def test_generate_rejects_params_beyond_the_model_without_side_effects(
    llm: LLM, params: SamplingParams, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate([PROMPT], params)
    assert_untouched(llm)


@pytest.mark.parametrize("timeout", [0, -1.0, NAN, INF, HUGE, True, "5"])
def test_make_request_rejects_a_timeout_that_is_not_a_positive_finite_number(llm: LLM, timeout: object) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be a finite number of seconds > 0"):
        llm.engine.make_request("timed", PROMPT, SamplingParams(max_tokens=2), timeout=timeout)
    assert_untouched(llm)


def test_largest_seed_runs_with_several_completions(llm: LLM) -> None:
    params = SamplingParams(n=2, seed=2**64 - 1, max_tokens=3, ignore_eos=True)
    [output] = llm.generate([PROMPT], params)
    assert [len(completion.token_ids) for completion in output.outputs] == [3, 3]


def test_prompt_plus_max_tokens_beyond_max_model_len(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"max_tokens.*\(250\).*max_model_len \(256\)"):
        llm.generate([PROMPT * 2], SamplingParams(max_tokens=250))
    assert_untouched(llm)


def test_duplicate_request_id_is_rejected(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(engine.make_request("dup", PROMPT, SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="request_id 'dup'"):
        engine.make_request("dup", PROMPT, SamplingParams(max_tokens=2))
    assert engine.stats().num_requests_waiting == 1
    engine.abort("dup")
    assert_untouched(llm)


def test_params_list_length_must_match(llm: LLM) -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, PROMPT], [SamplingParams()])
    assert_untouched(llm)


def test_unknown_engine_key_is_named() -> None:
    with pytest.raises(ValueError, match="max_num_seq'"):
        EngineConfig.from_dict({"max_num_seq": 4})


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(model=str(missing))


def test_corrupt_safetensors_is_named(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model("llama"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(folder))


def test_corrupt_gguf_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(model=str(broken))


def test_config_missing_fields_is_named(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "no-hidden-size"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json.*hidden_size"):
        LLM(model=str(folder))


def test_unsupported_architecture_lists_the_supported(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        LLM(model=str(folder))


def test_kv_budget_smaller_than_explicit_max_model_len(tiny_model) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(tiny_model("llama")), num_kv_blocks=4, max_model_len=256)
