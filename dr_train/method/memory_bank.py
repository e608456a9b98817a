"""FIFO memory bank of detached relational-dynamics features (positives) and single-frame features (negatives)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class BankEntry:
    video_id: str
    dynamics_TC: torch.Tensor      # (F-1, C), fp32, CPU
    frame_means_FC: torch.Tensor   # (F, C), fp32, CPU


class MemoryBank:
    """Holds the last `capacity` videos' features; samples positives and negatives with its own generator.

    Positives for an anchor video are dynamics of *other* videos (different video id, same frame count), taken
    from the bank and from the other clips of the current batch, matched frame by frame. Negatives are
    single-frame features drawn per anchor frame from the current video and the bank.
    """

    def __init__(self, capacity: int = 64, n_pos: int = 4, n_neg: int = 10, seed: int = 0):
        self.capacity, self.n_pos, self.n_neg = capacity, n_pos, n_neg
        self.entries: deque[BankEntry] = deque(maxlen=capacity)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, video_ids: list[str], dynamics_BTC: torch.Tensor, frame_means_BFC: torch.Tensor) -> None:
        for b, vid in enumerate(video_ids):
            self.entries.append(BankEntry(vid, dynamics_BTC[b].detach().float().cpu().clone(),
                                          frame_means_BFC[b].detach().float().cpu().clone()))

    def sample(self, video_ids: list[str], dynamics_BTC: torch.Tensor, frame_means_BFC: torch.Tensor):
        """(positives (B,T,P,C), negatives (B,T,N,C), None) or (None, None, reason) when too few are available."""
        batch, frames_minus_1, channels = dynamics_BTC.shape
        if frames_minus_1 < 1:
            return None, None, "clip has a single latent frame: no relational dynamics"
        cur_dyn = dynamics_BTC.detach().float().cpu()
        cur_means = frame_means_BFC.detach().float().cpu()
        positives, negatives = [], []
        for b in range(batch):
            pool = [e.dynamics_TC for e in self.entries
                    if e.video_id != video_ids[b] and e.dynamics_TC.shape == cur_dyn[b].shape]
            pool += [cur_dyn[o] for o in range(batch) if video_ids[o] != video_ids[b]]
            if len(pool) < self.n_pos:
                return None, None, (f"memory bank has {len(pool)} of {self.n_pos} positives for video "
                                    f"{video_ids[b]} (bank size {len(self.entries)})")
            pick = torch.randperm(len(pool), generator=self.generator)[: self.n_pos]
            positives.append(torch.stack([pool[i] for i in pick.tolist()], dim=1))   # (T, P, C)

            neg_pool = torch.cat([cur_means[b]] + [e.frame_means_FC for e in self.entries
                                                   if e.frame_means_FC.shape[-1] == channels], dim=0)
            if neg_pool.shape[0] < self.n_neg:
                return None, None, f"{neg_pool.shape[0]} of {self.n_neg} negatives available"
            order = torch.rand(frames_minus_1, neg_pool.shape[0], generator=self.generator).argsort(dim=1)
            negatives.append(neg_pool[order[:, : self.n_neg]])                        # (T, N, C)
        device = dynamics_BTC.device
        return torch.stack(positives).to(device), torch.stack(negatives).to(device), None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"generator": self.generator.get_state()}
        for i, e in enumerate(self.entries):
            tensors[f"entries.{i}.dynamics"] = e.dynamics_TC
            tensors[f"entries.{i}.frame_means"] = e.frame_means_FC
        meta = {"capacity": self.capacity, "video_ids": [e.video_id for e in self.entries]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["capacity"] != self.capacity:
            raise ValueError(f"memory bank capacity {meta['capacity']} in checkpoint, {self.capacity} configured")
        self.entries.clear()
        for i, vid in enumerate(meta["video_ids"]):
            self.entries.append(BankEntry(vid, tensors[f"entries.{i}.dynamics"], tensors[f"entries.{i}.frame_means"]))
        self.generator.set_state(tensors["generator"])


class OfficialMemoryBank:
    """The official trainer's two FIFO buffers (`loss.rcl_variant: official`): the relational dynamics (F-1, C) of
    the last `positive_size` clips, and the single-frame features (C,) of the last `negative_frames` frames.

    Per clip and per anchor frame t: min(n_pos, clips held) positives drawn without replacement from the buffer,
    the same video allowed, frame t of each (used as soon as one clip is held); max(n_neg - F, 0) extra negatives
    from the frame buffer (the clip's own F frames, with their gradient, are the first negatives: the loss adds
    them). Clips of one global batch are served in order, each seeing the clips before it as pushed already, as the
    official trainer pushes after each clip.
    """

    def __init__(self, positive_size: int = 10, negative_frames: int = 64, n_pos: int = 1, n_neg: int = 10,
                 seed: int = 0):
        self.capacity, self.negative_frames, self.n_pos, self.n_neg = positive_size, negative_frames, n_pos, n_neg
        self.positives: deque[tuple[str, torch.Tensor]] = deque(maxlen=positive_size)
        self.negatives: deque[torch.Tensor] = deque(maxlen=negative_frames)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.positives)

    def push(self, video_ids: list[str], dynamics_BTC: torch.Tensor, frame_means_BFC: torch.Tensor) -> None:
        for b, vid in enumerate(video_ids):
            self.positives.append((vid, dynamics_BTC[b].detach().float().cpu().clone()))
            self.negatives.extend(frame_means_BFC[b].detach().float().cpu().clone())

    def _draw(self, pool: list[torch.Tensor], count: int, anchors: int, channels: int) -> torch.Tensor:
        """(anchors, min(count, len(pool)), C): per anchor frame t, a fresh draw without replacement, frame t of
        each pick for (T, C) entries, the entry itself for (C,) entries."""
        k = min(count, len(pool))
        rows = []
        for t in range(anchors):
            pick = torch.randperm(len(pool), generator=self.generator)[:k].tolist()
            rows.append(torch.stack([pool[i][t] if pool[i].dim() == 2 else pool[i] for i in pick])
                        if k else torch.zeros(0, channels))
        return torch.stack(rows)

    def sample(self, video_ids: list[str], dynamics_BTC: torch.Tensor, frame_means_BFC: torch.Tensor):
        """([(positives (T, P, C), bank negatives (T, K, C)) or None per clip], None), or (None, reason) when no
        clip of the batch has a positive yet."""
        dyn = dynamics_BTC.detach().float().cpu()
        means = frame_means_BFC.detach().float().cpu()
        batch, anchors, channels = dyn.shape
        if anchors < 1:
            return None, "clip has a single latent frame: no relational dynamics"
        positives = deque(self.positives, maxlen=self.capacity)
        negatives = deque(self.negatives, maxlen=self.negative_frames)
        picks = []
        for b in range(batch):
            pool = [d for _, d in positives if d.shape == dyn[b].shape]
            if pool:
                extra = max(self.n_neg - means.shape[1], 0)
                neg_pool = [n for n in negatives if n.shape[-1] == channels]
                picks.append((self._draw(pool, self.n_pos, anchors, channels),
                              self._draw(neg_pool, extra, anchors, channels)))
            else:
                picks.append(None)
            positives.append((video_ids[b], dyn[b]))
            negatives.extend(means[b])
        if all(p is None for p in picks):
            return None, f"the positive buffer holds no clip yet (size {self.capacity})"
        device = dynamics_BTC.device
        return [None if p is None else (p[0].to(device), p[1].to(device)) for p in picks], None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"generator": self.generator.get_state()}
        for i, (_, d) in enumerate(self.positives):
            tensors[f"positives.{i}"] = d
        if self.negatives:
            tensors["negatives"] = torch.stack(list(self.negatives))
        meta = {"capacity": self.capacity, "negative_frames": self.negative_frames,
                "video_ids": [v for v, _ in self.positives]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("capacity") != self.capacity or meta.get("negative_frames") != self.negative_frames:
            raise ValueError(f"memory bank of {meta.get('capacity')} clips / {meta.get('negative_frames')} frames in "
                             f"the checkpoint, {self.capacity} / {self.negative_frames} configured")
        self.positives.clear()
        self.negatives.clear()
        for i, vid in enumerate(meta["video_ids"]):
            self.positives.append((vid, tensors[f"positives.{i}"]))
        if "negatives" in tensors:
            self.negatives.extend(tensors["negatives"])
        self.generator.set_state(tensors["generator"])
