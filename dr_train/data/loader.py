"""The streaming loader the trainer consumes: global batches split by rank and worker, seeded, resumable.

The stream is an endless sequence of *global* batches planned from the manifest alone (no data read): each
epoch, the relation's shards in a seeded order (or, with `resampled`, drawn with replacement) and each shard's
samples in a seeded order, grouped into batches of `batch_size x world_size` samples of one latent shape
(bucketing, for clips that differ in frame count or size). Samples that do not fill a batch at the end of an
epoch open the next epoch's batches, so no sample is lost or repeated (with one latent shape, each run of
`len(dataset)` samples from the start of the stream holds every sample once). Rank r trains on slice r of every global batch, so a run on N ranks sees exactly
the samples of a 1-rank run with an N times larger batch. Global batch k is read by DataLoader worker
k mod W, which hands batches over round-robin: the delivered order is the plan's order for any worker count.

A worker reads each shard it needs once per epoch, sequentially (WebDataset's tar reader), keeping only the
samples its next batches use. Each shard is held to the manifest in that same read (sha256, every sample's
checksum, shapes, dtypes, finite values): a defect stops the stream with the shard and the sample named or, with
`skip_corrupt`, the damaged sample's slot in its batch is filled with an intact sample of the same latent shape
(from the batch, else the worker's recent reads), logged, and counted in `Batch.corrupt_samples` and
`ShardStream.corrupt_samples`. The state is the number of global batches delivered; a resumed stream continues
with the exact next batch on any number of ranks and workers, as long as the global batch size is unchanged.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dr_train.data.shards import (MASK_FIELDS, ShardError, dataset_file, load_manifest, load_null_text, read_shard,
                                  text_shape)

log = logging.getLogger("dr_train")


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: str
    relation: str
    latent_shape: tuple


def dataset_refs(root: Path, manifest: dict, relations: list[str] | None = None) -> list[SampleRef]:
    """Samples of the selected relations, in manifest order; a selected relation without samples is an error."""
    refs = [SampleRef(s["key"], str(dataset_file(root, shard["name"])), shard["relation"], tuple(s["latent_shape"]))
            for shard in manifest["shards"] for s in shard["samples"]
            if relations is None or shard["relation"] in relations]
    if relations is not None:
        missing = sorted(set(relations) - {r.relation for r in refs})
        if missing:
            raise ValueError(f"dataset {root} has no samples of {', '.join(missing)}; it holds: "
                             f"{', '.join(sorted(manifest['relations'])) or 'nothing'}")
    if not refs:
        raise ValueError(f"dataset {root} holds no samples")
    return refs


def epoch_batches(refs: list[SampleRef], global_batch: int, seed: int, epoch: int, resampled: bool = False,
                  carry: list[SampleRef] = ()) -> tuple[list[list[SampleRef]], list[SampleRef]]:
    """(the epoch's full global batches, the samples left to open the next epoch). `carry` opens this one."""
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, epoch]))
    by_shard: dict[str, list[SampleRef]] = {}
    for r in refs:
        by_shard.setdefault(r.shard, []).append(r)
    shards = list(by_shard)
    picks = rng.integers(0, len(shards), len(shards)) if resampled else rng.permutation(len(shards))
    sequence = list(carry)
    for si in picks:
        samples = by_shard[shards[int(si)]]
        sequence += [samples[int(i)] for i in rng.permutation(len(samples))]
    open_batches: dict[tuple, list[SampleRef]] = {}
    batches = []
    for ref in sequence:
        bucket = open_batches.setdefault(ref.latent_shape, [])
        bucket.append(ref)
        if len(bucket) == global_batch:
            batches.append(open_batches.pop(ref.latent_shape))
    return batches, [r for b in open_batches.values() for r in b]


class StreamPlan:
    """The endless sequence of global batches, epoch by epoch (memoised; each epoch depends on the last's carry)."""

    def __init__(self, refs: list[SampleRef], global_batch: int, seed: int, resampled: bool):
        self.refs, self.global_batch, self.seed, self.resampled = refs, global_batch, seed, resampled
        self.epochs: list[list[list[SampleRef]]] = []
        self.starts: list[int] = []          # global index of each epoch's first batch
        self._carry: list[SampleRef] = []

    def _extend(self) -> None:
        e = len(self.epochs)
        batches, self._carry = epoch_batches(self.refs, self.global_batch, self.seed, e, self.resampled,
                                             self._carry)
        self.starts.append(self.starts[-1] + len(self.epochs[-1]) if self.epochs else 0)
        self.epochs.append(batches)

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, index within it) of global batch k."""
        while not self.epochs or k >= self.starts[-1] + len(self.epochs[-1]):
            self._extend()
        e = int(np.searchsorted(self.starts, k, side="right")) - 1
        return e, k - self.starts[e]

    def batch(self, k: int) -> tuple[int, list[SampleRef]]:
        e, i = self.locate(k)
        return e, self.epochs[e][i]


@dataclass(frozen=True)
class Batch:
    """One rank's batch, from the loader to the trainer's step (B = samples of this rank)."""
    video_ids: list[str]
    relations: list[str]
    epoch: int
    latents_mean: torch.Tensor          # (B, C, F, H, W) float32: the VAE posterior's mean ...
    latents_logvar: torch.Tensor        # ... and log-variance; the step samples z0 from them
    mask_subject1: torch.Tensor         # (B, F, H, W) float32 in [0, 1], latent resolution (area-averaged)
    mask_subject2: torch.Tensor
    mask_subject1_maxpool: torch.Tensor  # the same, max-pooled (the official code's resize)
    mask_subject2_maxpool: torch.Tensor
    text_embed: torch.Tensor            # (B, L, D) prompt embeddings
    text_mask: torch.Tensor             # (B, L) bool, valid tokens
    corrupt_samples: int = 0            # slots whose sample was damaged and filled with an intact one (skip_corrupt)

    def subject_masks(self, pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(subject 1, subject 2) masks, max-pooled when `pooled` (the official loss mode)."""
        if pooled:
            return self.mask_subject1_maxpool, self.mask_subject2_maxpool
        return self.mask_subject1, self.mask_subject2


assert tuple(f for f in Batch.__dataclass_fields__ if f.startswith("mask_")) == MASK_FIELDS


def collate(samples: list, epoch: int, corrupt_samples: int = 0) -> Batch:
    stack = lambda name: torch.from_numpy(np.stack([getattr(s, name) for s in samples]))  # noqa: E731
    return Batch(video_ids=[s.key for s in samples], relations=[s.meta.get("relation", "") for s in samples],
                 epoch=epoch, latents_mean=stack("latent_mean"), latents_logvar=stack("latent_logvar"),
                 **{name: stack(name) for name in MASK_FIELDS},
                 text_embed=stack("text_embed"), text_mask=stack("text_mask"), corrupt_samples=corrupt_samples)


class _RankBatches(IterableDataset):
    """One rank's slice of the global batches from index `start` on; worker w takes start + w, + W, ..."""

    def __init__(self, plan: StreamPlan, batch_size: int, rank: int, workers: int, start: int, text_shape_,
                 latent_channels, entries: dict[str, dict], skip_corrupt: bool = False):
        self.plan, self.batch_size, self.rank, self.workers, self.start = plan, batch_size, rank, workers, start
        self.text_shape, self.latent_channels = text_shape_, latent_channels
        self.entries, self.skip_corrupt = entries, skip_corrupt      # shard path -> its manifest entry

    def _slice(self, k: int) -> tuple[int, list[SampleRef]]:
        epoch, batch = self.plan.batch(k)
        return epoch, batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        k = self.start + worker
        while True:
            # this worker's batches up to the end of k's epoch: one read of each shard they need
            epoch, _ = self.plan.locate(k)
            end = self.plan.starts[epoch] + len(self.plan.epochs[epoch])
            ks = list(range(k, end, self.workers))
            yield from self._read([self._slice(j) for j in ks])
            k = ks[-1] + self.workers

    def _read(self, batches: list[tuple[int, list[SampleRef]]]) -> Iterator[Batch]:
        uses = Counter(r for _, b in batches for r in b)
        loaded: dict[SampleRef, object] = {}
        corrupt: set[SampleRef] = set()
        for epoch, batch in batches:
            for ref in batch:
                if ref not in loaded and ref not in corrupt:
                    wanted = {r.key: r for r in uses if r.shard == ref.shard and r not in loaded and r not in corrupt}
                    self._load_shard(ref.shard, wanted, loaded, corrupt)
            samples = [loaded.get(r) for r in batch]
            bad = sum(s is None for s in samples)
            if bad:
                samples = self._fill(samples, batch, loaded)
            yield collate(samples, epoch, bad)
            for ref in batch:
                uses[ref] -= 1
                if uses[ref] == 0:
                    del uses[ref]
                    loaded.pop(ref, None)
                    corrupt.discard(ref)

    def _load_shard(self, shard: str, wanted: dict[str, SampleRef], loaded: dict, corrupt: set) -> None:
        """Read one shard (checked against its manifest entry) into `loaded`; with skip_corrupt, the wanted samples
        it could not give are logged and put in `corrupt`."""
        on_corrupt = (lambda msg: log.warning("corrupt data skipped: %s", msg)) if self.skip_corrupt else None
        for sample in read_shard(Path(shard), set(wanted), self.text_shape, self.latent_channels,
                                 self.entries[shard], on_corrupt):
            loaded[wanted[sample.key]] = sample
        lost = [r for r in wanted.values() if r not in loaded]
        assert not lost or self.skip_corrupt, f"read_shard gave no error for the missing samples {lost}"
        corrupt.update(lost)

    @staticmethod
    def _fill(samples: list, batch: list[SampleRef], loaded: dict) -> list:
        """The batch with each damaged sample's slot filled by an intact sample of the same latent shape: one of
        the batch, else one this worker has read for its next batches."""
        shape = batch[0].latent_shape
        spare = next((s for s in samples if s is not None), None)
        if spare is None:
            spare = next((s for r, s in loaded.items() if r.latent_shape == shape), None)
        if spare is None:
            names = ", ".join(f"{r.key!r} ({r.shard})" for r in batch)
            raise ShardError(f"samples {names} are corrupt and no intact sample of latent shape {list(shape)} is at "
                             f"hand to take their place: run `launch/prepare.py verify` on the dataset")
        return [spare if s is None else s for s in samples]


class ShardStream:
    """An endless stream of batches for one rank: `next_batch()`, `state_dict()`, `load_state_dict()`, `close()`."""

    def __init__(self, root: str | Path, relations: list[str] | None, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, resampled: bool = False,
                 skip_corrupt: bool = False):
        """`skip_corrupt`: a damaged sample is logged, counted (`corrupt_samples`, `Batch.corrupt_samples`) and its
        slot filled with an intact sample, instead of stopping the stream with the shard and sample named."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad loader settings: batch_size={batch_size}, rank={rank}/{world_size}, "
                             f"num_workers={num_workers}")
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.refs = dataset_refs(self.root, self.manifest, relations)
        self.batch_size, self.seed, self.resampled = batch_size, seed, resampled
        self.rank, self.world_size, self.workers = rank, world_size, num_workers
        self.global_batch = batch_size * world_size
        if len(self.refs) < self.global_batch:
            raise ValueError(f"dataset {self.root} has {len(self.refs)} samples of {relations or 'all relations'}: "
                             f"fewer than one global batch ({batch_size} per rank x {world_size} ranks)")
        self.plan = StreamPlan(self.refs, self.global_batch, seed, resampled)
        self.skip_corrupt = skip_corrupt
        self.entries = {str(dataset_file(self.root, e["name"])): e for e in self.manifest["shards"]}
        self.delivered = 0
        self.corrupt_samples = 0          # batch slots so far whose sample was damaged (skip_corrupt)
        self._iter = None
        self.null_text = load_null_text(self.root, self.manifest)

    def _make_iter(self):
        dataset = _RankBatches(self.plan, self.batch_size, self.rank, max(1, self.workers), self.delivered,
                               text_shape(self.manifest), self.manifest["encoder"]["latent_channels"], self.entries,
                               self.skip_corrupt)
        if self.workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, prefetch_factor=2))

    def next_batch(self) -> Batch:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.delivered += 1
        self.corrupt_samples += batch.corrupt_samples
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later next_batch starts them again at the same position)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = None

    def _layout(self) -> dict:
        return {"seed": self.seed, "global_batch": self.global_batch, "resampled": self.resampled,
                "samples": hashlib.sha256("\n".join(r.key for r in self.refs).encode()).hexdigest()[:16]}

    def state_dict(self) -> dict:
        return {"delivered": self.delivered, "corrupt_samples": self.corrupt_samples, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        layout = self._layout()
        saved = {k: state.get(k) for k in layout}
        self.close()
        self.corrupt_samples = int(state.get("corrupt_samples", 0))
        if saved == layout:
            self.delivered = int(state["delivered"])
            return
        # another global batch size, seed or dataset: the exact position cannot carry over; restart its epoch
        seen = int(state.get("delivered", 0)) * int(state.get("global_batch") or 1)
        epoch = seen // len(self.refs)
        self.plan.locate(0)
        while len(self.plan.starts) <= epoch:
            self.plan.locate(self.plan.starts[-1] + len(self.plan.epochs[-1]))
        changed = sorted(k for k in layout if saved[k] != layout[k])
        log.warning("data stream: %s changed since the checkpoint; continuing from the start of epoch %d",
                    ", ".join(changed), epoch)
        self.delivered = self.plan.starts[epoch]
