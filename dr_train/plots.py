"""Pictures people look at: loss curves from metrics.jsonl and keyframe grids of videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} holds no steps to plot")
    validation = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                  for key in ("validation_relation_accuracy", "validation_subject_fidelity")}
    panels = 3 if any(validation.values()) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5))
    ax_rec, ax_rcl = axes[0], axes[1]
    colours = {"relation": "tab:red", "subject1": "tab:blue", "subject2": "tab:green", "all": "tab:gray"}
    for sel, colour in colours.items():
        pts = [(r["step"], r["loss_rec"]) for r in rows if r["selection"] == sel]
        if pts:
            ax_rec.scatter(*zip(*pts), s=6, color=colour, label=f"{sel} step")
    steps = np.array([r["step"] for r in rows])
    rec = np.array([r["loss_rec"] for r in rows])
    window = max(1, len(rows) // 20)
    if len(rows) >= window:
        smooth = np.convolve(rec, np.ones(window) / window, mode="valid")
        ax_rec.plot(steps[window - 1:], smooth, color="black", lw=1.2, label=f"mean of {window}")
    ax_rec.set(xlabel="step", ylabel="masked flow-matching loss", yscale="log")
    ax_rec.legend(fontsize=7)
    rcl = [(r["step"], r["loss_rcl"]) for r in rows if r.get("loss_rcl") is not None]
    if rcl:
        ax_rcl.plot(*zip(*rcl), color="tab:purple", lw=1)
    ax_rcl.set(xlabel="step", ylabel="relational contrastive loss")
    if panels == 3:
        for (key, pts), colour in zip(validation.items(), ("tab:red", "tab:green")):
            if pts:
                axes[2].plot(*zip(*pts), marker="o", color=colour, label=key.removeprefix("validation_"))
        axes[2].set(xlabel="step", ylabel="validation (judged videos)", ylim=(-0.02, 1.02))
        axes[2].legend(fontsize=7)
    return save_figure(fig, png_path, title, dpi=110)


def keyframe_grid(frames_FHWC: np.ndarray, png_path: Path, count: int = 5) -> Path:
    """`count` evenly spaced frames (first and last included), side by side, as one PNG."""
    frames = np.asarray(frames_FHWC)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (F, H, W, 3), got {frames.shape}")
    idx = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    picked = frames[idx]
    if picked.dtype != np.uint8:
        picked = (np.clip(picked, 0, 1) * 255).round().astype(np.uint8)
    grid = np.concatenate(list(picked), axis=1)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(png_path)
    return png_path


def save_figure(fig, png_path: Path, title: str, dpi: int = 100) -> Path:
    """Title, lay out and write a matplotlib figure as a PNG (parent folders created), then free it."""
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only for pictures
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return png_path
