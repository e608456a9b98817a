"""The frozen backbone's memory options (`model.fp8_base`, `model.blocks_to_swap`), applied once to a loaded
transformer before any relation trains on it."""
from __future__ import annotations

import logging

import torch

from dr_train.method.triplet import adapter_names, add_relation_lora_triplet
from dr_train.model.block_swap import BlockSwap
from dr_train.model.fp8 import quantize_frozen_linears

log = logging.getLogger("dr_train")


def prepare_frozen_base(transformer, model_cfg, lora_cfg, device: torch.device) -> BlockSwap | None:
    """fp8: the frozen Linear weights (the LoRA placements' base layers included: the triplet is added, the layers
    quantised inside PEFT's wrappers, the adapters deleted; each relation adds its own). Block swap: the last
    `blocks_to_swap` blocks' frozen weights (all of them when there are fewer) move to host memory (the rest to `device`); returns the swapper, whose
    `place_trainable` moves each relation's new adapters to `device`."""
    if model_cfg.fp8_base:
        add_relation_lora_triplet(transformer, lora_cfg)
        quantize_frozen_linears(transformer)
        transformer.delete_adapters(adapter_names(transformer))
    if not model_cfg.blocks_to_swap:
        return None
    blocks = len(transformer.transformer_blocks)
    if model_cfg.blocks_to_swap > blocks:
        log.info("model.blocks_to_swap %d: this transformer has %d blocks, all of them are swapped",
                 model_cfg.blocks_to_swap, blocks)
    return BlockSwap(transformer, resident=max(0, blocks - model_cfg.blocks_to_swap), device=device)
