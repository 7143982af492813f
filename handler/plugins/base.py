"""The plugin interface: what a plugin sees of an API call before generation, and of each choice's output after.

Requests pass the plugins in the order the model-config lists them; outputs pass their filters in reverse order,
so the plugin listed first is the outermost (a guard listed before `rag` checks what the user sent, not the
retrieved context). A plugin may rewrite the request in place, answer it itself, refuse it (raise
`handler.protocol.APIError`), and filter each choice's output: hold text back, rewrite it, or stop it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol, Union

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.outputs import CompletionOutput
from handler.model_paths import path_in_model_dir
from handler.protocol import ChatRequest, CompletionRequest

# (metric name, value, labels) into TorchServe's metrics; names a model's metrics YAML does not declare are dropped.
EmitMetric = Callable[..., None]


@dataclass
class PluginRequest:
    """One API call on its way to the engine; `body` (messages or prompts, params) may be rewritten in place."""

    request_id: str
    body: Union[ChatRequest, CompletionRequest]
    response_fields: dict[str, Any] = field(default_factory=dict)  # on the response, or on a stream's first chunk
    original: Union[ChatRequest, CompletionRequest] = field(init=False)  # the call as the client sent it

    def __post_init__(self) -> None:
        self.original = copy.deepcopy(self.body)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.body, ChatRequest)

    def extension(self, name: str) -> Any:
        """A plugin's own request field (declared in `Plugin.request_fields`), or None when the client sent none."""
        return self.body.extensions.get(name)


@dataclass(frozen=True)
class PluginReply:
    """A plugin's own answer: the text of every choice, sent in the usual response shape; no tokens are spent."""

    text: str


class OutputFilter(Protocol):
    """One choice's output filter. It receives each delta of the choice (the last one has a finish_reason) and
    returns the deltas to pass on: none while it holds text back, rewritten ones, or one whose finish_reason ends
    the choice early (after which the choice receives nothing more)."""

    async def __call__(self, delta: CompletionOutput) -> list[CompletionOutput]: ...


@dataclass
class PluginContext:
    """What `Plugin.initialize` gets: where the model lives, the main engine's settings, and the worker's shared
    services. The main engine starts after every plugin, so a plugin may take its share of the worker's budget."""

    model_dir: Path
    engine_config: EngineConfig
    tokenizer: Callable[[], Any]  # the main model's tokenizer, loaded on first call
    embedding_model: Callable[[], Any]  # the worker's handler.embeddings.EmbeddingModel, loaded on first call
    emit_metric: EmitMetric
    # For a plugin's own engine: its death ends the worker, so that TorchServe starts a fresh one (as the main's).
    engine_died: Callable[[EngineDeadError], None] = lambda error: None

    def path(self, key: str, value: str) -> Path:
        """A path option: relative ones are inside the model folder (they may not leave it)."""
        return Path(path_in_model_dir(key, value, str(self.model_dir)))


@dataclass
class NoOptions:
    """For a plugin that takes no options."""


class Plugin:
    """Subclass and override what you need. `Options` is a dataclass: the YAML's `options:` mapping is checked
    against its fields at startup. `request_fields` names the request-body fields this plugin reads (name ->
    kind, one of handler.protocol.KINDS), which clients may then send beside OpenAI's."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    request_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any) -> None:
        self.options = options

    def initialize(self, context: PluginContext) -> None:
        """Create resources (an index, a second engine); called once per worker, before the main engine starts."""

    def reserved_kv_cache_gb(self) -> float:
        """The KV-cache memory (GiB) this plugin's own engines hold, taken from the main engine's CPU budget."""
        return 0.0

    async def before(self, request: PluginRequest) -> Optional[PluginReply]:
        """Inspect or rewrite the request; return a reply to answer it without the engine."""
        return None

    def output_filter(self, request: PluginRequest, prompt_index: int) -> Optional[OutputFilter]:
        """A fresh filter for one choice of this request's prompt `prompt_index` (always 0 for a chat), or None to
        leave its output alone."""
        return None


def join_deltas(index: int, deltas: list[CompletionOutput]) -> CompletionOutput:
    """Several deltas of one choice as one: text, tokens and logprobs (if every delta has them) in order, the last
    finish_reason."""
    with_logprobs = bool(deltas) and all(delta.logprobs is not None for delta in deltas)
    joined = CompletionOutput(index, "", [], [] if with_logprobs else None)
    for delta in deltas:
        joined.add(delta)
    return joined


def finished(delta: CompletionOutput, reason: str) -> CompletionOutput:
    """`delta` marked as the end of its choice for `reason` (e.g. "content_filter")."""
    return dataclasses.replace(delta, finish_reason=reason, stop_reason=None)
