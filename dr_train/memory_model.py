"""Predicted peak memory per rank of one training step, before any weight is loaded.

The activations are not a formula: the transformer of the run's architecture is built on the meta device (no
memory, no compute), the relation LoRA triplet added, and one forward pass traced at the run's latent size with
autograd's saved-tensor hooks, so every tensor autograd keeps for backward is counted once (frozen weights
excluded) and attributed to its block. Attention is traced as the fused kernels keep it (flash / SDPA's efficient
kernels save q, k, v, the output and a float32 log-sum-exp; the `reference` backend also keeps the probabilities).

Per rank, in bytes:

* frozen weights: the backbone at its dtype, or its Linear weights in fp8 (`model.fp8_base`); ZeRO-3 partitions it
  (with parameter offload one block is resident); block swap keeps the resident blocks plus two swapped ones;
* adapters: LoRA weights, their gradients and AdamW's two moments, all float32 (ZeRO 1 shards the moments, 2 also
  the gradients, 3 also the weights; optimizer offload moves the moments to the CPU);
* activations: without checkpointing every block's saved tensors; with it each block's inputs plus one block's
  saved tensors, recomputed during its backward;
* transient: what backward holds beside them: the gradient flowing between blocks and two of the largest saved
  tensors' gradients (validated against measured peaks: `perf/memory_model.py --validate`).

Not counted: the CUDA context and the caching allocator's slack (reserved minus allocated, 10-15 % measured), which
`fits` adds as a margin.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from diffusers import MochiTransformer3DModel

from dr_train import flops, geometry
from dr_train.method.triplet import add_relation_lora_triplet
from dr_train.model.attention import _joint_output, _joint_qkv
from dr_train.model.fp8 import quantize_frozen_linears

GIB = 1024 ** 3
ALLOCATOR_MARGIN = 1.15          # reserved / allocated measured on the H100 and H200 (34.0 / 30.6 GB) plus a little
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
TEXT_TOKENS = {"mochi": 256, "tiny": 8, "synth": 24}


def architecture(preset: str, num_layers: int | None = None) -> dict:
    """MochiTransformer3DModel keyword arguments of a preset (`mochi` = Mochi-1, `tiny`, `synth`) or of a diffusers
    folder's transformer/config.json."""
    if preset == "mochi":
        kwargs = dataclasses.asdict(flops.MOCHI_1)
        kwargs.update(qk_norm="rms_norm", activation_fn="swiglu", max_sequence_length=TEXT_TOKENS["mochi"])
    elif preset == "tiny":
        from dr_train.model.presets import tiny_transformer  # deferred: builds a model, needed only for this preset
        kwargs = dict(tiny_transformer().config)
    else:
        if preset == "synth":
            from dr_train.model.synth import SYNTH_DIR  # deferred: the preset's folder, needed only for it
            preset = str(SYNTH_DIR)
        path = Path(preset) / "transformer" / "config.json"
        if not path.is_file():
            raise ValueError(f"model.preset {preset!r}: no transformer/config.json there to read the architecture from")
        kwargs = json.loads(path.read_text())
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    if num_layers:
        kwargs["num_layers"] = num_layers
    return kwargs


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and a float32 log-sum-exp per row
    (`probabilities` adds the softmax matrix, as the unfused reference does)."""

    @staticmethod
    def forward(ctx, q, k, v, probabilities: bool):
        out = torch.empty_like(q)
        keep = [q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32)]
        if probabilities:
            keep.append(q.new_empty(*q.shape[:-1], k.shape[-2]))
        ctx.save_for_backward(*keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _TracedAttention:
    def __init__(self, probabilities: bool):
        self.probabilities = probabilities

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        q, k, v = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = _FusedAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.probabilities)
        return _joint_output(attn, out.transpose(1, 2).flatten(2, 3), hidden_states.shape[1])


@dataclass
class ActivationTrace:
    """Saved-for-backward bytes of one forward pass: per block, outside the blocks, each block's inputs, and the
    largest single saved tensor."""
    per_block: list[int]
    outside: int
    block_inputs: list[int]
    largest: int
    frozen_weights: int
    lora_parameters: int
    block_weights: list[int]


def trace_activations(arch: dict, latent_BCFHW: tuple, text_tokens: int, lora, dtype: torch.dtype,
                      attention: str = "sdpa", fp8_base: bool = False) -> ActivationTrace:
    """Trace one forward pass of `arch` with the LoRA triplet (`lora`: a LoRAConfig) on the meta device
    (`fp8_base`: frozen Linear weights in fp8, dr_train.model.fp8)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = MochiTransformer3DModel(**arch)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    add_relation_lora_triplet(model, lora)
    if fp8_base:
        quantize_frozen_linears(model)
    for block in model.transformer_blocks:
        block.attn1.processor = _TracedAttention(probabilities=attention == "reference")
    frozen_tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}  # counted apart
    current, saved, inputs = [-1], {}, []

    def enter(module, args, kwargs, index):
        current[0] = index
        inputs.append(sum(t.nbytes for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)))

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, k, i=i: enter(m, a, k, i), with_kwargs=True)
        block.register_forward_hook(lambda *_: current.__setitem__(0, -1))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in weights and key not in saved:
            saved[key] = (current[0], t.untyped_storage().nbytes())
        return t

    b, c, f, h, w = latent_BCFHW
    x = dict(hidden_states=torch.empty(b, c, f, h, w, device="meta", dtype=dtype),
             encoder_hidden_states=torch.empty(b, text_tokens, arch["text_embed_dim"], device="meta", dtype=dtype),
             timestep=torch.empty(b, device="meta"),
             encoder_attention_mask=torch.ones(b, text_tokens, dtype=torch.bool, device="meta"))
    # RoPE's float32 autocast region has no meaning on the meta device (autocast refuses it)
    with mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred = model(**x, return_dict=False)[0]
        pred.float().pow(2).mean()
    per_block = [0] * len(model.transformer_blocks)
    outside = 0
    for block_index, nbytes in saved.values():
        if block_index < 0:
            outside += nbytes
        else:
            per_block[block_index] += nbytes
    in_blocks = [n for i, n in saved.values() if i >= 0]
    lora = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    frozen = sum(t.nbytes for t in frozen_tensors)
    block_weights = [sum(t.nbytes for t in (*b.parameters(), *b.buffers()) if not t.requires_grad)
                     for b in model.transformer_blocks]
    return ActivationTrace(per_block, outside, inputs, max(in_blocks, default=0), frozen, lora, block_weights)


@dataclass
class Prediction:
    parts: dict[str, int]           # bytes per rank
    checkpointing: bool
    ranks: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, device_bytes: int) -> bool:
        """Whether the step fits a device of `device_bytes`, with the allocator's slack and the CUDA context."""
        return self.total * ALLOCATOR_MARGIN + CUDA_CONTEXT_BYTES <= device_bytes

    def lines(self) -> list[str]:
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024 ** 2)
        parts = ", ".join(f"{k} {v / scale:.2f}" for k, v in self.parts.items())
        return [f"predicted peak memory {self.total / scale:.2f} {unit} per rank ({parts} {unit}; checkpointing "
                f"{'on' if self.checkpointing else 'off'}, {self.ranks} rank(s); perf/memory_model.py)"]


def predict(arch: dict, latent_BCFHW: tuple, text_tokens: int, lora, dtype: torch.dtype, checkpointing: bool,
            attention: str = "sdpa", zero_stage: int = 0, offload_optimizer: bool = False,
            offload_params: bool = False, ranks: int = 1, fp8_base: bool = False,
            blocks_to_swap: int = 0) -> Prediction:
    """Peak bytes per rank of one training step of `arch` at `latent_BCFHW` (see the module's docstring)."""
    t = trace_activations(arch, latent_BCFHW, text_tokens, lora, dtype, attention, fp8_base)
    biggest_block = max(t.per_block, default=0)
    if checkpointing:
        activations = t.outside + sum(t.block_inputs) + biggest_block
    else:
        activations = t.outside + sum(t.per_block)
    between_blocks = max(t.block_inputs, default=0)
    frozen = t.frozen_weights
    if zero_stage == 3:
        frozen = t.frozen_weights // len(t.per_block) if offload_params else t.frozen_weights // ranks
    elif blocks_to_swap:
        swapped = t.block_weights[max(0, len(t.block_weights) - blocks_to_swap):]
        frozen = t.frozen_weights - sum(swapped) + 2 * max(swapped)        # the running block and its prefetch
    shard = lambda n, stage: n // ranks if zero_stage >= stage else n  # noqa: E731
    parts = {
        "frozen_weights": frozen,
        "lora_weights": shard(t.lora_parameters, 3),
        "lora_grads": shard(t.lora_parameters, 2),
        "optimizer": 0 if offload_optimizer else shard(2 * t.lora_parameters, 1),
        "activations": activations,
        "transient": between_blocks + 2 * t.largest,
    }
    return Prediction(parts, checkpointing, ranks)


def predict_config(cfg, frames: int, height: int, width: int, ranks: int = 1) -> Prediction:
    """The prediction for a training config (`model`, `lora`, `distributed`, `train` sections) at a clip size."""
    from dr_train.model.loading import resolve_dtype  # deferred: keeps this module importable without the loaders
    geometry.check_video_size(frames, height, width)
    m, d = cfg.model, cfg.distributed
    arch = architecture(m.preset)
    tokens = m.max_text_tokens or TEXT_TOKENS.get(m.preset, arch.get("max_sequence_length", 256))
    latent = (cfg.train.batch_size, arch.get("in_channels", 12), geometry.latent_frames(frames),
              *geometry.latent_size(height, width))
    return predict(arch, latent, tokens, cfg.lora, resolve_dtype(m.preset, m.dtype), m.gradient_checkpointing,
                   m.attention_backend, d.zero_stage, d.offload_optimizer, d.offload_params, ranks, m.fp8_base,
                   m.blocks_to_swap)


def check_fits(cfg, frames: int, height: int, width: int, ranks: int, device_bytes: int | None) -> Prediction:
    """Predict; when `device_bytes` (the GPU's memory) is known and the run is predicted not to fit, raise a
    ValueError naming the settings that would fit (unless train.memory_check is off)."""
    p = predict_config(cfg, frames, height, width, ranks)
    if device_bytes is None or p.fits(device_bytes) or not cfg.train.memory_check:
        return p
    blocks = architecture(cfg.model.preset)["num_layers"]
    # the README's memory tiers, each adding to the previous
    remedies = (("model.gradient_checkpointing=true", {"gradient_checkpointing": True}),
                ("model.fp8_base=true", {"fp8_base": True}),
                (f"model.blocks_to_swap={blocks // 2}", {"blocks_to_swap": max(blocks // 2, cfg.model.blocks_to_swap)}))
    tried, switched, hint = cfg, [], None
    for label, change in remedies:
        if all(getattr(tried.model, k) == v for k, v in change.items()):
            continue
        tried = dataclasses.replace(tried, model=dataclasses.replace(tried.model, **change))
        switched.append(label)
        q = predict_config(tried, frames, height, width, ranks)
        if q.fits(device_bytes):
            hint = f"--set {' '.join(switched)} is predicted to fit ({q.total / GIB:.1f} GiB; configs/memory/)"
            break
    hint = hint or ("no memory setting is predicted to fit one GPU: shard with distributed.zero_stage=3 or shorten "
                    "the clip")
    raise ValueError(f"predicted peak memory {p.total / GIB:.1f} GiB per GPU does not fit this GPU's "
                     f"{device_bytes / GIB:.1f} GiB (with {ALLOCATOR_MARGIN - 1:.0%} allocator slack and the CUDA "
                     f"context); {hint}; train.memory_check=false starts anyway")
