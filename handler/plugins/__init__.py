"""Plugins around generation, declared in the model-config: built-ins (`rag`, `guard`) and users' own classes."""
from handler.plugins.base import (
    NoOptions, OutputFilter, Plugin, PluginContext, PluginReply, PluginRequest, finished, join_deltas,
)
from handler.plugins.pipeline import PluginPipeline, load_plugins

__all__ = [
    "NoOptions", "OutputFilter", "Plugin", "PluginContext", "PluginPipeline", "PluginReply", "PluginRequest",
    "finished", "join_deltas", "load_plugins",
]
