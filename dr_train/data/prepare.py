"""Ingest: videos -> conformed frames -> subject masks -> VAE latents + T5 embeddings -> WebDataset shards.

One call prepares (or extends) a dataset folder. Videos are found per relation (a folder per relation, NTU RGB+D
file names, or the catalog's `videos:` entries), grouped into shards of `samples_per_shard` clips of one
relation, and each shard is built only when it is missing or its inputs changed (a fingerprint of the source
files, the settings and the encoder): a re-run skips finished work, and an interrupted run loses at most the
shard in progress. Decoding and mask import run in worker processes; detection, segmentation and encoding run in
the main process (on the GPU when there is one). A bad video is skipped, counted and logged with its file and
the reason, and recorded in the manifest, or stops the run with `strict`. Concurrent runs on one folder are
serialised by a lock file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dr_train.catalog import Relation
from dr_train.config import PrepareConfig
from dr_train.data import shards as shard_io
from dr_train.data.mask_import import load_mask_folder
from dr_train.data.ntu import is_ntu_name, ntu_relation
from dr_train.data.segment import GroundingSamSegmenter
from dr_train.data.video import VideoSpec, conform_frames, conform_masks, decode_video, plan_conform
from dr_train.masks import latent_masks

log = logging.getLogger("dr_train")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class VideoJob:
    relation: str
    source: str            # video path
    key: str               # sample key in the shards
    prompt: str
    mask_dir: str          # colour-coded PNG folder ("" when none)
    truth: str             # ground-truth JSON of a synthetic clip ("" when none)


@dataclass
class Clip:
    job: VideoJob
    frames: np.ndarray         # uint8 (F, H, W, 3), conformed
    masks: np.ndarray | None   # float32 (F, 2, H, W), conformed; None until segmentation
    fps: float
    boxes: list | None = None  # ground-truth (F, 2, 4) boxes of a synthetic clip, conformed


# ---- finding videos ----------------------------------------------------------------------------------------
def sample_key(relation: str, video: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in video.stem)
    return f"{relation}__{stem}"


def _job(relation: Relation, video: Path, masks_root: Path | None) -> VideoJob:
    caption = video.with_suffix(".txt")
    prompt = caption.read_text().strip() if caption.is_file() else relation.prompt
    candidates = [video.with_name(f"{video.stem}_masks")]
    if masks_root is not None:
        candidates += [masks_root / relation.name / video.stem, masks_root / video.stem]
    mask_dir = next((c for c in candidates if c.is_dir()), None)
    truth = video.with_suffix(".json")
    return VideoJob(relation.name, str(video), sample_key(relation.name, video), prompt,
                    str(mask_dir) if mask_dir else "", str(truth) if truth.is_file() else "")


def _videos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def discover_videos(inputs: list[Path], catalog: dict[str, Relation], layout: str = "auto",
                    relations: list[str] | None = None, masks_root: Path | None = None) -> list[VideoJob]:
    """Jobs for every video of the selected relations under `inputs` (and the catalog's `videos:` folders)."""
    wanted = set(relations) if relations else set(catalog)
    jobs: list[VideoJob] = []
    other_actions = 0
    for root in inputs:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"video folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        use_ntu = layout == "ntu" or (layout == "auto" and files and all(is_ntu_name(p) for p in files))
        if use_ntu:
            for video in files:
                relation = ntu_relation(video, catalog)
                if relation is None:
                    other_actions += 1
                elif relation.name in wanted:
                    jobs.append(_job(relation, video, masks_root))
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith("_masks")):
            if folder.name not in catalog and relations is None:
                raise ValueError(f"{folder}: folder name {folder.name!r} is not a relation of the catalog; add it "
                                 f"to the catalog (name, prompt) or rename the folder")
            if folder.name in wanted:
                jobs += [_job(catalog[folder.name], v, masks_root) for v in _videos_in(folder)]
    for name in sorted(wanted):
        if catalog[name].videos and Path(catalog[name].videos).is_dir():
            jobs += [_job(catalog[name], v, masks_root) for v in _videos_in(Path(catalog[name].videos))]
    if other_actions:
        log.info("ignored %d NTU videos of actions outside the catalog", other_actions)
    keys = [j.key for j in jobs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"two videos map to the same sample key(s) {', '.join(dupes[:5])}: rename one of them")
    return jobs


# ---- one clip ----------------------------------------------------------------------------------------------
def video_spec(cfg: PrepareConfig):
    return VideoSpec(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps, trim=cfg.trim)


def _conform_boxes(boxes_F24: np.ndarray, plan, src_hw: tuple[int, int]) -> list:
    sy, sx = plan.resize_hw[0] / src_hw[0], plan.resize_hw[1] / src_hw[1]
    out = boxes_F24[list(plan.source_indices)].astype(np.float64)
    out[..., [0, 2]] = out[..., [0, 2]] * sx - plan.crop_left
    out[..., [1, 3]] = out[..., [1, 3]] * sy - plan.crop_top
    h, w = plan.out_hw
    out[..., [0, 2]] = out[..., [0, 2]].clip(0, w)
    out[..., [1, 3]] = out[..., [1, 3]].clip(0, h)
    return np.round(out, 2).tolist()


def load_clip(job: VideoJob, cfg: PrepareConfig) -> Clip:
    """Decode and conform one video and, where it has a PNG mask folder, its masks (runs in worker processes)."""
    decoded = decode_video(job.source, cfg.video_backend)
    n, h, w = decoded.frames.shape[:3]
    plan = plan_conform(n, decoded.fps, h, w, video_spec(cfg), job.source)
    frames = conform_frames(decoded.frames, plan)
    masks = None
    use_png = cfg.masks == "png" or (cfg.masks == "auto" and job.mask_dir)
    if use_png:
        if not job.mask_dir:
            raise ValueError(f"{job.source}: no mask folder ({Path(job.source).stem}_masks/ beside the video)")
        clip_masks = load_mask_folder(job.mask_dir, expected_frames=n,
                                      colours=tuple(tuple(int(v) for v in c) for c in cfg.mask_colours))
        if clip_masks.masks.shape[2:] != (h, w):
            raise ValueError(f"{job.mask_dir}: masks are {clip_masks.masks.shape[2:]}, the video {job.source} is "
                             f"{(h, w)}")
        masks = conform_masks(clip_masks.masks, plan)
    boxes = None
    if job.truth:
        truth = json.loads(Path(job.truth).read_text())
        boxes = _conform_boxes(np.asarray(truth["boxes_xyxy"], dtype=np.float32), plan, (h, w))
    return Clip(job, frames, masks, decoded.fps, boxes)


def _try_load(args) -> tuple[Clip | None, str]:
    job, cfg = args
    try:
        return load_clip(job, cfg), ""
    except ValueError as e:          # bad input: reported, never dropped silently
        return None, str(e)


def _preview(frames_FHWC: np.ndarray, masks_F2HW: np.ndarray, count: int, size: int):
    idx = np.linspace(0, len(frames_FHWC) - 1, min(count, len(frames_FHWC))).round().astype(int)
    h, w = frames_FHWC.shape[1:3]
    scale = min(1.0, size / max(h, w))
    ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(frames_FHWC[idx]).permute(0, 3, 1, 2).float()
    m = torch.from_numpy(masks_F2HW[idx]).float()
    x = F.interpolate(x, size=(ph, pw), mode="area") if scale < 1 else x
    m = F.interpolate(m, size=(ph, pw), mode="area") if scale < 1 else m
    return (x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(),
            (m * 255).round().clamp(0, 255).to(torch.uint8).numpy(), idx.tolist())


def build_sample(clip: Clip, encoder, cfg: PrepareConfig) -> shard_io.Sample:
    """Encode one clip (masks already present) into a shard sample."""
    masks = clip.masks
    empty = [s + 1 for s in range(2) if not masks[:, s].any()]
    if empty:
        raise ValueError(f"{clip.job.source}: subject {' and '.join(map(str, empty))} mask is empty in every frame")
    mean, logvar = encoder.encode_video(clip.frames)
    latent = [latent_masks(torch.from_numpy(masks[:, s]), pooling=pooling).numpy().astype(np.float32)
              for pooling in ("mean", "max") for s in range(2)]
    if latent[0].shape != mean.shape[1:]:
        raise ValueError(f"{clip.job.source}: latent masks {latent[0].shape} do not match the VAE latent "
                         f"{mean.shape[1:]}")
    text_embed, text_mask = encoder.encode_text(clip.job.prompt)
    preview, preview_masks, preview_idx = _preview(clip.frames, masks, cfg.preview_frames, cfg.preview_size)
    meta = {"relation": clip.job.relation, "source": clip.job.source, "prompt": clip.job.prompt,
            "frames": int(clip.frames.shape[0]), "height": int(clip.frames.shape[1]),
            "width": int(clip.frames.shape[2]), "fps": float(cfg.fps or clip.fps), "source_fps": clip.fps,
            "version": shard_io.VERSION, "mask_source": clip.job.mask_dir or "grounding_sam",
            "preview_frames": preview_idx, "encoder": encoder.identity()["model"]}
    if clip.boxes is not None:
        meta["truth"] = {"relation": clip.job.relation, "boxes_xyxy": clip.boxes}
    return shard_io.Sample(key=clip.job.key, latent_mean=mean, latent_logvar=logvar, mask_subject1=latent[0],
                           mask_subject2=latent[1], mask_subject1_maxpool=latent[2],
                           mask_subject2_maxpool=latent[3], text_embed=text_embed, text_mask=text_mask, preview=preview,
                           preview_masks=preview_masks, meta=meta)


# ---- the dataset -------------------------------------------------------------------------------------------
@contextmanager
def dataset_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fingerprint(jobs: list[VideoJob], cfg: PrepareConfig, encoder_identity: dict) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "strict")}
    h.update(json.dumps([settings, encoder_identity], sort_keys=True).encode())
    for job in jobs:
        h.update(json.dumps(asdict(job), sort_keys=True).encode())
        for path in (Path(job.source), Path(job.truth) if job.truth else None):
            if path is not None:
                st = path.stat()
                h.update(f"{st.st_size}/{st.st_mtime_ns}".encode())
        if job.mask_dir:
            for p in sorted(Path(job.mask_dir).iterdir()):
                st = p.stat()
                h.update(f"{p.name}/{st.st_size}/{st.st_mtime_ns}".encode())
    return h.hexdigest()


class _Segmenter:
    """Grounding DINO + SAM, loaded on first use (only when some clip has no PNG masks)."""

    def __init__(self, cfg: PrepareConfig, device):
        self.cfg, self.device, self.model = cfg, device, None

    def __call__(self, clip: Clip) -> Clip:
        if self.model is None:
            if not self.cfg.grounding_dino or not self.cfg.sam:
                raise ValueError(f"{clip.job.source}: no PNG mask folder, and prepare.grounding_dino / prepare.sam "
                                 f"are not set to compute masks")
            self.model = GroundingSamSegmenter(self.cfg.grounding_dino, self.cfg.sam, prompt=self.cfg.detection_prompt,
                                               box_threshold=self.cfg.box_threshold,
                                               text_threshold=self.cfg.text_threshold, device=self.device)
        clip.masks = self.model.segment(clip.frames).masks
        return clip


def _clips(jobs: list[VideoJob], cfg: PrepareConfig, pool) -> Iterator[tuple[VideoJob, Clip | None, str]]:
    args = [(job, cfg) for job in jobs]
    results = pool.map(_try_load, args) if pool is not None else map(_try_load, args)
    for job, (clip, error) in zip(jobs, results):
        yield job, clip, error


def prepare_dataset(out: str | Path, jobs: list[VideoJob], cfg: PrepareConfig, encoder) -> dict:
    """Build or extend the dataset at `out` with `jobs`; returns a summary (shards built/kept, samples, skips).
    Detection and segmentation run on the encoder's device."""
    out = Path(out)
    if not jobs:
        raise ValueError("no videos to prepare")
    identity = encoder.identity()
    video = {"frames": cfg.frames, "height": cfg.height, "width": cfg.width, "fps": cfg.fps}
    by_relation: dict[str, list[VideoJob]] = {}
    for job in sorted(jobs, key=lambda j: (j.relation, j.key)):
        by_relation.setdefault(job.relation, []).append(job)
    summary = {"dataset": str(out), "shards_built": 0, "shards_kept": 0, "samples": 0, "skipped": []}
    with dataset_lock(out):
        try:
            manifest = shard_io.load_manifest(out)
        except ValueError:
            if shard_io.manifest_path(out).exists():
                raise
            manifest = shard_io.new_manifest(identity, video)
        if manifest["encoder"] != identity or manifest["video"] != video:
            raise ValueError(f"dataset {out} was prepared with encoder {manifest['encoder']} and clips "
                             f"{manifest['video']}; this run uses {identity} and {video}: choose another folder")
        null_embed, null_mask = encoder.encode_text("")
        manifest["null_text"] = shard_io.NULL_TEXT
        manifest["null_text_sha256"] = shard_io.save_null_text(out, null_embed, null_mask)
        entries = {s["name"]: s for s in manifest["shards"]}
        planned = []
        for relation, rel_jobs in by_relation.items():
            n = cfg.samples_per_shard
            planned += [(relation, f"shards/{relation}-{i // n:06d}.tar", rel_jobs[i:i + n])
                        for i in range(0, len(rel_jobs), n)]
        for name in [name for name, e in entries.items() if e["relation"] in by_relation]:
            if name not in {p[1] for p in planned}:       # the relation now has fewer shards
                del entries[name]
                (out / name).unlink(missing_ok=True)
        segmenter = _Segmenter(cfg, encoder.device)
        # spawned, single-threaded workers: a forked child of a process that already ran torch's OpenMP can hang
        pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(1,)) if cfg.workers > 0 else None
        bar = tqdm(total=len(jobs), desc="prepare", unit="video", dynamic_ncols=True)
        try:
            for relation, name, shard_jobs in planned:
                fp = _fingerprint(shard_jobs, cfg, identity)
                if _intact(out, entries.get(name), fp):
                    summary["shards_kept"] += 1
                    bar.update(len(shard_jobs))
                else:
                    entries[name] = _build_shard(out, name, relation, fp, shard_jobs, cfg, encoder, segmenter,
                                                 pool, bar)
                    summary["shards_built"] += 1
                summary["samples"] += len(entries[name]["samples"])
                summary["skipped"] += entries[name]["skipped"]
                _record(manifest, entries, by_relation)
                shard_io.save_manifest(out, manifest)
            manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            shard_io.save_manifest(out, manifest)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
    if summary["skipped"]:
        log.warning("%d video(s) skipped; the reasons are in %s (\"skipped\")", len(summary["skipped"]),
                    shard_io.manifest_path(out))
    return summary


def _intact(out: Path, entry: dict | None, fingerprint: str) -> bool:
    """A shard built from the same inputs whose file is still there (a shard whose clips were all skipped has
    no file)."""
    if entry is None or entry.get("fingerprint") != fingerprint:
        return False
    if not entry["samples"]:
        return True
    path = out / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"]


def _build_shard(out: Path, name: str, relation: str, fingerprint: str, jobs: list[VideoJob], cfg: PrepareConfig,
                 encoder, segmenter, pool, bar) -> dict:
    """Decode, mask and encode the shard's clips and write it; bad clips are logged and listed in the entry."""
    samples, skipped = [], []
    for job, clip, error in _clips(jobs, cfg, pool):
        if clip is not None:
            try:
                if clip.masks is None:
                    clip = segmenter(clip)
                samples.append(build_sample(clip, encoder, cfg))
            except ValueError as e:
                error = str(e)
        if error:
            if cfg.strict:
                raise ValueError(error if job.source in error else f"{job.source}: {error}")
            log.warning("skipped %s: %s", job.source, error)
            skipped.append({"source": job.source, "relation": relation, "reason": error})
        bar.update(1)
    entry = {"name": name, "relation": relation, "fingerprint": fingerprint, "skipped": skipped, "samples": [],
             "bytes": 0, "sha256": None}
    if samples:
        entry |= shard_io.write_shard(out / name, samples)
    else:
        (out / name).unlink(missing_ok=True)
    return entry


def _record(manifest: dict, entries: dict[str, dict], by_relation: dict[str, list[VideoJob]]) -> None:
    """Shards, per-relation counts and the skipped-video list of the manifest, from the shard entries."""
    manifest["shards"] = [entries[name] for name in sorted(entries)]
    manifest["skipped"] = [s for e in manifest["shards"] for s in e["skipped"]]
    for relation, jobs in by_relation.items():
        mine = [e for e in manifest["shards"] if e["relation"] == relation]
        manifest["relations"][relation] = {"samples": sum(len(e["samples"]) for e in mine),
                                           "shards": [e["name"] for e in mine if e["samples"]],
                                           "prompts": sorted({j.prompt for j in jobs})}
