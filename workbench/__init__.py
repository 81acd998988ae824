"""Adapter and model-merging workbench: train, merge, quantize, evaluate and export adapters."""

import logging

__version__ = "0.1.0"


class _QuietBitsandbytesCpuKernel(logging.Filter):
    """bitsandbytes, imported by every `import peft`, looks on CPUs with AVX512-BF16 for an optional
    4-bit CPU kernel package and logs a warning ("Failed to load CPU gemm_4bit_forward ... pip
    install kernels") when it is missing. The workbench never multiplies by 4-bit weights on the CPU
    (its NF4 baseline quantizes and dequantizes; 4-bit and 8-bit loading need a CUDA GPU), so the
    warning would only alarm the reader of every job log; this drops that one message and nothing
    else bitsandbytes says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietBitsandbytesCpuKernel())
