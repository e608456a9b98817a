"""Stable identities for the two subjects of a clip, from per-frame detections in arbitrary order.

The anchor is the first frame with two distinct detections: its highest-scoring pair of boxes that are
neither duplicates nor nested, subject1 the one with the smaller centre x. From there each subject's box is
predicted with a constant centre velocity and matched to the frame's detections by an exact 2 x N assignment minimising
(1 - IoU) + centroid distance / predicted box diagonal, with implausible matches gated out; frames before the
anchor are tracked the same way backwards. Identities are never re-sorted, so they survive the subjects crossing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SUBJECTS = ("subject1", "subject2")


@dataclass
class SubjectTracks:
    indices_F2: np.ndarray   # int64 index into each frame's detections, -1 where the subject was not found
    boxes_F24: np.ndarray    # float32 xyxy: the matched detection, or the predicted box where not found
    scores_F2: np.ndarray    # float32 detection score, 0 where not found
    anchor_frame: int

    def missing_frames(self) -> dict[str, list[int]]:
        return {name: [int(f) for f in np.flatnonzero(self.indices_F2[:, s] < 0)] for s, name in enumerate(SUBJECTS)}


def _overlap(a_N4, b_M4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, M) intersection areas, (N, 1) areas of a, (1, M) areas of b."""
    a, b = np.asarray(a_N4, dtype=np.float64)[:, None], np.asarray(b_M4, dtype=np.float64)[None]
    w = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    h = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    area = lambda x: (x[..., 2] - x[..., 0]).clip(min=0) * (x[..., 3] - x[..., 1]).clip(min=0)  # noqa: E731
    return w * h, area(a), area(b)


def box_iou(a_N4: np.ndarray, b_M4: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of xyxy boxes."""
    inter, area_a, area_b = _overlap(a_N4, b_M4)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def cover(a_N4: np.ndarray, b_M4: np.ndarray) -> np.ndarray:
    """(N, M) intersection over the smaller box's area: 1 for duplicates and for a box nested in another."""
    inter, area_a, area_b = _overlap(a_N4, b_M4)
    smaller = np.minimum(area_a, area_b)
    return np.where(smaller > 0, inter / np.where(smaller > 0, smaller, 1), 1.0)


def _centre(box_4: np.ndarray) -> np.ndarray:
    return np.array([(box_4[0] + box_4[2]) / 2, (box_4[1] + box_4[3]) / 2])


def anchor_pair(boxes_N4: np.ndarray, scores_N: np.ndarray, max_cover: float) -> tuple[int, int] | None:
    """The highest-scoring pair of detections that are neither duplicates nor nested (a box around both
    subjects), left one first; None if there is no such pair."""
    n = len(boxes_N4)
    if n < 2:
        return None
    allowed = (cover(boxes_N4, boxes_N4) <= max_cover) & np.triu(np.ones((n, n), dtype=bool), k=1)
    if not allowed.any():
        return None
    total = np.where(allowed, scores_N[:, None] + scores_N[None, :], -np.inf)
    i, j = (int(v) for v in np.unravel_index(np.argmax(total), total.shape))
    return (i, j) if _centre(boxes_N4[i])[0] <= _centre(boxes_N4[j])[0] else (j, i)


def match_cost(predicted_24: np.ndarray, boxes_N4: np.ndarray) -> np.ndarray:
    """(2, N): (1 - IoU) + centroid distance normalised by the predicted box's diagonal."""
    iou = box_iou(predicted_24, boxes_N4)
    centres_P2 = (predicted_24[:, :2] + predicted_24[:, 2:]) / 2
    centres_N2 = (boxes_N4[:, :2] + boxes_N4[:, 2:]) / 2
    distance = np.linalg.norm(centres_P2[:, None] - centres_N2[None], axis=-1)
    diagonal = np.linalg.norm(predicted_24[:, 2:] - predicted_24[:, :2], axis=-1).clip(min=1e-6)
    return (1 - iou) + distance / diagonal[:, None]


def assign(cost_2N: np.ndarray, max_cost: float) -> tuple[int, int]:
    """Exact minimum-cost assignment of two tracks to distinct detections (-1: unmatched, costs max_cost)."""
    n = cost_2N.shape[1]
    best, best_key = (-1, -1), (2 * max_cost, 0)
    for i in range(-1, n):
        if i >= 0 and cost_2N[0, i] > max_cost:
            continue
        for j in range(-1, n):
            if j >= 0 and (j == i or cost_2N[1, j] > max_cost):
                continue
            total = (cost_2N[0, i] if i >= 0 else max_cost) + (cost_2N[1, j] if j >= 0 else max_cost)
            key = (total, -((i >= 0) + (j >= 0)))
            if key < best_key:
                best, best_key = (i, j), key
    return best


def _follow(order: list[int], boxes: list[np.ndarray], scores: list[np.ndarray], start_24: np.ndarray,
            max_cost: float, coast_decay: float):
    """Track both subjects through the frames in `order` from their boxes in the frame before.

    Yields (frame, detection indices (2,), boxes (2, 4), scores (2,)).
    """
    box_24 = start_24.astype(np.float64).copy()
    velocity_22 = np.zeros((2, 2))
    for f in order:
        predicted_24 = box_24 + np.tile(velocity_22, 2)
        matched = assign(match_cost(predicted_24, boxes[f]), max_cost) if len(boxes[f]) else (-1, -1)
        score_2 = np.zeros(2)
        for s, d in enumerate(matched):
            if d >= 0:
                velocity_22[s] = _centre(boxes[f][d]) - _centre(box_24[s])
                box_24[s] = boxes[f][d]
                score_2[s] = scores[f][d]
            else:
                box_24[s] = predicted_24[s]
                velocity_22[s] *= coast_decay
        yield f, matched, box_24.copy(), score_2


def _as_detections(boxes_per_frame, scores_per_frame) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if scores_per_frame is None:
        scores_per_frame = [np.ones(len(np.asarray(b).reshape(-1, 4))) for b in boxes_per_frame]
    if len(boxes_per_frame) != len(scores_per_frame):
        raise ValueError(f"got boxes for {len(boxes_per_frame)} frames but scores for {len(scores_per_frame)}")
    if len(boxes_per_frame) == 0:
        raise ValueError("no frames to track")
    boxes, scores = [], []
    for f, (b, s) in enumerate(zip(boxes_per_frame, scores_per_frame)):
        b = np.asarray(b, dtype=np.float64)
        b = b.reshape(0, 4) if b.size == 0 else b
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if b.ndim != 2 or b.shape[1] != 4 or len(s) != len(b):
            raise ValueError(f"frame {f}: expected (N, 4) boxes and (N,) scores, got {b.shape} and {s.shape}")
        if not (np.isfinite(b).all() and np.isfinite(s).all()):
            raise ValueError(f"frame {f}: detections hold non-finite values")
        boxes.append(b)
        scores.append(s)
    return boxes, scores


def track_two_subjects(boxes_per_frame: Sequence, scores_per_frame: Sequence | None = None,
                       max_cover: float = 0.7, max_cost: float = 2.0, coast_decay: float = 0.5) -> SubjectTracks:
    """Identity-stable tracks of two subjects.

    boxes_per_frame[f]: (N_f, 4) xyxy detections in any order (N_f may be 0); scores_per_frame[f]: (N_f,).
    max_cover: at the anchor, two boxes whose intersection covers more than this fraction of the smaller one
        are one subject twice, or a box around both subjects, and are not taken as the pair.
    max_cost: matches costing more are rejected (with no overlap: centre farther than ~1 box diagonal).
    coast_decay: per missing frame, the predicted velocity is multiplied by this.
    """
    boxes, scores = _as_detections(boxes_per_frame, scores_per_frame)
    frames = len(boxes)
    anchor, pair = next(((f, p) for f in range(frames)
                         if (p := anchor_pair(boxes[f], scores[f], max_cover)) is not None), (None, None))
    if anchor is None:
        raise ValueError(f"no frame among {frames} has two distinct detections; cannot identify two subjects")

    indices_F2 = np.full((frames, 2), -1, dtype=np.int64)
    boxes_F24 = np.zeros((frames, 2, 4), dtype=np.float32)
    scores_F2 = np.zeros((frames, 2), dtype=np.float32)
    indices_F2[anchor] = pair
    boxes_F24[anchor] = boxes[anchor][list(pair)]
    scores_F2[anchor] = scores[anchor][list(pair)]
    start_24 = boxes[anchor][list(pair)]
    for order in (range(anchor + 1, frames), range(anchor - 1, -1, -1)):
        for f, matched, box_24, score_2 in _follow(list(order), boxes, scores, start_24, max_cost, coast_decay):
            indices_F2[f], boxes_F24[f], scores_F2[f] = matched, box_24, score_2
    return SubjectTracks(indices_F2=indices_F2, boxes_F24=boxes_F24, scores_F2=scores_F2, anchor_frame=anchor)
