"""bitsandbytes loading: a 4-bit NF4 or 8-bit base for QLoRA (Dettmers et al. 2023, "QLoRA").

4-bit: NF4 weights with double quantization of the scales, matmuls computed in the model's
compute dtype (bf16 on GPUs that have it). LoRA adapters then train in float32 on top
(`peft.prepare_model_for_kbit_training`). bitsandbytes' k-bit kernels need a CUDA GPU.
"""

from __future__ import annotations

import torch


class BitsAndBytesUnavailable(RuntimeError):
    """A quantized load was asked for where bitsandbytes cannot run it."""


def bnb_quantization_config(load_in: str, compute_dtype: torch.dtype):
    """The transformers `BitsAndBytesConfig` for `load_in` ('none', '4bit', '8bit')."""
    if load_in == "none":
        return None
    if load_in not in ("4bit", "8bit"):
        raise ValueError(f"model.load_in: unknown value {load_in!r} (allowed: none, 4bit, 8bit)")
    if not torch.cuda.is_available():
        raise BitsAndBytesUnavailable(
            f"model.load_in: '{load_in}' (bitsandbytes, QLoRA) needs a CUDA GPU; none is available")
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
