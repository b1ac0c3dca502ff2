"""Models: device and precision, loading, LoRA, integrity checks, lean layers, the chunked loss, saving."""
