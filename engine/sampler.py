"""Batched sampling: token bans, logits processors, penalties, grammar masks, temperature, top-k/top-p/min-p and
per-request seeds in one pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.logits_processors import LogitsProcessor
from engine.sequence import Sequence
from engine.structured_output.bitmask import GrammarMask


@dataclass
class TokenLogprobs:
    """Log-probabilities (from the raw model logits) of the sampled token and the top candidates."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprobs]]


class Sampler:
    def __init__(
        self, vocab_size: int, eos_token_ids: list[int], seed: int, device: torch.device,
        processors: tuple[LogitsProcessor, ...] = (),
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.processors = processors

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], grammar_mask: Optional[GrammarMask] = None
    ) -> SamplerOutput:
        """One token per row of `logits` (one row per sequence); `logits` is left as it was. `grammar_mask` holds the
        rows' grammars' allowed tokens; a row left with no token to sample raises ValueError."""
        if grammar_mask is None and all(self._plain_greedy(seq) for seq in seqs):
            # max(...).indices, like argmax, picks the first of tied maxima, and is twice as fast on bfloat16.
            return SamplerOutput(logits[:, : self.vocab_size].max(dim=-1).indices.tolist(), [None] * len(seqs))
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=True)  # penalties and bans write into it
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        allowed = _allowed_mask(seqs, self.vocab_size, logits.device)
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        banning = self._apply_processors(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_min_tokens(logits, seqs)
        if grammar_mask is not None:
            grammar_mask.apply(logits)
        if banning or (grammar_mask is not None and allowed is not None):  # bans from two sources may cover a row
            _check_some_token_left(logits, seqs)
        if all(s.params.greedy for s in seqs):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, seqs)
        return SamplerOutput(token_ids.tolist(), _gather_logprobs(raw_logprobs, allowed, token_ids, seqs))

    def _plain_greedy(self, seq: Sequence) -> bool:
        """Greedy with nothing that changes the logits or asks for logprobs: the argmax of the raw logits is the
        answer."""
        p = seq.params
        unchanged = p.allowed_token_ids is None and not _has_penalty(seq) and seq.num_output_tokens >= p.min_tokens
        processed = any(processor.applies_to(seq) for processor in self.processors)
        return p.greedy and p.logprobs is None and unchanged and not processed and seq.grammar is None

    def _apply_processors(self, logits: torch.Tensor, seqs: list[Sequence]) -> bool:
        """Run the processors that apply to some row; True if one of them may have banned tokens."""
        banning = False
        for processor in self.processors:
            if any(processor.applies_to(seq) for seq in seqs):
                processor.apply(logits, seqs)
                banning = banning or processor.may_ban_tokens
        return banning

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if _has_penalty(s)]
        if not rows:
            return logits
        sub = logits[rows]
        device = logits.device
        output_counts = _token_counts([seqs[i].output_token_ids for i in rows], self.vocab_size, device)
        seen = _token_counts([seqs[i].token_ids for i in rows], self.vocab_size, device) > 0
        repetition = _column([seqs[i].params.repetition_penalty for i in rows], device)
        penalised = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, penalised, sub)
        frequency = _column([seqs[i].params.frequency_penalty for i in rows], device)
        presence = _column([seqs[i].params.presence_penalty for i in rows], device)
        sub = sub - frequency * output_counts - presence * (output_counts > 0)
        logits[rows] = sub
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Ban the ending tokens until min_tokens; a sequence's grammar, if it has one, decides where it ends."""
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None:
                banned = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                logits[i, banned] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        greedy_ids = logits.argmax(dim=-1)
        temperature = _column([s.params.temperature or 1.0 for s in seqs], logits.device)
        logits = _filter_top_k_top_p_min_p(logits / temperature, seqs)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:  # on the CPU: a seed gives the same draws on every device
                noise[i] = torch.empty(noise.shape[1]).exponential_(generator=seq.generator).to(noise.device)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, greedy_ids, sampled)


def _check_some_token_left(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """ValueError naming the first row whose every token is banned (its constraints contradict each other)."""
    empty = (logits.max(dim=-1).values == float("-inf")).nonzero()
    if len(empty):
        seq = seqs[int(empty[0])]
        raise ValueError(f"no token may follow output token {seq.num_output_tokens} of request "
                         f"{seq.request.request_id!r}: its allowed_token_ids, logits processors and grammar ban "
                         "them all")


def _has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _allowed_mask(seqs: list[Sequence], vocab_size: int, device: torch.device) -> Optional[torch.Tensor]:
    """True where a row may draw the token: its allowed_token_ids, or every token if it has none; None if no row
    restricts its tokens."""
    rows = [i for i, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
    if not rows:
        return None
    ids = [torch.tensor(seqs[i].params.allowed_token_ids, dtype=torch.long) for i in rows]
    row_index = torch.tensor(rows).repeat_interleave(torch.tensor([len(row_ids) for row_ids in ids]))
    mask = torch.ones(len(seqs), vocab_size, dtype=torch.bool, device=device)
    mask[rows] = False
    mask[row_index.to(device), torch.cat(ids).to(device)] = True
    return mask


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device).unsqueeze(1)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    width = max(len(ids) for ids in token_lists)
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _filter_top_k_top_p_min_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    params = [s.params for s in seqs]
    if all(p.top_k == -1 and p.top_p == 1.0 and p.min_p == 0.0 for p in params):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    device = logits.device
    top_k = _column([p.top_k if p.top_k > 0 else vocab for p in params], device)
    drop = torch.arange(vocab, device=device).unsqueeze(0) >= top_k
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    top_p = _column([p.top_p for p in params], device)
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    min_p = _column([p.min_p for p in params], device)
    drop |= sorted_probs < min_p * sorted_probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _gather_logprobs(
    raw_logprobs: Optional[torch.Tensor], allowed: Optional[torch.Tensor], token_ids: torch.Tensor, seqs: list[Sequence]
) -> list[Optional[TokenLogprobs]]:
    """The raw logprobs of each sampled token and of its row's top candidates; with allowed_token_ids the candidates
    and the rank count only the allowed tokens."""
    if raw_logprobs is None:
        return [None] * len(seqs)
    ranked = raw_logprobs if allowed is None else raw_logprobs.masked_fill(~allowed, float("-inf"))
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (ranked > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_values, top_ids = ranked.topk(max(s.params.logprobs or 0 for s in seqs), dim=-1)
    num_allowed = [ranked.shape[1]] * len(seqs) if allowed is None else allowed.sum(dim=1).tolist()
    rows = zip(seqs, token_ids.tolist(), chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(),
               num_allowed)
    return [_token_logprobs(*row) for row in rows]


def _token_logprobs(
    seq: Sequence, token_id: int, logprob: float, rank: int, top_ids: list[int], top_values: list[float],
    num_allowed: int,
) -> Optional[TokenLogprobs]:
    if seq.params.logprobs is None:
        return None
    count = min(seq.params.logprobs, num_allowed)
    return TokenLogprobs(token_id, logprob, rank, top_ids[:count], top_values[:count])
