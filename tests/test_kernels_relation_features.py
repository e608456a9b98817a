"""One-pass relation features (kernels/rcl_features.py) against the torch reference.

CPU: fp32 under the Triton interpreter (TRITON_INTERPRET=1 set per test). CUDA: fp32 and bf16, skipped without
a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from dr_train.losses import masked_flow_matching_loss, relational_contrastive_loss  # noqa: E402
from dr_train.losses import relation_features as reference  # noqa: E402
from kernels.masked_loss import masked_flow_matching_loss_triton  # noqa: E402
from kernels.rcl_features import relation_features_triton  # noqa: E402

from kernel_helpers import HAS_CUDA, _interpret_cpu, dev, grad_close as _grad_close, no_cuda, value_tol  # noqa: E402,F401

feature_tol = value_tol


def grad_close(a, b, dtype):
    _grad_close(a, b, dtype, bf16_rtol=1e-2)

def make(shape, device, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def run_both(pred, use_means=True, use_dyn=True, block_size=None, seed=100):
    """Forward both, back-propagate random upstream gradients (not ones) into whichever outputs are used."""
    p1 = pred.detach().clone().requires_grad_()
    p2 = pred.detach().clone().requires_grad_()
    m1, d1 = relation_features_triton(p1, block_size=block_size)
    m2, d2 = reference(p2)
    g = torch.Generator().manual_seed(seed)
    gm = torch.randn(m2.shape, generator=g).to(pred.device)
    gd = torch.randn(d2.shape, generator=g).to(pred.device)
    outs1 = [o for o, u in ((m1, use_means), (d1, use_dyn)) if u]
    outs2 = [o for o, u in ((m2, use_means), (d2, use_dyn)) if u]
    grads = [o for o, u in ((gm, use_means), (gd, use_dyn)) if u]
    torch.autograd.backward(outs1, grads)
    torch.autograd.backward(outs2, grads)
    return (m1, d1, p1.grad), (m2, d2, p2.grad)


def check(ours, ref, dtype):
    (m1, d1, g1), (m2, d2, g2) = ours, ref
    tf = feature_tol(dtype)
    assert m1.dtype == d1.dtype == torch.float32
    assert m1.shape == m2.shape and d1.shape == d2.shape
    torch.testing.assert_close(m1, m2, **tf)
    torch.testing.assert_close(d1, d2, **tf)
    if g2 is None:
        assert g1 is None
        return
    assert g1.dtype == g2.dtype and g1.shape == g2.shape
    grad_close(g1, g2, dtype)


@pytest.mark.parametrize("shape", [(1, 2, 1, 3, 5), (2, 3, 2, 5, 7), (3, 2, 4, 7, 11), (2, 1, 3, 1, 13)],
                         ids=["F1", "F2-B2", "F4-B3", "C1-H1"])
def test_matches_reference(dev, shape):
    device, dtype = dev
    ours, ref = run_both(make(shape, device, dtype))
    check(ours, ref, dtype)
    B, C, F = shape[:3]
    assert ours[0].shape == (B, F, C) and ours[1].shape == (B, F - 1, C)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["means-only", "dynamics-only"])
def test_one_output_used(dev, use):
    device, dtype = dev
    for shape in ((2, 3, 3, 5, 7), (1, 2, 1, 3, 5)):
        if shape[2] == 1 and use == (False, True):
            continue                                  # (B, 0, C) dynamics: nothing flows back
        check(*run_both(make(shape, device, dtype, seed=1), *use), dtype)


def test_multi_tile_planes(dev):
    """Several programs per (b, c, f) plane with a ragged last tile: H*W = 7*11 = 77, tiles of 16."""
    device, dtype = dev
    check(*run_both(make((2, 3, 3, 7, 11), device, dtype, seed=2), block_size=16), dtype)


def test_non_contiguous(dev):
    device, dtype = dev
    big = make((2, 6, 6, 5, 7), device, dtype, seed=3)
    for pred in (big[:, ::2],                          # channel-strided, planes dense
                 big[:, :, 1::2],                       # frame-strided
                 big.permute(0, 2, 1, 3, 4),            # C and F swapped (dense planes)
                 big[:, :3, :3].transpose(3, 4)):       # (H, W) plane transposed: copied
        assert not pred.is_contiguous()
        check(*run_both(pred), dtype)


def test_deterministic(dev):
    device, dtype = dev
    pred = make((2, 3, 3, 7, 5), device, dtype, seed=4)
    a, b = run_both(pred, block_size=16)[0], run_both(pred, block_size=16)[0]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    m, d, _ = a
    assert torch.equal(d, m[:, 1:] - m[:, :-1])       # dynamics are exactly the differences of the means


def test_with_contrastive_loss_and_flow_matching(dev):
    """The trainer's graph: pred feeds the fused loss and the features -> InfoNCE; gradients add up."""
    device, dtype = dev
    B, C, F, H, W = 2, 4, 3, 5, 7
    pred = make((B, C, F, H, W), device, dtype, seed=5)
    target = make((B, C, F, H, W), device, dtype, seed=6)
    mask = torch.rand(B, F, H, W, generator=torch.Generator().manual_seed(7)).to(device)
    g = torch.Generator().manual_seed(8)
    pos = torch.randn(B, F - 1, 2, C, generator=g).to(device)
    neg = torch.randn(B, F - 1, 3, C, generator=g).to(device)
    grads = []
    for feats, loss_fn in ((relation_features_triton, masked_flow_matching_loss_triton),
                           (reference, masked_flow_matching_loss)):
        p = pred.detach().clone().requires_grad_()
        _, dyn = feats(p)
        loss = loss_fn(p, target, mask, 50.0, "paper") + 0.1 * relational_contrastive_loss(dyn, pos, neg, 0.07)
        (loss * 0.5).backward()
        grads.append(p.grad)
    grad_close(grads[0], grads[1], dtype)


def test_no_grad_and_errors():
    pred = make((1, 2, 2, 3, 3), "cpu", torch.float32)
    with torch.no_grad():
        m, d = relation_features_triton(pred.requires_grad_())
    assert m.grad_fn is None and d.grad_fn is None
    with pytest.raises(ValueError, match=r"expects \(B, C, F, H, W\)"):
        relation_features_triton(pred[0])


@no_cuda
def test_cuda_mochi_latent_shape(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = run_both(make((1, 12, 11, 60, 106), "cuda", dtype, seed=9))
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-5)
        grad_close(ours[2], ref[2], dtype)
