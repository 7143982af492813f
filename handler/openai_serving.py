"""The OpenAI API over an AsyncLLMEngine: completions, chat completions and models, whole or streamed."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from engine import (
    AsyncLLMEngine, ContextLengthError, EngineDeadError, EngineOverloadedError, RequestFailedError, RequestOutput,
    RequestTimeoutError, SamplingParams,
)
from engine.lora import LoRARequest
from engine.outputs import CompletionOutput, Logprob, RequestMetrics
from engine.sequence import Request
from handler.lora_serving import LoRAAdapters
from handler.output_constraints import relabeled
from handler.protocol import (
    APIError, ChatRequest, CompletionRequest, RequestLimits, parse_chat_request, parse_completion_request,
)
from handler.tool_calls.parsers import ToolCallParser
from handler.tool_calls.responses import ChatDeltas, chat_message, finish_reason
from handler.plugins import OutputFilter, Plugin, PluginPipeline, PluginReply, PluginRequest
from handler.plugins.pipeline import run_filters
from handler.response_budget import ResponseBudget

SSE_DONE = "data: [DONE]\n\n"
Response = Union[dict[str, Any], AsyncIterator[str]]


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class _Call:
    """One API call in flight: its id, what it asked for, and the engine requests it became."""

    call_id: str
    object_name: str
    model: str
    created: int
    requests: list[Request]
    n: int
    num_prompts: int
    plugged: PluginRequest
    reply: Optional[PluginReply]
    response_fields: dict[str, Any]  # the plugins' extension fields: on the whole response or the first chunk

    def envelope(self, **fields: Any) -> dict[str, Any]:
        extra = self.response_fields
        if self.object_name.endswith(".chunk"):
            self.response_fields = {}
        return {"id": self.call_id, "object": self.object_name, "created": self.created, "model": self.model,
                **extra, **fields}

    def choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.n + output.index


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str,
        version: str,
        model_path: str,
        chat_template: Optional[str] = None,
        limits: RequestLimits = RequestLimits(),
        request_timeout: Optional[float] = None,
        pipeline: PluginPipeline = PluginPipeline([]),
        adapters: Optional[LoRAAdapters] = None,
        tool_call_parser: str = "hermes",
    ) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.version = version
        self.model_path = model_path
        self.chat_template = chat_template
        self.limits = limits
        self.request_timeout = request_timeout
        self.pipeline = pipeline
        self.response_budget = ResponseBudget(engine.tokenizer, limits.max_response_bytes)
        self.created = int(time.time())
        self.adapters = adapters or LoRAAdapters.disabled(engine, served_model_name, self.created)
        self.tool_call_parser = tool_call_parser  # how a model's own tool calls are read (tool_choice auto)

    def list_models(self) -> dict[str, Any]:
        card = {
            "id": self.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "pagedserve",
            "root": Path(self.model_path).name,  # never the absolute path of the weights
            "version": self.version,
            "max_model_len": self.engine.max_model_len,
        }
        return {"object": "list", "data": [card, *self.adapters.model_cards()]}

    async def create_completion(self, body: Any, request_id: str) -> Response:
        plugged, reply, lora = await self._through_plugins(
            parse_completion_request(body, self.limits, self.pipeline.request_fields), request_id)
        request = plugged.body
        call = self._start(f"cmpl-{request_id}", "text_completion", plugged, request.prompts, "prompt", reply, lora)
        if request.stream:
            return self._stream_completion(call, request)
        outputs = await _collect(self._run(call))
        choices = [
            _completion_choice(call.choice_index(i, out), out, request.params.logprobs is not None)
            for i, output in enumerate(outputs)
            for out in output.outputs
        ]
        return call.envelope(choices=sorted(choices, key=lambda c: c["index"]), usage=_usage(outputs))

    async def create_chat_completion(self, body: Any, request_id: str) -> Response:
        plugged, reply, lora = await self._through_plugins(
            parse_chat_request(body, self.limits, self.pipeline.request_fields), request_id)
        request = plugged.body
        tools = None if request.tools is None else request.tools.template_tools()
        prompt = self._chat_prompt(request.messages, tools) if reply is None else []
        if request.params.max_tokens is None:
            request.params = self._default_max_tokens(request.params, len(prompt))
        call = self._start(f"chatcmpl-{request_id}", "chat.completion", plugged, [prompt], "messages", reply, lora)
        if request.stream:
            return self._stream_chat(call, request)
        outputs = await _collect(self._run(call))
        choices = [_chat_choice(out, request.params.logprobs, self._tool_parser(request)) for out in outputs[0].outputs]
        return call.envelope(choices=choices, usage=_usage(outputs))

    def _tool_parser(self, request: ChatRequest) -> Optional[ToolCallParser]:
        """A fresh reader of one choice's tool calls; None when the request reads none."""
        return None if request.tools is None else request.tools.parser(self.tool_call_parser)

    async def _through_plugins(
        self, request: Union[CompletionRequest, ChatRequest], request_id: str
    ) -> tuple[PluginRequest, Optional[PluginReply], Optional[LoRARequest]]:
        """The request as the plugins left it, a plugin's reply if one answered, and the LoRA adapter its `model`
        names; a request for a model this endpoint does not serve is refused before any plugin spends time on it.
        Unless a plugin answered, the request's output constraint is compiled by then."""
        lora = await self.adapters.resolve(request.model)
        plugged = PluginRequest(request_id, request)
        reply = await self.pipeline.before(plugged)
        if reply is None:
            await self._compile_constraint(plugged.body)
        return plugged, reply, lora

    async def _compile_constraint(self, request: Union[CompletionRequest, ChatRequest]) -> None:
        """Compile the output constraint on a thread: a long compile holds up no other request of this worker, and
        make_request finds it compiled."""
        constraint = request.params.structured_outputs
        if constraint is None:
            return
        try:
            await self.engine.compile_grammar(constraint)
        except ValueError as exc:
            raise _refused(str(exc), "prompt", request.constraint_source) from None

    def _start(
        self, call_id: str, object_name: str, plugged: PluginRequest, prompts: list[Any], what: str,
        reply: Optional[PluginReply], lora: Optional[LoRARequest],
    ) -> _Call:
        """Check the response's size, every prompt and the engine's room before any prompt reaches the engine; a
        call that a plugin answered reaches none."""
        request = plugged.body
        self._check_response_size(request, len(prompts))
        requests = [] if reply is not None else self._make_requests(call_id, prompts, request, what, lora)
        object_name = object_name if not request.stream else f"{object_name}.chunk"
        return _Call(call_id, object_name, request.model or self.served_model_name, int(time.time()), requests,
                     request.params.n, len(prompts), plugged, reply, dict(plugged.response_fields))

    def _make_requests(
        self, call_id: str, prompts: list[Any], request: Any, what: str, lora: Optional[LoRARequest]
    ) -> list[Request]:
        timeout = min(filter(None, (request.timeout, self.request_timeout)), default=None)
        requests = [
            self._make_request(f"{call_id}-{i}", prompt, request, what, timeout, lora)
            for i, prompt in enumerate(prompts)
        ]
        try:
            self.engine.check_capacity(len(requests))
        except ENGINE_ERRORS as exc:
            raise _api_error(exc) from None
        return requests

    def _default_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """A chat request without max_tokens stops at `limits.default_max_tokens` or at the end of the context."""
        room = max(self.engine.max_model_len - prompt_len, 1)
        return dataclasses.replace(params, max_tokens=min(self.limits.default_max_tokens, room))

    def _check_response_size(self, request: Union[CompletionRequest, ChatRequest], num_prompts: int) -> None:
        """A stream sends each choice's text in chunks of at most all of it; a whole response holds every choice."""
        params = request.params
        num_choices = 1 if request.stream else num_prompts * params.n
        try:
            self.response_budget.check(num_choices, params.max_tokens, params.logprobs)
        except ValueError as exc:
            raise APIError(str(exc), param="max_tokens", code="response_too_large") from None

    def _make_request(
        self, request_id: str, prompt: Any, request: Any, what: str, timeout: Optional[float],
        lora: Optional[LoRARequest],
    ) -> Request:
        try:
            return self.engine.make_request(request_id, prompt, request.params, timeout=timeout, lora_request=lora)
        except ContextLengthError as exc:
            asked = f"{exc.max_tokens} in the completion" if request.params.max_tokens else "at least 1 to generate"
            raise APIError(
                f"This model's maximum context length is {exc.max_model_len} tokens. However, you requested "
                f"{exc.prompt_len + exc.max_tokens} tokens ({exc.prompt_len} in the {what}, {asked}). "
                f"Please reduce the length of the {what} or the completion.",
                param=what, code="context_length_exceeded",
            ) from None
        except ValueError as exc:
            raise _refused(str(exc), what, request.constraint_source) from None

    def _chat_prompt(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if self.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise APIError("this model has no chat template; set handler.chat_template in the model-config YAML")
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may reject a conversation, e.g. a role order it does not allow
            raise APIError(f"the chat template rejected these messages: {exc}", param="messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _run(self, call: _Call) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The call's outputs: the engine's (or a plugin's reply), through the plugins' output filters."""
        if call.reply is not None:
            return _replied(call)
        deltas = _engine_errors(_merge([self.engine.stream(request) for request in call.requests]))
        if not self.pipeline.plugins:
            return deltas
        return _filtered(deltas, ChoiceFilters(self.pipeline, call.plugged, call.num_prompts * call.n))

    async def _stream_completion(self, call: _Call, request: CompletionRequest) -> AsyncIterator[str]:
        want_logprobs = request.params.logprobs is not None
        totals: dict[int, RequestOutput] = {}
        async with aclosing(self._run(call)) as deltas:
            async for i, delta in deltas:
                _fold(totals, i, delta)
                for out in delta.outputs:
                    if out.text or out.finish_reason or (want_logprobs and out.token_ids):
                        choice = _completion_choice(call.choice_index(i, out), out, want_logprobs)
                        yield sse_event(call.envelope(choices=[choice]))
        if request.include_usage:
            yield sse_event(call.envelope(choices=[], usage=_usage(list(totals.values()))))

    async def _stream_chat(self, call: _Call, request: ChatRequest) -> AsyncIterator[str]:
        for index in range(call.n):
            role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse_event(call.envelope(choices=[role]))
        top_logprobs = request.params.logprobs
        readers = [ChatDeltas(self._tool_parser(request)) for _ in range(call.n)]
        totals: dict[int, RequestOutput] = {}
        async with aclosing(self._run(call)) as deltas:
            async for _, delta in deltas:
                _fold(totals, 0, delta)
                for out in delta.outputs:
                    for choice in _chat_deltas(out, top_logprobs, readers[out.index]):
                        yield sse_event(call.envelope(choices=[choice]))
        if request.include_usage:
            yield sse_event(call.envelope(choices=[], usage=_usage(list(totals.values()))))


def _refused(message: str, what: str, constraint_source: Optional[str]) -> APIError:
    """The engine refused a request: the error names the request field at fault, as the client spelled it."""
    if message.startswith("structured_outputs") and constraint_source is not None:
        return APIError(relabeled(message, constraint_source), param=constraint_source)
    return APIError(message, param="logit_bias" if message.startswith("logit_bias") else what)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the streams' deltas tagged with the stream's index; closing this closes (aborts) them all."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, finished))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ENGINE_ERRORS = (EngineDeadError, EngineOverloadedError, RequestTimeoutError, RequestFailedError)


def _api_error(exc: Exception) -> APIError:
    """The OpenAI error for one of ENGINE_ERRORS."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), status=503, code="overloaded", error_type="overloaded_error")
    if isinstance(exc, EngineDeadError):
        return APIError(f"the engine is not running: {exc}", status=503)
    if isinstance(exc, RequestTimeoutError):
        return APIError(str(exc), status=408, code="timeout", error_type="timeout_error")
    return APIError(str(exc), status=500)


async def _engine_errors(deltas: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with aclosing(deltas):
        try:
            async for item in deltas:
                yield item
        except ENGINE_ERRORS as exc:
            raise _api_error(exc) from None


class ChoiceFilters:
    """The output filters of every choice of one call, made on the choice's first delta; a choice a filter ended
    receives nothing more, and once every choice has ended the call stops (its engine requests are aborted)."""

    def __init__(self, pipeline: PluginPipeline, plugged: PluginRequest, num_choices: int) -> None:
        self.pipeline = pipeline
        self.plugged = plugged
        self.open_choices = num_choices
        self.filters: dict[tuple[int, int], list[tuple[Plugin, OutputFilter]]] = {}
        self.ended: set[tuple[int, int]] = set()

    async def apply(self, prompt_index: int, delta: CompletionOutput) -> list[CompletionOutput]:
        key = (prompt_index, delta.index)
        if key in self.ended:
            return []
        if key not in self.filters:
            self.filters[key] = self.pipeline.output_filters(self.plugged, prompt_index)
        passed = await run_filters(self.filters[key], delta)
        if any(out.finish_reason is not None for out in passed):
            self.ended.add(key)
            self.open_choices -= 1
            return passed[:next(i for i, out in enumerate(passed) if out.finish_reason is not None) + 1]
        return passed


async def _filtered(
    deltas: AsyncIterator[tuple[int, RequestOutput]], choices: ChoiceFilters
) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with aclosing(deltas):
        async for index, delta in deltas:
            outputs = [out for item in delta.outputs for out in await choices.apply(index, item)]
            yield index, dataclasses.replace(delta, outputs=outputs)
            if choices.open_choices == 0:
                return


async def _replied(call: _Call) -> AsyncIterator[tuple[int, RequestOutput]]:
    """A plugin's answer as the finished output of every prompt, `n` choices each, with no tokens spent."""
    now = time.time()
    metrics = RequestMetrics(now, None, None, now, 0, 0)
    for index in range(call.num_prompts):
        outputs = [CompletionOutput(k, call.reply.text, [], None, "stop") for k in range(call.n)]
        yield index, RequestOutput(f"{call.call_id}-{index}", None, [], outputs, True, metrics)


async def _collect(deltas: AsyncIterator[tuple[int, RequestOutput]]) -> list[RequestOutput]:
    totals: dict[int, RequestOutput] = {}
    async with aclosing(deltas):
        async for index, delta in deltas:
            _fold(totals, index, delta)
    return [totals[index] for index in sorted(totals)]


def _fold(totals: dict[int, RequestOutput], index: int, delta: RequestOutput) -> None:
    empty = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False, delta.metrics)
    totals.setdefault(index, empty).add(delta)


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    completion_tokens = sum(len(out.token_ids) for output in outputs for out in output.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_choice(index: int, out: CompletionOutput, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": index,
        "text": out.text,
        "logprobs": _completion_logprobs(out) if want_logprobs else None,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
    }


def _chat_deltas(out: CompletionOutput, top_logprobs: Optional[int], reader: ChatDeltas) -> list[dict[str, Any]]:
    """The stream choices of one engine delta: one per delta object (content, each tool call's piece); the
    log-probabilities go on the first, the finish reason on the last. Nothing when the engine delta adds nothing."""
    deltas = reader.deltas(out.text, out.finish_reason is not None)
    with_logprobs = top_logprobs is not None and bool(out.token_ids)
    if not deltas and (out.finish_reason or with_logprobs):
        deltas = [{}]
    choices = [{"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
    if choices and with_logprobs:
        choices[0]["logprobs"] = _chat_logprobs(out, top_logprobs)
    if choices:
        choices[-1]["finish_reason"] = reader.finish_reason(out.finish_reason)
    return choices


def _chat_choice(
    out: CompletionOutput, top_logprobs: Optional[int], parser: Optional[ToolCallParser]
) -> dict[str, Any]:
    message = chat_message(out.text, parser)
    return {
        "index": out.index,
        "message": message,
        "logprobs": _chat_logprobs(out, top_logprobs) if top_logprobs is not None else None,
        "finish_reason": finish_reason(out.finish_reason, "tool_calls" in message),
        "stop_reason": out.stop_reason,
    }


def _sampled(out: CompletionOutput) -> list[tuple[Logprob, dict[int, Logprob]]]:
    return [(candidates[token_id], candidates) for token_id, candidates in zip(out.token_ids, out.logprobs or [])]


def _completion_logprobs(out: CompletionOutput) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, with the top candidates as {token: logprob}."""
    sampled = _sampled(out)
    tokens = [chosen.decoded_token for chosen, _ in sampled]
    offsets = [sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [chosen.logprob for chosen, _ in sampled],
        "top_logprobs": [{lp.decoded_token: lp.logprob for lp in candidates.values()} for _, candidates in sampled],
        "text_offset": offsets,
    }


def _chat_logprobs(out: CompletionOutput, top_logprobs: int) -> dict[str, Any]:
    content = []
    for chosen, candidates in _sampled(out):
        top = sorted((lp for lp in candidates.values() if lp.rank <= top_logprobs), key=lambda lp: lp.rank)
        content.append({**_chat_token(chosen), "top_logprobs": [_chat_token(lp) for lp in top]})
    return {"content": content}


def _chat_token(lp: Logprob) -> dict[str, Any]:
    return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode("utf-8"))}
