"""Quantization: loading bases through bitsandbytes (QLoRA)."""
