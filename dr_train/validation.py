"""Validation during training: every `validation.every` steps, videos of a few prompts with the inference adapters
(`lora.export_adapters`: what export gives), written beside the run and, on the synth world, judged.

Training is not disturbed: sampling draws from its own seeded generators inside a forked RNG, the adapters
active in the next step are set by the next step itself, and the optimizer, memory bank and data stream are not
touched, so a run logs the same losses with validation on or off (tested). The prompts (default: the relation's
training prompt and its first two evaluation prompts) x seeds are shared out across ranks, each rank sampling its
share; under ZeRO-3 every rank takes part in every forward pass, so ranks with a shorter share sample a repeat of
their last item and drop it.

Writes `<run>/<relation>/validation/step-NNNNNNNN/<k>_s<seed>/{video.mp4, keyframes.png}` and returns the scalars
the trainer logs (seconds, and on the synth world the relation judge's accuracy and the subject fidelity over the
step's videos) with the videos, which the trainer also sends to TensorBoard (keyframes) and W&B.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import MochiPipeline

from dr_train.catalog import Relation
from dr_train.eval import world_scores
from dr_train.generate import SamplerSettings, sample_videos, write_outputs
from dr_train.method.triplet import set_active_adapters

log = logging.getLogger("dr_train")


@dataclass(frozen=True)
class ValidationItem:
    index: int
    prompt: str
    seed: int


def resolve_every(cfg) -> int:
    """validation.every, with -1 (auto) meaning AUTO_EVERY steps on the synth preset and off elsewhere."""
    every = cfg.validation.every
    if every < 0:
        return AUTO_EVERY if cfg.model.preset == "synth" else 0
    return every


AUTO_EVERY = 100


def validation_items(cfg, relation: Relation) -> list[ValidationItem]:
    prompts = list(cfg.validation.prompts) or [relation.prompt, *relation.eval_prompts[:2]]
    return [ValidationItem(i, p, int(s)) for i, p in enumerate(prompts) for s in cfg.validation.seeds]


class Validator:
    """One per training launch: the VAE, T5 and tokenizer the pipeline needs (the trainer itself uses only the
    transformer), the clip size of the training data, the judges where they apply."""

    def __init__(self, cfg, comps, clip_size: tuple[int, int, int], dist):
        self.cfg, self.comps, self.dist = cfg, comps, dist
        v = cfg.validation
        self.settings = SamplerSettings(v.num_inference_steps, v.guidance_scale, *clip_size).check()
        self.world = cfg.model.preset == "synth"

    def pipeline(self):
        c = self.comps
        pipe = MochiPipeline(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                             transformer=c.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, run, step: int) -> tuple[dict, list[dict]]:
        """Sample, write and judge this rank's share; every rank returns the same (scalars, videos): each video a
        dict of index, seed, prompt, keyframes and video paths (and its world scores)."""
        started = time.perf_counter()
        items = validation_items(self.cfg, run.relation)
        mine = items[self.dist.rank::self.dist.world_size]
        rounds = -(-len(items) // self.dist.world_size)           # the longest share: every rank runs as many
        folder = run.folder.validation / f"step-{step:08d}"
        set_active_adapters(self.comps.transformer, [a for a in self.cfg.lora.export_adapters if a in run.adapters])
        scores = []
        pipe = self.pipeline()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for k in range(rounds):
                item = mine[min(k, len(mine) - 1)] if mine else items[0]
                frames = sample_videos(pipe, self.comps.max_text_tokens, [item.prompt], self.settings,
                                       [item.seed])[0]
                if k >= len(mine):
                    continue                                       # a repeat that only kept the ranks in step
                video, grid = write_outputs(frames, folder / f"{item.index:02d}_s{item.seed}", self.settings.fps)
                score = {"index": item.index, "seed": item.seed, "prompt": item.prompt, "keyframes": str(grid),
                         "video": str(video), "rank": self.dist.rank}
                if self.world:
                    score |= world_scores.scorer().score(frames, run.relation.name, item.prompt)
                scores.append(score)
        gathered = sorted((s for part in self.dist.all_gather_objects(scores) for s in part),
                          key=lambda s: (s["index"], s["seed"]))
        out = {"validation_seconds": self.dist.mean(time.perf_counter() - started),
               "validation_videos": len(gathered)}
        if self.world:
            for key in ("relation_accuracy", "subject_fidelity"):
                values = [s[key] for s in gathered if s.get(key) is not None]
                out[f"validation_{key}"] = float(np.mean(values)) if values else None
        if self.dist.is_main:                      # paths in the index are relative to its folder
            listed = [v | {k: str(Path(v[k]).relative_to(folder)) for k in ("video", "keyframes")} for v in gathered]
            (folder / "index.json").write_text(json.dumps({"step": step, **out, "videos": listed}, indent=1))
        return out, gathered
