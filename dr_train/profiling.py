"""Per-phase wall time of training steps (data, forward, loss, backward, optimizer, ...), for perf/profile_step.py.

Disabled (the default), a phase costs one attribute check. Enabled, each phase boundary synchronises the device so
asynchronous GPU work is charged to the phase that launched it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled, self.device = enabled, device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def reset(self) -> dict[str, float]:
        """The accumulated seconds per phase, and start again."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out
