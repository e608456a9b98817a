"""The training loop: one relation LoRA triplet per relation, on a backbone loaded once."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import kernels
from dr_train import checkpoint as ckpt
from dr_train.base_identity import base_identity
from dr_train.catalog import Relation, catalog_for, select_relations
from dr_train.config import Config
from dr_train.data.loader import Batch, ShardStream
from dr_train.data.shards import load_manifest
from dr_train.data.sources import check_dataset_matches_model, resolve_dataset
from dr_train.distributed import Dist, build_engine, init_distributed, shutdown, uses_deepspeed
from dr_train.experiment import WandbRun
from dr_train.export import export_lora, training_card, validation_keyframes
from dr_train.io import atomic_write_text, truncate_metrics
from dr_train.method.contrastive_loss import global_relational_contrastive_loss
from dr_train.method.flow_matching_loss import noisy_latents, swept_mask
from dr_train.method.hybrid_mask_training import EVERY_SIGMA, HybridMaskTraining, make_optimizer, subject_frame_target
from dr_train.method.memory_bank import MemoryBank, OfficialMemoryBank
from dr_train.method.triplet import (adapter_names, adapter_parameters, adapter_state_dict, add_relation_lora_triplet,
                                     load_adapter_state_dict, lora_named_parameters, resolve_placement,
                                     set_active_adapters)
from dr_train.memory_model import check_fits
from dr_train.model import MochiComponents, load_mochi
from dr_train.model.frozen_base import prepare_frozen_base
from dr_train.orchestrate import records
from dr_train.plots import plot_loss_curve, read_metrics
from dr_train.profiling import PhaseTimer
from dr_train.run_folder import RelationFolder
from dr_train.run_lock import RunLock
from dr_train.runtime import autocast_context, set_determinism
from dr_train.validation import Validator, resolve_every

log = logging.getLogger("dr_train")
LOCK_WAIT_SECONDS = 10.0        # how long a new run waits for a holder of its folder to exit (a Ray attempt dying)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops before the bad gradient reaches the weights."""


def stream_seed(seed: int, relation: str, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{relation}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RelationRun:
    """Everything that belongs to one relation's training: adapters, optimizer, HMT, bank, data, RNG streams."""

    def __init__(self, cfg: Config, comps: MochiComponents, relation: Relation, out_dir: Path, dist: Dist,
                 dataset: Path):
        self.cfg, self.comps, self.relation, self.out_dir = cfg, comps, relation, out_dir
        self.dist, self.device = dist, dist.device
        self.transformer = comps.transformer
        self.timer = PhaseTimer(enabled=False, device=self.device)
        kernels.set_backend(None if cfg.train.kernels == "auto" else cfg.train.kernels)  # auto: $DR_TRAIN_KERNELS
        seed = cfg.train.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, relation.name, "adapters"))
            add_relation_lora_triplet(self.transformer, cfg.lora)
        if comps.block_swap is None:
            self.transformer.to(self.device)
        else:                                   # the swapped blocks' weights stay in host memory
            comps.block_swap.place_trainable()
        self.adapters = adapter_names(self.transformer)
        self.params_by_adapter = adapter_parameters(self.transformer)
        self.param_names = {p: n for n, p in lora_named_parameters(self.transformer).items()}
        o = cfg.optim
        self.optimizer = make_optimizer(self.params_by_adapter, o)
        horizon = o.schedule_steps or cfg.train.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, o.warmup_steps, horizon, o.schedule, o.min_lr_ratio))
        self.engine = None                  # built on first use, after a resume has loaded the adapters
        self.hmt = HybridMaskTraining(self.adapters, cfg.hmt.probabilities, cfg.hmt.enabled,
                                      seed=stream_seed(seed, relation.name, "hmt"), forward=cfg.hmt.forward,
                                      relation_step_subjects=cfg.hmt.relation_step_subjects,
                                      subject_target=cfg.hmt.subject_target,
                                      subject_sigma_max=cfg.hmt.subject_sigma_max)
        lo, bank_seed = cfg.loss, stream_seed(seed, relation.name, "bank")
        self.bank = (OfficialMemoryBank(lo.bank_size, lo.negative_bank_frames, lo.n_pos, lo.n_neg, seed=bank_seed)
                     if lo.rcl_variant == "official" else MemoryBank(lo.bank_size, lo.n_pos, lo.n_neg, seed=bank_seed))
        self.noise_gen = torch.Generator().manual_seed(stream_seed(seed, relation.name, "noise"))
        self.stream = ShardStream(dataset, [relation.name], cfg.train.batch_size,
                                  seed=stream_seed(seed, relation.name, "data"), rank=dist.rank,
                                  world_size=dist.world_size, num_workers=cfg.data.num_workers,
                                  resampled=cfg.data.resampled, skip_corrupt=cfg.data.skip_corrupt)
        null_embed, null_mask = self.stream.null_text
        self.null_embed, self.null_mask = torch.from_numpy(null_embed), torch.from_numpy(null_mask)
        self.step = 0
        self.folder = RelationFolder(out_dir)
        self.last_checkpoint: Path | None = None
        self.restoring: Path | None = None     # the checkpoint being loaded, for the parts' messages
        self.checkpoints = ckpt.CheckpointManager(self.folder.checkpoints, keep=cfg.train.keep_checkpoints)
        self.checkpoints.register("adapters", _AdapterPart(self), tensors="adapters")
        self.checkpoints.register("optimizer", _OptimizerPart(self), tensors="optimizer", state="optimizer")
        self.checkpoints.register("scheduler", self.scheduler, state="scheduler")
        self.checkpoints.register("rng", ckpt.RngStreams(hmt=self.hmt.generator, noise=self.noise_gen, torch=None),
                                  tensors="rng")
        self.checkpoints.register("memory_bank", _BankPart(self), tensors="memory_bank",
                                  state="memory_bank")
        self.checkpoints.register("data", self.stream, state="data")

    def _engine(self):
        if self.engine is None:
            d, t = self.cfg.distributed, self.cfg.train
            self.engine = build_engine(self.transformer, self.optimizer, self.dist, d.engine, d.zero_stage,
                                       t.batch_size, t.grad_accum, self.cfg.optim.max_grad_norm,
                                       d.offload_optimizer, d.offload_params, timer=self.timer)
        return self.engine

    # ---- one step -------------------------------------------------------------------------------------------
    def _local(self, draw, shape_rest: tuple = ()) -> torch.Tensor:
        """A draw of this step's random numbers for the whole global batch, and this rank's rows of it: the same
        numbers a one-rank run with the global batch draws, whatever the rank count."""
        b = self.cfg.train.batch_size
        return draw((b * self.dist.world_size, *shape_rest), generator=self.noise_gen)[self.dist.local_rows(b)]

    def _text(self, batch: Batch):
        """The batch's prompt embeddings, each replaced by the empty prompt with probability caption_dropout."""
        embeds, mask = batch.text_embed, batch.text_mask
        drop = self._local(torch.rand) < self.cfg.data.caption_dropout
        embeds = torch.where(drop[:, None, None], self.null_embed[None], embeds)
        mask = torch.where(drop[:, None], self.null_mask[None], mask)
        return embeds.to(self.device), mask.to(self.device)

    def micro_step(self, batch: Batch, selection: str, band: tuple[float, float] = EVERY_SIGMA) -> dict:
        cfg, dev, phase, engine = self.cfg, self.device, self.timer.phase, self._engine()
        with phase("data"):
            mean = batch.latents_mean
            std = torch.exp(0.5 * batch.latents_logvar)
            z0 = (mean + std * self._local(torch.randn, mean.shape[1:])).to(dev)
            noise = self._local(torch.randn, mean.shape[1:]).to(dev)
            low, high = band
            sigma = (low + (high - low) * self._local(torch.rand)).to(dev)
            text, text_mask = self._text(batch)
            mask1, mask2 = batch.subject_masks(pooled=cfg.loss.mode == "official")   # the official code's resize
            mask = self.hmt.loss_mask(selection, mask1.to(dev), mask2.to(dev), cfg.loss.mode)
            one_frame = self.hmt.frame_step(selection)
            if one_frame:
                frames = z0.shape[2]
                frame = (self._local(torch.rand) * frames).long().clamp_max(frames - 1)
                z0, mask = subject_frame_target(z0, mask, frame, repeat=self.hmt.subject_target == "still")
                noise = noise[:, :, :z0.shape[2]]
            if cfg.loss.mask_span == "clip":
                mask = swept_mask(mask)
            z_sigma, target, timestep = noisy_latents(z0, noise, sigma)
        dtype = self.transformer.dtype
        with phase("forward"), autocast_context(dev, cfg.train.mixed_precision):
            pred = engine.forward(hidden_states=z_sigma.to(dtype), encoder_hidden_states=text.to(dtype),
                                  timestep=timestep, encoder_attention_mask=text_mask, return_dict=False)[0]
        with phase("loss"):
            loss_rec = kernels.masked_flow_matching_loss(pred, target, mask, cfg.loss.mask_weight, cfg.loss.mode)
            loss_rcl, skipped, pushed = None, None, None
            if cfg.loss.rcl_weight > 0 and not one_frame:
                frame_means, dynamics = kernels.relation_features(pred)
                loss_rcl, skipped, pushed = global_relational_contrastive_loss(
                    self.dist, self.bank, cfg.loss, batch.video_ids, frame_means, dynamics)
            loss = loss_rec if loss_rcl is None else loss_rec + cfg.loss.rcl_weight * loss_rcl
            values = {"loss": self.dist.mean(loss.item()), "loss_rec": self.dist.mean(loss_rec.item()),
                      "loss_rcl": None if loss_rcl is None else self.dist.mean(loss_rcl.item())}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"relation {self.relation.name}, step {self.step + 1}: loss is {values['loss']} (rec "
                    f"{values['loss_rec']}, rcl {values['loss_rcl']}) on videos {batch.video_ids}; weights "
                    f"were not updated. Last checkpoint: {self.last_checkpoint}")
        with phase("backward"):
            engine.backward(loss)
        if pushed is not None:
            self.bank.push(*pushed)
        return {**values, "rcl_skipped": skipped, "sigma": self.dist.mean(sigma.mean().item()),
                "videos": self.dist.gather_flat(batch.video_ids)}

    def next_batch(self) -> Batch:
        with self.timer.phase("data"):
            return self.stream.next_batch()

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        engine = self._engine()
        selection = self.hmt.draw()
        band = self.hmt.noise_band(selection)
        if self.dist.world_size > 1:
            self.dist.check_same((selection, band), f"the HMT selection and noise band of step {self.step + 1}")
        set_active_adapters(self.transformer, self.hmt.adapters_to_run(selection, band))
        updated = self.hmt.apply(self.params_by_adapter, selection, band)
        self.optimizer.set_active(self.adapters if self.cfg.optim.frozen_adapters == "zero_grad" else updated)
        parts = []
        for _ in range(self.cfg.train.grad_accum):
            parts.append(self.micro_step(self.next_batch(), selection, band))
            with self.timer.phase("optimizer"):
                stepped = engine.step()
        assert stepped, "the last micro-batch of a step must end the gradient accumulation"
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        accum = len(parts)
        rcl = [p["loss_rcl"] for p in parts if p["loss_rcl"] is not None]
        skipped = next((p["rcl_skipped"] for p in parts if p["rcl_skipped"]), None)
        return {
            "step": self.step, "selection": selection, "adapters_updated": updated,
            "loss": sum(p["loss"] for p in parts) / accum, "loss_rec": sum(p["loss_rec"] for p in parts) / accum,
            "loss_rcl": sum(rcl) / len(rcl) if rcl else None, "rcl_skipped": skipped, "lr": lr,
            "grad_norm": engine.grad_norm, "sigma": sum(p["sigma"] for p in parts) / accum,
            "videos": [v for p in parts for v in p["videos"]], "seconds": time.perf_counter() - t0,
            **({"corrupt_samples": sum(self.dist.all_gather_objects(self.stream.corrupt_samples))}
               if self.cfg.data.skip_corrupt else {}),
        }

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"relation": self.relation.name, "model": self.cfg.model.preset, "base": self.comps.identity,
                "lora": {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                         "placement": resolve_placement(self.cfg.lora.placement)}}

    def _all_trainable(self) -> list[torch.nn.Parameter]:
        params = [p for ps in self.params_by_adapter.values() for p in ps]
        for p in params:
            p.requires_grad_(True)          # HMT's freezing is re-applied at the next step
        return params

    def save(self) -> Path:
        """Every rank takes part (ZeRO gathers, the bank's cross-rank check); rank 0 writes."""
        self._engine()
        path = self.checkpoints.save(self.step, {"identity": self._identity(), "config": self.cfg.to_dict(),
                                                 "world_size": self.dist.world_size}, write=self.dist.is_main)
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def resume(self, path: Path) -> None:
        """Load a checkpoint written by any number of ranks and any ZeRO stage (before the engine exists)."""
        assert self.engine is None or self.cfg.distributed.zero_stage == 0, "resume before the first step"
        tensors, state = self.checkpoints.read(path)
        if "identity" not in state:
            raise ValueError(f"checkpoint file {path / 'state.json'} has no 'identity' entry")
        identity = self._identity()
        if "base" not in state["identity"]:         # written before checkpoints recorded their base
            log.warning("checkpoint %s does not record its base model: it is assumed to be %s", path, identity["base"])
            identity.pop("base")
        if state["identity"] != identity:
            raise ValueError(f"checkpoint {path / 'state.json'} was written for {state.get('identity')}, which does "
                             f"not match this run ({identity})")
        self.restoring = path
        self.checkpoints.restore(tensors, state, path)
        self.step = state["step"]
        self.last_checkpoint = path
        if self.dist.is_main:           # metrics and checkpoints after this one belong to steps that will be redone
            truncate_metrics(self.folder.metrics, self.step)
            for moved in ckpt.set_aside_after(self.folder.checkpoints, self.step):
                log.info("%s: resuming from step %d: moved the later checkpoint %s aside to %s", self.relation.name,
                         self.step, moved.name.split(".")[0], moved)
        self.dist.barrier()

    def close(self) -> None:
        self.stream.close()
        if self.engine is not None:
            self.engine.close()
        self.transformer.delete_adapters(self.adapters)


class _AdapterPart:
    """Every adapter's full weights (gathered under ZeRO-3)."""

    def __init__(self, run: RelationRun):
        self.run = run

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.run._engine().gathered(self.run._all_trainable()):
            return adapter_state_dict(self.run.transformer)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        load_adapter_state_dict(self.run.transformer, tensors, str(self.run.restoring / "adapters.safetensors"))


class _OptimizerPart:
    """Full (unsharded) AdamW state per LoRA parameter, keyed '<param name>/<exp_avg|exp_avg_sq|step>', and the
    parameter groups' hyper-parameters."""

    def __init__(self, run: RelationRun):
        self.run = run

    def state_dict(self) -> tuple[dict, dict]:
        run = self.run
        engine = run._engine()
        engine.link_states()
        tensors = {}
        for index, params in enumerate(run.params_by_adapter.values()):
            step = engine.group_step(index)
            for p in params:
                name = run.param_names[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    value = engine.full_state(p, key) if step is not None else None
                    if value is not None:
                        tensors[f"{name}/{key}"] = value.detach().float().cpu().contiguous()
                if step is not None:
                    tensors[f"{name}/step"] = torch.tensor(step)
        groups = [{k: v for k, v in g.items() if k not in ("params", "active")} for g in run.optimizer.param_groups]
        return tensors, {"param_groups": groups}

    def load_state_dict(self, state: tuple[dict, dict]) -> None:
        run, (tensors, meta) = self.run, state
        source = str(run.restoring / "optimizer.safetensors")
        engine = run._engine()
        names = {n: p for p, n in run.param_names.items()}
        unknown = sorted({k.rpartition("/")[0] for k in tensors} - set(names))
        if unknown:
            raise ValueError(f"{source}: optimizer state for unknown parameters {unknown[:3]}")
        saved_groups = meta["param_groups"]
        if [g.get("adapter") for g in saved_groups] != list(run.params_by_adapter):
            raise ValueError(f"{source}: optimizer groups {[g.get('adapter') for g in saved_groups]} do not match "
                             f"the adapters {list(run.params_by_adapter)}")
        for group, saved in zip(run.optimizer.param_groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        for index, params in enumerate(run.params_by_adapter.values()):
            steps = [tensors.get(f"{run.param_names[p]}/step") for p in params]
            if steps[0] is not None:
                engine.load_group_step(index, float(steps[0]))
        engine.link_states()
        for p in run._all_trainable():
            for key in ("exp_avg", "exp_avg_sq"):
                value = tensors.get(f"{run.param_names[p]}/{key}")
                if value is not None:
                    engine.load_full_state(p, key, value)


class _BankPart:
    """The memory bank, with a digest every rank must agree on (the bank is replicated, never sharded)."""

    def __init__(self, run: RelationRun):
        self.run = run

    def state_dict(self) -> tuple[dict, dict]:
        tensors, meta = self.run.bank.state_dict()
        digest = _digest(tensors, meta["video_ids"])
        self.run.dist.check_same(digest, f"the memory bank at step {self.run.step}")
        return tensors, meta | {"sha256": digest}

    def load_state_dict(self, state: tuple[dict, dict]) -> None:
        self.run.bank.load_state_dict(*state)


def _final_losses(metrics_path: Path, last: int = 20) -> dict:
    """Mean of each loss over the relation's last `last` logged steps (what the end-of-run table shows)."""
    rows = read_metrics(metrics_path)[-last:]
    out = {}
    for key in ("loss", "loss_rec", "loss_rcl"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _digest(tensors: dict[str, torch.Tensor], ids: list[str]) -> str:
    h = hashlib.sha256("\n".join(ids).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _prepare_output(run: RelationRun, resume: bool, resume_from: str = "") -> None:
    """Resume (from `resume_from`, a step-N of this relation, or else from the latest checkpoint) or start fresh in
    an empty folder; a run folder that holds a run is refused without `resume`."""
    existing = ckpt.list_checkpoints(run.folder.checkpoints)
    had_metrics = run.folder.metrics.exists()
    run.dist.barrier()                  # every rank has looked before any rank changes the folder
    if resume_from:
        start = ckpt.find_checkpoint(run.folder.checkpoints, resume_from)
        _resume_or_name_fallback(run, start, existing)
        run.dist.info0("%s: resumed from %s (step %d, as --resume-from asked)", run.relation.name, start, run.step)
        return
    if resume and existing:
        _resume_or_name_fallback(run, existing[-1], existing)
        run.dist.info0("%s: resumed from %s (step %d)", run.relation.name, existing[-1], run.step)
        return
    if existing or (had_metrics and not resume):
        raise ValueError(f"{run.out_dir} already holds a run of {run.relation.name}; pass --resume to continue "
                         f"it or choose another --output-dir")
    if had_metrics and run.dist.is_main:
        log.info("%s: no checkpoint to resume from; restarting from step 0", run.relation.name)
        run.folder.metrics.unlink()           # main rank only: one rank removes, all ranks looked before
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.dist.barrier()


def _resume_or_name_fallback(run: RelationRun, path: Path, existing: list[Path]) -> None:
    """Resume from checkpoint `path`, one of `existing`; when it does not verify, the refusal names the newest
    older checkpoint that does, for --resume-from."""
    try:
        run.resume(path)
    except ValueError as e:
        if ckpt.newest_verified([path]) is not None:
            raise                           # intact, but not for this run (identity, a part's state): no fallback
        older = ckpt.newest_verified([p for p in existing if ckpt.checkpoint_step(p) < ckpt.checkpoint_step(path)])
        if older is None:
            hint = (f"no older checkpoint verifies; to start over, remove {run.folder.checkpoints} or choose another "
                    f"--output-dir")
        else:
            step = ckpt.checkpoint_step(older)
            hint = (f"the older checkpoint {older} verifies: resume from it with --resume-from step-{step} "
                    f"(train.resume_from=step-{step})")
        raise ValueError(f"{e}; {hint}") from None


VALIDATION_SCALARS = ("validation_relation_accuracy", "validation_subject_fidelity", "validation_seconds")


class _MainOnly:
    """The per-relation outputs people read (metrics.jsonl, TensorBoard, progress bar): rank 0 writes them."""

    def __init__(self, run: RelationRun, cfg: Config, position: tuple[int, int] = (1, 1), overall=None):
        self.run, self.cfg, self.main, self.overall = run, cfg, run.dist.is_main, overall
        self.writer = _tensorboard(run.folder.tensorboard) if self.main else None
        self.wandb = None
        if self.main and cfg.log.wandb:
            self.wandb = WandbRun(cfg, run.relation.name, run.out_dir)
        self.metrics = run.folder.metrics.open("a") if self.main else None
        i, n = position
        self.bar = tqdm(total=cfg.train.max_steps, initial=run.step, unit="step", dynamic_ncols=True, leave=n == 1,
                        desc=run.relation.name if n == 1 else f"[{i}/{n}] {run.relation.name}",
                        position=1 if n > 1 else None, disable=not self.main)
        self.rcl_skipped, self.rcl_reason, self.steps = 0, None, 0

    def record(self, record: dict) -> None:
        self.steps += 1
        if record["rcl_skipped"]:
            self.rcl_skipped += 1
            self.rcl_reason = self.rcl_reason or record["rcl_skipped"]
        if not self.main:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None and record["step"] % self.cfg.train.log_every == 0:
            for key in ("loss", "loss_rec", "loss_rcl", "lr", "grad_norm"):
                if record[key] is not None:
                    self.writer.add_scalar(f"{self.run.relation.name}/{key}", record[key], record["step"])
        if self.writer is not None:
            for key in VALIDATION_SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(f"{self.run.relation.name}/{key}", record[key], record["step"])
        if self.wandb is not None:
            self.wandb.scalars({k: record.get(k) for k in ("loss", "loss_rec", "loss_rcl", "lr", "grad_norm",
                                                            *VALIDATION_SCALARS)}, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", sel=record["selection"])
        self.bar.update(1)
        if self.overall is not None:
            self.overall.update(1)

    def videos(self, items: list[dict], step: int) -> None:
        """A validation round's keyframes (TensorBoard images) and videos (W&B)."""
        if not self.main:
            return
        name = self.run.relation.name
        if self.writer is not None:
            for item in items:
                image = np.asarray(Image.open(item["keyframes"]).convert("RGB"))
                self.writer.add_image(f"{name}/validation/{item['index']:02d}_s{item['seed']}", image, step,
                                      dataformats="HWC")
        if self.wandb is not None:
            self.wandb.validation(name, items, step)

    def summary(self) -> None:
        """What a person wants once per relation, not once per step."""
        if self.main and self.rcl_skipped:
            log.info("%s: relational contrastive loss skipped in %d of %d steps (%s)", self.run.relation.name,
                     self.rcl_skipped, self.steps, self.rcl_reason)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def train_relation(cfg: Config, comps: MochiComponents, relation: Relation, dist: Dist, dataset: Path,
                   validator=None, position: tuple[int, int] = (1, 1), overall=None, reopen: bool = False) -> dict:
    """Train one relation (resuming per train.resume and train.resume_from), validate every validation.every steps,
    export; `position` (i, n) is its place in the launch and `overall` the launch's progress bar (steps of every
    relation). The relation folder is locked for the run (another trainer on it is refused); `reopen`: the
    relation finished before and is trained further, so its DONE.json goes first."""
    folder = RelationFolder.of(cfg.train.output_dir, relation.name)
    with _folder_lock(folder, dist):
        run = RelationRun(cfg, comps, relation, folder.path, dist, dataset)
        try:
            return _train_relation(run, folder, validator, position, overall, reopen)
        finally:
            run.close()


def _train_relation(run: RelationRun, folder: RelationFolder, validator, position: tuple[int, int], overall,
                    reopen: bool) -> dict:
    cfg, dist, relation = run.cfg, run.dist, run.relation
    resume_from = cfg.train.resume_from
    _prepare_output(run, cfg.train.resume or bool(resume_from), resume_from)
    if reopen:
        _reopen(folder, relation, cfg, dist)
    if dist.is_main:
        atomic_write_text(folder.config, json.dumps(cfg.to_dict(), indent=1))
    started = time.perf_counter()
    last, validation_seconds = _train_loop(run, validator, position, overall)
    wall = time.perf_counter() - started
    if validation_seconds:
        dist.info0("%s: validation took %.1f s, %.1f %% of the relation's training time", relation.name,
                   validation_seconds, 100.0 * validation_seconds / max(wall, 1e-9))
    result = {"relation": relation.name, "steps": run.step, "status": "finished", "base": run.comps.identity,
              "wall_seconds": wall,
              "checkpoint": str(run.last_checkpoint), "world_size": dist.world_size,
              "final": _final_losses(run.folder.metrics) if dist.is_main else {}, **last}
    result |= _export(run)
    if dist.is_main:
        plot_loss_curve(run.folder.metrics, folder.loss_curve, title=relation.name)
        atomic_write_text(folder.done, json.dumps(result, indent=1))
    dist.barrier()
    return result


def _memory_check(cfg: Config, dataset: Path, dist: Dist) -> None:
    """Print the predicted peak memory per rank; on a GPU, refuse a run predicted not to fit (dr_train.memory_model)."""
    video = load_manifest(dataset)["video"]
    if not all(k in video for k in ("frames", "height", "width")):
        return
    device_bytes = (torch.cuda.get_device_properties(dist.device).total_memory if dist.device.type == "cuda"
                    else None)
    prediction = check_fits(cfg, int(video["frames"]), int(video["height"]), int(video["width"]), dist.world_size,
                            device_bytes)
    dist.info0("%s", prediction.lines()[0])


@contextmanager
def _folder_lock(folder: RelationFolder, dist: Dist) -> Iterator[None]:
    """The relation folder, locked by the main rank for the run (one lock per run, not per rank); every rank
    raises the main rank's refusal."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(folder.lock, f"relation folder {folder.path}", wait_seconds=LOCK_WAIT_SECONDS)
        except ValueError as e:
            refusal = str(e)
        except OSError as e:
            refusal = f"cannot lock the relation folder {folder.path}: {e}"
    refusal = dist.all_gather_objects(refusal)[0]
    if refusal:
        raise ValueError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _reopen(folder: RelationFolder, relation: Relation, cfg: Config, dist: Dist) -> None:
    """A finished relation trained further: unfinished again (no DONE.json) until its new steps are done."""
    if dist.is_main and folder.done.is_file():
        steps = json.loads(folder.done.read_text())["steps"]
        resume_from = cfg.train.resume_from
        if resume_from:
            log.info("%s: reopening the finished run (%s steps) from %s", relation.name, steps, resume_from)
        else:
            log.info("%s: extending from step %s to %d", relation.name, steps, cfg.train.max_steps)
        folder.done.unlink()
    dist.barrier()


def _train_loop(run: RelationRun, validator, position: tuple[int, int], overall) -> tuple[dict, float]:
    """Steps until train.max_steps, validating and checkpointing on schedule; returns the last validation
    scalars and the seconds validation took."""
    cfg = run.cfg
    every = resolve_every(cfg) if validator is not None else 0
    outputs = _MainOnly(run, cfg, position, overall)
    if overall is not None:
        overall.set_description(f"relation {position[0]}/{position[1]}")
    validation_seconds, last = 0.0, {}
    try:
        while run.step < cfg.train.max_steps:
            record = run.train_step()
            if every and (run.step % every == 0 or run.step == cfg.train.max_steps):
                scalars, videos = validator.run(run, run.step)
                record |= scalars
                outputs.videos(videos, run.step)
                validation_seconds += record["validation_seconds"]
                last = {k: record[k] for k in VALIDATION_SCALARS if record.get(k) is not None}
            outputs.record(record)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == cfg.train.max_steps:
                run.save()
    finally:
        outputs.close()
        outputs.summary()
    return last, validation_seconds


def _export(run: RelationRun) -> dict:
    """Write the inference LoRA (every rank joins the ZeRO gather, the main rank writes); its paths for DONE.json."""
    cfg, dist, relation = run.cfg, run.dist, run.relation
    # a placement without some of the export adapters (w/o relation, w/o FFN) exports the ones it has
    exported = [a for a in cfg.lora.export_adapters if a in run.adapters]
    if cfg.train.export and not exported:
        dist.warning0("%s: none of lora.export_adapters %s is in this placement: nothing exported",
                      relation.name, cfg.lora.export_adapters)
    out = {}
    with run._engine().gathered(run._all_trainable()):
        if dist.is_main and cfg.train.export and exported:
            paths = export_lora(
                run.transformer, run.folder.lora, exported, formats=cfg.train.export_formats,
                metadata={"relation": relation.name, "prompt": relation.prompt, "base_model": run.comps.source,
                          "steps": run.step, **run._identity()["lora"]},
                card=training_card(cfg.to_dict(), validation_keyframes(run.folder.path, run.step)))
            out["lora"] = str(paths.get("diffusers", paths.get("comfyui")))
            out["lora_files"] = {k: str(v) for k, v in paths.items()}
    return out


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard is optional
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(folder))


def _plan(cfg: Config, relations: list[Relation], base: str) -> dict[str, str]:
    """Per relation: 'train' (new or unfinished), 'extend' (finished, and --resume asks for more steps than it
    had, or --resume-from names one of its checkpoints), 'skip' (finished with enough steps, or with fewer but no
    --resume). A relation finished on another base than `base` is a ValueError: its LoRA is not reused."""
    plan = {}
    for relation in relations:
        records.check_finished_base(Path(cfg.train.output_dir) / relation.name, cfg.model.preset, base)
        steps = records.finished_steps(Path(cfg.train.output_dir) / relation.name)
        if steps is None:
            plan[relation.name] = "train"
        elif (steps < cfg.train.max_steps and cfg.train.resume) or cfg.train.resume_from:
            plan[relation.name] = "extend"
        else:
            plan[relation.name] = "skip"
    return plan


def _check_resume_from(cfg: Config, relations: list[Relation]) -> None:
    if cfg.train.resume_from and len(relations) != 1:
        raise ValueError(f"train.resume_from (--resume-from) names a checkpoint of one relation, but "
                         f"{len(relations)} relations are selected: select one with --relations")


def train(cfg: Config) -> list[dict]:
    """Train every selected relation one after another on one loaded backbone, on every rank of this launch.
    A finished relation (DONE.json) is skipped unless --resume asks it for more steps than it had: then it continues
    from its last checkpoint. A re-run after a crash continues where it stopped (--resume), or from the checkpoint
    --resume-from names (train.resume_from, one relation; later checkpoints are moved to checkpoints/superseded/).
    Each relation folder is locked while it trains: a second trainer on it is refused, naming the holder."""
    catalog = catalog_for(cfg)
    relations = select_relations(cfg.train.relations, catalog)
    _check_resume_from(cfg, relations)
    d = cfg.distributed
    dist = init_distributed(d.backend, uses_deepspeed(d.engine, d.zero_stage, d.offload_optimizer, d.offload_params),
                            d.timeout_minutes)
    try:
        set_determinism(cfg.train.seed, cfg.train.deterministic)
        plan = _plan(cfg, relations, base_identity(cfg.model.preset))
        dist.barrier()                             # every rank has read the DONE files before any is removed
        pending = [r for r in relations if plan[r.name] != "skip"]
        # one rank generates/extends the dataset, the others then find it
        dataset = dist.main_first(lambda: resolve_dataset(cfg, pending)) if pending else None
        validate = bool(pending) and resolve_every(cfg) > 0
        if dataset is not None:
            _memory_check(cfg, dataset, dist)
        comps = load_mochi(cfg.model.preset, cfg.model.dtype, cfg.model.attention_backend,
                           cfg.model.gradient_checkpointing, cfg.model.max_text_tokens,
                           parts=("transformer", "vae", "text_encoder") if validate else ("transformer",))
        comps.block_swap = prepare_frozen_base(comps.transformer, cfg.model, cfg.lora, dist.device)
        validator = None
        if dataset is not None:
            check_dataset_matches_model(dataset, comps.transformer, cfg.model.preset)
            if validate:
                video = load_manifest(dataset)["video"]
                validator = Validator(cfg, comps, (video["frames"], video["height"], video["width"]), dist)
        results = []
        position = 0
        overall = None
        if dist.is_main and len(pending) > 1:
            remaining = sum(cfg.train.max_steps - min(records.latest_checkpoint_step(
                Path(cfg.train.output_dir) / r.name), cfg.train.max_steps) for r in pending)
            overall = tqdm(total=remaining, desc=f"relation 1/{len(pending)}", unit="step", position=0,
                           dynamic_ncols=True)
        for relation in relations:
            done = RelationFolder.of(cfg.train.output_dir, relation.name).done
            if plan[relation.name] == "skip":
                steps = json.loads(done.read_text())["steps"]
                more = steps < cfg.train.max_steps
                if more:
                    dist.warning0("%s: finished at %d steps, fewer than train.max_steps %d: pass --resume to "
                                  "extend it from its last checkpoint", relation.name, steps, cfg.train.max_steps)
                else:
                    dist.info0("%s: already finished (%d steps, %s), skipping", relation.name, steps, done)
                status = f"skipped (finished at {steps} steps{'; --resume extends it' if more else ''})"
                results.append(json.loads(done.read_text()) | {"status": status})
                continue
            position += 1
            results.append(train_relation(cfg, comps, relation, dist, dataset, validator,
                                          (position, len(pending)), overall, reopen=plan[relation.name] == "extend"))
        if overall is not None:
            overall.close()
        if len(relations) > 1:
            dist.info0("trained %d relation(s):\n%s", len(pending), summary_table(results))
        return results
    finally:
        shutdown(dist)


def summary_table(results: list[dict]) -> str:
    """One line per relation: steps, wall time, final losses, validation score where there is one, LoRA path."""
    head = ["relation", "status", "steps", "wall", "loss", "loss_rec", "loss_rcl", "val. rel. acc.", "lora"]
    rows = []
    for r in results:
        final = r.get("final") or {}
        fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
        wall = r.get("wall_seconds")
        rows.append([r["relation"], r["status"].split(" (")[0], str(r.get("steps", "—")),
                     "—" if wall is None else f"{wall:.0f} s", fmt(final.get("loss")), fmt(final.get("loss_rec")),
                     fmt(final.get("loss_rcl")), fmt(r.get("validation_relation_accuracy")), r.get("lora", "—")])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*head)] + [line.format(*row) for row in rows])
