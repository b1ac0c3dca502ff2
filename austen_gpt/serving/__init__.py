"""Serving: serve.py's batching engine, the OpenAI-compatible API and its page, and the load bench.py puts on it."""
