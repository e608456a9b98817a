"""LoRA export formats: the ComfyUI file, checked against a transcription of ComfyUI's own loader and Mochi model;
metadata and model card; re-export of any checkpoint with launch/export.py.

The ComfyUI side below is transcribed from github Comfy-Org/ComfyUI (comfyanonymous/ComfyUI) at commit
a125cd84b054a57729b5eecab930ca9408719832 (docs/export.md has the line-by-line citations), not from
dr_train.lora_formats, so a wrong mapping in our converter cannot agree with it by construction.
"""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, make_run, small_config
from dr_train.export import export_lora, main, training_card
from dr_train.lora import lora_named_parameters
from dr_train.lora_formats import from_comfyui

# ---- ComfyUI, transcribed ------------------------------------------------------------------------------------------


def comfy_model_weights(sd: dict, num_layers: int) -> dict:
    """ComfyUI's Mochi block weights (state-dict keys of model_base.GenmoMochi: 'diffusion_model.' + AsymmDiTJoint)
    from diffusers' weights. Names: comfy/ldm/genmo/joint_model/asymm_models_joint.py AsymmetricAttention (qkv_x,
    qkv_y, proj_x, proj_y; proj_y is nn.Identity when update_y=False) and AsymmetricJointBlock (mlp_x; mlp_y only
    when update_y), AsymmDiTJoint (update_y = b < depth - 1); layers.py FeedForward (w1, w2). Layout: the inverse of
    diffusers' convert_mochi_transformer_checkpoint_to_diffusers (qkv_x.chunk(3, dim=0) -> to_q, to_k, to_v;
    swap_proj_gate(mlp_x.w1) -> ff.net.0.proj, where swap_proj_gate(w) = cat([gate, proj]) of (proj, gate) =
    w.chunk(2))."""
    def swap_proj_gate(w):
        proj, gate = w.chunk(2, dim=0)
        return torch.cat([gate, proj], dim=0)

    out = {}
    for i in range(num_layers):
        d, c = f"transformer_blocks.{i}.", f"diffusion_model.blocks.{i}."
        out[c + "attn.qkv_x.weight"] = torch.cat([sd[d + f"attn1.to_{p}.weight"] for p in "qkv"])
        out[c + "attn.qkv_y.weight"] = torch.cat([sd[d + f"attn1.add_{p}_proj.weight"] for p in "qkv"])
        out[c + "attn.proj_x.weight"] = sd[d + "attn1.to_out.0.weight"]
        out[c + "mlp_x.w1.weight"] = swap_proj_gate(sd[d + "ff.net.0.proj.weight"])
        out[c + "mlp_x.w2.weight"] = sd[d + "ff.net.2.weight"]
        if i < num_layers - 1:
            out[c + "attn.proj_y.weight"] = sd[d + "attn1.to_add_out.weight"]
            out[c + "mlp_y.w1.weight"] = swap_proj_gate(sd[d + "ff_context.net.0.proj.weight"])
            out[c + "mlp_y.w2.weight"] = sd[d + "ff_context.net.2.weight"]
    return out


def comfy_key_map(model_keys) -> dict:
    """comfy/lora.py model_lora_keys_unet: the generic "Comfy" format (lines 179-184, for every model) and the
    GenmoMochi branch (lines 268-272, 'Official Mochi lora format'); unet_to_diffusers gives {} for Mochi."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map[k[len("diffusion_model."):-len(".weight")]] = k
    return key_map


def comfy_load_lora(lora: dict, to_load: dict) -> tuple[dict, list]:
    """comfy/lora.py load_lora (lines 37-58: '.alpha' via .item()) with comfy/weight_adapter/lora.py LoRAAdapter.load
    (the lora_up/lora_down, diffusers lora_B/lora_A and mochi lora_B/lora_A spellings; up = mat1, down = mat2).
    Returns {model key: (up, down, alpha)} and the file keys it did not load ('lora key not loaded')."""
    patches, loaded = {}, set()
    for x in to_load:
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.alpha" in lora:
            loaded.add(f"{x}.alpha")
        for up, down in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                         (f"{x}.lora_B.weight", f"{x}.lora_A.weight"), (f"{x}.lora_B", f"{x}.lora_A")):
            if up in lora:
                patches[to_load[x]] = (lora[up], lora[down], alpha)
                loaded |= {up, down}
                break
    return patches, sorted(set(lora) - loaded)


def comfy_calculate_weight(weight, up, down, alpha, strength=1.0):
    """comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight (lines 174-208): alpha / mat2.shape[0] (the
    down's rank) when an alpha key exists, else 1; weight += strength * alpha * mat1 @ mat2."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return weight + (strength * scale) * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(
        weight.shape)


# ---- fixtures ------------------------------------------------------------------------------------------------------

EVERY_PROJECTION = {   # every projection dr-train can place a LoRA on; to_q shared by two exported adapters
    "relation": ["to_q", "to_k", "add_q_proj", "add_k_proj", "ff.net.0.proj", "ff_context.net.0.proj"],
    "subject1": ["to_v", "add_v_proj"],
    "subject2": ["to_v"],
    "ffn": ["to_out.0", "to_add_out", "ff.net.2", "ff_context.net.2", "to_q"],
}
EXPORTED = ["relation", "subject1", "ffn"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    cfg = small_config(tmp, **{"lora.placement": json.dumps(EVERY_PROJECTION), "lora.rank": 3, "lora.alpha": 5.0})
    run = make_run(cfg, "handshaking", tmp / "r")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_named_parameters(run.transformer).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    image = tmp / "r" / "validation" / "step-00000004" / "00_s0" / "keyframes.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    metadata = {"relation": "handshaking", "prompt": run.relation.prompt, "placement": EVERY_PROJECTION,
                "rank": 3, "alpha": 5.0, "base_model": "tiny", "steps": 4}
    paths = export_lora(run.transformer, tmp / "r" / "lora", EXPORTED, metadata=metadata,
                        card=training_card(cfg.to_dict(), [image]))
    yield run, paths
    run.close()


def _merged_and_base(transformer, adapters):
    """diffusers weights with `adapters` merged (PEFT's own get_delta_weight) and without any LoRA."""
    from peft.tuners.lora import LoraLayer

    base, merged = {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            w = module.base_layer.weight.detach().float()
            base[f"{name}.weight"] = w
            merged[f"{name}.weight"] = w + sum((module.get_delta_weight(a).detach().float()
                                                for a in adapters if a in module.lora_A), torch.zeros_like(w))
        elif isinstance(module, torch.nn.Linear) and not any(s in name for s in ("lora_", "base_layer")):
            base[f"{name}.weight"] = merged[f"{name}.weight"] = module.weight.detach().float()
    return base, merged


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_transcribed_comfy_layout_computes_what_diffusers_computes():
    """The transcription itself: genmo's fused qkv view and FeedForward on the converted weights give diffusers'
    q/k/v and SwiGLU outputs (asymm_models_joint.py line 135: .view(B, N, 3, heads, -1).unbind(2); layers.py lines
    94-97: x, gate = w1(x).chunk(2); w2(silu(x) * gate))."""
    from dr_train.model import tiny_transformer

    model = tiny_transformer()
    sd = {k: v.float() for k, v in model.state_dict().items()}
    comfy = comfy_model_weights(sd, model.config.num_layers)
    h = torch.randn(1, 5, model.config.num_attention_heads * model.config.attention_head_dim)
    block = model.transformer_blocks[0]
    heads = model.config.num_attention_heads
    q, k, v = (h @ comfy["diffusion_model.blocks.0.attn.qkv_x.weight"].T).view(1, 5, 3, heads, -1).unbind(2)
    assert torch.allclose(q.flatten(2), block.attn1.to_q(h), atol=1e-6)
    assert torch.allclose(k.flatten(2), block.attn1.to_k(h), atol=1e-6)
    assert torch.allclose(v.flatten(2), block.attn1.to_v(h), atol=1e-6)
    x, gate = (h @ comfy["diffusion_model.blocks.0.mlp_x.w1.weight"].T).chunk(2, dim=-1)
    genmo = (F.silu(x) * gate) @ comfy["diffusion_model.blocks.0.mlp_x.w2.weight"].T
    assert torch.allclose(genmo, block.ff(h), atol=1e-5)


def test_comfyui_file_applies_exactly_the_diffusers_delta_to_comfyui_weights(exported):
    run, paths = exported
    transformer = run.transformer
    layers = transformer.config.num_layers
    base, merged = _merged_and_base(transformer, EXPORTED)
    strip = lambda sd: {k.replace(".base_layer", ""): v for k, v in sd.items()}
    comfy_base = comfy_model_weights(strip(base), layers)
    comfy_expected = comfy_model_weights(strip(merged), layers)

    lora = load_file(str(paths["comfyui"]))
    patches, not_loaded = comfy_load_lora(lora, comfy_key_map(comfy_base))
    assert not_loaded == []                                      # ComfyUI would warn 'lora key not loaded'
    patched = {k: comfy_calculate_weight(w, *patches[k]) if k in patches else w for k, w in comfy_base.items()}
    changed = {k for k in comfy_base if not torch.equal(comfy_base[k], comfy_expected[k])}
    assert set(patches) == changed                               # every LoRA'd ComfyUI weight, and only those
    assert {"diffusion_model.blocks.0.attn.qkv_x.weight", "diffusion_model.blocks.1.attn.qkv_y.weight"} <= set(patches)
    assert "diffusion_model.blocks.0.mlp_y.w1.weight" in patches and "diffusion_model.blocks.1.mlp_y.w1.weight" \
        not in comfy_base                                        # the last block has no text MLP
    for k in comfy_base:
        assert torch.allclose(patched[k], comfy_expected[k], atol=1e-6), k
    # ComfyUI ignores the diffusers file for Mochi: no key of it maps (hence the separate ComfyUI file)
    diffusers_patches, skipped = comfy_load_lora(load_file(str(paths["diffusers"])), comfy_key_map(comfy_base))
    assert diffusers_patches == {} and len(skipped) == len(load_file(str(paths["diffusers"])))


def test_comfyui_layout_round_trips_to_the_diffusers_file(exported):
    run, paths = exported
    layers = run.transformer.config.num_layers
    diffusers = load_file(str(paths["diffusers"]))
    comfy = load_file(str(paths["comfyui"]))
    with safe_open(str(paths["comfyui"]), "pt") as f:
        splits = json.loads(f.metadata()["rank_splits"])
    assert splits["blocks.0.attn.qkv_x"] == [6, 3, 3]            # to_q: relation + ffn; to_v: subject1 (exported)
    back = from_comfyui(comfy, layers, splits)
    assert sorted(back) == sorted(diffusers)
    assert all(torch.equal(back[k], diffusers[k]) for k in diffusers)
    # without the splits: the same delta per diffusers module
    approx = from_comfyui(comfy, layers)
    for key in (k for k in diffusers if k.endswith("lora_A.weight")):
        b = key.replace("lora_A", "lora_B")
        assert torch.allclose(approx[b] @ approx[key], diffusers[b] @ diffusers[key], atol=1e-6), key
    with pytest.raises(ValueError, match="to_add_out"):
        from_comfyui({"diffusion_model.blocks.1.attn.proj_y.lora_up.weight": torch.zeros(32, 1),
                      "diffusion_model.blocks.1.attn.proj_y.lora_down.weight": torch.zeros(1, 32)}, layers)


def test_every_file_carries_string_metadata_and_the_card(exported):
    run, paths = exported
    config = {k: v for k, v in dict(run.transformer.config).items() if not k.startswith("_")}
    sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    for kind in ("diffusers", "comfyui"):
        with safe_open(str(paths[kind]), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and meta["lora_format"] == kind
        assert meta["relation"] == "handshaking" and meta["prompt"] == run.relation.prompt
        assert json.loads(meta["placement"]) == EVERY_PROJECTION
        assert (meta["rank"], meta["alpha"], meta["steps"], meta["base_model"]) == ("3", "5.0", "4", "tiny")
        assert meta["base_model_config_sha256"] == sha
        assert meta["method_version"] == "0.1.0" and meta["method_commit"]
        assert meta["adapters"] == "relation,subject1,ffn"
    text = paths["card"].read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "diffusers" and front["base_model"]
    assert front["tags"] == ["lora", "text-to-video", "mochi", "dreamrelation"]
    assert front["instance_prompt"] == run.relation.prompt
    assert 'weight_name=\'pytorch_lora_weights.safetensors\'' in text and "load_lora_weights(" in text
    assert paths["comfyui"].name in text and "ComfyUI/models/loras/" in text
    assert "## Validation keyframes" in text and "](../validation/step-00000004/00_s0/keyframes.png)" in text
    for setting in ("learning rate", "loss mode", "HMT forward", "| rank | 3 |", "| alpha | 5.0 |"):
        assert setting in text


def test_config_hash_ignores_where_the_model_was_loaded_from(tmp_path):
    from diffusers import MochiTransformer3DModel

    from dr_train.export import config_sha256
    from dr_train.model import tiny_transformer

    model = tiny_transformer()
    model.save_pretrained(tmp_path / "t")
    assert config_sha256(MochiTransformer3DModel.from_pretrained(tmp_path / "t")) == config_sha256(model)
    other = MochiTransformer3DModel(**{**dict(model.config), "num_layers": 1})
    assert config_sha256(other) != config_sha256(model)


def test_export_refuses_unknown_formats(exported, tmp_path):
    run, _ = exported
    with pytest.raises(ValueError, match="'safetensor'"):
        export_lora(run.transformer, tmp_path / "x", ["relation"], formats=("diffusers", "safetensor"))
    assert not (tmp_path / "x").exists()
    paths = export_lora(run.transformer, tmp_path / "c", ["relation"], formats=("comfyui",),
                        metadata={"relation": "handshaking"})
    assert set(paths) == {"comfyui"} and not (tmp_path / "c" / "pytorch_lora_weights.safetensors").exists()


# ---- launch/export.py on a trained run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dr_train.trainer import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = small_config(tmp, **{"train.relations": "handshaking", "train.max_steps": 4, "train.checkpoint_every": 2,
                               "optim.lr": 5e-2})
    train(cfg)
    rel = tmp / "runs" / "handshaking"
    written = load_file(str(rel / "lora" / "pytorch_lora_weights.safetensors"))   # by the trainer, at step 4
    return rel, written


def test_reexport_of_the_latest_checkpoint_equals_the_trainers_file(trained):
    rel, written = trained
    assert main([str(rel), "--out", str(rel / "again")]) == 0
    again = load_file(str(rel / "again" / "pytorch_lora_weights.safetensors"))
    assert sorted(again) == sorted(written) and all(torch.equal(again[k], written[k]) for k in written)
    with safe_open(str(rel / "again" / "handshaking_comfyui.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "4" and meta["adapters"] == "relation,ffn" and meta["relation"] == "handshaking"
    card = (rel / "again" / "README.md").read_text()
    assert "instance_prompt:" in card and "Validation keyframes" not in card       # tiny preset: no validation


def test_step_picks_an_earlier_checkpoint_into_lora_step_n(trained):
    rel, written = trained
    assert main([str(rel), "--step", "2", "--format", "diffusers"]) == 0
    out = rel / "lora-step-2"
    early = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sorted(early) == sorted(written) and not all(torch.equal(early[k], written[k]) for k in written)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["steps"] == "2"
    assert (out / "README.md").is_file() and not list(out.glob("*_comfyui.safetensors"))


@pytest.mark.parametrize("args, message", [
    (["--step", "3"], "no checkpoint at step 3; steps: 2, 4"),
    (["--adapters", "relation,subject9"], "cannot export adapter(s) ['subject9']"),
    (["--format", "onnx"], "unknown LoRA export format(s) 'onnx'"),
])
def test_cli_errors_are_one_line(trained, capsys, args, message):
    rel, _ = trained
    assert main([str(rel), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_launch_script_reports_a_missing_run_folder(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: relation folder {tmp_path / 'nope'} does not exist (give <run>/<relation>)"
