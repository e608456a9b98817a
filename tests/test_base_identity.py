"""dr_train/base_identity.py: what a LoRA, a checkpoint and a generated video record of the base they were made on."""
import shutil

import pytest

from dr_train import base_identity as bi


def _folder(root):
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text('{"latent_channels": 12}')
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text('{"num_layers": 2}')
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    (root / "model_index.json").write_text("{}")
    return root


def test_a_folder_s_identity_follows_configs_and_weight_sizes_not_its_path(tmp_path):
    a = _folder(tmp_path / "a")
    first = bi.base_identity(str(a))
    assert first.startswith("folder:")
    moved = shutil.copytree(a, tmp_path / "elsewhere" / "b")
    assert bi.base_identity(str(moved)) == first
    (moved / "transformer" / "config.json").write_text('{"num_layers": 3}')
    assert bi.base_identity(str(moved)) != first
    (moved / "transformer" / "config.json").write_text('{"num_layers": 2}')
    (moved / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 65)
    assert bi.base_identity(str(moved)) != first
    encoders = bi.base_identity(str(moved), bi.ENCODER_PARTS)
    assert encoders == bi.base_identity(str(a), bi.ENCODER_PARTS)     # a transformer change leaves the encoders'
    (moved / "vae" / "config.json").write_text('{"latent_channels": 16}')
    assert bi.base_identity(str(moved), bi.ENCODER_PARTS) != encoders
    with pytest.raises(ValueError, match="'missing' is neither 'tiny', 'synth' nor an existing folder"):
        bi.base_identity("missing")


def test_the_synth_identity_is_its_manifest_s(tmp_path, monkeypatch):
    assert bi.base_identity("tiny") == "tiny"
    shipped = bi.base_identity("synth")
    assert shipped.startswith("synth:") and shipped == bi.base_identity("synth")
    monkeypatch.setattr(bi, "SYNTH_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"synth base {tmp_path} has no SHA256SUMS"):
        bi.base_identity("synth")
    (tmp_path / "SHA256SUMS").write_text("00  transformer/config.json\n")
    retrained = bi.base_identity("synth")
    assert retrained.startswith("synth:") and retrained != shipped


def test_the_synthetic_dataset_cache_follows_the_encoders_identity(tmp_path, monkeypatch):
    """Latents encoded by another VAE / T5 under the same preset name are not reused."""
    from conftest import small_config
    from dr_train.data import sources

    cfg = small_config(tmp_path, **{"model.preset": "synth"})
    shipped = sources.synthetic_dataset_dir(cfg)
    assert bi.base_identity("synth", bi.ENCODER_PARTS) != bi.base_identity("synth")
    monkeypatch.setattr(sources, "base_identity", lambda preset, parts=(): f"synth:retrained{parts}")
    assert sources.synthetic_dataset_dir(cfg) != shipped
