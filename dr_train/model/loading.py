"""Load the Mochi-1 stack from a local diffusers folder or build the tiny preset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
from transformers import T5EncoderModel, T5TokenizerFast

from dr_train.model import presets
from dr_train.model.attention import set_attention_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOCHI_TEXT_TOKENS = 256
_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class MochiComponents:
    transformer: MochiTransformer3DModel
    vae: AutoencoderKLMochi
    text_encoder: T5EncoderModel
    tokenizer: T5TokenizerFast
    scheduler: FlowMatchEulerDiscreteScheduler
    max_text_tokens: int
    source: str

    def pipeline(self) -> MochiPipeline:
        return MochiPipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                             tokenizer=self.tokenizer, transformer=self.transformer)


def resolve_dtype(preset: str, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if preset == "tiny" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; available: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_pretrained_folder(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model preset {str(path)!r} is neither 'tiny' nor an existing folder")
    missing = [s for s in _SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"Mochi folder {path} lacks {', '.join(missing)} (expected the layout diffusers saves: "
                         f"{', '.join(_SUBFOLDERS)})")


def load_mochi(preset: str = "tiny", dtype: str = "auto", attention_backend: str = "sdpa",
               gradient_checkpointing: bool = False, max_text_tokens: int = 0) -> MochiComponents:
    """The whole Mochi stack with frozen weights, the chosen attention processor and checkpointing switch."""
    torch_dtype = resolve_dtype(preset, dtype)
    if preset == "tiny":
        tokenizer = presets.tiny_tokenizer()
        comps = MochiComponents(
            transformer=presets.tiny_transformer(), vae=presets.tiny_vae(),
            text_encoder=presets.tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
            scheduler=presets.mochi_scheduler(), max_text_tokens=max_text_tokens or presets.TINY_TEXT_TOKENS,
            source="tiny",
        )
        if torch_dtype != torch.float32:
            comps.transformer.to(torch_dtype)
    else:
        path = Path(preset)
        check_pretrained_folder(path)
        comps = MochiComponents(
            transformer=MochiTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype),
            vae=AutoencoderKLMochi.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32),
            text_encoder=T5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch_dtype),
            tokenizer=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            max_text_tokens=max_text_tokens or MOCHI_TEXT_TOKENS, source=str(path),
        )
    for module in (comps.transformer, comps.vae, comps.text_encoder):
        module.requires_grad_(False)
        module.eval()
    set_attention_backend(comps.transformer, attention_backend)
    if gradient_checkpointing:
        comps.transformer.enable_gradient_checkpointing()
    return comps


def save_tiny_preset(folder: str | Path) -> Path:
    """Write the tiny preset in the diffusers folder layout (what a real Mochi-1 download looks like)."""
    folder = Path(folder)
    load_mochi("tiny").pipeline().save_pretrained(folder)
    return folder
