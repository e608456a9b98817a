"""The ablation runner (dr_train/eval/ablations.py): variants as config, trained, generated, evaluated and put in one
table beside the paper's numbers; finished variants are skipped."""
import csv
import json

import pytest

from conftest import REPO, SYNTHETIC_CACHE
from dr_train.eval.ablations import GROUPS, VARIANTS, run_ablations, select_variants, variant_config
from dr_train.lora import resolve_placement

# the synthetic data settings of conftest.small_config, so the session's cached dataset is reused
TRAIN = ["model.preset=tiny", "data.videos_per_relation=6", f"data.cache_dir={SYNTHETIC_CACHE}", "optim.warmup_steps=2",
         "train.checkpoint_every=6"]
GENERATION = {"num_prompts": 2, "seeds": [0], "steps": 2, "height": 32, "width": 48, "progress": False}
EVALUATION = {"progress": False}


def test_every_variant_is_a_valid_config_with_the_papers_semantics(tmp_path):
    for name in VARIANTS:
        cfg = variant_config(name, ["handshaking"], tmp_path / name, steps=7)
        assert cfg.train.max_steps == 7 and cfg.train.relations == ["handshaking"]
        placement = resolve_placement(cfg.lora.placement)
        assert set(cfg.lora.export_adapters) <= set(placement), name    # exports only adapters it has
    cfg = {n: variant_config(n, ["handshaking"], tmp_path / n) for n in ("w_o_hmt", "w_o_rcl", "direct", "full")}
    assert not cfg["w_o_hmt"].hmt.enabled and cfg["w_o_rcl"].loss.rcl_weight == 0 and cfg["full"].hmt.enabled
    assert cfg["direct"].lora.placement == "direct" and cfg["direct"].train.max_steps == 1000   # its config file
    assert variant_config("relation_kv", ["a"], tmp_path).lora.placement == "relation_kv"
    assert select_variants("table3") == ["full", "relation_v", "relation_q", "relation_kv"]
    assert select_variants("w_o_rcl,full") == ["full", "w_o_rcl"] and len(GROUPS["all"]) == 12
    assert select_variants("hmt") == ["full", "hmt_forward_all"]
    assert variant_config("hmt_forward_all", ["a"], tmp_path).hmt.forward == "all"
    assert select_variants("export") == ["full", "export_all"]
    added = ["w_o_subject_hmt", "w_o_subject_selection", "w_o_subject_mask", "frozen_subjects",
             "frozen_subjects_w_o_mask", "still_subjects", "still_subjects_w_o_mask", "frame_subjects",
             "swept", "w_o_subject_swept", "still_subjects_swept", "frame_subjects_swept", "excluded_subjects_swept"]
    assert select_variants("decompose") == ["full", "w_o_hmt", "w_o_subject", "direct", *added]
    assert not set(added) & set(GROUPS["all"])
    parts = {n: variant_config(n, ["a"], tmp_path) for n in added}
    assert {n: (c.lora.placement, c.hmt.enabled, c.loss.mask_weight > 0, c.loss.rcl_weight > 0)
            for n, c in parts.items()} == {"w_o_subject_hmt": ("no_subject", False, False, True),
                                          "w_o_subject_selection": ("no_subject", False, True, True),
                                          "w_o_subject_mask": ("no_subject", True, False, True),
                                          "frozen_subjects": ("paper", True, True, True),
                                          "frozen_subjects_w_o_mask": ("paper", True, False, True),
                                          "still_subjects": ("paper", True, True, True),
                                          "still_subjects_w_o_mask": ("paper", True, False, True),
                                          "frame_subjects": ("paper", True, True, True),
                                          "swept": ("paper", True, True, True),
                                          "w_o_subject_swept": ("no_subject", True, True, True),
                                          "still_subjects_swept": ("paper", True, True, True),
                                          "frame_subjects_swept": ("paper", True, True, True),
                                          "excluded_subjects_swept": ("paper", True, True, True)}
    assert {parts[n].hmt.relation_step_subjects for n in added} == {"train", "frozen", "excluded"}
    assert [n for n in added if parts[n].hmt.subject_target == "still"] == ["still_subjects",
                                                                            "still_subjects_w_o_mask",
                                                                            "still_subjects_swept"]
    assert [n for n in added if parts[n].hmt.subject_target == "frame"] == ["frame_subjects",
                                                                            "frame_subjects_swept"]
    assert [n for n in added if parts[n].loss.mask_span == "clip"] == ["swept", "w_o_subject_swept",
                                                                       "still_subjects_swept", "frame_subjects_swept",
                                                                       "excluded_subjects_swept"]
    assert all(parts[n].hmt.relation_step_subjects == "frozen" for n in added if n.startswith(("still", "frame")))
    kept = variant_config("export_all", ["a"], tmp_path)
    assert kept.lora.export_adapters == ["relation", "subject1", "subject2", "ffn"] and kept.hmt.enabled
    with pytest.raises(ValueError, match="unknown ablation variant 'w_o_x'"):
        select_variants("full,w_o_x")


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    result = run_ablations(out, ["handshaking"], "full,w_o_rcl,w_o_relation", steps=6, overrides=TRAIN,
                           generation=GENERATION, evaluation=EVALUATION)
    return out, result


def test_table_has_every_variant_our_numbers_and_the_papers(ablated):
    out, result = ablated
    with result["csv"].open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["base", "full", "w_o_rcl", "w_o_relation"]
    assert rows["full"]["paper RelAcc"] == "0.4452±0.01" and rows["w_o_rcl"]["paper FVD"] == "2136.95"
    assert rows["w_o_relation"]["relation_lora"] == "—" and rows["base"]["paper CLIP-T"] == "0.3237"
    for name in ("full", "w_o_rcl", "w_o_relation", "base"):
        assert rows[name]["videos"] == "2"
        assert float(rows[name]["FVD"]) > 0 and rows[name]["Judge acc."] != "—"
    md = result["markdown"].read_text()
    assert "## Table 2: components" in md and "## Table 3: where the relation LoRA goes" in md
    assert "**paper RelAcc**" in md and "reference only, not produced here" in md
    assert "| full | full (relation LoRA on Q, K) | 2 |" in md
    assert "| w_o_rcl | w/o relational contrastive loss (RCL) | 2 |" in md
    assert (out / "base" / "eval" / "metrics.json").is_file() and result["base"]["rows"]["base"]["videos"] == 2
    assert not (out / "full" / "eval" / "videos" / "_base").exists()           # variants make LoRA videos only
    for name in ("full", "w_o_rcl", "w_o_relation"):
        assert (out / name / "eval" / "report.html").is_file()
        assert (out / name / "handshaking" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_variants_trained_with_their_settings(ablated):
    out, _ = ablated

    def steps(name):
        return [json.loads(l) for l in (out / name / "handshaking" / "metrics.jsonl").read_text().splitlines()]

    assert len(steps("full")) == 6 and any(s["loss_rcl"] is not None for s in steps("full"))
    assert all(s["loss_rcl"] is None for s in steps("w_o_rcl"))
    lora = json.loads((out / "w_o_relation" / "handshaking" / "lora" / "dr_relation.json").read_text())
    assert lora["adapters"] == ["ffn"] and "relation" not in lora["placement"]


def test_rerun_skips_finished_variants_and_refuses_other_settings(ablated):
    out, first = ablated
    again = run_ablations(out, ["handshaking"], "full,w_o_rcl,w_o_relation", steps=6, overrides=TRAIN,
                          generation=GENERATION, evaluation=EVALUATION)
    assert all(r["status"] == "skipped (finished before)" for r in again["records"].values())
    assert again["base"]["status"] == "skipped (finished before)"
    assert again["csv"].read_text() == first["csv"].read_text()
    with pytest.raises(ValueError, match="other settings"):
        run_ablations(out, ["handshaking"], "full", steps=5, overrides=TRAIN, generation=GENERATION,
                      evaluation=EVALUATION)


def test_variant_steps_train_the_named_variant_with_its_own_steps(tmp_path):
    """--variant-steps: the paper gives DreamRelation and direct LoRA different iteration counts."""
    with pytest.raises(ValueError, match="'direct' is not among the selected variants"):
        run_ablations(tmp_path, ["handshaking"], "w_o_rcl", steps=4, variant_steps={"direct": 2})
    with pytest.raises(ValueError, match="w_o_rcl=0 must be a positive integer"):
        run_ablations(tmp_path, ["handshaking"], "w_o_rcl", steps=4, variant_steps={"w_o_rcl": 0})
    assert not any(tmp_path.iterdir())                                     # refused before anything ran
    result = run_ablations(tmp_path, ["handshaking"], "w_o_rcl", steps=6, overrides=TRAIN, generation=GENERATION,
                           evaluation=EVALUATION, include_base=False, variant_steps={"w_o_rcl": 3})
    metrics = (tmp_path / "w_o_rcl" / "handshaking" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3 and result["records"]["w_o_rcl"]["steps"] == 3
    assert "training steps: 3)" in result["markdown"].read_text()


def test_a_retrained_base_is_not_taken_for_the_one_the_variants_were_made_on(ablated, monkeypatch):
    """The base keeps its preset's name when retrained (synth is): a finished variant is not reused on it."""
    out, _ = ablated
    monkeypatch.setattr("dr_train.eval.ablations.base_identity", lambda preset: "tiny-retrained")
    with pytest.raises(ValueError, match=r"full/ABLATION.json was made with other settings .*\(base model"):
        run_ablations(out, ["handshaking"], "full", steps=6, overrides=TRAIN, generation=GENERATION,
                      evaluation=EVALUATION)


def test_cli_parses_training_and_sampler_steps_apart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_ablate", REPO / "launch" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["--relations", "handshaking", "--out", "x", "--steps", "6",
                                             "--gen-steps", "3", "--variants", "table2"])
    assert args.train_steps == 6 and args.steps == 3 and args.variants == "table2"
    assert module.main(["--relations", "handshaking", "--out", "x", "--variants", "nope"]) == 2
    assert module._variant_steps("direct=400, full=1200") == {"direct": 400, "full": 1200}
    for bad in ("direct", "direct=many", "direct=4=5"):
        with pytest.raises(ValueError, match=f"VARIANT=STEPS, got '{bad}'"):
            module._variant_steps(bad)
        assert module.main(["--relations", "handshaking", "--out", "x", "--variant-steps", bad]) == 2


def _judged_run(folder, kind, rows, seed=None, relations=("a", "b"), steps=None):
    """A finished run's record as the runner keeps it: eval/metrics.json beside eval/videos.jsonl."""
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "metrics.json").write_text("{}")
    lines = [json.dumps({"kind": kind, "relation": rel, "relation_accuracy": acc, "subject_fidelity": 1.0,
                         "appearance_leakage": 0.0, "temporal_consistency": 0.9}) for rel, acc in rows]
    lines.append(json.dumps({"kind": "base" if kind == "lora" else "lora", "relation": "a", "relation_accuracy": 1.0,
                             "subject_fidelity": 1.0}))                     # the other kind: never counted
    (folder / "eval" / "videos.jsonl").write_text("\n".join(lines) + "\n")
    return {"metrics": str(folder / "eval" / "metrics.json"), "seed": seed, "steps": steps,
            "settings": {"relations": list(relations)}}


def test_world_results_and_per_relation_counts_come_from_the_same_videos(tmp_path):
    from dr_train.eval.ablations import write_results

    runs = {"full": [_judged_run(tmp_path / "full" / f"seed-{s}", "lora",
                                 [("a", 1.0), ("a", 0.0), ("b", 0.0), ("b", None)], seed=s, steps=1200)
                     for s in (0, 1)],
            "direct": [_judged_run(tmp_path / "direct", "lora", [("a", 1.0), ("b", 1.0), ("b", 1.0)], seed=0,
                                   steps=400)]}
    base = _judged_run(tmp_path / "base", "base", [("a", 0.0), ("b", 1.0)])
    assert write_results(tmp_path, runs, base) == tmp_path / "results.json"
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "full", "direct"]
    assert results["full"]["relation_accuracy"]["mean"] == pytest.approx(2 / 6)     # the None is not scored
    assert set(results["direct"]) == {"relation_accuracy", "subject_fidelity", "appearance_leakage",
                                      "temporal_consistency"}
    assert set(results["direct"]["relation_accuracy"]) >= {"mean", "ci_low", "ci_high"}
    counts = json.loads((tmp_path / "per_relation.json").read_text())
    assert counts == {"base": {"a": [0, 1], "b": [1, 1]}, "full": {"a": [2, 4], "b": [0, 2]},
                      "direct": {"a": [1, 1], "b": [2, 2]}}
    md = (tmp_path / "per_relation.md").read_text()
    assert "| variant | a | b |" in md and "| full | 2/4 | 0/2 |" in md and "| base | 0/1 | 1/1 |" in md
    md = (tmp_path / "results.md").read_text()
    assert "| variant | what | steps |" in md and "| direct | Direct LoRA fine-tuning (Q, K, V, FFN) | 400 |" in md
    assert "| full | full (relation LoRA on Q, K) | 1200 |" in md and "| base | " in md
    assert (tmp_path / "results.png").is_file()
