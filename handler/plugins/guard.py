"""`guard`: a Llama-Guard-style safety classifier on a second engine in the worker, run on the user's input,
the model's output, or both.

The verdict is P(unsafe) at the guard's first generated token, with that token restricted to the two verdict
tokens (`allowed_token_ids`): the softmax of their two raw logprobs. Above `threshold` the input is refused
with a 400 `content_filter` error naming the violated categories (generated after the verdict), or the output
ends with finish_reason `content_filter`. Output is judged in windows of `output_window_tokens` tokens: each
window is held back until the guard passed the whole output so far, so text already sent is never retracted
and nothing past an unsafe window is sent.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from engine import AsyncLLMEngine, CompletionOutput, EngineConfig, SamplingParams
from engine.config import settings_from_dict
from handler.plugins.base import Plugin, PluginContext, PluginRequest, finished, join_deltas
from handler.plugins.llama_guard import (
    LLAMA_GUARD_3_CATEGORIES, PROMPT_FORMATS, Turn, conversation_turns, guard_prompt, guard_task, violated_categories,
)
from handler.protocol import APIError

logger = logging.getLogger(__name__)
STAGES = ("input", "output")
# The guard engine's settings unless `engine:` says otherwise: a small KV cache, few sequences at a time.
GUARD_ENGINE_DEFAULTS = {"kv_cache_memory_gb": 0.25, "max_num_seqs": 16, "gpu_memory_utilization": 0.15}


@dataclass
class GuardOptions:
    # The guard model: a Hugging Face folder or a GGUF file (relative: in the model folder). None: the embedded
    # SmolLM2, a stand-in for trying the plugin out (it is no safety classifier).
    model: Optional[str] = field(default=None, metadata={"path": True})
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    threshold: float = 0.5  # unsafe when P(unsafe) > threshold: 0 blocks everything, 1 nothing
    output_threshold: Optional[float] = None  # the output stage's threshold; None: `threshold`
    categories: Optional[dict[str, str]] = None  # code -> name; None: Llama Guard 3's S1-S14
    prompt_format: str = "llama_guard_3"  # or chat_template: the task as one user turn of the guard's template
    output_window_tokens: int = 32
    safe_word: str = "safe"
    unsafe_word: str = "unsafe"
    max_category_tokens: int = 24
    report: bool = True  # the input verdict goes on the response as `guard`
    engine: dict[str, Any] = field(default_factory=dict)  # the guard engine's EngineConfig keys

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"guard: model must be the guard model's folder or GGUF file, got {self.model!r}")
        if not isinstance(self.stages, list) or not self.stages or not set(self.stages) <= set(STAGES):
            raise ValueError(f"guard: stages must be a non-empty list of {STAGES}, got {self.stages!r}")
        for name in ("threshold", "output_threshold"):
            value = getattr(self, name)
            if name == "output_threshold" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"guard: {name} must be a number in [0, 1], got {value!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"guard: prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        self._check_counts_and_words()

    def _check_counts_and_words(self) -> None:
        for name in ("output_window_tokens", "max_category_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"guard: {name} must be a positive integer, got {value!r}")
        if not all(isinstance(w, str) and w for w in (self.safe_word, self.unsafe_word)):
            raise ValueError("guard: safe_word and unsafe_word must be non-empty strings")
        if self.categories is not None and (not isinstance(self.categories, dict) or not self.categories):
            raise ValueError(f"guard: categories must be a non-empty mapping of code to name, got {self.categories!r}")
        if not isinstance(self.engine, dict):
            raise ValueError(f"guard: engine must be a mapping of engine settings, got {self.engine!r}")


@dataclass(frozen=True)
class Verdict:
    stage: str
    unsafe_probability: float
    unsafe: bool
    categories: list[str]  # codes; empty when safe, or when the guard named none it knows

    def to_dict(self, names: dict[str, str]) -> dict[str, Any]:
        return {"verdict": "unsafe" if self.unsafe else "safe", "unsafe_probability": self.unsafe_probability,
                "categories": [{"code": code, "name": names[code]} for code in self.categories]}


class GuardPlugin(Plugin):
    name = "guard"
    Options = GuardOptions

    def initialize(self, context: PluginContext) -> None:
        self.categories = self.options.categories or dict(LLAMA_GUARD_3_CATEGORIES)
        self.main_tokenizer = context.tokenizer
        self.emit_metric = context.emit_metric
        config = guard_engine_config(context, self.options)
        self.engine = AsyncLLMEngine.from_config(config)
        self.engine.add_death_callback(context.engine_died)
        safe_tokens, self.unsafe_tokens = self._verdict_tokens()
        self.safe_id, self.unsafe_id = safe_tokens[0], self.unsafe_tokens[0]
        self._request_ids = itertools.count()
        logger.info("guard model %s: its KV cache (%.2f GiB on CPU) is taken from the worker's budget",
                    config.model or "(the embedded SmolLM2)", config.kv_cache_memory_gb)

    def reserved_kv_cache_gb(self) -> float:
        config = self.engine.engine.config
        return config.kv_cache_memory_gb if config.device == "cpu" and config.num_kv_blocks is None else 0.0

    async def before(self, request: PluginRequest) -> None:
        """A chat is judged as one conversation; each prompt of a text completion on its own."""
        if "input" not in self.options.stages:
            return None
        conversations = [self._turns(request, i) for i in range(1 if request.is_chat else len(request.body.prompts))]
        verdicts = await asyncio.gather(*(self.judge(turns, "input") for turns in conversations))
        for verdict in verdicts:
            if verdict.unsafe:
                raise APIError(refusal_message(verdict, self.categories), code="content_filter",
                               param="messages" if request.is_chat else "prompt")
        if self.options.report:
            reported = [verdict.to_dict(self.categories) for verdict in verdicts]
            request.response_fields["guard"] = {"input": reported[0] if request.is_chat else reported}
        return None

    def output_filter(self, request: PluginRequest, prompt_index: int) -> Optional["OutputModeration"]:
        if "output" not in self.options.stages:
            return None
        return OutputModeration(self, self._turns(request, prompt_index), self.options.output_window_tokens)

    async def judge(self, conversation: list[Turn], stage: str) -> Verdict:
        """The guard's verdict on the last turn of `conversation`, counted in the guard metrics."""
        started = time.perf_counter()
        prompt = self._prompt_ids(conversation)
        probability = await self._unsafe_probability(prompt)
        unsafe = probability > self._threshold(stage)
        categories = await self._categories(prompt) if unsafe else []
        self.emit_metric("guard_latency_seconds", time.perf_counter() - started, stage=stage)
        self.emit_metric("guard_verdicts_total", 1, stage=stage, verdict="unsafe" if unsafe else "safe")
        return Verdict(stage, probability, unsafe, categories)

    def _threshold(self, stage: str) -> float:
        if stage == "output" and self.options.output_threshold is not None:
            return self.options.output_threshold
        return self.options.threshold

    def _turns(self, request: PluginRequest, prompt_index: int) -> list[Turn]:
        """What the client sent, before other plugins rewrote it: the chat's turns, or one prompt as a user turn."""
        if request.is_chat:
            return conversation_turns(request.original.messages)
        prompt = request.original.prompts[prompt_index]
        return [("User", prompt if isinstance(prompt, str) else self.main_tokenizer().decode(prompt))]

    def _prompt_ids(self, conversation: list[Turn]) -> list[int]:
        """The guard prompt, fitted into the guard's context: the oldest turns go first, then the start of the last
        one (the text judged last is what matters)."""
        room = self.engine.max_model_len - self.options.max_category_tokens - 2
        ids = self._render(conversation)
        while len(ids) > room:
            if len(conversation) > 1:
                conversation = conversation[1:]
            elif conversation[0][1]:
                speaker, text = conversation[0]
                conversation = [(speaker, text[len(text) // 4 + 1:])]
            else:
                raise ValueError(f"the guard prompt takes {len(ids)} tokens without any conversation; the guard "
                                 f"model's max_model_len ({self.engine.max_model_len}) is too small")
            ids = self._render(conversation)
        return ids

    def _render(self, conversation: list[Turn]) -> list[int]:
        tokenizer = self.engine.tokenizer
        text = guard_prompt(guard_task(conversation, self.categories), self.options.prompt_format, tokenizer)
        return list(tokenizer.encode(text, add_special_tokens=False))

    async def _unsafe_probability(self, prompt: list[int]) -> float:
        """softmax over the two verdict tokens' raw logprobs at the first generated position."""
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2,
                                allowed_token_ids=[self.safe_id, self.unsafe_id])
        output = await self._generate(prompt, params)
        logprobs = output.logprobs[0]
        return 1.0 / (1.0 + math.exp(logprobs[self.safe_id].logprob - logprobs[self.unsafe_id].logprob))

    async def _categories(self, prompt: list[int]) -> list[str]:
        params = SamplingParams(max_tokens=self.options.max_category_tokens, temperature=0.0)
        output = await self._generate(prompt + self.unsafe_tokens, params)
        return violated_categories(output.text, self.categories)

    async def _generate(self, prompt: list[int], params: SamplingParams) -> CompletionOutput:
        request = self.engine.make_request(f"guard-{next(self._request_ids)}", prompt, params)
        deltas = [output.outputs[0] async for output in self.engine.stream(request)]
        return join_deltas(0, deltas)

    def _verdict_tokens(self) -> tuple[list[int], list[int]]:
        """The tokens of each verdict word; their first tokens must differ."""
        tokenizer = self.engine.tokenizer
        ids = [list(tokenizer.encode(word, add_special_tokens=False)) for word in
               (self.options.safe_word, self.options.unsafe_word)]
        if ids[0][0] == ids[1][0]:
            raise ValueError(f"guard: safe_word and unsafe_word start with the same token ({ids[0][0]}) in the "
                             "guard model's vocabulary; the first generated token could not tell them apart")
        for word, tokens in zip((self.options.safe_word, self.options.unsafe_word), ids):
            if len(tokens) > 1:
                logger.warning("guard: %r is %d tokens for the guard model; its first token decides", word, len(tokens))
        return ids[0], ids[1]


class OutputModeration:
    """One choice's output filter: holds each window back until the guard passed the whole output so far."""

    def __init__(self, guard: GuardPlugin, conversation: list[Turn], window_tokens: int) -> None:
        self.guard = guard
        self.conversation = conversation
        self.window_tokens = window_tokens
        self.released = ""
        self.pending: list[CompletionOutput] = []
        self.stopped = False

    async def __call__(self, delta: CompletionOutput) -> list[CompletionOutput]:
        if self.stopped:
            return []
        self.pending.append(delta)
        held = sum(len(item.token_ids) for item in self.pending)
        if delta.finish_reason is None and held < self.window_tokens:
            return []
        window, self.pending = join_deltas(delta.index, self.pending), []
        if window.text and (await self._judge(window.text)).unsafe:
            self.stopped = True
            return [finished(_emptied(window), "content_filter")]
        self.released += window.text
        return [window]

    async def _judge(self, text: str) -> Verdict:
        return await self.guard.judge([*self.conversation, ("Agent", self.released + text)], "output")


def _emptied(window: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(window.index, "", [], [] if window.logprobs is not None else None)


def refusal_message(verdict: Verdict, categories: dict[str, str]) -> str:
    named = ", ".join(f"{code} ({categories[code]})" for code in verdict.categories) or "no category named"
    return (f"the input was blocked by the content filter: unsafe with probability "
            f"{verdict.unsafe_probability:.3f}; categories: {named}")


def guard_engine_config(context: PluginContext, options: GuardOptions) -> EngineConfig:
    """The guard engine: on the main engine's device and dtype unless `engine:` says otherwise."""
    main = context.engine_config
    values = {**GUARD_ENGINE_DEFAULTS, "device": main.device, "dtype": main.dtype, "num_threads": main.num_threads,
              **options.engine, "model": str(context.path("guard.model", options.model)) if options.model else None}
    return settings_from_dict(EngineConfig, values, "guard.engine")
