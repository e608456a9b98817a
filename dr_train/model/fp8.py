"""The frozen base in fp8: every frozen Linear weight stored as float8_e4m3fn with a float32 scale per output
channel, dequantised one layer at a time for its matmul (and again in backward, so no dequantised copy is kept
for autograd). About halves Mochi-1's 20 GB of bf16 weights; the LoRA weights stay float32 and are untouched.

Reference it must match: `torch.nn.functional.linear(x, W, b)` with the original weight, within the e4m3 rounding
of each weight (relative error per weight <= 2^-4, measured on the presets in tests/test_fp8.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)        # 448


def quantize_weight(weight_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per output row) with weight ~= fp8.float() * scale[:, None]."""
    w = weight_OI.detach().float()
    scale_O = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale_O[:, None]).to(FP8), scale_O


def dequantize(weight_fp8: torch.Tensor, scale_O: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight_fp8.to(torch.float32) * scale_O[:, None]).to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantised from fp8 in forward and again in backward (only the fp8 weight is kept)."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale_O, bias):
        w = dequantize(weight_fp8, scale_O, x.dtype)
        ctx.save_for_backward(weight_fp8, scale_O)
        ctx.x_dtype = x.dtype
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, scale_O = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight_fp8, scale_O, grad_out.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen Linear whose weight lives in fp8 (buffers, never trained)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_fp8, scale_O = quantize_weight(linear.weight)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("scale", scale_O)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _Fp8Linear.apply(x, self.weight_fp8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 + per-row scale"


def quantize_frozen_linears(model: torch.nn.Module) -> int:
    """Replace every frozen nn.Linear of `model` (LoRA adapters' base layers included, the adapters themselves
    excluded) by an Fp8Linear; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and not child.weight.requires_grad and not _is_adapter(parent):
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    return replaced


def _is_adapter(parent: torch.nn.Module) -> bool:
    """The LoRA A / B matrices sit in ModuleDicts named lora_A / lora_B (PEFT); they stay in float32."""
    return isinstance(parent, torch.nn.ModuleDict)
