"""Hybrid mask training: per optimizer step, which adapters are updated and which mask weights the loss.

The forward pass always runs every adapter. Adapters not updated this step get requires_grad=False before the
forward, so their gradients stay None and AdamW skips them entirely: no step, no moment update, no weight decay.
"""
from __future__ import annotations

import torch

SELECTIONS = ("relation", "subject1", "subject2")
UPDATES = {
    "relation": ("relation", "subject1", "subject2", "ffn"),
    "subject1": ("subject1", "ffn"),
    "subject2": ("subject2", "ffn"),
}
ALL = "all"


class HybridMaskTraining:
    def __init__(self, adapters: list[str], probabilities=(1 / 3, 1 / 3, 1 / 3), enabled: bool = True,
                 seed: int = 0):
        self.adapters = list(adapters)
        self.enabled = enabled
        probs = torch.tensor([float(p) for p in probabilities], dtype=torch.float64)
        # A selection that would update none of the present adapters cannot be drawn.
        for i, sel in enumerate(SELECTIONS):
            if not set(UPDATES[sel]) & set(self.adapters):
                probs[i] = 0.0
        if enabled and probs.sum() <= 0:
            raise ValueError(f"no HMT selection can update the adapters {self.adapters}")
        self.probabilities = probs / probs.sum() if probs.sum() > 0 else probs
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self) -> str:
        """The selection for the next optimizer step ('all' when HMT is disabled)."""
        if not self.enabled:
            return ALL
        return SELECTIONS[int(torch.multinomial(self.probabilities, 1, generator=self.generator))]

    def adapters_to_update(self, selection: str) -> list[str]:
        if selection == ALL:
            return list(self.adapters)
        return [a for a in self.adapters if a in UPDATES[selection]]

    def apply(self, adapter_params: dict[str, list[torch.nn.Parameter]], selection: str) -> list[str]:
        """Mark exactly the selected adapters trainable; returns their names."""
        update = self.adapters_to_update(selection)
        for name, params in adapter_params.items():
            for p in params:
                p.requires_grad_(name in update)
        return update

    @staticmethod
    def loss_mask(selection: str, mask_subject1: torch.Tensor, mask_subject2: torch.Tensor,
                  mode: str = "paper") -> torch.Tensor:
        """relation/all: union (elementwise max; the official code's sum in 'official' mode); subject k: its mask."""
        if selection == "subject1":
            return mask_subject1
        if selection == "subject2":
            return mask_subject2
        if mode == "official":
            return mask_subject1 + mask_subject2
        return torch.maximum(mask_subject1, mask_subject2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
