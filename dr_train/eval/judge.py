"""Programmatic relation judge for the built-in synthetic relations: the offline, deterministic relation accuracy.

From a video's frames alone it finds the two subjects, follows them over time and names the relation whose motion
template they match best (definitions and measured accuracy: docs/metrics_relation.md):

1. background: the synthetic background is a smooth vertical gradient, so a trimmed least-squares quadratic in y
   through the rows' median colours models it (rows where the subjects cover over half the width are trimmed as
   outliers); foreground = pixels farther than `threshold` (RGB distance, 0-255) from their row's background.
2. subjects: the two subjects have distinct saturated hues; the foreground pixels' hue directions are split by a
   deterministic 2-means on the hue circle (fitted on the clearly coloured pixels, chroma >= 0.35 x the
   foreground's 90th percentile, since greyish mp4 / blur fringes have random hues), each cluster cleaned of specks
   and one-pixel fringes (chroma subsampling of mp4s), and per frame each cluster is one detection. Where the hues
   do not separate (cluster centres under `min_hue_separation` = 20 degrees apart), the detections are the frame's
   connected components.
3. identities: colour clusters keep their identity over time (frames where one is missing are interpolated);
   connected components are linked by `dr_train.data.tracking.track_two_subjects`. Either way subject 1 is the
   left one in the first frame that shows both (the tracker's convention).
4. feature: per frame and subject the centre (median pixel; robust to a thin arm) as x / W and y / H, and how far
   the subject's box reaches left, right, up and down of it in units of min(H, W); resampled to `steps` points of
   normalised time. It splits into motion (each channel minus its mean over time) and layout (those means).
5. classification: nearest template. Templates are the same features of `render_clip` renders of every relation
   (indices 0..templates_per_relation-1 at seed `template_seed`, mirrored renders flipped back with the renderer's
   flag). Distance = mean squared motion difference + `static_weight` x mean squared layout difference, the smaller
   of the clip as seen and of its mirror image (x -> 1 - x, reaches left <-> right, subjects swapped so the left
   one is subject 1 again). A relation's score is minus the distance to its nearest template.

The layout weighs little, so the order of the frames carries the decision: shuffling a clip's frames in time turns
its motion into jitter that matches no relation (tests: >= 0.9 accuracy on unseen renders at other resolutions and
frame counts and after an mp4 round trip; near chance on time-shuffled clips).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dr_train.data.synthetic import RELATIONS, render_clip
from dr_train.data.tracking import track_two_subjects

CHANNELS = ("x", "y", "reach_left", "reach_right", "reach_up", "reach_down")   # per subject and frame
_BACKGROUND_FRAMES = 8              # frames sampled for the per-row background median
_BACKGROUND_TOLERANCE = 6.0         # row medians within this RGB distance of the fitted gradient always count
_CLUSTER_SAMPLES = 4096             # foreground pixels the colour 2-means is fitted on
_FIT_CHROMA = 0.35                  # the colour 2-means is fitted on pixels with this fraction of the foreground's
                                    # 90th-percentile chroma or more: greyish fringes (mp4, blur) have random hues
MIN_HUE_SEPARATION = 20.0           # degrees between the two hue clusters' centres for colour identities: two
                                    # subjects of one world kind are 31-36 apart, one colour splits into < 1


def choices(requested: Sequence[str] | None, known: Sequence[str], who: str, known_as: str, noun: str) -> list[str]:
    """The classes a classifier chooses between: `requested` (duplicates dropped, order kept) or all of `known`;
    ValueError naming `who` when one is unknown or fewer than two remain."""
    names = list(known) if requested is None else list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{who} knows only {known_as}; unknown: {', '.join(unknown)}")
    if len(names) < 2:
        raise ValueError(f"{who} needs at least two {noun} to choose between, got {names}")
    return names


class SubjectsNotFound(ValueError):
    """The video does not show two separable subjects."""


@dataclass
class SubjectTracksXY:
    """The two tracked subjects of a video (subject 1 = the left one where both were first seen)."""
    boxes_F24: np.ndarray        # float64 xyxy pixels
    centres_F22: np.ndarray      # float64 median pixel x, y
    found_F2: np.ndarray         # bool: detected in this frame (False: interpolated or coasted)
    height: int
    width: int


# ------------------------------------------------------------------------------------------ segmentation

def _check_frames(frames_FHWC) -> np.ndarray:
    frames = np.asarray(frames_FHWC)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"the judge needs (F, H, W, 3) frames with F >= 2, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"the judge needs uint8 frames, got {frames.dtype}")
    return frames


def supported(mask_FHW: np.ndarray, neighbours: int = 3) -> np.ndarray:
    """The pixels of the mask with at least `neighbours` of their 8 neighbours also in it: drops specks and the
    one-pixel colour fringes that chroma subsampling leaves along edges, keeps structures >= 2 pixels thick."""
    padded = np.pad(mask_FHW, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    h, w = mask_FHW.shape[1:]
    count = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1))
    return mask_FHW & (count >= neighbours)


def background_rows(frames_FHWC: np.ndarray, degree: int = 2, rounds: int = 3) -> np.ndarray:
    """(H, 3) background colour per row: a trimmed least-squares polynomial in y through the rows' median colours.

    A row's median is the background wherever the subjects cover less than half of it; rows where they cover more
    (an arm level with both bodies) are outliers of the smooth vertical gradient and are trimmed away."""
    frames = _check_frames(frames_FHWC)
    n, h, w, _ = frames.shape
    sample = frames[np.unique(np.linspace(0, n - 1, min(n, _BACKGROUND_FRAMES)).round().astype(int))]
    median_H3 = np.median(sample.transpose(1, 0, 2, 3).reshape(h, -1, 3).astype(np.float32), axis=1)
    y_H = np.linspace(-1.0, 1.0, h)
    design_HD = np.stack([y_H ** d for d in range(degree + 1)], axis=1)
    keep_H = np.ones(h, dtype=bool)
    fit_H3 = median_H3
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(design_HD[keep_H], median_H3[keep_H], rcond=None)
        fit_H3 = design_HD @ coef
        residual_H = np.sqrt(((median_H3 - fit_H3) ** 2).sum(axis=1))
        spread = 1.4826 * float(np.median(residual_H[keep_H]))
        keep_H = residual_H <= max(3.0 * spread, _BACKGROUND_TOLERANCE)
        if keep_H.sum() <= degree + 1:
            break
    return fit_H3


def foreground_masks(frames_FHWC: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """(F, H, W) bool: pixels farther than `threshold` (RGB, 0-255) from the background colour of their row."""
    frames = _check_frames(frames_FHWC)
    difference = frames.astype(np.float32) - background_rows(frames)[None, :, None, :]
    distance_FHW = np.sqrt(np.einsum("fhwc,fhwc->fhw", difference, difference))
    return distance_FHW > threshold


def chroma_vectors(pixels_N3: np.ndarray) -> np.ndarray:
    """(N, 2) opponent colour axes R - (G+B)/2 and sqrt(3)/2 (G - B): direction = hue, length = chroma (0-255)."""
    rgb = pixels_N3.astype(np.float32)
    return np.stack([rgb[:, 0] - 0.5 * (rgb[:, 1] + rgb[:, 2]), 0.8660254 * (rgb[:, 1] - rgb[:, 2])], axis=1)


def hue_vectors(pixels_N3: np.ndarray) -> np.ndarray:
    """(N, 2) unit vectors of the pixels' hue angle (opponent colour axes)."""
    vec = chroma_vectors(pixels_N3)
    return vec / np.linalg.norm(vec, axis=1, keepdims=True).clip(min=1e-6)


def two_colour_clusters(vectors_N2: np.ndarray, iterations: int = 10,
                        fit_N: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """2-means of hue vectors, deterministically seeded with the vector farthest from the mean and the one farthest
    from it, fitted on an evenly strided subset of at most _CLUSTER_SAMPLES vectors (of those where the bool `fit_N`
    is set, if given). Returns (labels (N,) of all vectors, angle between the two centres in degrees)."""
    fit_vectors = vectors_N2 if fit_N is None or fit_N.sum() < 2 else vectors_N2[fit_N]
    assert len(fit_vectors) >= 2
    fit_M2 = fit_vectors[::max(1, len(fit_vectors) // _CLUSTER_SAMPLES)]
    first = fit_M2[np.argmax(((fit_M2 - fit_M2.mean(0)) ** 2).sum(1))]
    second = fit_M2[np.argmax(((fit_M2 - first) ** 2).sum(1))]
    centres_22 = np.stack([first, second])
    for _ in range(iterations):
        labels_M = np.argmax(fit_M2 @ centres_22.T, axis=1)
        for k in range(2):
            if (labels_M == k).any():
                mean = fit_M2[labels_M == k].mean(0)
                centres_22[k] = mean / max(float(np.linalg.norm(mean)), 1e-6)
    cosine = float(np.clip(centres_22[0] @ centres_22[1], -1.0, 1.0))
    return np.argmax(vectors_N2 @ centres_22.T, axis=1), float(np.degrees(np.arccos(cosine)))


def connected_components(mask_HW: np.ndarray) -> np.ndarray:
    """(H, W) int labels of 4-connected foreground components (0 = background, labels 1..n, not consecutive)."""
    h, w = mask_HW.shape
    big = h * w + 1
    labels = np.where(mask_HW, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask_HW, neighbours, big)
        if np.array_equal(updated, labels):
            return np.where(mask_HW, labels, 0)
        labels = updated


@dataclass
class Detections:
    """One frame's candidate subjects."""
    boxes_N4: np.ndarray      # float64 xyxy pixels
    centres_N2: np.ndarray    # float64 median x, y of the detection's pixels (robust to a thin arm)
    pixels_N: np.ndarray      # float64 pixel counts (the tracker's scores)
    colours_N: np.ndarray     # int64 colour cluster (0 or 1) of each detection; -1 for connected components
    masks_NHW: np.ndarray | None = None   # bool pixels of each detection (detect_subjects(with_masks=True))


def _detection(mask_HW: np.ndarray) -> tuple[list[float], list[float], float]:
    ys, xs = np.nonzero(mask_HW)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return box, [float(np.median(xs)) + 0.5, float(np.median(ys)) + 0.5], float(len(xs))


def detect_subjects(frames_FHWC: np.ndarray, threshold: float = 40.0, min_pixels: int | None = None,
                    min_hue_separation: float = MIN_HUE_SEPARATION, with_masks: bool = False) -> list[Detections]:
    """Per frame: one detection per colour cluster, or the connected components where the foreground's hues do not
    split into two clusters at least `min_hue_separation` degrees apart. Parts under `min_pixels` (default 0.2 % of
    the frame) are dropped. `with_masks` keeps each detection's pixels (`Detections.masks_NHW`)."""
    frames = _check_frames(frames_FHWC)
    n, h, w, _ = frames.shape
    min_pixels = max(4, int(round(h * w * 0.002))) if min_pixels is None else min_pixels
    fg_FHW = foreground_masks(frames, threshold)
    if fg_FHW.sum() >= 2:
        chroma_N2 = chroma_vectors(frames[fg_FHW])
        chroma_N = np.linalg.norm(chroma_N2, axis=1)
        strong_N = chroma_N >= _FIT_CHROMA * np.percentile(chroma_N, 90)
        labels_N, separation = two_colour_clusters(chroma_N2 / chroma_N[:, None].clip(min=1e-6), fit_N=strong_N)
    else:
        labels_N, separation = np.zeros(int(fg_FHW.sum()), dtype=np.int64), 0.0
    cluster_FHW = np.full(fg_FHW.shape, -1, dtype=np.int64)
    cluster_FHW[fg_FHW] = labels_N
    colour_mode = separation >= min_hue_separation
    if colour_mode:
        clean_KFHW = np.stack([supported(cluster_FHW == k) for k in range(2)])
    else:
        clean_KFHW = supported(fg_FHW)[None]
    out = []
    for f in range(n):
        if colour_mode:
            parts = [clean_KFHW[k, f] for k in range(2)]
        else:
            comp_HW = connected_components(clean_KFHW[0, f])
            parts = [comp_HW == c for c in np.unique(comp_HW[comp_HW > 0])]
        found = [(_detection(part), k if colour_mode else -1) for k, part in enumerate(parts)
                 if part.sum() >= min_pixels]
        kept = [part for part in parts if part.sum() >= min_pixels]
        out.append(Detections(np.array([d[0] for d, _ in found], dtype=np.float64).reshape(-1, 4),
                              np.array([d[1] for d, _ in found], dtype=np.float64).reshape(-1, 2),
                              np.array([d[2] for d, _ in found], dtype=np.float64),
                              np.array([k for _, k in found], dtype=np.int64),
                              np.array(kept, dtype=bool).reshape(-1, h, w) if with_masks else None))
    return out


def _colour_identities(detections: list[Detections]) -> np.ndarray:
    """(F, 2) detection indices when each detection is one colour cluster: the cluster is the identity, subject 1
    the cluster on the left in the first frame that shows both (the tracker's convention); -1 where absent."""
    by_colour_F2 = np.full((len(detections), 2), -1, dtype=np.int64)
    for f, d in enumerate(detections):
        for i, k in enumerate(d.colours_N):
            by_colour_F2[f, k] = i
    both = np.flatnonzero((by_colour_F2 >= 0).all(axis=1))
    if not len(both):
        raise SubjectsNotFound(f"no frame among {len(detections)} shows both colour clusters; cannot identify two "
                               f"subjects")
    anchor = detections[both[0]]
    x_left = [anchor.centres_N2[by_colour_F2[both[0], k], 0] for k in range(2)]
    return by_colour_F2 if x_left[0] <= x_left[1] else by_colour_F2[:, ::-1].copy()


def _fill_missing(values_FK: np.ndarray, found_F: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of the rows where the subject was not found (held constant at the ends)."""
    frames = np.arange(len(values_FK))
    return np.stack([np.interp(frames, frames[found_F], values_FK[found_F, k]) for k in range(values_FK.shape[1])],
                    axis=1)


def track_subjects(frames_FHWC: np.ndarray, threshold: float = 40.0,
                   min_hue_separation: float = MIN_HUE_SEPARATION) -> SubjectTracksXY:
    """Detect the two subjects and keep their identities: by colour cluster where the hues separate (missing frames
    interpolated), else by `track_two_subjects` on the connected components (missing frames coasted).
    SubjectsNotFound when no frame shows two subjects."""
    frames = _check_frames(frames_FHWC)
    detections = detect_subjects(frames, threshold, min_hue_separation=min_hue_separation)
    return _track(detections, frames.shape)[0]


def track_subject_masks(frames_FHWC: np.ndarray, threshold: float = 40.0,
                        min_hue_separation: float = MIN_HUE_SEPARATION) -> tuple[SubjectTracksXY, np.ndarray]:
    """`track_subjects` plus (F, 2, H, W) bool: each tracked subject's detected pixels per frame (all False where it
    was not detected), in the tracks' subject order. SubjectsNotFound when no frame shows two subjects."""
    frames = _check_frames(frames_FHWC)
    detections = detect_subjects(frames, threshold, min_hue_separation=min_hue_separation, with_masks=True)
    tracks, indices_F2 = _track(detections, frames.shape)
    masks_F2HW = np.zeros((len(frames), 2) + frames.shape[1:3], dtype=bool)
    for f, d in enumerate(detections):
        for s in range(2):
            if indices_F2[f, s] >= 0:
                masks_F2HW[f, s] = d.masks_NHW[indices_F2[f, s]]
    return tracks, masks_F2HW


def _track(detections: list[Detections], shape: tuple) -> tuple[SubjectTracksXY, np.ndarray]:
    """The tracks and the (F, 2) detection index of each subject per frame (-1: not detected)."""
    n = len(detections)
    if all((d.colours_N >= 0).all() for d in detections):
        indices_F2 = _colour_identities(detections)
        boxes_F24 = np.zeros((n, 2, 4))
        centres_F22 = np.zeros((n, 2, 2))
        for s in range(2):
            found = indices_F2[:, s] >= 0
            rows = [(d.boxes_N4[i], d.centres_N2[i]) if i >= 0 else (np.zeros(4), np.zeros(2))
                    for d, i in zip(detections, indices_F2[:, s])]
            boxes_F24[:, s] = _fill_missing(np.stack([r[0] for r in rows]), found)
            centres_F22[:, s] = _fill_missing(np.stack([r[1] for r in rows]), found)
    else:
        try:
            tracks = track_two_subjects([d.boxes_N4 for d in detections], [d.pixels_N for d in detections])
        except ValueError as e:
            raise SubjectsNotFound(str(e)) from None
        indices_F2 = tracks.indices_F2
        boxes_F24 = tracks.boxes_F24.astype(np.float64)
        centres_F22 = (boxes_F24[..., :2] + boxes_F24[..., 2:]) / 2     # coasted frames: the predicted box's centre
        for f, d in enumerate(detections):
            for s in range(2):
                if indices_F2[f, s] >= 0:
                    centres_F22[f, s] = d.centres_N2[indices_F2[f, s]]
    return SubjectTracksXY(boxes_F24, centres_F22, indices_F2 >= 0, int(shape[1]), int(shape[2])), indices_F2


# ------------------------------------------------------------------------------------------ features

def subject_features(subjects: SubjectTracksXY, steps: int) -> np.ndarray:
    """(steps, 2, 6): per subject its centre (median pixel) x / W and y / H, and how far its box reaches left,
    right, up and down of that centre in units of min(H, W), over normalised time (linear interpolation).

    Positions are fractions of the frame (how relations are laid out), reaches are in units of the frame's shorter
    side (how subject sizes and arms scale), so the features agree across resolutions and aspect ratios."""
    b, c = subjects.boxes_F24, subjects.centres_F22
    scale = float(min(subjects.height, subjects.width))
    feat_F26 = np.stack([c[..., 0] / subjects.width, c[..., 1] / subjects.height,
                         (c[..., 0] - b[..., 0]) / scale, (b[..., 2] - c[..., 0]) / scale,
                         (c[..., 1] - b[..., 1]) / scale, (b[..., 3] - c[..., 1]) / scale], axis=-1)
    t_src = np.linspace(0.0, 1.0, len(feat_F26))
    t_dst = np.linspace(0.0, 1.0, steps)
    flat = feat_F26.reshape(len(feat_F26), -1)
    out = np.stack([np.interp(t_dst, t_src, flat[:, k]) for k in range(flat.shape[1])], axis=1)
    return out.reshape(steps, 2, len(CHANNELS))


def mirror_features(feat_T26: np.ndarray) -> np.ndarray:
    """The features of the mirror-image video: x -> 1 - x, left and right reaches swapped, and the subjects swapped
    so that the left one comes first again."""
    out = feat_T26[:, ::-1].copy()
    out[..., 0] = 1.0 - out[..., 0]
    out[..., [2, 3]] = out[..., [3, 2]]
    return out


def _split(feat_T26: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    static = feat_T26.mean(axis=0)
    return feat_T26 - static, static


# ------------------------------------------------------------------------------------------ the judge

class RelationJudge:
    """Nearest-template classifier of the synthetic relations from a video's frames.

    relations: names among `dr_train.data.synthetic.RELATIONS` (default: all 26).
    frames, size: frame count and (height, width) of the template renders (judged videos may have others).
    templates_per_relation, template_seed: which renders make the templates (render indices 0..n-1 at that seed).
    steps: time samples of the feature; static_weight: weight of the layout term; threshold: foreground distance;
    min_hue_separation: degrees between the two hue clusters for colour identities (else connected components).
    """

    def __init__(self, relations: Sequence[str] | None = None, frames: int = 25, size: tuple[int, int] = (96, 160),
                 templates_per_relation: int = 6, template_seed: int = 1009, steps: int = 32,
                 static_weight: float = 0.05, threshold: float = 40.0,
                 min_hue_separation: float = MIN_HUE_SEPARATION):
        names = choices(relations, RELATIONS, "the judge", "the built-in synthetic relations", "relations")
        if templates_per_relation < 1 or steps < 2 or static_weight < 0:
            raise ValueError(f"templates_per_relation must be >= 1, steps >= 2 and static_weight >= 0, got "
                             f"{templates_per_relation}, {steps}, {static_weight}")
        self.relations = names
        self.steps = steps
        self.static_weight = static_weight
        self.threshold = threshold
        self.min_hue_separation = min_hue_separation
        height, width = size
        motion, static, owner = [], [], []
        for relation in names:
            for index in range(templates_per_relation):
                clip = render_clip(relation, index, frames, height, width, template_seed)
                feat = subject_features(track_subjects(clip.frames, threshold, min_hue_separation), steps)
                m, s = _split(mirror_features(feat) if clip.mirrored else feat)
                motion.append(m)
                static.append(s)
                owner.append(relation)
        self.motion_KT26 = np.stack(motion)
        self.static_K26 = np.stack(static)
        self.owner_K = np.array(owner)

    def features(self, frames_FHWC: np.ndarray) -> np.ndarray:
        """(steps, 2, 6) features of a video (SubjectsNotFound when two subjects cannot be found)."""
        return subject_features(track_subjects(frames_FHWC, self.threshold, self.min_hue_separation), self.steps)

    def distances(self, feat_T26: np.ndarray) -> np.ndarray:
        """(K,) distance to every template: the smaller of the clip's and its mirror image's."""
        best = None
        for view in (feat_T26, mirror_features(feat_T26)):
            m, s = _split(view)
            d = ((self.motion_KT26 - m) ** 2).mean(axis=(1, 2, 3)) + \
                self.static_weight * ((self.static_K26 - s) ** 2).mean(axis=(1, 2))
            best = d if best is None else np.minimum(best, d)
        return best

    def classify(self, frames_FHWC: np.ndarray) -> tuple[str | None, dict[str, float]]:
        """(relation, {relation: score}) with score = minus the distance to the relation's nearest template;
        (None, {}) when the video does not show two separable subjects."""
        try:
            feat = self.features(frames_FHWC)
        except SubjectsNotFound:
            return None, {}
        d_K = self.distances(feat)
        scores = {r: -float(d_K[self.owner_K == r].min()) for r in self.relations}
        return max(scores, key=scores.get), scores


def judge_accuracy(judge: RelationJudge, videos: Iterable[np.ndarray], labels: Sequence[str]) -> dict:
    """Accuracy of the judge on videos (uint8 (F, H, W, 3) each) with known relations: {accuracy, correct, total,
    undetected, per_relation {label: {correct, total}}, predictions, labels}. Videos where no two subjects are found
    count as wrong and are reported as `undetected`; videos and labels must have the same length."""
    labels = list(labels)
    if not labels:
        raise ValueError("judge_accuracy needs at least one video")
    unknown = sorted(set(labels) - set(judge.relations))
    if unknown:
        raise ValueError(f"labels outside the judge's relations: {', '.join(unknown)}")
    predictions: list[str | None] = []
    per_relation: dict[str, dict[str, int]] = {}
    for video, label in zip(videos, labels, strict=True):
        predicted, _ = judge.classify(video)
        predictions.append(predicted)
        row = per_relation.setdefault(label, {"correct": 0, "total": 0})
        row["total"] += 1
        row["correct"] += int(predicted == label)
    correct = sum(p == l for p, l in zip(predictions, labels))
    return {"accuracy": correct / len(labels), "correct": correct, "total": len(labels),
            "undetected": sum(p is None for p in predictions), "per_relation": per_relation,
            "predictions": predictions, "labels": labels}
