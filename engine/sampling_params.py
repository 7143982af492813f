"""Per-request sampling parameters, validated on construction.

Every bound is a range check, so NaN, infinities and integers too large for a float are rejected with the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from engine.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20
# Below this the sampler's float32 logits / temperature overflow to inf (1e-40 is subnormal in float32; 1e-46 is 0)
# and softmax turns them into NaN.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
# A seen token's positive logit is divided by the penalty, a negative one multiplied: at 2 already halved or doubled
# (CTRL, which introduced the penalty, used 1.2). The bound also keeps the factor finite in float32.
MAX_REPETITION_PENALTY = 2.0
MIN_REPETITION_PENALTY = 0.01  # the mirror image of 100: below it, seen tokens' logits overflow the same way
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY], as in OpenAI's API
SEED_LIMIT = 2**64  # torch generators take 64-bit seeds
MAX_N = 1024  # completions of one request: each is a sequence object built before anything runs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token in effect, +100 all but forces it


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Union[None, str, list[str]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids: when set (a non-empty list of ids; duplicates are fine), every generated token is drawn
    # from these ids alone: all other logits are -inf before penalties, temperature, top-k/top-p/min-p and greedy
    # argmax. Logprobs stay the raw model log-probabilities, but the top candidates and the sampled token's rank count
    # allowed tokens only: with allowed_token_ids=[a, b] and logprobs=2 the logprobs of exactly a and b come back.
    allowed_token_ids: Optional[list[int]] = None
    # OpenAI's logit_bias: token id -> a bias in [-100, 100] added to its logit before penalties and sampling.
    logit_bias: Optional[dict[int, float]] = None
    # The output is constrained to a JSON schema, a regex, a choice or a grammar (engine.structured_output).
    structured_outputs: Optional[StructuredOutputsParams] = None
    # Free-form arguments for the engine's plugin logits processors (vLLM's extra_args).
    extra_args: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_counts()
        self._check_stops()
        self._check_allowed_token_ids()
        self._check_logit_bias()
        self._check_extensions()
        self._check_distribution()
        self._check_penalties()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _check_counts(self) -> None:
        _check_int("n", self.n, minimum=1, maximum=MAX_N)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=SEED_LIMIT - 1)

    def _check_stops(self) -> None:
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")

    def _check_allowed_token_ids(self) -> None:
        if self.allowed_token_ids is None:
            return
        if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids!r}")
        self.allowed_token_ids = list(self.allowed_token_ids)
        for token_id in self.allowed_token_ids:
            _check_int("allowed_token_ids", token_id, minimum=0)

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a map of token id to bias, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias token id", token_id, minimum=0)
            _check_number(f"logit_bias[{token_id}]", bias, lambda b: -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS,
                          f"in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    def _check_extensions(self) -> None:
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be StructuredOutputsParams, got {self.structured_outputs!r}")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise ValueError(f"extra_args must be a dict, got {self.extra_args!r}")

    def _check_distribution(self) -> None:
        _check_number(
            "temperature", self.temperature, lambda t: t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE,
            f"0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
        )
        _check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        _check_number("min_p", self.min_p, lambda p: 0 <= p <= 1, "in [0, 1]")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), lambda v: -MAX_PENALTY <= v <= MAX_PENALTY,
                          f"in [{-MAX_PENALTY}, {MAX_PENALTY}]")
        _check_number(
            "repetition_penalty", self.repetition_penalty,
            lambda v: MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY,
            f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
        )


def _check_number(name: str, value: object, accepts: Callable[[float], bool], allowed: str) -> None:
    """`accepts` is a range test: False for NaN, and for infinities and huge integers past the range's ends."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not accepts(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, minimum: int, maximum: Optional[int] = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
