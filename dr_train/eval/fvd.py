"""Fréchet Video Distance (Unterthiner et al. 2018) with the Kinetics-400 I3D port of `i3d.py`.

As the original (google-research/frechet_video_distance + tfgan):

* preprocessing: every frame resized straight to 224x224 (no crop, aspect ratio not kept) with TF1's
  `tf.image.resize_bilinear` (align_corners=False, half_pixel_centers=False: source = dst * in/out, no
  antialiasing), then x -> 2 * x / 255 - 1;
* feature: the 400 averaged Kinetics logits of I3D (TF-Hub `i3d-kinetics-400/1`), one vector per video;
* distance: Fréchet distance between Gaussians fitted to the two feature sets (mean, unbiased covariance),
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64, clamped at 0.

Options (recorded in the feature name so statistics of different settings never mix): the number of frames
(16 in the original evaluation), a frame stride and start, a centre square crop before the resize, and PyTorch's
half-pixel bilinear resize instead of TF1's.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dr_train.io import atomic_path, sha256_file

from .i3d import I3D

I3D_INPUT_SIZE = 224
RESIZE_MODES = ("tf1", "torch")
CROP_MODES = ("none", "center")


@dataclass(frozen=True)
class FvdConfig:
    """How videos become I3D inputs. Defaults = the original FVD (16 frames, no crop, TF1 bilinear resize).

    num_frames: frames taken from each video (None: all of them); frame_start / frame_stride pick which.
    crop: "none" (original: squash to 224x224) or "center" (centre square of the short side, then resize).
    resize: "tf1" (tf.image.resize_bilinear legacy sampling, as the original) or "torch" (F.interpolate bilinear,
    half-pixel centres, no antialias).
    """

    num_frames: int | None = 16
    frame_start: int = 0
    frame_stride: int = 1
    crop: str = "none"
    resize: str = "tf1"

    def __post_init__(self):
        if self.num_frames is not None and self.num_frames < 9:
            raise ValueError(f"I3D needs at least 9 frames, num_frames={self.num_frames}")
        if self.frame_start < 0 or self.frame_stride < 1:
            raise ValueError(f"bad frame_start={self.frame_start} / frame_stride={self.frame_stride}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    @property
    def feature_name(self) -> str:
        """Identifies the feature: statistics with different names are not comparable."""
        return (f"i3d_k400_logits/frames={self.num_frames}/start={self.frame_start}/stride={self.frame_stride}"
                f"/crop={self.crop}/resize={self.resize}")


def resize_bilinear_tf1(x_NCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False)` on float images.

    Source coordinate = dst * (in / out); lower = floor, upper = min(ceil, in - 1); interpolate along x first
    (top and bottom rows), then along y, in float32 as TF's CPU kernel does.
    """
    def axis(n_in: int, n_out: int):
        scale = np.float32(n_in) / np.float32(n_out)
        src = torch.arange(n_out, dtype=torch.float32) * float(scale)
        lower = src.floor()
        upper = src.ceil().clamp(max=n_in - 1)
        return lower.long(), upper.long(), src - lower

    height, width = x_NCHW.shape[-2:]
    y0, y1, y_lerp = axis(height, size[0])
    x0, x1, x_lerp = axis(width, size[1])
    x = x_NCHW.float()
    top, bottom = x[..., y0, :], x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * x_lerp
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


def select_frames(frames_FHWC, config: FvdConfig) -> torch.Tensor:
    """The frames `config` takes from one uint8 video (F, H, W, 3); ValueError if the video is too short."""
    if isinstance(frames_FHWC, np.ndarray):
        frames_FHWC = torch.from_numpy(np.array(frames_FHWC, copy=not frames_FHWC.flags.writeable or None, order="C"))
    if not isinstance(frames_FHWC, torch.Tensor) or frames_FHWC.dtype != torch.uint8 or frames_FHWC.ndim != 4 \
            or frames_FHWC.shape[-1] != 3:
        shape = tuple(getattr(frames_FHWC, "shape", ()))
        raise ValueError(f"a video must be uint8 (F, H, W, 3), got {getattr(frames_FHWC, 'dtype', type(frames_FHWC))} "
                         f"{shape}")
    picked = frames_FHWC[config.frame_start::config.frame_stride]
    if config.num_frames is not None:
        if picked.shape[0] < config.num_frames:
            raise ValueError(f"video of {frames_FHWC.shape[0]} frames is too short for {config.num_frames} frames "
                             f"from {config.frame_start} every {config.frame_stride}")
        picked = picked[:config.num_frames]
    if picked.shape[0] < 9:
        raise ValueError(f"I3D needs at least 9 frames, got {picked.shape[0]}")
    return picked


def preprocess_video(frames_FHWC, config: FvdConfig = FvdConfig()) -> torch.Tensor:
    """One uint8 video (F, H, W, 3) -> I3D input (3, T, 224, 224) float32 in [-1, 1]."""
    x_FCHW = select_frames(frames_FHWC, config).permute(0, 3, 1, 2).float()  # values 0..255, as the original
    if config.crop == "center":
        height, width = x_FCHW.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x_FCHW = x_FCHW[:, :, top:top + side, left:left + side]
    size = (I3D_INPUT_SIZE, I3D_INPUT_SIZE)
    if config.resize == "tf1":
        x_FCHW = resize_bilinear_tf1(x_FCHW, size)
    else:
        x_FCHW = F.interpolate(x_FCHW, size=size, mode="bilinear", align_corners=False, antialias=False)
    x_FCHW = 2.0 * x_FCHW / 255.0 - 1.0
    return x_FCHW.permute(1, 0, 2, 3).contiguous()


@torch.no_grad()
def i3d_features(model: I3D, videos: Iterable, config: FvdConfig = FvdConfig(), batch_size: int = 4,
                 device: str | torch.device | None = None) -> np.ndarray:
    """I3D averaged logits (N, 400) float64, one row per uint8 video (F, H, W, 3) of `videos`.

    `videos` is any iterable of videos (or a uint8 array (N, F, H, W, 3)); consecutive videos of the same
    preprocessed shape are batched `batch_size` at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    rows: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush():
        if pending:
            rows.append(model(torch.stack(pending).to(device)).double().cpu().numpy())
            pending.clear()

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # CUDA convs in full float32 (PyTorch allows TF32 there by default)
    try:
        for video in videos:
            clip_CTHW = preprocess_video(video, config)
            if pending and (len(pending) == batch_size or pending[0].shape != clip_CTHW.shape):
                flush()
            pending.append(clip_CTHW)
        flush()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if not rows:
        raise ValueError("no videos given")
    return np.concatenate(rows)


def gaussian_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divided by N - 1, as tfgan and np.cov) of features (N, D), float64."""
    features = np.asarray(features_ND, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    sigma = (np.asarray(sigma, dtype=np.float64) + np.asarray(sigma, dtype=np.float64).T) / 2.0
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) = tr(sqrtm(S1 S2)) for PSD S1, S2.

    Computed as the nuclear norm (sum of singular values) of S1^1/2 S2^1/2, since (S1^1/2 S2^1/2)(...)^T =
    S1^1/2 S2 S1^1/2: the same quantity tfgan's trace_sqrt_product returns, without the square roots of
    rounding noise in the null space of rank-deficient covariances (N <= D), so FVD(X, X) is 0 to ~1e-12.
    """
    product = sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)
    return float(np.linalg.svd(product, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, clamped at 0."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(distance), 0.0)


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FVD between two feature sets (N, D) and (M, D) (e.g. from `i3d_features`)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


@dataclass
class ReferenceStats:
    """Gaussian statistics of a feature set: mu (D,), sigma (D, D), count N, the feature name and the set's key."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    feature: str
    key: str = ""

    @classmethod
    def from_features(cls, features_ND: np.ndarray, feature: str, key: str = "") -> "ReferenceStats":
        mu, sigma = gaussian_stats(features_ND)
        return cls(mu, sigma, int(np.asarray(features_ND).shape[0]), feature, key)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (mu, sigma, count, feature, key); no pickled objects."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp:        # np.savez appends .npz to a name without it
            np.savez(tmp, mu=self.mu, sigma=self.sigma, count=np.int64(self.count), feature=np.str_(self.feature),
                     key=np.str_(self.key))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, feature: str | None = None) -> "ReferenceStats":
        """Read statistics saved by `save`; ValueError naming the file if it is missing, malformed or (when
        `feature` is given) computed for another feature."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"reference statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                stats = cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["count"]),
                            str(data["feature"]), str(data["key"]))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"malformed reference statistics file {path}: {e}") from e
        dim = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
        if dim < 1 or stats.sigma.shape != (dim, dim) or stats.count < 2:
            raise ValueError(f"malformed reference statistics file {path}: mu {stats.mu.shape}, "
                             f"sigma {stats.sigma.shape}, count {stats.count}")
        if feature is not None and stats.feature != feature:
            raise ValueError(f"reference statistics file {path} holds feature {stats.feature!r}, not {feature!r}")
        return stats

    def fvd(self, other: "ReferenceStats") -> float:
        """FVD between two statistics of the same feature."""
        if self.feature != other.feature:
            raise ValueError(f"cannot compare statistics of {self.feature!r} with {other.feature!r}")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def video_set_key(paths: Sequence[str | os.PathLike], feature: str) -> str:
    """Cache key of a reference set: sha256 over the sorted content hashes of its files and the feature name
    (so renaming or reordering files keeps the key; changing a byte or a preprocessing option changes it)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"reference video file(s) not found: {missing[:3]}")
    hashes = sorted(sha256_file(p) for p in paths)
    return hashlib.sha256(json.dumps({"files": hashes, "feature": feature}).encode()).hexdigest()


def cached_reference_stats(cache_dir: str | os.PathLike, key: str, feature: str,
                           compute_features: Callable[[], np.ndarray]) -> ReferenceStats:
    """Statistics of a reference set from `cache_dir/<key>.npz`, computing (and saving) them on a miss."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        return ReferenceStats.load(path, feature=feature)
    stats = ReferenceStats.from_features(compute_features(), feature, key)
    stats.save(path)
    return stats
