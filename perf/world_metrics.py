"""How well the programmatic metrics read the synth world (`dr_train.data.world`): relation judge and kind classifier.

On clips no template uses (seed 0, indices >= 100), at each size, for three versions of every clip:
clean; through an mp4 (H.264 yuv420, `write_mp4` / `decode_video`); and degraded like a lossy 8x VAE would
(area-downsample by `--factor`, bilinear upsample back, Gaussian noise of sigma `--noise`, 0-255). Reports

* the judge's relation accuracy on relation clips of two different non-person kinds (the pairs of
  `world.eval_kinds`) and on person + person clips (`world.exemplar_clip`);
* the kind classifier's per-subject accuracy on those and on generic corpus clips (`world.corpus_clip`);
* the judge's predictions on the corpus clips (no relation: the distribution should not pile onto one relation).

Writes perf/results/world_metrics.json (with the CPU, the git hash and the settings).

    python perf/world_metrics.py                                  # 4 clips per relation, 104 corpus clips
    python perf/world_metrics.py --sizes 64 --per-relation 2 --out /tmp/world_metrics.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import device_name, git_hash  # noqa: E402
from dr_train.data.synthetic import RELATIONS  # noqa: E402
from dr_train.data.video import decode_video, write_mp4  # noqa: E402
from dr_train.data.world import corpus_clip, eval_kinds, exemplar_clip, render_world_clip  # noqa: E402
from dr_train.eval.judge import RelationJudge, judge_accuracy  # noqa: E402
from dr_train.eval.kinds import KindClassifier, kind_accuracy  # noqa: E402


def degrade(frames_FHWC: np.ndarray, factor: int = 2, noise: float = 4.0, seed: int = 0) -> np.ndarray:
    """Area-downsample by `factor`, bilinear upsample back, add Gaussian noise (sigma in 0-255 units)."""
    x = torch.from_numpy(frames_FHWC).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    x = F.interpolate(F.avg_pool2d(x, factor, ceil_mode=True), size=(h, w), mode="bilinear", align_corners=False)
    x = x.permute(0, 2, 3, 1).numpy() + np.random.default_rng(seed).normal(0.0, noise, frames_FHWC.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def mp4_round_trip(frames_FHWC: np.ndarray, folder: Path, name: str) -> np.ndarray:
    return decode_video(write_mp4(frames_FHWC, folder / f"{name}.mp4", fps=24)).frames


def clip_sets(size: int, frames: int, per_relation: int, corpus: int) -> dict[str, list]:
    """name -> [(video_id, frames, relation or None, kinds)]."""
    mixed, person = [], []
    for relation in RELATIONS:
        for i in range(per_relation):
            index = 100 + i
            pair = eval_kinds(relation)[(i + 3 * RELATIONS.index(relation)) % 10]
            for out, clip in ((mixed, render_world_clip(relation, pair, index, frames, size, size, seed=0)),
                              (person, exemplar_clip(relation, index, 0, frames, size, size))):
                out.append((clip.video_id, clip.frames, relation, clip.kinds))
    generic = [corpus_clip(100 + i, 0, frames, size, size) for i in range(corpus)]
    return {"mixed_kinds": mixed, "person_person": person,
            "corpus": [(c.video_id, c.frames, None, c.kinds) for c in generic]}


def measure(judge: RelationJudge, classifier: KindClassifier, sets: dict, tmp: Path, factor: int, noise: float):
    out = {}
    for condition in ("clean", "mp4", "degraded"):
        row = {}
        for name, clips in sets.items():
            videos = []
            for k, (video_id, frames, _, _) in enumerate(clips):
                if condition == "mp4":
                    frames = mp4_round_trip(frames, tmp, video_id)
                elif condition == "degraded":
                    frames = degrade(frames, factor, noise, seed=k)
                videos.append(frames)
            kinds = [c[3] for c in clips]
            kind = kind_accuracy(classifier, videos, kinds)
            entry = {"clips": len(clips), "kind_accuracy": round(kind["accuracy"], 4),
                     "kind_undetected": kind["undetected"],
                     "kind_confusions": {t: {p: n for p, n in r.items() if p != t}
                                         for t, r in kind["confusions"].items() if any(p != t for p in r)}}
            if clips[0][2] is not None:
                judged = judge_accuracy(judge, videos, [c[2] for c in clips])
                entry |= {"judge_accuracy": round(judged["accuracy"], 4), "judge_undetected": judged["undetected"],
                          "judge_errors": [f"{label}->{pred}" for label, pred in
                                           zip(judged["labels"], judged["predictions"]) if label != pred]}
            else:
                predictions = [judge.classify(v)[0] for v in videos]
                counts = collections.Counter(str(p) for p in predictions)
                entry |= {"judge_predictions": dict(counts.most_common()),
                          "judge_top_share": round(counts.most_common(1)[0][1] / len(videos), 4),
                          "judge_distinct": len(counts)}
            row[name] = entry
            print(f"{condition:9s} {name:14s} " + " ".join(f"{k}={v}" for k, v in entry.items()
                                                          if not isinstance(v, (dict, list))), flush=True)
        out[condition] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,96", help="square frame sizes, comma-separated")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--per-relation", type=int, default=4)
    parser.add_argument("--corpus", type=int, default=104)
    parser.add_argument("--factor", type=int, default=2, help="degradation: area-downsample factor")
    parser.add_argument("--noise", type=float, default=4.0, help="degradation: Gaussian noise sigma (0-255)")
    parser.add_argument("--out", default=str(REPO / "perf" / "results" / "world_metrics.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    judge, classifier = RelationJudge(), KindClassifier()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            sets = clip_sets(size, args.frames, args.per_relation, args.corpus)
            print(f"--- {args.frames} x {size} x {size}", flush=True)
            results[f"{args.frames}x{size}x{size}"] = measure(judge, classifier, sets, Path(tmp), args.factor,
                                                              args.noise)
    report = {"device": device_name(torch.device("cpu")), "git": git_hash(), "seconds": round(time.perf_counter() - t0),
              "settings": vars(args) | {"judge": "RelationJudge() defaults", "kinds": "KindClassifier() defaults"},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
