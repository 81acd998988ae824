"""Adapter and model-merging workbench: train, merge, quantize, evaluate and export adapters."""

__version__ = "0.1.0"
