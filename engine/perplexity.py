"""What a model predicts for a text: the log-probability of each token given the ones before it in its window,
and the perplexity over them (how quantization is measured: scripts/bench_quality.py and the quantization tests)."""
from __future__ import annotations

import math

import torch

from engine.model_runner import ModelRunner
from engine.step_inputs import StepInputs


def token_logprobs(runner: ModelRunner, token_ids: list[int], window: int) -> torch.Tensor:
    """log p(token | the tokens before it in its window) for each token but the first of each window of `window`
    tokens, one prefill per window over the runner's KV-cache blocks from block 0 (one rank, an idle engine)."""
    scored = []
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        logits = runner.run(_prefill(chunk, runner.block_size)).float()
        chosen = torch.tensor(chunk[1:]).unsqueeze(1)
        scored.append(torch.log_softmax(logits[:-1], dim=-1).gather(1, chosen.to(logits.device)).squeeze(1).cpu())
    return torch.cat(scored)


def perplexity(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())


def _prefill(token_ids: list[int], block_size: int) -> StepInputs:
    """One sequence's prompt in blocks 0, 1, ...; every row's logits sampled."""
    count = len(token_ids)
    positions = torch.arange(count)
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.long),
        positions=positions,
        slot_mapping=positions,
        block_tables=torch.arange(-(-count // block_size)).unsqueeze(0),
        context_lens=torch.tensor([count]),
        query_start_loc=torch.tensor([0, count]),
        sample_indices=positions,
        num_decodes=0,
    )
