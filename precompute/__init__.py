"""CLIP-Scope precompute: model, SAEs, and the feature index writer."""

__version__ = "0.1.0"
