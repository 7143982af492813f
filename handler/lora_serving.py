"""LoRA adapters served beside the base model: a request's `model` names one, and vLLM's runtime routes load and
unload them for every worker of the model version.

Startup adapters come from `handler.lora_modules` and are loaded by each worker as it starts; they cannot be
unloaded at runtime. Runtime adapters are recorded in the model folder's registry (handler.lora_registry): the
worker that answers a load request validates the adapter in its engine, then registers it; the others load it into
their engines on its first request. On every request a worker compares the registry with what it loaded, so an
unloaded adapter leaves each worker's engine at that worker's next request, and its name is a 404 at once.
Requests already running with an unloaded adapter finish with it (the engine keeps it until they end).
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Optional

from engine import AsyncLLMEngine
from engine.lora import LoRARequest
from handler.lora_registry import AdapterRegistry, RegisteredAdapter
from handler.model_paths import path_in_model_dir
from handler.protocol import APIError, parse_load_lora_request, parse_unload_lora_request

logger = logging.getLogger(__name__)


class LoRAAdapters:
    """One worker's view of the model's adapters: the YAML's, and the registry's as loaded into its engine."""

    def __init__(self, engine: AsyncLLMEngine, enabled: bool, base_name: str, startup: dict[str, str],
                 model_dir: Path, created: int) -> None:
        self.engine = engine
        self.base_name = base_name
        self.startup = startup
        self.model_dir = model_dir
        self.created = created
        self.registry = AdapterRegistry(model_dir) if enabled else None  # None: LoRA is off for this model
        self._loaded: dict[str, RegisteredAdapter] = {}  # runtime adapters this worker's engine holds
        self._load_lock = asyncio.Lock()  # one load at a time in this worker: no adapter is read twice

    @classmethod
    def disabled(cls, engine: AsyncLLMEngine, base_name: str, created: int) -> "LoRAAdapters":
        """The base model alone: LoRA off, so any other `model` is a 404 and the runtime routes a 400."""
        return cls(engine, False, base_name, {}, Path("."), created)

    def load_startup_adapters(self) -> None:
        """Load `handler.lora_modules` into the engine; an invalid adapter stops the worker, naming its key."""
        for name, path in self.startup.items():
            if name == self.base_name:
                raise ValueError(f"handler.lora_modules.{name}: an adapter cannot take the served model's name")
            try:
                self.engine.add_lora(LoRARequest(name, path))
            except ValueError as exc:
                raise ValueError(f"handler.lora_modules.{name}: {exc}") from None
            logger.info("LoRA adapter %r loaded from handler.lora_modules", name)

    async def resolve(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The adapter a request's `model` names, loaded into this worker's engine; None for the base model."""
        registered = self._sync()
        if model is None or model == self.base_name:
            return None
        if model in self.startup:
            return LoRARequest(model, self.startup[model])
        if model not in registered:
            raise self._model_not_found(model)
        await self._load_registered(model, registered[model])
        return LoRARequest(model, registered[model].path)

    def model_cards(self) -> list[dict[str, Any]]:
        """`v1/models` entries of every adapter this model serves now."""
        adapters = {name: (path, self.created) for name, path in self.startup.items()}
        adapters.update({name: (entry.path, int(entry.created)) for name, entry in self._sync().items()})
        return [_card(name, path, created, self.base_name) for name, (path, created) in adapters.items()]

    async def load(self, body: Any) -> dict[str, str]:
        """`POST v1/load_lora_adapter`: validate the adapter in this worker's engine, then register it for all."""
        self._check_enabled()
        name, given_path = parse_load_lora_request(body)
        path = self._adapter_path(given_path)
        async with self._load_lock:
            self._check_new_name(name)
            await self._add_to_engine(LoRARequest(name, path), "lora_path")
            entry = await self._register(name, path)
            self._loaded[name] = entry
        logger.info("LoRA adapter %r loaded at runtime and registered for every worker", name)
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' added successfully."}

    async def unload(self, body: Any) -> dict[str, str]:
        """`POST v1/unload_lora_adapter`: unregister a runtime adapter; this worker's engine drops it at once."""
        self._check_enabled()
        name = parse_unload_lora_request(body)
        if name in self.startup:
            raise APIError(f"The LoRA adapter `{name}` is configured in handler.lora_modules; remove it from the "
                           "model-config YAML to unload it", param="lora_name")
        if not await asyncio.to_thread(self.registry.remove, name):
            raise APIError(f"The LoRA adapter `{name}` is not loaded", status=404, param="lora_name",
                           code="lora_adapter_not_found")
        self._sync()
        logger.info("LoRA adapter %r unloaded from the registry", name)
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' removed successfully."}

    def _sync(self) -> dict[str, RegisteredAdapter]:
        """The registry as it is now; runtime adapters it no longer lists (or lists anew) leave this engine."""
        if self.registry is None:
            return {}
        registered = self.registry.adapters()
        for name, entry in list(self._loaded.items()):
            if registered.get(name) != entry:
                del self._loaded[name]
                self.engine.remove_lora(name)
                logger.info("LoRA adapter %r removed from this worker's engine: it was unloaded", name)
        return registered

    async def _load_registered(self, name: str, entry: RegisteredAdapter) -> None:
        """Load an adapter another worker registered into this worker's engine, on its first request here."""
        async with self._load_lock:
            if self._loaded.get(name) == entry:
                return
            await self._add_to_engine(LoRARequest(name, entry.path), "model")
            self._loaded[name] = entry
        logger.info("LoRA adapter %r loaded from the registry on its first request in this worker", name)

    async def _add_to_engine(self, lora: LoRARequest, param: str) -> None:
        """The engine reads and checks the adapter (off the event loop); its ValueError becomes a 400, where a
        folder inside the model folder is named relative to it, as a client names it."""
        try:
            await asyncio.to_thread(self.engine.add_lora, lora)
        except ValueError as exc:
            raise APIError(str(exc).replace(f"{self.model_dir}{os.sep}", ""), param=param) from None

    async def _register(self, name: str, path: str) -> RegisteredAdapter:
        """Record the adapter for every worker; a name another worker registered meanwhile is refused."""
        try:
            entry = await asyncio.to_thread(self.registry.add, name, path)
        except OSError as exc:
            self.engine.remove_lora(name)
            raise APIError(f"cannot record the adapter in the model folder: {exc.strerror}", status=500) from None
        if entry is None:
            self.engine.remove_lora(name)
            raise _already_loaded(name)
        return entry

    def _check_enabled(self) -> None:
        if self.registry is None:
            raise APIError("LoRA adapters are not enabled for this model; set handler.engine.enable_lora: true "
                           "in its model-config YAML", code="lora_not_enabled")

    def _check_new_name(self, name: str) -> None:
        if name == self.base_name:
            raise APIError(f"The LoRA adapter's name `{name}` is the served model's name; choose another",
                           param="lora_name")
        if name in self.startup or name in self._sync():
            raise _already_loaded(name)

    def _adapter_path(self, path: str) -> str:
        """An absolute folder, or one relative to the model folder (which it may not leave), spelled as the
        engine spells it (no trailing slash), so that its adapter cache knows the folder again."""
        try:
            return str(Path(path_in_model_dir("lora_path", path, str(self.model_dir))))
        except ValueError as exc:
            raise APIError(str(exc), param="lora_path") from None

    def _model_not_found(self, model: str) -> APIError:
        adapters = " and its LoRA adapters (v1/models lists them)" if self.registry is not None else ""
        return APIError(f"The model `{model}` does not exist; this endpoint serves `{self.base_name}`{adapters}",
                        status=404, param="model", code="model_not_found")


def _already_loaded(name: str) -> APIError:
    return APIError(f"The LoRA adapter `{name}` is already loaded; unload it first to load it again",
                    param="lora_name", code="lora_adapter_exists")


def _card(name: str, path: str, created: int, parent: str) -> dict[str, Any]:
    """An adapter's `v1/models` entry: `root` is its folder's name, never its path."""
    return {"id": name, "object": "model", "created": created, "owned_by": "pagedserve", "root": Path(path).name,
            "parent": parent}
