"""The model and what is asked of it: the transformer, components by name, checkpoints, head roles, training."""
