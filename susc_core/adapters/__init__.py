"""Adapters that present real models (Hugging Face, TransformerLens, the bundled one) to the engine."""
