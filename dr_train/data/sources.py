"""Where the trainer's data comes from: a prepared dataset folder, or the built-in synthetic relations, which are
rendered, ingested (the same path as user videos) and sharded on first use."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch

from dr_train.base_identity import ENCODER_PARTS, base_identity
from dr_train.catalog import Relation, catalog_for
from dr_train.config import Config
from dr_train.data import world
from dr_train.data.encode import ClipEncoder
from dr_train.data.prepare import discover_videos, prepare_dataset
from dr_train.data.shards import VERSION, load_manifest
from dr_train.data.synthetic import patterns_digest, render_clip, write_synthetic_videos
from dr_train.geometry import video_frames, video_size
from dr_train.model import load_mochi

log = logging.getLogger("dr_train")


def make_encoder(cfg: Config, device: torch.device | str | None = None) -> ClipEncoder:
    """VAE + T5 of `model.preset` (the transformer is not loaded)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    comps = load_mochi(cfg.model.preset, cfg.model.dtype, max_text_tokens=cfg.model.max_text_tokens,
                       parts=("vae", "text_encoder"))
    return ClipEncoder(comps.vae, comps.text_encoder, comps.tokenizer, comps.max_text_tokens, comps.source, device,
                       vae_tiling=cfg.prepare.vae_tiling, base=base_identity(cfg.model.preset, ENCODER_PARTS))


# clip size (latent frames, height, width) of the built-in synthetic data when data.latent_* are 0
NATIVE_LATENT_SIZE = {"tiny": (3, 8, 8), "synth": (5, 8, 8)}
WORLD_EXEMPLAR_SEED = 0          # the synth world's exemplars are one fixed set, whatever the training seed


def synthetic_latent_size(cfg: Config) -> tuple[int, int, int]:
    """data.latent_frames/height/width, each 0 meaning the preset's native size (synth: the 25 x 64 x 64 clips
    its base was pretrained on; tiny and folders: 3 x 8 x 8)."""
    d = cfg.data
    native = NATIVE_LATENT_SIZE.get(cfg.model.preset, NATIVE_LATENT_SIZE["tiny"])
    return (d.latent_frames or native[0], d.latent_height or native[1], d.latent_width or native[2])


def synthetic_renderer(cfg: Config):
    """What draws a synthetic clip: the synth world's `person` exemplars for the synth preset (one fixed set),
    else the built-in relation renderer."""
    if cfg.model.preset != "synth":
        return render_clip

    def exemplar(relation, index, frames, height, width, seed):
        return world.exemplar_clip(relation, index, WORLD_EXEMPLAR_SEED, frames, height, width)
    return exemplar


def synthetic_prepare_config(cfg: Config):
    """The prepare settings of the synthetic dataset: clip size from data.latent_*, PNG masks, no resampling."""
    frames, height, width = synthetic_latent_size(cfg)             # latent sizes
    prep = copy.deepcopy(cfg.prepare)
    prep.frames, (prep.height, prep.width) = video_frames(frames), video_size(height, width)
    prep.fps, prep.masks, prep.layout, prep.video_backend = 30.0, "png", "folders", "pyav"
    prep.strict, prep.workers = True, 0
    return prep


RENDERER_PROBES = ("handshaking", "walking_apart", "hugging")     # clips whose pixels fingerprint the renderer


def renderer_digest(cfg: Config) -> str:
    """A digest of what the synthetic renderer draws at the cache's clip size (one clip of each RENDERER_PROBES
    relation, pixels and masks): part of the cache's key, so that clips rendered before the renderer, a kind's look
    or the world's tracks changed are not reused. Milliseconds."""
    prep, render = synthetic_prepare_config(cfg), synthetic_renderer(cfg)
    h = hashlib.sha256()
    for relation in RENDERER_PROBES:
        clip = render(relation, 0, prep.frames, prep.height, prep.width, cfg.train.seed)
        h.update(clip.frames.tobytes())
        h.update(clip.masks.tobytes())
    return h.hexdigest()[:12]


def synthetic_dataset_dir(cfg: Config) -> Path:
    d = cfg.data
    seed = WORLD_EXEMPLAR_SEED if cfg.model.preset == "synth" else cfg.train.seed
    # the encoders' identity, not the preset's name: a retrained synth VAE or T5 makes other latents
    key = json.dumps([base_identity(cfg.model.preset, ENCODER_PARTS), cfg.model.max_text_tokens,
                      d.videos_per_relation, *synthetic_latent_size(cfg), seed, VERSION, patterns_digest(),
                      renderer_digest(cfg)])
    return Path(d.cache_dir) / f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_synthetic_dataset(cfg: Config, relations: list[Relation]) -> Path:
    """The synthetic dataset with every relation in `relations`, generating what is missing."""
    root = synthetic_dataset_dir(cfg)
    names = [r.name for r in relations]
    try:
        have = load_manifest(root)["relations"]
    except ValueError:
        have = {}
    missing = [n for n in names if have.get(n, {}).get("samples", 0) < cfg.data.videos_per_relation]
    if not missing:
        return root
    prep = synthetic_prepare_config(cfg)
    log.info("generating synthetic clips of %s into %s", ", ".join(missing), root)
    videos = write_synthetic_videos(root / "videos", missing, cfg.data.videos_per_relation, prep.frames,
                                    prep.height, prep.width, fps=prep.fps, seed=cfg.train.seed,
                                    render=synthetic_renderer(cfg))
    catalog = {**catalog_for(cfg), **{r.name: r for r in relations}}    # earlier runs' folders are relations too
    jobs = discover_videos([videos], catalog, "folders", relations=missing)
    prepare_dataset(root, jobs, prep, make_encoder(cfg, "cpu"))
    return root


def resolve_dataset(cfg: Config, relations: list[Relation]) -> Path:
    """The dataset folder the trainer reads, checked to hold every relation it will train."""
    if cfg.data.source == "synthetic":
        return ensure_synthetic_dataset(cfg, relations)
    root = Path(cfg.data.source)
    manifest = load_manifest(root)
    missing = [r.name for r in relations if not manifest["relations"].get(r.name, {}).get("samples")]
    if missing:
        raise ValueError(f"dataset {root} has no samples of {', '.join(missing)} (it holds "
                         f"{', '.join(sorted(manifest['relations'])) or 'nothing'}); prepare them with "
                         f"launch/prepare.py")
    return root


def check_dataset_matches_model(root: Path, transformer, preset: str) -> None:
    """The dataset's latent channels and text embedding width must be what the transformer takes, and its latents
    and text embeddings must come from `preset`'s VAE and T5 (datasets prepared before encoders were identified
    record no `base` and are taken as made by them)."""
    enc = load_manifest(root)["encoder"]
    base = base_identity(preset, ENCODER_PARTS)
    if enc.get("base", base) != base:
        raise ValueError(f"dataset {root} was encoded by the VAE and T5 of base {enc['base']} ({enc['model']}); "
                         f"model.preset {preset!r} has encoders {base}: prepare the videos again into another "
                         f"folder with this model.preset")
    cfg = transformer.config
    if int(enc["latent_channels"]) != int(cfg.in_channels) or int(enc["text_dim"]) != int(cfg.text_embed_dim):
        raise ValueError(f"dataset {root} holds {enc['latent_channels']}-channel latents and {enc['text_dim']}-wide "
                         f"text embeddings (encoded with {enc['model']}); the transformer takes {cfg.in_channels} and "
                         f"{cfg.text_embed_dim}: prepare the data with the same model.preset")
