"""The analytic FLOP count against torch's FlopCounterMode, and perf/profile_step.py end to end on the tiny preset.

FlopCounterMode does not count CPU SDPA (aten._scaled_dot_product_flash_attention_for_cpu has no formula), so the
counted runs force the math SDPA backend, which is plain bmm and counted: QK^T + AV forward, and in backward only
the products autograd needs. The analytic count then agrees exactly, not just within a few percent.
"""
import functools
import inspect
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dr_train import flops
from dr_train.config import LoRAConfig
from dr_train.lora import adapter_parameters, add_relation_lora_triplet
from dr_train.model import load_mochi

SCRIPT = str(REPO / "perf" / "profile_step.py")


@functools.lru_cache(maxsize=None)
def measured_flops(latent_shape, text_tokens=16, lora=False, trainable=None, checkpointing=False, padded=0,
                   backend="sdpa"):
    """(forward FLOPs, forward + backward FLOPs) of the tiny transformer, as FlopCounterMode counts them; with
    `lora`, the relation LoRA triplet (default LoRAConfig) is added and `trainable` adapters get gradients."""
    transformer = load_mochi("tiny", attention_backend=backend, gradient_checkpointing=checkpointing).transformer
    if lora:
        add_relation_lora_triplet(transformer, LoRAConfig())
        for adapter, params in adapter_parameters(transformer).items():
            for p in params:
                p.requires_grad_(trainable is None or adapter in trainable)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(latent_shape, generator=gen)
    text = torch.randn(latent_shape[0], text_tokens, transformer.config.text_embed_dim, generator=gen)
    mask = torch.ones(latent_shape[0], text_tokens, dtype=torch.bool)
    if padded:
        mask[:, text_tokens - padded:] = False
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = transformer(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((latent_shape[0],), 300.0),
                          encoder_attention_mask=mask, return_dict=False)[0]
        forward = counter.get_total_flops()
        if lora:
            out.square().mean().backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("shape,padded,backend", [((1, 12, 3, 8, 8), 0, "sdpa"), ((2, 12, 2, 6, 10), 5, "sdpa"),
                                                   ((2, 12, 3, 8, 8), 5, "reference")])
def test_forward_flops_match_flop_counter(shape, padded, backend):
    fwd, _ = measured_flops(shape, padded=padded, backend=backend)
    # sdpa attends over the padded length (masked keys); diffusers' reference processor drops the padding
    attended = 16 - padded if backend == "reference" else None
    count = flops.forward_flops(load_mochi("tiny").transformer, shape, 16, attention_text_tokens=attended)
    assert count.forward == fwd
    assert count.linears + count.attention == pytest.approx(fwd, rel=0.01)   # rope's einsum is the rest
    assert count.backward == count.recompute == 0
    assert count.visual_tokens == shape[2] * (shape[3] // 2) * (shape[4] // 2)


@pytest.mark.parametrize("trainable", [None, ("subject1", "ffn")])
def test_training_flops_match_flop_counter(trainable):
    fwd, total = measured_flops((2, 12, 3, 8, 8), lora=True, trainable=trainable)
    count = flops.training_flops(load_mochi("tiny").transformer, (2, 12, 3, 8, 8), 16, LoRAConfig(),
                                 trainable=trainable)
    assert count.forward == fwd
    assert count.model == total
    assert count.lora > 0 and count.lora_backward > 0 and count.recompute == 0
    if trainable is None:                      # Q, K, V need gradients in every block: attention backward 2x
        assert count.attention_backward == 2 * (count.attention - count.by_layer["embed.pooler.attention"])


def test_checkpointing_recompute_adds_one_forward_of_the_blocks():
    _, plain = measured_flops((2, 12, 3, 8, 8), lora=True)
    _, ckpt = measured_flops((2, 12, 3, 8, 8), lora=True, checkpointing=True)
    count = flops.training_flops(load_mochi("tiny").transformer, (2, 12, 3, 8, 8), 16, LoRAConfig(),
                                 gradient_checkpointing=True)
    assert ckpt - plain == count.recompute == count.blocks_forward
    assert count.hardware == ckpt and count.model == plain
    block_keys = [k for k in count.by_layer if k.startswith(("blocks.", "lora."))]
    assert count.blocks_forward == sum(count.by_layer[k] for k in block_keys)


def test_mochi_dims_are_diffusers_defaults_and_peaks():
    from diffusers import MochiTransformer3DModel

    defaults = {k: v.default for k, v in inspect.signature(MochiTransformer3DModel.__init__).parameters.items()}
    for name, value in vars(flops.MOCHI_1).items():
        assert defaults[name] == value, name
    # 61x480x848: 11 x 30 x 53 visual tokens; attention and linears are about half the forward each
    c = flops.training_flops(flops.MOCHI_1, (1, 12, 11, 60, 106), 256, LoRAConfig(), gradient_checkpointing=True)
    assert c.visual_tokens == 17490 and c.attention_tokens == 17746
    assert 0.4 < c.attention / c.forward < 0.6
    assert c.recompute == pytest.approx(c.forward, rel=0.01)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756
    assert flops.peak_tflops("NVIDIA H200") == 989
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert flops.peak_tflops("Tesla T4") is None


def _run(args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_tiny_end_to_end(tmp_path):
    res = _run(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--out", "out"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jsons, pngs = list((tmp_path / "out").glob("profile_step_tiny_*.json")), list((tmp_path / "out").glob("*.png"))
    assert len(jsons) == 1 and len(pngs) == 1 and pngs[0].stat().st_size > 0
    result = json.loads(jsons[0].read_text())
    r = result["results"]
    assert result["status"] == "ok" and result["git_hash"] and result["versions"]["torch"]
    assert set(r["phases_median_s"]) == {"data", "forward", "loss", "backward", "optimizer", "comms", "other"}
    assert all(r["phases_median_s"][p] > 0 for p in ("data", "forward", "backward"))
    assert r["phases_median_s"]["comms"] == 0 and "single process" in r["phases_note"]["comms"]
    assert len(r["per_step"]) == 2 and all(s["seconds"] > 0 for s in r["per_step"])
    assert r["tokens_per_s"] > 0 and r["tflops_model"] > 0 and r["flops_per_step"]["model"] > 0
    assert result["flops_per_micro_step"]["visual_tokens"] == 3 * 4 * 4
    if not torch.cuda.is_available():
        assert r["mfu"] is None and r["memory"]["max_rss_GB"] > 0
        assert r["nvml"].startswith(("unavailable", "not sampled"))
    assert "step " in res.stdout and "json:" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cli_mochi_without_cuda_exits_with_a_clear_message(tmp_path):
    res = _run(["--preset", "mochi", "--out", "out"], tmp_path)
    assert res.returncode != 0
    assert "CUDA" in res.stderr and "--preset tiny" in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_mochi_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    """The mochi build path (Mochi-1 widths, random bf16 weights) through the trainer: 1 block, a tiny clip, in
    this process (a subprocess would spend most of its time importing)."""
    monkeypatch.setattr(sys, "path", [str(REPO / "perf"), *sys.path])     # restored after the test
    import profile_step

    monkeypatch.chdir(tmp_path)
    code = profile_step.main(["--preset", "mochi", "--device", "cpu", "--num-layers", "1", "--frames", "7",
                              "--height", "32", "--width", "32", "--steps", "1", "--warmup", "0", "--no-plot",
                              "--set", "model.max_text_tokens=8", "--out", "out"])
    assert code == 0
    assert torch.get_default_dtype() == torch.float32
    result = json.loads(next((tmp_path / "out").glob("profile_step_mochi_*.json")).read_text())
    assert result["config"]["dtype"] == "bfloat16" and result["config"]["model"]["num_layers"] == 1
    assert result["config"]["model"]["attention_head_dim"] == 128 and result["config"]["gradient_checkpointing"]
    assert result["flops_per_micro_step"]["recompute"] > 0
    assert result["targets"]["genmo"]["seconds_per_step"] == 3.35
    assert "genmo" in capsys.readouterr().out
