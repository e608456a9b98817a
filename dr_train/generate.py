"""Generate videos with MochiPipeline (Euler flow-matching sampler) and exported relation LoRAs.

`generate` makes one video from one prompt. `generate_batch` makes the evaluation set of a training run: every
finished relation's exported LoRA (relation + ffn adapters; subject LoRAs are never exported) x the relation's
evaluation prompts x seeds, and the same prompts and seeds with the base model (no LoRA) for comparison. The
pipeline is loaded once per process; each relation's LoRA is loaded, used and deleted in turn. Each video's noise
comes from its own generator seeded with the item's seed, so results do not depend on the order of generation.

Layout of a batch (`<run>/eval/videos` by default):

  <out>/<relation>/<prompt_index>_s<seed>/{video.mp4, keyframes.png, generation.json}   LoRA videos
  <out>/_base/<relation>/<prompt_index>_s<seed>/...                                      base model, same prompts
  <out>/index.json                                                                       every item of the batch

An item is written into a temporary folder and renamed into place, generation.json last, so a killed batch
resumes with the items it had finished (a re-run skips them; items made with other settings are redone).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dr_train import fanout
from dr_train.base_identity import PRESETS, base_identity
from dr_train.catalog import catalog_for
from dr_train.cli import one_line_errors
from dr_train.config import ModelConfig, load_config
from dr_train.data.shards import load_manifest
from dr_train.data.sources import synthetic_dataset_dir
from dr_train.data.video import write_mp4
from dr_train.geometry import check_frames, check_size
from dr_train.io import atomic_path, atomic_write_text, read_json, sha256_file
from dr_train.lora_formats import LoraFile, applied_lora_tensors, match_lora, read_lora_file
from dr_train.model import load_mochi
from dr_train.orchestrate import records
from dr_train.plots import keyframe_grid
from dr_train.run_folder import LORA_FILE, RelationFolder
from dr_train.runtime import quiet_library_noise

log = logging.getLogger("dr_train")

BASE = "_base"
INDEX = "index.json"
SAMPLER = "FlowMatchEulerDiscreteScheduler (Mochi's Euler flow-matching sampler)"
PAPER_CLIP = (61, 480, 848)        # frames, height, width of the paper's videos
PRESET_CLIP = {"synth": (25, 64, 64)}  # the clips the synth base was pretrained on


# ------------------------------------------------------------------------------------------ the training run

def config_overrides(mapping: dict, where: str) -> list[str]:
    """A config mapping {section: {option: value}} (a YAML file, a run's config.json) as `section.option=value`
    overrides for `load_config` (values as JSON, which YAML reads back unchanged)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must hold a mapping of config sections, got {type(mapping).__name__}")
    out = []
    for section, options in mapping.items():
        if not isinstance(options, dict):
            raise ValueError(f"{where}: config section {section!r} must be a mapping, got {options!r}")
        out += [f"{section}.{option}={json.dumps(value)}" for option, value in options.items()]
    return out


def relation_config(run_dir: str | Path, relation: str):
    """The Config a relation of a run was trained with (`<run>/<relation>/config.json`)."""
    path = RelationFolder.of(run_dir, relation).config
    data = read_json(path, missing=f"{Path(run_dir) / relation} is not a relation trained by dr_train")
    return load_config(None, config_overrides(data, str(path)))


def run_relations(run_dir: str | Path, relations: Sequence[str] | None = None) -> dict[str, Path]:
    """Finished relations of a training run, name -> folder (with DONE.json and the exported LoRA), sorted by
    name; `relations` picks some of them, and a picked relation without its exported LoRA is a ValueError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"training run folder {run_dir} does not exist")
    if relations is None:
        found = {d.name: d for d in sorted(run_dir.iterdir())
                 if d.is_dir() and RelationFolder(d).done.is_file() and RelationFolder(d).lora_weights.is_file()}
        if not found:
            raise ValueError(f"{run_dir} holds no finished relation (<relation>/DONE.json and "
                             f"<relation>/lora/{LORA_FILE})")
        return found
    out = {}
    for name in dict.fromkeys(relations):
        for needed in (RelationFolder.of(run_dir, name).done, RelationFolder.of(run_dir, name).lora_weights):
            if not needed.is_file():
                raise ValueError(f"relation {name!r} of run {run_dir} is not finished: {needed} is missing")
        out[name] = run_dir / name
    if not out:
        raise ValueError("no relations selected")
    return out


def training_dataset_dir(cfg) -> Path:
    """The dataset folder a run read: the synthetic dataset of its settings, or `data.source`."""
    if cfg.data.source == "synthetic":
        return synthetic_dataset_dir(cfg)
    return Path(cfg.data.source)


def training_clip_size(cfg) -> tuple[int, int, int] | None:
    """(frames, height, width) of the run's training clips from its dataset manifest; None if it is not there."""
    try:
        video = load_manifest(training_dataset_dir(cfg))["video"]
        return int(video["frames"]), int(video["height"]), int(video["width"])
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ sampling

@dataclass(frozen=True)
class SamplerSettings:
    """How every video of a batch is sampled (the paper: 64 Euler steps, CFG 6.0, 61 x 480 x 848 at 30 fps)."""
    steps: int = 64
    guidance_scale: float = 6.0
    num_frames: int = 61
    height: int = 480
    width: int = 848
    fps: int = 30

    def check(self) -> "SamplerSettings":
        if self.steps < 2:
            raise ValueError(f"sampler steps must be >= 2 (Mochi's linear-quadratic schedule), got {self.steps}")
        check_frames(self.num_frames, "num_frames")
        check_size(self.height, self.width)
        if self.fps <= 0 or self.guidance_scale < 0:
            raise ValueError(f"fps must be > 0 and guidance_scale >= 0, got {self.fps}, {self.guidance_scale}")
        return self


# the sampler a preset is used with when none is given: steps, guidance scale, videos per batch (the paper's 64 Euler
# steps at CFG 6.0 one at a time for Mochi-1; the synth base's checks use 32 at CFG 5.0, 8 at a time)
PRESET_SAMPLER = {"synth": (32, 5.0, 8)}
PAPER_SAMPLER = (64, 6.0, 1)


def sampler_defaults(preset: str, steps: int | None, guidance_scale: float | None,
                     batch_size: int | None) -> tuple[int, float, int]:
    d = PRESET_SAMPLER.get(preset, PAPER_SAMPLER)
    return (d[0] if steps is None else steps, d[1] if guidance_scale is None else guidance_scale,
            d[2] if batch_size is None else batch_size)


def load_pipeline(preset: str, device: str | None = None, vae_tiling: bool = False, progress_bar: bool = True):
    """(MochiComponents, MochiPipeline on `device`) for `preset` ('tiny' or a local Mochi-1 folder)."""
    comps = load_mochi(preset)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = comps.pipeline().to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=not progress_bar)
    return comps, pipe


def sample_video(pipe, comps, prompt: str, settings: SamplerSettings, seed: int) -> np.ndarray:
    """uint8 (F, H, W, 3) frames of one video; the initial noise comes from a CPU generator seeded with `seed`."""
    return sample_videos(pipe, comps.max_text_tokens, [prompt], settings, [seed])[0]


def sample_videos(pipe, max_text_tokens: int, prompts: Sequence[str], settings: SamplerSettings,
                  seeds: Sequence[int]) -> np.ndarray:
    """uint8 (B, F, H, W, 3): one video per (prompt, seed), sampled as one batch; each video's initial noise comes
    from its own CPU generator, so it is the video `sample_video` gives for that prompt and seed."""
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"sample_videos needs one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
    out = pipe(list(prompts), num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
               num_frames=settings.num_frames, height=settings.height, width=settings.width,
               max_sequence_length=max_text_tokens, output_type="np",
               generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds])
    frames = np.asarray(out.frames)
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def frames_sha256(frames_FHWC: np.ndarray) -> str:
    """Digest of the decoded frames (before mp4 compression): equal digests = identical videos."""
    frames = np.ascontiguousarray(frames_FHWC)
    return hashlib.sha256(repr(frames.shape).encode() + frames.tobytes()).hexdigest()


def write_outputs(frames_FHWC: np.ndarray, out_dir: Path, fps: int) -> tuple[Path, Path]:
    """video.mp4 and keyframes.png (5 evenly spaced frames) of one video in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_mp4(frames_FHWC, out_dir / "video.mp4", fps=fps), keyframe_grid(frames_FHWC, out_dir / "keyframes.png")


def apply_lora(pipe, lora: str | Path | LoraFile, adapter_name: str, allow_partial: bool = False) -> int:
    """Load the LoRA folder or file `lora` into the pipeline's transformer as `adapter_name`, after checking it
    (lora_formats.read_lora_file, match_lora: a file that loads no LoRA weight, has wrong shapes or, unless
    `allow_partial`, names modules the model lacks is a ValueError naming it). Returns the LoRA tensors applied."""
    lora = lora if isinstance(lora, LoraFile) else read_lora_file(lora)
    state = match_lora(lora, pipe.transformer, allow_partial)
    pipe.load_lora_into_transformer(state, transformer=pipe.transformer, adapter_name=adapter_name,
                                    metadata=lora.adapter_metadata, _pipeline=pipe)
    applied = applied_lora_tensors(pipe.transformer, adapter_name)
    if applied != len(state):
        pipe.delete_adapters(adapter_name)
        raise ValueError(f"LoRA file {lora.path}: diffusers applied {applied} of its {len(state)} matching tensors")
    return applied


def generate(prompt: str, out_dir: Path, lora: str | None = None, preset: str = "tiny", steps: int = 64,
             guidance_scale: float = 6.0, num_frames: int = 61, height: int = 480, width: int = 848,
             seed: int = 0, fps: int = 30, allow_partial_lora: bool = False) -> dict:
    """One video of `prompt` (with the LoRA folder or file `lora`, if given; see `apply_lora`): video.mp4,
    keyframes.png and generation.json in `out_dir`. Returns the metadata written to generation.json, which records
    the LoRA tensors applied (0 without a LoRA)."""
    lora_file = read_lora_file(lora) if lora else None          # a bad file is refused before the model loads
    comps, pipe = load_pipeline(preset)
    applied = apply_lora(pipe, lora_file, "relation_lora", allow_partial_lora) if lora_file else 0
    settings = SamplerSettings(steps, guidance_scale, num_frames, height, width, fps)
    frames = sample_video(pipe, comps, prompt, settings, seed)
    out_dir = Path(out_dir)
    video, grid = write_outputs(frames, out_dir, fps)
    meta = {"prompt": prompt, "lora": str(lora) if lora else None,
            "lora_file": str(lora_file.path) if lora_file else None, "lora_tensors_applied": applied,
            "base_model": comps.source, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
            "frames": int(frames.shape[0]), "video": str(video), "keyframes": str(grid),
            "frames_sha256": frames_sha256(frames)}
    (out_dir / "generation.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------------------------------ batches

@dataclass(frozen=True)
class GenerationItem:
    """One video of a batch. `kind` is "lora" (the relation's LoRA) or "base" (no LoRA, the relation's prompts)."""
    relation: str
    kind: str
    prompt_index: int
    prompt: str
    seed: int
    lora: str | None              # the LoRA folder
    lora_sha256: str | None
    folder: str                   # relative to the batch folder

    def request(self, base_model: str, base: str, settings: SamplerSettings) -> dict:
        """What the item's video depends on: a generation.json with another request is stale. `base` is the base
        model's identity (dr_train.base_identity): a retrained base keeps its preset's name."""
        return {"relation": self.relation, "kind": self.kind, "prompt": self.prompt, "seed": self.seed,
                "lora_sha256": self.lora_sha256, "base_model": base_model, "base_identity": base,
                **asdict(settings)}


def relation_prompts(relation, prompts: str | Sequence[str], num_prompts: int | None = None) -> list[str]:
    """The prompts of a catalog relation: "eval" (its evaluation prompts), "train" (its training prompt) or a
    list (the same prompts for every relation); `num_prompts` keeps the first N."""
    if isinstance(prompts, str):
        if prompts == "eval":
            chosen = list(relation.eval_prompts)
            if not chosen:
                raise ValueError(f"relation {relation.name!r} has no eval_prompts in its catalog; pass prompts="
                                 f"'train' or a list of prompts")
        elif prompts == "train":
            chosen = [relation.prompt]
        else:
            raise ValueError(f"prompts must be 'eval', 'train' or a list of prompts, got {prompts!r}")
    else:
        chosen = [str(p) for p in prompts]
        if not chosen or not all(p.strip() for p in chosen):
            raise ValueError("the prompt list is empty or holds an empty prompt")
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        chosen = chosen[:num_prompts]
    return chosen


def item_complete(out: Path, item: GenerationItem, request: dict) -> bool:
    """The item's folder holds generation.json for the same request, and its video and keyframes."""
    folder = out / item.folder
    try:
        meta = json.loads((folder / "generation.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("request") == request and (folder / "video.mp4").is_file() and \
        (folder / "keyframes.png").is_file()


def _write_item(out: Path, item: GenerationItem, request: dict, frames: np.ndarray, seconds: float,
                device: str, lora_tensors: int) -> None:
    final = out / item.folder
    if final.parent.is_dir():                 # temporary folders of this item left by a killed process (atomic_path)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_path(final) as tmp:
        write_outputs(frames, tmp, request["fps"])
        meta = {"request": request, "relation": item.relation, "kind": item.kind, "prompt_index": item.prompt_index,
                "prompt": item.prompt, "seed": item.seed, "lora": item.lora, "lora_tensors_applied": lora_tensors,
                "sampler": SAMPLER, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                "width": int(frames.shape[2]), "video": "video.mp4", "keyframes": "keyframes.png",
                "frames_sha256": frames_sha256(frames), "seconds": round(seconds, 3), "device": device}
        (tmp / "generation.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)


def generate_group(out: str, preset: str, settings: SamplerSettings, lora: str | None, items: list[GenerationItem],
                   vae_tiling: bool = False) -> int:
    """Generate the pending `items` that share `lora` (None: the base model) into `out` in this process (the body
    of one Ray task). Returns how many videos were made."""
    return _Generator(preset, vae_tiling).run(Path(out), settings, lora, items, lambda _: None)


def base_model_name(preset: str) -> str:
    """How generation.json names the base model (as `load_mochi` does)."""
    return preset if preset in PRESETS else str(Path(preset))


def _adapter_name(relation: str) -> str:
    return f"relation_{relation}"


class _Generator:
    """Runs groups of items in this process on one pipeline, loading and deleting each group's LoRA."""

    def __init__(self, preset: str, vae_tiling: bool, batch_size: int = 1):
        self.preset, self.vae_tiling, self.batch_size = preset, vae_tiling, batch_size
        self.base_model, self.base = base_model_name(preset), base_identity(preset)
        self.comps = self.pipe = None

    def run(self, out: Path, settings: SamplerSettings, lora: str | None, items: list[GenerationItem],
            progress) -> int:
        base_model, base = self.base_model, self.base
        pending = [i for i in items if not item_complete(out, i, i.request(base_model, base, settings))]
        for item in items:
            if item not in pending:
                progress(item)
        if not pending:
            return 0
        if self.pipe is None:
            self.comps, self.pipe = load_pipeline(self.preset, vae_tiling=self.vae_tiling, progress_bar=False)
        name = _adapter_name(items[0].relation)
        applied = apply_lora(self.pipe, lora, name) if lora is not None else 0
        try:
            for start in range(0, len(pending), self.batch_size):
                chunk = pending[start:start + self.batch_size]
                started = time.perf_counter()
                videos = sample_videos(self.pipe, self.comps.max_text_tokens, [i.prompt for i in chunk], settings,
                                       [i.seed for i in chunk])
                seconds = (time.perf_counter() - started) / len(chunk)
                for item, frames in zip(chunk, videos):
                    _write_item(out, item, item.request(base_model, base, settings), frames, seconds,
                                str(self.pipe.device), applied)
                    progress(item)
        finally:
            if lora is not None:
                self.pipe.delete_adapters(name)
        return len(pending)


RAY_GPUS_PER_TASK = 1.0


def _ray_gpus() -> int:
    """GPUs of the Ray cluster: the one at $RAY_ADDRESS, the running one, or a local one started here when this
    machine has CUDA GPUs; 0 without Ray or GPUs (Ray is then not started)."""
    if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
        return 0
    if not fanout.ray_importable():
        log.warning("ray is not installed (pip install -e .[ray]): generating in this process")
        return 0
    fanout.connect()
    return fanout.cluster_gpus()


def _run_with_ray(out: Path, preset: str, settings: SamplerSettings, groups: dict, vae_tiling: bool, bar) -> int:
    """One Ray task per group (one relation's LoRA, or the base model), each on one GPU."""
    jobs = [((str(out), preset, settings, lora, items, vae_tiling), len(items)) for lora, items in groups.items()]
    return sum(fanout.run_tasks(generate_group, jobs, num_gpus=RAY_GPUS_PER_TASK,
                                on_done=lambda made, n: bar.update(n)))


def generate_batch(run_dir: str | Path, relations: Sequence[str] | None = None,
                   prompts: str | Sequence[str] = "eval", seeds: Sequence[int] = (0,), preset: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, num_frames: int | None = None,
                   height: int | None = None, width: int | None = None, fps: int = 30, include_base: bool = True,
                   out_dir: str | Path | None = None, num_prompts: int | None = None, use_ray: bool = False,
                   vae_tiling: bool = False, progress: bool = True, include_lora: bool = True,
                   batch_size: int | None = None) -> dict:
    """Generate a run's evaluation videos (see the module docstring for the layout) and write `<out>/index.json`.

    relations: names of finished relations of the run (default: all of them). prompts: "eval", "train" or a list
    (see `relation_prompts`), the first `num_prompts` of them. preset: the base model (default: the one the run
    trained on). steps / guidance_scale / batch_size: default to the preset's sampler (synth: 32 steps, CFG 5.0, 8
    videos at a time; otherwise the paper's 64 steps, CFG 6.0, one at a time). num_frames / height / width: default
    to the run's training clip size (61 x 480 x 848 when its dataset manifest is not found). use_ray: with Ray and
    GPUs, one task per relation on its own GPU; otherwise (and on CPU) the groups run one after another in this
    process. include_lora=False makes only the base model's videos. batch_size: videos sampled together (each from
    its own seeded noise; more is faster where memory allows). Returns the index (with `generated` and `skipped`
    counts of this call).
    """
    if not (include_lora or include_base):
        raise ValueError("nothing to generate: include_lora and include_base are both off")
    run_dir = Path(run_dir)
    chosen = run_relations(run_dir, relations)
    configs = {name: relation_config(run_dir, name) for name in chosen}
    presets = {cfg.model.preset for cfg in configs.values()}
    chosen_preset = preset is not None
    if preset is None:
        if len(presets) != 1:
            raise ValueError(f"the relations of {run_dir} were trained on different models {sorted(presets)}; "
                             f"pass preset")
        preset = presets.pop()
    if include_lora:
        _check_lora_bases(chosen, preset, strict=not chosen_preset)
    steps, guidance_scale, batch_size = sampler_defaults(preset, steps, guidance_scale, batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first_cfg = next(iter(configs.values()))
    size = training_clip_size(first_cfg) or PAPER_CLIP
    settings = SamplerSettings(steps, guidance_scale, num_frames or size[0], height or size[1], width or size[2],
                               fps).check()
    seeds = [int(s) for s in dict.fromkeys(seeds)]
    if not seeds:
        raise ValueError("no seeds given")
    out = Path(out_dir) if out_dir is not None else run_dir / "eval" / "videos"
    groups: dict[str | None, list[GenerationItem]] = {}
    for name, folder in chosen.items():
        if name == BASE:
            raise ValueError(f"a relation named {BASE!r} ({folder}) would share the base model's video folder")
        catalog = catalog_for(configs[name])
        if name not in catalog:
            raise ValueError(f"relation {name!r} of {run_dir} is not in its catalog "
                             f"{configs[name].data.catalog or 'datasets/relations.yaml'}")
        lora = RelationFolder(folder).lora
        digest = sha256_file(RelationFolder(folder).lora_weights)
        for index, prompt in enumerate(relation_prompts(catalog[name], prompts, num_prompts)):
            for seed in seeds:
                leaf = f"{index:02d}_s{seed}"
                if include_lora:
                    groups.setdefault(str(lora), []).append(
                        GenerationItem(name, "lora", index, prompt, seed, str(lora), digest, f"{name}/{leaf}"))
                if include_base:
                    groups.setdefault(None, []).append(
                        GenerationItem(name, "base", index, prompt, seed, None, None, f"{BASE}/{name}/{leaf}"))
    if None in groups:                                   # the base model first
        groups = {None: groups.pop(None), **groups}
    items = [i for group in groups.values() for i in group]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), desc="generate", unit="video", dynamic_ncols=True, disable=not progress)
    try:
        if use_ray and _ray_gpus() >= 1:
            made = _run_with_ray(out, preset, settings, groups, vae_tiling, bar)
        else:
            if use_ray:
                log.warning("no GPU in the Ray cluster: generating in this process, one relation after another")
            runner = _Generator(preset, vae_tiling, batch_size)
            made = sum(runner.run(out, settings, lora, group, lambda _: bar.update(1))
                       for lora, group in groups.items())
    finally:
        bar.close()
    index = write_index(out, run_dir, preset, settings, items, seeds, prompts, num_prompts)
    return {**index, "generated": made, "skipped": len(items) - made}


def _check_lora_bases(chosen: dict[str, Path], preset: str, strict: bool) -> None:
    """The LoRAs were trained on the base `preset` loads now (their DONE.json's record): a ValueError where not,
    or, where the caller named the preset (a LoRA deliberately applied to another base), a warning."""
    base = base_identity(preset)
    for folder in chosen.values():
        if strict:
            records.check_finished_base(folder, preset, base)
        elif mismatch := records.finished_base_mismatch(folder, preset, base):
            log.warning("%s: applying its LoRA anyway, as the preset was named", mismatch)


def write_index(out: Path, run_dir: Path, preset: str, settings: SamplerSettings, items: list[GenerationItem],
                seeds: list[int], prompts, num_prompts: int | None) -> dict:
    """`<out>/index.json`: the batch's settings and every item with its files (paths relative to `out`)."""
    rows = []
    for item in items:
        meta = json.loads((out / item.folder / "generation.json").read_text())
        rows.append({"relation": item.relation, "kind": item.kind, "prompt_index": item.prompt_index,
                     "prompt": item.prompt, "seed": item.seed, "lora": item.lora, "folder": item.folder,
                     "video": f"{item.folder}/video.mp4", "keyframes": f"{item.folder}/keyframes.png",
                     "generation": f"{item.folder}/generation.json", "frames_sha256": meta["frames_sha256"]})
    index = {"run_dir": str(run_dir), "base_model": preset, "sampler": SAMPLER, "settings": asdict(settings),
             "prompts": prompts if isinstance(prompts, str) else list(prompts), "num_prompts": num_prompts,
             "seeds": seeds, "relations": sorted({i.relation for i in items}),
             "include_base": any(i.kind == "base" for i in items), "videos": len(rows), "items": rows}
    atomic_write_text(out / INDEX, json.dumps(index, indent=1))
    return index


def load_index(videos_dir: str | Path) -> dict:
    """A batch's index.json; ValueError naming the file when it is missing or malformed."""
    path = Path(videos_dir) / INDEX
    index = read_json(path, missing="generate the videos first (launch/generate.py --run RUN)")
    if not isinstance(index, dict) or not isinstance(index.get("items"), list) or "settings" not in index:
        raise ValueError(f"{path} is not a batch index written by generate_batch")
    return index


# ------------------------------------------------------------------------------------------ command line

def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be a comma list of integers, got {text!r}") from None


def _prompt_spec(text: str) -> str | list[str]:
    if text in ("eval", "train"):
        return text
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--prompts must be 'eval', 'train' or a text file with one prompt per line; {path} "
                         f"does not exist")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} holds no prompts")
    return lines


def add_batch_args(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    """The options of `generate_batch` that launch/generate.py, launch/evaluate.py and launch/ablate.py share
    (`steps_flag` names the sampler-steps option where --steps means something else)."""
    p.add_argument("--prompts", default="eval", help="eval (the catalog's evaluation prompts), train (the training "
                                                     "prompt) or a text file with one prompt per line")
    p.add_argument("--num-prompts", type=int, help="only the first N prompts of each relation")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma list of seeds (default 0)")
    p.add_argument(steps_flag, dest="steps", type=int, default=None,
                   help="Euler sampler steps (default: 64, the paper's; 32 for the synth preset)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: 6.0, the paper's; 5.0 for the synth preset)")
    p.add_argument("--num-frames", type=int, help="frames, 1 + 6k (default: the run's training clip length; "
                                                  "61 with --prompt)")
    p.add_argument("--height", type=int, help="default: the run's training clip height (480 with --prompt)")
    p.add_argument("--width", type=int, help="default: the run's training clip width (848 with --prompt)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--preset", help="'tiny' or a local diffusers Mochi-1 folder (default: the run's model; tiny "
                                    "with --prompt)")
    p.add_argument("--ray", action="store_true", help="one Ray task per relation on its own GPU (needs GPUs)")
    p.add_argument("--vae-tiling", action="store_true", help="decode with the VAE's tiling (less GPU memory)")
    p.add_argument("--batch-size", type=int, default=None, help="videos sampled together (default 1; 8 for the "
                                                                "synth preset; more is faster where memory allows)")


def batch_kwargs(a: argparse.Namespace) -> dict:
    """`generate_batch` keyword arguments from the options of `add_batch_args`."""
    return {"prompts": _prompt_spec(a.prompts), "num_prompts": a.num_prompts, "seeds": a.seeds, "preset": a.preset,
            "steps": a.steps, "guidance_scale": a.guidance_scale, "num_frames": a.num_frames, "height": a.height,
            "width": a.width, "fps": a.fps, "use_ray": a.ray, "vae_tiling": a.vae_tiling, "batch_size": a.batch_size}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate videos (mp4 + keyframe grid) with exported relation LoRAs: "
                                            "one prompt (--prompt) or a whole training run (--run).")
    p.add_argument("--prompt", help="one prompt: generate a single video")
    p.add_argument("--lora", help="with --prompt: folder (or file) written by training's export: <run>/<relation>/lora")
    p.add_argument("--allow-partial-lora", action="store_true",
                   help="with --lora: load a LoRA some of whose modules are not in the model (the rest are "
                        "skipped, and listed), instead of refusing it")
    p.add_argument("--seed", type=int, default=0, help="with --prompt: the seed")
    p.add_argument("--run", help="a training run folder: every finished relation x its prompts x seeds, + base model")
    p.add_argument("--relations", help="with --run: comma list of relations (default: all finished ones)")
    p.add_argument("--no-base", action="store_true", help="with --run: skip the base model's videos")
    p.add_argument("--output-dir", help="default: runs/generate (--prompt) or <run>/eval/videos (--run)")
    add_batch_args(p)
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    quiet_library_noise()
    if (a.prompt is None) == (a.run is None):
        raise ValueError("give either --prompt (one video) or --run (a training run's evaluation set)")
    if a.prompt is None and (a.lora or a.allow_partial_lora):
        raise ValueError("--lora and --allow-partial-lora go with --prompt; --run uses each relation's exported LoRA")
    if a.prompt is not None:
        preset = a.preset or ModelConfig().preset
        steps, guidance, _ = sampler_defaults(preset, a.steps, a.guidance_scale, 1)
        clip = PRESET_CLIP.get(preset, PAPER_CLIP)
        c = SamplerSettings(steps, guidance, a.num_frames or clip[0], a.height or clip[1], a.width or clip[2],
                            a.fps).check()
        meta = generate(a.prompt, Path(a.output_dir or "runs/generate"), a.lora, preset, c.steps,
                        c.guidance_scale, c.num_frames, c.height, c.width, a.seed, c.fps, a.allow_partial_lora)
        print(json.dumps(meta, indent=1))
        return 0
    relations = [r.strip() for r in a.relations.split(",") if r.strip()] if a.relations else None
    index = generate_batch(a.run, relations, include_base=not a.no_base, out_dir=a.output_dir, **batch_kwargs(a))
    out = Path(a.output_dir) if a.output_dir else Path(a.run) / "eval" / "videos"
    print(f"{index['videos']} videos ({index['generated']} generated, {index['skipped']} already there); "
          f"index: {out / INDEX}")
    return 0
