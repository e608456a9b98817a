import pytest
import torch

from dr_train.model import set_attention_backend, tiny_transformer


def _run(t, x, e, ts, m):
    return t(hidden_states=x, encoder_hidden_states=e, timestep=ts, encoder_attention_mask=m, return_dict=False)[0]


@pytest.mark.parametrize("valid", [(16, 16), (3, 11), (0, 7)])
def test_sdpa_backend_matches_diffusers_reference(valid):
    t = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 6, 10, generator=g, requires_grad=True)
    e = torch.randn(2, 16, 32, generator=g)
    m = torch.zeros(2, 16, dtype=torch.bool)
    for b, n in enumerate(valid):
        m[b, :n] = True
    ts = torch.tensor([250.0, 900.0])
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
