"""Stage 2: fix the latent space and encode the transformer's corpus once.

1. `latents_mean` / `latents_std` of the trained VAE: per channel, over the posterior means of `vae.stats_clips`
   corpus clips, written into the VAE's config (MochiPipeline undoes them before decoding), so the transformer
   trains on unit-variance latents exactly as the trainer normalises its data (`dr_train.data.encode`).
2. The frozen text side: the world-vocabulary tokenizer and the seeded T5 encoder, saved beside the VAE, and the
   embeddings of every corpus caption and of the empty prompt (caption dropout / CFG).
3. The corpus: clips 0 .. corpus_clips-1 encoded in blocks of BLOCK (posterior mean and log-variance in the
   normalised space, float16, and each clip's caption index). A block is written atomically; finished blocks are
   kept on a re-run, so the stage resumes block by block. `run.workers` renders the next clips in worker processes
   while the VAE encodes (`prefetch.Prefetcher`); the VAE and T5 run on `run.device`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLMochi
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dr_train.data import world
from dr_train.data.encode import ClipEncoder
from dr_train.io import atomic_path
from dr_train.model.synth import FRAMES, HEIGHT, TEXT_TOKENS, synth_text_encoder, synth_tokenizer
from dr_train.pretrain.config import PretrainConfig
from dr_train.pretrain.prefetch import Prefetcher

BLOCK = 256
ENCODE_BATCH = 16


def corpus_captions(cfg: PretrainConfig) -> list[str]:
    """Every caption of the corpus, sorted (the caption index of a clip points into this list)."""
    specs = {world.corpus_spec(i, cfg.world.seed) for i in range(cfg.world.corpus_clips)}
    return sorted({world.caption(motion, kinds) for motion, kinds in specs})


def text_side(cfg: PretrainConfig):
    tokenizer = synth_tokenizer()
    t = cfg.text
    encoder = synth_text_encoder(len(tokenizer), cfg.world.seed + 2, t.d_model, t.layers, t.heads, t.d_ff).eval()
    encoder.requires_grad_(False)
    return tokenizer, encoder


def _encoder(vae, cfg: PretrainConfig, device: torch.device) -> ClipEncoder:
    tokenizer, text_encoder = text_side(cfg)
    return ClipEncoder(vae, text_encoder, tokenizer, TEXT_TOKENS, "synth (pretraining)", device)


def render_corpus(first: int, count: int, seed: int, size: int = HEIGHT) -> tuple[np.ndarray, list[str]]:
    """Corpus clips first .. first+count-1 at `size` x `size`: uint8 frames (B, F, H, W, 3) and captions."""
    clips = [world.corpus_clip(i, seed, FRAMES, size, size) for i in range(first, first + count)]
    return np.stack([c.frames for c in clips]), [c.caption for c in clips]


@torch.no_grad()
def latent_statistics(vae, cfg: PretrainConfig, device: torch.device | None = None) -> tuple[list[float], list[float]]:
    means = []
    for start in range(0, cfg.vae.stats_clips, ENCODE_BATCH):
        x, _ = render_corpus(start, min(ENCODE_BATCH, cfg.vae.stats_clips - start), cfg.world.seed, cfg.world.size)
        x = torch.from_numpy(x).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        means.append(vae.encode(x.to(device or "cpu")).latent_dist.mean.double().cpu())
    m = torch.cat(means).transpose(0, 1).reshape(12, -1)
    return m.mean(dim=1).tolist(), m.std(dim=1).tolist()


def _save_atomic(tensors: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def build(cfg: PretrainConfig, out: Path, minutes: float | None, device: torch.device | None = None) -> bool:
    """Run (or continue) the stage; True when the corpus is complete."""
    device = device or torch.device("cpu")
    folder = out / "corpus"
    if (folder / "DONE.json").is_file():
        return True
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "vae" / "config.json").is_file():
        vae = AutoencoderKLMochi.from_pretrained(out / "vae" / "final").to(device).eval()
        mean, std = latent_statistics(vae, cfg, device)
        vae.register_to_config(latents_mean=tuple(mean), latents_std=tuple(std))
        vae.save_pretrained(folder / "vae", safe_serialization=True)
    vae = AutoencoderKLMochi.from_pretrained(folder / "vae").eval()
    encoder = _encoder(vae, cfg, device)
    if not (folder / "text.safetensors").is_file():
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        encoder.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        captions = corpus_captions(cfg)
        embeds, masks = zip(*(encoder.encode_text(c) for c in captions + [""]))
        _save_atomic({"embeds": torch.from_numpy(np.stack(embeds)), "masks": torch.from_numpy(np.stack(masks))},
                     folder / "text.safetensors")
        (folder / "captions.json").write_text(json.dumps(captions + [""], indent=0))
    captions = json.loads((folder / "captions.json").read_text())
    lookup = {c: i for i, c in enumerate(captions)}
    blocks = range(0, cfg.world.corpus_clips, BLOCK)
    bar = tqdm(total=cfg.world.corpus_clips, desc="corpus", unit="clip", dynamic_ncols=True)
    n = cfg.world.corpus_clips
    renders = Prefetcher(render_corpus, lambda k: (k * ENCODE_BATCH, min(ENCODE_BATCH, n - k * ENCODE_BATCH),
                                                   cfg.world.seed, cfg.world.size),
                         cfg.run.workers, steps=-(-n // ENCODE_BATCH))
    try:
        for start in blocks:
            path = folder / f"block-{start // BLOCK:05d}.safetensors"
            count = min(BLOCK, cfg.world.corpus_clips - start)
            if path.is_file():
                bar.update(count)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            means, logvars, caption_idx = [], [], []
            for b in range(start, start + count, ENCODE_BATCH):
                frames, clip_captions = renders.get(b // ENCODE_BATCH)
                mean, logvar = encoder.encode_videos(frames)
                means.append(mean)
                logvars.append(logvar)
                caption_idx += [lookup[c] for c in clip_captions]
                bar.update(len(frames))
            _save_atomic({"mean": torch.from_numpy(np.concatenate(means)).half(),
                          "logvar": torch.from_numpy(np.concatenate(logvars)).half(),
                          "caption": torch.tensor(caption_idx, dtype=torch.int32)}, path)
    finally:
        bar.close()
        renders.close()
    (folder / "DONE.json").write_text(json.dumps({"clips": cfg.world.corpus_clips, "captions": len(captions)}))
    return True


def load_corpus(out: Path) -> dict[str, torch.Tensor]:
    """The encoded corpus: mean, logvar (N, 12, F, h, w) float16, caption (N,) int64, and the caption table
    embeds (U + 1, L, D), masks (U + 1, L); the last caption is the empty prompt."""
    folder = out / "corpus"
    if not (folder / "DONE.json").is_file():
        raise ValueError(f"the corpus in {folder} is not complete: run the corpus stage first")
    blocks = sorted(folder.glob("block-*.safetensors"))
    parts = [load_file(str(p)) for p in blocks]
    text = load_file(str(folder / "text.safetensors"))
    return {"mean": torch.cat([p["mean"] for p in parts]), "logvar": torch.cat([p["logvar"] for p in parts]),
            "caption": torch.cat([p["caption"] for p in parts]).long(), "embeds": text["embeds"],
            "masks": text["masks"]}
