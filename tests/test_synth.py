"""The shipped synth base (model.preset: synth): its sha256 manifest, what it generates, and the whole loop at its
smallest on it (train a relation, generate, judge, report), plus the demo's console output."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SYNTHETIC_CACHE
from dr_train.model.synth import SYNTH_DIR, verify_folder


def test_shipped_base_matches_its_manifest_and_tampering_is_refused(tmp_path):
    verify_folder(SYNTH_DIR)
    total = sum(p.stat().st_size for p in SYNTH_DIR.rglob("*") if p.is_file())
    assert total <= 25e6, f"the shipped base is {total / 1e6:.1f} MB"
    assert not [p for p in SYNTH_DIR.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    copy = tmp_path / "synth_base"
    shutil.copytree(SYNTH_DIR, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="transformer/diffusion_pytorch_model.safetensors does not match"):
        verify_folder(copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="has no SHA256SUMS"):
        verify_folder(copy)


def test_synth_preset_is_a_mochi_pipeline():
    from diffusers import MochiPipeline

    from dr_train.model import load_mochi

    comps = load_mochi("synth")
    assert comps.source == "synth" and comps.max_text_tokens == 24
    assert comps.transformer.dtype == torch.float32 and not any(p.requires_grad for p in comps.transformer.parameters())
    pipe = MochiPipeline.from_pretrained(SYNTH_DIR)
    assert pipe.vae.config.latents_std != tuple([1.0] * 12)            # the trained latent statistics


def test_base_draws_the_prompted_kinds():
    """A fixed set of generic two-kind prompts and seeds, judged by the kind classifier. The shipped base gets the
    exact pair in 85 % of its model card's 48 videos (the issue asks 80 %); by chance a video shows at least one of
    the two prompted kinds 44 % of the time (8 kinds) and the exact pair 3 %. This set gives 7 of 8 and 6 of 8, as
    did the 6 x 6 transformer before it (71 % on the card's videos); the base before the fixed layout of generic
    clips gave 7 of 8 and 2 of 8."""
    from dr_train.model import load_mochi
    from dr_train.pretrain.checks import generic_prompts
    from dr_train.generate import SamplerSettings, sample_videos
    from dr_train.eval.kinds import KindClassifier

    comps = load_mochi("synth", attention_backend="sdpa", parts=("transformer", "vae", "text_encoder"))
    pipe = comps.pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = generic_prompts(8)
    videos = sample_videos(pipe, comps.max_text_tokens, [p for p, _ in prompts],
                           SamplerSettings(32, 5.0, 25, 64, 64), list(range(8)))
    kinds = KindClassifier()
    found = [kinds.classify(v) or [] for v in videos]
    one = [bool(set(f) & set(k)) for f, (_, k) in zip(found, prompts)]
    exact = [sorted(f) == sorted(k) for f, (_, k) in zip(found, prompts)]
    assert sum(one) >= 7 and sum(exact) >= 5, list(zip(found, prompts))


def test_whole_loop_at_its_smallest_on_the_shipped_base(tmp_path):
    """One relation, a few steps (validation included), two generations, the world's metrics and the report."""
    from dr_train.config import load_config
    from dr_train.demo import run_demo

    cfg = load_config(None, ["model.preset=synth", "train.relations=handshaking", "train.max_steps=4",
                             "train.checkpoint_every=4", "data.videos_per_relation=4", "validation.every=4",
                             "validation.num_inference_steps=2", f"data.cache_dir={SYNTHETIC_CACHE}",
                             f"train.output_dir={tmp_path / 'runs'}"])
    out = run_demo(cfg, num_prompts=1, seeds=[0], steps=4, guidance_scale=5.0, batch_size=2)
    rows = {r["kind"]: r for r in out["metrics"]["rows"] if r["relation"] == "handshaking"}
    assert rows["lora"]["videos"] == 1 and rows["base"]["videos"] == 1
    for kind in ("lora", "base"):
        world = rows[kind]["world"]
        assert set(world) == {"relation_accuracy", "subject_fidelity", "appearance_leakage", "temporal_consistency"}
        assert world["temporal_consistency"]["n"] == 1 and 0 < world["temporal_consistency"]["mean"] <= 1
    html = (tmp_path / "runs" / "report.html").read_text()
    assert "Synth world metrics" in html and "relation accuracy" in html
    assert re.search(r"videos judged the trained relation: relation LoRAs \d of 1, base model \d of 1", html)
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "handshaking" / "metrics.jsonl").read_text()
               .splitlines()]
    assert metrics[-1]["validation_relation_accuracy"] is not None
    assert set(out["phases"]) == {"train", "generate", "evaluate", "report"}


def test_demo_console_has_a_table_and_no_per_step_lines_or_library_warnings(tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "demo.py"), "--relations", "handshaking", "--max-steps", "3",
           "--output-dir", str(tmp_path / "runs"), "--num-prompts", "1", "--gen-seeds", "0", "--gen-steps", "2",
           "--set", "data.videos_per_relation=4", "--set", "validation.every=3", "--set",
           "validation.num_inference_steps=2", "--set", f"data.cache_dir={SYNTHETIC_CACHE}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "relation accuracy" in proc.stdout and "report:" in proc.stdout
    assert re.search(r"judged the trained relation: relation LoRAs \d of 1, base model \d of 1", proc.stdout)
    assert "Warning" not in console and "warn(" not in console, console[-3000:]
    lines = [l for l in console.replace("\r", "\n").splitlines() if " INFO " in l]
    assert not [l for l in lines if "step 1" in l or "step 2" in l], lines        # no per-step log lines
    assert sum("relational contrastive loss skipped" in l for l in lines) <= 1
    assert np.isfinite([json.loads(l)["loss"] for l in
                        (tmp_path / "runs" / "handshaking" / "metrics.jsonl").read_text().splitlines()]).all()


def test_reconstruction_check_judges_the_person_exemplars_beside_the_other_kinds():
    """The bound on every relation result: the judge on the VAE's reconstructions of what the trainer encodes (two
    persons, one hue band), reported beside the non-person pairs' check, which the shipped VAE passes (>= 90 % of the
    judge's accuracy kept): a relation redrawn into what an 8x / 6x latent cannot carry fails here."""
    from dr_train.model import load_mochi
    from dr_train.pretrain.checks import BaseChecks
    from dr_train.pretrain.config import PretrainConfig

    comps = load_mochi("synth", parts=("vae", "text_encoder"))
    checks = BaseChecks(PretrainConfig(), SYNTH_DIR, vae=comps.vae, text_encoder=comps.text_encoder,
                        tokenizer=comps.tokenizer)
    rec = checks.reconstruction(per_relation=1)
    person = rec["exemplars"]
    assert len(rec["labels"]) == 26 and person["judge_original"] > 0.9 and rec["judge_original"] > 0.8
    assert 0.0 <= person["judge_reconstructed"] <= person["judge_original"] and person["psnr"] > 15
    assert person["kept"] == person["judge_reconstructed"] / person["judge_original"]
    assert rec["kept"] >= 0.9, {r: v for r, v in rec["per_relation"].items() if v[1] < v[0]}
    per = person["per_relation"]                # [originals right, reconstructions right, clips] per relation
    assert len(per) == 26 and all(n == 1 and 0 <= rec_ok <= 1 for _, rec_ok, n in per.values())
    assert sum(ok for ok, _, _ in per.values()) / 26 == person["judge_original"]
    assert sum(ok for _, ok, _ in per.values()) / 26 == person["judge_reconstructed"]


def test_base_tells_a_motion_from_the_same_motion_played_backwards():
    """A relation is an order of poses (the judge reads a time-shuffled clip as chance), so the base's velocity
    prediction must change when its input frames are reversed. The first base, whose RoPE rates started at
    diffusers' zeros, changed it by 0.1-0.2 % (on noised corpus clips) and learned no relation, not even by full
    fine-tuning on the exemplars; the shipped one changes it by 2.4 % here and learns relations (docs/synth.md)."""
    from dr_train.data import world
    from dr_train.data.encode import ClipEncoder
    from dr_train.method.flow_matching_loss import noisy_latents
    from dr_train.model import load_mochi

    comps = load_mochi("synth", attention_backend="sdpa")
    enc = ClipEncoder(comps.vae, comps.text_encoder, comps.tokenizer, comps.max_text_tokens, "synth")
    clips = [world.exemplar_clip(r, 0, 4242) for r in ("walking_apart", "walking_towards", "pushing", "following")]
    z0 = torch.from_numpy(enc.encode_videos(np.stack([c.frames for c in clips]))[0])
    text = [enc.encode_text(c.caption) for c in clips]
    embeds = torch.from_numpy(np.stack([t[0] for t in text]))
    masks = torch.from_numpy(np.stack([t[1] for t in text]))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    z_s, _, timestep = noisy_latents(z0, noise, torch.full((len(clips),), 0.5))

    def predict(x):
        with torch.no_grad():
            return comps.transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=timestep,
                                     encoder_attention_mask=masks, return_dict=False)[0]

    pred = predict(z_s)
    backwards = predict(z_s.flip(2)).flip(2)
    change = float((pred - backwards).pow(2).mean() / pred.pow(2).mean())
    assert change > 0.01, change
