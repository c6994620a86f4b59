"""hmar: Hierarchical Masked Auto-Regressive image generation."""
__version__ = "0.1.0"
