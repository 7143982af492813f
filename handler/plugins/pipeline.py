"""The model-config's `handler.plugins` list, resolved to plugin objects, and the pipeline that runs them.

Each entry is `{plugin: NAME, options: {...}}`: NAME is a built-in's short name or a user's `package.module:Class`.
Unknown names, classes that are not plugins, unknown entry keys and unknown option keys fail at startup, naming
them. A plugin that raises anything but an APIError fails only the request it was handling, with a 500.
"""
from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from engine.config import settings_from_dict
from engine.outputs import CompletionOutput
from handler.plugins.base import OutputFilter, Plugin, PluginContext, PluginReply, PluginRequest
from handler.protocol import KINDS, REQUEST_FIELDS, APIError

logger = logging.getLogger(__name__)
BUILTIN_PLUGINS = {"rag": "handler.plugins.rag:RAGPlugin", "guard": "handler.plugins.guard:GuardPlugin"}
ENTRY_KEYS = ("plugin", "options")


def load_plugins(entries: Any) -> list[Plugin]:
    """The plugins of a `handler.plugins` list, each built with its checked options."""
    if not isinstance(entries, list):
        raise ValueError(f"handler.plugins must be a list of {{plugin: NAME, options: {{...}}}}, got {entries!r}")
    plugins = [_load_plugin(f"handler.plugins[{i}]", entry) for i, entry in enumerate(entries)]
    _check_request_fields(plugins)
    return plugins


def _load_plugin(where: str, entry: Any) -> Plugin:
    if not isinstance(entry, dict) or sorted(set(entry) - set(ENTRY_KEYS)) or "plugin" not in entry:
        raise ValueError(f"{where} must be a mapping with `plugin` and optional `options` keys, got {entry!r}")
    cls = plugin_class(where, entry["plugin"])
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}.options must be a mapping, got {options!r}")
    return cls(settings_from_dict(cls.Options, options, f"{where}.options ({entry['plugin']})"))


def plugin_class(where: str, name: Any) -> type[Plugin]:
    """A built-in by short name, or `package.module:Class`."""
    if not isinstance(name, str) or (name not in BUILTIN_PLUGINS and ":" not in name):
        raise ValueError(
            f"{where}.plugin: unknown plugin {name!r}; use one of {sorted(BUILTIN_PLUGINS)} or 'package.module:Class'"
        )
    module_name, _, class_name = BUILTIN_PLUGINS.get(name, name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}.plugin: cannot import {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ValueError(f"{where}.plugin: {name!r} is not a subclass of handler.plugins.Plugin")
    return cls


def _check_request_fields(plugins: list[Plugin]) -> None:
    """A plugin's request field may clash neither with OpenAI's fields nor with another plugin's."""
    owners: dict[str, str] = {}
    for plugin in plugins:
        for name, kind in plugin.request_fields.items():
            if kind not in KINDS:
                raise ValueError(f"plugin {_name(plugin)}: request field {name!r} has unknown kind {kind!r}")
            if name in REQUEST_FIELDS or name in owners:
                raise ValueError(f"plugin {_name(plugin)}: request field {name!r} is already taken")
            owners[name] = _name(plugin)


def _name(plugin: Plugin) -> str:
    return plugin.name or type(plugin).__name__


@contextmanager
def _failures_of(plugin: Plugin) -> Iterator[None]:
    """An APIError passes as it is; anything else becomes this request's 500, naming the plugin."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        logger.exception("plugin %s failed", _name(plugin))
        raise APIError(f"the {_name(plugin)} plugin failed on this request ({type(exc).__name__})", status=500) from None


class PluginPipeline:
    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins

    @property
    def request_fields(self) -> dict[str, str]:
        return {name: kind for plugin in self.plugins for name, kind in plugin.request_fields.items()}

    def initialize(self, context: PluginContext) -> None:
        for plugin in self.plugins:
            plugin.initialize(context)

    def reserved_kv_cache_gb(self) -> float:
        return sum(plugin.reserved_kv_cache_gb() for plugin in self.plugins)

    async def before(self, request: PluginRequest) -> Optional[PluginReply]:
        for plugin in self.plugins:
            with _failures_of(plugin):
                reply = await plugin.before(request)
            if reply is not None:
                return reply
        return None

    def output_filters(self, request: PluginRequest, prompt_index: int) -> list[tuple[Plugin, OutputFilter]]:
        """The filters of one choice of prompt `prompt_index`, innermost (last plugin) first."""
        filters = []
        for plugin in reversed(self.plugins):
            with _failures_of(plugin):
                output_filter = plugin.output_filter(request, prompt_index)
            if output_filter is not None:
                filters.append((plugin, output_filter))
        return filters


async def run_filters(filters: list[tuple[Plugin, OutputFilter]], delta: CompletionOutput) -> list[CompletionOutput]:
    """A choice's delta through its filters in turn; each filter sees what the one before it passed on."""
    deltas = [delta]
    for plugin, output_filter in filters:
        passed = []
        for item in deltas:
            with _failures_of(plugin):
                passed.extend(await output_filter(item))
        deltas = passed
    return deltas
