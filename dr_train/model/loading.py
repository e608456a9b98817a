"""Load the Mochi-1 stack: the built-in presets (`tiny`, built from a config; `synth`, the base pretrained here and
shipped in dr_train/model/synth_base/, sha256-checked) or a local diffusers folder."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
from transformers import T5EncoderModel, T5TokenizerFast

from dr_train.base_identity import PRESETS, base_identity
from dr_train.model import presets, synth
from dr_train.model.attention import set_attention_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOCHI_TEXT_TOKENS = 256
_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class MochiComponents:
    transformer: MochiTransformer3DModel | None
    vae: AutoencoderKLMochi | None
    text_encoder: T5EncoderModel | None
    tokenizer: T5TokenizerFast
    scheduler: FlowMatchEulerDiscreteScheduler
    max_text_tokens: int
    source: str
    identity: str                   # dr_train.base_identity: what LoRAs and videos made on it record
    block_swap: Any = None          # dr_train.model.block_swap.BlockSwap when model.blocks_to_swap is on

    def pipeline(self) -> MochiPipeline:
        return MochiPipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                             tokenizer=self.tokenizer, transformer=self.transformer)


def resolve_dtype(preset: str, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if preset in PRESETS else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; available: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_pretrained_folder(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model preset {str(path)!r} is neither 'tiny', 'synth' nor an existing folder")
    missing = [s for s in _SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"Mochi folder {path} lacks {', '.join(missing)} (expected the layout diffusers saves: "
                         f"{', '.join(_SUBFOLDERS)})")


PARTS = ("transformer", "vae", "text_encoder")


def folder_text_tokens(folder: Path) -> int:
    """The T5 sequence length a folder's transformer was built for (Mochi-1: 256)."""
    config = folder / "transformer" / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_sequence_length", MOCHI_TEXT_TOKENS))
    return MOCHI_TEXT_TOKENS


def _load_part(part: str, preset: str, torch_dtype: torch.dtype, vocab_size: int):
    if preset == "tiny":
        module = {"transformer": presets.tiny_transformer, "vae": presets.tiny_vae,
                  "text_encoder": lambda: presets.tiny_text_encoder(vocab_size)}[part]()
        return module.to(torch_dtype) if part == "transformer" and torch_dtype != torch.float32 else module
    cls = {"transformer": MochiTransformer3DModel, "vae": AutoencoderKLMochi, "text_encoder": T5EncoderModel}[part]
    return cls.from_pretrained(preset, subfolder=part, torch_dtype=torch.float32 if part == "vae" else torch_dtype)


def load_mochi(preset: str = "tiny", dtype: str = "auto", attention_backend: str = "auto",
               gradient_checkpointing: bool = False, max_text_tokens: int = 0,
               parts: tuple[str, ...] = PARTS) -> MochiComponents:
    """The Mochi stack with frozen weights, the chosen attention processor and checkpointing switch.

    `parts` picks which of transformer, vae and text_encoder to load (the others are None): training from cached
    latents needs only the transformer, data preparation only the VAE and T5."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown Mochi part(s) {sorted(unknown)}; available: {', '.join(PARTS)}")
    torch_dtype = resolve_dtype(preset, dtype)
    source = preset if preset in PRESETS else str(Path(preset))
    identity = base_identity(preset)
    if preset == "tiny":
        tokenizer, scheduler = presets.tiny_tokenizer(), presets.mochi_scheduler()
        max_text_tokens = max_text_tokens or presets.TINY_TEXT_TOKENS
    else:
        if preset == "synth":
            preset = str(synth.verify_folder(synth.SYNTH_DIR))
        check_pretrained_folder(Path(preset))
        tokenizer = T5TokenizerFast.from_pretrained(preset, subfolder="tokenizer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(preset, subfolder="scheduler")
        max_text_tokens = max_text_tokens or folder_text_tokens(Path(preset))
    loaded = {part: _load_part(part, preset, torch_dtype, len(tokenizer)) if part in parts else None
              for part in PARTS}
    comps = MochiComponents(tokenizer=tokenizer, scheduler=scheduler, max_text_tokens=max_text_tokens,
                            source=source, identity=identity, **loaded)
    for module in loaded.values():
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    if comps.transformer is not None:
        set_attention_backend(comps.transformer, attention_backend)
        if gradient_checkpointing:
            comps.transformer.enable_gradient_checkpointing()
    return comps


def save_tiny_preset(folder: str | Path) -> Path:
    """Write the tiny preset in the diffusers folder layout (what a real Mochi-1 download looks like)."""
    folder = Path(folder)
    load_mochi("tiny").pipeline().save_pretrained(folder)
    return folder
