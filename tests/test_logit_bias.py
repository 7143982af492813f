"""logit_bias: -100 bans a token, +100 forces it, greedy or sampled, in a batch whose other rows stay unchanged; bad
biases are ValueErrors before the engine is touched."""
from __future__ import annotations

from typing import Any

import pytest

from conftest import PROMPT, random_prompts, token_ids
from engine import SamplingParams

GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_a_bias_of_minus_100_bans_the_greedy_token(alone_llm: Any) -> None:
    [plain] = token_ids(alone_llm.generate([PROMPT], SamplingParams(**GREEDY)))
    [banned] = token_ids(alone_llm.generate([PROMPT], SamplingParams(**GREEDY, logit_bias={plain[0]: -100})))
    assert plain[0] not in banned and banned != plain


@pytest.mark.parametrize("sampling", [dict(GREEDY), dict(GREEDY, temperature=1.0, seed=3, top_p=0.9)])
def test_a_bias_of_plus_100_forces_its_token(alone_llm: Any, sampling: dict[str, Any]) -> None:
    [forced] = token_ids(alone_llm.generate([PROMPT], SamplingParams(**sampling, logit_bias={4242: 100})))
    assert forced == [4242] * 8


def test_biased_rows_leave_the_rest_of_their_batch_unchanged(alone_llm: Any) -> None:
    prompts = random_prompts(4, 10, 30, seed=11)
    plain = SamplingParams(**GREEDY)
    biased = SamplingParams(**GREEDY, logit_bias={4242: 100, 7: -100})
    outputs = token_ids(alone_llm.generate(prompts, [plain, biased, plain, biased]))
    assert [outputs[0], outputs[2]] == token_ids(alone_llm.generate([prompts[0], prompts[2]], plain))
    assert outputs[1] == outputs[3] == [4242] * 8


@pytest.mark.parametrize("bias, message", [
    ({5: 100.5}, r"logit_bias\[5\] must be in \[-100, 100\]"),
    ({5: float("nan")}, r"logit_bias\[5\] must be"),
    ({-1: 1}, "logit_bias token id must be an integer >= 0"),
    ({"5": 1}, "logit_bias token id must be an integer"),
    ([5], "logit_bias must be a map"),
])
def test_bad_biases_are_value_errors(bias: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_a_bias_outside_the_vocabulary_is_refused_before_anything_is_queued(alone_llm: Any) -> None:
    engine = alone_llm.engine
    with pytest.raises(ValueError, match=r"^logit_bias must be in \[0, 49152\)"):
        engine.make_request("outside", PROMPT, SamplingParams(logit_bias={49152: 1}))
    assert not engine.requests
