"""Attention maps of a prompt's relation words over the video tokens (paper Sec. 4.2, Fig. 7a).

One forward pass of the transformer at a chosen timestep runs with a temporary processor on every block's joint
attention. The processor recomputes that block's queries and keys exactly as `MaskedJointAttnProcessor` does
(projections, RMS norms, rotary embedding on the video tokens; padded text keys masked out), evaluates
softmax(Q K^T / sqrt(d)) over all keys (video + valid text) for the rows it needs, keeps the entries between the
relation words' text tokens and the video tokens, and then hands the call to the block's own processor, so the
forward pass's outputs are unchanged. The original processors are put back afterwards, also on errors.

Direction. MM-DiT attention is joint, so "attention between a word and the video tokens" has two readings:
`video_to_text` (default): for every video query, the probability it assigns to the word's key; the analogue of a
    UNet cross-attention map (Prompt-to-Prompt), where the paper's attention-map analysis comes from. Each video
    token's row is normalised over all keys, so the map says how much of each location's attention goes to the word.
`text_to_video`: the word's query row over the video keys: where in the video the word looks (the row is normalised
    over all keys, so the map sums to at most 1 per word).
The paper ("extracting values for text tokens of relations and all vision tokens", following DiTCtrl) does not say
which; both are offered, the choice is recorded with the maps. Maps are averaged over heads, blocks and the words'
tokens, then reshaped to the latent grid (F, H / p, W / p) (Mochi's video-token order is frame, row, column).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dr_train.geometry import TEMPORAL_COMPRESSION
from dr_train.model.attention import _joint_qkv
from dr_train.model.text import encode_prompts

DIRECTIONS = ("video_to_text", "text_to_video")


@dataclass
class AttentionCapture:
    """Per block: (B, n_tokens, S) head-averaged probabilities between the selected text tokens and the S video
    tokens; with keep_heads also (B, heads, n_tokens, S) per block."""
    token_indices: list[int]
    direction: str
    blocks: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RelationAttention:
    maps_BFhw: torch.Tensor          # float32, averaged over blocks, heads and the phrase's tokens
    token_indices: list[int]
    tokens: list[str]
    direction: str
    timestep: float


# ------------------------------------------------------------------------------------------ tokens

def phrase_token_indices(tokenizer, prompt: str, phrase: str, max_tokens: int) -> tuple[list[int], list[str]]:
    """Positions (and pieces) of the tokens covering the first occurrence of `phrase` in `prompt` (case-insensitive),
    tokenised as the model sees it (padded/truncated to max_tokens, special tokens added)."""
    start = prompt.lower().find(phrase.lower().strip()) if phrase.strip() else -1
    if start < 0:
        raise ValueError(f"phrase {phrase!r} does not occur in the prompt {prompt!r}")
    end = start + len(phrase.strip())
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("finding a phrase's tokens needs a fast tokenizer (character offsets)")
    encoded = tokenizer(prompt, padding="max_length", max_length=max_tokens, truncation=True,
                        add_special_tokens=True, return_offsets_mapping=True)
    indices = [i for i, (s, e) in enumerate(encoded["offset_mapping"])
               if e > s and s < end and e > start and encoded["attention_mask"][i]]
    if not indices:
        raise ValueError(f"phrase {phrase!r} falls outside the first {max_tokens} tokens of the prompt")
    return indices, tokenizer.convert_ids_to_tokens([encoded["input_ids"][i] for i in indices])


# ------------------------------------------------------------------------------------------ capture

def _queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """(q (B, H, S+L, D), k (B, H, S+L, D), S) as the training attention processors compute them."""
    q, k, _ = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    return q.transpose(1, 2), k.transpose(1, 2), hidden_states.shape[1]


def word_video_probabilities(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, key_valid_BT: torch.Tensor, seq_len: int,
                             token_indices: list[int], direction: str, query_chunk: int = 512) -> torch.Tensor:
    """(B, H, n_tokens, S) fp32 entries of softmax(Q K^T / sqrt(d)) (masked keys excluded) between the text tokens
    at `token_indices` (positions in the text sequence) and the S video tokens, in the given direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    scale = q_BHTD.shape[-1] ** -0.5
    q, k = q_BHTD.float(), k_BHTD.float()
    bias_B11T = torch.zeros(key_valid_BT.shape, dtype=torch.float32, device=q.device)
    bias_B11T = bias_B11T.masked_fill(~key_valid_BT.to(q.device), float("-inf"))[:, None, None, :]
    text_pos = [seq_len + i for i in token_indices]
    if direction == "text_to_video":
        logits = (q[:, :, text_pos] @ k.transpose(-1, -2)) * scale + bias_B11T
        return torch.softmax(logits, dim=-1)[..., :seq_len]
    out = []
    for start in range(0, seq_len, query_chunk):
        logits = (q[:, :, start:min(seq_len, start + query_chunk)] @ k.transpose(-1, -2)) * scale + bias_B11T
        out.append(torch.softmax(logits, dim=-1)[..., text_pos])
    return torch.cat(out, dim=2).transpose(-1, -2)


class _CaptureProcessor:
    """Records the relation tokens' attention, then runs the block's own processor."""

    def __init__(self, original, capture: AttentionCapture, keep_heads: bool, query_chunk: int):
        self.original = original
        self.capture = capture
        self.keep_heads = keep_heads
        self.query_chunk = query_chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None, **kw):
        with torch.no_grad():
            q, k, seq_len = _queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            batch = q.shape[0]
            video_valid = torch.ones(batch, seq_len, dtype=torch.bool, device=q.device)
            key_valid = torch.cat([video_valid, attention_mask.bool().to(q.device)], dim=1)
            probs = word_video_probabilities(q, k, key_valid, seq_len, self.capture.token_indices,
                                             self.capture.direction, self.query_chunk)
            self.capture.blocks.append(probs.mean(dim=1).cpu())
            if self.keep_heads:
                self.capture.heads.append(probs.cpu())
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, image_rotary_emb=image_rotary_emb, **kw)


@torch.no_grad()
def capture_relation_attention(transformer, latents_BCFHW: torch.Tensor, prompt_embeds_BLD: torch.Tensor,
                               prompt_mask_BL: torch.Tensor, timestep: float, token_indices: list[int],
                               direction: str = "video_to_text", keep_heads: bool = False,
                               query_chunk: int = 512) -> tuple[AttentionCapture, torch.Tensor]:
    """One forward pass with capturing processors on every block; returns (capture, the model's output). The
    blocks' own processors are restored afterwards."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not token_indices:
        raise ValueError("no text tokens selected")
    text_len = prompt_embeds_BLD.shape[1]
    if min(token_indices) < 0 or max(token_indices) >= text_len:
        raise ValueError(f"token indices {token_indices} outside the {text_len} text tokens")
    if not bool(prompt_mask_BL.bool()[:, token_indices].all()):
        raise ValueError(f"token indices {token_indices} include padded text positions")
    capture = AttentionCapture(token_indices=list(token_indices), direction=direction)
    attns = [block.attn1 for block in transformer.transformer_blocks]
    originals = [a.processor for a in attns]
    try:
        for a, original in zip(attns, originals):
            a.processor = _CaptureProcessor(original, capture, keep_heads, query_chunk)
        batch = latents_BCFHW.shape[0]
        param = next(transformer.parameters())
        timestep_B = torch.full((batch,), float(timestep), device=param.device)
        output = transformer(hidden_states=latents_BCFHW.to(param.device, param.dtype),
                             encoder_hidden_states=prompt_embeds_BLD.to(param.device, param.dtype),
                             timestep=timestep_B, encoder_attention_mask=prompt_mask_BL.to(param.device),
                             return_dict=False)[0]
    finally:
        for a, original in zip(attns, originals):
            a.processor = original
    assert len(capture.blocks) == len(attns), (len(capture.blocks), len(attns))
    return capture, output


def average_maps(capture: AttentionCapture, latent_shape_FHW: tuple[int, int, int], patch_size: int) -> torch.Tensor:
    """(B, F, H / p, W / p): mean over blocks and tokens of the head-averaged probabilities, on the latent grid."""
    frames, height, width = latent_shape_FHW
    grid = (frames, height // patch_size, width // patch_size)
    mean_BS = torch.stack(capture.blocks).mean(dim=(0, 2))
    assert mean_BS.shape[1] == grid[0] * grid[1] * grid[2], (mean_BS.shape, grid)
    return mean_BS.reshape(mean_BS.shape[0], *grid)


def relation_attention_maps(transformer, tokenizer, text_encoder, prompt: str, phrase: str,
                            latents_BCFHW: torch.Tensor, timestep: float, max_tokens: int,
                            direction: str = "video_to_text", query_chunk: int = 512) -> RelationAttention:
    """Attention maps of `phrase` (words of `prompt`) over the video tokens of `latents` at `timestep`
    (Mochi convention: timestep = (1 - sigma) * 1000 for latents z = (1 - sigma) z0 + sigma noise)."""
    if latents_BCFHW.ndim != 5:
        raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents_BCFHW.shape)}")
    patch = transformer.config.patch_size
    if latents_BCFHW.shape[-1] % patch or latents_BCFHW.shape[-2] % patch:
        raise ValueError(f"latent height and width must be multiples of the patch size {patch}, got "
                         f"{tuple(latents_BCFHW.shape[-2:])}")
    indices, tokens = phrase_token_indices(tokenizer, prompt, phrase, max_tokens)
    embeds, mask = encode_prompts(text_encoder, tokenizer, [prompt] * latents_BCFHW.shape[0], max_tokens,
                                  latents_BCFHW.device)
    capture, _ = capture_relation_attention(transformer, latents_BCFHW, embeds, mask, timestep, indices,
                                            direction, query_chunk=query_chunk)
    maps = average_maps(capture, tuple(latents_BCFHW.shape[2:]), patch)
    return RelationAttention(maps, indices, tokens, direction, float(timestep))


# ------------------------------------------------------------------------------------------ pictures

def latent_frame_sources(latent_frames: int, video_frames: int) -> list[int]:
    """The decoded frame shown under each latent frame: Mochi's VAE maps frame 0 to latent frame 0 and frames
    6(k-1)+1..6k to latent frame k; the middle one of each group is used."""
    t = TEMPORAL_COMPRESSION
    return [0] + [min(video_frames - 1, t * (k - 1) + 1 + t // 2) for k in range(1, latent_frames)]


def save_attention_strip(maps_Fhw: torch.Tensor | np.ndarray, png_path: str | Path,
                         frames_FHWC: np.ndarray | None = None, cell_height: int = 128, alpha: float = 0.55) -> Path:
    """One PNG: the latent frames' maps side by side, each upsampled (bilinear) to `cell_height` rows and coloured
    (turbo colour map, one scale for the whole strip); with decoded frames (uint8 (N, H, W, 3)), each map is blended
    over its frame (see `latent_frame_sources`)."""
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here

    maps = torch.as_tensor(np.asarray(maps_Fhw, dtype=np.float32))
    if maps.ndim != 3 or not maps.numel():
        raise ValueError(f"expected (F, h, w) maps, got shape {tuple(maps.shape)}")
    if cell_height < 1 or not 0 <= alpha <= 1:
        raise ValueError(f"need cell_height >= 1 and 0 <= alpha <= 1, got {cell_height}, {alpha}")
    f, h, w = maps.shape
    cell_w = max(1, round(cell_height * w / h)) if frames_FHWC is None else \
        max(1, round(cell_height * frames_FHWC.shape[2] / frames_FHWC.shape[1]))
    up = torch.nn.functional.interpolate(maps[:, None], size=(cell_height, cell_w), mode="bilinear",
                                         align_corners=False)[:, 0]
    lo, hi = float(maps.min()), float(maps.max())
    norm = ((up - lo) / (hi - lo if hi > lo else 1.0)).clamp(0, 1).numpy()
    colour = matplotlib.colormaps["turbo"](norm)[..., :3]
    if frames_FHWC is not None:
        frames = np.asarray(frames_FHWC)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
        sources = latent_frame_sources(f, len(frames))
        under = torch.as_tensor(frames[sources]).permute(0, 3, 1, 2).float() / 255.0
        under = torch.nn.functional.interpolate(under, size=(cell_height, cell_w), mode="bilinear",
                                                align_corners=False).permute(0, 2, 3, 1).numpy()
        colour = (1 - alpha) * under + alpha * colour
    strip = np.concatenate(list(colour), axis=1)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((strip * 255).round().clip(0, 255).astype(np.uint8)).save(png_path)
    return png_path
