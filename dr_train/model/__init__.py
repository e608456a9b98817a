"""Mochi-1 model loading: the tiny preset or a local diffusers folder, with a switchable attention processor."""
from dr_train.model.attention import set_attention_backend
from dr_train.model.loading import MochiComponents, load_mochi, save_tiny_preset
from dr_train.model.presets import mochi_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae
from dr_train.model.text import encode_prompts

__all__ = ["MochiComponents", "load_mochi", "save_tiny_preset", "set_attention_backend", "tiny_transformer",
           "tiny_vae", "tiny_tokenizer", "tiny_text_encoder", "mochi_scheduler", "encode_prompts"]
