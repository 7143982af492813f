"""LLMHandler driven in process as TorchServe's async worker drives it: a real Context, every message the
handler sends recorded as the worker's socket would carry it, and the frontend's reading of those messages."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import create_predict_response

from engine import AsyncLLMEngine
from handler.embedding_serving import EmbeddingServing
from handler.llm_handler import LLMHandler
from handler.metrics import TorchServeMetrics, default_metrics_config, write_metrics_config
from handler.openai_serving import OpenAIServing
from handler.protocol import RequestLimits


@dataclass
class Frame:
    """One request's part of a message from the worker to the frontend."""

    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """What the frontend makes of a request's messages: the client's status, content type and body."""

    frames: list[Frame] = field(default_factory=list)

    @property
    def status(self) -> int:
        return self.frames[0].status

    @property
    def body(self) -> bytes:
        return b"".join(frame.body for frame in self.frames)

    @property
    def streamed(self) -> bool:
        return self.frames[0].headers.get("ts_stream_next") == "true"

    @property
    def ends_the_job(self) -> bool:
        """True when the last message tells the frontend to drop the request (else it stays in its memory)."""
        return self.frames[-1].headers.get("ts_stream_next") == "false"

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class _RecordingSocket:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.messages.append(bytes(data))


class WorkerHarness:
    def __init__(self, engine: AsyncLLMEngine, metrics_dir: Path, limits: RequestLimits = RequestLimits()) -> None:
        cache = MetricsCacheYamlImpl(str(write_metrics_config(default_metrics_config(), metrics_dir / "metrics.yaml")))
        self.handler = LLMHandler()
        self.handler.serving = OpenAIServing(engine, "tiny", "1.0", "/models/tiny", None, limits, 60.0)
        self.handler.metrics = TorchServeMetrics(cache, "tiny", "1.0")
        self.handler.embeddings = EmbeddingServing(None, "tiny")
        self.handler.initialized = True
        self._count = 0

    async def request(self, route: str, body: Any, headers: Optional[dict[str, str]] = None) -> Reply:
        """Send `body` (bytes as they are, anything else as JSON) to `route` as the frontend would."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        context = self.context({"url_path": route, **(headers or {})})
        context.cl_socket = sent = _RecordingSocket()
        returned = await self.handler.handle([{"body": raw}], context)
        sent.messages.append(create_predict_response(returned, context.request_ids, "Prediction success", 200, context))
        return Reply([frame for message in sent.messages for frame in parse_message(message)])

    def context(self, headers: dict[str, str]) -> Context:
        """A context for one request with these request headers, as the worker builds it."""
        self._count += 1
        context = Context("tiny", "/models/tiny", {}, 1, None, "0.12.0", model_yaml_config={})
        context.request_ids = {0: f"req-{self._count}"}
        context.request_processor = [RequestProcessor(headers)]
        return context


def parse_message(message: bytes) -> list[Frame]:
    """The frames of one worker message, read as the frontend's ModelResponseDecoder reads them."""
    reader = _Reader(message)
    reader.int()  # the message's code
    reader.chunk()  # its text
    frames = []
    while (length := reader.int()) != -1:
        reader.take(length)  # the request id
        content_type = reader.chunk().decode()
        status = reader.int()
        reader.chunk()  # the reason phrase
        headers = dict((reader.chunk().decode(), reader.chunk().decode()) for _ in range(reader.int()))
        frames.append(Frame(status, content_type, headers, reader.chunk()))
    return frames


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, length: int) -> bytes:
        chunk = self.data[self.offset:self.offset + length]
        self.offset += length
        return chunk

    def int(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def chunk(self) -> bytes:
        return self.take(self.int())
