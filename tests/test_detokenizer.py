"""Streamed text deltas: whole UTF-8 characters only, special tokens skipped on request."""
from __future__ import annotations

import pytest

from engine.detokenizer import REPLACEMENT_CHAR, Detokenizer
from engine.sampling_params import SamplingParams
from engine.sequence import Request

TEXTS = ["naïve café 東京タワー 🚀🎉 done", "emoji 👩‍👩‍👧 ok", "Привет, мир!"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], params: SamplingParams) -> list[str]:
    detokenizer = Detokenizer(tokenizer)
    seq = Request("r", None, prompt_ids, params).seqs[0]
    deltas = []
    for token_id in output_ids:
        seq.token_ids.append(token_id)
        detokenizer.append_token(seq)
        deltas.append(detokenizer.take_delta(seq))
    seq.finish("length")
    deltas.append(detokenizer.take_delta(seq))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_split(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()), "the text must split characters across byte-level tokens"
    deltas = stream(tokenizer, tokenizer.encode("Say:"), ids, SamplingParams())
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_special_tokens_skipped_or_kept(tokenizer) -> None:
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hello") + [special] + tokenizer.encode(" there")
    assert "".join(stream(tokenizer, [1], ids, SamplingParams())) == "Hello there"
    kept = "".join(stream(tokenizer, [1], ids, SamplingParams(skip_special_tokens=False)))
    assert kept == "Hello<|im_end|> there"


def test_stop_string_tail_is_held_back_until_it_cannot_match(tokenizer) -> None:
    ids = tokenizer.encode("one two three four")
    deltas = stream(tokenizer, [1], ids, SamplingParams(stop=["xyz"]))
    assert "".join(deltas) == "one two three four"
    assert deltas[-1].endswith("ur"), "the last two characters wait for the finish"
