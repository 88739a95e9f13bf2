"""Losses as pure functions over logits / log-prob tensors, returning per-example values."""
