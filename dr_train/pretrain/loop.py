"""A resumable training stage: steps until the stage is done or the chunk's time is up, atomic checkpoints
(dr_train.checkpoint: safetensors + state.json + sha256 manifest), metrics.jsonl, a progress bar with rate and
ETA, and the stage's loss curve as a PNG. Stopping at any point loses at most the steps since the last
checkpoint; a re-run continues from it with the same random streams, so chunks add up to one run.
"""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from dr_train import checkpoint as ckpt
from dr_train.io import truncate_metrics
from dr_train.plots import read_metrics, save_figure


class Stage(Protocol):
    name: str
    total_steps: int
    files: tuple[str, ...]          # the checkpoint's safetensors files

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]: ...
    def load(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None: ...
    def train_step(self, step: int) -> dict: ...
    def check(self, step: int) -> dict | None: ...


def lr_at(step: int, peak: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine to `final_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def module_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    """AdamW moments and step per parameter name (no pickle)."""
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[p]}/{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    for p, name in names.items():
        state = {key.rpartition("/")[2]: value for key, value in tensors.items() if key.rpartition("/")[0] == name}
        if state:
            optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}


def plot_curves(metrics_path: Path, png_path: Path, keys: tuple[str, ...], title: str) -> Path | None:
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    rows = read_metrics(metrics_path)
    panels = [k for k in keys if any(k in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        pts = np.array([(r["step"], r[key]) for r in rows if r.get(key) is not None], dtype=float)
        ax.plot(pts[:, 0], pts[:, 1], lw=0.6, alpha=0.35, color="tab:blue", marker="o" if len(pts) < 30 else None)
        window = max(1, len(pts) // 50)
        if len(pts) > 2 * window > 2:
            smooth = np.convolve(pts[:, 1], np.ones(window) / window, mode="valid")
            ax.plot(pts[window - 1:, 0], smooth, color="black", lw=1.2, label=f"mean of {window}")
            ax.legend(fontsize=7)
        ax.set(xlabel="step", ylabel=key, yscale="log" if key.startswith("loss") else "linear")
    return save_figure(fig, png_path, title)


def run_stage(stage: Stage, folder: Path, minutes: float | None = None, checkpoint_minutes: float = 10.0,
              curve_keys: tuple[str, ...] = ("loss",)) -> bool:
    """Train `stage` in `folder` from its latest checkpoint until done (True) or `minutes` have passed (False)."""
    folder = Path(folder)
    ckpt_dir, metrics_path = folder / "checkpoints", folder / "metrics.jsonl"
    done_path = folder / "DONE.json"
    if done_path.is_file():
        return True
    step = 0
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing:
        tensors, state = ckpt.load_checkpoint(existing[-1], stage.files)
        stage.load(tensors, state)
        step = int(state["step"])
    folder.mkdir(parents=True, exist_ok=True)
    truncate_metrics(metrics_path, step)     # steps after the checkpoint will be redone
    started = time.monotonic()
    deadline = None if minutes is None else started + 60.0 * minutes
    last_save = started
    bar = tqdm(total=stage.total_steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True)
    saved = step

    def save() -> None:
        nonlocal saved, last_save
        tensors, state = stage.state()
        ckpt.save_checkpoint(ckpt_dir, step, tensors, {**state, "step": step}, keep=2)
        saved, last_save = step, time.monotonic()

    stop: list[str] = []

    def interrupted(signum, frame):
        stop.append(signal.Signals(signum).name)

    # SIGINT and SIGTERM (kill, a scheduler's preemption; also where a background shell started the process with
    # SIGINT ignored) end the run after the step in progress, with a checkpoint of whole steps
    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with metrics_path.open("a") as metrics:
            while step < stage.total_steps:
                t0 = time.perf_counter()
                record = stage.train_step(step)
                step += 1
                record = {"step": step, **record, "seconds": time.perf_counter() - t0}
                checked = stage.check(step)
                if checked:
                    record |= checked
                    bar.write(f"{stage.name} step {step}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float)
                                                                       else f"{k} {v}" for k, v in checked.items()))
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
                bar.update(1)
                now = time.monotonic()
                out_of_time = deadline is not None and now >= deadline
                if step == stage.total_steps or out_of_time or now - last_save >= 60.0 * checkpoint_minutes:
                    save()
                if stop:
                    bar.write(f"{stage.name}: {stop[0]} at step {step}, writing a checkpoint")
                    if step > saved:
                        save()
                    raise KeyboardInterrupt(stop[0])
                if out_of_time:
                    break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
        plot_curves(metrics_path, folder / "loss_curve.png", curve_keys, stage.name)
    if step >= stage.total_steps:
        done_path.write_text(json.dumps({"stage": stage.name, "steps": step,
                                         "device": str(getattr(stage, "device", "cpu"))}))
        return True
    return False


