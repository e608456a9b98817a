"""Ingest: videos -> conformed frames -> subject masks -> VAE latents + T5 embeddings -> WebDataset shards.

One call prepares (or extends) a dataset folder. Videos are found per relation (a folder per relation, NTU RGB+D
file names, or the catalog's `videos:` entries), grouped into shards of `samples_per_shard` clips of one
relation, and each shard is built only when it is missing or one of its clips changed (a fingerprint per clip of
its source files, the settings and the encoder): a re-run skips finished work, and an interrupted run loses at
most the shard in progress. Extending never drops a sample: clips already in the dataset keep their shards, new
clips go into new shards, and the clips a run does not list stay as they are (see `prepare_dataset`). Decoding
and mask import run in worker processes; detection, segmentation and encoding run in the main process (on the
GPU when there is one). A bad video, or a bad file beside it (caption, ground-truth JSON, masks), is skipped,
counted and logged with its file and the reason, and recorded in the manifest, or stops the run with `strict`;
every sample's arrays are checked (shapes, finite values, ranges) before they are written. Concurrent runs on one
folder are serialised by a lock file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
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
    problem: str = ""      # why the clip cannot be used, found at discovery (a bad caption file): it is skipped


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


def _caption(video: Path, relation: Relation) -> tuple[str, str]:
    """(prompt, problem): the text of `<clip>.txt` beside the video, else the relation's prompt. A caption file
    that cannot be read or is empty is the clip's problem (the clip is skipped, naming the file), never a
    silently empty prompt."""
    caption = video.with_suffix(".txt")
    if not caption.is_file():
        return relation.prompt, ""
    try:
        text = caption.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return "", f"{caption}: caption file cannot be read as UTF-8 text ({e})"
    if not text:
        return "", (f"{caption}: caption file is empty (write the clip's prompt in it, or remove it to use the "
                    f"relation's prompt)")
    return text, ""


def _job(relation: Relation, video: Path, masks_root: Path | None) -> VideoJob:
    prompt, problem = _caption(video, relation)
    candidates = [video.with_name(f"{video.stem}_masks")]
    if masks_root is not None:
        candidates += [masks_root / relation.name / video.stem, masks_root / video.stem]
    mask_dir = next((c for c in candidates if c.is_dir()), None)
    truth = video.with_suffix(".json")
    return VideoJob(relation.name, str(video), sample_key(relation.name, video), prompt,
                    str(mask_dir) if mask_dir else "", str(truth) if truth.is_file() else "", problem)


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
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith("_masks"))
        strangers = [f.name for f in folders if f.name not in catalog]
        if strangers and relations is None:
            raise ValueError(f"{root / strangers[0]}: folder name {strangers[0]!r} is not a relation of the catalog; "
                             f"add it to the catalog (name, prompt) or rename the folder")
        if strangers:
            log.warning("%s: ignoring %d folder(s) whose names are not catalog relations: %s (rename a folder to its "
                        "relation's catalog name, or add the relation to the catalog)", root, len(strangers),
                        ", ".join(strangers))
        for folder in folders:
            if folder.name in wanted:
                jobs += [_job(catalog[folder.name], v, masks_root) for v in _videos_in(folder)]
    for name in sorted(wanted):
        if catalog[name].videos and Path(catalog[name].videos).is_dir():
            jobs += [_job(catalog[name], v, masks_root) for v in _videos_in(Path(catalog[name].videos))]
    if other_actions:
        log.info("ignored %d NTU videos of actions outside the catalog", other_actions)
    _check_unique_keys(jobs)
    return jobs


def _check_unique_keys(jobs: list[VideoJob]) -> None:
    first: dict[str, VideoJob] = {}
    for job in jobs:
        other = first.setdefault(job.key, job)
        if other is not job:
            raise ValueError(f"{other.source} and {job.source} are both clip {job.key!r} (the same name in one "
                             f"relation): rename one of them")


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
        boxes = _conform_boxes(load_truth_boxes(Path(job.truth), n), plan, (h, w))
    return Clip(job, frames, masks, decoded.fps, boxes)


def load_truth_boxes(path: Path, frames: int) -> np.ndarray:
    """The (frames, 2, 4) ground-truth boxes of `<clip>.json` beside a synthetic clip. A file that is not one of
    ours (not JSON, no 'boxes_xyxy', other sizes) is a ValueError naming it: the clip is skipped, never the
    ingest."""
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the JSON file beside the video is not readable JSON ({e}); move it away from the "
                         f"video or fix it") from None
    if not isinstance(truth, dict) or "boxes_xyxy" not in truth:
        raise ValueError(f"{path}: the JSON file beside the video is not a dr_train ground-truth file (no "
                         f"'boxes_xyxy'); move it away from the video")
    try:
        boxes = np.asarray(truth["boxes_xyxy"], dtype=np.float32)
    except (TypeError, ValueError):
        boxes = np.zeros(0, np.float32)
    if boxes.shape != (frames, 2, 4) or not np.isfinite(boxes).all():
        raise ValueError(f"{path}: 'boxes_xyxy' must hold {frames} frames x 2 subjects x 4 finite numbers, got an "
                         f"array of shape {boxes.shape}")
    return boxes


def _try_load(args) -> tuple[Clip | None, str]:
    job, cfg = args
    if job.problem:
        return None, job.problem
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
    sample = shard_io.Sample(key=clip.job.key, latent_mean=mean, latent_logvar=logvar, mask_subject1=latent[0],
                             mask_subject2=latent[1], mask_subject1_maxpool=latent[2],
                             mask_subject2_maxpool=latent[3], text_embed=text_embed, text_mask=text_mask,
                             preview=preview, preview_masks=preview_masks, meta=meta)
    identity = encoder.identity()
    shard_io.check_sample(sample, clip.job.source, (identity["text_tokens"], identity["text_dim"]),
                          identity["latent_channels"])      # NaN or out-of-range values never reach a shard
    return sample


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


def _hash_inputs(h, job: VideoJob) -> None:
    """The sizes and modification times of a clip's files."""
    for path in (Path(job.source), Path(job.truth) if job.truth else None):
        if path is not None:
            st = path.stat()
            h.update(f"{st.st_size}/{st.st_mtime_ns}".encode())
    if job.mask_dir:
        for p in sorted(Path(job.mask_dir).iterdir()):
            st = p.stat()
            h.update(f"{p.name}/{st.st_size}/{st.st_mtime_ns}".encode())


def _settings(cfg: PrepareConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("workers", "strict")}


def _clip_fingerprint(job: VideoJob, cfg: PrepareConfig, encoder_identity: dict) -> str:
    """What a clip's sample depends on: the job, its files, the settings and the encoder."""
    h = hashlib.sha256(json.dumps([_settings(cfg), encoder_identity, asdict(job)], sort_keys=True).encode())
    _hash_inputs(h, job)
    return h.hexdigest()


def _legacy_fingerprint(jobs: list[VideoJob], cfg: PrepareConfig, encoder_identity: dict) -> str:
    """The one fingerprint of a whole shard that older manifests record (matched once, then per clip)."""
    h = hashlib.sha256()
    h.update(json.dumps([_settings(cfg), encoder_identity], sort_keys=True).encode())
    for job in jobs:
        h.update(json.dumps({k: v for k, v in asdict(job).items() if k != "problem"}, sort_keys=True).encode())
        _hash_inputs(h, job)
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


def prepare_dataset(out: str | Path, jobs: list[VideoJob], cfg: PrepareConfig, encoder, replace: bool = False) -> dict:
    """Build or extend the dataset at `out` with `jobs`; returns a summary of this run's shards (built/kept, their
    samples, their skipped clips). Detection and segmentation run on the encoder's device.

    Extending never drops a sample. A clip already in the dataset stays in its shard, rebuilt only when one of
    this run's clips in it changed (video, masks, caption, ground truth, settings), its other samples carried over
    from the old file after their checksums matched the manifest. New clips go into new shards of their relation,
    and the shards of clips this run does not list are left as they are. A clip whose sample key (relation and
    file stem) is already in the dataset from another video is an error naming both videos; with `replace`
    (`ingest --replace`) the new video takes the old one's place."""
    out = Path(out)
    if not jobs:
        raise ValueError("no videos to prepare")
    _check_unique_keys(jobs)
    identity = encoder.identity()
    video = {"frames": cfg.frames, "height": cfg.height, "width": cfg.width, "fps": cfg.fps}
    summary = {"dataset": str(out), "shards_built": 0, "shards_kept": 0, "samples": 0, "skipped": []}
    with dataset_lock(out):
        manifest, identity = _open_manifest(out, identity, video)
        null_embed, null_mask = encoder.encode_text("")
        manifest["null_text"] = shard_io.NULL_TEXT
        manifest["null_text_sha256"] = shard_io.save_null_text(out, null_embed, null_mask)
        entries = {s["name"]: s for s in manifest["shards"]}
        owners = _owners(entries)
        _check_clashes(out, jobs, owners, replace)
        prompts: dict[str, set[str]] = {}
        for job in jobs:
            prompts.setdefault(job.relation, set()).update([job.prompt] if not job.problem else [])
        segmenter = _Segmenter(cfg, encoder.device)
        # spawned, single-threaded workers: a forked child of a process that already ran torch's OpenMP can hang
        pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(1,)) if cfg.workers > 0 else None
        bar = tqdm(total=len(jobs), desc="prepare", unit="video", dynamic_ncols=True)
        try:
            for relation, name, shard_jobs in _plan_shards(jobs, entries, owners, cfg.samples_per_shard):
                fingerprints = {j.key: _clip_fingerprint(j, cfg, identity) for j in shard_jobs}
                unchanged = _unchanged(entries.get(name), fingerprints, shard_jobs, cfg, identity)
                if _intact(out, entries.get(name), fingerprints, unchanged):
                    entries[name].setdefault("clips", fingerprints)      # an older entry, now per clip
                    summary["shards_kept"] += 1
                    bar.update(len(shard_jobs))
                else:
                    shard = _ShardBuild(out, name, relation, entries.get(name), identity)
                    entries[name] = shard.build(shard_jobs, fingerprints, unchanged, cfg, encoder, segmenter, pool,
                                                bar)
                    summary["shards_built"] += 1
                summary["samples"] += len(entries[name]["samples"])
                summary["skipped"] += entries[name]["skipped"]
                _record(manifest, entries, prompts)
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
    log.info("dataset %s holds %d samples of %d relation(s)", out, sum(len(e["samples"]) for e in manifest["shards"]),
             len({e["relation"] for e in manifest["shards"] if e["samples"]}))
    return summary


def _open_manifest(out: Path, identity: dict, video: dict) -> tuple[dict, dict]:
    """The dataset's manifest (a new one when there is none), checked to match this run's encoder and clips, and the
    encoder identity its fingerprints use: a manifest from before encoders were identified (no `base`) is taken as
    made by this run's encoders and keeps its own identity, so its shards are not encoded again."""
    try:
        manifest = shard_io.load_manifest(out)
    except ValueError:
        if shard_io.manifest_path(out).exists():
            raise
        manifest = shard_io.new_manifest(identity, video)
    recorded = manifest["encoder"]
    if "base" not in recorded and "base" in identity and recorded == {k: v for k, v in identity.items() if k != "base"}:
        log.warning("dataset %s records no encoder identity (prepared by an older version): taken as encoded by "
                    "%s's VAE and T5 (%s)", out, identity["model"], identity["base"])
        identity = recorded
    if recorded != identity or manifest["video"] != video:
        raise ValueError(f"dataset {out} was prepared with encoder {recorded} and clips "
                         f"{manifest['video']}; this run uses {identity} and {video}: choose another folder")
    return manifest, identity


def _skip_key(entry: dict, skip: dict) -> str:
    return skip.get("key") or sample_key(entry["relation"], Path(skip["source"]))


def _owners(entries: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Sample key -> (shard name, source video) of every clip the dataset holds or has skipped."""
    owners = {s["key"]: (name, s.get("source", "")) for name, e in entries.items() for s in e["samples"]}
    for name, e in entries.items():
        for skip in e.get("skipped", []):
            owners.setdefault(_skip_key(e, skip), (name, skip["source"]))
    return owners


def _same_file(a: str, b: str) -> bool:
    if a == b or Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_clashes(out: Path, jobs: list[VideoJob], owners: dict[str, tuple[str, str]], replace: bool) -> None:
    """A clip already in the dataset from another video: an error naming both, unless `replace`."""
    for job in jobs:
        owner = owners.get(job.key)
        if owner is None or _same_file(owner[1], job.source):
            continue
        if not replace:
            raise ValueError(f"{job.source} and {owner[1]} (already in {out / owner[0]}) are both clip {job.key!r}: "
                             f"rename one of them, or ingest with --replace to put the new video in the old one's "
                             f"place")
        log.warning("clip %r: %s replaces %s in %s", job.key, job.source, owner[1], out / owner[0])


def _plan_shards(jobs: list[VideoJob], entries: dict[str, dict], owners: dict[str, tuple[str, str]],
                 per_shard: int) -> list[tuple[str, str, list[VideoJob]]]:
    """(relation, shard name, this run's clips of it): a clip the dataset has goes to its shard, new clips fill
    new shards of `per_shard` clips (names the dataset does not use yet)."""
    mine: dict[str, list[VideoJob]] = {}
    fresh: dict[str, list[VideoJob]] = {}
    for job in sorted(jobs, key=lambda j: (j.relation, j.key)):
        if job.key in owners:
            mine.setdefault(owners[job.key][0], []).append(job)
        else:
            fresh.setdefault(job.relation, []).append(job)
    plan = [(entries[name]["relation"], name, shard_jobs) for name, shard_jobs in sorted(mine.items())]
    for relation, rel_jobs in sorted(fresh.items()):
        index = 0
        for start in range(0, len(rel_jobs), per_shard):
            while f"shards/{relation}-{index:06d}.tar" in entries:
                index += 1
            plan.append((relation, f"shards/{relation}-{index:06d}.tar", rel_jobs[start:start + per_shard]))
            index += 1
    return plan


def _unchanged(entry: dict | None, fingerprints: dict[str, str], jobs: list[VideoJob], cfg: PrepareConfig,
               identity: dict) -> set[str]:
    """This run's clips of a shard that it already holds (or skipped) from the same inputs."""
    if entry is None:
        return set()
    clips = entry.get("clips")
    if clips is None:                # an older manifest: one fingerprint over all the shard's clips
        keys = {s["key"] for s in entry["samples"]} | {_skip_key(entry, s) for s in entry.get("skipped", [])}
        same = set(fingerprints) == keys and entry.get("fingerprint") == _legacy_fingerprint(jobs, cfg, identity)
        return set(fingerprints) if same else set()
    return {key for key, fp in fingerprints.items() if clips.get(key) == fp}


def _intact(out: Path, entry: dict | None, fingerprints: dict[str, str], unchanged: set[str]) -> bool:
    """Nothing to rebuild: every one of this run's clips of the shard is unchanged, and its file is still there
    (a shard whose clips were all skipped has no file)."""
    if entry is None or unchanged != set(fingerprints):
        return False
    return not entry["samples"] or shard_io.shard_file_problem(out / entry["name"], entry) is None


class _ShardBuild:
    """One shard (re)built: this run's new or changed clips encoded, the shard's other samples carried over."""

    def __init__(self, out: Path, name: str, relation: str, old: dict | None, identity: dict):
        self.out, self.name, self.relation, self.identity = out, name, relation, identity
        self.old = old or {"name": name, "relation": relation, "samples": [], "skipped": [], "clips": {}}

    def build(self, jobs: list[VideoJob], fingerprints: dict[str, str], unchanged: set[str], cfg: PrepareConfig,
              encoder, segmenter, pool, bar) -> dict:
        run = {j.key: j for j in jobs}
        keep = lambda key: key not in run or key in unchanged      # noqa: E731  the old shard's record stands
        skipped = [s for s in self.old.get("skipped", []) if keep(_skip_key(self.old, s))]
        skipped_keys = {_skip_key(self.old, s) for s in skipped}
        carried = self._carry({s["key"] for s in self.old["samples"] if keep(s["key"])}, run)
        todo = [j for j in jobs if j.key not in carried and j.key not in skipped_keys]
        bar.update(len(jobs) - len(todo))
        samples, new_skips = self._encode(todo, cfg, encoder, segmenter, pool, bar)
        old_clips = self.old.get("clips") or {}
        members = set(carried) | skipped_keys | set(run)
        entry = {"name": self.name, "relation": self.relation, "skipped": skipped + new_skips, "samples": [],
                 "clips": {k: fingerprints[k] if k in run else old_clips.get(k) for k in sorted(members)},
                 "bytes": 0, "sha256": None}
        samples = sorted([*carried.values(), *samples], key=lambda s: s.key)
        if samples:
            entry |= shard_io.write_shard(self.out / self.name, samples)
        else:
            (self.out / self.name).unlink(missing_ok=True)
        return entry

    def _carry(self, keys: set[str], run: dict[str, VideoJob]) -> dict[str, shard_io.Sample]:
        """The old shard's samples `keys`, checked against its manifest entry. A damaged one is encoded again
        when this run has its video; one it has not stops the run, naming the shard and the sample."""
        if not keys:
            return {}
        path = shard_io.dataset_file(self.out, self.name)
        carried = {s.key: s for s in shard_io.read_shard(
            path, keys, (self.identity["text_tokens"], self.identity["text_dim"]), self.identity["latent_channels"],
            self.old, lambda msg: log.warning("cannot carry a sample over: %s", msg))}
        lost = sorted(k for k in keys - set(carried) if k not in run)
        if lost:
            sources = {s["key"]: s.get("source", "?") for s in self.old["samples"]}
            raise ValueError(f"{path} is damaged and holds sample(s) {', '.join(map(repr, lost))} that this run cannot "
                             f"encode again: add their videos ({', '.join(sources[k] for k in lost)}) to the inputs, "
                             f"or restore the shard (launch/prepare.py verify names the damage)")
        return carried

    def _encode(self, jobs: list[VideoJob], cfg: PrepareConfig, encoder, segmenter, pool,
                bar) -> tuple[list[shard_io.Sample], list[dict]]:
        """Decode, mask and encode clips; bad clips are logged and listed as skipped (or stop the run: strict)."""
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
                skipped.append({"key": job.key, "source": job.source, "relation": self.relation, "reason": error})
            bar.update(1)
        return samples, skipped


def _record(manifest: dict, entries: dict[str, dict], prompts: dict[str, set[str]]) -> None:
    """Shards, per-relation counts and the skipped-video list of the manifest, from the shard entries."""
    manifest["shards"] = [entries[name] for name in sorted(entries)]
    manifest["skipped"] = [s for e in manifest["shards"] for s in e.get("skipped", [])]
    for relation in sorted({e["relation"] for e in manifest["shards"]}):
        mine = [e for e in manifest["shards"] if e["relation"] == relation]
        before = manifest["relations"].get(relation, {}).get("prompts", [])
        manifest["relations"][relation] = {"samples": sum(len(e["samples"]) for e in mine),
                                           "shards": [e["name"] for e in mine if e["samples"]],
                                           "prompts": sorted(set(before) | prompts.get(relation, set()))}
