"""Streaming, mergeable statistics per (component, chain) and the estimators and diagnostics built on them."""
