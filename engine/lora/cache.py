"""Loaded LoRA adapters by name, least recently used first out (max_cpu_loras). Thread-safe: the serving thread
loads adapters while the step thread runs. A request holds its adapter itself, so evicting one in use only means
that the next request naming it reads it again."""
from __future__ import annotations

import threading
from collections import OrderedDict
from engine.lora.adapter import LoRAAdapter, load_adapter
from engine.lora.request import LoRARequest
from engine.models.config import ModelConfig


class AdapterCache:
    def __init__(self, model: ModelConfig, max_rank: int, capacity: int) -> None:
        self.model = model
        self.max_rank = max_rank
        self.capacity = capacity
        self._adapters: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lora: LoRARequest) -> LoRAAdapter:
        """The adapter `lora` names, read from its folder unless cached from that same folder."""
        with self._lock:
            cached = self._adapters.get(lora.name)
            if cached is not None and cached.path == lora.path:
                self._adapters.move_to_end(lora.name)
                return cached
        adapter = load_adapter(lora.name, lora.path, self.model, self.max_rank)
        with self._lock:
            self._adapters[lora.name] = adapter
            self._adapters.move_to_end(lora.name)
            while len(self._adapters) > self.capacity:
                self._adapters.popitem(last=False)
        return adapter

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._adapters.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)
