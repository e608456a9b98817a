import pytest
import torch

from dr_train.model import load_mochi, save_tiny_preset, tiny_transformer


def test_tiny_preset_is_reproducible_and_matches_its_saved_folder(tmp_path):
    a, b = tiny_transformer(), tiny_transformer()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    folder = save_tiny_preset(tmp_path / "mochi")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    loaded = load_mochi(str(folder), dtype="fp32")
    assert loaded.scheduler.config.invert_sigmas
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), loaded.transformer.state_dict().values()))
    # the T5 length comes from the folder's transformer config (16 here; Mochi-1's says 256)
    assert loaded.max_text_tokens == 16 and not any(p.requires_grad for p in loaded.transformer.parameters())
    bf16 = load_mochi(str(folder))                                   # auto: bf16 base weights for a folder
    assert bf16.transformer.dtype == torch.bfloat16


def test_gradient_checkpointing_switch_gives_same_gradients():
    from dr_train.lora import add_relation_lora_triplet, lora_named_parameters

    grads = []
    for ckpt in (False, True):
        comps = load_mochi("tiny", gradient_checkpointing=ckpt)
        t = add_relation_lora_triplet(comps.transformer)
        t.train()
        assert t.is_gradient_checkpointing == ckpt
        g = torch.Generator().manual_seed(0)
        x, e = torch.randn(1, 12, 2, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
        for p in lora_named_parameters(t).values():
            torch.nn.init.normal_(p, std=0.1, generator=g) if p.dim() else None
        out = t(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([300.0]),
                encoder_attention_mask=torch.ones(1, 16, dtype=torch.bool), return_dict=False)[0]
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora_named_parameters(t).values()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither 'tiny', 'synth' nor an existing folder"):
        load_mochi(str(tmp_path / "nowhere"))
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(ValueError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        load_mochi(str(tmp_path / "half"))
