"""The training loop: one relation LoRA triplet per relation, on a backbone loaded once."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dr_train import checkpoint as ckpt
from dr_train.catalog import Relation, load_catalog, select_relations
from dr_train.config import Config
from dr_train.data.loader import ShardStream
from dr_train.data.sources import check_dataset_matches_model, resolve_dataset
from dr_train.hmt import HybridMaskTraining
from dr_train.lora import (adapter_names, adapter_parameters, adapter_state_dict, add_relation_lora_triplet,
                           export_inference_lora, load_adapter_state_dict, lora_named_parameters,
                           resolve_placement)
import kernels
from dr_train.losses import noisy_latents, relational_contrastive_loss
from dr_train.memory_bank import MemoryBank
from dr_train.model import MochiComponents, load_mochi
from dr_train.plots import plot_loss_curve
from dr_train.profiling import PhaseTimer
from dr_train.runtime import autocast_context, pick_device, set_determinism

log = logging.getLogger("dr_train")


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

    def __init__(self, cfg: Config, comps: MochiComponents, relation: Relation, out_dir: Path,
                 device: torch.device, dataset: Path):
        self.cfg, self.comps, self.relation, self.out_dir, self.device = cfg, comps, relation, out_dir, device
        self.transformer = comps.transformer
        self.timer = PhaseTimer(enabled=False, device=device)
        kernels.set_backend(None if cfg.train.kernels == "auto" else cfg.train.kernels)  # auto: $DR_TRAIN_KERNELS
        seed = cfg.train.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, relation.name, "adapters"))
            add_relation_lora_triplet(self.transformer, cfg.lora)
        self.transformer.to(device)
        self.adapters = adapter_names(self.transformer)
        self.params_by_adapter = adapter_parameters(self.transformer)
        named = lora_named_parameters(self.transformer)
        self.param_names = dict(enumerate(named))
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(named.values()), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, o.warmup_steps, cfg.train.max_steps, o.schedule,
                                                    o.min_lr_ratio))
        self.hmt = HybridMaskTraining(self.adapters, cfg.hmt.probabilities, cfg.hmt.enabled,
                                      seed=stream_seed(seed, relation.name, "hmt"))
        self.bank = MemoryBank(cfg.loss.bank_size, cfg.loss.n_pos, cfg.loss.n_neg,
                               seed=stream_seed(seed, relation.name, "bank"))
        self.noise_gen = torch.Generator().manual_seed(stream_seed(seed, relation.name, "noise"))
        self.stream = ShardStream(dataset, [relation.name], cfg.train.batch_size,
                                  seed=stream_seed(seed, relation.name, "data"), num_workers=cfg.data.num_workers,
                                  resampled=cfg.data.resampled)
        null_embed, null_mask = self.stream.null_text
        self.null_embed, self.null_mask = torch.from_numpy(null_embed), torch.from_numpy(null_mask)
        self.step = 0
        self.checkpoint_dir = out_dir / "checkpoints"
        self.metrics_path = out_dir / "metrics.jsonl"
        self.last_checkpoint: Path | None = None

    # ---- one step -------------------------------------------------------------------------------------------
    def _text(self, batch: dict):
        """The batch's prompt embeddings, each replaced by the empty prompt with probability caption_dropout."""
        embeds, mask = batch["text_embed"], batch["text_mask"]
        drop = torch.rand(embeds.shape[0], generator=self.noise_gen) < self.cfg.data.caption_dropout
        embeds = torch.where(drop[:, None, None], self.null_embed[None], embeds)
        mask = torch.where(drop[:, None], self.null_mask[None], mask)
        return embeds.to(self.device), mask.to(self.device)

    def micro_step(self, batch: dict, selection: str, scale: float) -> dict:
        cfg, dev, phase = self.cfg, self.device, self.timer.phase
        with phase("data"):
            mean = batch["latents_mean"]
            std = torch.exp(0.5 * batch["latents_logvar"])
            z0 = (mean + std * torch.randn(mean.shape, generator=self.noise_gen)).to(dev)
            noise = torch.randn(mean.shape, generator=self.noise_gen).to(dev)
            sigma = torch.rand(mean.shape[0], generator=self.noise_gen).to(dev)
            text, text_mask = self._text(batch)
            z_sigma, target, timestep = noisy_latents(z0, noise, sigma)
            mask = self.hmt.loss_mask(selection, batch["mask_subject1"].to(dev), batch["mask_subject2"].to(dev),
                                      cfg.loss.mode)
        dtype = self.transformer.dtype
        with phase("forward"), autocast_context(dev, cfg.train.mixed_precision):
            pred = self.transformer(hidden_states=z_sigma.to(dtype), encoder_hidden_states=text.to(dtype),
                                    timestep=timestep, encoder_attention_mask=text_mask, return_dict=False)[0]
        with phase("loss"):
            loss_rec = kernels.masked_flow_matching_loss(pred, target, mask, cfg.loss.mask_weight, cfg.loss.mode)
            loss_rcl, skipped = None, None
            if cfg.loss.rcl_weight > 0:
                frame_means, dynamics = kernels.relation_features(pred)
                positives, negatives, skipped = self.bank.sample(batch["video_ids"], dynamics, frame_means)
                if positives is not None:
                    loss_rcl = relational_contrastive_loss(dynamics, positives, negatives, cfg.loss.temperature)
            loss = loss_rec if loss_rcl is None else loss_rec + cfg.loss.rcl_weight * loss_rcl
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"relation {self.relation.name}, step {self.step + 1}: loss is {loss.item()} (rec "
                    f"{loss_rec.item()}, rcl {None if loss_rcl is None else loss_rcl.item()}) on videos "
                    f"{batch['video_ids']}; weights were not updated. Last checkpoint: {self.last_checkpoint}")
        with phase("backward"):
            (loss * scale).backward()
        if cfg.loss.rcl_weight > 0:
            self.bank.push(batch["video_ids"], dynamics, frame_means)
        return {"loss": loss.item(), "loss_rec": loss_rec.item(),
                "loss_rcl": None if loss_rcl is None else loss_rcl.item(), "rcl_skipped": skipped,
                "sigma": sigma.mean().item(), "videos": batch["video_ids"]}

    def next_batch(self) -> dict:
        with self.timer.phase("data"):
            return self.stream.next_batch()

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        selection = self.hmt.draw()
        updated = self.hmt.apply(self.params_by_adapter, selection)
        accum = self.cfg.train.grad_accum
        parts = [self.micro_step(self.next_batch(), selection, 1.0 / accum) for _ in range(accum)]
        params = [p for a in updated for p in self.params_by_adapter[a]]
        grad_norm = None
        with self.timer.phase("optimizer"):
            if self.cfg.optim.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rcl = [p["loss_rcl"] for p in parts if p["loss_rcl"] is not None]
        skipped = next((p["rcl_skipped"] for p in parts if p["rcl_skipped"]), None)
        if skipped:
            log.info("%s step %d: relational contrastive loss skipped: %s", self.relation.name, self.step, skipped)
        return {
            "step": self.step, "selection": selection, "adapters_updated": updated,
            "loss": sum(p["loss"] for p in parts) / accum, "loss_rec": sum(p["loss_rec"] for p in parts) / accum,
            "loss_rcl": sum(rcl) / len(rcl) if rcl else None, "rcl_skipped": skipped, "lr": lr,
            "grad_norm": grad_norm, "sigma": sum(p["sigma"] for p in parts) / accum,
            "videos": [v for p in parts for v in p["videos"]], "seconds": time.perf_counter() - t0,
        }

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"relation": self.relation.name, "model": self.cfg.model.preset,
                "lora": {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                         "placement": resolve_placement(self.cfg.lora.placement)}}

    def save(self) -> Path:
        opt_tensors, opt_meta = ckpt.optimizer_tensors(self.optimizer, self.param_names)
        bank_tensors, bank_meta = self.bank.state_dict()
        tensors = {
            "adapters": adapter_state_dict(self.transformer),
            "optimizer": opt_tensors,
            "rng": {"hmt": self.hmt.state_dict()["generator"], "noise": self.noise_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "memory_bank": bank_tensors,
        }
        state = {"step": self.step, "identity": self._identity(), "optimizer": opt_meta,
                 "scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
                 "memory_bank": bank_meta, "config": self.cfg.to_dict()}
        self.last_checkpoint = ckpt.save_checkpoint(self.checkpoint_dir, self.step, tensors, state,
                                                    keep=self.cfg.train.keep_checkpoints)
        return self.last_checkpoint

    def resume(self, path: Path) -> None:
        tensors, state = ckpt.load_checkpoint(path)
        if state.get("identity") != self._identity():
            raise ValueError(f"checkpoint {path / 'state.json'} was written for {state.get('identity')}, which does "
                             f"not match this run ({self._identity()})")
        load_adapter_state_dict(self.transformer, tensors["adapters"], str(path / "adapters.safetensors"))
        ckpt.load_optimizer_tensors(self.optimizer, self.param_names, tensors["optimizer"], state["optimizer"],
                                    str(path / "optimizer.safetensors"))
        self.scheduler.load_state_dict(state["scheduler"])
        self.hmt.load_state_dict({"generator": tensors["rng"]["hmt"]})
        self.noise_gen.set_state(tensors["rng"]["noise"])
        torch.set_rng_state(tensors["rng"]["torch"])
        self.bank.load_state_dict(tensors["memory_bank"], state["memory_bank"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.last_checkpoint = path
        # metrics after the checkpoint belong to steps that will be redone
        if self.metrics_path.is_file():
            kept = [l for l in self.metrics_path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= self.step]
            self.metrics_path.write_text("".join(l + "\n" for l in kept))

    def close(self) -> None:
        self.stream.close()
        self.transformer.delete_adapters(self.adapters)


def _prepare_output(run: RelationRun, resume: bool) -> None:
    existing = ckpt.list_checkpoints(run.checkpoint_dir)
    if resume and existing:
        run.resume(existing[-1])
        log.info("%s: resumed from %s (step %d)", run.relation.name, existing[-1], run.step)
        return
    if resume and run.metrics_path.exists():
        log.info("%s: no checkpoint to resume from; restarting from step 0", run.relation.name)
        run.metrics_path.unlink()
    if existing or run.metrics_path.exists():
        raise ValueError(f"{run.out_dir} already holds a run of {run.relation.name}; pass --resume to continue "
                         f"it or choose another --output-dir")
    run.out_dir.mkdir(parents=True, exist_ok=True)


def train_relation(cfg: Config, comps: MochiComponents, relation: Relation, device: torch.device,
                   dataset: Path) -> dict:
    out_dir = Path(cfg.train.output_dir) / relation.name
    run = RelationRun(cfg, comps, relation, out_dir, device, dataset)
    try:
        _prepare_output(run, cfg.train.resume)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        writer = _tensorboard(out_dir)
        started = time.perf_counter()
        with tqdm(total=cfg.train.max_steps, initial=run.step, desc=relation.name, unit="step",
                  dynamic_ncols=True) as bar, run.metrics_path.open("a") as metrics:
            while run.step < cfg.train.max_steps:
                record = run.train_step()
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if writer is not None and record["step"] % cfg.train.log_every == 0:
                    for key in ("loss", "loss_rec", "loss_rcl", "lr", "grad_norm"):
                        if record[key] is not None:
                            writer.add_scalar(f"{relation.name}/{key}", record[key], record["step"])
                bar.set_postfix(loss=f"{record['loss']:.4f}", sel=record["selection"])
                bar.update(1)
                if run.step % cfg.train.checkpoint_every == 0 or run.step == cfg.train.max_steps:
                    run.save()
        if writer is not None:
            writer.close()
        for params in run.params_by_adapter.values():
            for p in params:
                p.requires_grad_(True)
        result = {"relation": relation.name, "steps": run.step, "status": "finished",
                  "wall_seconds": time.perf_counter() - started, "checkpoint": str(run.last_checkpoint)}
        plot_loss_curve(run.metrics_path, out_dir / "loss_curve.png", title=relation.name)
        if cfg.train.export:
            result["lora"] = str(export_inference_lora(
                comps.transformer, out_dir / "lora", cfg.lora.export_adapters,
                metadata={"relation": relation.name, "prompt": relation.prompt, "base_model": comps.source,
                          "steps": run.step, **run._identity()["lora"]}))
        (out_dir / "DONE.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        run.close()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def train(cfg: Config) -> list[dict]:
    """Train every selected relation one after another on one loaded backbone; finished relations are skipped."""
    catalog = load_catalog(cfg.data.catalog or None)
    relations = select_relations(cfg.train.relations, catalog)
    set_determinism(cfg.train.seed, cfg.train.deterministic)
    device = pick_device()
    pending = [r for r in relations if not (Path(cfg.train.output_dir) / r.name / "DONE.json").is_file()]
    dataset = resolve_dataset(cfg, pending) if pending else None
    comps = load_mochi(cfg.model.preset, cfg.model.dtype, cfg.model.attention_backend,
                       cfg.model.gradient_checkpointing, cfg.model.max_text_tokens, parts=("transformer",))
    if dataset is not None:
        check_dataset_matches_model(dataset, comps.transformer)
    results = []
    for relation in relations:
        done = Path(cfg.train.output_dir) / relation.name / "DONE.json"
        if done.is_file():
            log.info("%s: already finished (%s), skipping", relation.name, done)
            results.append(json.loads(done.read_text()) | {"status": "skipped (finished before)"})
            continue
        results.append(train_relation(cfg, comps, relation, device, dataset))
    return results
