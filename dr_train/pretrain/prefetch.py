"""Render the world's clips ahead of the training step in worker processes.

Every batch the pretraining stages draw is a pure function of its step (clip indices, window starts and seeds all
follow from it), so workers can render the next steps' batches while the current one trains, and the batches are
exactly those the training process would have rendered itself. On a CPU the training step dominates and
`run.workers: 0` (render in the training process) is the default; on a GPU a step of the small synth models takes
a fraction of a clip's render time, and without workers the GPU mostly waits.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable


class Prefetcher:
    """`get(step)` = `fn(*args_of(step))`; with `workers` > 0 the next `ahead` steps are rendered in spawned,
    single-threaded worker processes while the caller works. `fn` must be a module-level function (it is pickled);
    steps are expected in increasing order (others are rendered when asked); none at or after `steps` is rendered
    ahead."""

    def __init__(self, fn: Callable[..., Any], args_of: Callable[[int], tuple], workers: int = 0,
                 steps: int | None = None, ahead: int | None = None):
        assert workers >= 0, workers                  # load_pretrain_config refuses run.workers < 0
        self.fn, self.args_of, self.steps = fn, args_of, steps
        self.ahead = ahead if ahead is not None else 2 * workers
        self.pending: dict[int, Future] = {}
        self.pool = None
        if workers > 0:
            import torch  # deferred: only the pool's initializer needs it

            # spawned, not forked: a forked child of a process that already ran torch's OpenMP can hang
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=torch.set_num_threads, initargs=(1,))

    def get(self, step: int):
        if self.pool is None:
            return self.fn(*self.args_of(step))
        for stale in [s for s in self.pending if s < step]:
            self.pending.pop(stale).cancel()
        last = step + max(1, self.ahead)
        for s in range(step, last if self.steps is None else max(step + 1, min(last, self.steps))):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.fn, *self.args_of(s))
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True)
            self.pool = None
