"""Attention processors for Mochi's joint (video + text) attention, selected per model, never patched globally.

`sdpa` runs one batched `scaled_dot_product_attention` with a key mask for padded text tokens, instead of
diffusers' Python loop over the batch (`reference`). `flash` packs every sample's valid tokens (all video tokens
and its unpadded text tokens) into one sequence and calls flash-attn's varlen kernel, so padded text costs
nothing and no mask is materialised; it needs the flash-attn package and a CUDA GPU. `auto` picks flash where it
can run, else sdpa. Outputs at padded text positions are zero, as in the reference; for right-padded prompts
(what T5 tokenizers produce) all backends agree to float tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

BACKENDS = ("flash", "sdpa", "reference")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """q, k, v (B, S + L, H, D): the video tokens' projections (normed, rotated) followed by the text tokens'."""
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
    return (torch.cat([q_BSHD, eq_BLHD], dim=1), torch.cat([k_BSHD, ek_BLHD], dim=1),
            torch.cat([v_BSHD, ev_BLHD], dim=1))


def _joint_output(attn, out_BTC: torch.Tensor, seq_len: int):
    hidden_out, encoder_out = out_BTC[:, :seq_len], out_BTC[:, seq_len:]
    hidden_out = attn.to_out[1](attn.to_out[0](hidden_out))
    if hasattr(attn, "to_add_out"):
        encoder_out = attn.to_add_out(encoder_out)
    return hidden_out, encoder_out


class MaskedJointAttnProcessor:
    """Mochi joint attention as one batched SDPA call with a boolean key mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        q_BTHD, k_BTHD, v_BTHD = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        q, k, v = q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
        seq_len = hidden_states.shape[1]
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
        return _joint_output(attn, out_BTC, seq_len)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class FlashVarlenJointAttnProcessor:
    """Mochi joint attention with flash-attn's varlen kernel over the packed valid tokens of every sample.

    `varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)` defaults to
    `flash_attn.flash_attn_varlen_func` (q, k, v (total_tokens, H, D), cast to bf16 unless already half); another
    kernel with the same contract gets the tensors in their own dtype."""

    def __init__(self, varlen_fn=None):
        self.half_only = varlen_fn is None
        if varlen_fn is None:
            try:
                from flash_attn import flash_attn_varlen_func
            except ImportError:
                raise ValueError("model.attention_backend flash needs the flash-attn package (pip install "
                                 "flash-attn, on a CUDA machine); use sdpa or auto elsewhere") from None
            varlen_fn = flash_attn_varlen_func
        self.varlen_fn = varlen_fn

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        q_BTHD, k_BTHD, v_BTHD = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        batch, seq_len = hidden_states.shape[:2]
        valid_BT = torch.cat([torch.ones(batch, seq_len, dtype=torch.bool, device=q_BTHD.device),
                              attention_mask.bool().to(q_BTHD.device)], dim=1)
        lengths = valid_BT.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        max_len = int(lengths.max())
        dtype = q_BTHD.dtype
        if self.half_only and dtype not in (torch.float16, torch.bfloat16):
            dtype = torch.bfloat16
        packed = [t[valid_BT].to(dtype) for t in (q_BTHD, k_BTHD, v_BTHD)]
        out_NHD = self.varlen_fn(*packed, cu_seqlens, cu_seqlens, max_len, max_len)
        out_BTHD = q_BTHD.new_zeros(q_BTHD.shape)
        out_BTHD[valid_BT] = out_NHD.to(q_BTHD.dtype)
        return _joint_output(attn, out_BTHD.flatten(2, 3), seq_len)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "flash" if flash_attn_available() else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    return backend


def make_processor(backend: str):
    backend = resolve_backend(backend)
    if backend == "flash":
        return FlashVarlenJointAttnProcessor()
    if backend == "sdpa":
        return MaskedJointAttnProcessor()
    if backend == "reference":
        return MochiAttnProcessor2_0()
    raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(BACKENDS)}")


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Install the chosen processor on every attention module of this transformer (and only this one)."""
    for block in transformer.transformer_blocks:
        block.attn1.processor = make_processor(backend)
