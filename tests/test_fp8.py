"""The fp8 frozen base: the layer against its torch reference (forward and backward), and whole presets against
their bf16 weights."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dr_train.method.triplet import add_relation_lora_triplet
from dr_train.model import load_mochi
from dr_train.model.fp8 import FP8, Fp8Linear, dequantize, quantize_frozen_linears, quantize_weight


def test_quantized_weights_are_within_e4m3_rounding():
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]      # rows of very different magnitude
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (37,)
    err = (dequantize(q, scale, torch.float32) - w).abs()
    # 3 mantissa bits: relative rounding <= 2^-4; e4m3's subnormals near zero: absolute <= scale * 2^-9
    assert bool((err <= 2 ** -4 * w.abs() + scale[:, None] * 2 ** -9 + 1e-12).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(3, 7, 33), (1, 65)])
def test_fp8_linear_matches_linear_with_the_dequantised_weight(dtype, tol, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[-1], 19).requires_grad_(False)
    layer = Fp8Linear(linear)
    w = dequantize(layer.weight_fp8, layer.scale, dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(*shape[:-1], 19, dtype=dtype) * 3.0          # an upstream gradient != 1
    out = layer(x)
    ref = F.linear(x_ref, w, linear.bias.to(dtype))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)


def test_autograd_keeps_only_the_fp8_weight():
    layer = Fp8Linear(torch.nn.Linear(64, 48).requires_grad_(False))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(torch.randn(5, 64, requires_grad=True)).sum()
    assert {t.dtype for t in kept if t.shape == (48, 64)} == {FP8}


@pytest.mark.parametrize("preset", ["tiny", "synth"])
def test_presets_with_an_fp8_base_stay_close_to_bf16(preset):
    base = load_mochi(preset, dtype="bf16", parts=("transformer",)).transformer
    add_relation_lora_triplet(base)
    base = base.float()                                     # bf16 weights, computed in fp32: the reference
    torch.manual_seed(0)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    quantized = copy.deepcopy(base)
    replaced = quantize_frozen_linears(quantized)
    assert replaced > 0
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in quantized.named_parameters() if "lora" in n)
    assert sum(v.nbytes for v in quantized.state_dict().values()) < 0.6 * sum(
        v.nbytes for v in base.state_dict().values()) / 2 + 1e6   # < 0.6x of the same weights in bf16

    cfg = base.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g)
    text = torch.randn(2, 8, cfg.text_embed_dim, generator=g)

    def run(model):
        xx = x.clone().requires_grad_(True)
        out = model(hidden_states=xx, encoder_hidden_states=text, timestep=torch.tensor([250.0, 750.0]),
                    encoder_attention_mask=torch.ones(2, 8, dtype=torch.bool), return_dict=False)[0]
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xx.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (out_ref, gx_ref, g_ref), (out, gx, grads) = run(base), run(quantized)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # stated bounds (docs/memory.md): output and input gradient within 5 %, the LoRA gradient (all adapters as one
    # vector) within 10 %, each adapter tensor within 25 %
    assert rel(out, out_ref) < 0.05
    assert rel(gx, gx_ref) < 0.05
    assert set(grads) == set(g_ref)
    keys = sorted(g_ref)
    assert rel(torch.cat([grads[k].flatten() for k in keys]), torch.cat([g_ref[k].flatten() for k in keys])) < 0.10
    assert max(rel(grads[k], g_ref[k]) for k in keys if g_ref[k].norm() > 0) < 0.25
