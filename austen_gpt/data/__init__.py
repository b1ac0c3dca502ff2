"""The author's paragraphs: reading and splitting them, tokenizing, batching, and a small BPE."""
