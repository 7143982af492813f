"""`rag`: retrieval-augmented generation inside the worker.

At startup the documents folder is chunked (by the main model's tokens), embedded and indexed, or loaded from
the on-disk cache when the documents and settings are unchanged. Per request, the last user message (or each
text prompt) is the query; the top passages go into it through `context_template`, and the response carries them
as `sources` (a stream: on its first chunk). A request sends `"rag": false` to opt out, or `{"top_k": N}`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from handler.plugins.base import Plugin, PluginContext, PluginRequest
from handler.protocol import APIError
from handler.retrieval.index import EMBEDDING_MODES, RETRIEVAL_MODES, DocumentIndex, Passage

logger = logging.getLogger(__name__)
DEFAULT_CONTEXT_TEMPLATE = (
    "Answer the question using the context below when it is relevant.\n\n"
    "Context:\n{context}\n\nQuestion: {question}"
)
DEFAULT_PASSAGE_TEMPLATE = "[{id}] {text}"
REQUEST_KEYS = ("top_k",)


def default_cache_dir() -> Path:
    """Entries are keyed by the documents' content, so every model and version may share one cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedserve" / "rag-index"


@dataclass
class RAGOptions:
    documents: str = field(default="", metadata={"path": True})  # the folder of .txt, .md and .jsonl files
    mode: str = "hybrid"  # dense (embeddings + faiss), bm25 (bm25s), hybrid (both, reciprocal-rank fusion)
    top_k: int = 3
    max_top_k: int = 20  # the most a request may ask for
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    cache_dir: Optional[str] = field(default=None, metadata={"path": True})  # None: default_cache_dir()
    context_template: str = DEFAULT_CONTEXT_TEMPLATE  # {context}: the passages; {question}: the user's text
    passage_template: str = DEFAULT_PASSAGE_TEMPLATE  # {id}, {document_id}, {text}, {score}

    def __post_init__(self) -> None:
        if not isinstance(self.documents, str) or not self.documents:
            raise ValueError("rag: `documents` (the folder of documents) is required")
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"rag: mode must be one of {RETRIEVAL_MODES}, got {self.mode!r}")
        for name in ("top_k", "max_top_k", "chunk_tokens"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("chunk_overlap", self.chunk_overlap, minimum=0)
        if self.top_k > self.max_top_k:
            raise ValueError(f"rag: top_k ({self.top_k}) exceeds max_top_k ({self.max_top_k})")
        _check_template("context_template", self.context_template, context="", question="")
        _check_template("passage_template", self.passage_template, id="", document_id="", text="", score=0.0)


class RAGPlugin(Plugin):
    name = "rag"
    Options = RAGOptions
    request_fields = {"rag": "any"}

    def initialize(self, context: PluginContext) -> None:
        options = self.options
        tokenizer = context.tokenizer()
        embedder = context.embedding_model() if options.mode in EMBEDDING_MODES else None
        cache_dir = context.path("rag.cache_dir", options.cache_dir) if options.cache_dir else default_cache_dir()
        self.index = DocumentIndex.build(
            context.path("rag.documents", options.documents), cache_dir, options.mode, embedder,
            lambda text: list(tokenizer.encode(text, add_special_tokens=False)), tokenizer.decode,
            options.chunk_tokens, options.chunk_overlap, tokenizer_id(context, tokenizer),
        )
        self.emit_metric = context.emit_metric
        logger.info("rag: %d documents in %d chunks, %s index %s %s (%d chunks embedded)", self.index.num_documents,
                    self.index.num_chunks, options.mode, self.index.key[:12],
                    "loaded from the cache" if self.index.from_cache else "built", self.index.embedded_chunks)

    async def before(self, request: PluginRequest) -> None:
        top_k = self._top_k(request.extension("rag"))
        if top_k == 0:
            return None
        if request.is_chat:
            await self._augment_chat(request, top_k)
        else:
            await self._augment_prompts(request, top_k)
        return None

    def _top_k(self, value: Any) -> int:
        """The request's `rag` field: absent or true (the configured top_k), false (0: no retrieval), or {top_k}."""
        if value is None or value is True:
            return self.options.top_k
        if value is False:
            return 0
        if not isinstance(value, dict) or set(value) - set(REQUEST_KEYS):
            raise APIError(f"rag must be true, false or an object with {REQUEST_KEYS}, got {value!r}", param="rag")
        top_k = value.get("top_k", self.options.top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= self.options.max_top_k:
            raise APIError(f"rag.top_k must be an integer in [0, {self.options.max_top_k}], got {top_k!r}",
                           param="rag")
        return top_k

    async def _augment_chat(self, request: PluginRequest, top_k: int) -> None:
        users = [m for m in request.body.messages if m["role"] == "user"]
        if not users:
            return
        passages = await self._retrieve(users[-1]["content"], top_k)
        users[-1]["content"] = self._with_context(users[-1]["content"], passages)
        request.response_fields["sources"] = [source(p) for p in passages]

    async def _augment_prompts(self, request: PluginRequest, top_k: int) -> None:
        sources = []
        for i, prompt in enumerate(request.body.prompts):
            if isinstance(prompt, str):
                passages = await self._retrieve(prompt, top_k)
                request.body.prompts[i] = self._with_context(prompt, passages)
                sources += [{**source(p), "prompt_index": i} for p in passages]
        request.response_fields["sources"] = sources

    async def _retrieve(self, query: str, top_k: int) -> list[Passage]:
        started = time.perf_counter()
        passages = await asyncio.to_thread(self.index.search, query, top_k)
        self.emit_metric("rag_retrieval_seconds", time.perf_counter() - started)
        return passages

    def _with_context(self, question: str, passages: list[Passage]) -> str:
        context = "\n\n".join(
            self.options.passage_template.format(id=p.id, document_id=p.document_id, text=p.text, score=p.score)
            for p in passages
        )
        return self.options.context_template.format(context=context, question=question)


def source(passage: Passage) -> dict[str, Any]:
    return {"id": passage.id, "document_id": passage.document_id, "score": passage.score, "text": passage.text,
            "metadata": passage.metadata}


def tokenizer_id(context: PluginContext, tokenizer: Any) -> str:
    """Chunks depend on the tokenizer: the model it came from and its vocabulary size identify it."""
    return f"{context.engine_config.model or 'default'}:{len(tokenizer)}"


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"rag: {name} must be an integer >= {minimum}, got {value!r}")


def _check_template(name: str, template: Any, **fields: Any) -> None:
    try:
        template.format(**fields)
    except (AttributeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"rag: {name} must be a format string using only {sorted(fields)}: {exc!r}") from None
    if name == "context_template" and ("{context}" not in template or "{question}" not in template):
        raise ValueError(f"rag: context_template must contain {{context}} and {{question}}, got {template!r}")
