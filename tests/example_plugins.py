"""Users' plugins for the tests, loaded by import path (`example_plugins:Class`): the tests copy this file into the
model folder, which TorchServe puts on the worker's PYTHONPATH, as a user would ship a plugin beside the model."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

from engine import CompletionOutput
from handler.plugins import Plugin, PluginReply, PluginRequest


@dataclass
class ReplaceWordsOptions:
    replacements: dict[str, str] = field(default_factory=dict)
    max_tokens: Optional[int] = None  # a cap on every request's max_tokens


class ReplaceWords(Plugin):
    """Rewrites the last user message (word for word) and caps max_tokens."""

    name = "replace_words"
    Options = ReplaceWordsOptions

    async def before(self, request: PluginRequest) -> None:
        if request.is_chat:
            message = request.body.messages[-1]
            for old, new in self.options.replacements.items():
                message["content"] = message["content"].replace(old, new)
        cap = self.options.max_tokens
        if cap is not None and (request.body.params.max_tokens or cap + 1) > cap:
            request.body.params = dataclasses.replace(request.body.params, max_tokens=cap)
        return None


@dataclass
class CannedAnswerOptions:
    command: str = "/help"
    answer: str = "Ask me anything."


class CannedAnswer(Plugin):
    """Answers a chat whose last message starts with `command` itself."""

    name = "canned_answer"
    Options = CannedAnswerOptions

    async def before(self, request: PluginRequest) -> Optional[PluginReply]:
        if request.is_chat and request.body.messages[-1]["content"].startswith(self.options.command):
            return PluginReply(self.options.answer)
        return None


@dataclass
class FailOnOptions:
    trigger: str = "EXPLODE"


class FailOn(Plugin):
    """A broken plugin: raises on requests whose last message holds `trigger`, and in the output filter of a request
    that sends `"fail_output": true`."""

    name = "fail_on"
    Options = FailOnOptions
    request_fields = {"fail_output": "bool"}

    async def before(self, request: PluginRequest) -> None:
        if request.is_chat and self.options.trigger in request.body.messages[-1]["content"]:
            raise RuntimeError("this plugin is broken on purpose")
        return None

    def output_filter(self, request: PluginRequest, prompt_index: int) -> Optional["_Broken"]:
        return _Broken() if request.extension("fail_output") else None


class _Broken:
    async def __call__(self, delta: CompletionOutput) -> list[CompletionOutput]:
        raise RuntimeError("this output filter is broken on purpose")


class RedactDigits(Plugin):
    """An output filter a request turns on with `"redact": true`: every digit becomes '#'."""

    name = "redact_digits"
    request_fields = {"redact": "bool"}

    def output_filter(self, request: PluginRequest, prompt_index: int) -> Optional["_Redactor"]:
        return _Redactor() if request.extension("redact") else None


class _Redactor:
    async def __call__(self, delta: CompletionOutput) -> list[CompletionOutput]:
        return [dataclasses.replace(delta, text=re.sub(r"\d", "#", delta.text))]
