"""Pretraining the synth base (dr_train/pretrain/) on a micro recipe: every stage runs, stops and resumes exactly,
and the exported folder is a diffusers Mochi pipeline that the `synth`-style loader verifies and loads."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dr_train import checkpoint as ckpt
from dr_train.pretrain.config import load_pretrain_config
from dr_train.pretrain.loop import run_stage

MICRO = ["world.corpus_clips=24", "vae.steps=3", "vae.batch_size=1", "vae.clip_frames=7", "vae.stats_clips=4",
         "vae.warmup_steps=1", "decoder.steps=2", "decoder.batch_size=1", "decoder.clip_frames=7",
         "decoder.warmup_steps=1", "transformer.steps=3", "transformer.batch_size=4", "transformer.warmup_steps=1",
         "transformer.heads=2", "transformer.layers=2", "transformer.sample_every=1000", "transformer.sample_videos=2", "text.d_model=32",
         "sample.steps=2", "sample.fidelity_videos=2", "sample.per_relation=0", "run.checkpoint_minutes=1000"]


def _cfg(tmp_path, *extra):
    return load_pretrain_config(None, MICRO + [f"run.out={tmp_path / 'out'}", *extra])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_synth_transformer_knows_where_and_when_each_token_is():
    """diffusers starts Mochi's RoPE rates at zero (no position at all); the synth transformer starts from
    axial_rope_frequencies, one axis per rotation pair, so even untrained its prediction depends on frame order and
    on left and right (the first base, pretrained from zeros, could not tell a motion from its reverse)."""
    from dr_train.model.synth import axial_rope_frequencies, synth_transformer

    freqs = axial_rope_frequencies(heads=2, head_dim=32)
    assert freqs.shape == (3, 2, 16) and ((freqs != 0).sum(dim=0) == 1).all()
    assert [int((freqs[a, 0] != 0).sum()) for a in range(3)] == [6, 5, 5]
    model = synth_transformer(3, 32, heads=2, head_dim=32, layers=2).eval()
    assert torch.equal(model.pos_frequencies.detach(), freqs)
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 12, 5, 8, 8, generator=g), torch.randn(2, 24, 32, generator=g)
    kwargs = dict(encoder_hidden_states=text, timestep=torch.tensor([500.0, 200.0]),
                  encoder_attention_mask=torch.ones(2, 24, dtype=torch.bool), return_dict=False)
    with torch.no_grad():
        pred = model(hidden_states=z, **kwargs)[0]
        for dim in (2, 4):                                         # time, width
            flipped = model(hidden_states=z.flip(dim), **kwargs)[0].flip(dim)
            assert float((pred - flipped).pow(2).mean() / pred.pow(2).mean()) > 1e-3, dim
        model.pos_frequencies.zero_()
        pred = model(hidden_states=z, **kwargs)[0]
        flipped = model(hidden_states=z.flip(2), **kwargs)[0].flip(2)
    assert float((pred - flipped).abs().max()) < 1e-5                 # zero rates: blind to frame order


def test_vae_stage_resumed_from_a_checkpoint_equals_a_straight_run(tmp_path):
    from dr_train.pretrain.vae import VAEStage

    cfg = _cfg(tmp_path)
    straight = VAEStage(cfg)
    assert run_stage(straight, tmp_path / "a", checkpoint_minutes=0) is True
    first = VAEStage(cfg)
    assert run_stage(first, tmp_path / "b", checkpoint_minutes=0, minutes=0.0) is False   # one step, then out of time
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000001"]
    resumed = VAEStage(cfg)
    assert run_stage(resumed, tmp_path / "b", checkpoint_minutes=0) is True
    assert _same(straight.model.state_dict(), resumed.model.state_dict())
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000


def test_pretraining_runs_every_stage_and_exports_a_verified_mochi_folder(tmp_path):
    """The command line in two chunks (the VAE stage alone, then the rest), each re-run continuing the last."""
    from diffusers import MochiPipeline

    from dr_train.model import load_mochi
    from dr_train.model.synth import verify_folder

    script = str(REPO / "launch" / "pretrain_base.py")
    args = [arg for item in MICRO for arg in ("--set", item)] + ["--set", f"run.out={tmp_path / 'out'}"]
    first = subprocess.run([sys.executable, script, *args, "--stages", "vae"], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0 and "every stage is done" in first.stdout, first.stderr[-2000:]
    target = tmp_path / "base"
    (tmp_path / "out" / "history.md").write_text("Its VAE was trained\nbefore a change to the world.\n")
    rest = subprocess.run([sys.executable, script, *args, "--export-to", str(target)], capture_output=True, text=True,
                          timeout=900)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "step/s" in rest.stderr or "s/step" in rest.stderr                    # progress bars with rates
    verify_folder(target)
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "README.md", "checks.json"):
        assert (target / part).exists(), part
    assert json.loads((tmp_path / "out" / "decoder" / "DONE.json").read_text()) == {"stage": "decoder", "steps": 2,
                                                                                    "device": "cpu"}
    from diffusers import AutoencoderKLMochi
    shipped, encoded = AutoencoderKLMochi.from_pretrained(target / "vae"), \
        AutoencoderKLMochi.from_pretrained(tmp_path / "out" / "corpus" / "vae")
    enc = lambda m: {k: v for k, v in m.state_dict().items() if k.startswith("encoder.")}  # noqa: E731
    assert _same(enc(shipped), enc(encoded))                    # the corpus's latent space, frozen
    assert not _same(shipped.decoder.state_dict(), encoded.decoder.state_dict())       # the fine-tuned decoder
    assert shipped.config.latents_std == encoded.config.latents_std
    assert not list(target.rglob("*.bin")) and not list(target.rglob("*.pt"))   # safetensors only
    pipe = MochiPipeline.from_pretrained(target)
    assert pipe.transformer.config.num_layers == 2
    comps = load_mochi(str(target), dtype="fp32")
    assert comps.max_text_tokens == 24 and comps.transformer.dtype == torch.float32
    checks = json.loads((target / "checks.json").read_text())
    assert checks["subject_fidelity_generic"]["videos"] == 2
    card = (target / "README.md").read_text()
    assert "library_name: diffusers" in card and "on a CPU by `launch/pretrain_base.py`" in card
    assert "draws 25 x 64 x 64 videos" in card
    assert "**How its stages came about**: Its VAE was trained before a change to the world." in card
    # --recheck: the checks again on the exported weights (as after a change to the world's relations); the card
    # keeps how the base was made, its checks section and checks.json are rewritten, and the manifest still holds
    weights = (target / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = subprocess.run([sys.executable, script, *args, "--set", "sample.fidelity_videos=3", "--recheck",
                            str(target)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    verify_folder(target)
    assert json.loads((target / "checks.json").read_text())["subject_fidelity_generic"]["videos"] == 3
    rechecked = (target / "README.md").read_text()
    assert rechecked.split("## What it does")[0] == card.split("## What it does")[0]
    assert "generic prompts (3 videos)" in rechecked and "generic prompts (2 videos)" in card
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    (target / "vae" / "config.json").write_text((target / "vae" / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="vae/config.json does not match its sha256"):
        verify_folder(target)
    refused = subprocess.run([sys.executable, script, *args, "--recheck", str(target)], capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode == 2 and "vae/config.json does not match its sha256" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    # a finished transformer extended by 2 steps, its cosine still ending at step 3: the new steps run at 10 %
    curve = tmp_path / "out" / "transformer" / "metrics.jsonl"
    before = curve.read_text().splitlines()
    (tmp_path / "out" / "transformer" / "DONE.json").unlink()
    more = subprocess.run([sys.executable, script, *args, "--stages", "transformer", "--set", "transformer.steps=5",
                           "--set", "transformer.decay_steps=3"], capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    assert curve.read_text().splitlines()[:3] == before and [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    peak = load_pretrain_config(None, MICRO).transformer.lr
    assert rows[2]["lr"] > 0.1 * peak and rows[3]["lr"] == rows[4]["lr"] == pytest.approx(0.1 * peak)
    with pytest.raises(ValueError, match="transformer.decay_steps must be between 0 and transformer.steps"):
        load_pretrain_config(None, MICRO + ["transformer.decay_steps=4"])


class _Counter:
    """A stage whose state is one number, that receives SIGTERM in its `kill_at`-th step (as a scheduler's
    preemption or `kill` would deliver it)."""
    name, files = "counter", ("weights",)

    def __init__(self, total: int, kill_at: int | None = None):
        self.total_steps, self.kill_at, self.value = total, kill_at, torch.zeros(1)

    def state(self):
        return {"weights": {"value": self.value.clone()}}, {}

    def load(self, tensors, state):
        self.value = tensors["weights"]["value"].clone()

    def train_step(self, step):
        self.value += step
        if step + 1 == self.kill_at:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": float(self.value)}

    def check(self, step):
        return None


def test_sigterm_writes_a_checkpoint_and_the_stage_resumes_where_it_stopped(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_stage(_Counter(10, kill_at=4), tmp_path / "counter")
    assert signal.getsignal(signal.SIGTERM) is before                 # the handler is put back
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "counter" / "checkpoints")] == ["step-00000004"]
    stage = _Counter(10)
    assert run_stage(stage, tmp_path / "counter")
    assert float(stage.value) == sum(range(10))                      # nothing redone, nothing skipped
    steps = [json.loads(l)["step"] for l in (tmp_path / "counter" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_render_workers_give_the_batches_the_training_process_renders(tmp_path):
    """run.workers renders ahead in spawned processes: the same clips, windows and masks, also after a jump (a
    resumed stage), and the stages train to the same weights and corpus with and without them."""
    import numpy as np
    from safetensors.torch import load_file

    from dr_train.pretrain import corpus
    from dr_train.pretrain.prefetch import Prefetcher
    from dr_train.pretrain.vae import VAEStage, render_windows

    args = lambda step: (0, 100 + 2 * step, 2, 7, step)  # noqa: E731
    ahead = Prefetcher(render_windows, args, workers=2, steps=6)
    try:
        for step in (0, 1, 2, 5, 3):
            got, want = ahead.get(step), render_windows(*args(step))
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), step
        assert all(s < 6 for s in ahead.pending)                       # nothing rendered past the last step
    finally:
        ahead.close()
    with pytest.raises(ValueError, match="run.workers must be >= 0"):
        load_pretrain_config(None, MICRO + ["run.workers=-1"])

    stages = {}
    for workers in (0, 1):
        cfg = _cfg(tmp_path / str(workers), f"run.workers={workers}")
        stage = stages[workers] = VAEStage(cfg)
        try:
            assert run_stage(stage, tmp_path / str(workers) / "vae", checkpoint_minutes=1000)
        finally:
            stage.close()
        stage.save(tmp_path / str(workers) / "out" / "vae" / "final")
        assert corpus.build(cfg, tmp_path / str(workers) / "out", None)
    assert _same(stages[0].model.state_dict(), stages[1].model.state_dict())
    block = "corpus/block-00000.safetensors"
    assert _same(load_file(tmp_path / "0" / "out" / block), load_file(tmp_path / "1" / "out" / block))


def test_run_device_is_checked_before_any_work(tmp_path):
    from dr_train.distributed import pick_device

    assert pick_device("cpu", "run.device") == torch.device("cpu")
    assert pick_device("auto", "run.device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="run.device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        pick_device("tpu", "run.device")
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="run.device is 'cuda:1' but this machine has no CUDA device"):
        pick_device("cuda:1", "run.device")
    args = [arg for item in MICRO for arg in ("--set", item)] + ["--set", f"run.out={tmp_path / 'out'}"]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain_base.py"), *args, "--set",
                           "run.device=cuda"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: run.device is 'cuda' but this machine has no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()                              # nothing started


def test_world_size_sets_the_clips_every_stage_and_check_draws(tmp_path):
    from dr_train.pretrain import corpus
    from dr_train.pretrain.checks import BaseChecks
    from dr_train.pretrain.vae import VAEStage

    cfg = _cfg(tmp_path, "world.size=80")
    stage = VAEStage(cfg)
    assert tuple(stage.batch(0).shape) == (1, 3, 7, 80, 80) and stage.check_clips.shape[2:4] == (80, 80)
    frames, captions = corpus.render_corpus(0, 2, 0, 80)
    assert frames.shape == (2, 25, 80, 80, 3) and len(captions) == 2
    checks = BaseChecks(cfg, tmp_path, vae=stage.model, text_encoder=torch.nn.Identity(), tokenizer=object())
    assert (checks.settings.height, checks.settings.width) == (80, 80)
    for bad in (72, 48, 144):
        with pytest.raises(ValueError, match=f"world.size must be a multiple of 16 from 64 to 128, got {bad}"):
            load_pretrain_config(None, MICRO + [f"world.size={bad}"])
