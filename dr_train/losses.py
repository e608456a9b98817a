"""Kept importable for existing code: the method's plain-torch losses (the references the Triton kernels are tested
against) live in `dr_train.method.flow_matching_loss` and `dr_train.method.contrastive_loss`."""
from dr_train.method.contrastive_loss import (official_relational_contrastive_loss, relation_features,
                                              relational_contrastive_loss)
from dr_train.method.flow_matching_loss import masked_flow_matching_loss, noisy_latents

__all__ = ["masked_flow_matching_loss", "noisy_latents", "official_relational_contrastive_loss", "relation_features",
           "relational_contrastive_loss"]
