"""Attention processors for Mochi's joint (video + text) attention, selected per model, never patched globally.

`sdpa` runs one batched `scaled_dot_product_attention` with a key mask for padded text tokens, instead of
diffusers' Python loop over the batch (`reference`). Outputs at padded text positions are zero, as in the
reference; for right-padded prompts (what T5 tokenizers produce) the two agree to float tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

BACKENDS = ("sdpa", "reference")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class MaskedJointAttnProcessor:
    """Mochi joint attention as one batched SDPA call with a boolean key mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        heads = attn.heads
        q_BSHD = attn.to_q(hidden_states).unflatten(2, (heads, -1))
        k_BSHD = attn.to_k(hidden_states).unflatten(2, (heads, -1))
        v_BSHD = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        if attn.norm_q is not None:
            q_BSHD = attn.norm_q(q_BSHD)
        if attn.norm_k is not None:
            k_BSHD = attn.norm_k(k_BSHD)
        eq_BLHD = attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ek_BLHD = attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ev_BLHD = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if attn.norm_added_q is not None:
            eq_BLHD = attn.norm_added_q(eq_BLHD)
        if attn.norm_added_k is not None:
            ek_BLHD = attn.norm_added_k(ek_BLHD)
        if image_rotary_emb is not None:
            q_BSHD = _rotate(q_BSHD, *image_rotary_emb)
            k_BSHD = _rotate(k_BSHD, *image_rotary_emb)

        seq_len, text_len = q_BSHD.shape[1], eq_BLHD.shape[1]
        q = torch.cat([q_BSHD, eq_BLHD], dim=1).transpose(1, 2)
        k = torch.cat([k_BSHD, ek_BLHD], dim=1).transpose(1, 2)
        v = torch.cat([v_BSHD, ev_BLHD], dim=1).transpose(1, 2)

        text_valid_BL = attention_mask.bool()
        if bool(text_valid_BL.all()):
            out_BHTD = F.scaled_dot_product_attention(q, k, v)
            query_valid = None
        else:
            batch = q.shape[0]
            video_valid = torch.ones(batch, seq_len, dtype=torch.bool, device=q.device)
            key_valid_BT = torch.cat([video_valid, text_valid_BL.to(q.device)], dim=1)
            out_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid_BT[:, None, None, :])
            query_valid = key_valid_BT
        out_BTC = out_BHTD.transpose(1, 2).flatten(2, 3)
        if query_valid is not None:
            out_BTC = out_BTC * query_valid[..., None].to(out_BTC.dtype)
        hidden_out, encoder_out = out_BTC.split_with_sizes((seq_len, text_len), dim=1)
        hidden_out = attn.to_out[1](attn.to_out[0](hidden_out))
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return hidden_out, encoder_out


def make_processor(backend: str):
    if backend == "sdpa":
        return MaskedJointAttnProcessor()
    if backend == "reference":
        return MochiAttnProcessor2_0()
    raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(BACKENDS)}")


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Install the chosen processor on every attention module of this transformer (and only this one)."""
    for block in transformer.transformer_blocks:
        block.attn1.processor = make_processor(backend)
