"""Precision and determinism of one process (ranks, devices and DeepSpeed live in dr_train/distributed.py)."""
from __future__ import annotations

import os
import random
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
