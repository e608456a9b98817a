"""Stage 3: pretrain the synth MochiTransformer3DModel on the encoded corpus.

The objective and conventions are the trainer's (dr_train.method.flow_matching_loss.noisy_latents): per clip a latent is drawn from
its posterior, z_s = (1 - s) z0 + s eps with s ~ U(0, 1), the model gets timestep (1 - s) * 1000 and regresses the
velocity z0 - eps (plain MSE, no masks); with probability `caption_dropout` the caption is the empty prompt, the
conditioning classifier-free guidance contrasts against. The batch order is a seeded permutation per epoch of the
corpus, derived from the step number; the noise comes from a generator saved in every checkpoint, drawn on the CPU
whatever `run.device` is (the encoded corpus stays there too; each step's batch moves to the device). An
exponential moving average of the weights is what the base ships.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from dr_train.method.flow_matching_loss import noisy_latents
from dr_train.model.attention import set_attention_backend
from dr_train.model.synth import synth_transformer
from dr_train.pretrain.checks import BaseChecks
from dr_train.pretrain.config import PretrainConfig
from dr_train.pretrain.corpus import load_corpus
from dr_train.pretrain.loop import load_optimizer_tensors, lr_at, module_tensors, optimizer_tensors


def build_transformer(cfg: PretrainConfig):
    t = cfg.transformer
    model = synth_transformer(cfg.world.seed + 3, cfg.text.d_model, t.heads, t.head_dim, t.layers, t.context_dim,
                              t.time_embed_dim, t.patch_size)
    set_attention_backend(model, "sdpa")
    return model


class TransformerStage:
    name = "transformer"
    files = ("model", "ema", "optimizer", "rng")

    def __init__(self, cfg: PretrainConfig, out: Path, device: torch.device | None = None):
        self.cfg, self.out, t = cfg, Path(out), cfg.transformer
        self.device = device or torch.device("cpu")
        self.data = load_corpus(self.out)
        self.count = int(self.data["mean"].shape[0])
        self.null = len(self.data["embeds"]) - 1                  # the empty prompt's row
        self.model = build_transformer(cfg).to(self.device).train()      # seeded on the CPU, then moved
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.names = {p: n for n, p in self.model.named_parameters()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=(0.9, 0.99),
                                           weight_decay=t.weight_decay)
        self.noise = torch.Generator().manual_seed(cfg.world.seed + 13)
        self.total_steps = t.steps
        self._perms: dict[int, np.ndarray] = {}
        self._checker = None

    def indices(self, step: int) -> np.ndarray:
        """The corpus clips of `step`: positions step*B .. step*B+B-1 of the concatenated per-epoch permutations."""
        b = self.cfg.transformer.batch_size
        out = []
        for k in range(step * b, (step + 1) * b):
            epoch, pos = divmod(k, self.count)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng((self.cfg.world.seed, 7, epoch)).permutation(self.count)}
            out.append(self._perms[epoch][pos])
        return np.asarray(out)

    def train_step(self, step: int) -> dict:
        t = self.cfg.transformer
        lr = lr_at(step, t.lr, t.warmup_steps, t.decay_steps or t.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(self.indices(step))
        mean, logvar = self.data["mean"][idx].float(), self.data["logvar"][idx].float()
        z0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=self.noise)
        noise = torch.randn(mean.shape, generator=self.noise)
        sigma = torch.rand(len(idx), generator=self.noise)
        caption = self.data["caption"][idx]
        drop = torch.rand(len(idx), generator=self.noise) < t.caption_dropout
        caption = torch.where(drop, torch.full_like(caption, self.null), caption)
        z_sigma, target, timestep = (v.to(self.device) for v in noisy_latents(z0, noise, sigma))
        pred = self.model(hidden_states=z_sigma,
                          encoder_hidden_states=self.data["embeds"][caption].float().to(self.device),
                          timestep=timestep, encoder_attention_mask=self.data["masks"][caption].to(self.device),
                          return_dict=False)[0]
        loss = (pred.float() - target).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.optimizer.step()
        decay = min(t.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1.0 - decay)
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}

    def check(self, step: int) -> dict | None:
        t = self.cfg.transformer
        if step % t.sample_every and step != self.total_steps:
            return None

        if self._checker is None:
            self._checker = BaseChecks(self.cfg, self.out, device=self.device)
        return {"subject_fidelity": self._checker.subject_fidelity(self.ema, count=t.sample_videos)["rate"]}

    def state(self):
        tensors = {"model": module_tensors(self.model), "ema": module_tensors(self.ema),
                   "optimizer": optimizer_tensors(self.optimizer, self.names), "rng": {"noise": self.noise.get_state()}}
        return tensors, {}

    def load(self, tensors, state) -> None:
        self.model.load_state_dict(tensors["model"])
        self.ema.load_state_dict(tensors["ema"])
        load_optimizer_tensors(self.optimizer, self.names, tensors["optimizer"])
        self.noise.set_state(tensors["rng"]["noise"])
