"""The relational contrastive loss (Sec. 3.3): relational dynamics features, multi-positive InfoNCE, and its global
sampling of positives and negatives from the memory bank over every rank's batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relation_features(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred (B, C, F, H, W) -> (frame_means (B, F, C), dynamics (B, F-1, C)), fp32.

    dynamics are the spatial means of the frame-to-frame differences; since the mean of differences equals the
    difference of means, they come from the (B, F, C) means and no (B, C, F-1, H, W) tensor is formed.
    """
    if pred.dim() != 5:
        raise ValueError(f"relation_features expects (B, C, F, H, W), got shape {tuple(pred.shape)}")
    frame_means_BFC = pred.float().mean(dim=(3, 4)).transpose(1, 2)
    dynamics_BFC = frame_means_BFC[:, 1:] - frame_means_BFC[:, :-1]
    return frame_means_BFC, dynamics_BFC


def relational_contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                                temperature: float = 0.07) -> torch.Tensor:
    """anchors (B, T, C), positives (B, T, P, C), negatives (B, T, N, C) -> scalar.

    Every feature is L2-normalised; per anchor frame
    -log( sum_p exp(a.p/tau) / (sum_p exp(a.p/tau) + sum_n exp(a.n/tau)) ), averaged over frames and batch.
    """
    if anchors.dim() != 3 or positives.dim() != 4 or negatives.dim() != 4:
        raise ValueError(f"expected anchors (B,T,C), positives (B,T,P,C), negatives (B,T,N,C); got "
                         f"{tuple(anchors.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    if positives.shape[:2] != anchors.shape[:2] or negatives.shape[:2] != anchors.shape[:2] \
            or positives.shape[-1] != anchors.shape[-1] or negatives.shape[-1] != anchors.shape[-1]:
        raise ValueError(f"shapes disagree: anchors {tuple(anchors.shape)}, positives {tuple(positives.shape)}, "
                         f"negatives {tuple(negatives.shape)}")
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    n = F.normalize(negatives.float(), dim=-1)
    pos_logits = torch.einsum("btc,btpc->btp", a, p) / temperature
    neg_logits = torch.einsum("btc,btnc->btn", a, n) / temperature
    all_logits = torch.cat([pos_logits, neg_logits], dim=-1)
    loss_BT = torch.logsumexp(all_logits, dim=-1) - torch.logsumexp(pos_logits, dim=-1)
    return loss_BT.mean()


def official_relational_contrastive_loss(dynamics_TC: torch.Tensor, frame_means_FC: torch.Tensor,
                                         positives_TPC: torch.Tensor, bank_negatives_TKC: torch.Tensor,
                                         temperature: float = 0.07) -> torch.Tensor:
    """The official code's variant for one clip: the negatives of every anchor frame are the clip's own F frame
    features (with their gradient) followed by K features from the bank; positives (T, P, C) from the bank.
    Same InfoNCE as `relational_contrastive_loss`, averaged over the T anchor frames."""
    frames, channels = frame_means_FC.shape
    anchors = dynamics_TC.shape[0]
    own_TFC = frame_means_FC.float()[None].expand(anchors, frames, channels)
    negatives_TNC = torch.cat([own_TFC, bank_negatives_TKC.to(own_TFC)], dim=1)
    return relational_contrastive_loss(dynamics_TC[None], positives_TPC[None], negatives_TNC[None], temperature)


def global_relational_contrastive_loss(dist, bank, loss, video_ids: list[str], frame_means_BFC: torch.Tensor,
                                       dynamics_BTC: torch.Tensor):
    """RCL over the global batch, from a `LossConfig` `loss` and the step's features.

    Every rank samples positives/negatives for all anchors from the same bank (identical on every rank) and keeps
    its own rows; gradients flow through the local anchors (and, in the official variant, through the clip's own
    frame features, its first negatives). Returns (loss or None when the bank cannot serve yet, why it was
    skipped, what to push into the bank after the backward: (ids, dynamics, frame means) of the global batch).
    """
    ids = dist.gather_flat(video_ids)
    dyn_all = dist.all_gather_cat(dynamics_BTC.detach())
    means_all = dist.all_gather_cat(frame_means_BFC.detach())
    b, tau = dynamics_BTC.shape[0], loss.temperature
    rows = dist.local_rows(b)
    value = None
    if loss.rcl_variant == "official":
        picks, skipped = bank.sample(ids, dyn_all, means_all)
        if picks is not None:
            # clips without a positive yet add nothing; dividing by the batch keeps ranks = one global batch
            terms = [official_relational_contrastive_loss(dynamics_BTC[i], frame_means_BFC[i], *pick, tau)
                     for i, pick in enumerate(picks[rows]) if pick is not None]
            value = sum(terms) / b if terms else dynamics_BTC.sum() * 0.0
    else:
        positives, negatives, skipped = bank.sample(ids, dyn_all, means_all)
        if positives is not None:
            value = relational_contrastive_loss(dynamics_BTC, positives[rows], negatives[rows], tau)
    return value, skipped, (ids, dyn_all, means_all)
