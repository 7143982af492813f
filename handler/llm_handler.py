"""The TorchServe entry point: one AsyncLLMEngine per worker, each request a coroutine on the OpenAI routes."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path
from contextlib import aclosing
from typing import Any, AsyncIterator

from ts.context import Context
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.protocol.otf_message_handler import create_predict_response

from engine import AsyncLLMEngine, EngineConfig, EngineDeadError
from engine.loader import default_model_path, resolve_model
from engine.tokenizer import load_tokenizer
from handler.api_keys import check_api_key, read_api_keys
from handler.chat_template import read_chat_template
from handler.config import HandlerConfig, handler_config
from handler.embedding_serving import EmbeddingServing
from handler.json_body import request_body
from handler.lora_serving import LoRAAdapters
from handler.metrics import TorchServeMetrics
from handler.openai_serving import SSE_DONE, OpenAIServing, sse_event
from handler.plugins import PluginContext, PluginPipeline
from handler.protocol import APIError
from handler.worker_socket import serialize_sends

logger = logging.getLogger(__name__)
ROUTES = ("v1/completions", "v1/chat/completions", "v1/embeddings", "v1/models", "v1/load_lora_adapter",
          "v1/unload_lora_adapter")
# After the engine dies, the worker process lives this long, to send the failed requests' error responses.
EXIT_DELAY_S = 1.0
DEFAULT_RESPONSE_TIMEOUT_S = 120.0  # TorchServe's, when the model-config sets no responseTimeout


class LLMHandler:
    def __init__(self) -> None:
        self.serving: OpenAIServing | None = None
        self.embeddings: EmbeddingServing | None = None
        self.metrics: TorchServeMetrics | None = None
        self.api_keys: tuple[bytes, ...] = ()  # none: no key asked for
        self.initialized = False

    def initialize(self, ctx: Context) -> None:
        """Plugins first (they may take part of the worker's memory budget), then the main engine."""
        model_dir = ctx.system_properties["model_dir"]
        config = handler_config(ctx.model_yaml_config, model_dir)
        config.engine.device = assigned_device(config.engine.device, ctx)
        self.api_keys = read_api_keys(config.api_key_file) if config.api_key_file else ()
        version = (ctx.manifest or {}).get("model", {}).get("modelVersion", "1.0")
        served_model_name = config.served_model_name or ctx.model_name
        self.metrics = TorchServeMetrics(ctx.metrics, ctx.model_name, version)
        self.embeddings = EmbeddingServing(config.embedding_model, served_model_name)
        pipeline = PluginPipeline(config.plugins)
        pipeline.initialize(self._plugin_context(model_dir, config))
        engine = AsyncLLMEngine.from_config(budget_after_plugins(config.engine, pipeline.reserved_kv_cache_gb()))
        engine.add_death_callback(_exit_for_restart)
        adapters = LoRAAdapters(engine, config.engine.enable_lora, served_model_name, config.lora_modules,
                                Path(model_dir), int(time.time()))
        adapters.load_startup_adapters()
        self.serving = OpenAIServing(
            engine,
            served_model_name,
            version,
            config.model or str(default_model_path()),
            read_chat_template(config.chat_template),
            config.limits,
            float(ctx.model_yaml_config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT_S)),
            pipeline,
            adapters,
            config.tool_call_parser,
        )
        self.metrics.start(engine.stats())
        engine.add_stat_logger(self.metrics.record)
        self.initialized = True

    def _plugin_context(self, model_dir: str, config: HandlerConfig) -> PluginContext:
        engine_config = config.engine
        tokenizer = functools.cache(
            lambda: load_tokenizer(resolve_model(engine_config.model), engine_config.tokenizer, required=True)
        )
        return PluginContext(Path(model_dir), engine_config, tokenizer, self.embeddings.model, self.metrics.emit,
                             _exit_for_restart)

    async def handle(self, data: list[dict[str, Any]], context: Context) -> list[str]:
        """Answer one request. Every reply ends with a message that tells the frontend the request is done
        (`ts_stream_next: false`), so that it drops the request; a plain reply would stay in its memory for good."""
        if _is_management_describe(data, context):
            # The frontend answers a describe in one piece whatever the worker sends; the header only ends the job.
            context.set_response_header(0, "ts_stream_next", "false")
            return [json.dumps(self.describe())]
        serialize_sends(context.cl_socket)
        self.metrics.bind_loop(asyncio.get_running_loop())
        route = (context.get_request_header(0, "url_path") or "").strip("/")
        try:
            if self.api_keys:
                check_api_key(self.api_keys, context.get_all_request_header(0))
            response = await self._dispatch(route, data[0], context.get_request_id(0))
        except APIError as exc:
            return self._send_error(context, exc)
        except Exception:
            logger.exception("request on %r failed", route)
            return self._send_error(context, APIError("internal server error", status=500))
        if isinstance(response, dict):
            return self._send_whole(context, response)
        return [await self._stream(response, context)]

    def describe(self) -> dict[str, Any]:
        """What `GET /models/NAME/VERSION?customized=true` shows: the served model and the engine's live state."""
        engine = self.serving.engine.engine
        tensor_parallel = {
            "size": engine.config.tensor_parallel_size,
            "worker_pids": engine.workers.pids if engine.workers else [],
        }
        return {
            **self.serving.list_models()["data"][0],
            "engine": dataclasses.asdict(engine.stats()),
            "tensor_parallel": tensor_parallel,
        }

    async def _dispatch(self, route: str, row: dict[str, Any], request_id: str) -> Any:
        if route == "v1/models":
            return self.serving.list_models()
        if route == "v1/completions":
            return await self.serving.create_completion(request_body(row), request_id)
        if route == "v1/chat/completions":
            return await self.serving.create_chat_completion(request_body(row), request_id)
        if route == "v1/embeddings":
            return await self.embeddings.create_embedding(request_body(row))
        if route == "v1/load_lora_adapter":
            return await self.serving.adapters.load(request_body(row))
        if route == "v1/unload_lora_adapter":
            return await self.serving.adapters.unload(request_body(row))
        raise APIError(f"unknown route {route!r}; this model serves {', '.join(ROUTES)}", status=404, code="unknown_url")

    async def _stream(self, events: AsyncIterator[str], context: Context) -> str:
        """Send each Server-Sent Event as one HTTP chunk; errors after the first chunk become an error event."""
        context.set_response_content_type(0, "text/event-stream")
        try:
            async with aclosing(events):
                async for event in events:
                    send_intermediate_predict_response([_wire(event)], context.request_ids, "Result", 200, context)
        except APIError as exc:
            self._send_error_event(context, exc)
        except Exception:
            logger.exception("stream failed")
            self._send_error_event(context, APIError("internal server error", status=500))
        return SSE_DONE

    def _send_error_event(self, context: Context, error: APIError) -> None:
        self.metrics.count_rejected(error.error_type)
        send_intermediate_predict_response([_wire(sse_event(error.to_dict()))], context.request_ids, "Result", 200,
                                           context)

    def _send_whole(self, context: Context, payload: dict[str, Any]) -> list[str]:
        """A whole JSON response, sent as the one chunk of a stream: the frontend drops the request after it."""
        context.set_response_content_type(0, "application/json")
        body = _wire(json.dumps(payload, ensure_ascii=False))
        send_intermediate_predict_response([body], context.request_ids, "Result", 200, context)
        return [""]

    def _send_error(self, context: Context, error: APIError) -> list[str]:
        """An error status needs a whole (not chunked) reply; the empty last message that follows it ends the
        request in the frontend, which discards its bytes because the error reply closed the connection."""
        self.metrics.count_rejected(error.error_type)
        context.set_response_status(error.status, HTTPStatus(error.status).phrase)
        context.set_response_content_type(0, "application/json")
        body = _wire(json.dumps(error.to_dict(), ensure_ascii=False))
        context.cl_socket.sendall(create_predict_response([body], context.request_ids, "Result", 200, context))
        context.set_response_header(0, "ts_stream_next", "false")
        return [""]


def _is_management_describe(data: list[dict[str, Any]], context: Context) -> bool:
    """The management API's `?customized=true` describe sends the header and no input at all; an inference
    request always has a body, so a client cannot get the engine's internals by sending the header itself."""
    return context.get_request_header(0, "describe") == "True" and not data[0]


def _wire(text: str) -> bytes:
    """UTF-8 bytes of a reply; anything that cannot be encoded (a lone surrogate) becomes '?', never a lost reply."""
    return text.encode("utf-8", "replace")


def assigned_device(device: str, ctx: Context) -> str:
    """`cuda` means the GPU TorchServe gave this worker: its `gpu_id`, or under `parallelType: custom` the first of
    the devices it made visible (the other ranks take the next ones)."""
    gpu_id = ctx.system_properties.get("gpu_id")
    if device != "cuda" or gpu_id is None or gpu_id < 0 or ctx.model_yaml_config.get("parallelType") == "custom":
        return device
    return f"cuda:{gpu_id}"


def budget_after_plugins(config: EngineConfig, reserved_gb: float) -> EngineConfig:
    """The main engine's settings once plugins' own engines took `reserved_gb` of the CPU KV-cache budget. On a
    GPU nothing changes: plugins allocate first, and the main engine sizes its cache from what is left."""
    if reserved_gb == 0 or config.device != "cpu" or config.num_kv_blocks is not None:
        return config
    left = config.kv_cache_memory_gb - reserved_gb
    if left <= 0:
        raise ValueError(f"plugins hold {reserved_gb:.2f} GiB of KV cache, all of kv_cache_memory_gb "
                         f"({config.kv_cache_memory_gb}); raise it or lower the plugins' own")
    logger.info("plugins hold %.2f GiB of the worker's %.2f GiB KV-cache budget; the main engine gets %.2f GiB",
                reserved_gb, config.kv_cache_memory_gb, left)
    return dataclasses.replace(config, kv_cache_memory_gb=left)


def _exit_for_restart(error: EngineDeadError) -> None:
    """A dead engine cannot recover in place: end this worker process so that TorchServe starts a fresh one."""
    logger.error("the engine died (%s); this worker exits in %.0f s so that TorchServe restarts it", error, EXIT_DELAY_S)
    threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()
