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


def test_swept_mask_weights_every_frame_where_the_subjects_go_in_any_frame():
    from dr_train.method.flow_matching_loss import swept_mask

    mask = torch.zeros(2, 3, 2, 4)
    mask[0, 0, 0, 0], mask[0, 2, 1, 3], mask[1, 1, 0, 1] = 1.0, 0.5, 0.25      # a subject moving across the frames
    swept = swept_mask(mask)
    for t in range(3):
        assert torch.equal(swept[:, t], mask.amax(dim=1))
    assert swept[0, 1, 0, 0] == 1.0 and swept[0, 0, 1, 3] == 0.5 and swept[1, 2].sum() == 0.25
    assert torch.equal(swept_mask(mask[:, None])[:, 0], swept)                    # the (B, 1, F, H, W) layout
    pred, target = torch.randn(2, 4, 3, 2, 4), torch.zeros(2, 4, 3, 2, 4)
    assert masked_flow_matching_loss(pred, target, swept) > masked_flow_matching_loss(pred, target, mask)


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


# ---- official mode, against independent transcriptions of the official trainer (demos/fine_tuner/train.py) ----
def _official_rec_loss(preds, ut, full_latent_mask, lam=50.0):
    """train.py: full_latent_mask (f, 2, h, w) (its DataLoader has batch_size=None); relation step:
    loss_mask = full_latent_mask.sum(dim=1); mse + lam * mse(pred*M, ut*M), M broadcast over (1, C)."""
    import torch.nn.functional as F

    loss_mask = full_latent_mask.sum(dim=1)
    return F.mse_loss(preds.float(), ut.float()) + lam * F.mse_loss(preds.float() * loss_mask,
                                                                     ut.float() * loss_mask)


def test_official_mode_equals_the_official_loss_with_max_pooled_overlapping_masks():
    from test_masks import _official_latent_mask

    from dr_train.hmt import HybridMaskTraining
    from dr_train.masks import latent_masks

    m1, m2 = torch.zeros(13, 32, 48), torch.zeros(13, 32, 48)
    for f in range(13):                                       # two bodies moving into each other
        m1[f, 6:26, 4 + f: 20 + f] = 1.0
        m2[f, 10:30, 30 - f: 44 - f] = 1.0
    m2[m1 > 0] = 0.0                                          # subject 1 in front: visible masks are disjoint
    official = torch.stack([_official_latent_mask(m1), _official_latent_mask(m2)], dim=1)    # (f, 2, h, w)
    ours = [latent_masks(m, pooling="max") for m in (m1, m2)]
    torch.testing.assert_close(torch.stack(ours, dim=1), official, atol=1e-7, rtol=0)
    relation = HybridMaskTraining.loss_mask("relation", ours[0][None], ours[1][None], "official")
    assert relation.max() == pytest.approx(2.0)               # cells touched by both: weight 1 + 50 * 2^2 = 201
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(1, 12, *relation.shape[1:], generator=g), torch.randn(1, 12, *relation.shape[1:],
                                                                                      generator=g)
    got = masked_flow_matching_loss(pred, target, relation, 50.0, "official")
    want = _official_rec_loss(pred, target, official)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    mean_pooled = torch.maximum(latent_masks(m1), latent_masks(m2))[None]
    assert abs(masked_flow_matching_loss(pred, target, mean_pooled, 50.0, "paper").item() - want.item()) > 1e-2


def _official_rcl(preds, positive_buffer, negative_buffer, total_positive_nums, total_negative_nums, tau=0.07):
    """The official contrastive term for one clip, transcribed from train.py with buffers holding exactly what
    get_positives / get_negatives return (so no random draw is involved); preds (1, C, F, H, W)."""
    import torch.nn.functional as F

    features_cl = preds[0].float().permute(1, 0, 2, 3).unsqueeze(0)
    spatial = features_cl.mean(dim=(-2, -1), keepdim=True)
    temporal = spatial[:, 1:] - spatial[:, :-1]
    anchors_all = temporal.permute(1, 0, 2, 3, 4)
    pos_list, neg_list = [], []
    for t in range(anchors_all.shape[0]):
        old = torch.stack(positive_buffer[:total_positive_nums], dim=0)
        pos_list.append(old[:, :, t].unsqueeze(2).permute(2, 0, 1, 3, 4, 5))
        k = max(total_negative_nums - spatial.size(1), 0)
        olds = negative_buffer[:k]
        neg = spatial.permute(1, 0, 2, 3, 4)
        if olds:
            neg = torch.cat([neg, torch.stack(olds, dim=0)], dim=0)
        neg_list.append(neg.unsqueeze(0))
    pos = torch.cat(pos_list).flatten(3).permute(0, 2, 1, 3).reshape(anchors_all.shape[0], total_positive_nums, -1)
    neg = torch.cat(neg_list).flatten(3).permute(0, 2, 1, 3).reshape(anchors_all.shape[0], neg_list[0].shape[1], -1)
    anc = anchors_all.flatten(2).reshape(anchors_all.shape[0], -1)
    pn = F.normalize(torch.cat([pos, neg], dim=1), p=2, dim=2)
    logits = torch.einsum("bd,bkd->bk", F.normalize(anc, p=2, dim=1), pn) / tau
    return torch.mean(torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, :total_positive_nums], dim=1))


@pytest.mark.parametrize("frames,n_neg", [(5, 3), (4, 7)])
def test_official_contrastive_variant_matches_the_official_formula_with_gradient(frames, n_neg):
    """Positives: every buffered clip (n_pos = buffer size); negatives: the clip's own frames with gradient, plus
    max(n_neg - F, 0) buffered frames (the buffer holds exactly that many)."""
    from dr_train.losses import official_relational_contrastive_loss
    from dr_train.memory_bank import OfficialMemoryBank

    g = torch.Generator().manual_seed(4)
    C, n_pos = 12, 3
    pred = torch.randn(1, C, frames, 3, 4, generator=g, dtype=torch.float64).float().requires_grad_(True)
    old_dyn = [torch.randn(1, frames - 1, C, generator=g) for _ in range(n_pos)]
    extra = max(n_neg - frames, 0)
    old_frames = torch.randn(extra, C, generator=g)
    bank = OfficialMemoryBank(positive_size=n_pos, negative_frames=max(extra, 1), n_pos=n_pos, n_neg=n_neg, seed=0)
    for i, d in enumerate(old_dyn):
        bank.push([f"v{i}"], d, torch.zeros(1, frames, C))
    bank.negatives.clear()
    bank.negatives.extend(old_frames)
    means, dyn = relation_features(pred)
    picks, reason = bank.sample(["now"], dyn, means)
    assert reason is None
    ours = official_relational_contrastive_loss(dyn[0], means[0], *picks[0], temperature=0.07)
    (grad_ours,) = torch.autograd.grad(ours * 1.7, pred)
    official_pos = [d[0][:, :, None, None][None] for d in old_dyn]                   # (1, f-1, c, 1, 1) entries
    official_neg = [f[:, None, None][None] for f in old_frames]                         # (1, c, 1, 1) entries
    theirs = _official_rcl(pred, official_pos, official_neg, n_pos, n_neg)
    (grad_theirs,) = torch.autograd.grad(theirs * 1.7, pred)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=1e-4)
    # the clip's own frame features carry gradient: detaching them changes it
    detached = official_relational_contrastive_loss(dyn[0], means[0].detach(), *picks[0], temperature=0.07)
    (grad_detached,) = torch.autograd.grad(detached, pred)
    assert (grad_detached - grad_ours / 1.7).abs().max() > 1e-4
