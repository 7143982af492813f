"""Documents read from a folder, and their chunks: windows of an LLM tokenizer's tokens.

`.txt` and `.md` files are one document each; a `.jsonl` file holds one document per line, an object with
`text` (a string), and optionally `id` (a string) and `metadata` (an object).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

TEXT_SUFFIXES = (".txt", ".md")
LINES_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: dict


@dataclass(frozen=True)
class Chunk:
    id: str
    document_id: str
    text: str
    metadata: dict


def document_files(folder: Path) -> list[Path]:
    """Every document file under `folder`, recursively, sorted by relative path; ValueError if there is none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such documents folder")
    files = sorted(
        (path for path in folder.rglob("*") if path.is_file() and path.suffix in (*TEXT_SUFFIXES, LINES_SUFFIX)),
        key=lambda path: path.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(f"{folder}: the documents folder holds no .txt, .md or .jsonl file")
    return files


def load_documents(folder: Path) -> list[Document]:
    """The documents of every file `document_files` lists, in its order; ValueError naming the file and line."""
    documents: list[Document] = []
    first_seen: dict[str, str] = {}
    for file in document_files(folder):
        source = file.relative_to(folder).as_posix()
        for place, document in _file_documents(file, source):
            if document.id in first_seen:
                raise ValueError(f"{place}: document id {document.id!r} is already used by {first_seen[document.id]}")
            first_seen[document.id] = place
            documents.append(document)
    return documents


def _file_documents(file: Path, source: str) -> Iterator[tuple[str, Document]]:
    """(where it was read, the document) for each document in one file."""
    text = _read_text(file)
    if file.suffix != LINES_SUFFIX:
        yield str(file), Document(source, text, {"source": source})
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            place = f"{file}:{number}"
            yield place, _line_document(_parse_line(line, place), place, source, number)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not valid UTF-8 (byte {exc.start})") from None


def _parse_line(line: str, place: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{place}: not valid JSON: {exc}") from None


def _line_document(value: Any, place: str, source: str, number: int) -> Document:
    if not isinstance(value, dict):
        raise ValueError(f"{place}: each line must be a JSON object with a `text` string")
    text, document_id, metadata = value.get("text"), value.get("id", f"{source}:{number}"), value.get("metadata", {})
    if not isinstance(text, str):
        raise ValueError(f"{place}: `text` is missing or not a string")
    if not isinstance(document_id, str) or not document_id:
        raise ValueError(f"{place}: `id` must be a non-empty string")
    if not isinstance(metadata, dict):
        raise ValueError(f"{place}: `metadata` must be a JSON object")
    return Document(document_id, text, {"source": source, **metadata})


def chunk_documents(
    documents: list[Document],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    chunk_tokens: int,
    overlap_tokens: int,
) -> list[Chunk]:
    """Each document's windows of `chunk_tokens` tokens, each `chunk_tokens - overlap_tokens` after the last."""
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(
            f"chunking needs 0 <= overlap_tokens < chunk_tokens, got overlap_tokens={overlap_tokens} "
            f"and chunk_tokens={chunk_tokens}"
        )
    chunks: list[Chunk] = []
    for document in documents:
        windows = token_windows(encode(document.text), chunk_tokens, chunk_tokens - overlap_tokens)
        chunks.extend(
            Chunk(f"{document.id}#{index}", document.id, decode(window), dict(document.metadata))
            for index, window in enumerate(windows)
        )
    return chunks


def token_windows(ids: list[int], size: int, stride: int) -> list[list[int]]:
    """Windows of `size` ids starting every `stride` ids, the last one reaching the end; none for no ids."""
    windows = []
    for start in range(0, len(ids), stride):
        windows.append(ids[start:start + size])
        if start + size >= len(ids):
            break
    return windows
