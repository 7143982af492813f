"""Attention over the paged KV cache: the batch metadata and the backends that read it."""
from engine.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
