"""Built-in synthetic relation clips at latent resolution (the main job's default data; no download).

Each clip has two subjects with distinct shapes (a disc and a square) and per-clip random appearance codes,
moving in the relation's two-body motion pattern. Pixel-resolution subject masks are rendered and pooled to
latent resolution with the same function real masks go through; the latent is background + appearance code
times mask, stored as a mean and log-variance like cached VAE encodings.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from dr_train.masks import latent_masks

LATENT_CHANNELS = 12
MOTIONS = ("approach", "separate", "follow", "meet_and_part", "push", "orbit", "rise_and_meet", "side_by_side")
RELATION_MOTION = {
    "walking_towards": "approach", "hugging": "approach", "walking_apart": "separate", "following": "follow",
    "handshaking": "meet_and_part", "exchanging_things": "meet_and_part", "giving_something": "meet_and_part",
    "pushing": "push", "kicking": "push", "punching_slapping": "push", "knocking_over": "push",
    "hitting_with_object": "push", "high_five": "rise_and_meet", "cheers_and_drink": "rise_and_meet",
    "carrying_together": "side_by_side", "supporting_somebody": "side_by_side", "patting_on_back": "orbit",
}


@dataclass
class LatentClip:
    video_id: str
    relation: str
    latents_mean: torch.Tensor     # (C, F, H, W)
    latents_logvar: torch.Tensor   # (C, F, H, W)
    mask_subject1: torch.Tensor    # (F, H, W) in [0, 1]
    mask_subject2: torch.Tensor    # (F, H, W)


def motion_for(relation: str) -> str:
    if relation in RELATION_MOTION:
        return RELATION_MOTION[relation]
    digest = int(hashlib.sha256(relation.encode()).hexdigest(), 16)
    return MOTIONS[digest % len(MOTIONS)]


def _positions(motion: str, t: torch.Tensor, jitter: torch.Tensor):
    """Centres (x, y) in [0, 1] of both subjects over normalised time t (T,)."""
    y = 0.5 + 0.05 * jitter[0]
    lerp = lambda a, b, s: a + (b - a) * s  # noqa: E731
    if motion == "approach":
        return (lerp(0.15, 0.42, t), y + 0 * t), (lerp(0.85, 0.58, t), y + 0 * t)
    if motion == "separate":
        return (lerp(0.42, 0.15, t), y + 0 * t), (lerp(0.58, 0.85, t), y + 0 * t)
    if motion == "follow":
        return (lerp(0.35, 0.85, t), y + 0 * t), (lerp(0.1, 0.6, t), y + 0 * t)
    if motion == "meet_and_part":
        s = 1 - (2 * t - 1).abs()
        return (lerp(0.2, 0.43, s), y + 0 * t), (lerp(0.8, 0.57, s), y + 0 * t)
    if motion == "push":
        s1 = (2 * t).clamp(max=1)
        s2 = (2 * t - 1).clamp(min=0)
        return (lerp(0.15, 0.45, s1), y + 0 * t), (lerp(0.6, 0.9, s2), y + 0 * t)
    if motion == "orbit":
        a = 2 * math.pi * t
        return (0.5 + 0 * t, y + 0 * t), (0.5 + 0.25 * torch.cos(a), y + 0.25 * torch.sin(a))
    if motion == "rise_and_meet":
        return (lerp(0.25, 0.43, t), lerp(0.75, 0.35, t)), (lerp(0.75, 0.57, t), lerp(0.75, 0.35, t))
    if motion == "side_by_side":
        return (lerp(0.15, 0.7, t), y - 0.12 + 0 * t), (lerp(0.15, 0.7, t), y + 0.12 + 0 * t)
    raise ValueError(f"unknown motion {motion!r}")


def render_clip(relation: str, index: int, latent_frames: int = 3, latent_height: int = 8, latent_width: int = 8,
                seed: int = 0) -> LatentClip:
    """Deterministic clip `index` of `relation`."""
    digest = hashlib.sha256(f"{relation}/{index}/{seed}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    frames = 6 * (latent_frames - 1) + 1
    height, width = 8 * latent_height, 8 * latent_width
    jitter = torch.rand(4, generator=g) * 2 - 1
    t = torch.linspace(0, 1, frames).clamp(0, 1)
    (x1, y1), (x2, y2) = _positions(motion_for(relation), t, jitter)
    x1, x2 = x1 + 0.03 * jitter[1], x2 + 0.03 * jitter[2]
    ys = (torch.arange(height).float() + 0.5) / height
    xs = (torch.arange(width).float() + 0.5) / width
    yy, xx = ys[None, :, None], xs[None, None, :]
    radius = 0.13 + 0.02 * jitter[3]
    disc = (((xx - x1[:, None, None]) ** 2 + (yy - y1[:, None, None]) ** 2) <= radius ** 2).float()
    square = (((xx - x2[:, None, None]).abs() <= radius) & ((yy - y2[:, None, None]).abs() <= radius)).float()
    square = square * (1 - disc)   # subject 1 is in front where they overlap
    m1, m2 = latent_masks(disc), latent_masks(square)
    code1 = torch.randn(LATENT_CHANNELS, generator=g)
    code2 = torch.randn(LATENT_CHANNELS, generator=g)
    background = 0.3 * torch.randn(LATENT_CHANNELS, 1, latent_height, latent_width, generator=g)
    mean = background + code1[:, None, None, None] * m1[None] + code2[:, None, None, None] * m2[None]
    logvar = torch.full_like(mean, 2 * math.log(0.05))
    return LatentClip(f"{relation}/{index:04d}", relation, mean, logvar, m1, m2)


def synthetic_relation_clips(relation: str, count: int, latent_frames: int = 3, latent_height: int = 8,
                             latent_width: int = 8, seed: int = 0) -> list[LatentClip]:
    if count < 1:
        raise ValueError("videos_per_relation must be >= 1")
    return [render_clip(relation, i, latent_frames, latent_height, latent_width, seed) for i in range(count)]
