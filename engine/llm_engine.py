"""The synchronous engine core: requests in, one scheduled step at a time, output deltas out."""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable, Optional, Union

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.distributed import TPGroup, check_devices, rank_device
from engine.errors import EngineDeadError
from engine.layers.sharding import check_tp_size
from engine.loader import ModelSource, read_model_config, resolve_model
from engine.lora.adapter import LoRAAdapter
from engine.lora.cache import AdapterCache
from engine.lora.request import LoRARequest
from engine.metrics import EngineStats
from engine.model_runner import ModelRunner, SampledStep
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import Request, Sequence
from engine.structured_output.params import StructuredOutputsParams
from engine.tokenizer import load_tokenizer
from engine.tp_workers import TPWorkers
from engine.worker import Worker

if TYPE_CHECKING:
    from engine.structured_output.grammar import Grammar, GrammarCompiler

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit in max_model_len."""

    def __init__(self, prompt_len: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"max_tokens: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
            f"max_model_len ({max_model_len})"
        )
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model)
        self.model_config = read_model_config(source)
        check_tp_size(self.model_config, config.tensor_parallel_size)
        check_devices(config.device, config.tensor_parallel_size)
        self.tokenizer = load_tokenizer(source, config.tokenizer, required=config.load_format != "dummy")
        model_max_len = self._model_max_len()
        self.workers: Optional[TPWorkers] = None
        self.runner = self._start_ranks(source, model_max_len)
        num_blocks = self.runner.num_kv_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        max_loras = config.max_loras if config.enable_lora else 0
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, max_loras)
        self.loras: Optional[AdapterCache] = None
        if config.enable_lora:
            self.loras = AdapterCache(self.model_config, config.max_lora_rank, config.max_cpu_loras or max_loras)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.output = OutputProcessor(
            self.scheduler, self.block_manager, Detokenizer(self.tokenizer), self.eos_token_ids, self.max_model_len)
        self.requests = self.output.requests  # the live requests, by id
        self.counters = self.output.counters
        self.grammars: Optional["GrammarCompiler"] = None  # made at the first structured_outputs request
        self.grammars_lock = threading.Lock()

    def _start_ranks(self, source: ModelSource, model_max_len: int) -> ModelRunner:
        """Rank 0's runner, with ranks 1..N-1 started in their own processes; nothing left running on failure."""
        if self.config.tensor_parallel_size > 1:
            self.workers = TPWorkers(self.config, source, self.model_config, model_max_len)
        try:
            tp = self.workers.join_group(rank_device(self.config.device, 0)) if self.workers else TPGroup()
            runner = Worker(self.config, source, self.model_config, model_max_len, tp).runner
            self.max_model_len = self._fit_max_model_len(model_max_len, runner.num_kv_blocks)
            return runner
        except Exception as exc:
            if self.workers is not None:
                self.workers.stop(None)
                if isinstance(exc, RuntimeError):  # a collective broke: name the worker that failed, and why
                    raise RuntimeError(self.workers.failure("at startup")) from exc
            raise

    def make_request(
        self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, timeout: Optional[float] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> Request:
        """Validate and tokenize without touching engine state; ValueError names what is wrong. A request still
        unfinished `timeout` seconds from now is aborted with finish_reason "timeout". With `lora_request` it runs
        with that adapter, read first unless loaded (add_lora)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        _check_timeout(timeout)
        self._check_vocabulary_bounds(params)
        prompt_text, token_ids = self._tokenize(prompt)
        self._check_length(len(token_ids), params)
        lora = None if lora_request is None else self._adapter(lora_request)
        grammar = None if params.structured_outputs is None else self.compile_grammar(params.structured_outputs)
        return Request(request_id, prompt_text, token_ids, params, timeout, lora, grammar)

    def compile_grammar(self, structured_outputs: StructuredOutputsParams) -> "Grammar":
        """The constraint compiled, or taken from the cache; ValueError if it does not compile. Thread-safe: a caller
        may compile ahead on another thread, and make_request then finds it cached."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs: this model has no tokenizer to build grammars over")
        with self.grammars_lock:
            if self.grammars is None:
                from engine.structured_output.grammar import GrammarCompiler  # imports xgrammar: most of a second

                config = self.model_config
                self.grammars = GrammarCompiler(self.tokenizer, config.vocab_size, config.eos_token_ids)
        return self.grammars.compile(structured_outputs)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter into the loaded ones (LRU of max_cpu_loras); ValueError names any problem."""
        self._adapter(lora_request)

    def remove_lora(self, name: str) -> bool:
        """Forget a loaded adapter (False if none has that name). Requests using it finish with it; a later one
        naming it reads it again."""
        return self.loras is not None and self.loras.remove(name)

    def list_loras(self) -> list[str]:
        return [] if self.loras is None else self.loras.names()

    def _adapter(self, lora_request: LoRARequest) -> LoRAAdapter:
        if self.loras is None:
            raise ValueError("LoRA adapters need the engine started with enable_lora: true")
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        return self.loras.get(lora_request)

    def add_request(self, request: Request) -> None:
        self.output.add(request)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Finish the request with reason "abort" and free its blocks now; its final delta, if it was live."""
        request = self.requests.get(request_id)
        return None if request is None else self.output.finish_now(request, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_running_requests(self) -> int:
        """Requests with a sequence in the running batch; for the thread that steps the engine."""
        return _count_requests(self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        """Abort the requests past their deadline, then run one scheduled step; the output deltas of both."""
        expired = self.output.abort_expired()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return expired
        now = time.monotonic()
        for item in scheduled:
            times = item.seq.request.times
            times.first_scheduled = times.first_scheduled or now
        return expired + self.output.update_from_output(scheduled, self._execute(scheduled))

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.stop(self.runner.tp)

    def watch_workers(self, on_death: Callable[[EngineDeadError], None]) -> None:
        """Call `on_death` from another thread if a tensor-parallel worker dies while the engine is idle or busy."""
        if self.workers is not None:
            self.workers.watch(lambda message: on_death(EngineDeadError(message)))

    def _execute(self, scheduled: list[ScheduledSeq]) -> SampledStep:
        """Run the step; with several ranks any failure leaves them out of step, so the engine is dead."""
        try:
            return self.runner.execute(scheduled)
        except Exception as exc:
            if self.workers is None:
                raise
            message = self.workers.failure("during a step")
            self.workers.stop(None)  # the ranks are out of step: no message can reach them in order
            raise EngineDeadError(message) from exc

    def stats(self) -> EngineStats:
        # Copies first (each one C call, so atomic): another thread may ask while a step runs.
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        blocks = self.block_manager.stats()
        return EngineStats(
            num_requests_running=_count_requests(running),
            num_requests_waiting=_count_requests(waiting),
            kv_cache_usage=blocks.num_used_blocks / blocks.num_total_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.counters.prompt_tokens,
            generation_tokens=self.counters.generation_tokens,
            blocks=blocks,
            lora_requests_running=_requests_per_adapter(running),
            lora_requests_waiting=_requests_per_adapter(waiting),
        )

    def _tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        vocab_size = self.model_config.vocab_size
        for token_id in prompt:
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
                raise ValueError(f"prompt token id {token_id!r} is outside the vocabulary [0, {vocab_size})")
        return None, list(prompt)

    def _check_length(self, prompt_len: int, params: SamplingParams) -> None:
        max_tokens = params.max_tokens or 1
        if prompt_len + max_tokens > self.max_model_len:
            raise ContextLengthError(prompt_len, max_tokens, self.max_model_len)
        if params.min_tokens > self.max_model_len:
            raise ValueError(f"min_tokens must be <= max_model_len ({self.max_model_len}), got {params.min_tokens}")

    def _check_vocabulary_bounds(self, params: SamplingParams) -> None:
        vocab_size = self.model_config.vocab_size
        if params.top_k > vocab_size:
            raise ValueError(
                f"top_k must be -1 (disabled) or in [1, {vocab_size}] (the vocabulary size), got {params.top_k}"
            )
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            for token_id in getattr(params, name) or []:
                if token_id >= vocab_size:
                    raise ValueError(f"{name} must be in [0, {vocab_size}) (the vocabulary size), got {token_id}")
        ending = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if params.min_tokens and params.allowed_token_ids and ending.issuperset(params.allowed_token_ids):
            raise ValueError("allowed_token_ids: every allowed token is a stop token or EOS, which min_tokens bans")

    def _model_max_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            limit = min(limit, self.model_config.sliding_window)
        if self.config.max_model_len is not None and self.config.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.config.max_model_len}) exceeds the model's limit ({limit})")
        return self.config.max_model_len or limit

    def _fit_max_model_len(self, model_max_len: int, num_blocks: int) -> int:
        capacity = num_blocks * self.config.block_size
        if capacity >= model_max_len:
            return model_max_len
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len ({self.config.max_model_len}) needs {-(-model_max_len // self.config.block_size)} "
                f"KV blocks but only {num_blocks} fit; raise the KV budget or lower max_model_len"
            )
        logger.warning("max_model_len lowered from %d to the KV cache capacity %d", model_max_len, capacity)
        return capacity


def _check_timeout(timeout: Optional[float]) -> None:
    """None, or seconds: a range check, which rejects NaN, infinities and integers too large for a float too."""
    if timeout is None:
        return
    is_number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if not is_number or not 0 < timeout <= sys.float_info.max:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")


def _count_requests(seqs: list[Sequence]) -> int:
    return len({seq.request.request_id for seq in seqs})


def _requests_per_adapter(seqs: list[Sequence]) -> dict[str, int]:
    requests = {seq.request.request_id: seq.request.lora.name for seq in seqs if seq.request.lora is not None}
    return dict(Counter(requests.values()))
