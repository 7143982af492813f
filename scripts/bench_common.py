"""What every benchmark script records next to its figures: the machine, the date and the commit."""
from __future__ import annotations

import datetime
import platform
import subprocess
from typing import Any, Optional


def command_output(command: list[str]) -> Optional[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    for line in (command_output(["lscpu"]) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    commit = command_output(["git", "rev-parse", "--short", "HEAD"])
    return commit.strip() if commit else "unknown"


def local_time() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def print_context(context: dict[str, Any]) -> None:
    for key, value in context.items():
        print(f"{key:>22}: {value}")
