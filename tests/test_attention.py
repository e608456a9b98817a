import pytest
import torch

from dr_train.model import set_attention_backend, tiny_transformer


def _run(t, x, e, ts, m):
    return t(hidden_states=x, encoder_hidden_states=e, timestep=ts, encoder_attention_mask=m, return_dict=False)[0]


def _inputs(valid, seed):
    """Latents (requiring grad), text embeddings, timesteps and a text mask with `valid[b]` tokens in sample b."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 3, 6, 10, generator=g, requires_grad=True)
    e = torch.randn(2, 16, 32, generator=g)
    m = torch.zeros(2, 16, dtype=torch.bool)
    for b, n in enumerate(valid):
        m[b, :n] = True
    return x, e, torch.tensor([250.0, 900.0]), m


@pytest.mark.parametrize("valid", [(16, 16), (3, 11), (0, 7)])
def test_sdpa_backend_matches_diffusers_reference(valid):
    t = tiny_transformer()
    x, e, ts, m = _inputs(valid, seed=0)
    set_attention_backend(t, "sdpa")
    out = _run(t, x, e, ts, m)
    (grad,) = torch.autograd.grad((out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum(), x)
    set_attention_backend(t, "reference")
    ref = _run(t, x, e, ts, m)
    (ref_grad,) = torch.autograd.grad((ref * torch.linspace(-1, 2, ref.numel()).view_as(ref)).sum(), x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_backend_is_set_per_model_not_globally():
    a, b = tiny_transformer(), tiny_transformer()
    set_attention_backend(a, "reference")
    set_attention_backend(b, "sdpa")
    assert type(a.transformer_blocks[0].attn1.processor).__name__ == "MochiAttnProcessor2_0"
    assert type(b.transformer_blocks[0].attn1.processor).__name__ == "MaskedJointAttnProcessor"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(a, "flash9")


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash_attn_varlen_func's contract in plain torch: attention within each packed segment."""
    segments = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
        segments.append(torch.nn.functional.scaled_dot_product_attention(*seg).transpose(0, 1))
    return torch.cat(segments)


@pytest.mark.parametrize("valid", [(16, 16), (3, 11), (0, 7)])
def test_varlen_packing_matches_sdpa(valid):
    """The flash processor's packing (cu_seqlens, valid tokens, zeros at padding) with a torch varlen kernel."""
    from dr_train.model.attention import FlashVarlenJointAttnProcessor

    t = tiny_transformer()
    x, e, ts, m = _inputs(valid, seed=1)
    set_attention_backend(t, "sdpa")
    ref = _run(t, x, e, ts, m).float()
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    for block in t.transformer_blocks:
        block.attn1.processor = FlashVarlenJointAttnProcessor(varlen_fn=_varlen_reference)
    out = _run(t, x, e, ts, m).float()
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_flash_without_the_package_is_a_clear_error_and_auto_falls_back():
    from dr_train.model.attention import flash_attn_available, resolve_backend

    t = tiny_transformer()
    if flash_attn_available():
        pytest.skip("flash-attn is installed with CUDA here")
    assert resolve_backend("auto") == "sdpa"
    set_attention_backend(t, "auto")
    assert type(t.transformer_blocks[0].attn1.processor).__name__ == "MaskedJointAttnProcessor"
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        set_attention_backend(t, "flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with flash-attn")
def test_flash_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    t = tiny_transformer().cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 3, 6, 10, generator=g).cuda().to(torch.bfloat16).requires_grad_()
    e = torch.randn(2, 16, 32, generator=g).cuda().to(torch.bfloat16)
    m = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    m[0, :5], m[1, :16] = True, True
    ts = torch.tensor([250.0, 900.0], device="cuda")
    outs, grads = [], []
    for backend in ("sdpa", "flash"):
        set_attention_backend(t, backend)
        out = _run(t, x, e, ts, m).float()
        outs.append(out)
        grads.append(torch.autograd.grad(out.sum(), x)[0].float())
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads[1], grads[0], atol=5e-2, rtol=5e-2)
