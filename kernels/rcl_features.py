"""Relational-contrastive-loss features in one pass over pred, with a broadcast-write backward.

Reference: `dr_train.method.contrastive_loss.relation_features`
    pred (B, C, F, H, W) -> frame_means (B, F, C) = mean over (H, W), dynamics (B, F-1, C) = frame_means[:, 1:]
    - frame_means[:, :-1], both fp32.

Forward, two stages (deterministic, no atomics):
  1. programs tile each (b, c, f) row of H*W elements; each reads its tile of pred once and writes one fp32
     partial sum;
  2. one program per (b, c) sums its F rows of partials in a fixed order and writes frame_means[b, :, c] and
     dynamics[b, :, c]; the differences are taken of the stored means (dynamics == means[1:] - means[:-1]
     bitwise), no (B, C, F-1, H, W) tensor exists.
Backward: grad_pred[b, c, f, h, w] = (g_means[b, f, c] + g_dyn[b, f-1, c] - g_dyn[b, f, c]) / (H*W), the g_dyn
terms absent at f = 0 and f = F-1 (and either upstream gradient may be absent); each program loads its three
scalars and writes its tile: a write-only pass, no intermediate.

Layouts: the (B, C, F) dimensions may have any strides; the (H, W) plane must be dense (C order), otherwise the
launcher makes a `.contiguous()` copy. Outputs are contiguous; the gradient is contiguous in pred's dtype.
"""
from __future__ import annotations

import torch

from kernels.dispatch import (LazyKernel, block_for, common_align, device_guard, inner_dense, launch_options,
                              next_power_of_2, row_strides)

import triton
import triton.language as tl
# tl.sum and tl.zeros are themselves @triton.jit functions, built in interpreted or compiled form once, when
# Triton is first imported; using tl.reduce with the sum's combine function and tl.full (builtins) instead keeps
# these kernels valid in whichever mode they are jitted (dispatch.LazyKernel follows TRITON_INTERPRET at call
# time, so tests may set it after Triton was imported). The interpreter recognises _sum_combine (numpy sum).
from triton.language.standard import _sum_combine

RF_BLOCK = 1024        # elements of an (H, W) plane per program (compiled mode)
RF_WARPS = 4
_MAX_GRID_Y = 65535


def _rf_partial_kernel(x_ptr, part_ptr, HW_a, C, F, NBLK, s_b, s_c, s_f, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # HW and the strides arrive divided by ALIGN (see masked_loss._loss_fwd_kernel): provable 16-byte alignment.
    HW = HW_a * ALIGN
    row = tl.program_id(0).to(tl.int64)           # (b * C + c) * F + f
    blk = tl.program_id(1)
    f = row % F
    bc = row // F
    c = bc % C
    b = bc // C
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + (b * s_b + c * s_c + f * s_f) * ALIGN + offs, mask=offs < HW, other=0.0).to(tl.float32)
    tl.store(part_ptr + row * NBLK + blk, tl.reduce(x, 0, _sum_combine))


def _rf_finalize_kernel(part_ptr, means_ptr, dyn_ptr, C, F, NBLK, hw,
                        F_BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr):
    bc = tl.program_id(0).to(tl.int64)            # b * C + c
    b = bc // C
    c = bc % C
    f = tl.arange(0, F_BLOCK)
    k = tl.arange(0, NB_BLOCK)
    base = part_ptr + bc * F * NBLK
    acc = tl.full([F_BLOCK, NB_BLOCK], 0.0, tl.float32)
    acc_next = tl.full([F_BLOCK, NB_BLOCK], 0.0, tl.float32)
    for k0 in range(0, NBLK, NB_BLOCK):
        kk = k0 + k
        in_k = kk[None, :] < NBLK
        acc += tl.load(base + f[:, None] * NBLK + kk[None, :], mask=(f[:, None] < F) & in_k, other=0.0)
        acc_next += tl.load(base + (f[:, None] + 1) * NBLK + kk[None, :], mask=(f[:, None] + 1 < F) & in_k,
                            other=0.0)
    mean = tl.reduce(acc, 1, _sum_combine) / hw
    mean_next = tl.reduce(acc_next, 1, _sum_combine) / hw     # row f+1 summed in the same order as `mean` of f+1
    tl.store(means_ptr + (b * F + f) * C + c, mean, mask=f < F)
    tl.store(dyn_ptr + (b * (F - 1) + f) * C + c, mean_next - mean, mask=f + 1 < F)


def _rf_backward_kernel(gm_ptr, gd_ptr, grad_ptr, HW_a, C, F,
                        sgm_b, sgm_f, sgm_c, sgd_b, sgd_f, sgd_c, hw,
                        HAS_GM: tl.constexpr, HAS_GD: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    HW = HW_a * ALIGN
    row = tl.program_id(0).to(tl.int64)           # (b * C + c) * F + f
    blk = tl.program_id(1)
    f = row % F
    bc = row // F
    c = bc % C
    b = bc // C
    coef = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_GM:
        coef += tl.load(gm_ptr + b * sgm_b + f * sgm_f + c * sgm_c).to(tl.float32)
    if HAS_GD:
        prev = tl.load(gd_ptr + b * sgd_b + (f - 1) * sgd_f + c * sgd_c, mask=f > 0, other=0.0).to(tl.float32)
        nxt = tl.load(gd_ptr + b * sgd_b + f * sgd_f + c * sgd_c, mask=f + 1 < F, other=0.0).to(tl.float32)
        coef += prev - nxt
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    tl.store(grad_ptr + row * HW + offs, (coef / hw).to(grad_ptr.dtype.element_ty), mask=offs < HW)


rf_partial_kernel = LazyKernel(_rf_partial_kernel)
rf_finalize_kernel = LazyKernel(_rf_finalize_kernel)
rf_backward_kernel = LazyKernel(_rf_backward_kernel)


def _plane_block(HW: int, block_size: int | None) -> int:
    block = block_size or block_for(HW, RF_BLOCK)
    while triton.cdiv(HW, block) > _MAX_GRID_Y:
        block *= 2
    return block


def _check(pred: torch.Tensor) -> None:
    if pred.dim() != 5:
        raise ValueError(f"relation_features expects (B, C, F, H, W), got shape {tuple(pred.shape)}")


def relation_features_forward(pred: torch.Tensor, block_size: int | None = None,
                              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two forward stages: (frame_means (B, F, C), dynamics (B, F-1, C)), fp32, contiguous."""
    _check(pred)
    B, C, F, H, W = pred.shape
    HW = H * W
    device = pred.device
    means = torch.empty((B, F, C), dtype=torch.float32, device=device)
    dyn = torch.empty((B, max(F - 1, 0), C), dtype=torch.float32, device=device)
    if means.numel() == 0:
        return means, dyn
    if HW == 0:
        return means.fill_(float("nan")), dyn.fill_(float("nan"))
    x = inner_dense(pred, 3)
    block = _plane_block(HW, block_size)
    nblk = triton.cdiv(HW, block)
    rows = B * C * F
    partials = torch.empty(rows * nblk, dtype=torch.float32, device=device)
    kwargs = launch_options(num_warps or RF_WARPS)
    strides = row_strides(x, 3)
    align = common_align(HW, *strides)
    rf_partial_kernel[(rows, nblk)](x, partials, HW // align, C, F, nblk, *(st // align for st in strides),
                                    BLOCK=block, ALIGN=align, **kwargs)
    f_block = next_power_of_2(F)
    nb_block = max(1, min(next_power_of_2(nblk), 4096 // f_block))
    rf_finalize_kernel[(B * C,)](partials, means, dyn if dyn.numel() else means, C, F, nblk, float(HW),
                                 F_BLOCK=f_block, NB_BLOCK=nb_block, **launch_options(4))
    return means, dyn


def relation_features_backward(g_means: torch.Tensor | None, g_dyn: torch.Tensor | None, shape, dtype, device,
                               block_size: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """grad_pred (contiguous, `dtype`) from the upstream gradients of frame_means and dynamics (either None)."""
    B, C, F, H, W = shape
    HW = H * W
    grad = torch.empty(shape, dtype=dtype, device=device)
    if grad.numel() == 0:
        return grad
    has_gm = g_means is not None
    has_gd = g_dyn is not None and g_dyn.numel() > 0
    gm = g_means if has_gm else grad
    gd = g_dyn if has_gd else grad
    sgm = (gm.stride(0), gm.stride(1), gm.stride(2)) if has_gm else (0, 0, 0)
    sgd = (gd.stride(0), gd.stride(1), gd.stride(2)) if has_gd else (0, 0, 0)
    block = _plane_block(HW, block_size)
    align = common_align(HW)
    kwargs = launch_options(num_warps or RF_WARPS)
    rf_backward_kernel[(B * C * F, triton.cdiv(HW, block))](
        gm, gd, grad, HW // align, C, F, *sgm, *sgd, float(HW),
        HAS_GM=has_gm, HAS_GD=has_gd, BLOCK=block, ALIGN=align, **kwargs)
    return grad


class RelationFeaturesFunction(torch.autograd.Function):
    """apply(pred, block_size_or_None) -> (frame_means (B, F, C), dynamics (B, F-1, C))."""

    @staticmethod
    def forward(ctx, pred, block_size=None):
        with device_guard(pred):
            means, dyn = relation_features_forward(pred, block_size)
        ctx.shape, ctx.dtype, ctx.device, ctx.block_size = tuple(pred.shape), pred.dtype, pred.device, block_size
        ctx.set_materialize_grads(False)
        return means, dyn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_means, g_dyn):
        if g_means is None and (g_dyn is None or g_dyn.numel() == 0):
            return None, None
        with device_guard(g_means if g_means is not None else g_dyn):
            grad = relation_features_backward(g_means, g_dyn, ctx.shape, ctx.dtype, ctx.device, ctx.block_size)
        return grad, None


def relation_features_triton(pred: torch.Tensor, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `kernels.relation_features` (no dispatch)."""
    _check(pred)
    return RelationFeaturesFunction.apply(pred, block_size)
