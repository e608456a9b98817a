"""Fused masked flow-matching loss: loss and d(loss)/d(pred) in one pass (the Liger loss pattern).

Reference: `dr_train.method.flow_matching_loss.masked_flow_matching_loss`
    paper:    mean((mask_weight * M + 1) * (pred - target)^2)
    official: mean((1 + mask_weight * M^2) * (pred - target)^2)
with M (B, F, H, W) or (B, 1, F, H, W) broadcast over the channels of pred (B, C, F, H, W).

Kernel: programs tile the (B*C) rows of F*H*W elements; each reads its tile of pred, target (or latents and
noise, forming target = z0 - noise in registers) and mask once, accumulates w * (p - t)^2 in fp32 into one
partial per program, and, when a gradient is needed, writes grad = 2 * w * (p - t) / numel in pred's dtype.
A second one-program kernel sums the partials in a fixed order (no float atomics): the loss is bitwise
reproducible for a given input, device and launch configuration (no autotuning, on purpose: a different tile
size would change the summation order).

Backward: the saved gradient is multiplied in place by the upstream scalar; the scale is read on the device
(no host sync) and when it is exactly 1 every lane is masked off, so the backward moves no memory. The grad
is therefore consumed by the first backward: a second backward through the same graph (retain_graph=True)
raises instead of returning a wrong gradient.

Layouts: the leading (B, C) dimensions may have any strides (channel or batch slices, expanded masks); the
(F, H, W) block of pred, target, noise and mask must be dense (C order), otherwise the launcher makes a
`.contiguous()` copy of that tensor. The gradient is returned contiguous.

Gradients: pred gets its gradient; a target that requires grad gets -grad (latents z0: -grad, noise: +grad),
one extra elementwise pass only when asked for; a mask or mask_weight that requires grad is not supported
(the dispatcher sends such calls to the torch reference).
"""
from __future__ import annotations

import math

import torch

from dr_train.method.flow_matching_loss import MODES, mask_BCFHW
from kernels.dispatch import (LazyKernel, block_for, common_align, device_guard, inner_dense, launch_options,
                              row_strides)

import triton
import triton.language as tl
# tl.sum and tl.zeros are themselves @triton.jit functions, built in interpreted or compiled form once, when
# Triton is first imported; using tl.reduce with the sum's combine function and tl.full (builtins) instead keeps
# these kernels valid in whichever mode they are jitted (dispatch.LazyKernel follows TRITON_INTERPRET at call
# time, so tests may set it after Triton was imported). The interpreter recognises _sum_combine (numpy sum).
from triton.language.standard import _sum_combine

LOSS_BLOCK = 2048      # elements of a row per program (compiled mode)
LOSS_WARPS = 4
SUM_BLOCK = 1024
SCALE_BLOCK = 4096
SCALE_WARPS = 4
_MAX_GRID_Y = 65535


def _loss_fwd_kernel(pred_ptr, tgt_ptr, noise_ptr, mask_ptr, grad_ptr, partial_ptr,
                     S_a, C, NBLK,
                     sp_b, sp_c, st_b, st_c, sn_b, sn_c, sm_b,
                     mask_weight, grad_scale,
                     OFFICIAL: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # S and the row strides arrive divided by ALIGN (a power of two dividing all of them): multiplying back by a
    # constexpr lets the compiler prove 16-byte alignment and vectorise the loads, the stores and the tail mask.
    S = S_a * ALIGN
    row = tl.program_id(0).to(tl.int64)           # b * C + c
    blk = tl.program_id(1)
    b = row // C
    c = row % C
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    p = tl.load(pred_ptr + (b * sp_b + c * sp_c) * ALIGN + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(tgt_ptr + (b * st_b + c * st_c) * ALIGN + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_NOISE:
        t = t - tl.load(noise_ptr + (b * sn_b + c * sn_c) * ALIGN + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + b * sm_b * ALIGN + offs, mask=valid, other=0.0).to(tl.float32)
    if OFFICIAL:
        w = 1.0 + mask_weight * (m * m)
    else:
        w = mask_weight * m + 1.0
    d = p - t
    wd = w * d
    tl.store(partial_ptr + row * NBLK + blk, tl.reduce(wd * d, 0, _sum_combine))
    if WRITE_GRAD:
        g = wd * grad_scale
        tl.store(grad_ptr + row * S + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _sum_partials_kernel(partial_ptr, out_ptr, N, numel, BLOCK: tl.constexpr):
    """One program: out = sum(partials) / numel, blocked accumulation in a fixed order."""
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.reduce(acc, 0, _sum_combine) / numel)


def _scale_inplace_kernel(x_ptr, scale_ptr, N_a, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """x *= scale, with scale read on the device; scale == 1 masks every lane off (no memory traffic).
    N arrives divided by ALIGN (see _loss_fwd_kernel)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(scale_ptr).to(tl.float32)
    limit = (N_a * (s != 1.0).to(tl.int32)) * ALIGN      # 0 when s == 1: every lane masked off
    valid = offs < limit
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=valid)


loss_fwd_kernel = LazyKernel(_loss_fwd_kernel)
sum_partials_kernel = LazyKernel(_sum_partials_kernel)
scale_inplace_kernel = LazyKernel(_scale_inplace_kernel)


def _check_inputs(pred, target, noise, mask, mode):
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}; available: {', '.join(MODES)}")
    if pred.dim() != 5:
        raise ValueError(f"the fused loss expects pred (B, C, F, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if noise is not None and noise.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and noise {tuple(noise.shape)} differ in shape")
    return mask_BCFHW(mask, pred)


def masked_loss_forward(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel: (scalar fp32 loss, d loss / d pred or None). target = target - noise if noise."""
    with device_guard(args[0] if args else kwargs["pred"]):
        return _masked_loss_forward(*args, **kwargs)


def _masked_loss_forward(pred: torch.Tensor, target: torch.Tensor, noise: torch.Tensor | None, mask: torch.Tensor,
                        mask_weight: float, mode: str, write_grad: bool, block_size: int | None = None,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    mask5 = _check_inputs(pred, target, noise, mask, mode)
    if mask5.dtype == torch.bool:
        mask5 = mask5.view(torch.uint8)
    B, C = pred.shape[:2]
    S = math.prod(pred.shape[2:])
    numel = pred.numel()
    device = pred.device
    if numel == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=device), \
            (torch.zeros_like(pred) if write_grad else None)
    pred_ = inner_dense(pred, 2)
    target_ = inner_dense(target, 2)
    noise_ = inner_dense(noise, 2) if noise is not None else target_
    mask_ = inner_dense(mask5, 2)
    block = block_size or block_for(S, LOSS_BLOCK)
    while triton.cdiv(S, block) > _MAX_GRID_Y:
        block *= 2
    nblk = triton.cdiv(S, block)
    rows = B * C
    partials = torch.empty(rows * nblk, dtype=torch.float32, device=device)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=device) if write_grad else None
    kwargs = launch_options(num_warps or LOSS_WARPS)
    strides = [*row_strides(pred_, 2), *row_strides(target_, 2), *row_strides(noise_, 2), row_strides(mask_, 1)[0]]
    align = common_align(S, *strides)
    loss_fwd_kernel[(rows, nblk)](
        pred_, target_, noise_, mask_, grad if write_grad else partials, partials,
        S // align, C, nblk, *(st // align for st in strides),
        float(mask_weight), 2.0 / numel,
        OFFICIAL=(mode == "official"), HAS_NOISE=noise is not None, WRITE_GRAD=write_grad, BLOCK=block,
        ALIGN=align, **kwargs)
    loss = torch.empty((), dtype=torch.float32, device=device)
    n = rows * nblk
    sum_partials_kernel[(1,)](partials, loss, n, float(numel), BLOCK=min(SUM_BLOCK, block_for(n, SUM_BLOCK)),
                              **launch_options(4))
    return loss, grad


def scale_inplace(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (contiguous) *= scale (a one-element tensor on x's device), without a host sync."""
    scale = scale.detach().reshape(1).to(device=x.device, dtype=torch.float32)
    n = x.numel()
    if n == 0:
        return x
    block = block_for(n, SCALE_BLOCK)
    kwargs = launch_options(SCALE_WARPS)
    align = common_align(n)
    with device_guard(x):
        scale_inplace_kernel[(triton.cdiv(n, block),)](x, scale, n // align, BLOCK=block, ALIGN=align, **kwargs)
    return x


class MaskedFlowMatchingLossFunction(torch.autograd.Function):
    """apply(pred, target, noise_or_None, mask, mask_weight, mode, write_grad, block_size_or_None) -> fp32 loss.

    Use `_apply`, which sets write_grad from the grad mode and the inputs' requires_grad.
    """

    @staticmethod
    def forward(ctx, pred, target, noise, mask, mask_weight, mode, write_grad, block_size=None):
        loss, grad = masked_loss_forward(pred, target, noise, mask, mask_weight, mode, write_grad=write_grad,
                                         block_size=block_size)
        ctx.grad = grad
        ctx.has_noise = noise is not None
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the fused masked flow-matching loss was already back-propagated: its gradient is "
                               "computed in the forward and consumed by the first backward, so a second "
                               "backward (retain_graph=True) is not supported; use the torch backend "
                               "(kernels.use_backend('torch')) for that")
        ctx.grad = None
        scale_inplace(grad, grad_output)
        needs = ctx.needs_input_grad
        grad_target = -grad if needs[1] else None
        grad_noise = (grad.clone() if needs[0] else grad) if ctx.has_noise and needs[2] else None
        grad_pred = grad if needs[0] else None
        return grad_pred, grad_target, grad_noise, None, None, None, None, None


def _apply(pred, target, noise, mask, mask_weight, mode, block_size):
    write_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (pred, target, noise))
    return MaskedFlowMatchingLossFunction.apply(pred, target, noise, mask, _weight(mask_weight), mode, write_grad,
                                                block_size)


def _unsupported(mask: torch.Tensor, mask_weight) -> str | None:
    if mask.requires_grad:
        return "the mask requires grad (the fused kernel returns no mask gradient)"
    if isinstance(mask_weight, torch.Tensor) and mask_weight.requires_grad:
        return "mask_weight requires grad (the fused kernel returns no mask_weight gradient)"
    return None


def _weight(mask_weight) -> float:
    return float(mask_weight.item() if isinstance(mask_weight, torch.Tensor) else mask_weight)


def masked_flow_matching_loss_triton(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                                     mask_weight: float = 50.0, mode: str = "paper",
                                     block_size: int | None = None) -> torch.Tensor:
    """The Triton path of `kernels.masked_flow_matching_loss` (no dispatch)."""
    reason = _unsupported(mask, mask_weight)
    if reason:
        raise ValueError(f"masked_flow_matching_loss (Triton): {reason}; use the torch reference")
    return _apply(pred, target, None, mask, mask_weight, mode, block_size)


def masked_flow_matching_loss_from_latents_triton(pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                                                  mask: torch.Tensor, mask_weight: float = 50.0,
                                                  mode: str = "paper",
                                                  block_size: int | None = None) -> torch.Tensor:
    """Same loss with target = z0 - noise formed in registers (never materialised)."""
    reason = _unsupported(mask, mask_weight)
    if reason:
        raise ValueError(f"masked_flow_matching_loss_from_latents (Triton): {reason}; use the torch reference")
    return _apply(pred, z0, noise, mask, mask_weight, mode, block_size)
