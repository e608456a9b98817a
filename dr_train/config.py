"""Typed configuration: dataclasses documented once, loaded from one YAML file plus CLI overrides.

`configs/default.yaml` is generated from these definitions (`python -m dr_train.config > configs/default.yaml`)
and a test keeps the two identical, so each option's documentation lives here, next to its definition.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml

from dr_train.geometry import check_video_size


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None):
    """A config option with its one-line documentation and, for a number or a list of numbers, its range: every
    value (every element of a list) must satisfy the bounds given (ge: >=, gt: >, le: <=, lt: <). Every number an
    option holds must also be finite. `check_ranges` enforces both at load, naming the option."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def range_text(bounds: dict) -> str:
    """'>= 0, < 1' for {'ge': 0, 'lt': 1}."""
    return ", ".join(f"{_BOUNDS[name][1]} {value:g}" for name, value in bounds.items())


@dataclass
class ModelConfig:
    """The Mochi-1 backbone."""
    preset: str = opt("synth", "'synth' (the 5M-parameter base pretrained on the synth world, shipped in "
                               "dr_train/model/synth_base/, sha256-checked; docs/synth.md), 'tiny' (a random "
                               "2-block Mochi built from a config, for tests) or the path of a local diffusers "
                               "Mochi-1 folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    dtype: str = opt("auto", "dtype of the frozen base weights: fp32, bf16, or auto (bf16 for a pretrained folder, "
                             "fp32 for the tiny and synth presets)")
    gradient_checkpointing: bool = opt(False, "recompute each transformer block in the backward pass")
    attention_backend: str = opt("auto", "attention processor: flash (flash-attn varlen over each sample's valid "
                                         "tokens; CUDA + the flash-attn package), sdpa (batched, masked text "
                                         "tokens), reference (diffusers' per-sample loop), auto (flash where it "
                                         "can run, else sdpa)")
    max_text_tokens: int = opt(0, "T5 sequence length; 0 = the preset's own (256 for Mochi-1, 24 for synth, 16 for "
                                  "tiny)", ge=0)
    fp8_base: bool = opt(False, "store the frozen Linear weights in fp8 (e4m3, a scale per output row), dequantised "
                                "per layer for each matmul: about halves the base's memory (docs/memory.md)")
    blocks_to_swap: int = opt(0, "keep this many of the last transformer blocks in host memory and copy each in just "
                                 "before it runs, the next prefetched (needs gradient_checkpointing; docs/memory.md)",
                              ge=0)


@dataclass
class LoRAConfig:
    """The relation LoRA triplet."""
    rank: int = opt(16, "LoRA rank of every adapter", ge=1)
    alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / rank)", gt=0)
    placement: Any = opt("paper", "where each adapter goes: a preset name (paper, relation_v, relation_q, "
                                  "relation_kv, no_relation, no_subject, no_ffn, direct) or a mapping "
                                  "{adapter: [projection, ...]} over to_q, to_k, to_v, add_q_proj, add_k_proj, "
                                  "add_v_proj, to_out.0, to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, "
                                  "ff_context.net.2")
    export_adapters: list = opt(["relation", "ffn"], "adapters written by export for inference (the paper drops "
                                                     "the subject LoRAs)")


@dataclass
class HMTConfig:
    """Hybrid mask training: which adapters a step updates and which mask weights its loss."""
    enabled: bool = opt(True, "draw one of relation/subject1/subject2 per optimizer step; false updates every "
                              "adapter each step with the relation mask")
    probabilities: list = opt([1 / 3, 1 / 3, 1 / 3], "draw probabilities of [relation, subject1, subject2], "
                                                     "summing to 1", ge=0, le=1)
    forward: str = opt("selected", "adapters in a step's forward pass: selected (those the step updates: relation "
                                   "runs relation+subjects+ffn, subject k runs subject k+ffn; the official code) "
                                   "or all (every adapter runs, the unselected ones frozen)")
    relation_step_subjects: str = opt("train", "what a relation step does with the subject LoRAs: train (the paper "
                                               "and the official code: updated beside relation + ffn) or frozen "
                                               "(they run, for appearance cues, but only relation + ffn are updated) "
                                               "or excluded (they neither run nor are updated: relation + ffn alone)")
    subject_target: str = opt("video", "what a subject step learns from: video (the paper and the official code: the "
                                       "clip, with that subject's mask), still (one latent frame of the clip and its "
                                       "mask, repeated over the clip's frames) or frame (that frame as a one-frame "
                                       "clip); still and frame hold the subject's look and none of its motion, and "
                                       "skip RCL")
    subject_sigma_max: float = opt(1.0, "the noise levels the subject LoRAs act at: 1 (the paper and the official "
                                        "code: every sigma) or s < 1, subject steps draw sigma in [0, s] and a "
                                        "relation step draws its band, [0, s] with probability s and the subject "
                                        "LoRAs, else [s, 1] without them (neither run nor updated)", gt=0, le=1)


@dataclass
class LossConfig:
    """Masked flow-matching loss and relational contrastive loss (RCL)."""
    mode: str = opt("paper", "paper: mean((w*M + 1) * err^2), relation mask = max of subject masks, latent masks "
                             "8x8 mean-pooled; official: mean((1 + w*M^2) * err^2), relation mask = sum of subject "
                             "masks, latent masks 8x8 max-pooled (the official code's resize)")
    mask_weight: float = opt(50.0, "lambda_m, the weight of the mask term", ge=0)
    mask_span: str = opt("frame", "where the mask term weights each latent frame: frame (the paper and the official "
                                  "code: where the subjects are in that frame) or clip (where they are in any frame "
                                  "of the clip, the region their motion sweeps)")
    rcl_weight: float = opt(0.01, "lambda_1, the weight of the relational contrastive loss (0 disables it)", ge=0)
    temperature: float = opt(0.07, "InfoNCE temperature tau", gt=0)
    rcl_variant: str = opt("paper", "paper: per clip n_pos positives from other videos (bank + batch), per anchor "
                                    "frame n_neg detached single-frame negatives from this clip and the bank; "
                                    "official: per anchor frame up to n_pos positives from the bank's last bank_size "
                                    "clips (same video allowed), negatives = this clip's frames (with gradient) + "
                                    "max(n_neg - frames, 0) from the last negative_bank_frames frames")
    n_pos: int = opt(4, "positives per anchor frame (dynamics of other videos from the memory bank)", ge=1)
    n_neg: int = opt(10, "negatives per anchor frame (single-frame features of this and past videos)", ge=1)
    bank_size: int = opt(64, "FIFO memory bank capacity, in videos (official variant: its positive buffer)", ge=1)
    negative_bank_frames: int = opt(64, "official variant: FIFO of single-frame features the extra negatives come "
                                        "from, in frames", ge=0)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""
    lr: float = opt(2e-4, "peak learning rate", gt=0)
    weight_decay: float = opt(0.01, "decoupled weight decay (applied only to the adapters updated this step)", ge=0)
    betas: list = opt([0.9, 0.999], "AdamW betas", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = opt(10, "linear warmup steps", ge=0)
    schedule: str = opt("cosine", "cosine or constant after warmup")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of lr (cosine)", ge=0, le=1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", ge=0)
    schedule_steps: int = opt(0, "horizon of the warmup + cosine schedule in steps (0 = train.max_steps); fix it to "
                                 "extend a run later exactly as if it had been trained straight", ge=0)
    frozen_adapters: str = opt("skip", "adapters a step does not update: skip (AdamW leaves them untouched, no "
                                       "moments, no decay) or zero_grad (they get zero gradients and AdamW still "
                                       "applies momentum and weight decay, as in the official code)")


@dataclass
class DataConfig:
    """Training data: a dataset folder written by launch/prepare.py, or the built-in synthetic relations."""
    source: str = opt("synthetic", "synthetic (the built-in relations, rendered, encoded and sharded on first use "
                                   "into cache_dir) or the path of a dataset folder written by launch/prepare.py")
    catalog: str = opt("", "relation catalog YAML; empty means the repository's datasets/relations.yaml")
    cache_dir: str = opt(".cache/dr_train", "where synthetic datasets are generated (one folder per setting)")
    videos_per_relation: int = opt(12, "synthetic: clips generated per relation (with the synth preset: the "
                                       "world's person exemplars, one fixed set)", ge=1)
    latent_frames: int = opt(0, "synthetic: latent frames per clip (pixel frames = 6*(F-1)+1); 0 = the preset's "
                                "native size (synth: 5, the 25-frame clips it was pretrained on; tiny: 3)", ge=0)
    latent_height: int = opt(0, "synthetic: latent height (pixels / 8); 0 = the preset's (8)", ge=0)
    latent_width: int = opt(0, "synthetic: latent width (pixels / 8); 0 = the preset's (8)", ge=0)
    caption_dropout: float = opt(0.1, "probability of training a sample with an empty prompt", ge=0, le=1)
    num_workers: int = opt(0, "DataLoader worker processes reading shards (0 reads in the training process)", ge=0)
    resampled: bool = opt(False, "draw each epoch's shards with replacement instead of a permutation")
    skip_corrupt: bool = opt(False, "a damaged sample (checksum, shape or non-finite values) is logged, counted in "
                                    "the metrics (corrupt_samples) and its batch slot filled with an intact sample of "
                                    "the same shape, instead of stopping the run")


@dataclass
class PrepareConfig:
    """Data preparation (launch/prepare.py): videos -> subject masks -> latents + T5 embeddings -> shards.
    The VAE and T5 come from model.preset, so a dataset matches the model it trains."""
    frames: int = opt(61, "frames per clip (1 + 6k for Mochi's VAE)", ge=1)
    height: int = opt(480, "clip height in pixels (multiple of 16)", ge=1)
    width: int = opt(848, "clip width in pixels (multiple of 16)", ge=1)
    fps: float = opt(30.0, "resample clips to this frame rate (0 keeps each video's own)", ge=0)
    trim: str = opt("center", "which window of a longer video to keep: center or start")
    video_backend: str = opt("auto", "video decoder: auto (DALI on a CUDA GPU when installed, else PyAV), pyav, "
                                     "dali")
    layout: str = opt("auto", "input layout: folders (<input>/<relation>/<clip>.mp4), ntu (NTU RGB+D names "
                              "SsssCcccPpppRrrrAaaa_rgb.avi, relation from the action id), or auto")
    masks: str = opt("auto", "subject masks: png (colour-coded per-frame PNG folder <clip>_masks/ beside each "
                             "video), grounding_sam (Grounding DINO + SAM), or auto (png where the folder exists, "
                             "else grounding_sam)")
    mask_colours: list = opt([[255, 0, 0], [0, 255, 0]], "RGB colours of subject 1 and subject 2 in PNG masks",
                             ge=0, le=255)
    grounding_dino: str = opt("", "local folder of a transformers Grounding DINO model (masks=grounding_sam)")
    sam: str = opt("", "local folder of a transformers SAM model (masks=grounding_sam)")
    detection_prompt: str = opt("a person.", "Grounding DINO text query for the two subjects")
    box_threshold: float = opt(0.3, "Grounding DINO box score threshold", ge=0, le=1)
    text_threshold: float = opt(0.25, "Grounding DINO text score threshold", ge=0, le=1)
    samples_per_shard: int = opt(8, "clips per WebDataset shard (shards hold one relation each)", ge=1)
    workers: int = opt(2, "processes decoding videos and masks in parallel (0 = in the main process)", ge=0)
    strict: bool = opt(False, "stop at the first bad video instead of skipping it (skips are always counted "
                              "and logged)")
    vae_tiling: bool = opt(False, "encode with the VAE's spatial tiling (less memory for full-size clips)")
    preview_frames: int = opt(5, "downscaled frames kept per sample for contact sheets", ge=1)
    preview_size: int = opt(128, "longer side of those preview frames, in pixels", ge=8)


@dataclass
class DistributedConfig:
    """Ranks and DeepSpeed. Launch with `deepspeed launch/train.py ...`, `torchrun --nproc_per_node N
    launch/train.py ...` or as one process; multi-node: `deepspeed --hostfile hosts launch/train.py ...`."""
    engine: str = opt("auto", "auto (DeepSpeed when zero_stage > 0 or offloading, else plain torch), deepspeed, "
                              "torch (LoRA gradients averaged over ranks, no sharding)")
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage: 0, 1 or 2 (shard the LoRA optimizer state and gradients), "
                             "3 (also shard the frozen backbone's parameters across ranks)", ge=0, le=3)
    offload_optimizer: bool = opt(False, "ZeRO: keep the optimizer state in CPU memory")
    offload_params: bool = opt(False, "ZeRO-3: keep the backbone's parameters in CPU memory")
    backend: str = opt("auto", "process-group backend: auto (nccl with CUDA, gloo otherwise), nccl, gloo")
    timeout_minutes: int = opt(30, "timeout of collective operations", ge=1)


@dataclass
class TrainConfig:
    """The training loop."""
    relations: list = opt(["handshaking", "high_five"], "relations to train, by catalog name ('all' = every "
                                                        "catalog relation)")
    output_dir: str = opt("runs/default", "one folder per relation is written under it")
    max_steps: int = opt(200, "optimizer steps per relation (the paper: 2400)", ge=1)
    batch_size: int = opt(1, "clips per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    checkpoint_every: int = opt(50, "write a checkpoint every N steps (and at the end)", ge=1)
    keep_checkpoints: int = opt(2, "checkpoints kept per relation (older ones are deleted)", ge=1)
    seed: int = opt(0, "seed of every random stream (adapters, HMT draws, noise, data order, bank sampling)", ge=0)
    deterministic: bool = opt(False, "deterministic kernels, so runs and resumed runs are bit-identical")
    kernels: str = opt("auto", "fused loss/feature kernels: auto (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; "
                               "torch otherwise), triton (required), torch (the plain references)")
    mixed_precision: str = opt("auto", "bf16 autocast: auto (on CUDA with bf16), bf16, or no")
    log_every: int = opt(1, "TensorBoard scalars every N steps (metrics.jsonl gets every step)", ge=1)
    resume: bool = opt(False, "continue each relation from its latest checkpoint")
    resume_from: str = opt("", "a checkpoint name such as step-40 to resume from instead of the latest; used when "
                               "the latest is damaged (one relation at a time)")
    memory_check: bool = opt(True, "on a GPU, refuse to start when the memory model predicts the step does not fit "
                                   "(perf/memory_model.py; the prediction is printed either way)")
    export: bool = opt(True, "export the inference LoRA (export_adapters) when a relation finishes")
    export_formats: list = opt(["diffusers", "comfyui"], "LoRA files the export writes: diffusers "
                                                         "(pytorch_lora_weights.safetensors) and/or comfyui "
                                                         "(<relation>_comfyui.safetensors for ComfyUI's models/loras/)")


@dataclass
class ValidationConfig:
    """Videos sampled during training with the inference adapters (lora.export_adapters), written to
    <output-dir>/<relation>/validation/ and TensorBoard; judged on the synth world. Training is not disturbed."""
    every: int = opt(-1, "sample every N steps; 0 = off; -1 = auto (every 100 steps with the synth preset, off "
                         "otherwise)", ge=-1)
    prompts: list = opt([], "prompts to sample; empty = the relation's training prompt and its first two "
                            "evaluation prompts")
    seeds: list = opt([0], "sampling seeds of every prompt", ge=0)
    num_inference_steps: int = opt(32, "Euler sampler steps (Mochi's schedule needs 2 or more)", ge=2)
    guidance_scale: float = opt(5.0, "classifier-free guidance scale", ge=0)


@dataclass
class LogConfig:
    """Optional experiment tracking beside metrics.jsonl and TensorBoard (always written)."""
    wandb: bool = opt(False, "also send the scalars and validation videos to Weights & Biases (one run per "
                             "relation); the API key comes from the environment (WANDB_API_KEY or `wandb login`) "
                             "only, never from or into the config")
    wandb_project: str = opt("dr-train", "W&B project")
    wandb_entity: str = opt("", "W&B entity (team or user); empty = the key's default")
    wandb_mode: str = opt("", "online, offline or disabled; empty = W&B's own default ($WANDB_MODE)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    hmt: HMTConfig = field(default_factory=HMTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a ValueError naming the option."""
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"config option {where}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config option {where}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"config option {where}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and float(value) != out:
            raise ValueError(f"config option {where}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config option {where}: expected a string, got {value!r}")
        return str(value)
    if typ is list or get_origin(typ) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config option {where}: expected a list, got {value!r}")
        return list(value)
    return value


def _apply(section: Any, values: dict, prefix: str) -> None:
    hints = get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config option {where!r}; known: {', '.join(sorted(names))}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config section {where!r} must be a mapping, got {value!r}")
            _apply(current, value, where + ".")
        else:
            setattr(section, key, _coerce(value, hints[key], where))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `key.sub=value` overrides (values parsed as YAML)."""
    cfg = load_sections(Config(), path, overrides)
    validate(cfg)
    return cfg


def load_sections(cfg, path: str | Path | None = None, overrides: list[str] | None = None):
    """Fill `cfg` (a dataclass of section dataclasses, defaults in place) from the YAML file at `path`, then
    `key.sub=value` overrides; returns it. Unknown options and ill-typed values are ValueErrors naming them."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        _apply(cfg, data, "")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.option=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict = yaml.safe_load(raw) if raw.strip() else ""
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, nested, "")
    check_ranges(cfg)
    return cfg


def _numbers(value: Any, where: str) -> list[tuple[str, Any]]:
    """(name, number) for a number, or for every element of a (nested) list of numbers."""
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _numbers(v, f"{where}[{i}]")]
    if isinstance(value, str):
        try:
            return [(where, float(value))]
        except ValueError:
            raise ValueError(f"config option {where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config option {where}: expected a number, got {value!r}")
    return [(where, value)]


def check_ranges(cfg) -> None:
    """Every number of every option of `cfg` (a dataclass of section dataclasses) is finite and within the bounds
    its `opt` declares; a ValueError names the first option that is not."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            value, bounds = getattr(section, f.name), f.metadata.get("bounds", {})
            where = f"{sec.name}.{f.name}"
            if bounds:
                leaves = _numbers(value, where)
            elif isinstance(value, float):
                leaves = [(where, value)]
            else:
                continue
            for name, number in leaves:
                if not math.isfinite(float(number)):
                    raise ValueError(f"config option {name} must be a finite number, got {number}")
                for bound, limit in bounds.items():
                    compare, symbol = _BOUNDS[bound]
                    if not compare(float(number), limit):
                        raise ValueError(f"config option {name} must be {symbol} {limit:g}, got {number}")


def validate(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    from dr_train.method import flow_matching_loss as fm, hybrid_mask_training as hmt

    choices = {"loss.mode": fm.MODES, "loss.rcl_variant": ("paper", "official"), "loss.mask_span": fm.MASK_SPANS,
               "hmt.forward": hmt.FORWARD_MODES, "hmt.relation_step_subjects": hmt.RELATION_STEP_SUBJECTS,
               "hmt.subject_target": hmt.SUBJECT_TARGETS, "optim.frozen_adapters": hmt.FROZEN_ADAPTERS}
    for name, allowed in choices.items():
        section, option = name.split(".")
        if getattr(getattr(cfg, section), option) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                             f"{getattr(getattr(cfg, section), option)!r}")
    if cfg.model.attention_backend not in ("auto", "flash", "sdpa", "reference"):
        raise ValueError(f"model.attention_backend must be auto, flash, sdpa or reference, got "
                         f"{cfg.model.attention_backend!r}")
    if cfg.model.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"model.dtype must be auto, fp32 or bf16, got {cfg.model.dtype!r}")
    if cfg.train.kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"train.kernels must be auto, triton or torch, got {cfg.train.kernels!r}")
    if cfg.train.mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"train.mixed_precision must be auto, bf16 or no, got {cfg.train.mixed_precision!r}")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be cosine or constant, got {cfg.optim.schedule!r}")
    p = [float(x) for x in cfg.hmt.probabilities]
    if len(p) != 3 or abs(sum(p) - 1.0) > 1e-6:
        raise ValueError(f"hmt.probabilities must be 3 non-negative numbers summing to 1 (relation, subject1, "
                         f"subject2), got {cfg.hmt.probabilities!r} (sum {sum(p):g})")
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must be 2 numbers (AdamW's beta1, beta2), got {cfg.optim.betas!r}")
    d = cfg.distributed
    if d.engine not in ("auto", "deepspeed", "torch") or d.backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"distributed.engine must be auto, deepspeed or torch and distributed.backend auto, nccl "
                         f"or gloo; got {d.engine!r}, {d.backend!r}")
    if d.offload_params and d.zero_stage != 3:
        raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
    if d.engine == "torch" and (d.zero_stage or d.offload_optimizer or d.offload_params):
        raise ValueError("distributed.engine torch cannot shard or offload: use deepspeed (or auto)")
    formats = cfg.train.export_formats
    if not formats or any(f not in ("diffusers", "comfyui") for f in formats):
        raise ValueError(f"train.export_formats must be a non-empty list of diffusers, comfyui; got {formats!r}")
    if cfg.log.wandb_mode not in ("", "online", "offline", "disabled"):
        raise ValueError(f"log.wandb_mode must be online, offline, disabled or empty, got {cfg.log.wandb_mode!r}")
    if not cfg.validation.seeds:
        raise ValueError("validation.seeds must not be empty")
    if cfg.model.blocks_to_swap and not cfg.model.gradient_checkpointing:
        raise ValueError("model.blocks_to_swap needs model.gradient_checkpointing: true (without it a block's saved "
                         "tensors hold its weights until backward)")
    d = cfg.distributed
    if cfg.model.blocks_to_swap and (d.engine == "deepspeed" or d.zero_stage or d.offload_optimizer
                                     or d.offload_params):
        raise ValueError("model.blocks_to_swap needs the plain torch engine (no ZeRO, no offload): DeepSpeed places "
                         "the whole backbone on the GPU")
    pr = cfg.prepare
    check_video_size(pr.frames, pr.height, pr.width, prefix="prepare.")
    choices = {"trim": ("center", "start"), "video_backend": ("auto", "pyav", "dali"),
               "layout": ("auto", "folders", "ntu"), "masks": ("auto", "png", "grounding_sam")}
    for name, allowed in choices.items():
        if getattr(pr, name) not in allowed:
            raise ValueError(f"prepare.{name} must be one of {', '.join(allowed)}, got {getattr(pr, name)!r}")
    if len(pr.mask_colours) != 2 or any(not isinstance(c, list) or len(c) != 3 for c in pr.mask_colours):
        raise ValueError(f"prepare.mask_colours must be two RGB triples, got {pr.mask_colours!r}")


def _range_note(f: dataclasses.Field, value: Any) -> str:
    """'; must be > 0' (or '; each must be ...' for a list) after an option's documentation, where it has bounds."""
    bounds = f.metadata.get("bounds")
    if not bounds:
        return ""
    return f"; {'each ' if isinstance(value, list) else ''}must be {range_text(bounds)}"


TRAIN_HEADER = ("DreamRelation training configuration. Generated from dr_train/config.py (the documentation lives",
                "there); override any option on the command line with --set section.option=value.")


def dump_commented_yaml(cfg=None, header: tuple[str, ...] = TRAIN_HEADER) -> str:
    """The config (default: the training Config) as YAML with each option's documentation as a comment above it."""
    cfg = cfg or Config()
    lines = [f"# {line}" for line in header] + [""]
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        lines.extend(f"# {line.strip()}" for line in type(section).__doc__.strip().splitlines())
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(section):
            lines.append(f"  # {f.metadata['help']}{_range_note(f, getattr(section, f.name))}")
            value = yaml.safe_dump({f.name: getattr(section, f.name)}, default_flow_style=True, width=1000).strip()
            lines.append("  " + value[1:-1])
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(dump_commented_yaml())
