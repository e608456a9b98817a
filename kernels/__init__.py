"""Triton kernels for the masked flow-matching loss and the relational-contrastive-loss features.

The plain-torch references live in `dr_train.losses`; the fused kernels and their dispatcher are added here.
"""
