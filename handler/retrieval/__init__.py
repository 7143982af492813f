"""Retrieval for RAG: documents from a folder, chunked and indexed for dense, BM25 or hybrid search."""
from handler.retrieval.documents import Chunk, Document, chunk_documents, load_documents
from handler.retrieval.index import RETRIEVAL_MODES, DocumentIndex, Passage

__all__ = ["Chunk", "Document", "DocumentIndex", "Passage", "RETRIEVAL_MODES", "chunk_documents", "load_documents"]
