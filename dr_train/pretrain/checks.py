"""What the synth base must show (its acceptance), measured with the world's own judges:

* reconstruction: the relation judge's accuracy on VAE reconstructions of relation clips (kinds the VAE never saw
  perform a relation) against its accuracy on the original clips; the base needs >= 90 % of it; the same on the
  `person` exemplars, what the trainer encodes, is the bound on every relation result a LoRA can get;
* subject fidelity: for prompts naming two kinds, the share of generated videos in which the kind classifier
  finds two subjects of exactly the prompted kinds; the base needs >= 80 % (generic-motion prompts, the corpus's
  form, and the relations' evaluation prompts, whose relation words it never saw, are reported apart);
* relation accuracy on the relations' evaluation prompts: near chance, since no relation was ever shown (the judge
  has no "no relation" answer, so static generations land on the static relations: compare per relation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLMochi, MochiPipeline
from transformers import T5EncoderModel, T5TokenizerFast

from dr_train.data import world
from dr_train.data.synthetic import RELATIONS
from dr_train.eval.judge import RelationJudge
from dr_train.eval.kinds import KindClassifier
from dr_train.generate import SamplerSettings, sample_videos
from dr_train.model.presets import mochi_scheduler
from dr_train.model.synth import FRAMES, TEXT_TOKENS
from dr_train.pretrain.config import PretrainConfig

CHECK_SEED = 4242                      # renders and sampling seeds of the checks; the corpus uses world.seed
BATCH = 8


def final_vae(out: Path) -> Path:
    """The VAE a base ships: the fine-tuned decoder's once that stage is done, else the corpus stage's (the same
    encoder and latent statistics either way)."""
    decoder = Path(out) / "decoder" / "final"
    return decoder if (decoder / "config.json").is_file() else Path(out) / "corpus" / "vae"


def generic_prompts(count: int, seed: int = CHECK_SEED) -> list[tuple[str, tuple[str, str]]]:
    """`count` generic-motion captions naming two different kinds, cycling over kinds and motions."""
    rng = np.random.default_rng(seed)
    kinds, motions = list(world.KINDS), list(world.GENERIC_MOTIONS)
    out = []
    for i in range(count):
        a, b = rng.choice(len(kinds), 2, replace=False)
        pair = (kinds[a], kinds[b])
        out.append((world.caption(motions[i % len(motions)], pair), pair))
    return out


def relation_prompts(per_relation: int) -> list[tuple[str, str, tuple[str, str]]]:
    """(relation, evaluation prompt, kinds) for the first `per_relation` evaluation prompts of every relation."""
    return [(r, p, k) for r in RELATIONS
            for p, k in list(zip(world.eval_prompts(r), world.eval_kinds(r)))[:per_relation]]


class BaseChecks:
    """The pipeline pieces of a base under construction (VAE with its statistics, tokenizer and T5 from the corpus
    stage) and the judges."""

    def __init__(self, cfg: PretrainConfig, out: Path, vae=None, text_encoder=None, tokenizer=None,
                 device: torch.device | None = None):
        corpus = Path(out) / "corpus"
        self.cfg, self.device = cfg, device or torch.device("cpu")
        self.vae = (vae or AutoencoderKLMochi.from_pretrained(final_vae(out))).to(self.device).eval()
        self.text_encoder = (text_encoder or T5EncoderModel.from_pretrained(corpus / "text_encoder")).to(self.device)
        self.text_encoder.eval()
        self.tokenizer = tokenizer or T5TokenizerFast.from_pretrained(corpus / "tokenizer")
        self.settings = SamplerSettings(steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                                        num_frames=FRAMES, height=cfg.world.size, width=cfg.world.size,
                                        fps=30).check()
        self.kinds = KindClassifier()
        self.judge = RelationJudge()

    def pipeline(self, transformer):
        pipe = MochiPipeline(scheduler=mochi_scheduler(), vae=self.vae, text_encoder=self.text_encoder,
                             tokenizer=self.tokenizer, transformer=transformer.to(self.device))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, transformer, prompts: list[str], seeds: list[int]) -> np.ndarray:
        pipe = self.pipeline(transformer)
        parts = [sample_videos(pipe, TEXT_TOKENS, prompts[i:i + BATCH], self.settings, seeds[i:i + BATCH])
                 for i in range(0, len(prompts), BATCH)]
        return np.concatenate(parts)

    def subject_fidelity(self, transformer, count: int = 16, videos: np.ndarray | None = None,
                         prompts: list[tuple[str, tuple[str, str]]] | None = None) -> dict:
        prompts = prompts or generic_prompts(count)
        if videos is None:
            videos = self.generate(transformer, [p for p, _ in prompts], [CHECK_SEED + i for i in range(len(prompts))])
        hits, found = [], 0
        for frames, (_, kinds) in zip(videos, prompts):
            seen = self.kinds.classify(frames)
            found += seen is not None
            hits.append(seen is not None and sorted(seen) == sorted(kinds))
        return {"rate": float(np.mean(hits)), "hits": hits, "two_subjects_found": found / len(prompts),
                "videos": videos, "prompts": prompts}

    def relation_accuracy(self, transformer, per_relation: int = 2) -> dict:
        items = relation_prompts(per_relation)
        videos = self.generate(transformer, [p for _, p, _ in items], [CHECK_SEED + i for i in range(len(items))])
        predicted = [self.judge.classify(v)[0] for v in videos]
        correct = [p == r for p, (r, _, _) in zip(predicted, items)]
        fidelity = self.subject_fidelity(None, videos=videos, prompts=[(p, k) for _, p, k in items])
        return {"accuracy": float(np.mean(correct)), "chance": 1 / len(RELATIONS), "predicted": predicted,
                "subject_fidelity": fidelity["rate"], "videos": videos, "items": items}

    @torch.no_grad()
    def _judged_reconstructions(self, originals: list[np.ndarray], labels: list[str]) -> dict:
        recons = []
        for i in range(0, len(originals), BATCH):
            x = torch.from_numpy(np.stack(originals[i:i + BATCH])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
            rec = self.vae.decode(self.vae.encode(x.to(self.device)).latent_dist.mean).sample
            recons.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
        recons = np.concatenate(recons)
        right = lambda videos: np.array([self.judge.classify(v)[0] == l for v, l in zip(videos, labels)])  # noqa
        original, reconstructed = right(originals), right(recons)
        mse = float(np.mean((np.stack(originals).astype(np.float64) - recons.astype(np.float64)) ** 2))
        label_N = np.array(labels)
        per_relation = {}
        for r in dict.fromkeys(labels):
            mine = label_N == r
            per_relation[r] = [int(original[mine].sum()), int(reconstructed[mine].sum()), int(mine.sum())]
        return {"judge_original": float(original.mean()), "judge_reconstructed": float(reconstructed.mean()),
                "kept": float(reconstructed.mean() / max(original.mean(), 1e-9)),
                "psnr": 10 * np.log10(255.0 ** 2 / max(mse, 1e-10)), "per_relation": per_relation,
                "originals": np.stack(originals), "reconstructions": recons, "labels": labels}

    def reconstruction(self, per_relation: int = 2) -> dict:
        """Judge accuracy on relation clips of non-person kind pairs, originals vs VAE reconstructions; and the same
        on `person` exemplars (`exemplars`: what the trainer encodes, so the bound on every relation result).
        `per_relation`: {relation: [originals judged right, reconstructions judged right, clips]}."""
        originals, labels, exemplars = [], [], []
        for r in RELATIONS:
            for i, kinds in enumerate(world.eval_kinds(r)[:per_relation]):
                size = self.cfg.world.size
                originals.append(world.render_world_clip(r, kinds, 1000 + i, FRAMES, size, size,
                                                         seed=CHECK_SEED).frames)
                exemplars.append(world.exemplar_clip(r, 1000 + i, CHECK_SEED, FRAMES, size, size).frames)
                labels.append(r)
        out = self._judged_reconstructions(originals, labels)
        person = self._judged_reconstructions(exemplars, labels)
        out["exemplars"] = {k: person[k] for k in ("judge_original", "judge_reconstructed", "kept", "psnr",
                                                   "per_relation")}
        return out
