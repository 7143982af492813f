"""OpenAI request schemas: parsed and checked into engine terms, with OpenAI-style error objects."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from engine.config import settings_from_dict
from engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_TEMPERATURE, SamplingParams
from handler.api_error import APIError, json_type
from handler.output_constraints import CONSTRAINT_FIELDS, OutputConstraint, output_constraint
from handler.tool_calls.history import assistant_calls, tool_result
from handler.tool_calls.request import ChatTools, parse_tools

Prompt = Union[str, list[int]]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = {"assistant": ("role", "content", "name", "tool_calls"), "tool": ("role", "content", "tool_call_id")}
# Fields of an assistant message in a reply: a client that sends a reply back in the conversation sends them too.
REPLY_ONLY_KEYS = ("refusal", "annotations", "audio", "function_call", "reasoning_content")
TOKEN_ID_KEY = re.compile(r"[0-9]{1,12}", re.ASCII)  # a logit_bias key


@dataclass
class RequestLimits:
    """What one request may ask for: the model-config's `handler.limits`; each a positive integer."""

    max_choices: int = 128  # prompts x n
    max_stop: int = 16  # stop strings
    max_stop_length: int = 256  # characters in one stop string
    max_generated_tokens: int = 131072  # choices x max_tokens
    default_max_tokens: int = 1024  # a chat request's max_tokens when it sets none (capped by the context)
    max_response_bytes: int = 64 * 2**20  # the worst case of one response; TorchServe's max_response_size

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"handler.limits.{item.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RequestLimits":
        return settings_from_dict(cls, values, "handler.limits")


@dataclass
class CompletionRequest:
    model: Optional[str]
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    timeout: Optional[float]
    extensions: dict[str, Any] = field(default_factory=dict)  # the plugins' own request fields that were sent
    constraint_source: Optional[str] = None  # the field that constrains the output (params.structured_outputs)


@dataclass
class ChatRequest:
    model: Optional[str]
    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    timeout: Optional[float]
    extensions: dict[str, Any] = field(default_factory=dict)  # the plugins' own request fields that were sent
    constraint_source: Optional[str] = None  # the field that constrains the output (params.structured_outputs)
    tools: Optional[ChatTools] = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "int_list": (_is_int_list, "a list of integers"),
    "stop": (_is_stop, "a string or a list of strings"),
    "any": (lambda v: True, "anything"),
}

# name -> kind; every field may also be null, which means "the default".
SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "n": "int", "stop": "stop", "seed": "int",
    "presence_penalty": "number", "frequency_penalty": "number", "top_k": "int", "min_p": "number",
    "repetition_penalty": "number", "ignore_eos": "bool", "min_tokens": "int", "stop_token_ids": "int_list",
    "skip_special_tokens": "bool",
    "allowed_token_ids": "int_list",  # vLLM's extra parameter: every generated token is one of these ids
}
COMMON_FIELDS = {
    "model": "str", "max_tokens": "int", "stream": "bool", "stream_options": "object", "user": "str", "timeout": "number",
    "logit_bias": "object", "vllm_xargs": "object", **CONSTRAINT_FIELDS,
}
COMPLETION_FIELDS = {
    "prompt": "any", "logprobs": "int", "echo": "bool", "best_of": "int", "suffix": "str",
}
CHAT_FIELDS = {
    "messages": "any", "logprobs": "bool", "top_logprobs": "int", "max_completion_tokens": "int",
    "tools": "any", "tool_choice": "any", "parallel_tool_calls": "bool",
}

REQUEST_FIELDS = frozenset({**COMMON_FIELDS, **SAMPLING_FIELDS, **COMPLETION_FIELDS, **CHAT_FIELDS})
# vLLM's runtime LoRA routes: v1/load_lora_adapter and v1/unload_lora_adapter.
LOAD_LORA_FIELDS = {"lora_name": "str", "lora_path": "str"}
UNLOAD_LORA_FIELDS = {"lora_name": "str"}
# An adapter's name is a request's `model` and a metrics label: TorchServe's metric lines cannot carry , : | or #.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", re.ASCII)
ADAPTER_NAME_RULE = "1 to 128 letters, digits, '.', '_', '-' or '/', starting with a letter or a digit"


class _Body:
    """The request's JSON object: typed field access, then a check that no unknown field was sent."""

    def __init__(self, body: Any, fields: dict[str, str]) -> None:
        if not isinstance(body, dict):
            raise APIError(f"the request body must be a JSON object, got {json_type(body)}")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise APIError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
        self.values = body
        self.fields = fields

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        if value is None:
            return default
        check, description = KINDS[self.fields[name]]
        if not check(value):
            raise APIError(f"{name} must be {description}, got {json_type(value)}", param=name)
        return value

    def reject_set(self, name: str, allowed: tuple[Any, ...] = ()) -> None:
        value = self.get(name)
        if value is not None and value not in allowed:
            raise APIError(f"{name} is not supported by this server", param=name)

    def in_range(self, name: str, low: float, high: float, default: Any) -> Any:
        value = self.get(name, default)
        if value is not None and not low <= value <= high:
            raise APIError(f"{name} must be between {low} and {high}, got {value}", param=name)
        return value


def parse_completion_request(
    body: Any, limits: RequestLimits, extension_fields: Optional[dict[str, str]] = None
) -> CompletionRequest:
    extension_fields = extension_fields or {}
    fields = _Body(body, {**COMMON_FIELDS, **SAMPLING_FIELDS, **COMPLETION_FIELDS, **extension_fields})
    fields.reject_set("echo", allowed=(False,))
    fields.reject_set("suffix", allowed=("",))
    prompts = _prompts(body.get("prompt"))
    logprobs = fields.in_range("logprobs", 0, MAX_LOGPROBS, None)
    constraint = output_constraint(_sent(fields, CONSTRAINT_FIELDS))
    params = _sampling_params(fields, fields.get("max_tokens", 16), logprobs, limits, len(prompts),
                              _engine_extensions(fields, constraint))
    best_of = fields.get("best_of")
    if best_of is not None and best_of != params.n:
        raise APIError("best_of other than n is not supported by this server", param="best_of")
    stream, include_usage = _stream_settings(fields)
    return CompletionRequest(fields.get("model"), prompts, params, stream, include_usage, _timeout(fields),
                             _extensions(fields, extension_fields), constraint and constraint.source)


def parse_chat_request(
    body: Any, limits: RequestLimits, extension_fields: Optional[dict[str, str]] = None
) -> ChatRequest:
    extension_fields = extension_fields or {}
    fields = _Body(body, {**COMMON_FIELDS, **SAMPLING_FIELDS, **CHAT_FIELDS, **extension_fields})
    logprobs = fields.get("logprobs", False)
    top_logprobs = fields.in_range("top_logprobs", 0, MAX_LOGPROBS, None)
    if top_logprobs is not None and not logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools = parse_tools(body.get("tools"), body.get("tool_choice"), fields.get("parallel_tool_calls"))
    constraint = output_constraint(_sent(fields, CONSTRAINT_FIELDS), tools and tools.output_constraint())
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    params = _sampling_params(fields, max_tokens, (top_logprobs or 0) if logprobs else None, limits, 1,
                              _engine_extensions(fields, constraint))
    stream, include_usage = _stream_settings(fields)
    messages = _messages(body.get("messages"))
    return ChatRequest(fields.get("model"), messages, params, stream, include_usage, _timeout(fields),
                       _extensions(fields, extension_fields), constraint and constraint.source, tools)


def parse_load_lora_request(body: Any) -> tuple[str, str]:
    """The adapter's name and PEFT folder of a `v1/load_lora_adapter` body."""
    fields = _Body(body, LOAD_LORA_FIELDS)
    return _adapter_name(fields), _required(fields, "lora_path")


def parse_unload_lora_request(body: Any) -> str:
    """The adapter's name of a `v1/unload_lora_adapter` body."""
    return _adapter_name(_Body(body, UNLOAD_LORA_FIELDS))


def _adapter_name(fields: _Body) -> str:
    name = _required(fields, "lora_name")
    if not ADAPTER_NAME.fullmatch(name):
        raise APIError(f"lora_name must be {ADAPTER_NAME_RULE}, got {name!r}", param="lora_name")
    return name


def _required(fields: _Body, name: str) -> Any:
    value = fields.get(name)
    if value is None or value == "":
        raise APIError(f"{name} is required", param=name)
    return value


def _sampling_params(
    fields: _Body, max_tokens: Optional[int], logprobs: Optional[int], limits: RequestLimits, num_prompts: int,
    extensions: dict[str, Any],
) -> SamplingParams:
    fields.in_range("temperature", 0, MAX_TEMPERATURE, None)
    n = fields.get("n", 1)
    _check_within("max_choices", num_prompts * n, limits.max_choices, f"{num_prompts} prompt(s) x n {n} choices",
                  param="n" if num_prompts == 1 else "prompt")
    _check_stop(fields.get("stop"), limits)
    per_choice = max_tokens or limits.default_max_tokens
    _check_within("max_generated_tokens", num_prompts * n * per_choice, limits.max_generated_tokens,
                  f"{num_prompts * n} choice(s) x max_tokens {per_choice} tokens to generate", param="max_tokens")
    values = {name: fields.get(name) for name in SAMPLING_FIELDS}
    values = {name: value for name, value in values.items() if value is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **values, **extensions)
    except ValueError as exc:
        message = str(exc)
        raise APIError(message, param=message.split()[0]) from None


def _sent(fields: _Body, names: dict[str, str]) -> dict[str, Any]:
    """The values of the fields `names` that the request set."""
    values = {name: fields.get(name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def _engine_extensions(fields: _Body, constraint: Optional[OutputConstraint]) -> dict[str, Any]:
    """SamplingParams' logit_bias, structured_outputs and extra_args."""
    return {
        "logit_bias": _logit_bias(fields.get("logit_bias")),
        "structured_outputs": None if constraint is None else constraint.params,
        "extra_args": _extra_args(fields.get("vllm_xargs")),
    }


def _logit_bias(biases: Optional[dict[str, Any]]) -> Optional[dict[int, float]]:
    """OpenAI's logit_bias: token ids (as the JSON object's keys) to a bias in [-100, 100]."""
    for key, bias in (biases or {}).items():
        if not TOKEN_ID_KEY.fullmatch(key):
            raise APIError(f"logit_bias keys must be token ids (integers), got {key!r}", param="logit_bias")
        if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise APIError(f"logit_bias values must be numbers in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                           f"{bias!r} for token {key}", param="logit_bias")
    return {int(key): bias for key, bias in biases.items()} if biases else None


def _extra_args(arguments: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """vLLM's vllm_xargs, for the engine's logits-processor plugins: strings, numbers or lists of them."""
    for key, value in (arguments or {}).items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) or _is_number(item) for item in items):
            raise APIError(f"vllm_xargs.{key} must be a string, a number or a list of them, got {json_type(value)}",
                           param="vllm_xargs")
    return arguments or None


def _check_stop(stop: Union[None, str, list[str]], limits: RequestLimits) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    _check_within("max_stop", len(stops), limits.max_stop, f"{len(stops)} stop strings", param="stop")
    longest = max(map(len, stops), default=0)
    _check_within("max_stop_length", longest, limits.max_stop_length, f"a stop string of {longest} characters",
                  param="stop")


def _check_within(limit: str, value: int, maximum: int, what: str, param: str) -> None:
    if value > maximum:
        raise APIError(
            f"this request asks for {what}; this server allows at most {maximum} (handler.limits.{limit})",
            param=param, code="limit_exceeded",
        )


def _extensions(fields: _Body, extension_fields: dict[str, str]) -> dict[str, Any]:
    values = {name: fields.get(name) for name in extension_fields}
    return {name: value for name, value in values.items() if value is not None}


def _timeout(fields: _Body) -> Optional[float]:
    timeout = fields.get("timeout")
    if timeout is not None and not 0 < timeout < float("inf"):
        raise APIError(f"timeout must be a positive number of seconds, got {timeout}", param="timeout")
    return timeout


def _stream_settings(fields: _Body) -> tuple[bool, bool]:
    stream = fields.get("stream", False)
    options = fields.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise APIError(f"unrecognized stream_options field(s): {', '.join(unknown)}", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError("stream_options.include_usage must be a boolean", param="stream_options")
    return stream, include_usage


def _prompts(prompt: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if prompt is None:
        raise APIError("prompt is required", param="prompt")
    if isinstance(prompt, str) or _is_int_list(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_int_list(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param="prompt",
        )
    if any(len(p) == 0 for p in prompts):
        raise APIError("prompt must not be empty", param="prompt")
    return prompts


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise APIError("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    return [_message(i, message) for i, message in enumerate(messages)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(f"{where} must be an object", param=where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise APIError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param=f"{where}.role")
    if role == "assistant":
        message = {key: value for key, value in message.items() if key not in REPLY_ONLY_KEYS or value}
    unknown = sorted(set(message) - set(MESSAGE_KEYS.get(role, ("role", "content", "name"))))
    if unknown:
        raise APIError(f"{where}: unsupported field(s) {', '.join(unknown)}", param=where)
    if role == "tool":
        return tool_result(where, message, _content_text)
    if message.get("tool_calls") is not None:
        return assistant_calls(where, message, _content_text)
    content = _content_text(where, message.get("content"))
    return {"role": "system" if role == "developer" else role, "content": content}


def _content_text(where: str, content: Any) -> str:
    """Message content: a string, or a list of text parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    raise APIError(
        f"{where}.content must be a string or a list of text parts, got {json_type(content)}",
        param=f"{where}.content",
    )


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
