"""An endless, seeded, resumable stream of batches over a relation's clips."""
from __future__ import annotations

import torch

from dr_train.data.synthetic import LatentClip


class ClipStream:
    """Epoch-wise permutations drawn from (seed, epoch); the position (epoch, index) is the whole state, so a
    resumed run continues the stream exactly where the checkpoint left it."""

    def __init__(self, clips: list[LatentClip], batch_size: int, seed: int = 0):
        if not clips:
            raise ValueError("no clips to train on")
        shapes = {tuple(c.latents_mean.shape) for c in clips}
        if len(shapes) != 1:
            raise ValueError(f"clips of one relation must share a latent shape, got {sorted(shapes)}")
        self.clips, self.batch_size, self.seed = clips, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
        return torch.randperm(len(self.clips), generator=g).tolist()

    def next_batch(self) -> dict:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order(self.epoch)
            picked.append(self.clips[order[self.index]])
            self.index += 1
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return {
            "video_ids": [c.video_id for c in picked],
            "latents_mean": torch.stack([c.latents_mean for c in picked]),
            "latents_logvar": torch.stack([c.latents_logvar for c in picked]),
            "mask_subject1": torch.stack([c.mask_subject1 for c in picked]),
            "mask_subject2": torch.stack([c.mask_subject2 for c in picked]),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
