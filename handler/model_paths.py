"""Paths in a model-config: relative ones live in the model's folder (the archive or its no-archive folder)."""
from __future__ import annotations

import os
from typing import Optional


def path_in_model_dir(key: str, path: Optional[str], model_dir: Optional[str]) -> Optional[str]:
    """A relative path is inside the model folder, and may not leave it (`..`); an absolute one is kept."""
    if path is None or model_dir is None or os.path.isabs(os.path.expanduser(path)):
        return path
    inside = os.path.normpath(os.path.join(model_dir, path))
    if os.path.relpath(inside, model_dir).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{key} {path!r} leaves the model folder; give an absolute path for files elsewhere")
    return inside
