"""Stage 1: train the synth AutoencoderKLMochi on generic corpus clips (never a relation clip); stage 4: fine-tune
its decoder with the encoder frozen.

Each VAE step renders `batch_size` corpus clips (indices after the transformer's corpus, so the stages see
different clips), takes a random `clip_frames` window of each, and minimises L1(reconstruction, clip) + kl_weight
x KL(posterior || N(0, 1)) with a sampled latent. The decoder stage starts from the VAE the corpus was encoded with
(latent statistics included), freezes its encoder, so the latent space the transformer learned stays valid, and
minimises an L1 weighted 1 + subject_weight on the pixels within 2 px of a subject (the renderer's exact masks):
the judges read the subjects, and a small decoder otherwise spends itself on the large, smooth background. Clips,
windows and latent noise follow from the step number and the seed, so a resumed stage continues exactly, and the
noise is drawn on the CPU whatever `run.device` is, so a GPU run sees the same clips, windows and draws.
`run.workers` renders the next steps' clips in worker processes (`prefetch.Prefetcher`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLMochi

from dr_train.data import world
from dr_train.model.synth import FRAMES, HEIGHT, synth_vae
from dr_train.pretrain.config import PretrainConfig
from dr_train.pretrain.loop import load_optimizer_tensors, lr_at, module_tensors, optimizer_tensors
from dr_train.pretrain.prefetch import Prefetcher

CHECK_EVERY = 200
CHECK_CLIPS = 4


def to_pixels(frames_BFHWC: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(frames_BFHWC).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8(x_BCFHW: torch.Tensor) -> np.ndarray:
    return ((x_BCFHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def render_windows(seed: int, first: int, count: int, frames: int, step: int,
                   size: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """Corpus clips first .. first+count-1 at `size` x `size` pixels, a random `frames` window of each (seeded by the
    step): uint8 (B, F, H, W, 3) and their subject masks (B, F, 2, H, W)."""
    videos, masks = [], []
    for b in range(count):
        clip = world.corpus_clip(first + b, seed, FRAMES, size, size)
        start = int(np.random.default_rng((seed, step, b)).integers(0, FRAMES - frames + 1))
        videos.append(clip.frames[start:start + frames])
        masks.append(clip.masks[start:start + frames])
    return np.stack(videos), np.stack(masks)


def held_out_clips(cfg: PretrainConfig, first: int) -> np.ndarray:
    """The corpus clips after every clip the stages train on, whose reconstructions the stages' checks measure."""
    w = cfg.world
    return np.stack([world.corpus_clip(first + i, w.seed, FRAMES, w.size, w.size).frames for i in range(CHECK_CLIPS)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


class VAEStage:
    name = "vae"
    files = ("model", "optimizer", "rng")

    def __init__(self, cfg: PretrainConfig, device: torch.device | None = None):
        self.cfg, v = cfg, cfg.vae
        self.device = device or torch.device("cpu")
        model = synth_vae(cfg.world.seed + 1, v.encoder_channels, v.decoder_channels)    # seeded on the CPU
        self.model = model.to(self.device).train()
        self.names = {p: n for n, p in self.model.named_parameters()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=v.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(cfg.world.seed + 11)
        self.total_steps = v.steps
        first = cfg.world.corpus_clips + v.steps * v.batch_size      # held-out clips for the checks
        self.check_clips = held_out_clips(cfg, first)
        self.renders = Prefetcher(render_windows, self.render_args, cfg.run.workers, steps=v.steps)

    def render_args(self, step: int) -> tuple:
        """`render_windows`' arguments for the clips of `step`."""
        v = self.cfg.vae
        w = self.cfg.world
        return w.seed, w.corpus_clips + step * v.batch_size, v.batch_size, v.clip_frames, step, w.size

    def batch(self, step: int) -> torch.Tensor:
        frames, _ = self.renders.get(step)
        return to_pixels(frames).to(self.device)

    def close(self) -> None:
        """Stop the render workers."""
        self.renders.close()

    def train_step(self, step: int) -> dict:
        v = self.cfg.vae
        lr = lr_at(step, v.lr, v.warmup_steps, v.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self.batch(step)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=v.bf16):
            posterior = self.model.encode(x).latent_dist
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.noise).to(self.device)
            rec = self.model.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + v.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.optimizer.step()
        return {"loss": float(loss.detach()), "l1": float(l1.detach()), "kl_per_element": float(kl.detach()),
                "lr": lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def reconstruct(self, frames_BFHWC: np.ndarray) -> np.ndarray:
        was = self.model.training
        self.model.eval()
        try:
            out = [to_uint8(self.model.decode(self.model.encode(to_pixels(f[None]).to(self.device)).latent_dist.mean)
                            .sample)[0] for f in frames_BFHWC]
        finally:
            self.model.train(was)
        return np.stack(out)

    def check(self, step: int) -> dict | None:
        if step % CHECK_EVERY and step != self.total_steps:
            return None
        return {"psnr_heldout": psnr(self.reconstruct(self.check_clips), self.check_clips)}

    def state(self):
        tensors = {"model": module_tensors(self.model), "optimizer": optimizer_tensors(self.optimizer, self.names),
                   "rng": {"noise": self.noise.get_state()}}
        return tensors, {}

    def load(self, tensors, state) -> None:
        self.model.load_state_dict(tensors["model"])
        load_optimizer_tensors(self.optimizer, self.names, tensors["optimizer"])
        self.noise.set_state(tensors["rng"]["noise"])

    def save(self, folder: Path) -> Path:
        self.model.eval()
        self.model.save_pretrained(folder, safe_serialization=True)
        return folder


class DecoderStage(VAEStage):
    """The decoder of the corpus stage's VAE, fine-tuned with its encoder frozen (see the module docstring)."""
    name = "decoder"

    def __init__(self, cfg: PretrainConfig, out: Path, device: torch.device | None = None):
        self.cfg, d = cfg, cfg.decoder
        self.device = device or torch.device("cpu")
        self.model = AutoencoderKLMochi.from_pretrained(Path(out) / "corpus" / "vae").to(self.device).train()
        self.model.encoder.requires_grad_(False).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = {p: n for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(params, lr=d.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(cfg.world.seed + 17)
        self.total_steps = d.steps
        first = cfg.world.corpus_clips + cfg.vae.steps * cfg.vae.batch_size
        self.check_clips = held_out_clips(cfg, first)
        self.first = first + CHECK_CLIPS                  # then this stage's own clips
        self.renders = Prefetcher(render_windows, self.render_args, cfg.run.workers, steps=d.steps)

    def render_args(self, step: int) -> tuple:
        d = self.cfg.decoder
        w = self.cfg.world
        return w.seed, self.first + step * d.batch_size, d.batch_size, d.clip_frames, step, w.size

    def train_step(self, step: int) -> dict:
        d = self.cfg.decoder
        lr = lr_at(step, d.lr, d.warmup_steps, d.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        frames, masks = self.renders.get(step)
        x = to_pixels(frames).to(self.device)
        near = torch.from_numpy(masks.max(axis=2)).float()[:, None].to(self.device)  # (B, 1, F, H, W)
        near = torch.nn.functional.max_pool3d(near, (1, 5, 5), stride=1, padding=(0, 2, 2))
        weight = 1.0 + d.subject_weight * near
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.vae.bf16):
            with torch.no_grad():
                posterior = self.model.encode(x).latent_dist
                mean, logvar = posterior.mean.float(), posterior.logvar.float()
                z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.noise).to(self.device)
            rec = self.model.decode(z).sample.float()
        l1 = (rec - x).abs()
        loss = (weight * l1).sum() / weight.expand_as(l1).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.names), 1.0))
        self.optimizer.step()
        return {"loss": float(loss.detach()), "l1": float(l1.mean().detach()), "lr": lr, "grad_norm": grad_norm}

    def load(self, tensors, state) -> None:
        self.model.load_state_dict(tensors["model"])
        load_optimizer_tensors(self.optimizer, self.names, tensors["optimizer"])
        self.noise.set_state(tensors["rng"]["noise"])
