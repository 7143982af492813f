"""pagedserve's in-process LLM engine: paged KV cache, continuous batching, prefix caching."""
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError, RequestFailedError, RequestTimeoutError
from engine.llm import LLM
from engine.llm_engine import ContextLengthError, LLMEngine
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMEngine",
    "CompletionOutput",
    "ContextLengthError",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "LLM",
    "LLMEngine",
    "Logprob",
    "RequestFailedError",
    "RequestOutput",
    "RequestTimeoutError",
    "SamplingParams",
]
