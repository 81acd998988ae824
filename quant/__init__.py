"""Quantization: round-to-nearest (`rtn`), FlexRound learnable rounding with block-wise
reconstruction (`flexround`), compressed-tensors pack-quantized and dequantized exports (`export`),
the full-precision / RTN / FlexRound / NF4 report (`report`), the `kind: quantize` recipe stage
(`stage`), and bitsandbytes loading for QLoRA (`bnb`)."""
