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
