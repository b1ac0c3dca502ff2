"""Sampling: settings, generation past the context window, the interactive session, sample records."""
