"""The results of a run: one row per relation, written as <storage>/results.csv and results.md, printed as a table,
and every relation's loss curve in <storage>/loss_curves.png."""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dr_train.io import atomic_path
from dr_train.orchestrate import records
from dr_train.run_folder import RelationFolder

TAIL_STEPS = 10


@dataclass
class RelationResult:
    """One relation's row. status: finished, failed, or skipped (finished by an earlier submission)."""
    relation: str
    status: str
    steps: int = 0                       # the last step in metrics.jsonl
    max_steps: int = 0
    retries: int = 0                     # restarts after its process or node died, in this submission
    wall_seconds: float | None = None    # first attempt's start to the end of the last (restarts included)
    gpu_hours: float | None = None       # wall_seconds x GPUs held per relation
    sec_per_step: float | None = None    # median training-step seconds (metrics.jsonl), the history of later runs
    loss: float | None = None            # the last step's losses
    loss_rec: float | None = None
    loss_rcl: float | None = None        # the last step that had one (the RCL is skipped while the bank fills)
    loss_rec_mean10: float | None = None  # mean flow-matching loss of the last 10 steps (less noisy)
    lora: str = ""                       # the exported inference LoRA
    log: str = ""                        # train.log of the relation
    error: str = ""                      # why it failed
    log_tail: str = dataclasses.field(default="", repr=False)   # not in the CSV; in results.md for failures

    @classmethod
    def csv_columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "log_tail"]


def from_storage(rel_dir: Path, relation: str, status: str, max_steps: int) -> RelationResult:
    """The parts of a row the relation's files tell: steps, losses, step time, LoRA and log paths."""
    rows = records.read_jsonl(RelationFolder(rel_dir).metrics)
    res = RelationResult(relation=relation, status=status, max_steps=max_steps)
    res.log = str(records.log_path(rel_dir)) if records.log_path(rel_dir).is_file() else ""
    lora = RelationFolder(rel_dir).lora_weights
    res.lora = str(lora) if lora.is_file() else ""
    if rows:
        last = rows[-1]
        res.steps, res.loss, res.loss_rec = int(last["step"]), last.get("loss"), last.get("loss_rec")
        res.loss_rcl = next((r["loss_rcl"] for r in reversed(rows) if r.get("loss_rcl") is not None), None)
        tail = [r["loss_rec"] for r in rows[-TAIL_STEPS:] if r.get("loss_rec") is not None]
        res.loss_rec_mean10 = sum(tail) / len(tail) if tail else None
        res.sec_per_step = records.median_step_seconds(rel_dir)
    return res


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(results: list[RelationResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RelationResult.csv_columns())
        writer.writeheader()
        for r in results:
            row = dataclasses.asdict(r)
            row.pop("log_tail")
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


TABLE_COLUMNS = ("relation", "status", "steps", "retries", "wall", "GPU-h", "loss", "loss_rec", "loss_rcl", "LoRA")


def table_cells(r: RelationResult) -> list[str]:
    return [r.relation, r.status, f"{r.steps}/{r.max_steps}", str(r.retries), _duration(r.wall_seconds),
            _fmt(r.gpu_hours, 3), _fmt(r.loss), _fmt(r.loss_rec), _fmt(r.loss_rcl),
            r.lora if r.status != "failed" else r.error[:120]]


def format_table(results: list[RelationResult]) -> str:
    """A plain-text table (column widths fitted) for the terminal."""
    rows = [list(TABLE_COLUMNS)] + [table_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def write_markdown(results: list[RelationResult], path: Path, title: str, notes: list[str]) -> Path:
    """The results table, then each failed relation's error and the tail of its log."""
    cols = ["relation", "status", "steps", "retries", "wall", "GPU-h", "s/step", "loss", "loss_rec", "loss_rcl",
            f"loss_rec (last {TAIL_STEPS})", "LoRA / error"]
    lines = [f"# {title}", "", *[f"- {n}" for n in notes], "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        cells = [r.relation, r.status, f"{r.steps}/{r.max_steps}", str(r.retries), _duration(r.wall_seconds),
                 _fmt(r.gpu_hours, 3), _fmt(r.sec_per_step, 3), _fmt(r.loss), _fmt(r.loss_rec), _fmt(r.loss_rcl),
                 _fmt(r.loss_rec_mean10), f"`{r.lora}`" if r.lora and r.status != "failed" else r.error]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines += ["", "## Failures"]
        for r in failed:
            lines += ["", f"### {r.relation}", "", f"Error: {r.error}", "", f"Log: `{r.log}`", ""]
            if r.log_tail:
                lines += ["```", r.log_tail.replace("```", "'''"), "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_loss_curves(storage: Path, results: list[RelationResult], path: Path) -> Path | None:
    """One line per relation: its flow-matching loss (log scale) and, beside it, its relational contrastive loss,
    each a running mean over ~5 % of the relation's steps. None when no relation has a step."""
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here
    from matplotlib.ticker import ScalarFormatter  # deferred: matplotlib is a heavy import, needed only here

    curves = {}
    for r in results:
        rows = records.read_jsonl(RelationFolder.of(storage, r.relation).metrics)
        if rows:
            curves[r.relation] = rows

    def smoothed(points: list[tuple[int, float]]):
        steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)
        window = max(1, len(points) // 20)
        return steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")

    if not curves:
        return None
    fig, (ax_rec, ax_rcl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in curves.items():
        line, = ax_rec.plot(*smoothed([(r["step"], r["loss_rec"]) for r in rows]), lw=1.1, label=name)
        rcl = [(r["step"], r["loss_rcl"]) for r in rows if r.get("loss_rcl") is not None]
        if rcl:
            ax_rcl.plot(*smoothed(rcl), lw=1.0, color=line.get_color())
    ax_rec.set(xlabel="step", ylabel="masked flow-matching loss", yscale="log")
    for axis in (ax_rec.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax_rcl.set(xlabel="step", ylabel="relational contrastive loss")
    ax_rec.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    fig.suptitle("loss per relation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
