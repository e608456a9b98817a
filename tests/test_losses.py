import itertools
import math

import pytest
import torch

from dr_train.losses import masked_flow_matching_loss, noisy_latents, relation_features, relational_contrastive_loss


def _loop_loss(pred, target, mask, w, mode):
    B, C, Fr, H, W = pred.shape
    total = 0.0
    for b, c, f, h, x in itertools.product(range(B), range(C), range(Fr), range(H), range(W)):
        m = float(mask[b, f, h, x])
        weight = w * m + 1 if mode == "paper" else 1 + w * m * m
        total += weight * float(pred[b, c, f, h, x] - target[b, c, f, h, x]) ** 2
    return total / pred.numel()


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_masked_loss_matches_elementwise_definition(mode):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 2, 3, 5, generator=g), torch.randn(2, 3, 2, 3, 5, generator=g)
    mask = torch.rand(2, 2, 3, 5, generator=g)
    got = masked_flow_matching_loss(pred, target, mask, 50.0, mode)
    assert math.isclose(got.item(), _loop_loss(pred, target, mask, 50.0, mode), rel_tol=1e-5)
    # the (B, 1, F, H, W) mask form gives the same value
    assert torch.allclose(masked_flow_matching_loss(pred, target, mask[:, None], 50.0, mode), got)


def test_modes_differ_for_fractional_masks_and_weight_changes_loss():
    pred, target = torch.ones(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2)
    mask = torch.tensor([[[[0.5, 0.0]]]])
    assert masked_flow_matching_loss(pred, target, mask, 10.0, "paper").item() == pytest.approx((6 + 1) / 2)
    assert masked_flow_matching_loss(pred, target, mask, 10.0, "official").item() == pytest.approx((3.5 + 1) / 2)
    assert masked_flow_matching_loss(pred, target, mask, 0.0, "paper").item() == pytest.approx(1.0)


def test_masked_loss_rejects_bad_shapes_and_modes():
    pred = torch.zeros(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="does not match"):
        masked_flow_matching_loss(pred, pred, torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="unknown loss mode"):
        masked_flow_matching_loss(pred, pred, torch.zeros(1, 3, 4, 4), mode="nope")


def test_noisy_latents_follow_mochi_convention():
    z0, eps = torch.randn(2, 12, 2, 4, 4), torch.randn(2, 12, 2, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    z, target, t = noisy_latents(z0, eps, sigma)
    assert torch.equal(z[0], z0[0]) and torch.equal(z[1], eps[1])      # sigma 0 = data, sigma 1 = noise
    assert torch.equal(target, z0 - eps)                                # velocity towards the data
    assert t.tolist() == [1000.0, 0.0]                                  # timestep = (1 - sigma) * 1000


def test_relation_features_match_explicit_differences_and_backprop():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 4, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    means, dyn = relation_features(pred)
    diff = pred[:, :, 1:] - pred[:, :, :-1]                             # (B, C, F-1, H, W), formed only here
    assert means.shape == (2, 4, 5) and dyn.shape == (2, 3, 5)
    assert torch.allclose(dyn.double(), diff.mean(dim=(3, 4)).transpose(1, 2))
    assert torch.allclose(means.double(), pred.mean(dim=(3, 4)).transpose(1, 2))
    up_m, up_d = torch.randn_like(means), torch.randn_like(dyn)
    ((means * up_m).sum() + (dyn * up_d).sum()).backward()
    ref = pred.detach().clone().requires_grad_(True)
    ((ref.mean(dim=(3, 4)).transpose(1, 2) * up_m.double()).sum()
     + ((ref[:, :, 1:] - ref[:, :, :-1]).mean(dim=(3, 4)).transpose(1, 2) * up_d.double()).sum()).backward()
    assert torch.allclose(pred.grad, ref.grad, atol=1e-6)


def test_relation_features_single_frame_has_no_dynamics():
    means, dyn = relation_features(torch.randn(1, 3, 1, 2, 2))
    assert means.shape == (1, 1, 3) and dyn.shape == (1, 0, 3)


def test_contrastive_loss_matches_brute_force_infonce():
    g = torch.Generator().manual_seed(2)
    B, T, P, N, C, tau = 2, 3, 4, 5, 6, 0.07
    a, p, n = torch.randn(B, T, C, generator=g), torch.randn(B, T, P, C, generator=g), torch.randn(B, T, N, C, generator=g)
    total = 0.0
    for b in range(B):
        for t in range(T):
            an = a[b, t] / a[b, t].norm()
            pos = sum(math.exp(float(an @ (p[b, t, j] / p[b, t, j].norm())) / tau) for j in range(P))
            neg = sum(math.exp(float(an @ (n[b, t, k] / n[b, t, k].norm())) / tau) for k in range(N))
            total += -math.log(pos / (pos + neg))
    got = relational_contrastive_loss(a, p, n, tau)
    assert math.isclose(got.item(), total / (B * T), rel_tol=1e-4)


def test_contrastive_loss_prefers_aligned_positives_and_has_gradients():
    a = torch.randn(1, 2, 8, requires_grad=True)
    aligned = a.detach()[:, :, None].repeat(1, 1, 4, 1)
    negatives = -a.detach()[:, :, None].repeat(1, 1, 3, 1) + 0.1 * torch.randn(1, 2, 3, 8)
    good = relational_contrastive_loss(a, aligned, negatives)
    bad = relational_contrastive_loss(a, negatives[:, :, :3].repeat(1, 1, 2, 1)[:, :, :4], aligned[:, :, :3])
    assert good.item() < 0.01 < bad.item()
    bad.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_contrastive_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        relational_contrastive_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 4, 3), torch.zeros(1, 2, 5, 3))
