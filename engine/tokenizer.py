"""Tokenizer and chat template through transformers, from a Hugging Face folder or a GGUF file."""
from __future__ import annotations

import logging
from typing import Any, Optional

from engine.loader import ModelSource

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource, tokenizer: Optional[str], required: bool) -> Optional[Any]:
    """The tokenizer named by `tokenizer`, else the model's own; None only when not `required`."""
    from transformers import AutoTokenizer

    try:
        if tokenizer:
            return AutoTokenizer.from_pretrained(tokenizer)
        if source.gguf_file:
            return AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file.name)
        return AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as exc:
        if required:
            raise ValueError(f"cannot load a tokenizer from {tokenizer or source.gguf_file or source.path}: {exc}") from exc
        logger.warning("no tokenizer (%s): only token-id prompts are accepted and no text is produced", exc)
        return None
