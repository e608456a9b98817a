"""CLIP-T (text alignment) and temporal consistency of generated videos, from a local CLIP ViT-B/32 folder.

Definitions (docs/metrics.md has the full write-up):

* frame embedding e_i = L2-normalised CLIP image embedding (vision tower + visual projection) of frame i after
  `preprocess_frames`; text embedding t = L2-normalised CLIP text embedding of the prompt (CLIP tokenizer,
  truncated to 77 tokens with the end-of-text token kept).
* CLIP-T(video, prompt) = cos(t, mean_i e_i)  -- raw cosine in [-1, 1], not x100, not clamped.
* Temporal consistency(video) = mean_{i=1..F-1} cos(e_i, e_{i+1}) over consecutive frames.

Preprocessing is spelled out here rather than taken from a processor's defaults: uint8 -> float [0, 1], the short
side resized to 224 (long side int(long * 224 / short), as torchvision's Resize) with torch bicubic interpolation,
antialias=True, clamped to [0, 1]; a 224x224 centre crop (offset int(round((n - 224) / 2)), as torchvision's
CenterCrop); CLIP's mean/std normalisation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224
CLIP_MAX_TOKENS = 77


def as_frames_FHWC(frames) -> torch.Tensor:
    """A uint8 (F, H, W, 3) torch tensor from a numpy array or tensor; ValueError for anything else."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.array(frames, copy=not frames.flags.writeable or None, order="C"))
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a uint8 numpy array or torch tensor (F, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (F, H, W, 3) with F >= 1, got {frames.dtype} {tuple(frames.shape)}")
    return frames


def resized_size(height: int, width: int, size: int = CLIP_IMAGE_SIZE) -> tuple[int, int]:
    """(H, W) with the short side = size and the long side int(long * size / short) (torchvision's rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess_frames(frames_FHWC, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """CLIP pixel values (F, 3, size, size) float32: short-side bicubic resize (antialiased), centre crop, normalise."""
    frames = as_frames_FHWC(frames_FHWC)
    x_FCHW = frames.permute(0, 3, 1, 2).float() / 255.0
    height, width = x_FCHW.shape[-2:]
    new_h, new_w = resized_size(height, width, size)
    if (new_h, new_w) != (height, width):
        x_FCHW = F.interpolate(x_FCHW, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x_FCHW = x_FCHW.clamp(0.0, 1.0)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x_FCHW = x_FCHW[:, :, top:top + size, left:left + size]
    assert x_FCHW.shape[-2:] == (size, size), x_FCHW.shape
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x_FCHW - mean) / std).contiguous()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


class ClipScorer:
    """CLIP-T and temporal consistency with a CLIP model read from a local `from_pretrained` folder.

    `path` holds a transformers CLIPModel (config + weights) and its CLIP tokenizer files. Embeddings are
    computed `batch_size` frames at a time in `dtype` on `device`; the final cosine math runs in float64.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        # deferred: transformers is a heavy import, needed only here
        from transformers import CLIPModel, CLIPTokenizerFast

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"CLIP weights folder not found: {path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.dtype = path, batch_size, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = CLIPModel.from_pretrained(path).to(self.device, dtype).eval()
        self.tokenizer = CLIPTokenizerFast.from_pretrained(path)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_tokens = min(CLIP_MAX_TOKENS, int(self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def image_embeds(self, frames_FHWC, frame_stride: int = 1) -> torch.Tensor:
        """L2-normalised image embeddings (F', D) float32 of every `frame_stride`-th frame (CPU tensor)."""
        frames = as_frames_FHWC(frames_FHWC)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        frames = frames[::frame_stride]
        chunks = []
        for start in range(0, frames.shape[0], self.batch_size):
            pixels = preprocess_frames(frames[start:start + self.batch_size], self.image_size)
            pixels = pixels.to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            chunks.append(self.model.visual_projection(pooled).float().cpu())
        embeds_FD = torch.cat(chunks)
        return embeds_FD / embeds_FD.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: str | list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) float32 of prompts (truncated to 77 tokens)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        embeds_ND = self.model.text_projection(pooled).float().cpu()
        return embeds_ND / embeds_ND.norm(dim=-1, keepdim=True)

    @staticmethod
    def clip_t_from_embeds(image_embeds_FD: torch.Tensor, text_embed_D: torch.Tensor) -> float:
        """cos(text embedding, mean of the L2-normalised frame embeddings)."""
        return float(_cosine(image_embeds_FD.mean(dim=0), text_embed_D.reshape(-1)))

    @staticmethod
    def temporal_consistency_from_embeds(image_embeds_FD: torch.Tensor) -> float:
        """Mean cosine similarity of consecutive frame embeddings (needs >= 2 frames)."""
        if image_embeds_FD.shape[0] < 2:
            raise ValueError(f"temporal consistency needs at least 2 frames, got {image_embeds_FD.shape[0]}")
        return float(_cosine(image_embeds_FD[:-1], image_embeds_FD[1:]).mean())

    def clip_t(self, frames_FHWC, prompt: str, frame_stride: int = 1) -> float:
        """CLIP-T of one video and its prompt (raw cosine, not x100)."""
        return self.clip_t_from_embeds(self.image_embeds(frames_FHWC, frame_stride), self.text_embeds(prompt)[0])

    def temporal_consistency(self, frames_FHWC, frame_stride: int = 1) -> float:
        """Mean cosine similarity between CLIP embeddings of consecutive (sampled) frames."""
        return self.temporal_consistency_from_embeds(self.image_embeds(frames_FHWC, frame_stride))

    def score(self, frames_FHWC, prompt: str, frame_stride: int = 1) -> dict[str, float]:
        """Both metrics from one pass over the frames.

        Keys: "clip_t", "temporal_consistency", "num_frames" and "clip_t_frame_mean": the per-frame-average
        variant mean_i cos(t, e_i) that some papers report, equal to clip_t * ||mean_i e_i|| (so never larger
        in magnitude than clip_t; see docs/metrics.md).
        """
        image_FD = self.image_embeds(frames_FHWC, frame_stride)
        text_D = self.text_embeds(prompt)[0]
        return {
            "clip_t": self.clip_t_from_embeds(image_FD, text_D),
            "temporal_consistency": self.temporal_consistency_from_embeds(image_FD),
            "clip_t_frame_mean": float(_cosine(image_FD, text_D.expand_as(image_FD)).mean()),
            "num_frames": int(image_FD.shape[0]),
        }
