"""Data: the corpus format, the tokenizer, synthetic pattern families, re-tokenisation for adapter models."""
