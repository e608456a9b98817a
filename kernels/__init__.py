"""Triton kernels for the masked flow-matching loss and the relational-contrastive-loss features.

Public API (same signatures and results as the plain-torch references in `dr_train.method.flow_matching_loss` and `dr_train.method.contrastive_loss`):

    kernels.masked_flow_matching_loss(pred, target, mask, mask_weight=50.0, mode="paper") -> fp32 scalar
    kernels.masked_flow_matching_loss_from_latents(pred, z0, noise, mask, mask_weight=50.0, mode="paper")
        the same loss with target = z0 - noise formed inside the kernel (never materialised)
    kernels.relation_features(pred) -> (frame_means (B, F, C), dynamics (B, F-1, C)), fp32

Each call is dispatched (see `kernels.dispatch`): the Triton kernel when the inputs are CUDA tensors and CUDA is
available, or CPU tensors under TRITON_INTERPRET=1; the torch reference otherwise. Force either with
`DR_TRAIN_KERNELS=auto|triton|torch`, `kernels.set_backend(...)` or `with kernels.use_backend(...):`;
`kernels.backend()` tells what a call would use. Importing this package never requires Triton.

Layout: `masked_loss.py` and `rcl_features.py` (Triton kernels, launchers, autograd Functions; the features
module is not called relation_features.py so that `kernels.relation_features` is unambiguously the function),
`dispatch.py` (backend selection, lazy jitting). Benchmarks: perf/bench_kernels.py.
"""
from __future__ import annotations

import torch

from dr_train.method.contrastive_loss import relation_features as relation_features_reference
from dr_train.method.flow_matching_loss import masked_flow_matching_loss as masked_flow_matching_loss_reference
from kernels import dispatch
from kernels.dispatch import BACKENDS, ENV_VAR, get_backend, set_backend, use_backend

if dispatch.triton_available():
    try:
        from kernels import masked_loss as _masked_loss
        from kernels import rcl_features as _relation_features
        KERNELS_IMPORT_ERROR: str | None = None
    except Exception as exc:  # a Triton too old/new for the kernels: keep the torch path working
        _masked_loss = _relation_features = None
        KERNELS_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        dispatch.triton = None
        dispatch.TRITON_IMPORT_ERROR = f"kernels failed to import ({KERNELS_IMPORT_ERROR})"
else:
    _masked_loss = _relation_features = None
    KERNELS_IMPORT_ERROR = dispatch.TRITON_IMPORT_ERROR

__all__ = ["masked_flow_matching_loss", "masked_flow_matching_loss_from_latents", "relation_features", "backend",
           "set_backend", "get_backend", "use_backend", "BACKENDS", "ENV_VAR",
           "masked_flow_matching_loss_reference", "relation_features_reference"]


def backend(device: torch.device | str | None = None) -> dict:
    """The dispatcher's state: setting (auto/triton/torch), the backend it resolves to for `device` (default
    cuda when available, else cpu) and why, Triton's version or import error, interpret mode, CUDA."""
    return dispatch.info(device)


def _loss_unsupported(mask, mask_weight) -> str | None:
    return None if _masked_loss is None else _masked_loss._unsupported(mask, mask_weight)


def masked_flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              mask_weight: float = 50.0, mode: str = "paper") -> torch.Tensor:
    """Dispatching `dr_train.method.flow_matching_loss.masked_flow_matching_loss`: fused Triton loss + gradient, or the reference."""
    tensors = [pred, target, mask]
    if dispatch.select("masked_flow_matching_loss", tensors, _loss_unsupported(mask, mask_weight)) == "triton":
        return _masked_loss.masked_flow_matching_loss_triton(pred, target, mask, mask_weight, mode)
    return masked_flow_matching_loss_reference(pred, target, mask, mask_weight, mode)


def masked_flow_matching_loss_from_latents(pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                                           mask: torch.Tensor, mask_weight: float = 50.0,
                                           mode: str = "paper") -> torch.Tensor:
    """`masked_flow_matching_loss(pred, z0 - noise, mask, ...)` without materialising the target on the Triton
    path (the velocity target of `dr_train.method.flow_matching_loss.noisy_latents`)."""
    tensors = [pred, z0, noise, mask]
    unsupported = _loss_unsupported(mask, mask_weight)
    if unsupported is None and not (pred.shape == z0.shape == noise.shape):
        unsupported = "z0 and noise must have pred's shape (the kernel does not broadcast them)"
    if dispatch.select("masked_flow_matching_loss_from_latents", tensors, unsupported) == "triton":
        return _masked_loss.masked_flow_matching_loss_from_latents_triton(pred, z0, noise, mask, mask_weight, mode)
    return masked_flow_matching_loss_reference(pred, z0 - noise, mask, mask_weight, mode)


def relation_features(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching `dr_train.method.contrastive_loss.relation_features`: one-pass Triton features, or the reference."""
    if dispatch.select("relation_features", [pred]) == "triton":
        return _relation_features.relation_features_triton(pred)
    return relation_features_reference(pred)
