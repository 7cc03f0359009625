"""Loading models: the family adapter, the embedded GGUF models and tiny random models."""
