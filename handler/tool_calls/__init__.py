"""Tool calling: the request's tools checked, the calls read from a model's output (whole or streamed), OpenAI's
shapes."""
