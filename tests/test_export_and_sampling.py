"""Export -> MochiPipeline, and proof that the training objective matches the pipeline's sampler."""
import json

import numpy as np
import torch

from conftest import make_run, small_config
from dr_train.generate import generate
from dr_train.losses import noisy_latents
from dr_train.lora import export_inference_lora
from dr_train.model import load_mochi


def test_export_loads_into_mochi_pipeline_and_matches_relation_plus_ffn(tmp_path):
    cfg = small_config(tmp_path, **{"optim.lr": 5e-2})
    run = make_run(cfg, "handshaking", tmp_path / "r")
    for sel in ("relation", "subject1", "relation", "subject2"):
        run.hmt.draw = lambda s=sel: s
        run.train_step()
    path = export_inference_lora(run.transformer, tmp_path / "lora", ["relation", "ffn"])
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 12, 2, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    m, t = torch.ones(1, 16, dtype=torch.bool), torch.tensor([400.0])
    call = dict(hidden_states=x, encoder_hidden_states=e, timestep=t, encoder_attention_mask=m, return_dict=False)
    with torch.no_grad():
        run.transformer.set_adapters(["relation", "ffn"])
        expected = run.transformer(**call)[0]
        run.transformer.set_adapters(["relation", "subject1", "subject2", "ffn"])
        with_subjects = run.transformer(**call)[0]
    run.close()

    pipe = load_mochi("tiny").pipeline()
    with torch.no_grad():
        base = pipe.transformer(**call)[0]
    pipe.load_lora_weights(str(path.parent))
    with torch.no_grad():
        got = pipe.transformer(**call)[0]
    assert not torch.allclose(base, expected, atol=1e-4)                 # the LoRA does something
    assert not torch.allclose(with_subjects, expected, atol=1e-4)        # and subject LoRAs are excluded
    assert torch.allclose(got, expected, atol=1e-5)
    frames = pipe("A dog is shaking hands with a cat.", num_inference_steps=2, guidance_scale=6.0, num_frames=7,
                  height=16, width=16, max_sequence_length=16, output_type="np").frames[0]
    assert frames.shape == (7, 16, 16, 3) and np.isfinite(frames).all()


def test_generate_writes_mp4_grid_and_index(tmp_path):
    meta = generate("A dog is hugging a cat.", tmp_path / "gen", None, "tiny", steps=2, num_frames=7, height=16,
                    width=16)
    import av
    with av.open(meta["video"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 7
    from PIL import Image
    assert Image.open(meta["keyframes"]).size == (16 * 5, 16)
    assert json.loads((tmp_path / "gen" / "generation.json").read_text())["steps"] == 2


def _fit_and_sample(sign: float, steps: int) -> float:
    torch.manual_seed(0)
    comps = load_mochi("tiny")
    model = comps.transformer
    model.requires_grad_(True)
    z_star = torch.randn(1, 12, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    pipe = comps.pipeline()
    pipe.set_progress_bar_config(disable=True)
    embeds, mask, _, _ = pipe.encode_prompt("A person is hugging a person.", max_sequence_length=16,
                                            do_classifier_free_guidance=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        eps = torch.randn(8, *z_star.shape[1:], generator=g)
        z, target, t = noisy_latents(z_star.repeat(8, 1, 1, 1, 1), eps, torch.rand(8, generator=g))
        pred = model(hidden_states=z, encoder_hidden_states=embeds.repeat(8, 1, 1), timestep=t,
                     encoder_attention_mask=mask.repeat(8, 1), return_dict=False)[0]
        loss = (pred - sign * target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dists = []
    for seed in range(3):
        with torch.no_grad():
            out = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=1.0, num_frames=7,
                       height=32, width=32, num_inference_steps=32, output_type="latent",
                       generator=torch.Generator().manual_seed(seed)).frames
        dists.append(((out - z_star).norm() / z_star.norm()).item())
    return sum(dists) / len(dists)


def test_trained_velocity_model_samples_its_training_latent_with_mochi_pipeline():
    """Fit the whole tiny transformer to one latent with our objective; MochiPipeline's Euler sampler, started
    from noise, lands much nearer that latent than the untrained model does; the opposite sign lands farther."""
    untrained = _fit_and_sample(1.0, 0)
    ours = _fit_and_sample(1.0, 300)
    flipped = _fit_and_sample(-1.0, 300)
    assert ours < 0.6 * untrained, (ours, untrained)
    assert flipped > untrained > ours, (flipped, untrained, ours)
