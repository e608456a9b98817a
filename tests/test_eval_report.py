"""The evaluation report end to end on the tiny preset: train two relations a few steps, batch-generate their
evaluation videos and the base model's, evaluate them (tiny random CLIP, real I3D weights for FVD, the synthetic
judge, a fake VLM) and build report.md / report.html."""
import csv
import importlib.util
import json
import math
import re

import pytest

from conftest import REPO, small_config
from dr_train.eval.evaluate import evaluate_run, load_metrics
from dr_train.eval.report import build_report
from dr_train.generate import generate_batch
from dr_train.trainer import train
from test_eval_clip import clip_dir  # noqa: F401  (fixture: a tiny random CLIP saved to disk)

RELATIONS = ["handshaking", "high_five"]


class FakeVLM:
    """Answers like a VLM client (no network): yes for the first repeat, no after."""
    image_format = "png"

    def __init__(self):
        self.questions = []

    def ask(self, images, question):
        self.questions.append((len(images), question))
        return "Yes." if sum(q == question for _, q in self.questions) % 2 else "No."

    def describe(self):
        return {"model": "fake-vlm", "temperature": 0.7, "endpoint": "http://127.0.0.1/v1/chat/completions",
                "max_tokens": 16, "image_format": "png"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, clip_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("report")
    cfg = small_config(root, **{"train.relations": json.dumps(RELATIONS), "train.max_steps": 4})
    train(cfg)
    run = root / "runs"
    index = generate_batch(run, num_prompts=2, seeds=[0], steps=2, progress=False)   # training clip size: 13x64x64
    vlm = FakeVLM()
    metrics = evaluate_run(run, clip_path=clip_dir, clip_label="tiny random test model", vlm=vlm, vlm_repeats=2,
                           progress=False)
    paths = build_report(run)
    return {"run": run, "index": index, "metrics": metrics, "paths": paths, "vlm": vlm}


def test_generation_used_the_training_clip_size_and_the_paper_sampler_defaults(evaluated):
    settings = evaluated["index"]["settings"]
    assert (settings["num_frames"], settings["height"], settings["width"]) == (13, 64, 64)
    assert settings["guidance_scale"] == 6.0 and evaluated["index"]["videos"] == 8


def test_metrics_rows_are_complete_and_finite(evaluated):
    metrics = load_metrics(evaluated["run"] / "eval" / "metrics.json")
    assert metrics["videos"] == {"lora": 4, "base": 4}
    info = metrics["metrics"]
    assert info["clip"]["computed"] and "tiny random test model" in info["clip"]["description"]
    assert "not the paper's ViT-B/32" in info["clip"]["description"]
    assert info["judge"]["computed"] and info["judge"]["relations"] == RELATIONS
    assert info["fvd"]["computed"] and info["fvd"]["frames"] == 13 and info["fvd"]["reference_videos"] == 12
    assert info["vlm"]["computed"] and info["vlm"]["repeats"] == 2
    keys = {(r["relation"], r["kind"]) for r in metrics["rows"]}
    assert keys == {(rel, kind) for rel in RELATIONS + ["all"] for kind in ("lora", "base")}
    for row in metrics["rows"]:
        for key in ("clip_t", "temporal_consistency", "judge_accuracy", "vlm_relation_accuracy"):
            assert math.isfinite(row[key]["mean"]), (row, key)
        assert math.isfinite(row["fvd"]["value"]) and row["fvd"]["value"] >= 0
        assert row["vlm_relation_accuracy"]["mean"] == 0.5 and row["vlm_relation_accuracy"]["std"] > 0
    assert len(evaluated["vlm"].questions) == 8 * 2
    from dr_train.catalog import load_catalog
    from dr_train.eval.vlm import catalog_phrase
    phrases = [catalog_phrase(load_catalog()[r]) for r in RELATIONS]
    assert all(n == 5 and any(p in q for p in phrases) for n, q in evaluated["vlm"].questions)
    with (evaluated["run"] / "eval" / "videos.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(math.isfinite(float(r["clip_t"])) for r in rows)
    records = [json.loads(l) for l in (evaluated["run"] / "eval" / "videos.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["vlm"]["answers"][0] == "Yes." for r in records)


def test_report_has_the_table_pictures_and_settings(evaluated):
    md_path, html_path = evaluated["paths"]["markdown"], evaluated["paths"]["html"]
    md, page = md_path.read_text(), html_path.read_text()
    header = "| model | videos | RelAcc (VLM) | Judge acc. | CLIP-T | TempCons | FVD |"
    assert header in md
    for label in ("relation LoRA — all relations", "base model (no LoRA) — all relations"):
        line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", line)]
        assert len(numbers) >= 5 and all(math.isfinite(x) for x in numbers)
    for relation in RELATIONS:
        assert f"| {relation} | relation LoRA | 2 |" in md and f"| {relation} | base model (no LoRA) | 2 |" in md
        assert f"### {relation}" in md and f"figures/exemplar_{relation}.png" in md
    assert "0.4452±0.01" in md and "For reference only, the paper" in md             # the paper's numbers, labelled
    assert "**Tiny preset**" in md and "2 steps, CFG 6, 13 frames x 64 x 64 at 30 fps" in md
    assert "4 with relation LoRAs and 4 with the base model" in md
    assert "tiny random test model" in md and "I3D Kinetics-400" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) >= 2 + 2 + 2 * 2 * 2                # plots, exemplars, LoRA + base grids of 2 prompts
    for rel in images:
        assert (md_path.parent / rel).is_file(), rel
    assert page.count("<img") == len(images) and page.count('src="data:image/png;base64,') == len(images)
    assert "<table>" in page and "relation LoRA — all relations" in page


def test_cli_evaluates_existing_videos_and_says_what_was_not_computed(evaluated, tmp_path):
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval"
    assert module.main([str(evaluated["run"]), "--no-generate", "--no-fvd", "--no-judge", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "not computed: no CLIP weights given" in md and "not computed: no VLM endpoint given" in md
    assert "**FVD**: not computed: switched off" in md
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / rel).is_file(), rel
    assert module.main([str(evaluated["run"] / "nothing"), "--no-generate"]) == 2


def test_the_verdict_says_whether_the_loras_beat_the_base_model_and_by_what_counts():
    from dr_train.eval.report import world_verdict

    def rows(lora, base):
        return [{"relation": "all", "kind": kind, "world": {"relation_accuracy": {"mean": m, "ci_low": lo,
                                                                                     "ci_high": hi, "n": 16}}}
                for kind, (m, lo, hi) in (("lora", lora), ("base", base))] + \
               [{"relation": "hugging", "kind": "lora", "world": {"relation_accuracy": {"mean": 1.0, "ci_low": 1.0,
                                                                                       "ci_high": 1.0, "n": 8}}}]

    apart = world_verdict(rows((0.75, 0.5, 0.9375), (0.0625, 0.0, 0.1875)))
    assert apart.startswith("Relation learned and carried over")
    assert "relation LoRAs 12 of 16, base model 1 of 16" in apart
    overlap = world_verdict(rows((0.25, 0.0625, 0.4375), (0.0625, 0.0, 0.1875)))
    assert overlap.startswith("Above the base model, not yet shown") and "4 of 16" in overlap
    below = world_verdict(rows((0.0, 0.0, 0.0), (0.0625, 0.0, 0.1875)))
    assert below.startswith("Relation not carried over") and "relation LoRAs 0 of 16, base model 1 of 16" in below
    assert world_verdict(rows((0.5, 0.2, 0.8), (0.1, 0.0, 0.2))[:1]) is None            # no base row: nothing said
