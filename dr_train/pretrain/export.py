"""Stage 4: the shipped base. Assemble the diffusers folder (the transformer's EMA weights stored in bf16 to keep
the folder small, the VAE, T5 and tokenizer from the corpus stage, Mochi's scheduler), load it back the way
`model.preset: synth` does, run the acceptance checks on what ships, and write the model card (README.md with its
pictures), checks.json and SHA256SUMS. `recheck` runs the checks again on an exported base (its weights unchanged)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLMochi, MochiPipeline
from PIL import Image
from transformers import T5EncoderModel, T5TokenizerFast

from dr_train import checkpoint as ckpt
from dr_train.config import dump_commented_yaml
from dr_train.data import world
from dr_train.data.synthetic import RELATIONS
from dr_train.model import load_mochi
from dr_train.model.presets import mochi_scheduler
from dr_train.model.synth import verify_folder, write_manifest
from dr_train.plots import read_metrics
from dr_train.pretrain.checks import BaseChecks, final_vae
from dr_train.pretrain.config import HEADER, PretrainConfig
from dr_train.pretrain.transformer import build_transformer

CHECKS_HEADING = "## What it does"       # the model card's checks section runs from here to the end


def _grid(videos: np.ndarray, path: Path, frames: int = 5, scale: int = 2) -> Path:
    """One row per video: `frames` evenly spaced frames."""
    idx = np.linspace(0, videos.shape[1] - 1, frames).round().astype(int)
    rows = [np.concatenate(list(v[idx]), axis=1) for v in videos]
    img = Image.fromarray(np.concatenate(rows, axis=0))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, optimize=True)
    return path


def assemble(cfg: PretrainConfig, out: Path, target: Path) -> Path:
    latest = ckpt.list_checkpoints(out / "transformer" / "checkpoints")
    if not (out / "transformer" / "DONE.json").is_file() or not latest:
        raise ValueError(f"the transformer stage in {out / 'transformer'} is not finished")
    tensors, _ = ckpt.load_checkpoint(latest[-1], ("ema",))
    transformer = build_transformer(cfg)
    transformer.load_state_dict(tensors["ema"])
    corpus = out / "corpus"
    pipe = MochiPipeline(scheduler=mochi_scheduler(), vae=AutoencoderKLMochi.from_pretrained(final_vae(out)),
                         text_encoder=T5EncoderModel.from_pretrained(corpus / "text_encoder"),
                         tokenizer=T5TokenizerFast.from_pretrained(corpus / "tokenizer"),
                         transformer=transformer.to(torch.bfloat16))
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def export(cfg: PretrainConfig, out: Path, target: Path, device: torch.device | None = None) -> Path:
    target = assemble(cfg, Path(out), Path(target))
    card = target / "card"
    card.mkdir()
    for stage in ("vae", "transformer", "decoder"):
        if (Path(out) / stage / "loss_curve.png").is_file():
            shutil.copy(Path(out) / stage / "loss_curve.png", card / f"{stage}_curve.png")
    results = run_checks(cfg, target, device)
    write_card(cfg, Path(out), target, results)
    write_manifest(target)
    return target


def recheck(cfg: PretrainConfig, target: Path, device: torch.device | None = None) -> Path:
    """Run the acceptance checks again on an exported base whose weights are unchanged (after a change to the world's
    relations or to the judges, say): checks.json, the checks' pictures and the model card's checks section are
    rewritten, the rest of the card is kept, and SHA256SUMS is remade. The folder is verified first."""
    target = Path(target)
    verify_folder(target)
    card = target / "README.md"
    text = card.read_text()
    if CHECKS_HEADING not in text:
        raise ValueError(f"{card} has no '{CHECKS_HEADING}' section to rewrite: is it a base exported by "
                         f"launch/pretrain_base.py?")
    results = run_checks(cfg, target, device)
    head = text[:text.index(CHECKS_HEADING)]
    card.write_text(head + _checks_heading(cfg) + "\n\n" + _checks_section(cfg, results) + "\n")
    write_manifest(target)
    return target


def run_checks(cfg: PretrainConfig, target: Path, device: torch.device | None = None) -> dict:
    """The acceptance checks on the base in `target`, loaded the way `model.preset: synth` loads it: writes
    `checks.json` and the checks' pictures under `card/`, and returns the results."""
    comps = load_mochi(str(target), dtype="fp32", attention_backend="sdpa")
    checks = BaseChecks(cfg, target, vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                        device=device)
    card = target / "card"
    card.mkdir(exist_ok=True)
    fid = checks.subject_fidelity(comps.transformer, count=cfg.sample.fidelity_videos)
    _grid(fid["videos"][:8], card / "samples_generic.png")
    results = {
        "subject_fidelity_generic": {"rate": fid["rate"], "two_subjects_found": fid["two_subjects_found"],
                                     "videos": len(fid["hits"])},
        "sampler": {"steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale},
    }
    if not cfg.sample.per_relation:
        for stale in ("reconstructions.png", "samples_relation_prompts.png"):
            (card / stale).unlink(missing_ok=True)
    else:
        rec = checks.reconstruction(cfg.sample.per_relation)
        rel = checks.relation_accuracy(comps.transformer, per_relation=cfg.sample.per_relation)
        pick = np.arange(0, len(rec["labels"]), 9)
        _grid(np.concatenate([np.stack([rec["originals"][i], rec["reconstructions"][i]]) for i in pick]),
              card / "reconstructions.png")
        _grid(rel["videos"][:6], card / "samples_relation_prompts.png")
        predicted = [p for p in rel["predicted"] if p is not None]
        results["reconstruction"] = {k: rec[k] for k in ("judge_original", "judge_reconstructed", "kept", "psnr",
                                                         "per_relation", "exemplars")}
        results["relation_prompts"] = {
            "relation_accuracy": rel["accuracy"], "chance": rel["chance"], "subject_fidelity": rel["subject_fidelity"],
            "videos": len(rel["items"]), "predicted_counts": {r: predicted.count(r) for r in sorted(set(predicted))}}
    (target / "checks.json").write_text(json.dumps(results, indent=1))
    return results


def _checks_heading(cfg: PretrainConfig) -> str:
    return f"{CHECKS_HEADING} (checks.json; sampler: {cfg.sample.steps} Euler steps, CFG {cfg.sample.guidance_scale})"


def _checks_section(cfg: PretrainConfig, results: dict) -> str:
    """The model card's table of the acceptance checks (rows only for what was measured) and the pictures."""
    f = results["subject_fidelity_generic"]
    rows = []
    r, rel = results.get("reconstruction"), results.get("relation_prompts")
    if r:
        rows.append(f"| relation judge on VAE reconstructions vs originals ({len(_rel())} x {cfg.sample.per_relation} "
                    f"relation clips of non-person kinds) | {r['judge_reconstructed']:.1%} vs {r['judge_original']:.1%} "
                    f"({r['kept']:.1%} kept; PSNR {r['psnr']:.1f} dB) | >= 90 % kept |")
        e = r.get("exemplars")
        if e:
            rows.append(f"| the same on `person` exemplars (what the trainer encodes: the bound on a LoRA's relation "
                        f"accuracy) | {e['judge_reconstructed']:.1%} vs {e['judge_original']:.1%} ({e['kept']:.1%} "
                        f"kept; PSNR {e['psnr']:.1f} dB) | |")
            kept = [rel_ for rel_, (_, ok, n) in e.get("per_relation", {}).items() if ok == n]
            if kept:
                rows.append(f"| relations whose `person` exemplars are all judged right after reconstruction "
                            f"({len(kept)} of {len(e['per_relation'])}) | {', '.join(kept)} | |")
    rows.append(f"| two subjects of the prompted kinds, generic prompts ({f['videos']} videos) | {f['rate']:.1%} (two "
                f"subjects found in {f['two_subjects_found']:.0%}) | >= 80 % |")
    pictures = ["Samples for generic prompts:", "", "![samples](card/samples_generic.png)"]
    if rel:
        top = sorted(rel["predicted_counts"].items(), key=lambda kv: -kv[1])[:4]
        rows += [f"| two subjects of the prompted kinds, relation evaluation prompts ({rel['videos']} videos) | "
                 f"{rel['subject_fidelity']:.1%} | |",
                 f"| relation accuracy on the relations' evaluation prompts | {rel['relation_accuracy']:.1%} (chance "
                 f"{rel['chance']:.1%}) | near chance |"]
        pictures = ["The judge has no \"no relation\" answer: the base's generic motions land on the most static "
                    f"relations ({', '.join(f'{k} {v}' for k, v in top)}), so a relation LoRA is judged against the "
                    "base per relation.", "",
                    "Reconstructions (each original above its reconstruction):", "",
                    "![reconstructions](card/reconstructions.png)", "",
                    "Samples for generic prompts, then for relation prompts (the base does not know the relation):",
                    "", "![samples](card/samples_generic.png)",
                    "![relation prompts](card/samples_relation_prompts.png)"]
    return "\n".join(["| check | result | needed |", "|---|---|---|", *rows, "", *pictures])


def write_card(cfg: PretrainConfig, out: Path, target: Path, results: dict) -> Path:
    params = {}
    for part in ("transformer", "vae", "text_encoder"):
        cfg_json = json.loads((target / part / "config.json").read_text())
        files = list((target / part).glob("*.safetensors"))
        params[part] = (cfg_json.get("_class_name", cfg_json.get("architectures", [part])[0]),
                        sum(f.stat().st_size for f in files) / 1e6)
    done = {s: json.loads((out / s / "DONE.json").read_text()) for s in ("vae", "transformer", "decoder")
            if (out / s / "DONE.json").is_file()}
    steps = {s: d["steps"] for s, d in done.items()}
    # stages finished before DONE.json named its device ran on the CPU
    devices = sorted({"a CUDA GPU" if d.get("device", "cpu").startswith("cuda") else "a CPU" for d in done.values()})
    made_on, size = " and ".join(devices) or "a CPU", cfg.world.size
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-video
tags: [mochi, synthetic, dreamrelation, dr-train]
---
# synth: a small Mochi-architecture base pretrained on the synth world

A `MochiPipeline` stack ({", ".join(f"{k} {c} {mb:.1f} MB" for k, (c, mb) in params.items())}) pretrained from
seed {cfg.world.seed} on {made_on} by `launch/pretrain_base.py` (dr-train). It draws 25 x {size} x {size} videos of two
subjects of the world's kinds ({", ".join(_kinds())}) doing generic motions, from captions like "A dog and a cat are
drifting around.". It has never seen a relation: the 26 relations and their words are kept out of its corpus, so a
relation LoRA trained on `person` exemplars is what teaches it one. It is dr-train's `model.preset: synth`.

```python
from diffusers import MochiPipeline
pipe = MochiPipeline.from_pretrained("dr_train/model/synth_base")
video = pipe("A robot and an owl are bouncing.", num_frames=25, height={size}, width={size}, num_inference_steps=32,
             guidance_scale=5.0, max_sequence_length=24).frames[0]
```

## How it was made
1. **VAE** (`AutoencoderKLMochi`, 8x space, 6x time, 12 latent channels, no attention blocks): {steps["vae"]} steps
   of L1 + {cfg.vae.kl_weight:g} KL on {cfg.vae.clip_frames}-frame windows of generic corpus clips (batch
   {cfg.vae.batch_size}, AdamW {cfg.vae.lr:g}). `latents_mean` / `latents_std` from {cfg.vae.stats_clips} clips.
2. **Text**: a T5 encoder ({cfg.text.layers} layers, width {cfg.text.d_model}) frozen at its seeded initialisation,
   and a T5 tokenizer whose whole-word pieces are the world's words (relation words included, never trained on).
3. **Transformer** (`MochiTransformer3DModel`, {cfg.transformer.layers} blocks, {cfg.transformer.heads} heads x
   {cfg.transformer.head_dim}; its learned RoPE rates start axially, `axial_rope_frequencies`, not at
   diffusers' zeros, with which it could not tell frame order): {steps["transformer"]} steps, batch
   {cfg.transformer.batch_size}, on
   {cfg.world.corpus_clips} encoded corpus clips, with dr-train's own rectified-flow objective (z_s = (1-s) z0 +
   s eps, s ~ U(0,1), timestep (1-s) 1000, target z0 - eps), caption dropout {cfg.transformer.caption_dropout};
   AdamW {cfg.transformer.lr:g}, EMA {cfg.transformer.ema} (the weights here, stored in bf16).
4. **Decoder**: {steps.get("decoder", 0)} steps fine-tuning the VAE's decoder with its encoder frozen (the latent
   space stays the one the transformer learned), L1 weighted {1 + cfg.decoder.subject_weight:g}x within 2 px of the
   subjects.

{_schedule_changes(cfg, out)}{_history(out)}Reproduce: `python launch/pretrain_base.py --minutes 60`, repeated until it says every stage is done (then
`--stages export --export-to dr_train/model/synth_base`). The recipe (`configs/pretrain_synth.yaml`):

```yaml
{dump_commented_yaml(cfg, HEADER)}```

![VAE](card/vae_curve.png)
![transformer](card/transformer_curve.png)
![decoder](card/decoder_curve.png)

{_checks_heading(cfg)}

{_checks_section(cfg, results)}
"""
    path = target / "README.md"
    path.write_text(text)
    return path


def _schedule_changes(cfg: PretrainConfig, out: Path) -> str:
    """A paragraph naming every step where a stage's learning rate rose after its warmup: the run was resumed with
    a longer `steps` (the cosine horizon moved), so a straight run of the recipe differs from this copy there."""
    found = []
    for stage, warmup in (("vae", cfg.vae.warmup_steps), ("transformer", cfg.transformer.warmup_steps),
                          ("decoder", cfg.decoder.warmup_steps)):
        path = out / stage / "metrics.jsonl"
        rows = [r for r in read_metrics(path) if r.get("lr") is not None] if path.is_file() else []
        for prev, row in zip(rows, rows[1:]):
            if row["step"] > warmup + 1 and row["lr"] > prev["lr"] * 1.01:
                found.append(f"{stage} at step {prev['step']} (lr {prev['lr']:.3g} -> {row['lr']:.3g})")
    if not found:
        return ""
    return ("**This copy's history**: its run was extended (resumed with more `steps`, which moves the cosine "
            "schedule's horizon) at " + "; ".join(found) + ". The recipe below gives the final lengths; a straight "
            "run of it follows one schedule instead.\n\n")


def _history(out: Path) -> str:
    """`<out>/history.md`, when the run folder has one: how this copy's stages came about where that differs from a
    straight run of the recipe (a stage made before a change to the world, say), quoted in the card."""
    path = out / "history.md"
    if not path.is_file():
        return ""
    return "**How its stages came about**: " + " ".join(path.read_text().split()) + "\n\n"


def _kinds() -> list[str]:
    return list(world.KINDS)


def _rel() -> tuple:
    return RELATIONS
