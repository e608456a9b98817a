"""Which kinds of the synth world (`dr_train.data.world`) a video shows: subject fidelity, offline and deterministic.

The relation judge (`dr_train.eval.judge`) finds and follows the two subjects; `KindClassifier` then names each
one's kind from its pixels (definitions and measured accuracy: docs/metrics_relation.md):

1. subjects: `judge.track_subject_masks`, the judge's own segmentation and identities (hue clusters, or connected
   components where the hues do not separate), gives each subject's pixels per frame.
2. body: per frame the subject's mask is opened (eroded, then dilated) with a square of 2 round(0.03 min(H, W)) + 1
   pixels (5 at 64 px, 7 at 96 px), which removes the arm bars (about 0.06 min(H, W) thick: 4 rows at 64 px) and
   keeps the body (>= 0.11 min(H, W) thick, even lying).
3. feature per subject (medians over the frames where the body is seen, so that crouching, lying, an occluded
   frame or an extended arm move it little): hue (the chroma-weighted mean opponent-axis hue of the body's interior,
   as a unit vector), median saturation and value of the interior, the fractions of it clearly darker (band, cap
   textures) and clearly paler (belly) than its 90th percentile, and of the body's box: log aspect (height /
   width), fill (pixels / box area), how low its mass sits in the box (triangles), size (sqrt(pixels) / min(H, W)).
4. classification: nearest kind centroid, each feature divided by its pooled within-kind spread (at least
   `SPREAD_FLOOR`, the nuisance blur and noise add) and the hue weighed `hue_weight` times. Centroids: the features
   of `render_world_clip` renders of every ordered kind pair (motions cycling over the relations and generic
   motions) at `template_seed`, a seed the evaluations never use.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dr_train.data.world import KINDS, MOTIONS, render_world_clip
from dr_train.eval.judge import MIN_HUE_SEPARATION, SubjectsNotFound, choices, track_subject_masks

FEATURES = ("hue_cos", "hue_sin", "saturation", "value", "dark", "pale", "log_aspect", "fill", "mass_low", "size")
# Least spread each feature is divided by: the nuisance a blurry, noisy generation adds beyond the clean renders'
# own within-kind spread (one pixel of blur on the body's box at 64 px, texture edges, noise).
SPREAD_FLOOR = (0.05, 0.05, 0.05, 0.05, 0.08, 0.08, 0.1, 0.05, 0.03, 0.02)


def _shift_reduce(mask_FHW: np.ndarray, k: int, reduce) -> np.ndarray:
    """Min (erosion) or max (dilation) of the mask over a k x k square around each pixel (outside counts False)."""
    r = k // 2
    padded = np.pad(mask_FHW, ((0, 0), (r, r), (r, r)))
    h, w = mask_FHW.shape[1:]
    return reduce([padded[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)])


def open_mask(mask_FHW: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening with a k x k square: drops every part thinner than k pixels."""
    return _shift_reduce(_shift_reduce(mask_FHW, k, np.logical_and.reduce), k, np.logical_or.reduce)


def _colour_stats(pixels_N3: np.ndarray) -> list[float]:
    rgb = pixels_N3.astype(np.float64)
    a = rgb[:, 0] - 0.5 * (rgb[:, 1] + rgb[:, 2])
    b = 0.8660254 * (rgb[:, 1] - rgb[:, 2])
    angle = np.arctan2(b.sum(), a.sum())                      # chroma-weighted mean hue
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    value = high / 255.0
    saturation = (high - low) / np.maximum(high, 1.0)
    dark = (value < 0.8 * np.percentile(value, 90)).mean()                # band / cap textures: darker
    pale = (saturation < 0.75 * np.percentile(saturation, 90)).mean()     # belly texture: whiter
    return [float(np.cos(angle)), float(np.sin(angle)), float(np.median(saturation)), float(np.median(value)),
            float(dark), float(pale)]


def subject_features(frames_FHWC: np.ndarray, mask_FHW: np.ndarray) -> np.ndarray | None:
    """(len(FEATURES),) features of one subject from its per-frame pixels; None when its body is never seen."""
    n, h, w = mask_FHW.shape
    side = min(h, w)
    k = 2 * int(round(0.03 * side)) + 1
    body_FHW = open_mask(mask_FHW, k)
    interior_FHW = body_FHW & _shift_reduce(mask_FHW, 3, np.logical_and.reduce)
    seen = body_FHW.reshape(n, -1).sum(1) >= max(4, int(0.002 * h * w))
    if not seen.any():
        return None
    colour_pixels = frames_FHWC[interior_FHW] if interior_FHW.sum() >= 8 else frames_FHWC[body_FHW]
    shape_rows = []
    for f in np.flatnonzero(seen):
        ys, xs = np.nonzero(body_FHW[f])
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        shape_rows.append([np.log(bh / bw), len(ys) / (bh * bw), (ys.mean() - ys.min() + 0.5) / bh - 0.5,
                           np.sqrt(len(ys)) / side])
    return np.array(_colour_stats(colour_pixels) + list(np.median(np.array(shape_rows), axis=0)))


class KindClassifier:
    """Nearest-centroid classifier of the world's kinds of the two subjects of a video.

    kinds: the kinds to choose between (default: all of `world.KINDS`); frames, size: frame count and (height,
    width) of the template renders; template_seed: their seed (evaluations must use others); hue_weight: extra
    weight of the two hue features; threshold, min_hue_separation: the judge's segmentation parameters.
    """

    def __init__(self, kinds: Sequence[str] | None = None, frames: int = 13, size: tuple[int, int] = (64, 64),
                 template_seed: int = 7919, hue_weight: float = 2.0, threshold: float = 40.0,
                 min_hue_separation: float = MIN_HUE_SEPARATION):
        names = choices(kinds, list(KINDS), "the kind classifier", "the world's kinds", "kinds")
        self.kinds = names
        self.threshold = threshold
        self.min_hue_separation = min_hue_separation
        rows, owners = [], []
        pairs = [(a, b) for a in names for b in names]
        for i, pair in enumerate(pairs):
            clip = render_world_clip(MOTIONS[i % len(MOTIONS)], pair, i, frames, size[0], size[1], template_seed)
            for s in range(2):
                feat = subject_features(clip.frames, clip.masks[:, s] > 0)
                if feat is not None:
                    rows.append(feat)
                    owners.append(pair[s])
        feats_NK = np.stack(rows)
        owners_N = np.array(owners)
        self.centroids_KD = np.stack([feats_NK[owners_N == k].mean(0) for k in names])
        residual = feats_NK - self.centroids_KD[[names.index(o) for o in owners]]
        self.spread_D = np.maximum(np.sqrt((residual ** 2).mean(0)), SPREAD_FLOOR)
        self.weight_D = np.where(np.isin(FEATURES, ("hue_cos", "hue_sin")), hue_weight, 1.0)

    def subjects(self, frames_FHWC: np.ndarray) -> list[np.ndarray] | None:
        """The two subjects' features (judge's subject order: the left one first), or None when not found."""
        try:
            _, masks_F2HW = track_subject_masks(frames_FHWC, self.threshold, self.min_hue_separation)
        except SubjectsNotFound:
            return None
        feats = [subject_features(np.asarray(frames_FHWC), masks_F2HW[:, s]) for s in range(2)]
        return None if any(f is None for f in feats) else feats

    def kind_of(self, feat_D: np.ndarray) -> str:
        d_K = ((((self.centroids_KD - feat_D) / self.spread_D) * self.weight_D) ** 2).sum(axis=1)
        return self.kinds[int(np.argmin(d_K))]

    def classify(self, frames_FHWC: np.ndarray) -> list[str] | None:
        """The two subjects' kinds (the judge's subject order), or None when two subjects are not found."""
        feats = self.subjects(frames_FHWC)
        return None if feats is None else [self.kind_of(f) for f in feats]

    def subject_fidelity(self, frames_FHWC: np.ndarray, kinds_prompted: Sequence[str]) -> bool:
        """Whether the video shows exactly the prompted two kinds, in either order."""
        prompted = list(kinds_prompted)
        unknown = [k for k in prompted if k not in KINDS]
        if len(prompted) != 2 or unknown:
            raise ValueError(f"kinds_prompted must be two of the world's kinds, got {prompted}")
        found = self.classify(frames_FHWC)
        return found is not None and sorted(found) == sorted(prompted)

    def shows_person(self, frames_FHWC: np.ndarray) -> bool:
        """Whether either subject is a person (the exemplars' kind leaking into a generation)."""
        found = self.classify(frames_FHWC)
        return found is not None and "person" in found


def kind_accuracy(classifier: KindClassifier, videos, kinds: Sequence[Sequence[str]]) -> dict:
    """Per-subject accuracy over videos with known kind pairs, order-free per video: {accuracy, correct, total,
    undetected, confusions {true: {predicted: count}}}. An undetected video counts both its subjects wrong."""
    correct = total = undetected = 0
    confusions: dict[str, dict[str, int]] = {}
    for video, truth in zip(videos, kinds, strict=True):
        truth = list(truth)
        total += 2
        found = classifier.classify(video)
        if found is None:
            undetected += 1
            continue
        straight = sum(p == t for p, t in zip(found, truth))
        crossed = sum(p == t for p, t in zip(found[::-1], truth))
        order = found if straight >= crossed else found[::-1]
        correct += max(straight, crossed)
        for t, p in zip(truth, order):
            row = confusions.setdefault(t, {})
            row[p] = row.get(p, 0) + 1
    if not total:
        raise ValueError("kind_accuracy needs at least one video")
    return {"accuracy": correct / total, "correct": correct, "total": total, "undetected": undetected,
            "confusions": confusions}
