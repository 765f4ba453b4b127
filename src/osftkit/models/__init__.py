"""Causal LMs and tokenizers: load from a hub id or a local directory, or build the tiny offline model."""

from osftkit.models.loading import LoadedModel, load_causal_lm

__all__ = ["LoadedModel", "load_causal_lm"]
