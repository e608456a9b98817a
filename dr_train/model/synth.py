"""The `synth` preset: a small Mochi-architecture stack pretrained here on the synth world (dr_train/data/world.py).

The shipped folder `dr_train/model/synth_base/` is a diffusers Mochi folder (transformer/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) that `MochiPipeline.from_pretrained` loads, plus its model card
(README.md) and `SHA256SUMS`, which `verify_folder` checks before anything is loaded. `launch/pretrain_base.py`
makes it from a seed (dr_train/pretrain/). The builders below are the architecture; the weights come from there.

Clips are 25 frames x 64 x 64 (5 x 8 x 8 latents): the smallest size at which the judge and the kind classifier
still read the world after an mp4 round trip (docs/metrics_relation.md), with the 5 latent frames the issue asks.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLMochi, MochiTransformer3DModel
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from dr_train.base_identity import SYNTH_DIR, SYNTH_MANIFEST
from dr_train.catalog import load_catalog
from dr_train.data import world
from dr_train.io import sha256_file
from dr_train.model.presets import word_tokenizer

MANIFEST = SYNTH_MANIFEST
FRAMES, HEIGHT, WIDTH = 25, 64, 64
TEXT_TOKENS = 24
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def world_words() -> list[str]:
    """Every word the world's captions use (kinds, generic motions, the relations' training and evaluation
    prompts), lower-cased, in first-seen order: the tokenizer's whole-word pieces."""
    texts = [world.caption(m, ("person", k)) for m in world.GENERIC_MOTIONS for k in world.KINDS]
    for relation in load_catalog(world.SYNTH_CATALOG).values():
        texts += [relation.prompt, *relation.eval_prompts]
    texts += [world.with_article(k) for k in world.KINDS]
    words = [w.lower() for t in texts for w in _WORD.findall(t)]
    return list(dict.fromkeys(words))


def synth_tokenizer() -> T5TokenizerFast:
    return word_tokenizer(world_words(), TEXT_TOKENS)


def synth_text_encoder(vocab_size: int, seed: int, d_model: int = 64, layers: int = 2, heads: int = 4,
                       d_ff: int = 128) -> T5EncoderModel:
    """A small T5 encoder, frozen at its seeded initialisation (nothing here to train it on)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
            num_heads=heads, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False,
        ))


def synth_vae(seed: int, encoder_channels=(32, 32, 64, 64), decoder_channels=(32, 64, 64, 64)) -> AutoencoderKLMochi:
    """Mochi's VAE (8x space, 6x time, 12 latent channels) with few channels and no attention blocks; latent
    statistics are set after training (`latents_mean`/`latents_std`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLMochi(
            latent_channels=12, out_channels=3, encoder_block_out_channels=tuple(encoder_channels),
            decoder_block_out_channels=tuple(decoder_channels), layers_per_block=(1, 1, 1, 1, 1),
            add_attention_block=(False, False, False, False, False),
            latents_mean=(0.0,) * 12, latents_std=(1.0,) * 12, scaling_factor=1.0,
        )


def axial_rope_frequencies(heads: int, head_dim: int) -> torch.Tensor:
    """Starting values of Mochi's learned 3D RoPE frequencies `pos_frequencies` (3, heads, head_dim // 2): each
    rotation pair turns with one axis (time, height, width in turn), at geometrically spaced rates from one that
    tells neighbouring tokens apart (a radian per latent frame; half a turn per token at 4 tokens across, where
    tokens lie 48 apart) down to one that turns about a quarter turn over the 5 latent frames, or over the frame.

    diffusers initialises them to zero, which is right only when loading Mochi-1's trained values. A synth
    transformer pretrained from zero learned rates of 0.01-0.03, and frames lie one unit apart in Mochi's positions
    (height and width span +-96 whatever the grid): reversing its input frames changed its prediction by 0.1 %, so
    it could not tell a motion from the same motion played backwards, nor learn a relation (docs/synth.md)."""
    pairs = head_dim // 2
    freqs = torch.zeros(3, heads, pairs)
    space = (torch.pi / 48, torch.pi / 288)
    for axis, (fast, slow) in enumerate(((1.0, torch.pi / 8), space, space)):
        idx = list(range(axis, pairs, 3))
        rates = torch.logspace(math.log10(fast), math.log10(slow), len(idx))
        freqs[axis][:, idx] = rates
    return freqs


def synth_transformer(seed: int, text_dim: int, heads: int = 6, head_dim: int = 32, layers: int = 6,
                      context_dim: int = 96, time_embed_dim: int = 128, patch_size: int = 2) -> MochiTransformer3DModel:
    """Mochi's transformer at the given size, seeded, with `axial_rope_frequencies` as its RoPE's starting rates."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MochiTransformer3DModel(
            patch_size=patch_size, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
            pooled_projection_dim=context_dim, in_channels=12, text_embed_dim=text_dim,
            time_embed_dim=time_embed_dim, activation_fn="swiglu", max_sequence_length=TEXT_TOKENS,
        )
    with torch.no_grad():
        model.pos_frequencies.copy_(axial_rope_frequencies(heads, head_dim))
    return model


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> Path:
    """`SHA256SUMS` (sha256sum's format) over every file of the folder."""
    folder = Path(folder)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in _files(folder)]
    path = folder / MANIFEST
    path.write_text("\n".join(lines) + "\n")
    return path


def verify_folder(folder: str | Path = SYNTH_DIR) -> Path:
    """Every file listed in SHA256SUMS is present with its sha256, and no weight file is unlisted; a ValueError
    naming the first bad file otherwise."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"synth base {folder} has no {MANIFEST}: it is missing or incomplete (make it with "
                         f"launch/pretrain_base.py)")
    listed = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"synth base file {path} is missing")
        if sha256_file(path) != digest:
            raise ValueError(f"synth base file {path} does not match its sha256 in {manifest}")
    unlisted = [p for p in _files(folder) if p.relative_to(folder).as_posix() not in listed
                and p.suffix in (".safetensors", ".json")]
    if unlisted:
        raise ValueError(f"synth base file {unlisted[0]} is not listed in {manifest}")
    return folder
