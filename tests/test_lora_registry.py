"""The runtime LoRA registry file (handler/lora_registry.py) as several workers share it: one registry object per
worker on the same model folder, workers as processes writing at once, and readers that never see half a file."""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import handler.lora_registry
from handler.lora_registry import REGISTRY_FILE, AdapterRegistry

WRITERS = 4
NAMES_PER_WRITER = 25


def test_a_worker_sees_what_another_registered_and_unregistered(tmp_path: Path) -> None:
    loading, other = AdapterRegistry(tmp_path), AdapterRegistry(tmp_path)
    assert other.adapters() == {}
    entry = loading.add("sql", "/adapters/sql")
    assert entry is not None and entry.path == "/adapters/sql"
    assert other.adapters() == {"sql": entry}
    assert other.add("sql", "/elsewhere") is None, "a name is registered once, whoever asks"
    assert other.remove("sql") and not other.remove("sql")
    assert loading.adapters() == {}


def test_a_name_loaded_again_is_a_new_entry(tmp_path: Path) -> None:
    """A worker that loaded the first one tells them apart, and reads the adapter again."""
    registry = AdapterRegistry(tmp_path)
    first = registry.add("sql", "/adapters/sql")
    registry.remove("sql")
    assert registry.add("sql", "/adapters/sql") != first


def test_the_file_is_read_again_only_when_it_was_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    parse = handler.lora_registry._parse
    monkeypatch.setattr(handler.lora_registry, "_parse", lambda text: reads.append(text) or parse(text))
    reader, writer = AdapterRegistry(tmp_path), AdapterRegistry(tmp_path)
    writer.add("a", "/a")
    writes = len(reads)
    for _ in range(3):
        assert list(reader.adapters()) == ["a"]
    assert len(reads) == writes + 1
    writer.add("b", "/b")
    assert list(reader.adapters()) == ["a", "b"] and len(reads) == writes + 3  # the writer's read, then the reader's


def test_the_file_is_json_in_the_model_folder_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add("a", "/a")
    registry.add("b", "/b")
    registry.remove("a")
    assert json.loads((tmp_path / REGISTRY_FILE).read_text())["adapters"]["b"]["path"] == "/b"
    assert sorted(path.name for path in tmp_path.iterdir()) == [REGISTRY_FILE, REGISTRY_FILE + ".lock"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add("a", "/a")

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        registry.add("b", "/b")
    assert list(AdapterRegistry(tmp_path).adapters()) == ["a"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [REGISTRY_FILE, REGISTRY_FILE + ".lock"]


def _register_names(folder: Path, writer: int) -> int:
    registry = AdapterRegistry(folder)
    return sum(registry.add(f"w{writer}-{i}", f"/adapters/{writer}/{i}") is not None for i in range(NAMES_PER_WRITER))


def _register_one_name(folder: Path, writer: int) -> bool:
    return AdapterRegistry(folder).add("contested", f"/adapters/{writer}") is not None


def _read_until(folder: Path, count: int) -> int:
    """Read the registry until it holds `count` adapters; how many distinct versions were seen."""
    registry, seen = AdapterRegistry(folder), set()
    while len(adapters := registry.adapters()) < count:
        seen.add(len(adapters))
    return len(seen)


def test_workers_writing_at_once_lose_no_entry_and_readers_never_see_half_a_file(tmp_path: Path) -> None:
    with ProcessPoolExecutor(WRITERS + 1, mp_context=multiprocessing.get_context("fork")) as pool:
        reader = pool.submit(_read_until, tmp_path, WRITERS * NAMES_PER_WRITER)
        written = list(pool.map(_register_names, [tmp_path] * WRITERS, range(WRITERS)))
        assert written == [NAMES_PER_WRITER] * WRITERS
        assert reader.result(timeout=60) >= 1
        assert len(AdapterRegistry(tmp_path).adapters()) == WRITERS * NAMES_PER_WRITER
        contested = list(pool.map(_register_one_name, [tmp_path] * WRITERS, range(WRITERS)))
    assert sum(contested) == 1, "exactly one of the workers loading one name at once registers it"
