"""Train, generate and evaluate the paper's ablations (Tables 2 and 3, and the direct-LoRA baseline) as config
variants, and fill one table beside the paper's numbers:

    python launch/ablate.py --relations handshaking,hugging --variants all --steps 2400 --out runs/ablations \
        --clip /models/clip-vit-base-patch32 --set model.preset=/models/mochi-1 --set data.source=data/ntu
    python launch/ablate.py --relations handshaking --variants full,w_o_rcl --steps 4 --num-prompts 2 \
        --gen-steps 4 --out /tmp/abl                                  # a quick look on the tiny preset

    python launch/ablate.py --set model.preset=synth --relations handshaking,hugging,pushing,high_five,kicking,\
        walking_towards,following,knocking_over --train-seeds 0,1,2 --out runs/ablations_synth     # the synth world
    python launch/ablate.py --set model.preset=synth --relations walking_apart --variants table1 --steps 1200 \
        --variant-steps direct=400 --out runs/steps                        # DreamRelation with 3x direct's steps

Variants: full, w_o_hmt, w_o_rcl, w_o_relation, w_o_subject, w_o_ffn, relation_v, relation_q, relation_kv, direct,
hmt_forward_all, export_all, w_o_subject_hmt, w_o_subject_selection, w_o_subject_mask, frozen_subjects,
frozen_subjects_w_o_mask (or all: the first 12; table1, table2, table3, hmt, export, decompose). Finished variants
are skipped on a re-run.
On the synth world `<out>/results.json` holds every variant's world metrics with 95 % bootstrap intervals, and
`<out>/per_relation.md` / `.json` the videos judged right per relation.
Details: docs/evaluation.md.
"""
import argparse
import logging
import sys

from dr_train.cli import one_line_errors
from dr_train.eval.ablations import run_ablations
from dr_train.eval.evaluate import add_eval_args, eval_kwargs
from dr_train.generate import add_batch_args, batch_kwargs
from dr_train.runtime import quiet_library_noise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the Table 2/3 ablations and the direct-LoRA baseline.")
    p.add_argument("--relations", required=True, help="comma list of catalog relations trained by every variant")
    p.add_argument("--variants", default="all",
                   help="all, table1, table2, table3, hmt, export, decompose or a comma list of variant names")
    p.add_argument("--steps", dest="train_steps", type=int,
                   help="training steps of every variant (train.max_steps; default: the config's, and 1000 for "
                        "direct as its config file says)")
    p.add_argument("--variant-steps", metavar="VARIANT=STEPS,...",
                   help="training steps of some variants instead of --steps, e.g. direct=400 (the paper trains "
                        "DreamRelation 2400 iterations and direct LoRA 1000)")
    p.add_argument("--out", required=True, help="one folder per variant is written under it")
    p.add_argument("--config", help="base training config YAML (variants override it)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="training config override applied to every variant (repeatable)")
    p.add_argument("--train-seeds", help="comma list of training seeds: every variant is trained once per seed "
                                         "(<out>/<variant>/seed-<s>/), and results.json pools them (default: one "
                                         "run per variant at train.seed)")
    p.add_argument("--no-base", action="store_true", help="skip the base model's reference row")
    add_batch_args(p, steps_flag="--gen-steps")
    add_eval_args(p)
    return p


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--train-seeds must be a comma list of integers, got {text!r}") from None


def _variant_steps(text: str) -> dict[str, int]:
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            name, value = item.split("=")
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--variant-steps must be a comma list of VARIANT=STEPS, got {item!r}") from None
    return out


@one_line_errors
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    quiet_library_noise()
    seeds = _seeds(a.train_seeds) if a.train_seeds else None
    result = run_ablations(a.out, [r.strip() for r in a.relations.split(",") if r.strip()], a.variants,
                           a.train_steps, a.config, a.set, batch_kwargs(a), eval_kwargs(a), not a.no_base,
                           train_seeds=seeds,
                           variant_steps=_variant_steps(a.variant_steps) if a.variant_steps else None)
    print(f"table: {result['markdown']} and {result['csv']}")
    if result["results"] is not None:
        print(f"synth world results: {result['results']} ({result['results'].with_suffix('.md').name}, "
              f"{result['results'].with_suffix('.png').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
