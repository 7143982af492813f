"""Sampling parameters: seeds, stop conditions, logprobs, penalties and filters."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import PROMPT
from engine import SamplingParams
from engine.sampler import Sampler
from engine.sequence import Request



@pytest.fixture(scope="module")
def llm(tiny_model, llm_factory):
    return llm_factory(tiny_model("llama"), num_kv_blocks=512)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()


def sample(llm, prompts, **kwargs):
    return llm.generate(prompts, SamplingParams(**kwargs))


def test_seeded_sampling_reproduces_across_runs_and_batches(llm) -> None:
    params = dict(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = sample(llm, [PROMPT], **params)[0].outputs[0].token_ids
    again = sample(llm, [PROMPT], **params)[0].outputs[0].token_ids
    crowd = [[100 + i, 200 + i, 300 + i] for i in range(5)]
    batched = llm.generate(
        crowd + [PROMPT], [SamplingParams(temperature=1.0, max_tokens=16)] * 5 + [SamplingParams(**params)]
    )[-1].outputs[0].token_ids
    assert alone == again == batched
    other = sample(llm, [PROMPT], **{**params, "seed": 4321})[0].outputs[0].token_ids
    assert other != alone


def test_top_k_one_is_greedy(llm) -> None:
    greedy = sample(llm, [PROMPT], temperature=0.0, max_tokens=12, ignore_eos=True)[0].outputs[0].token_ids
    top1 = sample(llm, [PROMPT], temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True)[0].outputs[0].token_ids
    tiny_p = sample(llm, [PROMPT], temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True)
    min_p = sample(llm, [PROMPT], temperature=1.0, min_p=1.0, max_tokens=12, ignore_eos=True)
    assert top1 == greedy == tiny_p[0].outputs[0].token_ids == min_p[0].outputs[0].token_ids


def test_stop_token_ids_end_generation(llm) -> None:
    greedy = sample(llm, [PROMPT], temperature=0.0, max_tokens=20, ignore_eos=True)[0].outputs[0]
    stop_id = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_id)
    out = sample(llm, [PROMPT], temperature=0.0, max_tokens=20, stop_token_ids=[stop_id])[0].outputs[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_is_excluded_and_matched_across_tokens(llm) -> None:
    tokenizer = llm.get_tokenizer()
    greedy = sample(llm, [PROMPT], temperature=0.0, max_tokens=20, ignore_eos=True)[0].outputs[0]
    pieces = [tokenizer.decode([t]) for t in greedy.token_ids]
    boundary = next(i for i in range(3, 15) if pieces[i] and pieces[i + 1])
    stop = pieces[boundary][-1] + pieces[boundary + 1][:1]
    out = sample(llm, [PROMPT], temperature=0.0, max_tokens=20, stop=[stop])[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert greedy.text.startswith(out.text)
    assert out.text == greedy.text[: greedy.text.index(stop)]


def test_max_tokens_and_min_tokens(llm) -> None:
    eos_free = sample(llm, [PROMPT], temperature=0.0, max_tokens=7, ignore_eos=True)[0].outputs[0]
    assert len(eos_free.token_ids) == 7 and eos_free.finish_reason == "length"
    greedy_first = eos_free.token_ids[0]
    out = sample(llm, [PROMPT], temperature=0.0, max_tokens=7, min_tokens=3, stop_token_ids=[greedy_first])[0]
    assert len(out.outputs[0].token_ids) >= 3
    assert greedy_first not in out.outputs[0].token_ids[:2]


def test_logprobs_match_log_softmax_of_model_logits(llm, reference) -> None:
    out = sample(llm, [PROMPT], temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5)[0].outputs[0]
    ids = torch.tensor([PROMPT + out.token_ids])
    with torch.no_grad():
        expected = reference(ids).logits[0].log_softmax(-1)
    for step, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[len(PROMPT) - 1 + step]
        assert math.isclose(entry[token_id].logprob, row[token_id].item(), abs_tol=1e-4)
        assert entry[token_id].rank == 1
        top_ids = row.topk(5).indices.tolist()
        assert set(top_ids) <= set(entry)
        for token in top_ids:
            assert math.isclose(entry[token].logprob, row[token].item(), abs_tol=1e-4)


def test_logprobs_zero_returns_only_the_sampled_token(llm) -> None:
    out = sample(llm, [PROMPT], temperature=1.0, seed=3, max_tokens=3, ignore_eos=True, logprobs=0)[0].outputs[0]
    assert [list(entry) for entry in out.logprobs] == [[t] for t in out.token_ids]
    assert all(entry[t].logprob <= 0 for entry, t in zip(out.logprobs, out.token_ids))


def test_repetition_penalty_matches_transformers(llm, reference) -> None:
    greedy = lambda prompt, **kw: sample(llm, [prompt], temperature=0.0, max_tokens=24, ignore_eos=True, **kw)
    plain = greedy(PROMPT)[0].outputs[0].token_ids
    echo_prompt = plain + PROMPT + plain[:3]
    ids = torch.tensor([echo_prompt])
    theirs = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
        repetition_penalty=1.8, eos_token_id=None, pad_token_id=0,
    )[0, len(echo_prompt):].tolist()
    assert greedy(echo_prompt, repetition_penalty=1.8)[0].outputs[0].token_ids == theirs
    assert theirs != greedy(echo_prompt)[0].outputs[0].token_ids


def test_frequency_and_presence_penalties_follow_openai_formula() -> None:
    vocab = 8
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    request = Request("r", None, [1, 2], params)
    seq = request.seqs[0]
    seq.token_ids += [3, 3, 4]
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0]])
    penalised = Sampler(vocab, eos_token_ids=[], seed=0, device=torch.device("cpu"))._apply_penalties(logits.clone(), [seq])
    expected = torch.tensor([[1.0, 0.5, 0.5, 0.5 - 0.5 - 0.5, -2.0 - 0.25 - 0.5, 1.0, 1.0, 1.0]])
    assert torch.allclose(penalised, expected)
