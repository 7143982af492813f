"""An on-disk cache of built indexes: one folder per content key, which appears whole or not at all.

An entry is written into a hidden temporary folder and renamed to its key once complete, so a crash leaves at
most a hidden leftover, never a folder named by a key that lacks files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMPORARY_PREFIX = ".partial-"


def content_key(files: list[tuple[str, bytes]], settings: dict[str, Any]) -> str:
    """A sha256 of the settings and of every (relative path, bytes) pair, each length-prefixed."""
    digest = hashlib.sha256()
    _add_field(digest, json.dumps(settings, sort_keys=True).encode())
    for relative_path, data in files:
        _add_field(digest, relative_path.encode())
        _add_field(digest, data)
    return digest.hexdigest()


def _add_field(digest: Any, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def entry_folder(cache_dir: Path, key: str) -> Path:
    return cache_dir / key


@contextmanager
def new_entry(cache_dir: Path, key: str) -> Iterator[Path]:
    """A temporary folder to fill, renamed to the key's entry when the block ends without an exception."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, dir=cache_dir))
    try:
        yield temporary
        _publish(temporary, entry_folder(cache_dir, key))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _publish(temporary: Path, entry: Path) -> None:
    try:
        temporary.rename(entry)
    except OSError:
        if not entry.is_dir():  # otherwise another process published the same entry first
            raise
