"""The yardstick in CI: a relation learned from `person` exemplars on the shipped synth base and carried over to
other kinds, judged by the world's relation judge. The recipe is the one that carries relations on this base
(`w_o_subject_swept`: relation + FFN LoRAs, HMT's selection, RCL, lambda_m 50 on the region the subjects sweep;
docs/ablations_synth_7x7/README.md), on walking towards, the relation every recipe carries best, at the ablations'
1200 steps and lr 1e-3. A change that breaks relation learning on the trainer's path (the objective, the latents'
frame order, the mask weighting, where the LoRAs sit, the export) drops the count: with the clips' latent frames
reversed in training, the same run gives 0 of 8, with the target's sign flipped 1, exporting the FFN LoRA without the
relation LoRA 3 (docs/synth.md)."""
import re

from conftest import SYNTHETIC_CACHE

RECIPE, RELATION = "w_o_subject_swept", "walking_towards"


def learn_and_judge(out_dir, seed: int = 0) -> dict:
    """Train RELATION with RECIPE and run the demo's generation, judge and report on 4 evaluation prompts (other
    kinds) x 2 sampling seeds; returns run_demo's result."""
    from dr_train.demo import run_demo
    from dr_train.eval.ablations import variant_config

    cfg = variant_config(RECIPE, [RELATION], out_dir, steps=1200, overrides=[
        "model.preset=synth", "optim.lr=1e-3", "validation.every=0", "train.checkpoint_every=1200",
        f"train.seed={seed}", f"data.cache_dir={SYNTHETIC_CACHE}"])
    return run_demo(cfg, num_prompts=4, seeds=[0, 1], steps=32, guidance_scale=5.0, batch_size=8)


def judged_right(out: dict) -> dict[str, int]:
    """{'lora' / 'base': videos the judge reads as RELATION}."""
    rows = {r["kind"]: r["world"]["relation_accuracy"] for r in out["metrics"]["rows"] if r["relation"] == RELATION}
    assert rows["lora"]["n"] == rows["base"]["n"] == 8
    return {kind: round(acc["mean"] * acc["n"]) for kind, acc in rows.items()}


def test_walking_towards_learned_from_persons_is_carried_over_to_other_kinds(tmp_path):
    out = learn_and_judge(tmp_path / "runs")
    right = judged_right(out)
    assert right["lora"] >= 4 and right["base"] <= 1, right       # seed 0 here: 8 of 8 and 0 of 8
    html = (tmp_path / "runs" / "report.html").read_text()
    counts = f"videos judged the trained relation: relation LoRAs {right['lora']} of 8, base model {right['base']} of 8"
    assert re.search(rf"(Relation learned and carried over to the prompted subjects|Above the base model, not yet "
                     rf"shown): {counts}", html)
