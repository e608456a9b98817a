"""The evaluation report of a run: report.md and report.html (self-contained: small PNGs inlined as base64, larger
ones linked relatively) from `<run>/eval/metrics.json` (`evaluate_run`) and the batch's index.json.

Contents: what was evaluated and how (model, training, sampler settings, number of videos, which metrics were
computed with which weights, and which were not and why); the Table-1-style table (relation LoRAs vs the base
model, all relations and per relation, mean +- std) beside the paper's numbers, clearly labelled as the paper's;
per relation a strip: a training exemplar's keyframes | generated keyframe grids (first seed of a few prompts) |
the base model's for the same prompt and seed; plots (metrics per relation with std bars, training loss curves).
"""
from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from dr_train.data.shards import load_manifest, read_shard
from dr_train.eval.evaluate import ALL, METRICS_FILE, VIDEOS_CSV, load_metrics
from dr_train.generate import load_index, relation_config, training_dataset_dir
from dr_train.plots import read_metrics
from dr_train.run_folder import RelationFolder

INLINE_LIMIT = 256 * 1024          # PNGs up to this size are inlined into report.html
MIN_HEIGHT = 96                    # report.html shows smaller images scaled up to this height (pixelated)
COLUMNS = (("vlm_relation_accuracy", "RelAcc (VLM)"), ("judge_accuracy", "Judge acc."), ("clip_t", "CLIP-T"),
           ("temporal_consistency", "TempCons"), ("fvd", "FVD"))
KIND_LABEL = {"lora": "relation LoRA", "base": "base model (no LoRA)"}

# The paper's numbers (arXiv 2503.07602; shared/paper/tables.md): Mochi-1 at 61x480x848, trained on NTU RGB+D,
# Relation Accuracy from Qwen-VL-Max (mean +- std over 10 repeats), FVD against 800 AnimalKingdom videos.
PAPER_SOURCE = ("the paper (DreamRelation, arXiv 2503.07602): Mochi-1 at 61x480x848, NTU RGB+D relations, "
                "RelAcc by Qwen-VL-Max, FVD vs 800 AnimalKingdom videos")
PAPER_TABLE1 = {
    "base": ("Mochi (base model)", "0.2623±0.04", "0.3237", "0.9888", "2047.37"),
    "direct": ("Direct LoRA fine-tuning", "0.3258±0.05", "0.2966", "0.9945", "2229.08"),
    "lora": ("DreamRelation", "0.4452±0.01", "0.3248", "0.9954", "2079.87"),
}


# ------------------------------------------------------------------------------------------ document blocks

@dataclass(frozen=True)
class Image:
    """A PNG in a report, and its alternative text."""
    path: Path
    alt: str


class Document:
    """Headings, paragraphs, lists, tables (cells: text, an Image or a list of Images) and images, rendered to
    Markdown and to HTML with image paths relative to the report's folder."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", header, rows))

    def img(self, image: Image) -> None:
        self.blocks.append(("img", image))

    # -- Markdown
    def markdown(self, folder: Path) -> str:
        def cell(c) -> str:
            if isinstance(c, Image):
                return f"![{c.alt}]({_rel(c.path, folder)})"
            if isinstance(c, list):
                return " ".join(cell(x) for x in c)
            return str(c).replace("|", "\\|").replace("\n", " ")

        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                lines += [block[1], ""]
            elif kind == "ul":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                header, rows = block[1], block[2]
                lines.append("| " + " | ".join(cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "img":
                lines += [cell(block[1]), ""]
        return "\n".join(lines)

    # -- HTML
    def html(self, folder: Path) -> str:
        def cell(c) -> str:
            if isinstance(c, Image):
                style = f' style="height:{MIN_HEIGHT}px"' if _height(c.path) < MIN_HEIGHT else ""
                return (f'<img src="{_src(c.path, folder)}" alt="{html.escape(c.alt)}" '
                        f'title="{html.escape(c.alt)}"{style}>')
            if isinstance(c, list):
                return "<br>".join(cell(x) for x in c)
            return _inline_md(str(c))

        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_md(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{cell(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                body.append(f"<p>{cell(block[1])}</p>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
                 "vertical-align:top;text-align:left}th{background:#eee}img{max-width:100%;image-rendering:pixelated}"
                 "code{background:#f4f4f4;padding:0 3px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _height(path: Path) -> int:
    try:
        with PILImage.open(path) as image:
            return int(image.height)
    except OSError:
        return MIN_HEIGHT


def _rel(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def _src(path: Path, folder: Path) -> str:
    path = Path(path)
    if path.is_file() and path.stat().st_size <= INLINE_LIMIT:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html.escape(_rel(path, folder))


def _inline_md(text: str) -> str:
    """HTML of text with the Markdown this module writes: **bold** and `code`."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


# ------------------------------------------------------------------------------------------ numbers

def format_metric(key: str, value: dict | None) -> str:
    """'mean ± std' (std left out when undefined) of one metric of a row; '—' when not computed."""
    if not value:
        return "—"
    if key == "fvd":
        return "—" if value.get("value") is None else f"{value['value']:.2f}"
    if value.get("mean") is None:
        return "—"
    if key == "judge_accuracy":
        undetected = value.get("undetected") or 0
        return (f"{value['mean']:.4f} ({round(value['mean'] * value['n'])}/{value['n']}"
                + (f", {undetected} without two subjects" if undetected else "") + ")")
    text = f"{value['mean']:.4f}"
    return text + (f" ± {value['std']:.4f}" if value.get("std") is not None else "")


def metric_cells(row: dict) -> list[str]:
    return [format_metric(key, row.get(key)) for key, _ in COLUMNS]


WORLD_COLUMNS = (("relation_accuracy", "relation accuracy"), ("subject_fidelity", "subject fidelity"),
                 ("appearance_leakage", "appearance leakage"), ("temporal_consistency", "temporal consistency"))


def format_interval(value: dict | None) -> str:
    """'mean [ci_low, ci_high]' of a bootstrap summary; '—' when nothing was scored."""
    if not value or value.get("mean") is None:
        return "—"
    return f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"


def world_cells(row: dict) -> list[str]:
    return [format_interval((row.get("world") or {}).get(key)) for key, _ in WORLD_COLUMNS]


def world_verdict(rows: list[dict]) -> str | None:
    """One sentence on whether the relation LoRAs beat the base model on relation accuracy over all relations (the
    world judge's counts and 95 % intervals), or None without both rows."""
    found = {r["kind"]: (r.get("world") or {}).get("relation_accuracy") for r in rows if r["relation"] == ALL}
    lora, base = found.get("lora"), found.get("base")
    if not lora or not base or lora.get("mean") is None or base.get("mean") is None:
        return None
    counts = (f"videos judged the trained relation: relation LoRAs {round(lora['mean'] * lora['n'])} of {lora['n']}, "
              f"base model {round(base['mean'] * base['n'])} of {base['n']}")
    if lora["ci_low"] > base["ci_high"]:
        return f"Relation learned and carried over to the prompted subjects: {counts} (95 % intervals apart)."
    if lora["mean"] > base["mean"]:
        return f"Above the base model, not yet shown: {counts}; the 95 % intervals overlap."
    return (f"Relation not carried over to the prompted subjects: {counts}. docs/synth.md records where the method "
            f"stands on the synth base; the README gives the recipe that carries relations on it.")


# ------------------------------------------------------------------------------------------ pictures

def exemplar_frames(run_dir: Path, relation: str) -> np.ndarray | None:
    """Keyframes (K, h, w, 3) of the relation's first training clip: the preview stored with its shard sample."""
    try:
        root = training_dataset_dir(relation_config(run_dir, relation))
        shards = load_manifest(root)["relations"][relation]["shards"]
        sample = next(read_shard(root / shards[0]))
    except (ValueError, KeyError, IndexError, StopIteration):
        return None
    return sample.preview


def write_strip(frames_KHWC: np.ndarray, path: Path, height: int) -> Path:
    """Frames side by side, scaled (nearest neighbour) to `height` pixels, as one PNG."""
    tiles = []
    for frame in frames_KHWC:
        image = PILImage.fromarray(np.ascontiguousarray(frame))
        width = max(1, round(image.width * height / image.height))
        tiles.append(np.asarray(image.resize((width, height), PILImage.NEAREST)))
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path


def plot_metric_bars(metrics: dict, path: Path) -> Path | None:
    """One panel per computed metric: each relation (and all) with its LoRA and base bars and std error bars."""
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    rows = metrics["rows"]
    keys = [(k, label) for k, label in COLUMNS
            if any(format_metric(k, r.get(k)) != "—" for r in rows)]
    if not keys:
        return None
    groups = list(dict.fromkeys(r["relation"] for r in rows))
    kinds = [k for k in ("lora", "base") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.4), squeeze=False)
    width = 0.8 / len(kinds)
    for ax, (key, label) in zip(axes[0], keys):
        for j, kind in enumerate(kinds):
            means, errs = [], []
            for g in groups:
                row = next((r for r in rows if r["relation"] == g and r["kind"] == kind), None)
                value = (row or {}).get(key) or {}
                mean = value.get("value") if key == "fvd" else value.get("mean")
                means.append(np.nan if mean is None else mean)
                errs.append(0.0 if key == "fvd" or value.get("std") is None else value["std"])
            x = np.arange(len(groups)) + (j - (len(kinds) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, capsize=3, label=KIND_LABEL[kind],
                   color="tab:red" if kind == "lora" else "tab:gray")
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(label + (" (lower is better)" if key == "fvd" else ""), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_curves(run_dir: Path, relations: list[str], path: Path) -> Path | None:
    """Masked flow-matching loss (moving mean) and relational contrastive loss per relation, from metrics.jsonl."""
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    curves = {r: read_metrics(RelationFolder.of(run_dir, r).metrics) for r in relations}
    curves = {r: rows for r, rows in curves.items() if rows}
    if not curves:
        return None
    fig, (ax_rec, ax_rcl) = plt.subplots(1, 2, figsize=(10, 3.4))
    for relation, rows in curves.items():
        steps = np.array([r["step"] for r in rows])
        rec = np.array([r["loss_rec"] for r in rows], dtype=np.float64)
        window = max(1, len(rows) // 20)
        smooth = np.convolve(rec, np.ones(window) / window, mode="valid")
        ax_rec.plot(steps[window - 1:], smooth, lw=1.2, label=relation)
        rcl = [(r["step"], r["loss_rcl"]) for r in rows if r.get("loss_rcl") is not None]
        if rcl:
            ax_rcl.plot(*zip(*rcl), lw=1, label=relation)
    ax_rec.set(xlabel="step", ylabel="masked flow-matching loss (moving mean)", yscale="log")
    ax_rcl.set(xlabel="step", ylabel="relational contrastive loss")
    ax_rec.legend(fontsize=7)
    if ax_rcl.lines:
        ax_rcl.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ the report

def _training_summary(run_dir: Path, relations: list[str]) -> list[str]:
    out = []
    for name in relations:
        cfg = relation_config(run_dir, name)
        try:
            steps = json.loads(RelationFolder.of(run_dir, name).done.read_text()).get("steps")
        except (OSError, json.JSONDecodeError):
            steps = "?"
        placement = cfg.lora.placement if isinstance(cfg.lora.placement, str) else "custom mapping"
        out.append(f"`{name}`: {steps} steps, data `{cfg.data.source}`, placement `{placement}`, HMT "
                   f"{'on' if cfg.hmt.enabled else 'off'}, mask weight {cfg.loss.mask_weight:g}, RCL weight "
                   f"{cfg.loss.rcl_weight:g}, exported adapters {', '.join(cfg.lora.export_adapters)}")
    return out


def _metric_notes(info: dict) -> list[str]:
    def status(key: str, text: str) -> str:
        entry = info.get(key, {})
        return f"**{text}**: " + (entry.get("description") or "computed" if entry.get("computed")
                                  else entry.get("reason", "not computed"))

    notes = [status("clip", "CLIP-T and temporal consistency")]
    vlm = info.get("vlm", {})
    notes.append("**Relation accuracy (VLM)**: " + (
        f"{vlm['model']} at {vlm['endpoint']}, temperature {vlm['temperature']}, {vlm['repeats']} questions per "
        f"video (the paper's question), mean ± std over repeats" if vlm.get("computed") else vlm.get("reason", "")))
    judge = info.get("judge", {})
    if judge.get("computed"):
        text = ("programmatic judge (`dr_train/eval/judge.py`): the nearest-template classifier among the 26 built-in "
                "synthetic relations, deterministic, no model weights; accuracy = share of videos whose predicted "
                "relation is the one whose prompt made them (chance 1/26); videos where it finds no two subjects "
                f"count as wrong. Judged relations: {', '.join(judge['relations'])}")
        if judge.get("not_judged"):
            text += "; not judged: " + "; ".join(f"{r} ({why})" for r, why in judge["not_judged"].items())
        notes.append("**Judge accuracy**: " + text)
    else:
        notes.append("**Judge accuracy**: " + judge.get("reason", "not computed"))
    fvd = info.get("fvd", {})
    if fvd.get("computed"):
        notes.append(f"**FVD**: {fvd['weights']}; reference: {fvd['reference']}; {fvd['frames']} frames per video"
                     + (f" ({fvd['note']})" if fvd.get("note") else "") + "; FVD from a handful of videos is "
                     "dominated by the small-sample bias of the covariance and is not comparable across set sizes")
    else:
        notes.append("**FVD**: " + fvd.get("reason", "not computed"))
    return notes


def build_report(run_dir: str | Path, metrics_path: str | Path | None = None, out_dir: str | Path | None = None,
                 prompts_shown: int = 3, title: str | None = None) -> dict[str, Path]:
    """Write report.md, report.html and figures/ into `out_dir` (default: the folder of metrics.json, which
    defaults to `<run>/eval/metrics.json`). Returns the paths written."""
    run_dir = Path(run_dir)
    metrics_path = Path(metrics_path) if metrics_path is not None else run_dir / "eval" / METRICS_FILE
    metrics = load_metrics(metrics_path)
    out = Path(out_dir) if out_dir is not None else metrics_path.parent
    figures = out / "figures"
    videos_dir = Path(metrics["videos_dir"])
    index = load_index(videos_dir)
    relations = list(metrics["relations"])
    gen = metrics["generation"]
    rows = metrics["rows"]

    doc = Document(title or f"Evaluation of {run_dir.name}")
    doc.h(2, "What was evaluated")
    model = metrics["base_model"]
    notes = [f"Run: `{run_dir}`; relations: {', '.join(relations)}",
             f"Base model: `{model}`"]
    if model == "tiny":
        notes.append("**Tiny preset**: a randomly initialised 2-block Mochi built from a config, trained for a few "
                     "steps. These numbers show that training, generation, evaluation and this report run end to "
                     "end; they say nothing about the method and are not comparable with the paper's.")
    elif model == "synth":
        notes.append("**Synth base** (docs/synth.md): a small Mochi-architecture model pretrained here on the synth "
                     "world, which never saw a relation; the LoRAs were trained on the relation from `person` "
                     "exemplars, and the prompts ask for it between other kinds. The world's judges score every "
                     "video.")
    notes += [f"Sampler: {metrics['sampler']}, {gen['steps']} steps, CFG {gen['guidance_scale']:g}, "
              f"{gen['num_frames']} frames x {gen['height']} x {gen['width']} at {gen['fps']} fps",
              f"Videos: {metrics['videos'].get('lora', 0)} with relation LoRAs and {metrics['videos'].get('base', 0)} "
              f"with the base model (same prompts and seeds): {len(relations)} relations x "
              f"{_prompt_text(metrics)} x seeds {', '.join(map(str, metrics['seeds']))}",
              "Training: " + "; ".join(_training_summary(run_dir, relations))]
    doc.ul(notes)
    doc.p("Metrics:")
    doc.ul(_metric_notes(metrics["metrics"]))
    doc.p(f"Per-video numbers: `{_rel(metrics_path.parent / VIDEOS_CSV, out)}`; all numbers and settings: "
          f"`{_rel(metrics_path, out)}`. Std is the sample standard deviation over "
          f"videos (over repeats for RelAcc); — means not computed or undefined.")

    if any(r.get("world") for r in rows):
        doc.h(2, "Synth world metrics")
        doc.p("Relations trained on the synth world: the relation judge's top-1 and the kind classifier on every "
              "video (dr_train.eval.world_scores); mean and 95 % bootstrap interval over the videos (prompts x "
              "seeds). Chance relation accuracy is 1/26 = 0.038.")
        head = ["relation", "model", "videos"] + [label for _, label in WORLD_COLUMNS]
        verdict = world_verdict(rows)
        if verdict is not None:
            doc.p(f"**{verdict}**")
        doc.table(head, [[r["relation"], KIND_LABEL[r["kind"]], r["videos"], *world_cells(r)] for r in rows
                         if r.get("world")])

    doc.h(2, "Results (Table 1 style)")
    header = ["model", "videos"] + [label for _, label in COLUMNS]
    overall = [[KIND_LABEL[r["kind"]] + " — all relations", r["videos"], *metric_cells(r)]
               for r in rows if r["relation"] == ALL]
    doc.table(header, overall)
    doc.p("For reference only, " + PAPER_SOURCE + " (no judge there):")
    doc.table(["paper's method", "RelAcc (VLM)", "CLIP-T", "TempCons", "FVD"],
              [list(PAPER_TABLE1[k]) for k in ("base", "direct", "lora")])
    doc.h(3, "Per relation")
    doc.table(["relation", "model", "videos"] + [label for _, label in COLUMNS],
              [[r["relation"], KIND_LABEL[r["kind"]], r["videos"], *metric_cells(r)]
               for r in rows if r["relation"] != ALL])

    doc.h(2, "Plots")
    bars = plot_metric_bars(metrics, figures / "metrics_per_relation.png")
    if bars is not None:
        doc.img(Image(bars, "metrics per relation, mean and std"))
    else:
        doc.p("No metric was computed.")
    losses = plot_loss_curves(run_dir, relations, figures / "loss_curves.png")
    if losses is not None:
        doc.img(Image(losses, "training loss curves"))
    else:
        doc.p("No training metrics.jsonl found.")

    doc.h(2, "Videos")
    doc.p(f"Keyframes (5 evenly spaced frames) of the first {prompts_shown} prompts at seed {metrics['seeds'][0]}; "
          f"mp4s under `{_rel(videos_dir, out)}`.")
    for name in relations:
        doc.h(3, name)
        frames = exemplar_frames(run_dir, name)
        if frames is not None:
            doc.p("Training exemplar:")
            strip = write_strip(frames, figures / f"exemplar_{name}.png", int(frames.shape[1]))
            doc.img(Image(strip, f"{name} training clip"))
        else:
            doc.p("Training exemplar: not found (the run's dataset is not at the path its config names).")
        items = {(i["kind"], i["prompt_index"]): i for i in index["items"]
                 if i["relation"] == name and i["seed"] == metrics["seeds"][0]}
        shown = sorted({p for (_, p) in items})[:prompts_shown]
        table = []
        for p in shown:
            cells = [items[("lora", p)]["prompt"] if ("lora", p) in items else items[("base", p)]["prompt"]]
            for kind in ("lora", "base"):
                item = items.get((kind, p))
                cells.append(Image(videos_dir / item["keyframes"], f"{name} {kind} prompt {p}") if item else "—")
            table.append(cells)
        doc.table(["prompt", "relation LoRA", "base model"], table)

    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.markdown(out))
    page.write_text(doc.html(out))
    return {"markdown": md, "html": page, "figures": figures}


def _prompt_text(metrics: dict) -> str:
    prompts, n = metrics["prompts"], metrics.get("num_prompts")
    if isinstance(prompts, str):
        text = {"eval": "the catalog's evaluation prompts", "train": "the training prompt"}.get(prompts, prompts)
    else:
        text = f"{len(prompts)} given prompts"
    return text + (f" (first {n})" if n else "")
