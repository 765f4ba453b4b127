"""Causal LMs and tokenizers: from a hub id, a local directory, or the tiny model built offline."""

from osftkit.models.loading import LoadedModel, load_causal_lm

__all__ = ["LoadedModel", "load_causal_lm"]
