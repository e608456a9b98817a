"""T5 prompt embeddings, computed once per prompt and cached (the encoder is not needed during training)."""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], max_tokens: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (N, L, D) fp32, mask (N, L) bool) with Mochi's tokenization (padded to max_tokens, truncated)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.bool().to(device)
    encoder_device = next(text_encoder.parameters()).device
    embeds = text_encoder(ids.to(encoder_device), attention_mask=mask.to(encoder_device))[0]
    return embeds.float().to(device), mask
