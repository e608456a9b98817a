"""Fused masked flow-matching loss (kernels/masked_loss.py) against the torch reference.

CPU: fp32 under the Triton interpreter (TRITON_INTERPRET=1 is set per test: the kernels are jitted lazily in the
mode the environment names at call time). CUDA: the same tests in fp32 and bf16, skipped without a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from dr_train.losses import masked_flow_matching_loss as reference  # noqa: E402
from kernels.masked_loss import (  # noqa: E402
    masked_flow_matching_loss_from_latents_triton,
    masked_flow_matching_loss_triton,
)

from kernel_helpers import HAS_CUDA, _interpret_cpu, dev, grad_close as _grad_close, no_cuda, value_tol  # noqa: E402,F401

loss_tol = value_tol


def grad_close(a, b, dtype):
    _grad_close(a, b, dtype, bf16_rtol=2e-2)

def make(shape, device, dtype, seed=0, mask_shape=None):
    g = torch.Generator().manual_seed(seed)
    B, C, F, H, W = shape
    pred = torch.randn(shape, generator=g).to(device, dtype)
    target = torch.randn(shape, generator=g).to(device, dtype)
    mask = torch.rand(mask_shape or (B, F, H, W), generator=g).to(device)   # fractional values in [0, 1)
    return pred, target, mask


def run_both(pred, target, mask, mode, upstream, weight=50.0, block_size=None, fn=None):
    """(loss, grad) of the kernel and of the reference for the same inputs and upstream gradient."""
    p1 = pred.detach().clone().requires_grad_()
    p2 = pred.detach().clone().requires_grad_()
    fn = fn or (lambda p: masked_flow_matching_loss_triton(p, target, mask, weight, mode, block_size=block_size))
    l1 = fn(p1)
    l2 = reference(p2, target, mask, weight, mode)
    g = torch.tensor(upstream, device=pred.device)
    l1.backward(g)
    l2.backward(g)
    return l1, l2, p1.grad, p2.grad


def check(l1, l2, g1, g2, dtype):
    tl_ = loss_tol(dtype)
    assert l1.dtype == torch.float32 and l1.dim() == 0
    torch.testing.assert_close(l1, l2, **tl_)
    assert g1.dtype == g2.dtype and g1.shape == g2.shape
    grad_close(g1, g2, dtype)


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 3, 5), (2, 3, 2, 5, 7), (3, 2, 3, 7, 11)], ids=["F1", "F2", "F3-B3"])
def test_matches_reference(dev, mode, shape):
    device, dtype = dev
    pred, target, mask = make(shape, device, dtype)
    check(*run_both(pred, target, mask, mode, upstream=0.37), dtype)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_mask_with_channel_dim_weight_and_unit_upstream(dev, mode):
    device, dtype = dev
    B, C, F, H, W = 2, 3, 2, 5, 3
    pred, target, mask = make((B, C, F, H, W), device, dtype, seed=1, mask_shape=(B, 1, F, H, W))
    mask = mask * 2.0                                     # 'official' union mask: sums of two subject masks
    check(*run_both(pred, target, mask, mode, upstream=1.0, weight=7.5), dtype)


def test_multi_tile_rows_with_tail(dev):
    """Several programs per row and a ragged last tile (F*H*W = 2*7*11 = 154, tiles of 32)."""
    device, dtype = dev
    pred, target, mask = make((2, 3, 2, 7, 11), device, dtype, seed=2)
    for mode in ("paper", "official"):
        check(*run_both(pred, target, mask, mode, upstream=-1.7, block_size=32), dtype)


def test_non_contiguous_inputs(dev):
    """Strided leading dims (channel slice, expanded mask batch) and a transposed (H, W) plane (copied)."""
    device, dtype = dev
    B, C, F, H, W = 2, 3, 2, 5, 7
    g = torch.Generator().manual_seed(3)
    big = torch.randn(B, 2 * C, F, H, W, generator=g).to(device, dtype)
    pred = big[:, ::2]                                             # channel stride 2*F*H*W, inner dense
    target = torch.randn(B, C, F, W, H, generator=g).to(device, dtype).transpose(3, 4)   # (H, W) not dense
    mask = torch.rand(1, F, H, W, generator=g).to(device).expand(B, F, H, W)          # batch stride 0
    assert not pred.is_contiguous() and not target.is_contiguous() and not mask.is_contiguous()
    for mode in ("paper", "official"):
        check(*run_both(pred, target, mask, mode, upstream=0.5), dtype)


def test_bool_and_binary_masks(dev):
    device, dtype = dev
    pred, target, mask = make((2, 2, 2, 3, 5), device, dtype, seed=4)
    binary = mask > 0.5
    check(*run_both(pred, target, binary, "paper", upstream=2.0), dtype)
    check(*run_both(pred, target, binary.float(), "official", upstream=2.0), dtype)


def test_target_from_latents_never_materialised(dev):
    device, dtype = dev
    shape = (2, 3, 2, 5, 7)
    pred, z0, mask = make(shape, device, dtype, seed=5)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    for mode in ("paper", "official"):
        fn = lambda p: masked_flow_matching_loss_from_latents_triton(p, z0, noise, mask, 50.0, mode)  # noqa: E731
        p1 = pred.detach().clone().requires_grad_()
        p2 = pred.detach().clone().requires_grad_()
        l1 = fn(p1)
        l2 = reference(p2, (z0.float() - noise.float()), mask, 50.0, mode)
        l1.backward(torch.tensor(0.3, device=device))
        l2.backward(torch.tensor(0.3, device=device))
        check(l1, l2, p1.grad, p2.grad.to(dtype), dtype)


def test_target_and_latent_grads(dev):
    """A target that requires grad gets -grad_pred (z0: -grad_pred, noise: +grad_pred), like the reference."""
    device, dtype = dev
    pred, target, mask = make((2, 2, 2, 3, 5), device, dtype, seed=7)
    t1 = target.detach().clone().requires_grad_()
    t2 = target.detach().clone().requires_grad_()
    p1 = pred.detach().clone().requires_grad_()
    p2 = pred.detach().clone().requires_grad_()
    masked_flow_matching_loss_triton(p1, t1, mask, 50.0, "paper").backward(torch.tensor(0.7, device=device))
    reference(p2, t2, mask, 50.0, "paper").backward(torch.tensor(0.7, device=device))
    grad_close(t1.grad, t2.grad, dtype)
    grad_close(p1.grad, p2.grad, dtype)
    # only the target requires grad
    t3 = target.detach().clone().requires_grad_()
    masked_flow_matching_loss_triton(pred, t3, mask, 50.0, "paper").backward()
    t4 = target.detach().clone().requires_grad_()
    reference(pred, t4, mask, 50.0, "paper").backward()
    grad_close(t3.grad, t4.grad, dtype)
    # latents and noise
    z0, noise = target.detach().clone().requires_grad_(), (0.5 * pred).detach().clone().requires_grad_()
    p5 = pred.detach().clone().requires_grad_()
    masked_flow_matching_loss_from_latents_triton(p5, z0, noise, mask, 50.0, "official").backward()
    z0r, noiser = z0.detach().clone().requires_grad_(), noise.detach().clone().requires_grad_()
    p6 = pred.detach().clone().requires_grad_()
    reference(p6, z0r - noiser, mask, 50.0, "official").backward()
    for a, b in ((p5, p6), (z0, z0r), (noise, noiser)):
        grad_close(a.grad, b.grad, dtype)


def test_shared_pred_accumulates(dev):
    """pred used by the loss and another term: autograd adds the fused gradient to the other one."""
    device, dtype = dev
    pred, target, mask = make((1, 2, 2, 3, 5), device, dtype, seed=8)
    p1 = pred.detach().clone().requires_grad_()
    p2 = pred.detach().clone().requires_grad_()
    (masked_flow_matching_loss_triton(p1, target, mask) * 0.5 + (p1.float() ** 2).mean()).backward()
    (reference(p2, target, mask) * 0.5 + (p2.float() ** 2).mean()).backward()
    grad_close(p1.grad, p2.grad, dtype)


def test_deterministic(dev):
    device, dtype = dev
    pred, target, mask = make((2, 3, 3, 7, 5), device, dtype, seed=9)
    outs = []
    for _ in range(2):
        p = pred.detach().clone().requires_grad_()
        loss = masked_flow_matching_loss_triton(p, target, mask, 50.0, "paper", block_size=16)
        loss.backward()
        outs.append((loss.detach().clone(), p.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_no_grad_forward_only(dev):
    device, dtype = dev
    pred, target, mask = make((1, 2, 2, 3, 5), device, dtype, seed=10)
    with torch.no_grad():
        loss = masked_flow_matching_loss_triton(pred.requires_grad_(), target, mask)
    assert loss.grad_fn is None
    tl_ = loss_tol(dtype)
    torch.testing.assert_close(loss, reference(pred.detach(), target, mask), **tl_)


def test_second_backward_refused():
    pred, target, mask = make((1, 2, 1, 3, 3), "cpu", torch.float32)
    pred.requires_grad_()
    loss = masked_flow_matching_loss_triton(pred, target, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()


def test_errors_match_reference():
    pred, target, mask = make((1, 2, 2, 3, 3), "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown loss mode"):
        masked_flow_matching_loss_triton(pred, target, mask, 50.0, "nope")
    with pytest.raises(ValueError, match="differ in shape"):
        masked_flow_matching_loss_triton(pred, target[:, :1], mask)
    with pytest.raises(ValueError, match="does not match prediction"):
        masked_flow_matching_loss_triton(pred, target, mask[:, :1])
    with pytest.raises(ValueError, match="mask requires grad"):
        masked_flow_matching_loss_triton(pred, target, mask.clone().requires_grad_())


@no_cuda
def test_cuda_mixed_dtypes_bf16_pred_fp32_target(monkeypatch):
    """The trainer's autocast case: bf16 prediction, fp32 target and mask."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pred, target, mask = make((2, 12, 3, 8, 8), "cuda", torch.float32, seed=11)
    pred = pred.bfloat16()
    check(*run_both(pred, target, mask, "paper", upstream=0.25), torch.bfloat16)


@no_cuda
def test_cuda_mochi_latent_shape(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        pred, target, mask = make((1, 12, 11, 60, 106), "cuda", dtype, seed=12)
        l1, l2, g1, g2 = run_both(pred, target, mask, "official", upstream=0.5)
        torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
        grad_close(g1, g2, dtype)
