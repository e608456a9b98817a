"""Mochi's rectified-flow objective with the mask weighting of hybrid mask training.

Convention (Mochi's reference fine-tuner and diffusers' MochiPipeline with invert_sigmas=True):
z_sigma = (1 - sigma) * z0 + sigma * eps, the model is called with timestep = (1 - sigma) * 1000, and it
predicts the velocity z0 - eps, which the Euler sampler integrates from sigma = 1 to sigma = 0.
"""
from __future__ import annotations

import torch

MODES = ("paper", "official")
MASK_SPANS = ("frame", "clip")      # loss.mask_span: each frame's own mask, or the clip's (`swept_mask`)


def noisy_latents(z0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor):
    """(z_sigma, target, timestep) for latents z0 (B, C, F, H, W), noise like z0, sigma (B,) in [0, 1]."""
    s = sigma_B.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    z_sigma = (1.0 - s) * z0 + s * noise
    target = z0 - noise
    timestep = (1.0 - sigma_B) * 1000.0
    return z_sigma, target, timestep


def mask_BCFHW(mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """A (B, F, H, W) or (B, 1, F, H, W) mask as (B, 1, F, H, W), checked against the prediction it weights."""
    if mask.dim() == pred.dim() - 1:
        mask = mask.unsqueeze(1)
    if mask.dim() != pred.dim() or mask.shape[1] != 1 or mask.shape[0] != pred.shape[0] \
            or mask.shape[2:] != pred.shape[2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match prediction {tuple(pred.shape)}: "
                         f"expected (B, F, H, W) or (B, 1, F, H, W) at latent resolution")
    return mask


def swept_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (B, F, H, W) or (B, 1, F, H, W) mask as the region its subjects cover in any frame, in every frame: the
    elementwise max over F. Weighting the loss with it weights where the subjects go, so a subject drawn at another
    frame's place on its path costs as much as one missing from its own place."""
    return mask.amax(dim=-3, keepdim=True).expand_as(mask).contiguous()


def masked_flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              mask_weight: float = 50.0, mode: str = "paper") -> torch.Tensor:
    """Scalar loss, accumulated in fp32.

    paper:    mean over all elements of (mask_weight * mask + 1) * (pred - target)^2
    official: mean over all elements of (1 + mask_weight * mask^2) * (pred - target)^2
    `mask` is (B, F, H, W) or (B, 1, F, H, W) and broadcasts over channels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    m = mask_BCFHW(mask, pred).float()
    if mode == "paper":
        weight = mask_weight * m + 1.0
    elif mode == "official":
        weight = 1.0 + mask_weight * m * m
    else:
        raise ValueError(f"unknown loss mode {mode!r}; available: {', '.join(MODES)}")
    err = (pred.float() - target.float()).pow(2)
    return (weight * err).mean()
