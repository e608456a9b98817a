"""The tiny preset: a complete Mochi stack (transformer, VAE, T5, tokenizer, scheduler) built from configs.

Weights are drawn from a fixed seed, so every process that builds the preset gets the same model: a LoRA
trained on it in one process loads onto it in another. Nothing is downloaded.
"""
from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

TINY_TEXT_TOKENS = 16
TINY_TEXT_DIM = 32

# Words of the relation catalog's prompts get whole-word pieces; anything else falls back to characters.
_TINY_WORDS = """a an the is are and with of to on in at each other person people dog cat robot panda fox bear
rabbit monkey penguin owl lion tiger horse frog duck shaking hands hugging pushing punching slapping kicking
patting back pointing finger giving something touching pocket walking towards apart hitting object wielding knife
knocking over grabbing stuff shooting gun stepping foot high-five cheers drink carrying together taking photo
following whispering ear exchanging things supporting playing rock-paper-scissors . ,""".split()


def tiny_transformer(seed: int = 0) -> MochiTransformer3DModel:
    """The tiny-preset `MochiTransformer3DModel`: 2 blocks, 2 heads x 16 dims, same architecture as Mochi-1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=32,
            in_channels=12, text_embed_dim=TINY_TEXT_DIM, time_embed_dim=32, activation_fn="swiglu",
            max_sequence_length=TINY_TEXT_TOKENS,
        )


def tiny_vae(seed: int = 1) -> AutoencoderKLMochi:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLMochi(
            latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
        )


def word_tokenizer(words, max_length: int) -> T5TokenizerFast:
    """A real T5 (Unigram) tokenizer with a small vocabulary: `words` (and their capitalised forms) as whole-word
    pieces, anything else falls back to single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {t for t, _ in vocab}
    pieces = [("\u2581" + w, -1.0) for w in words] + [("\u2581" + w.capitalize(), -1.0) for w in words]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -6.0) for c in chars] + [("\u2581" + c, -6.5) for c in chars]
    for piece in pieces:
        if piece[0] not in seen:
            seen.add(piece[0])
            vocab.append(piece)
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_tokenizer() -> T5TokenizerFast:
    """The tiny preset's tokenizer: the catalog's words."""
    return word_tokenizer(_TINY_WORDS, TINY_TEXT_TOKENS)


def tiny_text_encoder(vocab_size: int, seed: int = 2) -> T5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(T5Config(
            vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False,
        ))


def mochi_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Mochi-1's scheduler configuration (flow matching; sigmas inverted so timestep = (1 - sigma) * 1000)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, invert_sigmas=True,
                                           use_dynamic_shifting=False)
