"""The pretraining recipe of the synth base, documented once; `configs/pretrain_synth.yaml` is generated from it
(`python -m dr_train.pretrain.config`). Override any option with `--set section.option=value`."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from dr_train.config import dump_commented_yaml, load_sections, opt
from dr_train.geometry import is_video_frames


@dataclass
class WorldSection:
    """The synth-world clips (dr_train/data/world.py)."""
    seed: int = opt(0, "seed of the corpus, of every weight initialisation and of every random stream")
    corpus_clips: int = opt(6144, "clips of the generic corpus the transformer learns from (encoded once)")
    size: int = opt(64, "clip height and width in pixels, a multiple of 16 from 64 to 128 (the VAE's 8x, the "
                        "transformer's patch 2); the trainer's `synth` preset draws 64 px clips, so a base of another "
                        "size is for the recipe's own checks until the trainer reads the size from the base")


@dataclass
class VAESection:
    """Stage 1: the AutoencoderKLMochi, trained on generic corpus clips (relations never shown)."""
    encoder_channels: list = opt([32, 32, 64, 64], "encoder block widths (multiples of 32: group norm)")
    decoder_channels: list = opt([32, 64, 64, 64], "decoder block widths")
    steps: int = opt(4000, "optimizer steps")
    batch_size: int = opt(4, "clips per step")
    clip_frames: int = opt(13, "frames per training clip, a random 1 + 6k window of a 25-frame render (the VAE is "
                               "causal and convolutional: it encodes 25 frames the same way)")
    lr: float = opt(6e-4, "peak AdamW learning rate (warmup, then cosine to 10 %)")
    warmup_steps: int = opt(100, "linear warmup steps")
    kl_weight: float = opt(1e-4, "weight of the posterior's KL divergence to N(0, 1) per latent element, beside the "
                                 "L1 reconstruction loss per pixel")
    stats_clips: int = opt(512, "corpus clips whose posterior means set latents_mean / latents_std")
    bf16: bool = opt(True, "bf16 autocast for the VAE's convolutions (1.6x faster on a CPU with AVX512-BF16; "
                           "weights, optimizer and loss stay fp32)")


@dataclass
class DecoderSection:
    """Stage 4: the VAE's decoder fine-tuned with its encoder frozen (the latent space, and so the transformer's
    corpus, stays as it is), the reconstruction loss weighted up on the subjects' pixels, where the judges look."""
    steps: int = opt(600, "optimizer steps")
    batch_size: int = opt(4, "clips per step")
    clip_frames: int = opt(13, "frames per training clip (a random 1 + 6k window of a 25-frame render)")
    lr: float = opt(3e-4, "peak AdamW learning rate (warmup, then cosine to 10 %)")
    warmup_steps: int = opt(50, "linear warmup steps")
    subject_weight: float = opt(4.0, "extra L1 weight on pixels within 2 px of a subject (1 + w there)")


@dataclass
class TextSection:
    """The frozen T5 encoder (seeded initialisation) and the world-vocabulary tokenizer."""
    d_model: int = opt(64, "T5 width (the transformer's text_embed_dim)")
    layers: int = opt(2, "T5 encoder layers")
    heads: int = opt(4, "T5 attention heads")
    d_ff: int = opt(128, "T5 feed-forward width")


@dataclass
class TransformerSection:
    """Stage 3: the MochiTransformer3DModel, trained with the trainer's rectified-flow objective on the encoded
    corpus (z_s = (1-s) z0 + s eps, s ~ U(0,1), target z0 - eps, timestep (1-s)*1000)."""
    heads: int = opt(7, "attention heads")
    head_dim: int = opt(32, "width per head")
    patch_size: int = opt(2, "latent pixels per token side (Mochi-1 uses 2; 1 gives a subject of the 64 px world ~4 tokens instead of ~1)")
    layers: int = opt(7, "MM-DiT blocks")
    context_dim: int = opt(96, "width of the text stream (pooled_projection_dim)")
    time_embed_dim: int = opt(128, "timestep embedding width")
    steps: int = opt(5000, "optimizer steps")
    batch_size: int = opt(32, "clips per step")
    lr: float = opt(4e-4, "peak AdamW learning rate (warmup, then cosine to 10 %)")
    warmup_steps: int = opt(300, "linear warmup steps")
    decay_steps: int = opt(0, "step where the cosine reaches 10 %, the rate kept after it (0: `steps`); lets a "
                              "finished run be extended as a straight run of the new length would train")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    ema: float = opt(0.999, "decay of the weights' exponential moving average (the exported weights)")
    caption_dropout: float = opt(0.1, "probability of the empty prompt (what classifier-free guidance contrasts)")
    sample_every: int = opt(1000, "steps between sample checks (videos judged by the kind classifier)")
    sample_videos: int = opt(48, "videos of each sample check (with 16, one video moved the rate 6 points: too "
                                 "noisy to follow)")


@dataclass
class SampleSection:
    """How the base is sampled in its checks and its model card (the trainer's validation uses its own)."""
    steps: int = opt(32, "Euler steps")
    guidance_scale: float = opt(5.0, "classifier-free guidance scale")
    fidelity_videos: int = opt(48, "export checks: videos of generic two-kind prompts (subject fidelity)")
    per_relation: int = opt(2, "export checks: relation clips (reconstruction) and evaluation-prompt videos "
                               "(relation accuracy) per relation; 0 skips both")


@dataclass
class RunSection:
    """Where the stages write and how a chunk of work ends."""
    out: str = opt(".cache/pretrain_synth", "working folder: one sub-folder per stage, checkpoints inside")
    checkpoint_minutes: float = opt(10.0, "write a checkpoint at least this often (and when a chunk ends)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)")
    device: str = opt("auto", "where the models train and sample: auto (CUDA when present, else the CPU), cpu, cuda "
                              "or cuda:N; random draws stay on the CPU, so a GPU run draws the same numbers")
    workers: int = opt(0, "processes rendering the world's clips ahead of the training step (0: the training "
                          "process renders them; on a GPU, where a step is faster than its renders, use the cores)")


@dataclass
class PretrainConfig:
    world: WorldSection = field(default_factory=WorldSection)
    vae: VAESection = field(default_factory=VAESection)
    text: TextSection = field(default_factory=TextSection)
    transformer: TransformerSection = field(default_factory=TransformerSection)
    decoder: DecoderSection = field(default_factory=DecoderSection)
    sample: SampleSection = field(default_factory=SampleSection)
    run: RunSection = field(default_factory=RunSection)


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    cfg = load_sections(PretrainConfig(), path, overrides)
    v, t = cfg.vae, cfg.transformer
    for name, frames in (("vae", v.clip_frames), ("decoder", cfg.decoder.clip_frames)):
        if not is_video_frames(frames) or not 7 <= frames <= 25:
            raise ValueError(f"{name}.clip_frames must be 1 + 6k between 7 and 25, got {frames}")
    if any(c % 32 or c < 32 for c in [*v.encoder_channels, *v.decoder_channels]) or len(v.encoder_channels) != 4 \
            or len(v.decoder_channels) != 4:
        raise ValueError(f"vae.encoder_channels and vae.decoder_channels must be 4 multiples of 32, got "
                         f"{v.encoder_channels} and {v.decoder_channels}")
    for name, value in (("world.corpus_clips", cfg.world.corpus_clips), ("vae.steps", v.steps),
                        ("vae.batch_size", v.batch_size), ("decoder.steps", cfg.decoder.steps),
                        ("decoder.batch_size", cfg.decoder.batch_size), ("transformer.steps", t.steps),
                        ("transformer.batch_size", t.batch_size), ("sample.steps", cfg.sample.steps),
                        ("sample.fidelity_videos", cfg.sample.fidelity_videos)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg.world.size % 16 or not 64 <= cfg.world.size <= 128:
        raise ValueError(f"world.size must be a multiple of 16 from 64 to 128, got {cfg.world.size}")
    if cfg.run.workers < 0:
        raise ValueError(f"run.workers must be >= 0, got {cfg.run.workers}")
    if not 0 <= t.decay_steps <= t.steps:
        raise ValueError(f"transformer.decay_steps must be between 0 and transformer.steps ({t.steps}), got "
                         f"{t.decay_steps}")
    if not 0 <= t.caption_dropout <= 1 or not 0 <= t.ema < 1:
        raise ValueError(f"transformer.caption_dropout must be in [0, 1] and transformer.ema in [0, 1), got "
                         f"{t.caption_dropout}, {t.ema}")
    return cfg


HEADER = ("The synth base's pretraining recipe. Generated from dr_train/pretrain/config.py (the documentation lives",
          "there); override any option with --set section.option=value.")

if __name__ == "__main__":
    sys.stdout.write(dump_commented_yaml(PretrainConfig(), HEADER))
