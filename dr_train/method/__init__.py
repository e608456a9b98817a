"""The method of the paper, one file per concept, named with the paper's words.

| paper (Sec. 3)                                   | module                    |
|--------------------------------------------------|---------------------------|
| relation LoRA triplet (relation / subject LoRAs, FFN LoRA; placements, export) | `triplet`                 |
| hybrid mask training (per-step selection, active adapters, optimizer groups)  | `hybrid_mask_training`    |
| masked flow-matching loss (rectified flow, mask weighting)                    | `flow_matching_loss`      |
| relational contrastive loss (dynamics features, InfoNCE, global sampling)     | `contrastive_loss`        |
| memory bank of positives and negatives                                         | `memory_bank`             |

The trainer's step (`dr_train.trainer.RelationRun.micro_step`) composes them in the paper's order: draw the HMT
selection, run the selected adapters, weight the flow-matching loss with that selection's mask, add the
relational contrastive loss over the bank. The fused Triton kernels in `kernels/` match `flow_matching_loss` and
`contrastive_loss.relation_features`.
"""
