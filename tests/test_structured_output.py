"""Structured outputs: sampled outputs obey their JSON schema, regex, choice or grammar and end with "stop" when the
grammar completes; constrained rows leave the rest of their batch unchanged and survive preemption; bad constraints
are ValueErrors before anything is queued."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from conftest import random_prompts, run_to_completion, token_ids
from engine import SamplingParams
from engine.structured_output import StructuredOutputsParams
from engine.structured_output.grammar import GrammarCompiler

SEEDS = range(4)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "role", "address", "tags"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
SUM_GRAMMAR = 'root ::= num " " op " " num\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
SUM_PATTERN = r"[1-9][0-9]? [+*-] [1-9][0-9]?"


def constrained(kind: dict[str, Any], **params: Any) -> SamplingParams:
    """Sampled at temperature 1 unless `params` say otherwise, up to 256 tokens."""
    params = {"temperature": 1.0, "max_tokens": 256, **params}
    return SamplingParams(structured_outputs=StructuredOutputsParams(**kind), **params)


@pytest.fixture(scope="module")
def smollm2(llm_factory: Any) -> Any:
    return llm_factory(None, quantization="none")


def chat_prompt(llm: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return llm.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sampled_texts(llm: Any, question: str, seeds: Any = SEEDS, n: int = 1, **kind: Any) -> list[str]:
    """`n` completions per seed at temperature 1; each must have ended because its grammar completed."""
    params = [constrained(kind, seed=seed, n=n) for seed in seeds]
    requests = llm.generate([chat_prompt(llm, question)] * len(params), params)
    outputs = [out for request in requests for out in request.outputs]
    assert [out.finish_reason for out in outputs] == ["stop"] * len(outputs), [out.text for out in outputs]
    return [out.text for out in outputs]


@pytest.mark.slow
def test_sampled_json_validates_against_its_schema(smollm2: Any) -> None:
    """Two seeds with n=2: every completion has its own grammar state."""
    texts = sampled_texts(smollm2, "Describe a user of our website as JSON.", seeds=(0, 10), n=2, json=PERSON_SCHEMA)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert len(texts) == 4 and len(set(texts)) > 1, "four completions at temperature 1 gave one output"


@pytest.mark.slow
def test_json_object_parses_as_an_object(smollm2: Any) -> None:
    question = 'Write the JSON object {"name": "Alice", "age": 30} exactly.'
    for text in sampled_texts(smollm2, question, seeds=(0, 1, 4, 5), json_object=True):  # any JSON may run long
        assert isinstance(json.loads(text), dict)


@pytest.mark.slow
def test_regex_choice_and_grammar_outputs_match(smollm2: Any) -> None:
    assert all(re.fullmatch(PHONE, text) for text in sampled_texts(smollm2, "A phone number?", regex=PHONE))
    assert set(sampled_texts(smollm2, "I loved it! Sentiment?", choice=CHOICES)) <= set(CHOICES)
    assert all(re.fullmatch(SUM_PATTERN, t) for t in sampled_texts(smollm2, "A sum?", grammar=SUM_GRAMMAR))


def test_a_completed_grammar_finishes_with_stop_even_ignoring_eos(alone_llm: Any) -> None:
    params = constrained(dict(regex="abc"), temperature=0.0, ignore_eos=True)
    [output] = alone_llm.generate([random_prompts(1, 8, 8)[0]], params)
    assert (output.outputs[0].text, output.outputs[0].finish_reason) == ("abc", "stop")


def test_a_stop_string_ends_a_constrained_output_early(alone_llm: Any) -> None:
    params = constrained(dict(regex="[a-z]{3} [a-z]{3}"), temperature=0.0, stop=[" "])
    [output] = alone_llm.generate([random_prompts(1, 8, 8)[0]], params)
    out = output.outputs[0]
    assert (len(out.text), out.finish_reason, out.stop_reason) == (3, "stop", " ")


def mixed_batch(prompts: list[list[int]]) -> list[SamplingParams]:
    """Every other prompt unconstrained and greedy; the others constrained, greedy or sampled."""
    kinds = [dict(json=PERSON_SCHEMA), dict(regex=PHONE), dict(choice=CHOICES), dict(json_object=True)]
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [free if i % 2 == 0 else constrained(kinds[i // 2 % 4], temperature=float(i % 4 == 1), seed=i,
                                                max_tokens=48) for i in range(len(prompts))]


def test_constraints_leave_the_unconstrained_rows_of_a_batch_unchanged(tiny_model: Any, llm_factory: Any,
                                                                       alone_llm: Any) -> None:
    prompts = random_prompts(8, 20, 60, seed=3)
    params = mixed_batch(prompts)
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=512, max_num_batched_tokens=32)  # chunked prefill
    batched = token_ids(llm.generate(prompts, params))
    free = [i for i, p in enumerate(params) if p.structured_outputs is None]
    assert [batched[i] for i in free] == token_ids(alone_llm.generate([prompts[i] for i in free], params[0]))


def test_preempted_constrained_sequences_recompute_to_the_same_output(tiny_model: Any, llm_factory: Any,
                                                                      alone_llm: Any) -> None:
    prompts = random_prompts(12, 20, 60, seed=7)
    params = [constrained(dict(regex="[a-z ]{40,60}"), temperature=0.0, max_tokens=40)] * len(prompts)
    expected = token_ids(alone_llm.generate(prompts, params))
    llm = llm_factory(tiny_model("llama"), num_kv_blocks=24, block_size=8, enable_prefix_caching=False)
    before = llm.engine.stats().num_preemptions
    assert token_ids(llm.generate(prompts, params)) == expected
    assert llm.engine.stats().num_preemptions > before


def test_a_contradictory_constraint_fails_its_request_alone(alone_llm: Any) -> None:
    engine = alone_llm.engine
    digits = [token for token in range(200, 20000) if engine.tokenizer.decode([token]).isdigit()][:3]
    letters_only = constrained(dict(regex="[a-z]+"), temperature=0.0, allowed_token_ids=digits)
    prompt = random_prompts(1, 8, 8)[0]
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = run_to_completion(engine, [engine.make_request("culprit", prompt, letters_only),
                                         engine.make_request("bystander", prompt, free)])
    assert results["culprit"].outputs[0].finish_reason == "error"
    assert results["bystander"].outputs[0].token_ids == alone_llm.generate([prompt], free)[0].outputs[0].token_ids


@pytest.mark.parametrize("kind, message", [
    (dict(json={"type": "bogus"}), r"^structured_outputs\.json: invalid JSON schema: .*bogus"),
    (dict(json="{not json"), r"^structured_outputs\.json: invalid JSON schema"),
    (dict(json="[1, 2]"), r"^structured_outputs\.json: invalid JSON schema: a schema is a JSON object"),
    (dict(regex="(unclosed"), r"^structured_outputs\.regex: invalid regex: .*parenthesis"),
    (dict(grammar="root ::= missing"), r"^structured_outputs\.grammar: invalid EBNF grammar: .*missing"),
])
def test_a_constraint_that_does_not_compile_is_refused_before_anything_is_queued(
        alone_llm: Any, kind: dict[str, Any], message: str) -> None:
    engine = alone_llm.engine
    with pytest.raises(ValueError, match=message):
        engine.make_request("bad", [1, 2, 3], constrained(kind))
    assert not engine.requests and not engine.scheduler.waiting


@pytest.mark.parametrize("kind", [dict(), dict(regex="a", choice=["a"]), dict(choice=[]), dict(choice=["a", ""]),
                                  dict(regex=""), dict(json_object="yes")])
def test_malformed_structured_outputs_params_are_value_errors(kind: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="^structured_outputs"):
        StructuredOutputsParams(**kind)


def test_grammars_compile_once_per_constraint_in_a_bounded_lru(alone_llm: Any) -> None:
    engine = alone_llm.engine
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, [0], cache_size=2)
    first = compiler.compile(StructuredOutputsParams(json=PERSON_SCHEMA))
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA))) is first
    compiler.compile(StructuredOutputsParams(regex=PHONE))
    compiler.compile(StructuredOutputsParams(choice=CHOICES))
    assert compiler.compile(StructuredOutputsParams(json=PERSON_SCHEMA)) is not first, "the LRU kept 3 of 2"


def test_tensor_parallel_ranks_give_the_constrained_outputs_of_one_rank(tiny_model: Any, llm_factory: Any) -> None:
    """Rank 0 alone holds the grammars and samples; the engines are test_tensor_parallel's (same settings)."""
    settings = {"num_kv_blocks": 128, "dtype": "float32"}
    prompts = random_prompts(6, 10, 40, seed=13)
    params = [constrained(kind, temperature=0.0, max_tokens=32) for kind in
              (dict(json=PERSON_SCHEMA), dict(regex=PHONE), dict(choice=CHOICES))] * 2
    expected = token_ids(llm_factory(tiny_model("llama"), **settings).generate(prompts, params))
    tp2 = llm_factory(tiny_model("llama"), tensor_parallel_size=2, **settings)
    assert token_ids(tp2.generate(prompts, params)) == expected
