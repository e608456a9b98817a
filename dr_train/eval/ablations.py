"""The paper's ablations (Tables 2 and 3) and the direct-LoRA baseline as config variants: each variant is trained
into `<out>/<variant>/`, its videos generated and evaluated (`generate_batch`, `evaluate_run`, `build_report`),
and one table collects the overall relation-LoRA row of every variant beside the paper's numbers.

A variant is only config: a file of `configs/ablations/` and/or `lora.placement` presets (their semantics live in
`dr_train/method/triplet.py` and docs/method.md). Variants without a relation or an FFN adapter export the inference
adapters they have (`lora.export_adapters`: ffn alone, relation alone), since the paper's inference uses relation +
FFN.
The `decompose` group adds the triplet without subject LoRAs and then HMT's LoRA selection and mask weight one at a
time, to find where a relation the exported adapters can carry on their own is lost, and the triplet with its subject
LoRAs frozen in relation steps (`hmt.relation_step_subjects`), also trained on still or one-frame clips in their own
steps (`hmt.subject_target`), and the mask weight on the region the subjects sweep (`loss.mask_span`). A finished
variant (`<out>/<variant>/ABLATION.json`) is skipped on a re-run with the same settings (the base model's identity
among them). The base model (no LoRA) is generated and evaluated once into `<out>/base/` for a reference row.

With several training seeds (`train_seeds`) each variant is trained once per seed into `<out>/<variant>/seed-<s>/`.
Where the runs were trained on the synth world, `<out>/results.json` holds {variant: {metric: {mean, ci_low,
ci_high, n}}} for the world metrics (`dr_train.eval.world_scores.METRICS`; the base model as variant `base`),
pooled over relations, training seeds, prompts and sampling seeds, with 95 % bootstrap intervals that resample
whole training runs (relation x seed; the base model: relations); `<out>/results.md` puts them beside the paper's
relation accuracy and `<out>/results.png` plots them; `<out>/per_relation.md` / `.json` count the videos judged
right per relation, from the same per-video rows.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from dr_train.base_identity import base_identity
from dr_train.config import load_config
from dr_train.eval.evaluate import evaluate_run
from dr_train.eval.report import KIND_LABEL, PAPER_SOURCE, WORLD_COLUMNS, build_report, format_interval, format_metric
from dr_train.eval.world_scores import summarise
from dr_train.generate import config_overrides, generate_batch, relation_config
from dr_train.io import atomic_write_text
from dr_train.trainer import train

log = logging.getLogger("dr_train")

ABLATION_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ablations"
DONE_FILE = "ABLATION.json"
BASE_FOLDER = "base"
TABLE_CSV = "ablations.csv"
TABLE_MD = "ablations.md"


@dataclass(frozen=True)
class Variant:
    """One row of the paper's Table 2 or 3 (or the Table 1 direct-LoRA baseline) as config."""
    name: str
    tables: tuple[str, ...]          # "2", "3", "1"
    label: str                       # the paper's row label
    relation_lora: str               # where the relation LoRA goes (Table 3's columns)
    subject_lora: str
    config_file: str | None          # a file in configs/ablations/
    overrides: tuple[str, ...]
    paper: tuple[str, str, str, str]  # the paper's RelAcc, CLIP-T, TempCons, FVD

    def config_overrides(self) -> list[str]:
        """The variant's overrides: its configs/ablations file first, then its own lines."""
        out: list[str] = []
        if self.config_file:
            path = ABLATION_CONFIGS / self.config_file
            if not path.is_file():
                raise ValueError(f"ablation config {path} is missing")
            out += config_overrides(yaml.safe_load(path.read_text()) or {}, str(path))
        return out + list(self.overrides)


_FULL_PAPER = ("0.4452±0.01", "0.3248", "0.9954", "2079.87")
_NOT_IN_PAPER = ("—", "—", "—", "—")
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("full", ("2", "3"), "full (relation LoRA on Q, K)", "Q, K", "V", None, (), _FULL_PAPER),
    Variant("w_o_hmt", ("2",), "w/o hybrid mask training (HMT)", "Q, K", "V", "w_o_hmt.yaml", (),
            ("0.3574±0.02", "0.3244", "0.9938", "2248.52")),
    Variant("w_o_rcl", ("2",), "w/o relational contrastive loss (RCL)", "Q, K", "V", "w_o_rcl.yaml", (),
            ("0.3416±0.03", "0.3185", "0.9953", "2136.95")),
    Variant("w_o_relation", ("2",), "w/o Relation LoRAs", "—", "V", None,
            ("lora.placement=no_relation", "lora.export_adapters=[ffn]"),
            ("0.3626±0.02", "0.3035", "0.9950", "2318.49")),
    Variant("w_o_subject", ("2",), "w/o Subject LoRAs", "Q, K", "—", None, ("lora.placement=no_subject",),
            ("0.3769±0.04", "0.3147", "0.9949", "2408.59")),
    Variant("w_o_ffn", ("2",), "w/o FFN LoRAs", "Q, K", "V", None,
            ("lora.placement=no_ffn", "lora.export_adapters=[relation]"),
            ("0.4021±0.03", "0.3241", "0.9914", "2369.98")),
    Variant("relation_v", ("3",), "Relation LoRA on V", "V", "Q, K", None, ("lora.placement=relation_v",),
            ("0.3444±0.02", "0.3225", "0.9953", "2233.48")),
    Variant("relation_q", ("3",), "Relation LoRA on Q", "Q", "K, V", None, ("lora.placement=relation_q",),
            ("0.3921±0.03", "0.3301", "0.9951", "2284.65")),
    Variant("relation_kv", ("3",), "Relation LoRA on K, V", "K, V", "Q", None, ("lora.placement=relation_kv",),
            ("0.3937±0.04", "0.3196", "0.9954", "2180.27")),
    Variant("direct", ("1",), "Direct LoRA fine-tuning (Q, K, V, FFN)", "Q, K, V (whole)", "—",
            "direct_lora.yaml", (), ("0.3258±0.05", "0.2966", "0.9945", "2229.08")),
    Variant("hmt_forward_all", ("hmt",), "every adapter in every step's forward pass (hmt.forward: all)", "Q, K",
            "V", None, ("hmt.forward=all",), _NOT_IN_PAPER),
    Variant("export_all", ("export",), "full, every adapter kept at inference (relation, subjects, FFN)", "Q, K",
            "V", None, ("lora.export_adapters=[relation,subject1,subject2,ffn]",), _NOT_IN_PAPER),
    # Where the triplet loses a relation that its exported adapters (relation + FFN) can carry on their own: w/o
    # subject LoRAs, then HMT's two parts (the LoRA selection, the mask weight) put back one at a time.
    Variant("w_o_subject_hmt", ("decompose",), "w/o Subject LoRAs and w/o HMT (every step, mask weight 0)", "Q, K",
            "—", "w_o_hmt.yaml", ("lora.placement=no_subject",), _NOT_IN_PAPER),
    Variant("w_o_subject_selection", ("decompose",), "w/o Subject LoRAs, HMT's mask weight without its LoRA selection",
            "Q, K", "—", None, ("lora.placement=no_subject", "hmt.enabled=false"), _NOT_IN_PAPER),
    Variant("w_o_subject_mask", ("decompose",), "w/o Subject LoRAs, HMT's LoRA selection without its mask weight",
            "Q, K", "—", None, ("lora.placement=no_subject", "loss.mask_weight=0.0"), _NOT_IN_PAPER),
    # The triplet whole, its subject LoRAs running in relation steps but not updated there (neither reading's).
    Variant("frozen_subjects", ("decompose",), "full, subject LoRAs frozen in relation steps", "Q, K", "V", None,
            ("hmt.relation_step_subjects=frozen",), _NOT_IN_PAPER),
    Variant("frozen_subjects_w_o_mask", ("decompose",), "full, subject LoRAs frozen in relation steps, mask weight 0",
            "Q, K", "V", None, ("hmt.relation_step_subjects=frozen", "loss.mask_weight=0.0"), _NOT_IN_PAPER),
    # The same, the subject LoRAs trained on still clips in their own steps, so that they hold no motion.
    Variant("still_subjects", ("decompose",), "full, subject LoRAs frozen in relation steps, still in their own",
            "Q, K", "V", None, ("hmt.relation_step_subjects=frozen", "hmt.subject_target=still"), _NOT_IN_PAPER),
    Variant("still_subjects_w_o_mask", ("decompose",),
            "full, subject LoRAs frozen in relation steps, still in their own, mask weight 0", "Q, K", "V", None,
            ("hmt.relation_step_subjects=frozen", "hmt.subject_target=still", "loss.mask_weight=0.0"), _NOT_IN_PAPER),
    # The same, the subject LoRAs trained on one frame of the clip as a one-frame clip (image steps).
    Variant("frame_subjects", ("decompose",), "full, subject LoRAs frozen in relation steps, one frame in their own",
            "Q, K", "V", None, ("hmt.relation_step_subjects=frozen", "hmt.subject_target=frame"), _NOT_IN_PAPER),
    # lambda_m on where the subjects go in the clip (every frame's mask the clip's max) rather than where they are.
    Variant("swept", ("decompose",), "full, the mask weight on the region the subjects sweep", "Q, K", "V", None,
            ("loss.mask_span=clip",), _NOT_IN_PAPER),
    Variant("w_o_subject_swept", ("decompose",), "w/o Subject LoRAs, HMT with the mask weight on the swept region",
            "Q, K", "—", None, ("lora.placement=no_subject", "loss.mask_span=clip"), _NOT_IN_PAPER),
    Variant("still_subjects_swept", ("decompose",),
            "full, subject LoRAs frozen in relation steps, still in their own, mask weight on the swept region",
            "Q, K", "V", None, ("hmt.relation_step_subjects=frozen", "hmt.subject_target=still",
                                "loss.mask_span=clip"), _NOT_IN_PAPER),
    Variant("frame_subjects_swept", ("decompose",),
            "full, subject LoRAs frozen in relation steps, one frame in their own, mask weight on the swept region",
            "Q, K", "V", None, ("hmt.relation_step_subjects=frozen", "hmt.subject_target=frame",
                                "loss.mask_span=clip"), _NOT_IN_PAPER),
    # The subject LoRAs out of relation steps (learning only in their own), the mask weight on the swept region.
    Variant("excluded_subjects_swept", ("decompose",),
            "full, subject LoRAs excluded from relation steps, mask weight on the swept region", "Q, K", "V", None,
            ("hmt.relation_step_subjects=excluded", "loss.mask_span=clip"), _NOT_IN_PAPER),
)}
GROUPS = {"all": [n for n, v in VARIANTS.items() if "decompose" not in v.tables], "table1": ["full", "direct"],
          "table2": [n for n, v in VARIANTS.items() if "2" in v.tables],
          "table3": [n for n, v in VARIANTS.items() if "3" in v.tables],
          "hmt": ["full", "hmt_forward_all"], "export": ["full", "export_all"],
          "decompose": ["full", "w_o_subject", "w_o_hmt", "direct"]
          + [n for n, v in VARIANTS.items() if "decompose" in v.tables]}
PAPER_BASE = ("Mochi (base model)", "0.2623±0.04", "0.3237", "0.9888", "2047.37")
OURS = (("vlm_relation_accuracy", "RelAcc (VLM)"), ("judge_accuracy", "Judge acc."), ("clip_t", "CLIP-T"),
        ("temporal_consistency", "TempCons"), ("fvd", "FVD"))
PAPER_COLUMNS = ("paper RelAcc", "paper CLIP-T", "paper TempCons", "paper FVD")


def select_variants(spec: str | Sequence[str]) -> list[str]:
    """'all', 'table2', 'table3', or a comma list / list of variant names -> names in the table's order."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    chosen: list[str] = []
    for name in (n for n in names if n):
        if name in GROUPS:
            chosen += GROUPS[name]
        elif name in VARIANTS:
            chosen.append(name)
        else:
            raise ValueError(f"unknown ablation variant {name!r}; variants: {', '.join(VARIANTS)} (or "
                             f"{', '.join(GROUPS)})")
    if not chosen:
        raise ValueError("no ablation variants selected")
    return [n for n in VARIANTS if n in set(chosen)]


def variant_config(variant: str, relations: Sequence[str], out_dir: Path, steps: int | None = None,
                   config: str | Path | None = None, overrides: Sequence[str] = ()):
    """The training Config of a variant: the user's config file, the variant's overrides, the user's overrides,
    then relations, output folder and (when given) the step count."""
    items = VARIANTS[variant].config_overrides() + list(overrides)
    items += [f"train.relations={json.dumps(list(relations))}", f"train.output_dir={json.dumps(str(out_dir))}"]
    if steps is not None:
        items.append(f"train.max_steps={int(steps)}")
    return load_config(config, items)


def _settings(variant: str, relations, steps, config, overrides, generation: dict, evaluation: dict,
              base: str) -> dict:
    """What a variant's row depends on (a finished variant with other settings is not reused); `base` is the base
    model's identity (dr_train.base_identity: a retrained base keeps its preset's name)."""
    ev = {k: (v.describe() if hasattr(v, "describe") else str(v) if isinstance(v, Path) else v)
          for k, v in evaluation.items()}
    return json.loads(json.dumps({"variant": variant, "base": base, "relations": list(relations), "steps": steps,
                                  "config": str(config) if config else None, "overrides": list(overrides),
                                  "variant_overrides": VARIANTS[variant].config_overrides()
                                  if variant in VARIANTS else [],
                                  "generation": generation, "evaluation": ev}, default=str))


def _same_settings(recorded, settings: dict) -> bool:
    """A record written before settings named the base compares without it."""
    if isinstance(recorded, dict) and "base" not in recorded:
        settings = {k: v for k, v in settings.items() if k != "base"}
    return recorded == settings


def variant_folder(out_dir: Path, variant: str, seed: int | None = None) -> Path:
    return Path(out_dir) / variant / (f"seed-{seed}" if seed is not None else "")


def run_variant(variant: str, out_dir: Path, relations: Sequence[str], steps: int | None, config, overrides,
                generation: dict, evaluation: dict, seed: int | None = None) -> dict:
    """Train, generate, evaluate and report one variant into `out_dir/<variant>` (`.../seed-<seed>` with a training
    seed); returns its finished record."""
    folder = variant_folder(out_dir, variant, seed)
    if seed is not None:
        overrides = [*overrides, f"train.seed={int(seed)}"]
    cfg = variant_config(variant, relations, folder, steps, config, overrides)
    settings = _settings(variant, relations, steps, config, overrides, generation, evaluation,
                         base_identity(cfg.model.preset))
    done = folder / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        if not _same_settings(record.get("settings"), settings):
            raise ValueError(f"{done} was made with other settings than this call's (base model, relations, steps, "
                             f"config, generation or evaluation); choose another output folder or delete {folder}")
        log.info("ablation %s: finished before (%s), skipping", variant, done)
        return record | {"status": "skipped (finished before)"}
    train(cfg)
    generate_batch(folder, relations, include_base=False, **generation)
    metrics = evaluate_run(folder, **_evaluation(evaluation, out_dir))
    build_report(folder, title=f"Ablation {variant}: {VARIANTS[variant].label}")
    rows = {r["kind"]: r for r in metrics["rows"] if r["relation"] == "all"}
    record = {"variant": variant, "settings": settings, "rows": rows, "metrics": str(folder / "eval" / "metrics.json"),
              "steps": cfg.train.max_steps, "seed": cfg.train.seed, "status": "finished"}
    _write_record(done, record)
    return record


def run_base(out_dir: Path, run_dir: Path, relations: Sequence[str], generation: dict, evaluation: dict) -> dict:
    """The base model (no LoRA) on the same prompts and seeds, evaluated once into `<out>/base/` for the table's
    reference row (`run_dir`: any variant's run, for its relations' prompts and training clips). Redone when the
    generation or evaluation settings changed."""
    folder = out_dir / BASE_FOLDER
    settings = _settings("base", relations, None, None, (), generation, evaluation,
                         base_identity(relation_config(run_dir, relations[0]).model.preset))
    done = folder / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        if _same_settings(record.get("settings"), settings):
            return record | {"status": "skipped (finished before)"}
    generate_batch(run_dir, relations, include_lora=False, include_base=True, out_dir=folder / "videos",
                   **generation)
    metrics = evaluate_run(run_dir, folder / "videos", out_dir=folder / "eval", **_evaluation(evaluation, out_dir))
    rows = {r["kind"]: r for r in metrics["rows"] if r["relation"] == "all"}
    record = {"variant": "base", "settings": settings, "rows": rows,
              "metrics": str(folder / "eval" / "metrics.json"), "status": "finished"}
    _write_record(done, record)
    return record


def _evaluation(evaluation: dict, out_dir: Path) -> dict:
    """evaluate_run's arguments, with the FVD reference statistics cached once for all variants."""
    return {**evaluation, "fvd_cache": evaluation.get("fvd_cache") or out_dir / "fvd_cache"}


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))


def run_ablations(out_dir: str | Path, relations: Sequence[str], variants: str | Sequence[str] = "all",
                  steps: int | None = None, config: str | Path | None = None, overrides: Sequence[str] = (),
                  generation: dict | None = None, evaluation: dict | None = None, include_base: bool = True,
                  train_seeds: Sequence[int] | None = None, variant_steps: dict[str, int] | None = None) -> dict:
    """Run the chosen variants one after another and write `<out>/ablations.csv` and `<out>/ablations.md` (and, for
    runs on the synth world, `<out>/results.json`, `results.md`, `results.png`).

    generation: keyword arguments of `generate_batch` (prompts, num_prompts, seeds, steps, frames, ...);
    evaluation: keyword arguments of `evaluate_run` (clip_path, vlm, fvd_reference, ...); the FVD reference
    statistics are cached once in `<out>/fvd_cache`. include_base: also generate and evaluate the base model once
    (`<out>/base/`) for a reference row. train_seeds: train every variant once per seed (`train.seed`).
    variant_steps: {variant: training steps} for variants that take other steps than `steps` (the paper trains
    DreamRelation 2400 iterations and direct LoRA 1000). Returns
    {"records": {variant: record of its first seed}, "runs": {variant: [record per seed]}, "base": record or None,
    "csv": path, "markdown": path, "results": path or None}.
    """
    out = Path(out_dir)
    names = select_variants(variants)
    steps_of = _steps_per_variant(names, steps, variant_steps or {})
    relations = list(dict.fromkeys(relations))
    if not relations:
        raise ValueError("no relations given for the ablations")
    generation = dict(generation or {})
    evaluation = dict(evaluation or {})
    for key in ("run_dir", "relations", "include_base", "include_lora", "out_dir"):
        if key in generation:
            raise ValueError(f"generation option {key!r} is set by the ablation runner")
    for key in ("run_dir", "videos_dir", "out_dir"):
        if key in evaluation:
            raise ValueError(f"evaluation option {key!r} is set by the ablation runner")
    seeds = [None] if not train_seeds else [int(x) for x in dict.fromkeys(train_seeds)]
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for position, name in enumerate(names):
        for seed in seeds:
            log.info("ablation %d/%d: %s (%s)%s", position + 1, len(names), name, VARIANTS[name].label,
                     "" if seed is None else f", training seed {seed}")
            runs.setdefault(name, []).append(run_variant(name, out, relations, steps_of[name], config, overrides,
                                                         generation, evaluation, seed))
    records = {name: rs[0] for name, rs in runs.items()}
    base = run_base(out, variant_folder(out, names[0], seeds[0]), relations, generation, evaluation) \
        if include_base else None
    csv_path, md_path = write_table(out, records, base)
    results = write_results(out, runs, base)
    return {"records": records, "runs": runs, "base": base, "csv": csv_path, "markdown": md_path, "results": results}


def _steps_per_variant(names: Sequence[str], steps: int | None, variant_steps: dict[str, int]) -> dict:
    """{variant: its training steps (None: the config's)}; `variant_steps` names only selected variants."""
    for name, n in variant_steps.items():
        if name not in names:
            raise ValueError(f"variant steps: {name!r} is not among the selected variants ({', '.join(names)})")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"variant steps: {name}={n!r} must be a positive integer")
    return {name: variant_steps.get(name, steps) for name in names}


# ------------------------------------------------------------------------------------------ the table

def table_rows(records: dict[str, dict], base_record: dict | None = None) -> list[dict]:
    """One row per variant (and one for the base model, if evaluated): our overall numbers and the paper's."""
    rows = []
    base = (base_record or {}).get("rows", {}).get("base")
    if base is not None:
        rows.append({"variant": "base", "paper_tables": "1", "label": KIND_LABEL["base"], "relation_lora": "—",
                     "subject_lora": "—", "videos": base["videos"],
                     **{label: format_metric(key, base.get(key)) for key, label in OURS},
                     **dict(zip(PAPER_COLUMNS, PAPER_BASE[1:]))})
    for name, record in records.items():
        v, ours = VARIANTS[name], record["rows"]["lora"]
        rows.append({"variant": name, "paper_tables": ",".join(v.tables), "label": v.label,
                     "relation_lora": v.relation_lora, "subject_lora": v.subject_lora, "videos": ours["videos"],
                     **{label: format_metric(key, ours.get(key)) for key, label in OURS},
                     **dict(zip(PAPER_COLUMNS, v.paper))})
    return rows


def write_table(out: Path, records: dict[str, dict], base: dict | None = None) -> tuple[Path, Path]:
    """ablations.csv (every row) and ablations.md (Table 2, Table 3 and baseline sections, paper's numbers beside)."""
    rows = table_rows(records, base)
    columns = ["variant", "paper_tables", "label", "relation_lora", "subject_lora", "videos",
               *[label for _, label in OURS], *PAPER_COLUMNS]
    csv_path, md_path = out / TABLE_CSV, out / TABLE_MD
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    steps = sorted({str(r.get("steps")) for r in records.values()})
    lines = ["# Ablations", "",
             f"Our numbers: overall relation-LoRA row of each variant's `eval/metrics.json` (mean ± std over videos; "
             f"training steps: {', '.join(steps)}); each variant's report is `<variant>/eval/report.html`. "
             f"Columns marked **paper** are {PAPER_SOURCE}: reference only, not produced here.", ""]
    sections = [("Table 2: components", "2", ["variant", "label"]),
                ("Table 3: where the relation LoRA goes", "3", ["variant", "relation_lora", "subject_lora"]),
                ("Baselines (Table 1)", "1", ["variant", "label"]),
                ("Which adapters run in a step (hmt.forward)", "hmt", ["variant", "label"]),
                ("Which adapters the inference LoRA keeps (lora.export_adapters)", "export", ["variant", "label"]),
                ("Without subject LoRAs, HMT's parts one at a time", "decompose", ["variant", "label"])]
    for title, table, keys in sections:
        chosen = [r for r in rows if table in r["paper_tables"].split(",")]
        if not chosen:
            continue
        head = keys + ["videos"] + [label for _, label in OURS] + [f"**{c}**" for c in PAPER_COLUMNS]
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys + ["videos"] + [label for _, label in OURS]
                                    + list(PAPER_COLUMNS)) + " |" for r in chosen]
        lines.append("")
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


# ------------------------------------------------------------------------------------------ synth world results

def _videos(record: dict) -> list[dict]:
    """The per-video records of a finished run (its eval/videos.jsonl)."""
    path = Path(record["metrics"]).parent / "videos.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _judged_videos(runs: dict[str, list[dict]], base: dict | None) -> dict[str, list[dict]]:
    """{variant: its judged videos (world metrics present)}, each tagged with its bootstrap cluster: a training
    run (relation x seed) for a LoRA variant, a relation for the base model (variant `base`)."""
    out = {}
    if base is not None:
        videos = [v | {"cluster": v["relation"]} for v in _videos(base)
                  if v["kind"] == "base" and "subject_fidelity" in v]
        if videos:
            out["base"] = videos
    for name, records in runs.items():
        videos = [v | {"cluster": f"{v['relation']}/seed-{r.get('seed')}"} for r in records for v in _videos(r)
                  if v["kind"] == "lora" and "subject_fidelity" in v]
        if videos:
            out[name] = videos
    return out


def world_results(judged: dict[str, list[dict]]) -> dict[str, dict]:
    """{variant: {metric: {mean, ci_low, ci_high, n}}} over the judged videos of each variant (`_judged_videos`),
    resampling their clusters. Empty without world metrics."""
    return {name: summarise(videos, "cluster") for name, videos in judged.items()}


def per_relation_counts(judged: dict[str, list[dict]]) -> dict[str, dict[str, list[int]]]:
    """{variant: {relation: [videos judged the trained relation, videos judged]}} over the same judged videos as
    `world_results` (videos the judge could not score are left out of both counts)."""
    out = {}
    for name, videos in judged.items():
        counts: dict[str, list[int]] = {}
        for v in videos:
            if v.get("relation_accuracy") is None:
                continue
            c = counts.setdefault(v["relation"], [0, 0])
            c[0] += int(v["relation_accuracy"] == 1.0)
            c[1] += 1
        out[name] = dict(sorted(counts.items()))
    return out


def write_per_relation(out: Path, counts: dict[str, dict[str, list[int]]]) -> Path:
    """per_relation.json ({variant: {relation: [right, videos]}}) and per_relation.md (one row per variant)."""
    _write_record(out / "per_relation.json", counts)
    relations = sorted({r for c in counts.values() for r in c})
    lines = ["# Videos judged the trained relation, per relation", "",
             "Each cell: videos the relation judge reads as the trained relation / videos judged (evaluation "
             "prompts x sampling seeds x training seeds; the base model: prompts x sampling seeds).", "",
             "| variant | " + " | ".join(relations) + " |", "|" + "---|" * (len(relations) + 1)]
    for name, c in counts.items():
        cells = [f"{c[r][0]}/{c[r][1]}" if r in c else "—" for r in relations]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path = out / "per_relation.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_results(out: Path, runs: dict[str, list[dict]], base: dict | None) -> Path | None:
    """results.json, results.md (beside the paper's relation accuracy), results.png and the per-relation counts
    (per_relation.json / .md), when the runs were judged on the synth world; None otherwise."""
    judged = _judged_videos(runs, base)         # every run's videos.jsonl, read once
    results = world_results(judged)
    if not results:
        return None
    path = out / "results.json"
    _write_record(path, results)
    write_per_relation(out, per_relation_counts(judged))
    seeds = sorted({str(r.get("seed")) for rs in runs.values() for r in rs})
    relations = sorted({rel for rs in runs.values() for r in rs for rel in r["settings"]["relations"]})
    paper = {name: v.paper[0] for name, v in VARIANTS.items()} | {"base": PAPER_BASE[1]}
    head = ["variant", "what", "steps"] + [label for _, label in WORLD_COLUMNS] + ["**paper RelAcc (VLM)**"]
    steps = {name: "/".join(sorted({str(r.get("steps")) for r in rs})) for name, rs in runs.items()}
    lines = ["# Ablations on the synth world", "",
             f"{len(relations)} relations ({', '.join(relations)}) x training seeds {', '.join(seeds)}; per variant "
             "the mean over every LoRA video (evaluation prompts x sampling seeds) and its 95 % bootstrap interval "
             "resampling training runs (relation x seed; base model: relations). Relation accuracy is the judge's "
             "top-1 over 26 relations (chance 0.038). The paper's column is its VLM yes-rate on Mochi-1 and NTU: "
             "another metric on another model, for orientation only.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, metrics in results.items():
        label = KIND_LABEL["base"] if name == "base" else VARIANTS[name].label
        cells = [name, label, steps.get(name, "—")] + [format_interval(metrics.get(k)) for k, _ in WORLD_COLUMNS]
        lines.append("| " + " | ".join(cells + [paper.get(name, "—")]) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(results, out / "results.png")
    return path


def plot_results(results: dict[str, dict], path: Path) -> Path:
    import matplotlib  # deferred: matplotlib is a heavy import, needed only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is a heavy import, needed only here

    names = list(results)
    fig, axes = plt.subplots(1, len(WORLD_COLUMNS), figsize=(4 * len(WORLD_COLUMNS), 0.35 * len(names) + 1.6),
                             sharey=True)
    for ax, (key, label) in zip(axes, WORLD_COLUMNS):
        stats = [results[n].get(key) or {} for n in names]
        mean = np.array([s.get("mean") if s.get("mean") is not None else np.nan for s in stats])
        low = np.array([s.get("ci_low") if s.get("ci_low") is not None else np.nan for s in stats])
        high = np.array([s.get("ci_high") if s.get("ci_high") is not None else np.nan for s in stats])
        y = np.arange(len(names))
        ax.barh(y, mean, color=["tab:gray" if n == "base" else "tab:blue" for n in names], alpha=0.7)
        ax.errorbar(mean, y, xerr=[mean - low, high - mean], fmt="none", color="black", capsize=2, lw=1)
        ax.set(title=label, xlim=(0, 1) if key != "temporal_consistency" else None)
        ax.set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
