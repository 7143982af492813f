"""Grammars compiled with xgrammar, kept in an LRU keyed by the constraint; one matcher per sequence."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Callable

import xgrammar

from engine.structured_output.params import StructuredOutputsParams

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept; each holds the adaptive token masks of its states


class Grammar:
    """A compiled constraint: every sequence that uses it gets its own matcher."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.compiled = compiled

    def matcher(self) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(self.compiled)


class GrammarCompiler:
    """Compiles each distinct constraint once; thread-safe. `eos_token_ids` end a completed grammar's output."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.cache: OrderedDict[tuple[str, Any], Grammar] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The grammar of `params`, compiled on first use; ValueError `structured_outputs.<kind>: ...` if it does not
        compile. The lock guards the cache only, so one thread's long compile holds up no other thread."""
        key = (params.kind, params.spec)
        with self.lock:
            grammar = self.cache.get(key)
            if grammar is not None:
                self.cache.move_to_end(key)
                return grammar
        grammar = Grammar(self._compile(params))
        with self.lock:
            self.cache[key] = grammar
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return grammar

    def _compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        compile_kind: Callable[[], xgrammar.CompiledGrammar] = {
            "json": lambda: self.compiler.compile_json_schema(params.json),
            "json_object": lambda: self.compiler.compile_json_schema('{"type": "object"}'),
            "regex": lambda: self.compiler.compile_regex(params.regex),
            "choice": lambda: self.compiler.compile_grammar(choice_grammar(params.choice)),
            "grammar": lambda: self.compiler.compile_grammar(params.grammar),
        }[params.kind]
        try:
            return compile_kind()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs.{params.kind}: {_what_failed(params.kind)}: {_reason(exc)}") from None


def choice_grammar(choice: tuple[str, ...]) -> str:
    """An EBNF grammar whose only sentences are the choices, each written as an escaped string literal."""
    return "root ::= " + " | ".join(json.dumps(option, ensure_ascii=False) for option in choice)


def _what_failed(kind: str) -> str:
    return {"json": "invalid JSON schema", "regex": "invalid regex", "grammar": "invalid EBNF grammar"}.get(
        kind, "cannot compile")


def _reason(exc: Exception) -> str:
    """xgrammar's message without the C++ source location it starts with."""
    message = str(exc).strip()
    return message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
