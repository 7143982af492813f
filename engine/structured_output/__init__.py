"""Constrained decoding: grammars compiled with xgrammar, one matcher per sequence, a token bitmask per step."""
from engine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
