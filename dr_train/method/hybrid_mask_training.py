"""Hybrid mask training: per optimizer step, which adapters run, which are updated and which mask weights the loss.

A step draws `relation`, `subject1` or `subject2`. A relation step updates relation + both subjects + ffn and
weights the loss with the relation mask; a subject-k step updates subject k + ffn with subject k's mask.

Which adapters run in the forward pass (`hmt.forward`): `selected` (default, the official trainer) runs exactly the
adapters the step updates, so a subject LoRA learns its subject's appearance on its own, not as a correction on top of
the relation LoRA; `all` runs every adapter and only freezes the unselected ones. With `hmt.relation_step_subjects:
frozen` (neither the paper's nor the official reading) a relation step still runs the subject LoRAs, for their
appearance cues, but updates only relation + ffn, so whatever the step learns lands in the adapters the inference export
keeps; with `excluded` (neither reading either) a relation step runs relation + ffn alone, and the subject LoRAs learn
only in their own steps. With `hmt.subject_target: still` or `frame` (neither reading's either) a subject step learns
from one latent frame of the clip and its mask (`subject_frame_target`), repeated over the clip's frames (a still clip)
or on its own (a one-frame clip, as image steps): a subject's mask moves with it, so on the clip a subject step's loss
holds the subject's motion, and the subject LoRAs, which the export drops, would take the relation with them. With
`hmt.subject_sigma_max: s < 1` (neither reading's) the subject LoRAs act only at noise levels sigma <= s, where the
latents already hold the motion: subject steps draw sigma in [0, s], and a relation step draws its noise band
(`noise_band`), [0, s] with probability s (every sigma stays as likely as before) and the subject LoRAs, else [s, 1]
without them, so the motion, decided at high noise, is learned by relation + ffn alone (on the synth base the kinds are
decided there too, and fidelity falls: docs/ablations_synth_7x7/README.md).

Frozen adapters get requires_grad=False before the forward, so their gradients stay None; with
`optim.frozen_adapters: skip` AdamW leaves them untouched (no step, no moment update, no weight decay), with
`zero_grad` they are stepped with zero gradients (`HMTAdamW` below).

The optimizer-group rule: one AdamW parameter group per adapter, and `HMTAdamW` skips the groups whose adapters
this step does not update (their weights, moments and step counts stay untouched, as in the single-process
trainer), because ZeRO hands every group a (zero) gradient and would otherwise apply weight decay and momentum to
adapters HMT froze. With `optim.frozen_adapters: zero_grad` (the official code) every group is stepped, frozen
adapters with zero gradients: ZeRO's flat partitions have them already, and the plain engine fills them in, so
both engines apply the same momentum and decay.
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
FORWARD_MODES = ("selected", "all")
RELATION_STEP_SUBJECTS = ("train", "frozen", "excluded")
SUBJECT_TARGETS = ("video", "still", "frame")
SUBJECTS = ("subject1", "subject2")
EVERY_SIGMA = (0.0, 1.0)            # the noise band of a step when the subject LoRAs act at every noise level


def active_adapters(selection: str, adapters: list[str]) -> list[str]:
    """The adapters that run (and are updated) in a step whose HMT draw is `selection`, among the `adapters` the
    placement has: relation -> relation, subject1, subject2, ffn; subject k -> subject k, ffn; 'all' (HMT off) ->
    every adapter."""
    if selection == ALL:
        return list(adapters)
    if selection not in UPDATES:
        raise ValueError(f"unknown HMT selection {selection!r}; selections: {', '.join(SELECTIONS)}, {ALL}")
    return [a for a in adapters if a in UPDATES[selection]]


def subject_frame_target(z0_BCFHW: torch.Tensor, mask_BFHW: torch.Tensor, frame_B: torch.Tensor, repeat: bool):
    """Latents and mask ((B, F, H, W) or (B, 1, F, H, W)) of each sample's latent frame `frame_B[b]`: repeated over
    the clip's F frames (a still clip) when `repeat`, else as a one-frame clip."""
    assert mask_BFHW.shape[0] == z0_BCFHW.shape[0] and mask_BFHW.shape[-3] == z0_BCFHW.shape[2], \
        (tuple(mask_BFHW.shape), tuple(z0_BCFHW.shape))

    def pick(x: torch.Tensor, dim: int) -> torch.Tensor:
        index = frame_B.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        one = torch.take_along_dim(x, index, dim=dim)
        return one.expand_as(x).contiguous() if repeat else one

    return pick(z0_BCFHW, 2), pick(mask_BFHW, mask_BFHW.dim() - 3)


def _with_subjects(adapters: list[str], keep: bool) -> list[str]:
    """`adapters`, or `adapters` less the subject LoRAs."""
    return list(adapters) if keep else [a for a in adapters if a not in SUBJECTS]


class HybridMaskTraining:
    def __init__(self, adapters: list[str], probabilities=(1 / 3, 1 / 3, 1 / 3), enabled: bool = True,
                 seed: int = 0, forward: str = "selected", relation_step_subjects: str = "train",
                 subject_target: str = "video", subject_sigma_max: float = 1.0):
        if forward not in FORWARD_MODES:
            raise ValueError(f"hmt.forward must be one of {', '.join(FORWARD_MODES)}, got {forward!r}")
        if relation_step_subjects not in RELATION_STEP_SUBJECTS:
            raise ValueError(f"hmt.relation_step_subjects must be one of {', '.join(RELATION_STEP_SUBJECTS)}, got "
                             f"{relation_step_subjects!r}")
        if subject_target not in SUBJECT_TARGETS:
            raise ValueError(f"hmt.subject_target must be one of {', '.join(SUBJECT_TARGETS)}, got "
                             f"{subject_target!r}")
        if not 0.0 < subject_sigma_max <= 1.0:
            raise ValueError(f"hmt.subject_sigma_max must be in (0, 1], got {subject_sigma_max!r}")
        self.adapters = list(adapters)
        self.subject_sigma_max = float(subject_sigma_max)
        self.subject_target = subject_target
        self.relation_step_subjects = relation_step_subjects
        self.enabled, self.forward = enabled, forward
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

    def frame_step(self, selection: str) -> bool:
        """Whether a step drawn as `selection` learns from one frame of the clip (`subject_frame_target`)."""
        return self.subject_target != "video" and selection in SUBJECTS

    def noise_band(self, selection: str) -> tuple[float, float]:
        """The range [low, high] a step drawn as `selection` draws its sigmas from (`hmt.subject_sigma_max`): [0, 1]
        when the subject LoRAs act at every noise level or are absent, [0, s] in subject steps; a relation (or
        'all') step draws [0, s] with probability s, else [s, 1], from the selection's generator."""
        s = self.subject_sigma_max
        if s >= 1.0 or not set(SUBJECTS) & set(self.adapters):
            return EVERY_SIGMA
        if selection in SUBJECTS:
            return (0.0, s)
        return (0.0, s) if float(torch.rand((), dtype=torch.float64, generator=self.generator)) < s else (s, 1.0)

    def adapters_to_update(self, selection: str, band: tuple[float, float] = EVERY_SIGMA) -> list[str]:
        """The adapters this step updates: the selection's, less the subject LoRAs in a band above the noise levels
        they act at and, unless `hmt.relation_step_subjects: train`, in relation steps."""
        keep_subjects = band[0] == 0 and (selection != "relation" or self.relation_step_subjects == "train")
        return _with_subjects(active_adapters(selection, self.adapters), keep_subjects)

    def adapters_to_run(self, selection: str, band: tuple[float, float] = EVERY_SIGMA) -> list[str]:
        """The adapters in this step's forward pass (per `hmt.forward`), less the subject LoRAs in a band above the
        noise levels they act at and, with `hmt.relation_step_subjects: excluded`, in relation steps."""
        run = active_adapters(selection, self.adapters) if self.forward == "selected" else list(self.adapters)
        keep_subjects = band[0] == 0 and (selection != "relation" or self.relation_step_subjects != "excluded")
        return _with_subjects(run, keep_subjects)

    def apply(self, adapter_params: dict[str, list[torch.nn.Parameter]], selection: str,
              band: tuple[float, float] = EVERY_SIGMA) -> list[str]:
        """Mark exactly the selected adapters trainable; returns their names."""
        update = self.adapters_to_update(selection, band)
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


FROZEN_ADAPTERS = ("skip", "zero_grad")


class HMTAdamW(torch.optim.AdamW):
    """AdamW over one parameter group per adapter; groups with `active=False` are not stepped at all, and in active
    groups a parameter without a gradient is stepped with a zero gradient when `zero_fill` is set."""

    zero_fill = False

    def set_active(self, adapters: list[str]) -> None:
        for group in self.param_groups:
            group["active"] = group["adapter"] in adapters

    @torch.no_grad()
    def step(self, closure=None):
        if self.zero_fill:
            for group in self.param_groups:
                for p in group["params"]:
                    if group.get("active", True) and p.grad is None:
                        p.grad = torch.zeros_like(p)
        parked = [(g, g["params"]) for g in self.param_groups if not g.get("active", True)]
        for g, _ in parked:
            g["params"] = []
        try:
            return super().step(closure)
        finally:
            for g, params in parked:
                g["params"] = params


def make_optimizer(params_by_adapter: dict[str, list[torch.nn.Parameter]], optim) -> HMTAdamW:
    """HMTAdamW over one group per adapter, from an `OptimConfig`."""
    if optim.frozen_adapters not in FROZEN_ADAPTERS:
        raise ValueError(f"optim.frozen_adapters must be one of {', '.join(FROZEN_ADAPTERS)}, got "
                         f"{optim.frozen_adapters!r}")
    groups = [{"params": params, "adapter": name, "active": True} for name, params in params_by_adapter.items()]
    opt = HMTAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    opt.zero_fill = optim.frozen_adapters == "zero_grad"
    return opt
