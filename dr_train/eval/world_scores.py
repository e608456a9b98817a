"""The synth world's metrics of generated videos: offline, deterministic, with 95 % bootstrap intervals.

Per video, from its pixels and the prompt that made it (`WorldScorer.score`):
* relation_accuracy: the relation judge's top-1 over the 26 relations equals the relation the prompt asks for
  (a video where the judge finds no two subjects counts as wrong);
* subject_fidelity: the kind classifier finds two subjects whose kinds are exactly the prompt's two kinds (order
  free; a prompt naming no world kind is not scored);
* appearance_leakage: the kind classifier finds a `person` although the prompt names none (the failure direct
  LoRA fine-tuning shows in the paper); prompts naming a person are not scored;
* temporal_consistency: the mean cosine similarity of consecutive frames' pixels, each frame centred on its own
  mean colour (1 = frames change only by a constant; the paper's metric on CLIP features, here on pixels).

`bootstrap` resamples videos, or whole clusters of them (a training run: relation x training seed), with
replacement; the interval is the 2.5 and 97.5 percentiles of the resampled means.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from dr_train.data.world import kinds_in
from dr_train.eval.judge import RelationJudge
from dr_train.eval.kinds import KindClassifier

METRICS = ("relation_accuracy", "subject_fidelity", "appearance_leakage", "temporal_consistency")


def temporal_consistency(frames_FHWC: np.ndarray) -> float:
    frames = np.asarray(frames_FHWC, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"temporal consistency needs (F, H, W, C) frames with F >= 2, got {frames.shape}")
    x = frames.reshape(len(frames), -1, frames.shape[-1])
    x = (x - x.mean(axis=1, keepdims=True)).reshape(len(frames), -1)
    norms = np.linalg.norm(x, axis=1).clip(min=1e-9)
    return float(np.mean(np.sum(x[1:] * x[:-1], axis=1) / (norms[1:] * norms[:-1])))


class WorldScorer:
    """The relation judge and the kind classifier (their templates take seconds to build: `scorer()` keeps one)."""

    def __init__(self):
        self.judge, self.kinds = RelationJudge(), KindClassifier()

    def score(self, frames_FHWC: np.ndarray, relation: str | None, prompt: str) -> dict:
        predicted = self.judge.classify(frames_FHWC)[0]
        found = self.kinds.classify(frames_FHWC)
        prompted = kinds_in(prompt)
        return {
            "judge_prediction": predicted,
            "relation_accuracy": None if relation is None else float(predicted == relation),
            "kinds_found": found,
            "subject_fidelity": None if prompted is None else float(found is not None
                                                                    and sorted(found) == sorted(prompted)),
            "appearance_leakage": None if prompted is None or "person" in prompted
            else float(found is not None and "person" in found),
            "temporal_consistency": temporal_consistency(frames_FHWC),
        }


@functools.lru_cache(maxsize=1)
def scorer() -> WorldScorer:
    return WorldScorer()


def bootstrap(values: Sequence[float | None], clusters: Sequence | None = None, resamples: int = 2000,
              seed: int = 0, level: float = 0.95) -> dict:
    """{mean, ci_low, ci_high, n}: the mean of the scored values and its percentile bootstrap interval, resampling
    videos or, with `clusters` (one label per value), whole clusters. None values are left out."""
    keep = [i for i, v in enumerate(values) if v is not None]
    if not keep:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    vals = np.asarray([values[i] for i in keep], dtype=np.float64)
    labels = np.asarray([clusters[i] for i in keep] if clusters is not None else np.arange(len(keep)), dtype=object)
    groups = [vals[labels == g] for g in dict.fromkeys(labels.tolist())]
    sums = np.array([g.sum() for g in groups])
    counts = np.array([len(g) for g in groups])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return {"mean": float(vals.mean()), "ci_low": float(np.percentile(means, tail)),
            "ci_high": float(np.percentile(means, 100 - tail)), "n": int(len(vals))}


def summarise(records: Sequence[dict], cluster_key: str | None = None) -> dict[str, dict]:
    """{metric: bootstrap summary} over per-video records holding the METRICS (and `cluster_key`, if given)."""
    clusters = [r[cluster_key] for r in records] if cluster_key else None
    return {m: bootstrap([r.get(m) for r in records], clusters) for m in METRICS}
