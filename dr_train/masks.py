"""Pixel masks -> latent masks following Mochi's VAE grouping, and numeric ordering of per-frame mask files."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dr_train.geometry import SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: frame2 < frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]


def sorted_frame_files(folder: str | Path, suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg")) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"mask folder {folder} does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()]
    if not files:
        raise ValueError(f"mask folder {folder} holds no frames ({', '.join(suffixes)})")
    return sorted(files, key=lambda p: natural_key(p.name))


POOLINGS = ("mean", "max")


def latent_masks(mask_FHW: torch.Tensor, temporal_compression: int = TEMPORAL_COMPRESSION,
                 spatial_compression: int = SPATIAL_COMPRESSION, pooling: str = "mean") -> torch.Tensor:
    """(F, H, W) masks in [0, 1] -> (F', H', W') with F' = 1 + (F - 1) / temporal_compression.

    Latent frame 0 is video frame 0; latent frame k >= 1 is the mean of video frames t(k-1)+1 ... tk, as Mochi's
    causal VAE groups them. In space, each s x s block is pooled per frame before the temporal mean:
    `pooling="mean"` averages it (the paper's "average"), `"max"` takes its maximum, which is what the official
    code's `resize_with_mask_preservation` computes for binary masks (a block touched by a subject counts whole).
    """
    if mask_FHW.dim() != 3:
        raise ValueError(f"latent_masks expects (F, H, W), got shape {tuple(mask_FHW.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"latent_masks: unknown pooling {pooling!r}; available: {', '.join(POOLINGS)}")
    frames, height, width = mask_FHW.shape
    t, s = temporal_compression, spatial_compression
    if (frames - 1) % t != 0:
        raise ValueError(f"mask has {frames} frames; Mochi's VAE needs 1 + {t}k frames")
    if height % s or width % s:
        raise ValueError(f"mask is {height}x{width}; height and width must be multiples of {s}")
    pool = F.avg_pool2d if pooling == "mean" else F.max_pool2d
    m = pool(mask_FHW.float()[:, None], kernel_size=s, stride=s)[:, 0]
    if frames == 1:
        return m
    return torch.cat([m[:1], m[1:].reshape(-1, t, *m.shape[1:]).mean(dim=1)], dim=0)
