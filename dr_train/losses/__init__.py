"""Plain-torch losses of the method (the references the Triton kernels are tested against)."""
from dr_train.losses.contrastive import (official_relational_contrastive_loss, relation_features,
                                         relational_contrastive_loss)
from dr_train.losses.flow_matching import masked_flow_matching_loss, noisy_latents

__all__ = ["masked_flow_matching_loss", "noisy_latents", "official_relational_contrastive_loss", "relation_features",
           "relational_contrastive_loss"]
