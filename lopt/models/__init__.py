"""Models and tokenizers, loaded offline: model families and shipped shapes, loading (directory, GGUF,
the embedded SmolLM2), the tiny test configs."""
