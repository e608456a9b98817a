"""Encode conformed clips once: Mochi VAE posterior (mean, log-variance) and T5 prompt embeddings.

Latents are stored in the transformer's normalised space, z = (x - latents_mean) * scaling_factor / latents_std
per channel (what MochiPipeline undoes before decoding), as the posterior's mean and log-variance; the trainer
draws z = mean + exp(logvar / 2) * noise each step, as Mochi's fine-tuner does.
"""
from __future__ import annotations

import numpy as np
import torch

from dr_train.model.text import encode_prompts


class ClipEncoder:
    """VAE + T5 on one device; prompt embeddings are cached per prompt."""

    def __init__(self, vae, text_encoder, tokenizer, max_text_tokens: int, source: str,
                 device: torch.device | str = "cpu", vae_tiling: bool = False, base: str | None = None):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.max_text_tokens, self.source, self.device = max_text_tokens, source, torch.device(device)
        self.base = base                # dr_train.base_identity of the VAE, T5 and tokenizer, where known
        self.vae.to(self.device).eval()
        self.text_encoder.to(self.device).eval()
        if vae_tiling:
            self.vae.enable_tiling()
        cfg = vae.config
        channels = cfg.latent_channels
        mean = cfg.latents_mean if getattr(cfg, "latents_mean", None) is not None else [0.0] * channels
        std = cfg.latents_std if getattr(cfg, "latents_std", None) is not None else [1.0] * channels
        self.latents_mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1, 1)
        self.latents_std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1, 1)
        self.scaling = float(cfg.scaling_factor)
        self._text_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def identity(self) -> dict:
        """What a dataset's tensors depend on; the trainer checks it against its model. `base` (the encoders'
        identity) is there when the encoder was made from a preset or folder (`make_encoder`)."""
        identity = {"model": self.source, "latent_channels": int(self.vae.config.latent_channels),
                    "text_tokens": int(self.max_text_tokens), "text_dim": int(self.text_encoder.config.d_model),
                    "latent_space": "normalised (x - latents_mean) * scaling_factor / latents_std"}
        if self.base is not None:
            identity["base"] = self.base
        return identity

    def encode_video(self, frames_FHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (F, H, W, 3) -> (mean, logvar), float32 (C, F', H/8, W/8) in the normalised latent space."""
        mean, logvar = self.encode_videos(frames_FHWC[None])
        return mean[0], logvar[0]

    @torch.no_grad()
    def encode_videos(self, frames_BFHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, F, H, W, 3) -> (mean, logvar), float32 (B, C, F', H/8, W/8) in the normalised latent space."""
        assert frames_BFHWC.dtype == np.uint8 and frames_BFHWC.ndim == 5 and frames_BFHWC.shape[-1] == 3
        x = torch.from_numpy(frames_BFHWC).to(self.device).permute(0, 4, 1, 2, 3)
        dtype = next(self.vae.parameters()).dtype
        x = (x.to(dtype) / 127.5 - 1.0)
        dist = self.vae.encode(x).latent_dist
        mean = dist.mean.double().cpu().numpy()
        logvar = dist.logvar.double().cpu().numpy()
        mean_n = (mean - self.latents_mean) * self.scaling / self.latents_std
        logvar_n = logvar + 2.0 * np.log(self.scaling / self.latents_std)
        return mean_n.astype(np.float32), logvar_n.astype(np.float32)

    def encode_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(embed (L, D) float32, mask (L,) bool), cached per prompt."""
        if prompt not in self._text_cache:
            embeds, mask = encode_prompts(self.text_encoder, self.tokenizer, [prompt], self.max_text_tokens,
                                          device="cpu")
            self._text_cache[prompt] = (embeds[0].numpy().astype(np.float32), mask[0].numpy().astype(np.bool_))
        return self._text_cache[prompt]

