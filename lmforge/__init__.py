"""lmforge: train language models from scratch, one readable step at a time."""

__version__ = "0.1.0"
