"""OpenAI's `/v1/embeddings` over the worker's embedding model, which the `rag` plugin shares.

The model (any sentence-transformers folder; by default the packaged all-MiniLM-L6-v2) is loaded on first use,
and encodes in a worker thread so that the event loop keeps streaming other requests meanwhile.
"""
from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any, Optional

import numpy as np

from handler.embeddings import EmbeddingModel
from handler.protocol import APIError

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
ENCODINGS = ("float", "base64")


class EmbeddingServing:
    def __init__(self, model_path: Optional[str], served_model_name: str) -> None:
        self.model_path = model_path
        self.served_model_name = served_model_name
        self._model: Optional[EmbeddingModel] = None
        self._lock = threading.Lock()

    def model(self) -> EmbeddingModel:
        """The embedding model, loaded by the first caller; safe from any thread."""
        with self._lock:
            if self._model is None:
                self._model = EmbeddingModel(self.model_path)
            return self._model

    async def create_embedding(self, body: Any) -> dict[str, Any]:
        inputs, encoding = self._parse(body)
        model = await asyncio.to_thread(self.model)
        check_dimensions(body, model.dimension)
        tokens = sum(await asyncio.to_thread(check_lengths, inputs, model))
        vectors = await asyncio.to_thread(_embed, model, inputs)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(vector, encoding)}
            for i, vector in enumerate(vectors)
        ]
        return {
            "object": "list", "data": data, "model": body.get("model") or self.served_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "created": int(time.time()),
        }

    def _parse(self, body: Any) -> tuple[list[Any], str]:
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        unknown = sorted(set(body) - set(EMBEDDING_FIELDS))
        if unknown:
            raise APIError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
        model = body.get("model")
        if model is not None and model != self.served_model_name:
            raise APIError(f"The model `{model}` does not exist; this endpoint serves `{self.served_model_name}`",
                           status=404, param="model", code="model_not_found")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise APIError(f"encoding_format must be one of {', '.join(ENCODINGS)}, got {encoding!r}",
                           param="encoding_format")
        return embedding_inputs(body.get("input")), encoding


def embedding_inputs(value: Any) -> list[Any]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) or _is_ids(v) for v in value):
        raise APIError("input must be a non-empty string, a list of strings, a list of token ids or a list of "
                       "token-id lists", param="input")
    if len(value) > MAX_INPUTS:
        raise APIError(f"input holds {len(value)} items; at most {MAX_INPUTS} per request", param="input")
    if any(len(item) == 0 for item in value):
        raise APIError("input must not contain an empty string or an empty token list", param="input")
    return value


def check_dimensions(body: dict[str, Any], dimension: int) -> None:
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != dimension:
        raise APIError(f"dimensions: this embedding model returns {dimension} dimensions and cannot shorten them, "
                       f"got {dimensions!r}", param="dimensions")


def check_lengths(inputs: list[Any], model: EmbeddingModel) -> list[int]:
    """The tokens each input takes, after checking that the model reads it whole: token ids inside its
    vocabulary, and at most `max_tokens` tokens."""
    for i, item in enumerate(inputs):
        if not isinstance(item, str) and not all(0 <= t < model.vocab_size for t in item):
            raise APIError(f"input[{i}] holds a token id outside the vocabulary [0, {model.vocab_size})",
                           param="input")
    counts = _token_counts(model, inputs)
    for i, count in enumerate(counts):
        if count > model.max_tokens:
            raise APIError(f"input[{i}] takes {count} tokens; this embedding model reads at most {model.max_tokens}",
                           param="input", code="context_length_exceeded")
    return counts


def _embed(model: EmbeddingModel, inputs: list[Any]) -> np.ndarray:
    if all(isinstance(item, str) for item in inputs):
        return model.embed_texts(inputs)
    rows = [model.embed_texts([item]) if isinstance(item, str) else model.embed_token_ids([item]) for item in inputs]
    return np.concatenate(rows)


def _token_counts(model: EmbeddingModel, inputs: list[Any]) -> list[int]:
    return [model.count_tokens([item])[0] if isinstance(item, str) else model.count_token_ids(item) for item in inputs]


def _encoded(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
