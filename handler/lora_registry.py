"""The LoRA adapters loaded at runtime, shared by every worker of a model version through a file in its folder.

A load request reaches one TorchServe worker; it records the adapter in `lora_adapters.json` in the model folder
(the folder TorchServe gives each worker of the version as `model_dir`). Writers hold an exclusive `flock` on
`lora_adapters.json.lock` while they read, change and replace the file, and replace it atomically (a temporary
file, then `os.replace`), so readers take no lock and never see half a file.

Every worker reads the file again only when it was replaced: one `stat` per request compares the file's inode with
the one it read last, which it keeps open, so no later version can be given that inode number again (a size or
modification time can repeat within the clock's granularity). The file stays in the folder: adapters loaded at
runtime outlive the workers.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO

REGISTRY_FILE = "lora_adapters.json"
LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class RegisteredAdapter:
    """One runtime adapter: its PEFT folder, and when it was loaded (which also tells two loads of a name apart)."""

    path: str
    created: float


class AdapterRegistry:
    """The registry file of one model folder, as one worker sees it."""

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir) / REGISTRY_FILE
        self.lock_path = self.path.with_name(REGISTRY_FILE + LOCK_SUFFIX)
        self._read_file: Optional[TextIO] = None  # the version read last, kept open so its inode stays taken
        self._read_id: Optional[tuple[int, int]] = None  # its device and inode
        self._adapters: dict[str, RegisteredAdapter] = {}

    def adapters(self) -> dict[str, RegisteredAdapter]:
        """The registered adapters by name; the file is read again only when it was replaced since the last call."""
        if _file_id(self.path) != self._read_id:
            self._read_again()
        return dict(self._adapters)

    def add(self, name: str, path: str) -> Optional[RegisteredAdapter]:
        """Register `name`; None (and nothing written) when it is registered already, by this worker or another."""
        with self._locked():
            adapters = self._current()
            if name in adapters:
                return None
            adapters[name] = RegisteredAdapter(path, time.time())
            self._write(adapters)
        return adapters[name]

    def remove(self, name: str) -> bool:
        """Forget `name`; False when it was not registered."""
        with self._locked():
            adapters = self._current()
            if adapters.pop(name, None) is None:
                return False
            self._write(adapters)
        return True

    def _read_again(self) -> None:
        if self._read_file is not None:
            self._read_file.close()
        try:
            self._read_file = open(self.path)
        except FileNotFoundError:
            self._read_file, self._read_id, self._adapters = None, None, {}
            return
        stat = os.fstat(self._read_file.fileno())
        self._read_id = (stat.st_dev, stat.st_ino)
        self._adapters = _parse(self._read_file.read())

    def _current(self) -> dict[str, RegisteredAdapter]:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _write(self, adapters: dict[str, RegisteredAdapter]) -> None:
        body = json.dumps({"adapters": {name: asdict(entry) for name, entry in adapters.items()}}, indent=2)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{REGISTRY_FILE}.")
        try:
            with os.fdopen(descriptor, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _parse(text: str) -> dict[str, RegisteredAdapter]:
    entries = json.loads(text)["adapters"]
    return {name: RegisteredAdapter(entry["path"], entry["created"]) for name, entry in entries.items()}


def _file_id(path: Path) -> Optional[tuple[int, int]]:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino

