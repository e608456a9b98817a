"""Precision and determinism of one process (ranks, devices and DeepSpeed live in dr_train/distributed.py)."""
from __future__ import annotations

import logging
import os
import random
import re
import warnings
from contextlib import nullcontext

import numpy as np
import torch


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast when asked for (or, with 'auto', on CUDA devices that support bf16)."""
    if mixed_precision == "no":
        return nullcontext()
    if mixed_precision == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False


# Library messages that say nothing to our user (each seen in our own runs; a real warning still gets through):
LIBRARY_NOISE = (
    r".*CPU Autocast only supports dtypes of torch\.bfloat16.*",      # diffusers' Mochi RoPE asks for fp32 on CPU
    r".*In CPU autocast, but the target dtype is not supported.*",
    r".*Already found a `peft_config` attribute.*",                   # several named adapters are the point
    r".*The passed generator was created on 'cpu'.*",
    r".*torch\.utils\._pytree\._register_pytree_node is deprecated.*",
)


def quiet_library_noise() -> None:
    """Keep the library warnings in LIBRARY_NOISE off the console (entry points call this once)."""
    for pattern in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).addFilter(_NoiseFilter())


class _NoiseFilter:
    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(re.match(pattern, message, re.DOTALL) for pattern in LIBRARY_NOISE)
