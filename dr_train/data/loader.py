"""The streaming loader the trainer consumes: shards split by rank and worker, seeded, resumable.

Every epoch has a plan computed from the manifest alone (no data read): the relation's shards in a seeded order
(or, with `resampled`, drawn with replacement), each shard's samples in a seeded order, grouped into batches of
one latent shape (bucketing, for datasets whose clips differ in frame count or size). The plan's batches are
cut into contiguous runs, one per rank, and each rank's run into one per DataLoader worker, so a worker streams
only the shards it needs. A worker reads a shard once, sequentially, and keeps the samples its next batches use.

The state is the number of batches this rank has delivered; the DataLoader hands batches over round-robin, so
that number fixes each worker's position, and a resumed stream continues with the exact next batch.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dr_train.data.shards import load_manifest, load_null_text, read_shard, text_shape

log = logging.getLogger("dr_train")


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: str
    relation: str
    latent_shape: tuple


def dataset_refs(root: Path, manifest: dict, relations: list[str] | None = None) -> list[SampleRef]:
    """Samples of the selected relations, in manifest order; a selected relation without samples is an error."""
    refs = [SampleRef(s["key"], str(Path(root) / shard["name"]), shard["relation"], tuple(s["latent_shape"]))
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


def epoch_batches(refs: list[SampleRef], batch_size: int, seed: int, epoch: int,
                  resampled: bool = False) -> list[list[SampleRef]]:
    """The whole epoch's batches, the same on every rank and worker."""
    rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, epoch]))
    by_shard: dict[str, list[SampleRef]] = {}
    for r in refs:
        by_shard.setdefault(r.shard, []).append(r)
    shards = list(by_shard)
    picks = rng.integers(0, len(shards), len(shards)) if resampled else rng.permutation(len(shards))
    open_batches: dict[tuple, list[SampleRef]] = {}
    batches = []
    for si in picks:
        samples = by_shard[shards[int(si)]]
        for i in rng.permutation(len(samples)):
            ref = samples[int(i)]
            bucket = open_batches.setdefault(ref.latent_shape, [])
            bucket.append(ref)
            if len(bucket) == batch_size:
                batches.append(open_batches.pop(ref.latent_shape))
    batches.extend(b for b in open_batches.values() if b)      # last, partial batch of each shape
    return batches


def contiguous_part(items: list, parts: int, index: int) -> list:
    lo, hi = index * len(items) // parts, (index + 1) * len(items) // parts
    return items[lo:hi]


def worker_skip(delivered: int, workers: int, worker: int) -> int:
    """Batches worker `worker` had handed over when the rank had delivered `delivered` (round-robin order)."""
    return len(range(worker, delivered, workers))


def collate(samples: list, epoch: int) -> dict:
    stack = lambda name: torch.from_numpy(np.stack([getattr(s, name) for s in samples]))  # noqa: E731
    return {
        "video_ids": [s.key for s in samples], "relations": [s.meta.get("relation", "") for s in samples],
        "epoch": epoch, "latents_mean": stack("latent_mean"), "latents_logvar": stack("latent_logvar"),
        "mask_subject1": stack("mask_subject1"), "mask_subject2": stack("mask_subject2"),
        "text_embed": stack("text_embed"), "text_mask": stack("text_mask"),
    }


class _RankBatches(IterableDataset):
    """One rank's endless batch stream, split over DataLoader workers."""

    def __init__(self, refs, batch_size, seed, rank, world_size, workers, resampled, start_epoch, delivered,
                 text_shape_, latent_channels):
        self.refs, self.batch_size, self.seed = refs, batch_size, seed
        self.rank, self.world_size, self.workers, self.resampled = rank, world_size, workers, resampled
        self.start_epoch, self.delivered = start_epoch, delivered
        self.text_shape, self.latent_channels = text_shape_, latent_channels

    def worker_batches(self, epoch: int, worker: int) -> list[list[SampleRef]]:
        plan = epoch_batches(self.refs, self.batch_size, self.seed, epoch, self.resampled)
        return contiguous_part(contiguous_part(plan, self.world_size, self.rank), self.workers, worker)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        assert (info.num_workers if info is not None else 1) == self.workers
        skip = worker_skip(self.delivered, self.workers, worker)
        for epoch in count(self.start_epoch):
            batches = self.worker_batches(epoch, worker)
            if not batches:
                raise RuntimeError(f"rank {self.rank} worker {worker} has no batch in epoch {epoch}")
            if skip >= len(batches):
                skip -= len(batches)
                continue
            batches, skip = batches[skip:], 0
            yield from self._read(batches, epoch)

    def _read(self, batches: list[list[SampleRef]], epoch: int) -> Iterator[dict]:
        uses = Counter(r for b in batches for r in b)
        loaded: dict[SampleRef, object] = {}
        for batch in batches:
            for ref in batch:
                if ref not in loaded:
                    wanted = {r.key: r for r in uses if r.shard == ref.shard and r not in loaded}
                    for sample in read_shard(Path(ref.shard), set(wanted), self.text_shape, self.latent_channels):
                        loaded[wanted[sample.key]] = sample
                    if ref not in loaded:
                        raise ValueError(f"shard {ref.shard} lacks sample {ref.key!r} listed in the manifest "
                                         f"(run `launch/prepare.py verify` on the dataset)")
            yield collate([loaded[r] for r in batch], epoch)
            for ref in batch:
                uses[ref] -= 1
                if uses[ref] == 0:
                    del uses[ref], loaded[ref]


class ShardStream:
    """An endless stream of batches for one rank: `next_batch()`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, root: str | Path, relations: list[str] | None, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, resampled: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad loader settings: batch_size={batch_size}, rank={rank}/{world_size}, "
                             f"num_workers={num_workers}")
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.refs = dataset_refs(self.root, self.manifest, relations)
        self.batch_size, self.seed, self.resampled = batch_size, seed, resampled
        self.rank, self.world_size = rank, world_size
        per_rank = len(epoch_batches(self.refs, batch_size, seed, 0, resampled)) // world_size
        if per_rank < 1:
            raise ValueError(f"dataset {self.root} gives {len(self.refs)} samples for {relations or 'all relations'}"
                             f": fewer batches of {batch_size} than the {world_size} ranks that need one each")
        self.workers = min(num_workers, per_rank) if num_workers else 0
        if num_workers > self.workers:
            log.info("loader: %d batches per rank and epoch, so %d workers instead of %d", per_rank, self.workers,
                     num_workers)
        self.start_epoch, self.delivered = 0, 0
        self._iter = None
        self.null_text = load_null_text(self.root, self.manifest)

    def _make_iter(self):
        dataset = _RankBatches(self.refs, self.batch_size, self.seed, self.rank, self.world_size,
                               max(1, self.workers), self.resampled, self.start_epoch, self.delivered,
                               text_shape(self.manifest), self.manifest["encoder"].get("latent_channels"))
        if self.workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, prefetch_factor=2))

    def next_batch(self) -> dict:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.delivered += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later next_batch starts them again at the same position)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = None

    def _layout(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "rank": self.rank, "workers": self.workers, "resampled": self.resampled,
                "samples": hashlib.sha256("\n".join(r.key for r in self.refs).encode()).hexdigest()[:16]}

    def state_dict(self) -> dict:
        return {"start_epoch": self.start_epoch, "delivered": self.delivered, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        layout = self._layout()
        saved = {k: state.get(k) for k in layout}
        if saved == layout:
            self.start_epoch, self.delivered = int(state["start_epoch"]), int(state["delivered"])
        else:
            # another rank/worker layout or dataset: the exact position cannot carry over; restart the epoch
            seen = int(state.get("delivered", 0)) * int(state.get("batch_size") or 1) * \
                int(state.get("world_size") or 1)
            epoch = int(state.get("start_epoch", 0)) + seen // max(1, len(self.refs))
            changed = sorted(k for k in layout if saved[k] != layout[k])
            log.warning("data stream: %s changed since the checkpoint; continuing from the start of epoch %d",
                        ", ".join(changed), epoch)
            self.start_epoch, self.delivered = epoch, 0
        self._iter = None
